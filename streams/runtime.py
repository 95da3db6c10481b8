"""Process-wide runtime settings that the pure core must not make itself."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable


class StartupError(RuntimeError):
    """A command cannot start because of its settings or its surroundings (a port in use, a
    state directory that cannot be written, a cluster that does not answer). The message
    names the cause and the setting to change; ``nwatch`` prints it on one line, no traceback."""


def configure_threads(blas_threads: int = 1) -> None:
    """Pin BLAS to ``blas_threads`` threads.

    The kNN scan multiplies small matrices (a batch of 64-256 events against a
    few thousand reference vectors). OpenBLAS spreading those over threads costs
    far more than it gains: measured 5.5 ms instead of 0.17 ms per 64 x 2000 x 8
    product on the 2-core machine while other work ran. torch's thread count for
    the text model is set separately (``NWATCH_MODELS__THREADS``).
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(blas_threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(blas_threads))
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=blas_threads, user_api="blas")


# Allocations between young-generation collections (CPython's default: 700).
# A worker allocates several objects per event on its event loop (Kafka
# records, score dicts, record bytes), so at 700 the collector ran every few
# events and its older generations, holding the pipeline's state, every few
# hundred: with 20,000 the pipeline thread of `nwatch run` spent ~40 instead of
# ~45 us per event (`nwatch bench speed --kafka`, see docs/speed.md).
GC_THRESHOLDS = (20_000, 50, 100)


def configure_gc(thresholds: tuple[int, int, int] | None = None) -> None:
    """Collect cycles less often than CPython's default (see ``GC_THRESHOLDS``).

    ``NWATCH_GC_THRESHOLDS`` (three integers, comma-separated) overrides the
    default when no thresholds are given.
    """
    if thresholds is None:
        env = os.environ.get("NWATCH_GC_THRESHOLDS", "").strip()
        if env:
            try:
                parts = tuple(int(v) for v in env.split(","))
            except ValueError:
                parts = ()
            if len(parts) != 3 or min(parts) < 0:
                raise StartupError(f"NWATCH_GC_THRESHOLDS must be three integers >= 0, got {env!r}")
            thresholds = parts  # type: ignore[assignment]
        else:
            thresholds = GC_THRESHOLDS
    gc.set_threshold(*thresholds)


def freeze_startup_objects() -> None:
    """Move every object alive now (modules, the app, loaded models) out of the
    collector's scans: called once start-up is done, before the stream runs."""
    gc.collect()
    gc.freeze()


def stop_process_group(proc: subprocess.Popen, *, timeout: float = 20.0) -> int:
    """SIGTERM the child's process group, SIGKILL it after ``timeout``; returns the exit code.

    The child must have been started with ``start_new_session=True`` so that its
    group holds it and whatever it started, and nothing else.
    """
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()
    return proc.returncode


class RepeatLimiter:
    """A logging filter that lets a third-party log message through once per ``window`` seconds.

    With the broker away, aiokafka's clients (faust's consumer and producer and
    the worker's own) retry every ~50 ms and log an ERROR line at each try: ~150
    lines a second, over a megabyte of log a minute, the one line that matters
    buried. A message is known by its logger, level and format string (``"Unable
    connect to node with id %s: %s"``), so one that differs only in its
    arguments counts as a repeat; the next one let through says how many were
    held back. The worker's own loggers (``neighbourwatch.*``) are never held back.

    It remembers at most ``max_keys`` messages: a library that formats its
    messages itself (an f-string per call) makes a new key each time, and a
    worker runs for months. Past that, the messages not let through within the
    window are forgotten (their count of held-back repeats with them).
    """

    def __init__(self, window: float = 30.0, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 4096) -> None:
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}  # key -> (last let through, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("neighbourwatch"):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.window:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        held = last[1] if last is not None else 0
        if last is None and len(self._seen) >= self.max_keys:
            self._forget(now)
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {now - last[0]:.0f} s)"
        return True

    def _forget(self, now: float) -> None:
        recent = {k: v for k, v in self._seen.items() if now - v[0] < self.window}
        if len(recent) >= self.max_keys:  # all of them recent: keep the newer half
            recent = dict(sorted(recent.items(), key=lambda kv: kv[1][0])[len(recent) // 2:])
        self._seen = recent


def limit_repeats(logger: logging.Logger, window: float = 30.0) -> None:
    """Hold back repeated third-party messages on each of ``logger``'s handlers (see :class:`RepeatLimiter`)."""
    for handler in logger.handlers:
        if not any(isinstance(f, RepeatLimiter) for f in handler.filters):
            handler.addFilter(RepeatLimiter(window))

"""Process-wide runtime settings that the pure core must not make itself."""

from __future__ import annotations

import gc
import os
import signal
import subprocess


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

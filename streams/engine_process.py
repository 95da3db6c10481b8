"""The worker's pipeline in a child process (``kafka.pipeline_path = "process"``).

On the "thread" path the worker process runs the pipeline in one thread and
its Kafka I/O on the event loop, both under one GIL: the worker is serialised
on it (docs/speed.md, kafka10: pipeline thread 30.9 + loop 8.3 us per event).
Here a child process (``python -m streams.engine_process``, started as the app
starts) owns what the pipeline thread did: the :class:`~streams.pipeline.Pipeline`,
the :class:`~streams.durable.DurableState` with its snapshot store, and the
building of the output records. It is a :class:`~streams.app.Worker` without a
faust app whose methods are called in the order the requests come, as the one
pipeline thread took them (first in, first out). The parent keeps the faust
app, the consumer group, consuming, producing, commits, the rebalance listener,
the Prometheus metrics and alert delivery.

One pickled blob per request each way (protocol 5): a batch goes over as the
raw values and the few per-message fields its dead letters need (partition
runs, offsets, keys, timestamps); the reply carries the output records, a
:class:`~streams.metrics.BatchSummary` and the metrics calls the durable state
made meanwhile (``observe_restore``, ``observe_snapshot``, ...), replayed on
the parent's :class:`~streams.metrics.Metrics`. The batch's result stays in the
child until the parent says its outputs are acknowledged (``done``, a one-way
request in the same FIFO). The parent mirrors the durable bookkeeping it reads
on the loop (:class:`RemoteState`: ready partitions, batches in flight, when a
snapshot is due).

Spawned with ``subprocess`` and two inherited pipes (as streams.producer_process),
not ``multiprocessing``: no fork of a process that has threads and an event loop,
no resource tracker; the child's imports and model load overlap faust's start.

A child that dies fails every request waiting with :class:`EngineDied`; the
worker stops with that error, and nothing is committed that was not produced.
At shutdown the child writes the final snapshot (after the parent's producer
has stopped), then exits.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from streams.producer_process import child_logging, end_child, fail_pending, spawn_child

log = logging.getLogger("neighbourwatch.engine")

TP = tuple[str, int]
PROTOCOL = 5
WORKER_GONE = "the worker is gone; no final snapshot written"


class EngineDied(RuntimeError):
    """The pipeline process is gone: the batches it held are not processed, nor acknowledged."""


class EngineError(RuntimeError):
    """A request failed in the pipeline process (its traceback is in the message)."""


class SnapshotRef:
    """The parent's handle on a snapshot the child loaded and holds (the states stay there)."""

    __slots__ = ("offset", "anchor", "n_sources")

    def __init__(self, offset: int, anchor: tuple[int, int] | None, n_sources: int) -> None:
        self.offset, self.anchor, self.n_sources = offset, anchor, n_sources


class EngineProcess:
    """The worker's side of the pipeline process.

    Parameters
    ----------
    settings : Settings
        The worker's settings (the child builds its pipeline and state from them).
    metrics : optional
        A ``streams.metrics.Metrics``: the child's metrics calls are replayed on it.
    on_death : callable, optional
        Called once, on the event loop, with the :class:`EngineDied` error when
        the child ends while the worker runs.
    """

    def __init__(self, settings: Any, *, metrics: Any = None, on_death: Callable[[EngineDied], Any] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.on_death = on_death
        self.proc: subprocess.Popen | None = None
        self._requests: Connection | None = None
        self._replies: Connection | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nwatch-engine-pipe")
        self._pending: dict[int, asyncio.Future] = {}
        self._sent: dict[int, float] = {}  # when each request waiting was sent (monotonic), oldest first
        self._progress: float | None = None  # when the child last answered (or said it was ready)
        self.stall_seconds = float(settings.kafka.pipeline_stall_seconds)
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.died: EngineDied | None = None

    def start(self) -> None:
        """Spawn the child (from the event loop that will await its replies)."""
        if self.proc is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.proc, self._requests, self._replies = spawn_child("streams.engine_process")
        # The worker's log level (``nwatch run --loglevel``, set on the root logger) holds in the child too.
        level = logging.getLogger().getEffectiveLevel()
        self._requests.send_bytes(pickle.dumps((self.settings, self.metrics is not None, level), protocol=PROTOCOL))
        threading.Thread(target=self._read, name="nwatch-engine-read", daemon=True).start()
        if self.stall_seconds > 0:
            self._loop.call_later(self._watch_interval(), self._watch)

    # -- requests ------------------------------------------------------------------------
    def request(self, op: str, *args: Any) -> asyncio.Future:
        """Send a request; the future resolves to the child's answer. Answered in call order."""
        if self._loop is None:
            self.start()
        assert self._loop is not None
        fut = self._loop.create_future()
        if self.died is not None:
            fut.set_exception(self.died)
            return fut
        n, self._next = self._next, self._next + 1
        self._pending[n] = fut
        self._sent[n] = time.monotonic()
        self._send((n, op, args))
        return fut

    def tell(self, op: str, *args: Any) -> None:
        """A one-way request (no answer), in the same order as the others."""
        if self.died is None:
            self._send((None, op, args))

    def _send(self, message: tuple) -> None:
        def write() -> None:
            # Pickled here, in the writer thread: one thread, so blobs reach the pipe in call order.
            assert self._requests is not None
            self._requests.send_bytes(pickle.dumps(message, protocol=PROTOCOL))

        written = self._writer.submit(write)
        written.add_done_callback(lambda w: self._from_thread(self._gone) if w.exception() else None)

    def process(self, raws: list[bytes], msgs: Sequence[Any], tps: Sequence[TP], event_times: list) -> asyncio.Future:
        """A batch: the future resolves to ``(batch number, output records, BatchSummary or None)``."""
        runs: list[tuple[TP, int]] = []
        last = None
        for tp in tps:
            if tp == last:
                runs[-1] = (tp, runs[-1][1] + 1)
            else:
                runs.append((tp, 1))
                last = tp
        return self.request("process", raws, runs, [m.offset for m in msgs], [m.key for m in msgs], event_times)

    # -- replies -------------------------------------------------------------------------
    def _read(self) -> None:
        """Reader thread: blocking reads (the GIL released), each reply handed to the loop."""
        assert self._replies is not None
        while True:
            try:
                n, ok, value, calls = pickle.loads(self._replies.recv_bytes())
            except (EOFError, OSError):
                self._from_thread(self._gone)
                return
            except Exception:  # a reply this side cannot read: the two cannot go on together
                log.exception("unreadable reply from the pipeline process")
                if self.proc is not None:
                    self.proc.kill()
                self._from_thread(self._gone)
                return
            self._from_thread(self._answer, n, ok, value, calls)

    def _from_thread(self, fn: Callable, *args: Any) -> None:
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the worker is past its shutdown
            pass

    def _answer(self, n: int | None, ok: bool, value: Any, calls: list) -> None:
        self._progress = time.monotonic()  # n None: the child is ready (its start-up is not a stall)
        if self.metrics is not None:
            for name, args, kwargs in calls:
                try:
                    getattr(self.metrics, name)(*args, **kwargs)
                except Exception:  # metrics must never stop detection
                    log.exception("metrics failed")
        fut = self._pending.pop(n, None)
        self._sent.pop(n, None)
        if fut is None or fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(EngineError(value))

    def _watch_interval(self) -> float:
        return min(5.0, self.stall_seconds / 4)

    def oldest_request_age(self) -> float:
        """Seconds the child has spent on the oldest request still unanswered: since it was sent
        or since the child's last answer, whichever is later (0 when none waits, or before the
        child is ready: its imports and model load are not a stall)."""
        if not self._sent or self._progress is None:
            return 0.0
        return time.monotonic() - max(next(iter(self._sent.values())), self._progress)

    def _watch(self) -> None:
        """On the loop, every few seconds: a child that answers nothing for ``stall_seconds`` is
        hung (its pipe still open, so no EOF tells): killed, and the worker stops with the error."""
        if self.died is not None or self._stopping:
            return
        age = self.oldest_request_age()
        if age <= self.stall_seconds:
            assert self._loop is not None
            self._loop.call_later(self._watch_interval(), self._watch)
            return
        if self.proc is not None:
            self.proc.kill()
        self._gone(f"the pipeline process answered no request for {age:.0f} s "
                   f"(kafka.pipeline_stall_seconds = {self.stall_seconds:g}) and was killed")

    def _gone(self, why: str | None = None) -> None:
        """The child ended (or hung: ``why``): every request waiting fails, and the worker hears of it once."""
        if self.died is not None or self._stopping:
            return
        if why is None:
            code = None
            if self.proc is not None:
                try:  # its pipes close before it can be reaped: a moment for the exit code
                    code = self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
            # The OOM killer picks the biggest process of a container at its memory limit: this one.
            hint = ": SIGKILL, as the OOM killer sends at a memory limit" if code == -signal.SIGKILL else ""
            why = f"the pipeline process ended (exit code {code}{hint})"
        self.died = EngineDied(
            f"{why} with {len(self._pending)} requests unanswered; the batches it held are not "
            "acknowledged and their input offsets not committed"
        )
        fail_pending(self._pending, self.died)
        self._sent.clear()
        log.error("%s", self.died)
        if self.on_death is not None:
            self.on_death(self.died)

    def stop(self, timeout: float = 120.0) -> None:
        """At shutdown, after the outputs are produced: the child writes the final snapshot and ends."""
        self._stopping = True
        if self.proc is None:
            return
        if self._requests is not None and self.died is None:
            try:
                self._writer.submit(self._requests.send_bytes, pickle.dumps((None, "stop", ()))).result(timeout)
            except Exception:
                pass
        end_child(self.proc, timeout if self.died is None else 10.0, "pipeline process")
        for conn in (self._requests, self._replies):
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass
        self._writer.shutdown(wait=False)


class RemoteState:
    """The worker's durable state when it lives in the pipeline process.

    The calls the worker makes on the event loop are answered from mirrors
    (partitions ready and where they start, batches in flight, snapshot due),
    the rest are requests (:class:`EngineProcess`), awaited like the pipeline
    thread's calls on the "thread" path.
    """

    def __init__(self, engine: EngineProcess, *, has_store: bool, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.has_store = has_store
        self.interval = interval
        self.clock = clock
        self.skip_below: dict[TP, int] = {}
        self.in_flight = 0
        self._last_snapshot = clock()

    def is_ready(self, tp: TP) -> bool:
        return tp in self.skip_below

    def begin(self) -> None:
        self.in_flight += 1

    def abandon(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)  # the child never began a batch that failed

    def done(self, batch: int) -> None:
        self.engine.tell("done", batch)
        self.in_flight = max(0, self.in_flight - 1)

    def due(self) -> bool:
        return self.has_store and self.clock() - self._last_snapshot >= self.interval

    async def load(self, tp: TP) -> SnapshotRef | None:
        return await self.engine.request("load", tp)

    def refuse(self, tp: TP, snapshot: SnapshotRef, why: str) -> None:
        self.engine.tell("refuse", tp, why)

    async def take_over(self, tp: TP, first_offset: int, snapshot: SnapshotRef | None) -> tuple[int, int] | None:
        span, skip = await self.engine.request("take_over", tp, first_offset, snapshot is not None)
        self.skip_below[tp] = skip
        return span

    async def forget(self, tp: TP) -> None:
        await self.engine.request("forget", tp)
        self.skip_below.pop(tp, None)

    async def release(self, tps: Sequence[TP]) -> None:
        await self.engine.request("release", list(tps))
        for tp in tps:
            self.skip_below.pop(tp, None)
        self._last_snapshot = self.clock()

    async def snapshot(self) -> int:
        n = await self.engine.request("snapshot")
        self._last_snapshot = self.clock()
        return n


# -- the child -----------------------------------------------------------------------------


class _Recorder:
    """The child's stand-in for the metrics: calls recorded, sent with the next reply."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


class _Message:
    """What a dead letter reads of an input message (``streams.app.dead_letter``)."""

    __slots__ = ("topic", "partition", "offset", "key", "value")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = topic, partition, offset, key, value


class _Messages:
    """A batch's messages, built only for those asked for (the rejects)."""

    def __init__(self, raws: list[bytes], tps: list[TP], offsets: list[int], keys: list) -> None:
        self.raws, self.tps, self.offsets, self.keys = raws, tps, offsets, keys

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, i: int) -> _Message:
        return _Message(*self.tps[i], self.offsets[i], self.keys[i], self.raws[i])


class _Engine:
    """The child's side: a faust-less Worker, its requests run in arrival order."""

    def __init__(self, settings: Any, with_metrics: bool) -> None:
        from streams.app import Worker

        kafka = settings.kafka.model_copy(update={"pipeline_path": "thread"})
        settings = settings.model_copy(update={"kafka": kafka})
        self.recorder = _Recorder() if with_metrics else None
        self.worker = Worker(settings=settings, metrics=self.recorder)
        if settings.models.preload:
            threading.Thread(target=self.worker.pipeline.preload, name="nwatch-preload", daemon=True).start()
        self.batches: dict[int, tuple] = {}
        self.held: dict[TP, Any] = {}  # snapshots loaded, until taken over or refused

    def process(self, n: int, raws: list[bytes], runs: list, offsets: list[int], keys: list, times: list) -> tuple:
        from streams.metrics import summarise_batch

        tps = [tp for tp, count in runs for _ in range(count)]
        result, outputs = self.worker._process(raws, _Messages(raws, tps, offsets, keys))
        summary = summarise_batch(result, self.worker.pipeline, times) if self.recorder is not None else None
        self.batches[n] = (tps, offsets, result, raws)
        self.worker.durable.begin()
        return n, outputs, summary

    def done(self, n: int) -> None:
        self.worker.durable.done(*self.batches.pop(n))

    def load(self, tp: TP) -> SnapshotRef | None:
        snapshot = self.worker.durable.load(tp)
        if snapshot is None:
            self.held.pop(tp, None)
            return None
        self.held[tp] = snapshot
        return SnapshotRef(snapshot.offset, snapshot.anchor, len(snapshot.sources))

    def refuse(self, tp: TP, why: str) -> None:
        snapshot = self.held.pop(tp, None)
        if snapshot is not None:
            self.worker.durable.refuse(tp, snapshot, why)

    def take_over(self, tp: TP, first_offset: int, use: bool) -> tuple:
        snapshot = self.held.pop(tp, None)
        span = self.worker.durable.take_over(tp, first_offset, snapshot if use else None)
        return span, self.worker.durable.skip_below[tp]

    def forget(self, tp: TP) -> None:
        self.worker.durable.forget(tp)

    def replay(self, tp: TP, raws: list[bytes], last_offset: int) -> None:
        self.worker._replay_chunk(tp, raws, last_offset)

    def release(self, tps: list[TP]) -> None:
        self.worker.durable.release(tps)

    def snapshot(self) -> int:
        return self.worker.durable.snapshot()

    def stop(self) -> None:
        self.worker.close()  # the final snapshot

    def serve(self, requests: Connection, replies: Connection) -> None:
        while True:
            try:
                n, op, args = pickle.loads(requests.recv_bytes())
            except (EOFError, OSError):
                log.warning(WORKER_GONE)
                return
            if op == "stop":
                self.stop()
                return
            try:
                value = self.process(n, *args) if op == "process" else getattr(self, op)(*args)
                ok = True
            except Exception:
                if n is None:
                    log.exception("pipeline process: %s failed", op)
                    continue
                value, ok = traceback.format_exc(), False
            if n is not None:
                calls = self.recorder.take() if self.recorder is not None else []
                try:
                    replies.send_bytes(pickle.dumps((n, ok, value, calls), protocol=PROTOCOL))
                except OSError:  # a broken pipe: the worker died while this request ran
                    log.warning(WORKER_GONE)
                    return


def main(argv: list[str]) -> int:
    # The worker ends this process (a stop request after its last batch): a signal sent to the
    # whole process group (Ctrl-C, a container's stop) must not cut the final snapshot short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child_logging("pipeline")
    requests = Connection(int(argv[0]), writable=False)
    replies = Connection(int(argv[1]), readable=False)
    from streams.runtime import configure_gc, configure_threads, freeze_startup_objects

    configure_threads()  # as `nwatch run` does: BLAS on one thread, the collector less often
    configure_gc()
    settings, with_metrics, level = pickle.loads(requests.recv_bytes())
    logging.getLogger().setLevel(level)

    engine = _Engine(settings, with_metrics)
    freeze_startup_objects()
    replies.send_bytes(pickle.dumps((None, True, None, []), protocol=PROTOCOL))  # ready
    engine.serve(requests, replies)
    return 0


if __name__ == "__main__":
    # Run from the module by its name, not as __main__: the classes it pickles (SnapshotRef)
    # must be found under streams.engine_process in the worker.
    from streams.engine_process import main as _main

    sys.exit(_main(sys.argv[1:]))

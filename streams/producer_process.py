"""The worker's output records produced by a child process (``kafka.output_path = "process"``).

The worker process holds the pipeline, and one GIL is shared by its pipeline
thread and its event loop; aiokafka's producing (record batches, produce
requests, acks) costs the loop a share of every event. Here a child process
(``python -m streams.producer_process``, started with the worker) owns an
aiokafka producer with the same client settings (TLS/SASL from the same
``KafkaSettings``), acks=all, and the default partitioner on the record key,
as the in-process paths: a source's records keep one partition and their order.

The worker hands it one blob per batch: the batch's records
``(topic, key, value, headers)`` pickled as one list, written to a pipe by a
writer thread (the write releases the GIL). The child produces the batches in
the order they came, each as a record batch per partition, waits for every
ack (a broker that is away is waited for and the batch produced again, with
capped backoff, as the in-process paths do) and answers with the batch's
number. Only then does the worker treat the batch as done (durable state,
input offsets committed): at least once, never at most once.

A child that dies fails every batch still waiting with :class:`ProducerDied`;
the worker then stops with that error, and the inputs of those batches, not
committed, are processed again by whichever worker takes their partitions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger("neighbourwatch.producer")

Record = tuple[str, bytes | None, bytes | None, list | None]  # (topic, key, value, headers); value None: a tombstone
# Linux pipes hold 64 KiB unless asked for more; a worker batch is ~0.6-1.2 MB of
# records, so a bigger pipe lets the writer hand most of it over in one go.
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python 3.10+ names it; older ones do not)


class ProducerDied(RuntimeError):
    """The producer process is gone: the outputs of the batches it held are not acknowledged."""


def _widen(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:  # capped by /proc/sys/fs/pipe-max-size: the default size works too, in more writes
        pass


def spawn_child(module: str) -> tuple[subprocess.Popen, Connection, Connection]:
    """``python -m module <read fd> <write fd>`` with a pipe each way (widened to ``PIPE_BYTES``);
    returns the process, the connection to write to it and the one to read from it."""
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    _widen(to_w)
    _widen(from_w)
    proc = subprocess.Popen(
        [sys.executable, "-m", module, str(to_r), str(from_w)],
        pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL, close_fds=True,
    )
    os.close(to_r)
    os.close(from_w)
    return proc, Connection(to_w, readable=False), Connection(from_r, writable=False)


def child_logging(role: str, level: int = logging.WARNING) -> None:
    """A child process's log lines, on the stderr it shares with the worker, say which process
    wrote them: ``[pipeline 1234]`` (the worker's own lines carry its pid as faust writes them)."""
    logging.basicConfig(level=level, format=f"%(asctime)s [{role} %(process)d] %(levelname)s %(name)s: %(message)s")


def fail_pending(pending: dict[int, asyncio.Future], err: Exception) -> None:
    """Fail every future still waiting on a child that is gone (and forget them)."""
    for fut in pending.values():
        if not fut.done():
            fut.set_exception(err)
    pending.clear()


def end_child(proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Wait for a child told to stop; killed after ``timeout`` seconds."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("the %s did not stop in %.0f s; killed", what, timeout)
        proc.kill()
        proc.wait()


class ProducerProcess:
    """The worker's side of the producer process.

    Parameters
    ----------
    kafka : KafkaSettings
        Client settings of the child's producer (bootstrap servers, TLS, SASL).
    max_batch_bytes : int
        The producer's record batch size.
    on_death : callable, optional
        Called (once, on the event loop) with the :class:`ProducerDied` error
        when the child ends while the worker runs.
    """

    def __init__(self, kafka: Any, *, max_batch_bytes: int, on_death: Callable[[ProducerDied], Any] | None = None) -> None:
        self.kafka = kafka
        self.max_batch_bytes = max_batch_bytes
        self.on_death = on_death
        self.proc: subprocess.Popen | None = None
        self._data: Connection | None = None  # blobs to the child
        self._acks: Connection | None = None  # batch numbers back
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nwatch-produce-pipe")
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.died: ProducerDied | None = None

    def start(self) -> None:
        """Spawn the child (on the event loop that will await the acks)."""
        self._loop = asyncio.get_running_loop()
        self.proc, self._data, self._acks = spawn_child("streams.producer_process")
        ack_r = self._acks.fileno()
        self._data.send_bytes(pickle.dumps((self.kafka, self.max_batch_bytes)))
        self._loop.add_reader(ack_r, self._on_acks)

    def submit(self, records: list[Record]) -> asyncio.Future:
        """Hand one batch's records over; the future resolves once the broker acknowledged every one.

        Batches reach the child, and are produced, in the order of the calls.
        """
        if self.died is not None:
            raise self.died
        assert self._loop is not None and self._data is not None, "start() first"
        batch, self._next = self._next, self._next + 1
        acked = self._pending[batch] = self._loop.create_future()
        blob = pickle.dumps((batch, records), protocol=pickle.HIGHEST_PROTOCOL)
        # One writer thread (the write releases the GIL): blobs reach the pipe in call order.
        written = self._loop.run_in_executor(self._writer, self._data.send_bytes, blob)
        written.add_done_callback(lambda w: self._gone() if not w.cancelled() and w.exception() else None)
        return acked

    def _on_acks(self) -> None:
        assert self._acks is not None
        try:
            while self._acks.poll():
                batch = int.from_bytes(self._acks.recv_bytes(), "little")
                fut = self._pending.pop(batch, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
        except (EOFError, OSError):
            self._gone()

    def _gone(self) -> None:
        """The child ended: every batch it held fails, and the worker hears of it once."""
        if self.died is not None:
            return
        code = self.proc.poll() if self.proc is not None else None
        self.died = ProducerDied(
            f"the producer process ended (exit code {code}) with {len(self._pending)} batches "
            "not acknowledged; their input offsets are not committed"
        )
        if self._loop is not None and self._acks is not None:
            self._loop.remove_reader(self._acks.fileno())
        fail_pending(self._pending, self.died)
        if not self._stopping:
            log.error("%s", self.died)
            if self.on_death is not None:
                self.on_death(self.died)

    def stop(self, timeout: float = 10.0) -> None:
        """Let the child finish what it holds, then end it (killed after ``timeout`` seconds)."""
        self._stopping = True
        if self.proc is None:
            return
        if self._data is not None:
            try:
                self._data.send_bytes(b"")  # no more batches
            except OSError:
                pass
            self._data.close()
            self._data = None
        end_child(self.proc, timeout, "producer process")
        if self._acks is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._acks.fileno())
            self._acks.close()
            self._acks = None
        self._writer.shutdown(wait=False)


# -- the child -----------------------------------------------------------------------------


async def produce_batch(producer: Any, records: list[Record]) -> list[asyncio.Future]:
    """Queue a batch's records as one record batch per partition; returns their ack futures.

    The partition of a keyed record is the producer's partitioner's choice on
    its key (once per key and topic), as ``send`` would pick it; unkeyed
    records are spread per record.
    """
    by_partition: dict[tuple[str, int], list[tuple[bytes | None, bytes | None, list | None]]] = {}
    target: dict[tuple[str, bytes], list] = {}
    for name in {r[0] for r in records}:
        await producer.partitions_for(name)  # metadata in hand for the partitioner
    for name, k, v, h in records:
        if k is None:
            recs = by_partition.setdefault((name, producer._partition(name, None, None, None, k, v)), [])
        elif (recs := target.get((name, k))) is None:
            part = producer._partition(name, None, None, None, k, v)
            recs = target[(name, k)] = by_partition.setdefault((name, part), [])
        recs.append((k, v, h))
    futures = []
    for (name, part), recs in by_partition.items():
        batch = producer.create_batch()
        for k, v, h in recs:
            if batch.append(key=k, value=v, timestamp=None, headers=h or []) is None:  # full
                futures.append(await producer.send_batch(batch, name, partition=part))
                batch = producer.create_batch()
                # aiokafka takes a batch's first record whatever its size; never lose one silently
                if batch.append(key=k, value=v, timestamp=None, headers=h or []) is None:
                    raise RuntimeError(f"a record of {len(v or b'')} bytes fits no batch of {name}")
        futures.append(await producer.send_batch(batch, name, partition=part))
    return futures


async def _child(data: Connection, acks: Connection) -> None:
    from aiokafka import AIOKafkaProducer

    from streams.broker import aiokafka_client_config

    kafka, max_batch_bytes = pickle.loads(data.recv_bytes())
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def read() -> None:  # blocking reads off the loop; b"" ends the stream
        while True:
            try:
                blob = data.recv_bytes()
            except (EOFError, OSError):
                blob = b""
            loop.call_soon_threadsafe(queue.put_nowait, blob)
            if not blob:
                return

    threading.Thread(target=read, name="nwatch-produce-read", daemon=True).start()
    producer = AIOKafkaProducer(
        **aiokafka_client_config(kafka), acks="all", max_batch_size=max_batch_bytes,
        max_request_size=1024 * 1024 + 16 * 1024,
    )
    await _retrying(producer.start, "producer process: connecting")  # a broker that is away is waited for
    waiting: asyncio.Queue[tuple[int, list[Record], list[asyncio.Future]] | None] = asyncio.Queue()

    async def confirm() -> None:
        """Acks in batch order; a batch that failed is produced again until the broker takes it."""
        while (item := await waiting.get()) is not None:
            batch, records, futures = item
            delay = 0.5
            while True:
                try:
                    await asyncio.gather(*futures)
                    break
                except Exception as err:
                    log.warning("producing %d records failed (%s); retrying in %.1f s", len(records), err, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    futures = await _issue(producer, records)
            acks.send_bytes(batch.to_bytes(8, "little"))

    confirming = asyncio.ensure_future(confirm())
    try:
        while blob := await queue.get():
            batch, records = pickle.loads(blob)
            # Issued at once, in arrival order; their acks are awaited behind, so the
            # next batch's records are queued while this one's are in flight.
            waiting.put_nowait((batch, records, await _issue(producer, records)))
        waiting.put_nowait(None)
        await confirming
    finally:
        await producer.stop()


async def _issue(producer: Any, records: list[Record]) -> list[asyncio.Future]:
    """``produce_batch``, with a refusal (broker away, metadata missing) retried until it goes."""
    return await _retrying(lambda: produce_batch(producer, records), f"queueing {len(records)} records")


async def _retrying(action: Callable[[], Any], what: str) -> Any:
    """``await action()`` until it succeeds, waiting 0.5 s after a failure, doubled each time up to 10 s."""
    delay = 0.5
    while True:
        try:
            return await action()
        except Exception as err:
            log.warning("%s failed (%s); retrying in %.1f s", what, err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def main(argv: list[str]) -> int:
    # The worker ends this process (end of its pipe, then a wait): a signal sent to the
    # whole process group (Ctrl-C, a container's stop) must not cut a batch short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child_logging("producer")
    data = Connection(int(argv[0]), writable=False)
    acks = Connection(int(argv[1]), readable=False)
    asyncio.run(_child(data, acks))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

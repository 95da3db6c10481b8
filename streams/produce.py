"""``nwatch produce``: publish a JSONL file (or stdin) to a Kafka topic, one message per line.

Each non-blank line is sent unchanged as the message value (the bytes of the
line without its line terminator). The key is the event's ``source`` (its
``kind`` when it has no source, as the source defaults to the kind), so one
source stays on one partition and its events keep their file order. A line
that is not a JSON object is sent too, unchanged and with a null key: the
worker's dead-letter path is where invalid input is judged and counted.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import orjson

from detectors.shards import shard_of

from streams.broker import kafka_client_config
from streams.config import KafkaSettings

__all__ = ["ProduceError", "ProduceSummary", "ProgressLine", "produce_file"]

# Producer tuning. kafka-python spends ~50 us of Python per send(); what the
# broker sees is governed by how many records share a request:
# - acks="all" + idempotence: a record counts as produced once every in-sync
#   replica has it, and retries can neither duplicate nor reorder records, so a
#   source's events arrive in file order (the worker scores before it learns,
#   in arrival order). Both are kafka-python 3 defaults; set here so that a
#   change of default cannot weaken them.
# - linger_ms=20: wait up to 20 ms to fill a batch. A file is read much faster
#   than the network drains, so batches fill anyway; the linger only matters at
#   the tail and costs at most 20 ms per flush. Measured on Tansu: 6.7k msg/s
#   with linger 0, 13k with 20 ms and 256 KiB batches.
# - batch_size=256 KiB per partition: large enough for hundreds of events per
#   request, and well under the 1 MiB ``message.max.bytes`` default of Kafka
#   brokers (a batch is one "message" to that limit).
_PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 20,
    "batch_size": 256 * 1024,
    "client_id": "nwatch-produce",
    # Seconds to wait for topic metadata (and for buffer space) before giving up:
    # long enough for a slow cluster, short enough for a typo in the topic name.
    "max_block_ms": 30_000,
}

# Flush at most this many value bytes at a time: the kafka-python accumulator
# has no memory bound, so the file is sent in slices of at most `batch` lines
# and 32 MiB, each flushed (and its failures counted) before the next is read.
_MAX_PENDING_BYTES = 32 * 1024 * 1024

# After Ctrl-C, how long the records already sent are waited for before they are counted.
_INTERRUPT_FLUSH_SECONDS = 10.0
# How many delivery error messages the summary keeps (the count is complete).
_MAX_ERRORS = 5


class ProduceError(RuntimeError):
    """Producing stopped: the topic is unreachable or the cluster refused records.

    ``summary`` holds the counts up to the failure.
    """

    def __init__(self, message: str, summary: ProduceSummary) -> None:
        super().__init__(message)
        self.summary = summary


class ProduceInterrupted(ProduceError):
    """Ctrl-C while producing; ``summary`` counts what the cluster acknowledged by then."""

    def __init__(self, summary: ProduceSummary) -> None:
        unacknowledged = summary.lines - summary.blank - summary.produced
        where = (f"every line up to {summary.last_acknowledged:,} is on {summary.topic}"
                 if unacknowledged == 0 and summary.failed == 0 else
                 f"{summary.produced:,} of {summary.lines:,} lines acknowledged, the last at line "
                 f"{summary.last_acknowledged:,}; {summary.failed:,} refused")
        super().__init__(f"interrupted: {where}", summary)


@dataclass(frozen=True)
class ProduceSummary:
    """Counts of one :func:`produce_file` run (also passed to ``progress`` as it goes).

    Attributes
    ----------
    topic
        Topic produced to.
    lines
        Lines read, blank ones included.
    blank
        Blank lines skipped (no message).
    produced
        Messages the cluster acknowledged.
    keyed
        Of those, messages with a key (a source or a kind).
    not_json
        Lines that are not a JSON object, sent unchanged with a null key.
    failed
        Lines the cluster did not take (e.g. larger than ``max_request_size``).
    bytes
        Value bytes acknowledged.
    seconds
        Wall time so far.
    errors
        The first few failure messages, with their line numbers.
    last_acknowledged
        The number of the last line acknowledged (0: none yet).
    """

    topic: str
    lines: int = 0
    blank: int = 0
    produced: int = 0
    keyed: int = 0
    not_json: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: tuple[str, ...] = ()
    last_acknowledged: int = 0

    @property
    def messages_per_second(self) -> float:
        return self.produced / self.seconds if self.seconds > 0 else 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def lines_text(self) -> list[str]:
        """A short summary for a person."""
        out = [
            f"produced {self.produced:,} messages to {self.topic} "
            f"({self.keyed:,} keyed, {self.not_json:,} not JSON objects sent with a null key); "
            f"{self.blank:,} blank lines skipped, {self.failed:,} failed",
            f"{self.seconds:.2f} s, {self.messages_per_second:,.0f} msg/s, "
            f"{self.megabytes_per_second:,.1f} MB/s",
        ]
        out += [f"  {e}" for e in self.errors]
        return out


def produce_file(
    source: str | os.PathLike[str] | BinaryIO,
    *,
    topic: str,
    kafka_settings: KafkaSettings,
    key_field: str = "source",
    batch: int = 5000,
    progress: Callable[[ProduceSummary], None] | None = None,
    producer_config: Mapping[str, Any] | None = None,
    shards: Mapping[str, int] | None = None,
) -> ProduceSummary:
    """Publish each line of a JSONL file to ``topic``, unchanged, keyed by ``key_field``.

    Parameters
    ----------
    source
        A path, ``"-"`` for stdin, or a binary file object (not closed here).
    topic
        Destination topic. It must exist unless the cluster creates topics on
        first use (Tansu and Kafka's default do).
    kafka_settings
        Cluster address and security (``NWATCH_KAFKA__*``).
    key_field
        Field whose string value is the key; when absent, the event's ``kind``;
        when neither is a string, a null key.
    batch
        Lines sent between flushes. Each flush waits for the acknowledgements,
        counts failures and calls ``progress``; it bounds the memory held.
    progress
        Called after each flush with the counts so far.
    producer_config
        Extra ``KafkaProducer`` keyword arguments, over ours (tests, tuning).
    shards
        Sharded sources and their shard counts (``Settings.shard_counts``): an
        event of such a source is keyed ``source#k``, k from a stable hash of its
        id (``detectors.shards.shard_of``), so its shards spread over partitions.

    Returns
    -------
    ProduceSummary
        Counts and rate. ``failed`` counts single records the cluster refused
        (too large); the run goes on past them.

    Raises
    ------
    ProduceError
        The topic's metadata did not arrive within ``max_block_ms``, or a
        delivery failed for a reason other than the record's size (the cluster
        is gone): producing stops after the current batch.
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    config: dict[str, Any] = {**kafka_client_config(kafka_settings), **_PRODUCER_DEFAULTS}
    config.update(producer_config or {})
    counts = _Counts(topic)
    t0 = time.perf_counter()
    with _open_source(source) as stream:
        try:
            producer = KafkaProducer(**config)
        except KafkaError as err:  # no broker answered within bootstrap_timeout_ms
            raise ProduceError(
                f"cannot reach Kafka at {kafka_settings.bootstrap_servers}: {err}",
                counts.summary(t0),
            ) from err
        try:
            try:
                # Metadata first: an unreachable cluster or a missing topic fails
                # here, once, with a clear message instead of at the first send.
                producer.partitions_for(topic)
            except KafkaTimeoutError as err:
                raise ProduceError(
                    f"no metadata for topic {topic!r} from {kafka_settings.bootstrap_servers} "
                    f"within {config['max_block_ms'] / 1000:g} s: {err}",
                    counts.summary(t0),
                ) from err
            pending: list[tuple[int, Any, int, bool]] = []
            pending_bytes = 0
            try:
                for line_no, value in _lines(stream, counts):
                    key, is_object = _key_of(value, key_field, shards or {})
                    counts.not_json += not is_object
                    try:
                        future = producer.send(topic, key=key, value=value)
                    except MessageSizeTooLargeError as err:
                        counts.fail(line_no, err)
                        continue
                    pending.append((line_no, future, len(value), key is not None))
                    pending_bytes += len(value)
                    if len(pending) >= batch or pending_bytes >= _MAX_PENDING_BYTES:
                        _settle(producer, pending, counts, t0, progress)
                        pending, pending_bytes = [], 0
            except KeyboardInterrupt:
                # Ctrl-C: what was sent is waited for (briefly) and counted, so the
                # summary says what is on the topic and where to resume.
                try:
                    producer.flush(timeout=_INTERRUPT_FLUSH_SECONDS)
                except KafkaError:
                    pass
                _count(pending, counts)
                raise ProduceInterrupted(counts.summary(t0)) from None
            _settle(producer, pending, counts, t0, progress)
        except KafkaError as err:
            raise ProduceError(f"producing to {topic!r} failed: {err}", counts.summary(t0)) from err
        finally:
            # Nothing is left pending on the normal path; on an error, do not wait
            # out the delivery timeout of records that will not be counted anyway.
            producer.close(timeout=5)
    return counts.summary(t0)


def _count(pending: list[tuple[int, Any, int, bool]], counts: _Counts) -> list[BaseException]:
    """Count the acknowledged records of ``pending`` and the failed ones; returns the failures."""
    failures = []
    for line_no, future, size, keyed in pending:
        if future.succeeded():
            counts.produced += 1
            counts.bytes += size
            counts.keyed += keyed
            counts.last_acknowledged = max(counts.last_acknowledged, line_no)
            continue
        err = future.exception if future.failed() else RuntimeError("not acknowledged")
        counts.fail(line_no, err)
        failures.append(err)
    return failures


class _Counts:
    """Running totals; :meth:`summary` takes a frozen snapshot."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.lines = self.blank = self.produced = self.keyed = 0
        self.not_json = self.failed = self.bytes = self.last_acknowledged = 0
        self.errors: list[str] = []

    def fail(self, line_no: int, err: BaseException) -> None:
        self.failed += 1
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(f"line {line_no}: {type(err).__name__}: {err}")

    def summary(self, t0: float) -> ProduceSummary:
        return ProduceSummary(
            topic=self.topic, lines=self.lines, blank=self.blank, produced=self.produced,
            keyed=self.keyed, not_json=self.not_json, failed=self.failed, bytes=self.bytes,
            seconds=time.perf_counter() - t0, errors=tuple(self.errors), last_acknowledged=self.last_acknowledged,
        )  # fmt: skip


def _settle(
    producer: Any,
    pending: list[tuple[int, Any, int, bool]],
    counts: _Counts,
    t0: float,
    progress: Callable[[ProduceSummary], None] | None,
) -> None:
    """Flush, count what was acknowledged, stop on a failure that is not the record's own."""
    from kafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

    if not pending:
        return
    producer.flush()
    fatal: BaseException | None = None
    for err in _count(pending, counts):
        if not isinstance(err, (MessageSizeTooLargeError, RecordListTooLargeError)):
            fatal = fatal or err
    if fatal is not None:
        raise ProduceError(
            f"the cluster did not take the records: {fatal}", counts.summary(t0)
        ) from fatal
    if progress is not None:
        progress(counts.summary(t0))


def _lines(stream: BinaryIO, counts: _Counts) -> Iterator[tuple[int, bytes]]:
    for line_no, raw in enumerate(stream, start=1):
        counts.lines = line_no
        value = raw.rstrip(b"\r\n")
        if not value.strip():
            counts.blank += 1  # JSONL separators carry no event; replay skips them too
            continue
        yield line_no, value


def _key_of(value: bytes, key_field: str, shards: Mapping[str, int]) -> tuple[bytes | None, bool]:
    """(key, is a JSON object) of one line; ``source#k`` for shard k of a sharded source."""
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None, False
    if not isinstance(event, dict):
        return None, False
    key = event.get(key_field)
    if not isinstance(key, str):
        key = event.get("kind")  # a source defaults to the event's kind
    n = shards.get(key, 1) if isinstance(key, str) else 1
    if n > 1 and isinstance(event.get("id"), str):
        key = f"{key}#{shard_of(event['id'], n)}"
    return (key.encode("utf-8") if isinstance(key, str) else None), True


class _open_source:
    """Context manager over a path, ``"-"`` (stdin) or an open binary stream (left open)."""

    def __init__(self, source: str | os.PathLike[str] | BinaryIO) -> None:
        self._source = source
        self._owned: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
        src = self._source
        if isinstance(src, (str, os.PathLike)):
            if os.fspath(src) == "-":
                return sys.stdin.buffer
            self._owned = open(Path(src), "rb")  # noqa: SIM115 - closed in __exit__
            return self._owned
        return src

    def __exit__(self, *exc: object) -> None:
        if self._owned is not None:
            self._owned.close()


class ProgressLine:
    """A ``progress`` callback: one line on ``stream``, rewritten at most every ``every`` seconds.

    Call :meth:`close` after the run to end the line (only if one was written).
    """

    def __init__(self, stream: IO[str], *, every: float = 2.0) -> None:
        self.stream = stream
        self.every = every
        self._last = time.monotonic()
        self._written = False

    def __call__(self, s: ProduceSummary) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        self._written = True
        self.stream.write(
            f"\r{s.lines:,} lines  {s.produced:,} produced  {s.not_json:,} not JSON  "
            f"{s.failed:,} failed  {s.messages_per_second:,.0f} msg/s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self._written:
            self.stream.write("\n")
            self.stream.flush()
            self._written = False

"""Fixtures of the integration tier: one real Tansu broker on loopback for the whole session.

Tests share the broker and keep apart by topic name (:func:`unique_topic`). A
test that needs a broker of its own (stop, two ports) starts an
``EmbeddedBroker`` itself.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from streams.broker import EmbeddedBroker
from streams.config import KafkaSettings


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A Tansu broker on a free loopback port, in-memory, stopped at the end of the session."""
    with EmbeddedBroker() as b:
        yield b
    assert b.pid is None


@pytest.fixture
def kafka_settings(broker: EmbeddedBroker) -> KafkaSettings:
    """Settings pointing at the session broker."""
    return KafkaSettings(bootstrap_servers=broker.bootstrap_servers)


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """A factory of topic names unique to this test: ``unique_topic("events")``.

    Names carry the test's name (readable in broker listings) and a random
    suffix (a rerun, or the same test under xdist, never meets old records).
    """
    test = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:80].strip("-")

    def make(label: str = "t") -> str:
        return f"{test}.{label}.{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def consume_all() -> Callable[..., list]:
    """``consume_all(bootstrap, topic, count, timeout=20.0)``: read ``count`` records with aiokafka.

    No consumer group: the partitions are assigned by hand and read from the
    beginning, so nothing waits for a group join (about 5 s on Tansu). It reads
    until ``count`` records arrived rather than up to the end offsets, because
    Tansu's ListOffsets answer for "latest" is the base offset of the last
    batch plus one, not the high watermark. Returns aiokafka ``ConsumerRecord``s
    in (partition, offset) order; fails the test when fewer arrive in time.
    """

    def consume(bootstrap: str, topic: str, count: int, timeout: float = 20.0) -> list:
        return asyncio.run(_consume(bootstrap, topic, count, timeout))

    return consume


async def _consume(bootstrap: str, topic: str, count: int, timeout: float) -> list:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        await consumer.topics()  # refreshes the metadata: the topic may be newer than start()
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        assert tps, f"topic {topic} has no partitions"
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list = []
        deadline = time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
        # A short extra read: more records than expected is a failure too.
        batch = await consumer.getmany(timeout_ms=200)
        for recs in batch.values():
            records.extend(recs)
    finally:
        await consumer.stop()
    assert len(records) >= count, f"{len(records)} of {count} records arrived in {timeout} s"
    return sorted(records, key=lambda r: (r.partition, r.offset))


def read_topic(bootstrap: str, topic: str) -> list:
    """Every record of partition 0 of ``topic`` so far (kafka-python, no consumer group)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    out = drain(consumer)
    consumer.close()
    return out


def drain(consumer, quiet_polls: int = 3) -> list:
    """Poll a kafka-python consumer until ``quiet_polls`` polls in a row bring nothing.

    (Tansu's end offsets cannot say where a partition ends; one empty poll is
    not enough either: on a busy machine a fetch of a large topic can miss a
    poll's timeout while more records are on their way.)
    """
    out: list = []
    quiet = 0
    while quiet < quiet_polls:
        batch = consumer.poll(timeout_ms=1000, max_records=5000)
        quiet = 0 if batch else quiet + 1
        for records in batch.values():
            out.extend(records)
    return out


def worker_topics(bootstrap: str, prefix: str) -> dict[str, str]:
    """Fresh input and output topics for one worker test, created with one partition each."""
    from streams.broker import ensure_topics

    suffix = uuid.uuid4().hex[:8]
    names = {n: f"{prefix}{suffix}.{n}" for n in ("events", "scores", "anomalies", "drift", "alerts", "dlq")}
    names["alerts_dlq"] = f"{names['alerts']}.dlq"  # as KafkaSettings.alerts_dlq_topic derives it
    ensure_topics(bootstrap, list(names.values()))
    return names


def source_key(line: bytes) -> bytes | None:
    """The Kafka key of an input line: its source (None for a line that is not an event)."""
    import orjson

    try:
        return orjson.loads(line).get("source", "").encode() or None
    except Exception:
        return None


def produce_paced(
    bootstrap: str, topic: str, lines, rate: float = float("inf"), *,
    stop: threading.Event | None = None, done: threading.Event | None = None, counter: list[int] | None = None,
    linger_ms: int = 5,
) -> None:
    """Publish ``lines`` keyed by source at ``rate`` per second (in order: one request in flight),
    until ``stop`` is set; sets ``done`` at the end and counts in ``counter[0]``."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms, acks="all",
                             max_in_flight_requests_per_connection=1, max_request_size=4 << 20)
    t0 = time.monotonic()
    try:
        for i, line in enumerate(lines):
            if stop is not None and stop.is_set():
                break
            wait = t0 + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            producer.send(topic, key=source_key(line), value=line)
            if counter is not None:
                counter[0] += 1
        producer.flush()
    finally:
        producer.close()
        if done is not None:
            done.set()


def wait_until_scored(bootstrap: str, topic: str, ids: set[str], worker, log_path, timeout: float) -> set[str]:
    """Read the scores ``topic`` until every id of ``ids`` is there or ``timeout`` seconds passed
    (the worker must keep running meanwhile); returns the ids scored."""
    import orjson

    deadline = time.monotonic() + timeout
    scored: set[str] = set()
    while time.monotonic() < deadline and not scored >= ids:
        assert worker.poll() is None, log_path.read_text()[-3000:]
        time.sleep(2)
        scored = {orjson.loads(r.value)["id"] for r in read_topic(bootstrap, topic)}
    return scored


def worker_scored(port: int) -> float:
    """``nwatch_events_total`` of one worker process (0 until it serves /metrics)."""
    return metric_sum(port, "nwatch_events_total")


def metric_sum(port: int, name: str, label: str = "") -> float:
    """The sum of a labelled metric's samples on one worker's /metrics whose labels hold
    ``label`` (e.g. ``'outcome="merged"'``); 0 until the worker serves /metrics."""
    import urllib.request

    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0.0
    return sum(float(x.rsplit(" ", 1)[1]) for x in body.splitlines() if x.startswith(name + "{") and label in x)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(bootstrap: str, topics: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of ``nwatch run`` on these topics (``extra``: more NWATCH_* variables)."""
    import os
    import tempfile

    env = dict(os.environ)
    env.update({
        "NWATCH_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "NWATCH_KAFKA__INPUT_TOPICS": f'["{topics["events"]}"]',
        "NWATCH_KAFKA__SCORES_TOPIC": topics["scores"],
        "NWATCH_KAFKA__ANOMALIES_TOPIC": topics["anomalies"],
        "NWATCH_KAFKA__DRIFT_TOPIC": topics["drift"],
        "NWATCH_KAFKA__ALERTS_TOPIC": topics["alerts"],
        "NWATCH_KAFKA__DLQ_TOPIC": topics["dlq"],
        "NWATCH_KAFKA__GROUP_ID": f"g-{topics['events']}",
        # one state directory per worker environment (tests share no snapshots)
        "NWATCH_STATE__DIR": tempfile.mkdtemp(prefix=f"nwatch-state-{topics['events']}-"),
    })
    env.update(extra)
    return env


def end_run(worker, log, stop: threading.Event, producing: threading.Thread) -> None:
    """After a test's worker (``start_worker``) ran beside a paced producer (``produce_paced``):
    stop producing, stop the worker's process group if it still runs, close its log."""
    from streams.runtime import stop_process_group

    stop.set()
    if worker.poll() is None:
        stop_process_group(worker, timeout=30)
    log.close()
    producing.join(30)


def start_worker(env: dict[str, str], log_path, *args: str) -> tuple:
    """``nwatch run [args]`` as a child process in its own group; returns (process, open log file)."""
    import subprocess
    import sys

    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "run", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


"""The "process" output path's child (streams.producer_process) against the real broker.

What it must keep from the in-process paths: a keyed record lands on the
partition the producer's own partitioner picks for its key (a source's records
keep one partition and their order), headers and tombstones pass unchanged, a
batch is acknowledged only once the broker holds all of it; and a child that
dies fails the batches it held (never reported as produced) and says so once.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from streams.broker import ensure_topics
from streams.config import KafkaSettings
from streams.producer_process import ProducerDied, ProducerProcess

pytestmark = pytest.mark.timeout(120)


async def _partitions_by_key(bootstrap: str, topic: str, keys: list[bytes]) -> dict[bytes, int]:
    """What a plain aiokafka producer's partitioner picks for each key (as faust's producer does)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.partitions_for(topic)
        return {k: producer._partition(topic, None, None, None, k, b"") for k in keys}
    finally:
        await producer.stop()


def test_batches_are_acknowledged_in_order_with_partitions_headers_and_tombstones_kept(
    broker, unique_topic, consume_all
):
    topic = unique_topic("out")
    ensure_topics(broker.bootstrap_servers, {topic: 4})
    keys = [f"source-{i}".encode() for i in range(12)]
    batches = [
        [(topic, k, f"{b}:{i}:{k.decode()}".encode(), [("h", str(i).encode())] if i % 2 else None)
         for i in range(40) for k in keys]
        for b in range(5)
    ]
    batches[-1].append((topic, keys[0], None, None))  # a tombstone

    async def run() -> list[int]:
        acked: list[int] = []
        producer = ProducerProcess(KafkaSettings(bootstrap_servers=broker.bootstrap_servers),
                                   max_batch_bytes=16 * 1024)  # several record batches per partition
        producer.start()
        try:
            futures = [producer.submit(b) for b in batches]
            for n, fut in enumerate(futures):
                fut.add_done_callback(lambda _, n=n: acked.append(n))
            await asyncio.wait_for(asyncio.gather(*futures), 60)
        finally:
            producer.stop()
        assert producer.proc is not None and producer.proc.returncode == 0
        return acked

    acked = asyncio.run(run())
    assert acked == list(range(len(batches)))
    total = sum(len(b) for b in batches)
    records = consume_all(broker.bootstrap_servers, topic, total)
    assert len(records) == total
    expected = asyncio.run(_partitions_by_key(broker.bootstrap_servers, topic, keys))
    assert len(set(expected.values())) > 1  # the keys do spread: the check below can fail
    for r in records:
        assert r.partition == expected[r.key]
    # per key, the records in the order they were handed over, headers and the tombstone included
    for k in keys:
        got = [(r.value, list(r.headers)) for r in records if r.key == k]
        want = [(v, h or []) for b in batches for (_, kk, v, h) in b if kk == k]
        assert got == want


def test_a_dead_child_fails_the_batches_it_held_and_is_reported_once(broker, unique_topic):
    topic = unique_topic("out")
    ensure_topics(broker.bootstrap_servers, {topic: 1})
    deaths: list[ProducerDied] = []

    async def run() -> None:
        producer = ProducerProcess(KafkaSettings(bootstrap_servers=broker.bootstrap_servers),
                                   max_batch_bytes=512 * 1024, on_death=deaths.append)
        producer.start()
        try:
            await asyncio.wait_for(producer.submit([(topic, b"k", b"first", None)]), 30)
            assert producer.proc is not None
            producer.proc.send_signal(signal.SIGSTOP)  # holds the next batch unacknowledged
            held = producer.submit([(topic, b"k", b"second", None)])
            await asyncio.sleep(0.5)
            assert not held.done()
            os.kill(producer.proc.pid, signal.SIGKILL)
            with pytest.raises(ProducerDied, match="not acknowledged"):
                await asyncio.wait_for(held, 30)
            with pytest.raises(ProducerDied):
                producer.submit([(topic, b"k", b"third", None)])
        finally:
            producer.stop()

    asyncio.run(run())
    assert len(deaths) == 1

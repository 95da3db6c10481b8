"""The worker's partition take-overs without Kafka: where a partition starts when two batches of it are in flight."""

from __future__ import annotations

import asyncio

from models.text import HashingTextBackend
from streams.app import Worker
from streams.config import Settings
from streams.pipeline import Pipeline

TP0, TP1 = ("events", 0), ("events", 1)


def test_a_later_batch_joins_the_take_over_an_earlier_batch_began(tmp_path):
    """Batch 1 holds partitions 0 and 1 from offset 0; batch 2 the rest of partition 1 from 357.

    Batch 2 begins while batch 1 waits on partition 0's take-over. Both of
    batch 1's take-overs are begun before it waits, so partition 1 starts at
    0, not at batch 2's 357 (which would skip events 0-356 as a snapshot's).
    """
    settings = Settings(state={"dir": str(tmp_path)})
    backend = HashingTextBackend(dim=16)
    worker = Worker(settings=settings, pipeline=Pipeline(settings=settings, text_backend=lambda: backend))

    async def two_batches() -> tuple[list, list]:
        first = worker._begin_take_overs({TP0: 0, TP1: 0})
        await asyncio.shield(first[0][1])  # batch 1 waits on partition 0 ...
        second = worker._begin_take_overs({TP1: 357})  # ... while batch 2 arrives
        await asyncio.gather(*(task for _, task in first + second))
        return first, second

    try:
        first, second = asyncio.run(two_batches())
    finally:
        worker.close()
    assert second[0][1] is first[1][1]  # one take-over of partition 1
    assert worker.durable.skip_below == {TP0: 0, TP1: 0}
    assert worker.durable.positions == {TP0: 0, TP1: 0}

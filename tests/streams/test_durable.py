"""DurableState without Kafka: positions, homes, what to replay or skip, which snapshots to write."""

from __future__ import annotations

import zlib

import orjson

from models.text import HashingTextBackend
from streams.config import Settings
from streams.durable import DurableState
from streams.pipeline import Pipeline
from streams.snapshots import SnapshotStore

TP0, TP1 = ("events", 0), ("events", 1)


def _raw(i: int, source: str) -> bytes:
    return orjson.dumps({"id": f"{source}-{i}", "source": source, "kind": "vector", "vector": [i % 5 + 1.0, 2.0, 3.0]})


def _durable(tmp_path, clock=lambda: 0.0) -> DurableState:
    backend = HashingTextBackend(dim=16)
    pipe = Pipeline(settings=Settings(), text_backend=lambda: backend)
    return DurableState(pipe, SnapshotStore(tmp_path / "snap"), interval=10.0, clock=clock)


def _batch(d: DurableState, tp, offsets, source):
    raws = [_raw(o, source) for o in offsets]
    d.begin()
    result = d.pipeline.process_raw(raws)
    d.done([tp] * len(raws), list(offsets), result, raws)


def test_fresh_partition_then_snapshot_only_when_something_new(tmp_path):
    d = _durable(tmp_path)
    assert d.take_over(TP0, 100, None) is None and d.skip_below[TP0] == 100
    fresh = d.store.load(*TP0)  # where it started afresh, saved at once: a successor replays from there
    assert fresh.offset == 100 and fresh.sources == [] and fresh.anchor is None
    _batch(d, TP0, range(100, 140), "a")
    assert d.positions[TP0] == 140 and d.sources_of[TP0] == {"a"}
    assert d.pipeline.sources["a"].home == TP0
    assert d.anchors[TP0] == (139, zlib.crc32(_raw(139, "a")))
    assert d.snapshot() == 1
    assert d.snapshot() == 0  # nothing new since
    snap = d.store.load(*TP0)
    assert snap.offset == 140 and snap.anchor == d.anchors[TP0] and [s["name"] for s in snap.sources] == ["a"]
    d.begin()
    assert d.snapshot() == 0  # a batch in flight: its outputs are not acknowledged yet


def test_take_over_replays_behind_and_skips_ahead_of_the_committed_offset(tmp_path):
    first = _durable(tmp_path)
    first.take_over(TP0, 0, None)
    _batch(first, TP0, range(0, 50), "a")
    first.snapshot()
    snap = first.store.load(*TP0)

    behind = _durable(tmp_path)
    assert behind.take_over(TP0, 80, snap) == (50, 80)  # replay [snapshot, committed)
    assert behind.positions[TP0] == 80 and behind.skip_below[TP0] == 80
    a = behind.pipeline.sources["a"]
    assert a.monitor.events_seen + len(a.pending) == 50  # learnt blocks plus the block in progress
    ahead = _durable(tmp_path)
    assert ahead.take_over(TP0, 30, snap) is None  # committed behind the snapshot
    assert ahead.skip_below[TP0] == 50 and ahead.positions[TP0] == 50


def test_release_saves_and_forgets_the_partition(tmp_path):
    d = _durable(tmp_path)
    d.take_over(TP0, 0, None)
    d.take_over(TP1, 0, None)
    _batch(d, TP0, range(0, 10), "a")
    _batch(d, TP1, range(0, 10), "b")
    d.release([TP1])
    assert "b" not in d.pipeline.sources and "a" in d.pipeline.sources
    assert not d.is_ready(TP1) and d.is_ready(TP0)
    assert d.store.load(*TP1).offset == 10 and d.store.load(*TP0).offset == 0  # TP0: its fresh start's


def test_snapshot_is_due_after_the_interval(tmp_path):
    now = [0.0]
    d = _durable(tmp_path, clock=lambda: now[0])
    assert not d.due()
    now[0] = 10.5
    assert d.due()
    d.snapshot()
    assert not d.due()

"""Sharded drift: shard block summaries, their exact merge, and the merged drift test."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.drift import CentroidDriftMonitor
from detectors.shards import (
    BlockSummary,
    MergedDriftMonitor,
    ShardNull,
    ShardSummarizer,
    power_sums,
    shard_of,
    summary_from_dict,
)

B, R = 50, 1000


def _stream(n: int, dim: int, drift_at: int | None, shift: float = 0.5, seed: int = 3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    if drift_at is not None:
        X[drift_at:, :2] += shift
    ids = [f"e{i}" for i in range(n)]
    return X, ids


def _shard_outputs(X, ids, shards: int, *, seed: int = 0):
    """Each shard as the pipeline runs it: its own drift monitor (for the null) and its summarizer.

    Returns per shard the list of summaries in publication order, fed in uneven batches.
    """
    rng = np.random.default_rng(seed)
    rows = [[i for i in range(len(ids)) if shard_of(ids[i], shards) == k] for k in range(shards)]
    out = []
    for k, idx in enumerate(rows):
        mon = CentroidDriftMonitor(reference_size=R, block_size=B)
        summ = ShardSummarizer(source="s", shard=k, shards=shards, block_size=B)
        msgs: list = []
        pos = 0
        while pos < len(idx):
            step = int(rng.integers(1, 97))
            part = idx[pos : pos + step]
            pos += step
            mon.update(X[part], [ids[i] for i in part])
            null = summ.null(mon.null_sample, mon.references_established)
            if null is not None:
                msgs.append(null)
            msgs.extend(summ.update(X[part], [ids[i] for i in part], [float(i) for i in part]))
        out.append((idx, msgs))
    return out


def _merge(outputs, shards: int, seed: int = 1, **kw):
    """Interleave the shards' messages at random (each shard's in order), through one merged monitor."""
    rng = np.random.default_rng(seed)
    queues = [list(msgs) for _, msgs in outputs]
    merged = MergedDriftMonitor(source="s", shards=shards, block_size=B, reference_size=R, **kw)
    alarms = []
    while any(queues):
        k = int(rng.choice([j for j, q in enumerate(queues) if q]))
        msg = queues[k].pop(0)
        alarms += merged.add_null(msg) if isinstance(msg, ShardNull) else merged.add(msg)
    return merged, alarms


@pytest.mark.parametrize("shards", [2, 3])
def test_merged_windows_are_the_power_sums_of_their_events(shards):
    X, ids = _stream(3000, 6, None)
    outputs = _shard_outputs(X, ids, shards)
    blocks = [[m for m in msgs if isinstance(m, BlockSummary)] for _, msgs in outputs]
    n_windows = min(len(b) for b in blocks)
    assert n_windows >= 15
    for seq in range(n_windows):
        merged = sum(b[seq].sums for b in blocks)
        events = [idx[i] for idx, _ in outputs for i in range(seq * B, (seq + 1) * B)]
        direct = power_sums(X[events])
        np.testing.assert_allclose(merged, direct, rtol=1e-12, atol=1e-9)
        assert sum(b[seq].count for b in blocks) == shards * B


def test_summaries_round_trip_through_json_exactly():
    X, ids = _stream(600, 5, None)
    outputs = _shard_outputs(X, ids, 2)
    for _, msgs in outputs:
        for m in msgs:
            back = summary_from_dict(m.to_dict())
            assert type(back) is type(m) and back.key == m.key
            a = back.sums if isinstance(m, BlockSummary) else back.null_t
            b = m.sums if isinstance(m, BlockSummary) else m.null_t
            assert np.array_equal(a, b)


@pytest.mark.parametrize("shards", [2, 4])
def test_sharded_drift_alarm_is_within_one_window_of_the_unsharded_one(shards):
    X, ids = _stream(12_000, 8, drift_at=7000, shift=0.4)
    single = CentroidDriftMonitor(reference_size=R, block_size=B)
    [unsharded] = single.update(X, ids)
    merged, alarms = _merge(_shard_outputs(X, ids, shards), shards)
    assert len(alarms) == 1
    [alarm] = alarms
    gap = abs(alarm.events_seen - unsharded.events_seen)
    print(f"\nshards={shards}: unsharded alarm at {unsharded.events_seen} (window {unsharded.window_size}), "
          f"merged at {alarm.events_seen} (window {alarm.window_size}, merged window {merged.window_events})")
    assert alarm.events_seen > 7000
    assert gap <= max(unsharded.window_size, merged.window_events)
    assert alarm.reference_size == shards * R
    assert set(alarm.explanation["top_dimensions"][:2]) == {0, 1}  # the dimensions that moved


def test_no_alarm_on_a_stationary_twin():
    X, ids = _stream(12_000, 8, drift_at=None)
    merged, alarms = _merge(_shard_outputs(X, ids, 3), 3)
    assert alarms == []
    assert merged.is_ready and merged.windows_merged >= 70


def test_duplicates_are_ignored_and_state_round_trips():
    X, ids = _stream(10_000, 6, drift_at=6000, shift=0.4)
    outputs = _shard_outputs(X, ids, 2)
    _, expected = _merge(outputs, 2)
    assert expected
    # Same messages, each twice, with a save / restore half-way.
    queues = [[m for m in msgs for _ in range(2)] for _, msgs in outputs]
    merged = MergedDriftMonitor(source="s", shards=2, block_size=B, reference_size=R)
    alarms, step = [], 0
    while any(queues):
        for q in queues:
            if q:
                msg = q.pop(0)
                alarms += merged.add_null(msg) if isinstance(msg, ShardNull) else merged.add(msg)
        step += 1
        if step == 150:
            state = merged.get_state()
            merged = MergedDriftMonitor(source="s", shards=2, block_size=B, reference_size=R)
            merged.set_state(state)
    assert [(a.detected_at, a.events_seen, a.statistic) for a in alarms] == [
        (a.detected_at, a.events_seen, a.statistic) for a in expected
    ]


def test_a_summary_of_another_shard_count_is_refused():
    from models.errors import StateMismatch

    merged = MergedDriftMonitor(source="s", shards=2, block_size=B, reference_size=R)
    with pytest.raises(StateMismatch):
        merged.add(BlockSummary("s", 0, 3, 0, B, np.zeros((4, 2)), "x", 0.0))


def test_shard_of_is_stable_and_spreads():
    assert shard_of("tx-1", 4) == shard_of("tx-1", 4)
    counts = np.bincount([shard_of(f"id-{i}", 4) for i in range(8000)], minlength=4)
    assert counts.min() > 1800
    assert shard_of("anything", 1) == 0

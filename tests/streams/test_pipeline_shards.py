"""Sharded sources in the pipeline: states per shard, summaries out, the merge, saved state."""

from __future__ import annotations

import time

import numpy as np
import orjson

from detectors.shards import BlockSummary, ShardNull, shard_of
from streams.config import Settings, SourceSettings
from streams.pipeline import Pipeline
from streams.produce import _key_of

N = 6000


def _lines(drift_at: int | None = 3500, n: int = N) -> list[bytes]:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(n, 8))
    if drift_at is not None:
        X[drift_at:, :2] += 0.6
    t0 = time.time() - n
    return [orjson.dumps({"id": f"v-{i}", "source": "hot", "kind": "vector", "ts": t0 + i,
                          "vector": X[i].round(5).tolist()}) for i in range(n)]


def _settings(shards: int) -> Settings:
    conf = SourceSettings(shards=shards, drift_reference_size=500, drift_block=25)
    return Settings(sources={"hot": conf}, state={"dir": None})


def _run(pipeline: Pipeline, lines: list[bytes], size: int = 200):
    results = [pipeline.process_raw(lines[i : i + size]) for i in range(0, len(lines), size)]
    return results + [pipeline.flush()]


def test_shards_are_states_of_their_own_and_records_keep_the_source_name():
    pipeline = Pipeline(settings=_settings(3))
    results = _run(pipeline, _lines())
    assert sorted(pipeline.sources) == ["hot#0", "hot#1", "hot#2"]
    records = [rec for r in results for _, rec in r.scores]
    assert len(records) == N and {rec.source for rec in records} == {"hot"}
    per_shard = {k: pipeline.sources[f"hot#{k}"].monitor.events_seen for k in range(3)}
    assert per_shard == {k: sum(shard_of(f"v-{i}", 3) == k for i in range(N)) for k in range(3)}
    drifts = [d for r in results for d in r.drifts]
    assert len(drifts) == 1 and drifts[0].source == "hot" and drifts[0].events_seen > 3500
    assert drifts[0].ts == {rec.id: rec.ts for rec in records}[drifts[0].detected_at]  # its event's time


def test_the_worker_pipeline_publishes_summaries_and_their_merge_is_replays():
    lines = _lines()
    replay = [d.to_dict() for r in _run(Pipeline(settings=_settings(2)), lines) for d in r.drifts]
    worker = Pipeline(settings=_settings(2), merge_shards=False)
    results = _run(worker, lines)
    assert not any(r.drifts for r in results)  # a shard's own alarms are not the source's
    summaries = [s for r in results for s in r.summaries]
    blocks = [m for m, _, _ in summaries if isinstance(m, BlockSummary)]
    assert {m.shard for m, _, _ in summaries if isinstance(m, ShardNull)} == {0, 1}
    assert sum(b.count for b in blocks) + sum(s.summarizer.pending for s in worker.sources.values()) == N
    merger = Pipeline(settings=_settings(2))  # another worker: it holds no shard
    merged = [d.to_dict() for m, kind, enc in summaries for d in merger.merge(m, kind, enc)]
    assert merged == replay and len(merged) == 1


def test_a_shard_restored_from_its_state_carries_on_exactly():
    lines = _lines()
    whole = _run(Pipeline(settings=_settings(2), merge_shards=False), lines)
    first = Pipeline(settings=_settings(2), merge_shards=False)
    before = [first.process_raw(lines[i : i + 200]) for i in range(0, 3000, 200)]
    states = first.source_states(sorted(first.sources))
    assert all("shard" in st for st in states)
    second = Pipeline(settings=_settings(2), merge_shards=False)
    assert second.restore_sources(orjson.loads(orjson.dumps(states, option=orjson.OPT_SERIALIZE_NUMPY))) == []
    after = [second.process_raw(lines[i : i + 200]) for i in range(3000, N, 200)] + [second.flush()]

    def keys(results):
        return [(m.key, m.to_dict()) for r in results for m, _, _ in r.summaries]

    assert keys(before) + keys(after) == keys(whole)


def test_an_unsharded_source_saves_what_it_always_saved():
    pipeline = Pipeline(settings=Settings(state={"dir": None}))
    _run(pipeline, _lines(None, 300))
    [state] = pipeline.source_states(["hot"])
    assert "shard" not in state and "shards" not in state["settings"]
    assert pipeline.sources["hot"].summarizer is None


def test_produce_keys_a_sharded_source_by_its_shard():
    line = b'{"id": "v-7", "source": "hot", "kind": "vector", "vector": [1.0]}'
    assert _key_of(line, "source", {"hot": 4}) == (f"hot#{shard_of('v-7', 4)}".encode(), True)
    assert _key_of(line, "source", {}) == (b"hot", True)
    assert _key_of(line, "source", {"other": 4}) == (b"hot", True)


def _compact(log: list[tuple[str, dict | None]]) -> list[tuple[str, dict | None]]:
    """Kafka log compaction: the newest record of each key, in log order; tombstones drop their key."""
    last = {key: i for i, (key, _) in enumerate(log)}
    return [(key, value) for i, (key, value) in enumerate(log) if last[key] == i and value is not None]


def test_merge_checkpoints_and_tombstones_bound_the_topic_and_a_take_over_from_the_compacted_log_carries_on():
    from detectors.shards import summary_from_dict

    lines = _lines(drift_at=4500)
    worker = Pipeline(settings=_settings(2), merge_shards=False)
    summaries = [s for r in _run(worker, lines) for s in r.summaries]
    # The merging worker: reads the summaries in order, writes its checkpoints and tombstones to the topic.
    merger = Pipeline(settings=_settings(2))
    log: list[tuple[str, dict | None]] = []
    drifts_at: list[tuple[int, dict]] = []  # (log position, drift record)
    for msg, kind, enc in summaries:
        log.append((msg.key, msg.to_dict() | {"kind": kind, "encoder": enc}))
        drifts_at += [(len(log), d.to_dict()) for d in merger.merge(msg, kind, enc)]
        for cp, keys, kind_, enc_ in merger.merge_checkpoints(every=10):
            log.append((cp.key, orjson.loads(orjson.dumps(cp.to_dict() | {"kind": kind_, "encoder": enc_}))))
            # the merger reads its own checkpoint back: nothing changes
            before = merger.mergers["hot"][0].get_state()
            assert merger.merge(summary_from_dict(log[-1][1]), kind_, enc_) == []
            assert orjson.dumps(merger.mergers["hot"][0].get_state(), option=orjson.OPT_SERIALIZE_NUMPY) == \
                orjson.dumps(before, option=orjson.OPT_SERIALIZE_NUMPY)
            log += [(key, None) for key in keys]
    checkpoints = [i for i, (key, _) in enumerate(log) if key.endswith("#checkpoint")]
    assert len(checkpoints) >= 5 and len(drifts_at) == 1
    blocks = [key for key, v in log if v is not None and v["type"] == "block"]
    compacted = _compact(log)
    kept = [key for key, v in compacted if v["type"] == "block"]
    print(f"\n{len(blocks)} blocks written, {len(kept)} left after compaction, {len(checkpoints)} checkpoints")
    # Bounded: only the blocks of the windows since the newest checkpoint remain (and one waiting for its twin).
    assert len(kept) <= 2 * 10 + 1 < len(blocks) // 4
    assert sum(key.endswith("#checkpoint") for key, _ in compacted) == 1
    # A worker that takes the partition over reads the compacted topic from its start.
    taker = Pipeline(settings=_settings(2))
    for _, value in compacted:
        taker.merge(summary_from_dict(value), value["kind"], value["encoder"])
    a, b = merger.mergers["hot"][0], taker.mergers["hot"][0]
    assert (a.next_window, a.windows_merged, a.events_seen, a.statistic) == \
        (b.next_window, b.windows_merged, b.events_seen, b.statistic)
    # ... and from a checkpoint before the drift it raises the drift the merger raised, identically.
    pos, record = drifts_at[0]
    cut = max(i for i in checkpoints if i < pos)
    partial = Pipeline(settings=_settings(2))
    again = []
    for key, value in _compact(log[: cut + 1]) + [kv for kv in log[cut + 1 :] if kv[1] is not None]:
        again += [d.to_dict() for d in partial.merge(summary_from_dict(value), value["kind"], value["encoder"])]
    assert again == [record]

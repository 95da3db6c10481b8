"""Durable state: results independent of batching, snapshots that restore exactly, refusals."""

from __future__ import annotations

import os
import stat

import numpy as np
import orjson
import pytest

from models.text import HashingTextBackend
from streams.config import Settings, SourceSettings
from streams.pipeline import Pipeline
from streams.samples import sample_lines
from streams.snapshots import SnapshotError, SnapshotStore, pack, unpack
from tests.conftest import assert_same_results

NOW = 1.9e9  # later than every sample event


def _pipeline(settings: Settings | None = None) -> Pipeline:
    backend = HashingTextBackend(dim=64)
    return Pipeline(settings=settings or Settings(), text_backend=lambda: backend, clock=lambda: NOW)


@pytest.fixture(scope="module")
def lines() -> list[bytes]:
    return list(sample_lines(events=3000, seed=11, broken=12))


def _records(result) -> tuple[list[dict], list[dict], list[tuple[str, str]]]:
    scores = [rec.to_dict() for _, rec in result.scores]
    drifts = [d.to_dict() for d in result.drifts]
    return scores, drifts, [(r.reason, r.message) for r in result.rejects]


def _run(pipe: Pipeline, lines: list[bytes], sizes) -> tuple[list[dict], list[dict], list]:
    scores, drifts, rejects = [], [], []
    i = 0
    for n in sizes:
        if i >= len(lines):
            break
        s, d, r = _records(pipe.process_raw(lines[i : i + n]))
        scores += s
        drifts += d
        rejects += r
        i += n
    assert i >= len(lines)
    return scores, drifts, rejects


def _random_sizes(seed: int, hi: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, hi, size=100_000).tolist()


def test_results_depend_on_the_event_sequence_not_on_batching(lines):
    reference = _run(_pipeline(), lines, [256] * 100)
    for seed, hi in ((1, 5), (2, 97), (3, 700)):
        assert_same_results(_run(_pipeline(), lines, _random_sizes(seed, hi)), reference, f"sizes<{hi}")
    scores = reference[0]
    assert len(scores) == 3000 and sum(s["is_anomaly"] for s in scores) > 0


def test_restored_pipeline_continues_like_an_uninterrupted_one(lines, tmp_path):
    whole = _run(_pipeline(), lines, [200] * 100)
    cut = 1237  # mid-block for every source
    first = _pipeline()
    head = _run(first, lines[:cut], [200] * 100)
    store = SnapshotStore(tmp_path / "state")
    store.save("nwatch.events", 0, offset=cut, sources=first.source_states(first.sources))
    snap = store.load("nwatch.events", 0)
    assert snap is not None and snap.offset == cut
    second = _pipeline()
    assert second.restore_sources(snap.sources) == []
    tail = _run(second, lines[cut:], [57] * 100)
    assert len(head[0]) + len(tail[0]) == len(whole[0])
    assert_same_results(head[0] + tail[0], whole[0])
    assert_same_results(head[1] + tail[1], whole[1])
    # and the state itself is the same as the uninterrupted run's
    a = _pipeline()
    _run(a, lines, [200] * 100)
    for name in a.sources:
        ma, mb = a.sources[name].monitor, second.sources[name].monitor
        assert ma.events_seen == mb.events_seen and ma.detector.size == mb.detector.size


def test_forest_source_ignores_batching_and_restores_mid_block(lines, tmp_path):
    # the combined kNN + forest score: its components wait in the block in progress,
    # and a snapshot taken mid-block must carry them
    forest = Settings(sources={"cards": SourceSettings(forest_trees=10)})
    first, whole, plain = _batching_and_mid_block_restore(forest, lines, tmp_path, sizes_seed=4)
    assert len(first.sources["cards"].pending.components) > 0
    cards = [i for i, s in enumerate(whole) if s["source"] == "cards" and not s["warming_up"]]
    assert any(whole[i]["score"] != plain[i]["score"] for i in cards)


def _batching_and_mid_block_restore(settings: Settings, lines, tmp_path, *, sizes_seed: int):
    """Asserts that ``settings``' results ignore batch sizes and carry on exactly from a snapshot
    taken mid-block; returns the pipeline snapshotted (as it was saved), the scores of the whole
    run and those of the default settings on the same lines."""
    whole = _run(_pipeline(settings), lines, [200] * 100)
    assert_same_results(_run(_pipeline(settings), lines, _random_sizes(sizes_seed, 97)), whole, "sizes<97")
    cut = 1237
    first = _pipeline(settings)
    head = _run(first, lines[:cut], [200] * 100)
    store = SnapshotStore(tmp_path / "state")
    store.save("nwatch.events", 0, offset=cut, sources=first.source_states(first.sources))
    second = _pipeline(settings)
    assert second.restore_sources(store.load("nwatch.events", 0).sources) == []
    tail = _run(second, lines[cut:], [57] * 100)
    assert_same_results(head[0] + tail[0], whole[0])
    return first, whole[0], _run(_pipeline(), lines, [200] * 100)[0]


def test_snapshot_of_another_encoder_version_or_settings_is_refused_not_mixed(lines, tmp_path):
    first = _pipeline()
    _run(first, lines[:1500], [300] * 10)
    states = first.source_states(first.sources)
    cards = next(s for s in states if s["name"] == "cards")
    old = dict(cards, encoder_tag="transaction@0")
    second = _pipeline()
    refused = second.restore_sources([old])
    assert len(refused) == 1 and "transaction@0" in refused[0] and "not used" in refused[0]
    assert "cards" not in second.sources  # starts afresh on its next event
    third = _pipeline(Settings(sources={"cards": SourceSettings(k=5)}))
    refused = third.restore_sources([cards])
    assert len(refused) == 1 and "other settings (k)" in refused[0]
    assert "cards" not in third.sources


def test_snapshot_files_are_owner_only_data_never_code(lines, tmp_path):
    pipe = _pipeline()
    _run(pipe, lines[:600], [600])
    store = SnapshotStore(tmp_path / "state")
    path = store.save("nwatch.events", 3, offset=600, sources=pipe.source_states(pipe.sources))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]
    assert store.load("nwatch.events", 4) is None
    os.chmod(path, 0o666)
    with pytest.raises(SnapshotError, match="writable by others"):
        store.load("nwatch.events", 3)
    os.chmod(path, 0o600)
    path.write_bytes(path.read_bytes()[:100])  # truncated by a crash of the disk, say
    with pytest.raises(SnapshotError, match="unreadable"):
        store.load("nwatch.events", 3)
    # an archive with a pickled object inside is refused, and the pickle never runs
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(path, "wb") as f:
        np.savez(f, __meta__=np.frombuffer(b'{"format": 1}', np.uint8), a0=np.array([Evil()], dtype=object))
    with pytest.raises(SnapshotError):
        store.load("nwatch.events", 3)
    assert not marker.exists()  # loading never unpickled it


def test_pack_round_trip_and_refusals():
    state = {"a": np.arange(3, dtype=np.float32), "b": [1, 2.5, "x", None, True], "c": {"d": np.zeros((0, 4))},
             "e": np.int64(7), "f": float("nan")}
    meta, arrays = pack(state)
    back = unpack(meta, arrays)
    np.testing.assert_array_equal(back["a"], state["a"])
    assert back["b"] == state["b"] and back["c"]["d"].shape == (0, 4) and back["e"] == 7
    assert np.isnan(back["f"])
    with pytest.raises(TypeError):
        pack({"x": object()})
    with pytest.raises(TypeError):
        pack({"x": np.array([object()], dtype=object)})


def test_packing_and_unpacking_leave_no_cycle_holding_the_arrays():
    # A worker collects cycles seldom (streams.runtime): a cycle made per
    # snapshot kept each snapshot's arrays alive, ~30 MB a minute in the soak.
    import gc
    import weakref

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        a = np.arange(1000, dtype=np.float32)
        ref = weakref.ref(a)
        meta, arrays = pack({"x": [a, {"y": a[:10].copy()}]})
        back = unpack(meta, arrays)
        assert back["x"][0] is not None
        del a, meta, arrays, back
        assert ref() is None  # freed by reference counting alone
    finally:
        if was_enabled:
            gc.enable()


def _event(i, *, source="cards", ts=None, eid=None) -> bytes:
    e = {"id": eid or f"e{i}", "source": source, "kind": "transaction", "fields": {"amount": float(i % 17)}}
    if ts is not None:
        e["ts"] = ts
    return orjson.dumps(e)


def test_duplicate_late_and_future_events_are_rejected_with_their_reason():
    pipe = _pipeline(Settings(defaults=SourceSettings(max_lateness=3600.0)))
    base = NOW - 86_400
    raws = [_event(i, ts=base + i) for i in range(50)]
    raws += [
        _event(50, eid="e3", ts=base + 50),          # a repeated id
        _event(51, ts=base - 7200),                  # two hours behind the newest event time
        _event(52, ts=NOW + 7200),                   # two hours ahead of arrival
        _event(53, ts=base + 40),                    # a little late: fine
        _event(54),                                  # no event time: arrival time, never late
        _event(3, source="other", ts=base),          # the same id in another source: fine
    ]
    result = pipe.process_raw(raws)
    rejects = {r.index: r.reason for r in result.rejects}
    assert rejects == {50: "duplicate_id", 51: "late_event", 52: "future_timestamp"}
    assert len(result.scores) == len(raws) - 3
    messages = {r.reason: r.message for r in result.rejects}
    assert "'e3'" in messages["duplicate_id"] and "7249 s behind" in messages["late_event"]


def test_dedup_window_is_bounded_and_part_of_the_state():
    pipe = _pipeline(Settings(defaults=SourceSettings(dedup_window=100)))
    pipe.process_raw([_event(i) for i in range(1000)])
    state = pipe.sources["cards"]
    assert len(state.seen) == 100 and next(iter(state.seen)) == "e900"
    r = pipe.process_raw([_event(950), _event(5)])  # in the window: refused; long gone: accepted
    assert [x.reason for x in r.rejects] == ["duplicate_id"] and len(r.scores) == 1
    saved = pipe.source_states(["cards"])[0]
    assert len(saved["seen"]) == 100


def test_poison_leaves_no_trace_in_the_state_and_the_index_stays_exact(lines):
    """Every hostile input is rejected with its reason; the reference (an HNSW graph here) ends
    exactly as without the poison, and answers like an exact search."""

    from detectors.index import ReferenceIndex
    from tests.conftest import assert_state_equal
    from tests.poison import poison_lines

    settings = Settings(defaults=SourceSettings(index_backend="hnsw"))
    vectors = [x for x in lines if b'"kind":"vector"' in x]
    dim = len(orjson.loads(vectors[0])["vector"])
    poison = poison_lines(now=NOW, vector_dim=dim)
    clean, dirty = _pipeline(settings), _pipeline(settings)
    _run(clean, vectors, [64] * 1000)
    mixed: list[bytes] = []
    expected: dict[int, str] = {}
    for j, x in enumerate(vectors):
        mixed.append(x)
        if j >= 10 and j % 7 == 0 and j // 7 - 2 < len(poison):
            raw, reason = poison[j // 7 - 2]
            expected[len(mixed)] = reason
            mixed.append(raw)
    assert len(expected) == len(poison)
    got: dict[int, str] = {}
    for i in range(0, len(mixed), 64):
        for r in dirty.process_raw(mixed[i : i + 64]).rejects:
            got[i + r.index] = r.reason
    assert got == expected
    a, b = clean.sources["embeddings"], dirty.sources["embeddings"]
    assert_state_equal(a.monitor.get_state(), b.monitor.get_state())
    index = b.monitor.detector.index
    assert not index.is_exact
    exact = ReferenceIndex(dim=dim, capacity=index.capacity, metric=index.metric, backend="exact")
    V = index.vectors()
    exact.add(V, [str(i) for i in range(len(V))])
    queries = np.asarray(V[::7] + 0.01, np.float32)
    _, got_slots = index.query(queries, 10)
    _, true_slots = exact.query(queries, 10)
    got_sets = [set(index.ids_of(got_slots[i : i + 1])[0]) for i in range(len(queries))]
    ids = index.ids_of(np.arange(len(V))[None, :])[0]
    true_sets = [{ids[s] for s in row} for row in true_slots.tolist()]
    recall = np.mean([len(g & t) / 10 for g, t in zip(got_sets, true_sets)])
    assert recall >= 0.95, recall


def test_mahalanobis_source_ignores_batching_and_restores_mid_block(lines, tmp_path):
    # the covariance is refitted as the reference learns (every learn_block): a
    # snapshot taken mid-block must carry it, and batching must not matter
    maha = Settings(sources={"embeddings": SourceSettings(scorer="mahalanobis")})
    first, whole, plain = _batching_and_mid_block_restore(maha, lines, tmp_path, sizes_seed=5)
    assert first.sources["embeddings"].monitor.covariance.is_ready
    emb = [i for i, s in enumerate(whole) if s["source"] == "embeddings" and not s["warming_up"]]
    assert emb and any(whole[i]["score"] != plain[i]["score"] for i in emb)

from __future__ import annotations

import numpy as np
import pytest

from detectors.index import ReferenceIndex
from models.errors import NonFinite, StateMismatch, WrongDimension, ZeroVector
from tests.conftest import assert_plain_state


def _fill(index, X, batch=97):
    for i in range(0, len(X), batch):
        index.add(X[i : i + batch], [f"e{j}" for j in range(i, min(i + batch, len(X)))])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_hnsw_agrees_with_exact_search_after_many_evictions(metric, rng):
    X = rng.normal(size=(6000, 24)).astype(np.float32)
    exact = ReferenceIndex(dim=24, capacity=800, metric=metric, backend="exact")
    graph = ReferenceIndex(dim=24, capacity=800, metric=metric, backend="hnsw", ef_search=128)
    _fill(exact, X)
    _fill(graph, X)
    assert exact.size == graph.size == 800
    Q = rng.normal(size=(200, 24)).astype(np.float32)
    de, se = exact.query(Q, 10)
    dg, sg = graph.query(Q, 10)
    ids_e, ids_g = exact.ids_of(se), graph.ids_of(sg)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids_e, ids_g)])
    assert recall >= 0.97
    # only the newest 800 events can be neighbours
    assert min(int(i[1:]) for row in ids_g for i in row) >= 6000 - 800
    np.testing.assert_allclose(exact.vectors(), graph.vectors(), atol=1e-6)
    # distances are true distances in both backends (hnswlib's l2 is squared)
    np.testing.assert_allclose(de[:, 0], dg[:, 0], rtol=1e-4, atol=1e-5)


def test_exact_distances_match_brute_force(rng):
    X = rng.normal(size=(300, 8)).astype(np.float32)
    idx = ReferenceIndex(dim=8, capacity=300)
    _fill(idx, X)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    d, _ = idx.query(q, 4)
    brute = np.sort(np.linalg.norm(q[:, None] - X[None], axis=2), axis=1)[:, :4]
    np.testing.assert_allclose(d, brute, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["exact", "hnsw"])
def test_never_asks_more_neighbours_than_stored(backend):
    idx = ReferenceIndex(dim=3, capacity=50, backend=backend)
    d, s = idx.query(np.ones((2, 3), np.float32), 10)
    assert d.shape == (2, 0)
    idx.add(np.eye(3, dtype=np.float32), ["a", "b", "c"])
    d, s = idx.query(np.ones((2, 3), np.float32), 10)
    assert d.shape == (2, 3) and sorted(idx.ids_of(s)[0]) == ["a", "b", "c"]


@pytest.mark.parametrize("backend", ["exact", "hnsw"])
def test_memory_bounded_after_ten_times_capacity(backend, rng):
    idx = ReferenceIndex(dim=16, capacity=200, backend=backend)
    _fill(idx, rng.normal(size=(200, 16)).astype(np.float32))
    before = idx.nbytes
    _fill(idx, rng.normal(size=(2000, 16)).astype(np.float32))
    assert idx.size == 200 and idx.nbytes == before and len(idx._ids) == 200


@pytest.mark.parametrize("backend", ["exact", "hnsw"])
def test_state_round_trip_gives_identical_answers(backend, rng):
    X = rng.normal(size=(700, 12)).astype(np.float32)
    a = ReferenceIndex(dim=12, capacity=300, backend=backend)
    _fill(a, X)
    state = a.get_state()
    assert_plain_state(state)
    b = ReferenceIndex(dim=12, capacity=300, backend=backend)
    b.set_state(state)
    Q = rng.normal(size=(50, 12)).astype(np.float32)
    (da, sa), (db, sb) = a.query(Q, 5), b.query(Q, 5)
    np.testing.assert_array_equal(da, db)
    assert a.ids_of(sa) == b.ids_of(sb)
    # both keep evolving identically
    more = rng.normal(size=(100, 12)).astype(np.float32)
    ids = [f"m{i}" for i in range(100)]
    a.add(more, ids)
    b.add(more, ids)
    np.testing.assert_array_equal(a.query(Q, 5)[0], b.query(Q, 5)[0])
    with pytest.raises(StateMismatch):
        ReferenceIndex(dim=13, capacity=300, backend=backend).set_state(state)


def test_query_does_not_change_the_index(rng):
    idx = ReferenceIndex(dim=4, capacity=20)
    _fill(idx, rng.normal(size=(30, 4)).astype(np.float32))
    before = idx.get_state()
    idx.query(rng.normal(size=(10, 4)).astype(np.float32), 3)
    after = idx.get_state()
    np.testing.assert_array_equal(before["vectors"], after["vectors"])
    assert before["ids"] == after["ids"] and before["added"] == after["added"]


def test_bad_input_raises_declared_errors():
    idx = ReferenceIndex(dim=3, capacity=10, metric="cosine")
    with pytest.raises(WrongDimension):
        idx.add(np.ones((1, 4), np.float32), ["a"])
    with pytest.raises(NonFinite):
        idx.add(np.array([[1, np.nan, 0]], np.float32), ["a"])
    with pytest.raises(ZeroVector):
        idx.add(np.zeros((1, 3), np.float32), ["a"])
    assert idx.size == 0


def test_auto_backend_switches_on_capacity():
    assert ReferenceIndex(dim=2, capacity=100, exact_max=100).is_exact
    assert not ReferenceIndex(dim=2, capacity=101, exact_max=100).is_exact


@pytest.mark.parametrize("backend", ["exact", "hnsw"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_a_batch_of_repeated_rows_answers_as_its_rows_one_by_one(backend, metric, rng):
    # Batches with repeats are searched once per distinct row; each row must
    # get exactly the answer it gets alone, in its own position.
    idx = ReferenceIndex(dim=16, capacity=500, metric=metric, backend=backend)
    _fill(idx, rng.normal(size=(700, 16)).astype(np.float32))
    distinct = rng.normal(size=(5, 16)).astype(np.float32)
    pick = rng.integers(0, 5, size=64)
    Q = distinct[pick]
    dist, slots = idx.query(Q, 7)
    assert dist.shape == (64, 7) and slots.shape == (64, 7)
    for j in range(5):
        d1, s1 = idx.query(distinct[j : j + 1], 7)
        rows = np.flatnonzero(pick == j)
        assert (slots[rows] == s1).all()
        np.testing.assert_allclose(dist[rows], np.repeat(d1, len(rows), axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distinct", [1, 5, 25, 32])
def test_compiled_distinct_rows_are_the_dict_versions(distinct, rng, monkeypatch):
    # detectors.kernels.distinct_rows against detectors.index.distinct_rows: the same rows in
    # the same order, the same inverse, the same refusal past the share; -0.0 is not 0.0.
    from detectors import kernels
    from detectors.index import distinct_rows

    monkeypatch.setattr(kernels, "enabled", True)  # compared whatever NWATCH_SCAN_KERNEL says
    assert kernels.loaded()
    base = np.zeros((distinct, 12), np.float32)
    base[:, :5] = rng.normal(size=(2, 5))[np.arange(distinct) % 2]  # rows that differ in the last word alone
    base[:, 11] = np.arange(distinct)
    X = base[rng.integers(0, distinct, size=32)]
    X[3] = -X[3] * 0.0  # -0.0 and 0.0: other bytes
    for share in (0.8, 1.0):
        got, want = kernels.distinct_rows(X, share), distinct_rows(X, share)
        assert (got is None) == (want is None)
        if want is not None:
            assert np.array_equal(got[0], want[0]) and got[0].dtype == want[0].dtype
            assert np.array_equal(got[1], want[1])
    assert kernels.distinct_rows(X, 1.0) is not None


def test_a_batch_of_distinct_rows_is_not_changed_by_the_repeat_path(rng):
    idx = ReferenceIndex(dim=8, capacity=300)
    _fill(idx, rng.normal(size=(300, 8)).astype(np.float32))
    Q = rng.normal(size=(40, 8)).astype(np.float32)
    Q2 = np.concatenate([Q, Q[:30]])  # 40 distinct of 70 rows: the repeat path
    d, s = idx.query(Q, 5)
    d2, s2 = idx.query(Q2, 5)
    assert (s2[:40] == s).all() and (s2[40:] == s[:30]).all()
    np.testing.assert_allclose(d2[:40], d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dim", [12, 200])
def test_exact_scan_is_brute_force_with_ties_and_answers_each_row_as_alone(metric, dim, rng):
    # A reference mostly of three repeated vectors: queries equal to one of them
    # tie with hundreds of stored rows (more candidates than the threshold keeps);
    # wide rows with few queries take the other product orientation.
    base = rng.normal(size=(3, dim)).astype(np.float32)
    X = np.where(rng.random((2000, 1)) < 0.9, base[rng.integers(0, 3, 2000)],
                 rng.normal(size=(2000, dim))).astype(np.float32)
    idx = ReferenceIndex(dim=dim, capacity=2000, metric=metric, backend="exact")
    _fill(idx, X)
    Q = np.concatenate([base, rng.normal(size=(5, dim)).astype(np.float32)])
    V = idx.vectors()
    if metric == "cosine":
        Vn = V / np.linalg.norm(V, axis=1, keepdims=True)
        Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        brute = 1.0 - Qn @ Vn.T
    else:
        brute = np.linalg.norm(Q[:, None] - V[None], axis=2)
    d, s = idx.query(Q, 10)
    np.testing.assert_allclose(d, np.sort(brute, axis=1)[:, :10], rtol=1e-4, atol=1e-5)
    oldest = idx._added - idx.size  # slot -> position in vectors()
    for j in range(len(Q)):
        pos = (s[j] - oldest) % idx.capacity
        np.testing.assert_allclose(brute[j, pos], d[j], rtol=1e-4, atol=1e-5)  # the slots hold those distances
        d1, s1 = idx.query(Q[j : j + 1], 10)
        assert (s1[0] == s[j]).all() and (d1[0] == d[j]).all()
    ties = s[0][d[0] <= d[0][0]]  # a query equal to a stored vector: ties broken by slot
    assert (np.diff(ties) > 0).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exact_scan_over_the_filled_columns_is_brute_force_as_columns_come_and_go(metric, rng):
    # A fixed-width encoder fills few of its columns: 6 of 40 at first, then
    # later vectors fill 3 more and stop filling 2 of the first (evicted in
    # time). Queries also carry values where no stored vector has any.
    dim, cap = 40, 300
    idx = ReferenceIndex(dim=dim, capacity=cap, metric=metric, backend="exact")

    def rows(n, cols):
        X = np.zeros((n, dim), np.float32)
        X[:, cols] = rng.normal(size=(n, len(cols)))
        return X

    def check(Q):
        V = idx.vectors()
        if metric == "cosine":
            brute = 1.0 - (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ (V / np.linalg.norm(V, axis=1, keepdims=True)).T
        else:
            brute = np.linalg.norm(Q[:, None] - V[None], axis=2)
        d, s = idx.query(Q, 10)
        np.testing.assert_allclose(d, np.sort(brute, axis=1)[:, :10], rtol=1e-4, atol=1e-5)
        oldest = idx._added - idx.size
        for j in range(len(Q)):
            np.testing.assert_allclose(brute[j, (s[j] - oldest) % cap], d[j], rtol=1e-4, atol=1e-5)
            d1, s1 = idx.query(Q[j : j + 1], 10)
            assert (s1[0] == s[j]).all() and (d1[0] == d[j]).all()

    first, later = [0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 20, 21, 39]
    _fill(idx, rows(cap, first))
    assert idx._compact is not None and idx._compact.shape[1] == 6
    Q = rows(12, first)
    Q[:4, 30] = 2.0  # where the reference is all zeros
    check(Q)
    _fill(idx, rows(150, later))  # half the reference turned over: 9 columns filled
    assert idx._compact.shape[1] == 9
    check(np.concatenate([rows(6, first), rows(6, later)]))
    _fill(idx, rows(cap, later))  # the first columns' vectors all evicted: 0 and 1 empty again
    assert idx._compact.shape[1] == len(later)
    check(np.concatenate([rows(6, first), rows(6, later)]))
    # a state round trip keeps the same columns and answers
    again = ReferenceIndex(dim=dim, capacity=cap, metric=metric, backend="exact")
    again.set_state(idx.get_state())
    Q = rows(8, later + [0])
    assert (again._active == idx._active).all()
    for a, b in zip(again.query(Q, 10), idx.query(Q, 10)):
        assert (a == b).all()
    # filling most columns switches the compact copy off, with the same answers
    _fill(idx, rows(cap, list(range(dim))))
    assert idx._compact is None
    check(rows(8, list(range(dim))))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(("dim", "filled", "cap", "queries"), [(100, 9, 2000, 32), (36, 36, 2000, 32), (130, 12, 500, 7), (20, 20, 15, 4)])
def test_compiled_scan_gives_the_numpy_scans_answers_bit_for_bit(metric, dim, filled, cap, queries, rng, monkeypatch):
    # detectors.kernels recomputes the candidates' distances in NumPy's own
    # summation order: the same distances and slots, not merely close ones.
    from detectors import kernels

    monkeypatch.setattr(kernels, "enabled", True)  # compared with NumPy whatever NWATCH_SCAN_KERNEL says

    assert kernels.loaded()
    idx = ReferenceIndex(dim=dim, capacity=cap, metric=metric, backend="exact")
    X = np.zeros((cap + 50, dim), np.float32)
    X[:, :filled] = rng.standard_normal((cap + 50, filled)) * np.exp(rng.normal(size=filled))
    _fill(idx, X)
    Q = np.zeros((queries, dim), np.float32)
    wide = min(filled + 1, dim)  # one column where no stored vector has a value, if there is one
    Q[:, :wide] = rng.standard_normal((queries, wide))
    for k in (1, 10):
        k = min(k, idx.size)
        compiled = idx._query_exact(idx.as_stored(Q), k)
        monkeypatch.setattr(kernels, "enabled", False)
        plain = idx._query_exact(idx.as_stored(Q), k)
        monkeypatch.setattr(kernels, "enabled", True)
        assert compiled[0].dtype == plain[0].dtype and compiled[1].dtype == plain[1].dtype
        assert np.array_equal(compiled[0], plain[0]) and np.array_equal(compiled[1], plain[1])


@pytest.mark.parametrize("distinct", [1, 5, 60])
def test_compiled_scan_on_a_reference_of_repeats_keeps_the_lowest_tied_slots(distinct, rng, monkeypatch):
    # Most of the row ties at the threshold: the candidates gathered (every column
    # of the row when all tie) exceed the tie cut, which keeps the smallest by
    # distance, then slot. The distances are NumPy's; among tied slots the NumPy
    # path may name other slots of the same vector (as on main), so the slots are
    # checked against that rule, on queries whose distances are exact in float32.
    from detectors import kernels

    monkeypatch.setattr(kernels, "enabled", True)
    assert kernels.loaded()
    dim, cap = 12, 2000
    idx = ReferenceIndex(dim=dim, capacity=cap, metric="l2", backend="exact")
    patterns = rng.integers(-3, 4, size=(distinct, dim)).astype(np.float32)
    _fill(idx, patterns[rng.integers(0, distinct, size=cap + 70)])
    exact_q = np.concatenate([patterns[:4], patterns[:4] + 0.5])
    Q = np.concatenate([exact_q, rng.standard_normal((9, dim)).astype(np.float32)])
    squared = ((exact_q[:, None, :].astype(np.float64) - idx._vecs[None]) ** 2).sum(axis=2)
    for k in (1, 10):
        d, s = idx._query_exact(idx.as_stored(Q), k)
        monkeypatch.setattr(kernels, "enabled", False)
        plain = idx._query_exact(idx.as_stored(Q), k)
        monkeypatch.setattr(kernels, "enabled", True)
        assert np.array_equal(d, plain[0])
        for row, sq in zip(s, squared):
            expected = np.lexsort((np.arange(cap), sq))[:k]  # by distance, then slot
            assert row.tolist() == expected.tolist()

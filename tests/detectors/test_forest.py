"""Isolation trees on the reference, and the monitor's combined kNN + forest score."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.forest import IsolationForest, average_path
from detectors.monitor import SourceMonitor
from models.errors import StateMismatch
from tests.monitor_runs import assert_restored_carries_on_alike, run


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels.astype(bool)
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def test_average_path_matches_the_paper_for_small_and_large_samples():
    assert average_path(1.0) == 0.0
    assert average_path(2.0) == 1.0
    # c(256) of Liu et al. (2008): 2 H(255) - 2 * 255 / 256, H(i) ~ ln(i) + Euler
    assert average_path(256.0) == pytest.approx(10.24, abs=0.01)


def test_isolated_points_have_shorter_paths_than_the_bulk():
    rng = np.random.default_rng(1)
    R = rng.normal(size=(2000, 4)).astype(np.float32)
    f = IsolationForest(trees=50, seed=0)
    f.fit(R)
    inliers = rng.normal(size=(200, 4)).astype(np.float32) * np.float32(0.5)
    outliers = inliers.copy()
    outliers[:, 2] += np.float32(5.0)  # out along one feature only
    s_in, s_out = f.score(inliers), f.score(outliers)
    assert (s_out > s_in).mean() > 0.95
    assert np.isfinite(s_in).all() and s_in.shape == (200,)


def test_constant_reference_gives_one_leaf_and_equal_scores():
    f = IsolationForest(trees=5, sample_size=16, seed=0)
    f.fit(np.ones((40, 3), np.float32))
    s = f.score(np.array([[1.0, 1.0, 1.0], [9.0, -9.0, 0.0]], np.float32))
    assert s[0] == s[1] == -average_path(16.0)


def test_regrow_replaces_the_oldest_tree_only_and_state_round_trips():
    rng = np.random.default_rng(2)
    R = rng.normal(size=(500, 3)).astype(np.float32)
    a = IsolationForest(trees=8, sample_size=64, seed=3)
    a.fit(R)
    before = [t["threshold"].copy() for t in a.get_state()["forest"]]
    a.regrow(R + np.float32(1.0))
    after = [t["threshold"] for t in a.get_state()["forest"]]
    changed = [not (len(x) == len(y) and np.array_equal(x, y)) for x, y in zip(before, after)]
    assert changed == [True] + [False] * 7
    a.regrow(R, count=3)
    again = [t["threshold"] for t in a.get_state()["forest"]]
    changed = [not (len(x) == len(y) and np.array_equal(x, y)) for x, y in zip(after, again)]
    assert changed == [False] + [True] * 3 + [False] * 4
    b = IsolationForest(trees=8, sample_size=64, seed=3)
    b.set_state(a.get_state())
    Q = rng.normal(size=(30, 3)).astype(np.float32)
    np.testing.assert_array_equal(a.score(Q), b.score(Q))
    a.regrow(R)
    b.regrow(R)  # the next tree draws the same sample and splits on both
    np.testing.assert_array_equal(a.score(Q), b.score(Q))
    with pytest.raises(StateMismatch):
        IsolationForest(trees=9, sample_size=64).set_state(a.get_state())


def scale_blind_stream(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three wide features and three narrow ones; the anomalies are far out on a narrow
    feature only, a step the wide features' spread hides from an L2 distance."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(6000, 6)) * np.array([20.0, 20.0, 20.0, 0.05, 0.05, 0.05])
    y = np.zeros(len(X), bool)
    y[rng.choice(np.arange(1000, 6000), size=60, replace=False)] = True
    X[y, 3 + rng.integers(3, size=y.sum())] = 1.0
    return X.astype(np.float32), y


def test_forest_finds_what_the_knn_distance_misses_and_keeps_the_false_alarm_budget():
    X, y = scale_blind_stream(5)
    knn_scores, knn_flags, warm_k = run(SourceMonitor(alpha=0.01, drift=False), X)
    scores, flags, warm = run(SourceMonitor(alpha=0.01, drift=False, forest_trees=50), X)
    judged = ~warm & ~warm_k
    auc_knn = roc_auc(knn_scores[judged], y[judged])
    auc_both = roc_auc(scores[judged], y[judged])
    assert auc_knn < 0.6 and auc_both > 0.85, (auc_knn, auc_both)
    far = flags[judged & ~y].mean()
    assert 0.002 <= far <= 0.02, far
    # anomalies (1.2 %) are more frequent than alpha, so recall at alpha stays low; the kNN finds none
    assert flags[judged & y].sum() > knn_flags[judged & y].sum()


def test_combined_monitor_state_round_trips_mid_stream_and_score_reads_only():
    X, _ = scale_blind_stream(6)
    a = SourceMonitor(alpha=0.01, forest_trees=20, reference_size=500)
    run(a, X[:2000])
    Q = X[2000:2050]
    first = a.score(Q)
    second = a.score(Q)
    np.testing.assert_array_equal(first.scores, second.scores)
    assert_restored_carries_on_alike(a, SourceMonitor(alpha=0.01, forest_trees=20, reference_size=500), X[2000:])
    with pytest.raises(StateMismatch):
        SourceMonitor(alpha=0.01).set_state(a.get_state())


def test_a_state_saved_by_the_knn_alone_loads_and_the_forest_grows_from_its_reference():
    X, y = scale_blind_stream(8)
    knn = SourceMonitor(alpha=0.01, drift=False, reference_size=500)
    run(knn, X[:2000])
    b = SourceMonitor(alpha=0.01, drift=False, reference_size=500, forest_trees=20)
    b.set_state(knn.get_state())
    assert b.detector.size == knn.detector.size and not b.forest.is_ready
    assert b.is_warming_up  # its calibration set held kNN scores: it fills again
    scores, flags, warm = run(b, X[2000:])
    assert b.forest.is_ready and not b.is_warming_up
    after = np.flatnonzero(~warm) + 2000
    assert warm[:100].all() and len(after) > 0.8 * (len(X) - 2000)
    # judged with the forest, it finds the narrow-feature anomalies the kNN alone misses
    assert roc_auc(scores[after - 2000], y[after]) > 0.85


def test_commit_without_the_components_computes_the_same_ones():
    X, _ = scale_blind_stream(7)
    a = SourceMonitor(alpha=0.01, drift=False, forest_trees=10)
    b = SourceMonitor(alpha=0.01, drift=False, forest_trees=10)
    for i in range(0, 3000, 50):
        Xi, ids = X[i : i + 50], [f"e{j}" for j in range(i, i + 50)]
        da, db = a.score(Xi), b.score(Xi)
        a.commit(Xi, ids, da.scores, da.is_anomaly, da.learned, components=da.components)
        b.commit(Xi, ids, db.scores, db.is_anomaly, db.learned)
    np.testing.assert_array_equal(a.score(X[3000:3100]).scores, b.score(X[3000:3100]).scores)


@pytest.mark.parametrize(("trees", "sample_size", "dim", "filled"),
                         [(50, 256, 100, 9), (7, 64, 12, 12), (130, 16, 5, 3), (1, 4, 3, 2)])
def test_compiled_scoring_gives_the_numpy_descents_scores_bit_for_bit(
    trees, sample_size, dim, filled, monkeypatch
):
    # detectors.kernels.forest_paths reads the same leaves as the NumPy descent
    # and leaves the mean to NumPy: equal scores, not merely close ones.
    from detectors import kernels

    monkeypatch.setattr(kernels, "enabled", True)  # compared with NumPy whatever NWATCH_SCAN_KERNEL says

    assert kernels.loaded()
    rng = np.random.default_rng(trees)
    R = np.zeros((1_000, dim), np.float32)
    R[:, :filled] = rng.standard_normal((1_000, filled)) * np.exp(rng.normal(size=filled))
    R[rng.random(R.shape) < 0.3] = 0.0  # zero-inflated columns: ties at the split points
    f = IsolationForest(trees=trees, sample_size=sample_size, seed=3)
    f.fit(R)
    f.regrow(R[::2], max(1, trees // 3))  # the packed arrays updated in place
    Q = np.concatenate([R[:40], rng.standard_normal((40, dim)).astype(np.float32) * 3])
    feature, threshold, _ = f.packed()
    # rows that sit exactly on split points: x >= threshold goes right
    on = np.zeros((19, dim), np.float32)  # 99 rows: the kernel's eight-row steps and its tail
    pick = rng.integers(0, feature.shape[1], size=19)
    on[np.arange(19), feature[0, pick]] = np.where(np.isfinite(threshold[0, pick]), threshold[0, pick], 0.0)
    Q = np.concatenate([Q, on])
    # 13 and 47 rows: eight-row steps, a four-row step and a tail; 3: the tail alone
    compiled = [f.score(Q), f.score(Q[:3]), f.score(Q[:13]), f.score(Q[52:])]
    monkeypatch.setattr(kernels, "enabled", False)
    plain = f.score(Q)
    assert compiled[0].dtype == plain.dtype == np.float64
    assert np.array_equal(compiled[0], plain) and np.array_equal(compiled[1], plain[:3])
    assert np.array_equal(compiled[2], plain[:13]) and np.array_equal(compiled[3], plain[52:])
    assert len(np.unique(plain)) > 1  # the rows do not all end in the same leaf


@pytest.mark.parametrize(("trees", "sample_size", "rows", "dim", "filled"),
                         [(50, 256, 2_000, 100, 9), (10, 256, 300, 8, 8), (13, 32, 40, 4, 2), (3, 8, 5, 3, 3)])
def test_compiled_growing_grows_the_numpy_levels_trees_exactly(
    trees, sample_size, rows, dim, filled, monkeypatch
):
    # The kernel takes the draws NumPy makes level by level all at once: the
    # same features, thresholds, children and leaf depths, after fit and regrow.
    from detectors import kernels

    monkeypatch.setattr(kernels, "enabled", True)  # compared with NumPy whatever NWATCH_SCAN_KERNEL says

    assert kernels.loaded()
    rng = np.random.default_rng(rows)
    R = np.zeros((rows, dim), np.float32)
    R[:, :filled] = np.round(rng.standard_normal((rows, filled)) * np.exp(rng.normal(size=filled)), 1)
    R[rng.random(R.shape) < 0.3] = 0.0  # ties and zero-inflated columns
    R[rows // 2 :: 7] = R[0]  # repeated rows: nodes of identical rows become leaves
    grown = []
    for on in (True, False):
        monkeypatch.setattr(kernels, "enabled", on)
        f = IsolationForest(trees=trees, sample_size=sample_size, seed=5)
        f.fit(R)
        f.regrow(R[::3], max(1, trees // 4))
        grown.append(f)
    compiled, plain = grown
    assert len(compiled._forest) == len(plain._forest) == trees
    for a, b in zip(compiled._forest, plain._forest):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert sum(len(t["feature"]) for t in plain._forest) > 3 * trees  # trees that split


def test_events_past_a_components_calibration_set_are_ranked_not_tied_and_decisions_stay():
    """Past the largest calibration score a component's p-value goes on falling (an
    exponential tail), so events far out on the kNN rank by how far, instead of tying at
    the top with normal events just past the forest's set; p-values within the set, and the
    decisions, are those of the plain mid-rank p-value."""
    rng = np.random.default_rng(3)
    mon = SourceMonitor(alpha=0.01, drift=False, forest_trees=20, reference_size=500)
    run(mon, rng.normal(size=(1500, 4)).astype(np.float32))
    knn_cal, forest_cal = mon._component_cal
    inside = rng.normal(size=(200, 4)).astype(np.float32)
    far = np.zeros((4, 4), np.float32)
    far[:, 0] = [8.0, 12.0, 16.0, 20.0]  # ever further out along one feature
    d_in, d_far = mon.score(inside), mon.score(far)
    knn_far = d_far.components[:, 0]
    assert (knn_far > knn_cal.calibration_scores().max()).all()
    # within the set: the plain mid-rank p-value, bit for bit
    s_in = d_in.components[:, 0]
    within = s_in <= knn_cal.calibration_scores().max()
    plain = knn_cal.p_values(s_in) - 0.5 / (knn_cal.size + 1.0)
    np.testing.assert_array_equal(knn_cal.mid_rank_p_values(s_in)[within], plain[within])
    # past it: strictly falling, below the floor the plain p-value would give every one of them
    p_far = knn_cal.mid_rank_p_values(knn_far)
    assert (np.diff(p_far) < 0).all() and (p_far < 0.5 / (knn_cal.size + 1.0)).all()
    assert (np.diff(d_far.scores) > 0).all(), d_far.scores
    # each is still flagged, as any event past every calibration score was
    assert d_far.is_anomaly.all()
    assert d_far.scores.min() > d_in.scores.max()
    # however far out (here ~1e5 fitted scales), the score stays finite
    assert np.isfinite(mon.score(np.full((1, 4), 1e5, np.float32)).scores).all()


@pytest.mark.parametrize("filled", [[0, 3, 7], [2, 5], [4], [0], []])
def test_trees_grown_on_the_filled_columns_are_those_of_the_full_rows(filled, monkeypatch):
    # fit / regrow with ``columns``: R holds only those columns of rows that are 0 elsewhere
    from detectors import kernels

    rng = np.random.default_rng(len(filled))
    full = np.zeros((600, 10), np.float32)
    full[:, filled] = rng.normal(size=(600, len(filled))).astype(np.float32)
    if filled:
        full[::5, filled[0]] = 1.0  # ties
    X = rng.normal(size=(40, 10)).astype(np.float32)
    for on in (True, False):
        monkeypatch.setattr(kernels, "enabled", on)
        a, b = IsolationForest(trees=12, sample_size=64, seed=3), IsolationForest(trees=12, sample_size=64, seed=3)
        a.fit(full)
        b.fit(full[:, filled], columns=np.asarray(filled, np.intp))
        for _ in range(3):
            a.regrow(full[::-1], 4)
            b.regrow(full[::-1][:, filled], 4, columns=np.asarray(filled, np.intp))
        assert all(np.array_equal(p, q) for p, q in zip(a.packed(), b.packed()))
        assert a.score(X).tobytes() == b.score(X).tobytes()

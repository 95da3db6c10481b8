from __future__ import annotations

import numpy as np
import pytest

from detectors.calibration import ConformalThresholder
from detectors.knn import KNNDetector


def test_knn_score_is_mean_distance_to_k_nearest():
    det = KNNDetector(k=2, capacity=10)
    det.learn(np.array([[0, 0], [0, 1], [0, 5]], np.float32), ["a", "b", "c"])
    r = det.query(np.array([[0, 0.5]], np.float32))
    assert r.scores.tolist() == pytest.approx([0.5])
    assert sorted(r.neighbour_ids[0]) == ["a", "b"]
    assert KNNDetector(k=2, capacity=10, aggregate="max").score(np.zeros((1, 2), np.float32)).tolist() == [0.0]


def test_scoring_before_learning_never_finds_the_event_itself(rng):
    det = KNNDetector(k=1, capacity=100)
    X = rng.normal(size=(50, 4)).astype(np.float32)
    det.learn(X[:49])
    assert det.score(X[49:])[0] > 0  # not yet in the reference
    det.learn(X[49:])
    assert det.score(X[49:])[0] == pytest.approx(0.0, abs=1e-3)


def test_conformal_p_values_are_exact_ranks():
    t = ConformalThresholder(alpha=0.2, window=10, min_calibration=5)
    t.learn(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert t.p_values(np.array([0.0, 3.0, 5.0, 6.0])).tolist() == pytest.approx(
        [6 / 6, 4 / 6, 2 / 6, 1 / 6]
    )
    assert t.is_ready


def test_threshold_agrees_with_p_values(rng):
    t = ConformalThresholder(alpha=0.05, window=500)
    t.learn(rng.exponential(size=500))
    s = np.linspace(0, 8, 4001)
    flagged = t.p_values(s) < 0.05
    assert flagged.any() and not flagged.all()
    assert s[flagged].min() >= t.threshold and s[~flagged].max() < t.threshold


def test_calibration_window_rolls_and_is_bounded(rng):
    t = ConformalThresholder(alpha=0.1, window=100)
    t.learn(np.zeros(100))
    t.learn(np.ones(1000))
    assert t.size == 100 and t.p_values(np.array([0.5]))[0] == pytest.approx(101 / 101)
    assert t._ring.nbytes == 800


def test_not_ready_until_twice_one_over_alpha():
    t = ConformalThresholder(alpha=0.01, window=2000)
    t.learn(np.arange(199.0))
    assert not t.is_ready
    t.learn(np.array([1.0]))
    assert t.is_ready
    with pytest.raises(ValueError):
        ConformalThresholder(alpha=0.001, window=100)


def test_rolling_calibration_keeps_its_sorted_scores_equal_to_a_fresh_sort(rng):
    # Blocks of scores with many ties (rounded), read between blocks so the
    # sorted copy is rolled forward rather than rebuilt.
    t = ConformalThresholder(alpha=0.05, window=200)
    for step in range(60):
        block = np.round(rng.exponential(size=int(rng.integers(1, 40))), 1)
        t.learn(block)
        expected = np.sort(t._ring[: t.size])
        assert np.array_equal(t.sorted_scores(), expected)
        q = np.round(rng.exponential(size=5), 1)
        n_ge = (expected[None, :] >= q[:, None]).sum(axis=1)
        assert np.array_equal(t.p_values(q), (1.0 + n_ge) / (t.size + 1.0))


def test_compiled_merge_rolls_the_sorted_scores_and_their_slots_as_numpy_would(rng, monkeypatch):
    # With the kernels the sorted copy is rolled by one merge that carries the
    # ring slots along (own_p_values then needs no argsort): the same sorted
    # scores, p-values, quantiles and own p-values as the NumPy path, ties,
    # -0.0 and nan included, blocks of every size, a reset on the way.
    from detectors import kernels

    monkeypatch.setattr(kernels, "enabled", True)  # compared with NumPy whatever NWATCH_SCAN_KERNEL says

    assert kernels.loaded() and kernels.already_loaded()
    sets = []
    for on in (True, False):
        monkeypatch.setattr(kernels, "enabled", on)
        t = ConformalThresholder(alpha=0.05, window=120)
        draws = np.random.default_rng(7)
        seen = []
        for step in range(150):
            block = np.round(draws.exponential(size=int(draws.integers(1, 35))), 1)
            block[draws.random(len(block)) < 0.05] = -0.0
            block[draws.random(len(block)) < 0.02] = np.nan
            if step == 90:
                t.reset()
            t.learn(block)
            q = np.round(draws.exponential(size=5), 1)
            if step % 3:
                seen.append((t.sorted_scores().copy(), t.p_values(q), t.score_quantile(0.5), t.threshold))
            if step % 5 == 0:
                seen.append((t.own_p_values(),))
            if on and t._order is not None:
                assert np.array_equal(t._ring[t._order], t._sorted, equal_nan=True)
                assert sorted(t._order.tolist()) == list(range(t.size))
        sets.append(seen)
    compiled, plain = sets
    assert len(compiled) == len(plain)
    for a, b in zip(compiled, plain):
        for x, y in zip(a, b):
            assert np.array_equal(x, y, equal_nan=True)


def test_score_quantile_is_numpys_quantile_of_the_calibration_set(rng):
    # bit for bit, ties and the ends included, as the set rolls
    t = ConformalThresholder(alpha=0.1, window=50, min_calibration=20)
    assert np.isnan(t.score_quantile(0.5))
    for step in range(40):
        scores = rng.exponential(size=int(rng.integers(1, 12)))
        t.learn(np.round(scores, 1) if step % 2 else scores)
        cal = t._ring[: t.size]
        for q in (0.0, 0.5, 0.25, 0.99, 1.0, float(rng.random())):
            assert t.score_quantile(q) == float(np.quantile(cal, q))

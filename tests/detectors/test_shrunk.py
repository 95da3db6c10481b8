"""The shrunk-covariance Mahalanobis distance, and the monitor's ``scorer="mahalanobis"``."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.monitor import SourceMonitor
from detectors.shrunk import ShrunkMahalanobis, ledoit_wolf
from models.errors import StateMismatch
from streams.config import SourceSettings
from streams.quality_metrics import roc_auc
from tests.monitor_runs import assert_restored_carries_on_alike, run


@pytest.mark.parametrize(("n", "p"), [(40, 100), (300, 20)])
def test_ledoit_wolf_matches_scikit_learn(n, p):
    from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf

    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, p)) @ rng.normal(size=(p, p))
    Z = X - X.mean(axis=0)
    s, mu = ledoit_wolf(Z)
    S = Z.T @ Z / n
    sk_cov, sk_s = sk_ledoit_wolf(X)
    assert s == pytest.approx(sk_s, rel=1e-9)
    np.testing.assert_allclose((1 - s) * S + s * mu * np.eye(p), sk_cov, rtol=1e-9, atol=1e-12)


def test_distance_weighs_each_direction_by_its_spread_and_state_round_trips():
    rng = np.random.default_rng(1)
    R = rng.normal(size=(500, 3)) * np.array([10.0, 1.0, 0.1])
    m = ShrunkMahalanobis()
    assert not m.is_ready and m.score(R[:2]).tolist() == [0.0, 0.0]
    m.fit(R)
    a, b, c = m.score(np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]]))
    assert 3 * a < b < c  # shrinkage lends the narrowest direction some of the mean spread
    other = ShrunkMahalanobis()
    other.set_state(m.get_state())
    np.testing.assert_array_equal(other.score(R[:20]), m.score(R[:20]))
    with pytest.raises(StateMismatch):
        other.set_state({"mean": np.zeros(2), "axes": np.eye(3), "weights": np.ones(3), "isotropic": 1.0})


@pytest.mark.parametrize(("n", "p"), [(30, 80), (400, 12)])
def test_distance_is_that_of_the_full_shrunk_covariance(n, p):
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(p)
    R = rng.normal(size=(n, p)) @ rng.normal(size=(p, p))
    Q = rng.normal(size=(20, p)) * 3
    m = ShrunkMahalanobis()
    m.fit(R)
    lw = LedoitWolf().fit(R)
    c = lw.shrinkage_ * np.trace(np.cov(R.T, bias=True)) / p  # the score is in the data's units
    np.testing.assert_allclose(m.score(Q), np.sqrt(c * lw.mahalanobis(Q)), rtol=2e-3)


def anisotropic_stream(seed: int, n: int = 2500, dim: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Embedding-like rows: two dominant directions shared by every row, a little spread in
    16 more, nothing in the rest; an anomaly steps along one of the silent directions, a step
    smaller than the normal rows' distances to each other (the dominant directions' spread)."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, dim))
    X[:, 0] = 30.0
    X[:, 1:3] = rng.normal(size=(n, 2)) * 8.0
    X[:, 3:19] = rng.normal(size=(n, 16)) * 1.0
    X[:, 19:] = rng.normal(size=(n, dim - 19)) * 0.05
    y = np.zeros(n, bool)
    y[rng.choice(np.arange(600, n), size=25, replace=False)] = True
    X[y, 19 + rng.integers(dim - 19, size=y.sum())] += 2.0
    return X.astype(np.float32), y


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_mahalanobis_scorer_finds_a_step_along_a_silent_direction_within_the_budget(metric):
    X, y = anisotropic_stream(2)
    ks, _, kw = run(SourceMonitor(metric=metric, drift=False, reference_size=500), X, 32)
    ms, mf, mw = run(SourceMonitor(metric=metric, drift=False, reference_size=500, scorer="mahalanobis"), X, 32)
    judged = ~kw & ~mw
    auc_knn, auc_maha = roc_auc(y[judged], ks[judged]), roc_auc(y[judged], ms[judged])
    assert auc_knn < 0.75 and auc_maha > 0.95, (auc_knn, auc_maha)
    assert mf[judged & ~y].mean() <= 0.02
    assert mf[judged & y].mean() > 0.5


def test_mahalanobis_monitor_state_round_trips_and_the_knn_states_load():
    X, _ = anisotropic_stream(3)
    a = SourceMonitor(drift=False, reference_size=500, scorer="mahalanobis")
    run(a, X[:1200], 32)
    assert_restored_carries_on_alike(a, SourceMonitor(drift=False, reference_size=500, scorer="mahalanobis"),
                                     X[1200:], 32)
    with pytest.raises(StateMismatch):
        SourceMonitor(drift=False, reference_size=500).set_state(a.get_state())
    # a state saved by the kNN scorer: the reference carries on, the calibration fills again
    knn = SourceMonitor(drift=False, reference_size=500)
    run(knn, X[:1200], 32)
    c = SourceMonitor(drift=False, reference_size=500, scorer="mahalanobis")
    c.set_state(knn.get_state())
    assert c.covariance.is_ready and c.is_warming_up and c.detector.size == knn.detector.size
    _, _, warm = run(c, X[1200:], 32)
    assert warm[:100].all() and not warm[-100:].any()


def test_scorer_setting_defaults_to_knn_and_refuses_what_reads_kNN_distances():
    assert SourceSettings().monitor_kwargs("vector")["scorer"] == "knn"
    assert SourceSettings(scorer="mahalanobis").monitor_kwargs("vector")["scorer"] == "mahalanobis"
    with pytest.raises(ValueError):
        SourceMonitor(scorer="mahalanobis", forest_trees=10)
    with pytest.raises(ValueError):
        SourceMonitor(scorer="mahalanobis", admit_repeats=3)

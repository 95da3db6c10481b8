"""The per-source monitor on fixed-seed synthetic streams: golden positions and calibration."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.monitor import SourceMonitor


def run(monitor, X, batch=64, start=0):
    flags, warm, pv, alarms = [], [], [], []
    for i in range(0, len(X), batch):
        d = monitor.process(X[i : i + batch], [f"e{j}" for j in range(start + i, start + min(i + batch, len(X)))])
        flags.append(d.is_anomaly)
        warm.append(d.warming_up)
        pv.append(d.p_values)
        alarms.extend(d.drift_alarms)
    return np.concatenate(flags), np.concatenate(warm), np.concatenate(pv), alarms


def gaussian_stream(n, dim, seed):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("alpha", [0.01, 0.05])
def test_flagged_share_on_normal_data_is_close_to_alpha(alpha):
    X = gaussian_stream(20_000, 8, seed=3)
    flags, warm, pv, _ = run(SourceMonitor(alpha=alpha, drift=False), X)
    share = flags[~warm].mean()
    assert alpha / 2 <= share <= alpha * 2, share
    assert ((pv > 0) & (pv <= 1)).all()
    assert not flags[warm].any()


def test_golden_injected_anomalies():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(3000, 6)).astype(np.float32)
    planted = np.array([700, 1200, 1201, 2222, 2900])
    X[planted] += np.float32(6.0)
    flags, warm, _, _ = run(SourceMonitor(alpha=0.01, drift=False), X)
    found = np.flatnonzero(flags)
    assert set(planted) <= set(found.tolist())
    # pinned for this seed: the planted five and thirteen false alarms among
    # ~2,490 judged normal events (0.52%, inside the 1% budget); learn_alpha
    # 0.05 (before quality3) flagged the same but 1734
    assert found.tolist() == [
        515, 700, 776, 980, 1200, 1201, 1490, 1547, 1648, 1734, 1746, 1758, 2011, 2121, 2222, 2585,
        2900, 2916,
    ]


def test_near_misses_stay_out_of_the_reference_but_are_not_flagged():
    X = gaussian_stream(3000, 4, seed=9)
    mon = SourceMonitor(alpha=0.01, learn_alpha=0.05, drift=False)
    learned, flagged, pv = [], [], []
    for i in range(0, 3000, 100):
        d = mon.process(X[i : i + 100], [f"e{j}" for j in range(i, i + 100)])
        learned.append(d.learned)
        flagged.append(d.is_anomaly)
        pv.append(np.where(d.warming_up, 1.0, d.p_values))
    learned, flagged, pv = map(np.concatenate, (learned, flagged, pv))
    near = (pv >= 0.01) & (pv < 0.05)
    assert near.any() and not learned[near].any() and not flagged[near].any()
    assert learned[pv >= 0.05].all()


def test_flagged_events_never_enter_the_reference():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1000, 4)).astype(np.float32)
    X[900] = 50.0
    mon = SourceMonitor(alpha=0.01, drift=False)
    flags, _, _, _ = run(mon, X)
    assert flags[900]
    assert "e900" not in set(mon.detector.index._ids)
    # a repeat of the same outlier is still far from everything normal
    d = mon.process(X[900:901], ["again"])
    assert d.is_anomaly[0]


def test_warming_up_until_reference_and_calibration_are_ready():
    X = gaussian_stream(600, 4, seed=2)
    mon = SourceMonitor(alpha=0.01, min_reference=200, drift=False)
    _, warm, _, _ = run(mon, X, batch=50)
    # reference reaches 200 after 4 batches; calibration then needs 200 more scores
    assert warm[:400].all() and not warm[450:].any()


def test_drift_is_detected_and_the_new_normal_adopted():
    rng = np.random.default_rng(5)
    before = rng.normal(size=(4000, 8))
    after = rng.normal(size=(4000, 8)) + np.array([1.5, -1.5, 0, 0, 0, 0, 0, 0])
    X = np.vstack([before, after]).astype(np.float32)
    mon = SourceMonitor(alpha=0.01, drift_policy="adopt")
    flags, warm, _, alarms = run(mon, X)
    assert len(alarms) == 1
    at = int(alarms[0].detected_at[1:])
    assert 4000 <= at <= 4300
    # after adoption the shifted stream is normal again: flagged share back near alpha
    tail = flags[6000:][~warm[6000:]]
    assert tail.mean() <= 0.02


def test_adoption_keeps_judging_and_keeps_anomalies_out_of_the_reference():
    # A drift alarm must not start a second warm-up: in one, every event joins
    # the reference unjudged, and anomalies arriving then become normal.
    rng = np.random.default_rng(5)
    before = rng.normal(size=(4000, 8))
    after = rng.normal(size=(4000, 8)) + np.array([1.5, -1.5, 0, 0, 0, 0, 0, 0])
    X = np.vstack([before, after]).astype(np.float32)
    # right after the adoption, and sparse: every score joins the calibration set,
    # so anomalies denser than alpha would raise each other's p-values
    planted = np.array([4450, 4800, 5300])
    X[planted] += np.float32(8.0)
    mon = SourceMonitor(alpha=0.01, drift_policy="adopt")
    flags, warm, _, alarms = run(mon, X)
    assert len(alarms) == 1 and int(alarms[0].detected_at[1:]) < 4450
    first_judged = int(np.argmin(warm))
    assert not warm[first_judged:].any()
    assert flags[planted].all()
    stored = set(mon.detector.index.ids())
    assert not stored & {f"e{i}" for i in planted}


def test_adoption_does_not_hand_the_calibration_to_the_stretch_that_raised_the_alarm():
    # HDFS-like: anomalies at 2.5 % from right after a drift on. A calibration
    # set refilled from that stretch (judging once it held its 2 / alpha scores)
    # had them among its top scores and flagged about half of them (0.52 when
    # this test was written); the rolling set keeps flagging them (0.88).
    rng = np.random.default_rng(5)
    before = rng.normal(size=(4000, 8))
    after = rng.normal(size=(3000, 8)) + np.array([1.5, -1.5, 0, 0, 0, 0, 0, 0])
    X = np.vstack([before, after]).astype(np.float32)
    planted = np.arange(4300, 5300, 40)
    # about 8 standard deviations out, in random directions
    X[planted] += np.random.default_rng(1).normal(size=(len(planted), 8)).astype(np.float32) * np.float32(8 / np.sqrt(8))
    mon = SourceMonitor(alpha=0.01, drift_policy="adopt")
    flags, warm, _, alarms = run(mon, X)
    assert len(alarms) == 1 and int(alarms[0].detected_at[1:]) < 4300
    assert not warm[4000:].any()
    assert flags[planted].mean() >= 0.75, flags[planted].mean()
    normal = np.ones(len(X), bool)
    normal[planted] = False
    assert flags[4300:][normal[4300:]].mean() <= 0.02


def test_a_state_saved_during_an_older_recalibration_loads_and_keeps_its_rolling_set():
    rng = np.random.default_rng(5)
    X = np.vstack([rng.normal(size=(4000, 8)), rng.normal(size=(2000, 8)) + 1.5]).astype(np.float32)
    a = SourceMonitor(alpha=0.01, drift_policy="adopt")
    for end in range(64, len(X), 64):  # stop right after the adoption
        if run(a, X[end - 64 : end])[3]:
            break
    state = a.get_state()
    # what the older version saved besides: the second set it was refilling
    older = dict(state, next_thresholder={"alpha": 0.01, "window": 2000, "ring": np.zeros(2000), "n": 64})
    b = SourceMonitor(alpha=0.01, drift_policy="adopt")
    b.set_state(older)
    fa, _, pa, _ = run(a, X[end:])
    fb, _, pb, _ = run(b, X[end:])
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(fa, fb)


def test_state_round_trip_mid_stream_gives_identical_results():
    X = gaussian_stream(3000, 5, seed=11)
    X[2500:] += 2.0
    a = SourceMonitor(alpha=0.01)
    run(a, X[:1500])
    b = SourceMonitor(alpha=0.01)
    b.set_state(a.get_state())
    fa, _, pa, aa = run(a, X[1500:])
    fb, _, pb, ab = run(b, X[1500:])
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(fa, fb)
    assert [x.detected_at for x in aa] == [x.detected_at for x in ab]


def pattern_and_lone_outliers():
    """Gaussian 8-d; from event 2500 a far pattern (one point, tiny noise) every 100 events,
    and between its repeats lone outliers as far out, each in its own direction."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(6000, 8)).astype(np.float32)
    pattern = np.arange(2500, 5500, 100)
    X[pattern] = np.float32(5.0) + rng.normal(size=(len(pattern), 8)).astype(np.float32) * np.float32(0.05)
    lone = np.arange(2550, 5550, 100)
    d = rng.normal(size=(len(lone), 8))
    X[lone] = (14.0 * d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
    return X, pattern, lone


def test_a_recurring_pattern_joins_the_reference_after_its_repeats_and_lone_outliers_never_do():
    X, pattern, lone = pattern_and_lone_outliers()
    off = SourceMonitor(alpha=0.01, drift=False)
    flags_off, _, _, _ = run(off, X)
    assert flags_off[pattern].all()  # without it: flagged at every repeat, for ever
    mon = SourceMonitor(alpha=0.01, drift=False, admit_repeats=3)
    first = run(mon, X[:3520])  # the pattern's first ten repeats
    assert {f"e{i}" for i in pattern[:3]} <= set(mon.detector.index.ids())
    rest = run(mon, X[3520:], start=3520)
    flags, warm = (np.concatenate([a, b]) for a, b in zip(first[:2], rest[:2]))
    assert flags[pattern[:3]].all()
    assert not flags[pattern[-10:]].any()
    assert not set(mon.detector.index.ids()) & {f"e{i}" for i in lone}
    normal = np.ones(len(X), bool)
    normal[pattern] = normal[lone] = False
    assert flags[~warm & normal].mean() <= 0.02


def test_state_round_trip_keeps_the_flagged_events_waiting_for_repeats():
    X, _, _ = pattern_and_lone_outliers()
    a = SourceMonitor(alpha=0.01, drift=False, admit_repeats=3)
    run(a, X[:2640])  # two repeats of the pattern flagged, not yet admitted
    assert len(a.get_state()["flagged_ids"]) >= 2
    b = SourceMonitor(alpha=0.01, drift=False, admit_repeats=3)
    b.set_state(a.get_state())
    fa, _, pa, _ = run(a, X[2640:])
    fb, _, pb, _ = run(b, X[2640:])
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(fa, fb)
    c = SourceMonitor(alpha=0.01, drift=False, admit_repeats=3)
    older = {k: v for k, v in a.get_state().items() if not k.startswith("flagged_")}
    c.set_state(older)  # a state saved before admit_repeats loads, with no flagged event kept
    assert c.get_state()["flagged_ids"] == []



@pytest.mark.parametrize(("aggregate", "k", "trees", "against"),
                         [("mean", 10, 50, "kernels"), ("max", 5, 9, "kernels"), ("mean", 13, 128, "kernels"),
                          ("mean", 10, 50, "numpy"), ("max", 7, 20, "numpy")])
def test_the_compiled_forest_step_scores_as_the_numpy_path_bit_for_bit(aggregate, k, trees, against, monkeypatch):
    # SourceMonitor._score_compiled (detectors.kernels.knn_forest_step) against the same
    # monitor without it ("kernels": the other kernels on) or the NumPy path everywhere
    # (NWATCH_SCAN_KERNEL=0) on one stream: every block's scores, p-values, decisions,
    # components, distances and neighbours equal, with rows past the calibration sets' tops
    # (the NumPy tail), zero-inflated columns, and ("kernels") blocks of one repeated row,
    # searched once. (Against NumPy the repeated rows are left out: with more exact copies
    # in the reference than candidates, NumPy's scan and the compiled one name different
    # copies at the same distance.)
    from detectors import kernels

    rng = np.random.default_rng(k)
    X = np.zeros((3_000, 12), np.float32)
    X[:, :7] = rng.standard_normal((3_000, 7)) * np.exp(rng.normal(size=7))
    X[rng.random(X.shape) < 0.2] = 0.0
    if against == "kernels":
        X[1_500::3] = X[1_500]
    X[2_000::97] += 40.0  # far out on both components
    kwargs = dict(k=k, aggregate=aggregate, forest_trees=trees, min_reference=200, calibration_size=500,
                  drift_block=50, seed=2)
    monitors = {on: SourceMonitor(**kwargs) for on in (True, False)}
    calls = []
    step = kernels.knn_forest_step

    def counted(*args, **kw):
        out = step(*args, **kw)
        calls.append(out[-1])
        return out

    monkeypatch.setattr(kernels, "knn_forest_step", counted)
    for start in range(0, len(X), 32):
        block = X[start : start + 32]
        ids = [str(i) for i in range(start, start + len(block))]
        got = {}
        for on, m in monitors.items():
            if against == "kernels":
                monkeypatch.setattr(m, "_score_compiled", m._score_compiled if on else lambda X: None)
            monkeypatch.setattr(kernels, "enabled", on or against == "kernels")
            got[on] = m.process(block, ids)
        a, b = got[True], got[False]
        for name in ("scores", "p_values", "is_anomaly", "learned", "warming_up", "distances", "components"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None) and (x is None or (x.dtype == y.dtype and np.array_equal(x, y))), name
        assert a.neighbour_ids == b.neighbour_ids
        assert [x.detected_at for x in a.drift_alarms] == [x.detected_at for x in b.drift_alarms]
    assert len(calls) > 60 and True in calls and False in calls  # both its paths were taken
    assert monitors[True].anomalies == monitors[False].anomalies > 0

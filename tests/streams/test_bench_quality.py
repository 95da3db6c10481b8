"""The pieces of ``nwatch bench quality``: metrics against scikit-learn, stream building,
baseline adapters, the replay and the report, on small made-up data. The bench on the
real data runs behind the ``data`` marker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.events import decode_event
from streams.config import Settings
from streams.quality_metrics import alarm_figures, drift_timing, pr_auc, roc_auc, roc_curve
from streams.quality_streams import (
    audio_stream,
    drift_scenario,
    hdfs_stream,
    tabular_stream,
    text_lines,
    vector_stream,
)

sk = pytest.importorskip("sklearn.metrics")


def _toy(seed: int, n: int = 300, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.1
    s = rng.normal(size=n) + 1.5 * y
    if ties:
        s = np.round(s, 1)
    return y.astype(int), s


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_roc_and_pr_auc_match_sklearn(seed, ties):
    y, s = _toy(seed, ties=ties)
    assert roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert pr_auc(y, s) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)


def test_roc_curve_matches_sklearn():
    y, s = _toy(3, ties=True)
    fpr, tpr = roc_curve(y, s)
    ref_fpr, ref_tpr, _ = sk.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)


def test_alarm_figures_match_sklearn():
    y, s = _toy(4)
    flagged = s > 1.0
    a = alarm_figures(y, flagged)
    assert a.recall == pytest.approx(sk.recall_score(y, flagged))
    assert a.precision == pytest.approx(sk.precision_score(y, flagged))
    assert a.f1 == pytest.approx(sk.f1_score(y, flagged))
    assert a.false_alarm_rate == pytest.approx(flagged[y == 0].mean())


def test_auc_undefined_without_both_classes():
    assert np.isnan(roc_auc(np.zeros(5), np.arange(5.0)))
    assert np.isnan(pr_auc(np.zeros(5), np.arange(5.0)))


def test_drift_timing_counts_delay_misses_and_false_alarms():
    t = drift_timing(1000, [400, 1150, 1600], max_delay=300)
    assert (t.detected, t.delay, t.false_alarms) == (True, 150, 1)
    late = drift_timing(1000, [1400], max_delay=300)
    assert (late.detected, late.delay, late.false_alarms) == (False, 400, 0)
    assert drift_timing(1000, [1000]).detected is False  # an alarm at the change saw no changed event
    none = drift_timing(None, [700, 900])
    assert (none.detected, none.false_alarms) == (False, 2)


def _decode(lines):
    return [decode_event(line, arrival_ts=0.0) for line in lines]


def test_tabular_stream_is_a_seeded_shuffle_of_valid_transactions():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 3)), (rng.random(50) < 0.2).astype(int)
    a = tabular_stream("toy", X, y, seed=1, max_events=40)
    b = tabular_stream("toy", X, y, seed=1, max_events=40)
    assert a.lines == b.lines and len(a.lines) == 40
    events = _decode(a.lines)
    assert all(e.kind == "transaction" for e in events)
    # each event carries its own row and label, in the stream's order
    for e, row, label in zip(events, a.X, a.labels):
        i = int(e.id[1:])
        np.testing.assert_allclose(row, X[i])
        assert label == y[i]
    assert sorted(int(e.id[1:]) for e in events) != list(range(40))  # shuffled, not a prefix


def test_vector_stream_events_round_trip():
    X = np.random.default_rng(1).normal(size=(20, 8))
    s = vector_stream("v", X, np.zeros(20, int), seed=0, max_events=100)
    events = _decode(s.lines)
    np.testing.assert_allclose(np.stack([e.payload for e in events]), s.X, atol=1e-6)


def test_the_reports_opt_in_run_of_the_bert_vectors_lays_its_settings_over_the_callers():
    from streams.bench_quality import OPT_IN, opt_in_label, opt_in_settings
    from streams.config import Settings

    X = np.random.default_rng(2).normal(size=(10, 4))
    assert vector_stream("20news_3_bert", X, np.zeros(10, int), seed=0, max_events=10).source == "bert"
    assert vector_stream("cifar10_0_resnet18", X, np.zeros(10, int), seed=0, max_events=10).source == "vec"
    default = Settings()
    assert default.source("bert", "vector").monitor_kwargs("vector")["scorer"] == "knn"  # targets: defaults
    extra = opt_in_settings(default, OPT_IN["20news_3_bert"])
    assert extra.source("bert", "vector").monitor_kwargs("vector")["scorer"] == "mahalanobis"
    assert extra.source("vec", "vector").monitor_kwargs("vector")["scorer"] == "knn"
    theirs = opt_in_settings(Settings(sources={"bert": {"k": 5}}), OPT_IN["20news_3_bert"])
    assert theirs.source("bert", "vector").monitor_kwargs("vector")["scorer"] == "mahalanobis"
    assert theirs.source("bert", "vector").monitor_kwargs("vector")["k"] == 5
    assert opt_in_label(OPT_IN["20news_3_bert"]) == "opt-in: scorer mahalanobis, metric l2"


def test_hdfs_stream_counts_templates_per_block(tmp_path: Path):
    rows = [
        {"block_id": "blk_1", "label": 0, "templates": ["A <*>", "B", "A <*>"]},
        {"block_id": "blk_2", "label": 1, "templates": ["C"]},
    ]
    (tmp_path / "session_train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "session_test.jsonl").write_text(json.dumps(rows[1]) + "\n")
    s = hdfs_stream(tmp_path)
    assert s.labels.tolist() == [0, 1]
    events = _decode(s.lines)
    assert events[0].kind == "transaction"
    assert s.X.tolist() == [[2, 1, 0], [0, 0, 1]]
    assert b'"A <*>":2.0' in s.lines[0]


def test_drift_scenario_marks_the_change_and_no_change_keeps_one_population():
    before = [f"b{i}" for i in range(100)]
    after = [f"a{i}" for i in range(100)]
    s = drift_scenario("x", before, after, to_lines=text_lines, n_before=30, n_after=20, seed=0)
    texts = [e.payload for e in _decode(s.lines)]
    assert s.change_at == 30
    assert all(t.startswith("b") for t in texts[:30]) and all(t.startswith("a") for t in texts[30:])
    n = drift_scenario("y", before, None, to_lines=text_lines, n_before=30, n_after=20, seed=0)
    assert n.change_at is None and len(n.lines) == 50
    assert len(set(e.payload for e in _decode(n.lines))) == 50  # drawn without replacement


def test_audio_stream_has_every_fault_after_a_normal_warmup():
    s = audio_stream(seed=0, normals=12, per_fault=2, warmup=6, seconds=0.25)
    assert len(s.lines) == 18
    assert set(s.classes[:6]) == {""}
    assert sorted(c for c in s.classes if c) == ["bearing", "bearing", "clicks", "clicks", "resonance", "resonance"]
    assert s.labels.tolist() == [int(bool(c)) for c in s.classes]
    assert all(e.kind == "audio" for e in _decode(s.lines))


def test_pyod_knn_adapter_is_the_fifth_neighbour_distance():
    pytest.importorskip("pyod")
    from sklearn.neighbors import NearestNeighbors

    from streams.quality_baselines import pyod_knn

    X = np.random.default_rng(2).normal(size=(200, 4))
    dist, _ = NearestNeighbors(n_neighbors=6).fit(X).kneighbors(X)  # itself first
    np.testing.assert_allclose(pyod_knn(X), dist[:, 5], rtol=1e-6)


@pytest.mark.parametrize("name", ["HST", "PyOD IForest"])
def test_streaming_and_forest_baselines_rank_far_outliers_first(name):
    pytest.importorskip("pyod")
    from streams.quality_baselines import BASELINES

    rng = np.random.default_rng(3)
    X = rng.uniform(0.4, 0.6, size=(600, 3))
    out = np.arange(300, 600, 30)  # after HST's first window, so it has a model
    X[out] = rng.uniform(0.0, 0.05, size=(len(out), 3))
    y = np.zeros(600, int)
    y[out] = 1
    scores = BASELINES[name](X, seed=0)
    assert scores.shape == (600,)
    judged = np.arange(600) >= 300
    assert roc_auc(y[judged], scores[judged]) > 0.9


def test_replay_figures_and_report_on_a_synthetic_stream(tmp_path: Path):
    pytest.importorskip("matplotlib")
    from streams.bench_quality import figures, replay
    from streams.quality_report import to_json, write_report

    rng = np.random.default_rng(5)
    X = rng.normal(size=(1200, 4))
    y = np.zeros(1200, int)
    y[600::50] = 1
    X[y == 1] += 6.0  # far from every normal row
    stream = tabular_stream("toy", X, y, seed=0, max_events=1200)
    run = replay(stream, Settings())
    fig = figures(stream.labels, run)
    assert fig["events"] == 1200 and fig["warmup_events"] > 0
    assert fig["roc_auc_judged"] > 0.9
    results = {"toy": {"group": "tabular", "seeds": 1, "nwatch": fig, "by_seed": [fig], "baselines": {},
                       "published": {}, "plot": {"y": stream.labels, "nwatch": run["scores"]}}}
    doc = to_json(results, Settings(), seeds=1, max_events=1200, seconds=1.0)
    path = write_report(results, doc, tmp_path)
    text = path.read_text()
    assert "| toy |" in text and "quality/roc.png" in text
    assert (tmp_path / "quality" / "roc.png").stat().st_size > 0
    saved = json.loads((tmp_path / "quality" / "quality.json").read_text())
    assert saved["streams"]["toy"]["nwatch"]["events"] == 1200
    assert "plot" not in saved["streams"]["toy"]


@pytest.mark.data
def test_bench_on_cardio_writes_a_report_that_beats_chance(tmp_path: Path, data_dir: Path):
    pytest.importorskip("pyod")
    from streams.bench_quality import main

    assert main(data_dir=str(data_dir), seeds=1, only=["cardio"], out=str(tmp_path)) == 0
    doc = json.loads((tmp_path / "quality" / "quality.json").read_text())
    r = doc["streams"]["6_cardio"]
    assert r["nwatch"]["events"] == 1831
    assert r["nwatch"]["roc_auc"] > 0.5
    assert set(r["baselines"]) == {"HST", "PyOD KNN", "PyOD IForest"}
    assert r["published"]["KNN_roc"] == pytest.approx(0.7664)

"""The pieces of ``nwatch bench speed``: streams built from data, the measuring loops, the figures.

No timing is asserted: only that the loops count what they ran, the streams
decode as the pipeline's events, and the statistics are computed right.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from models.text import HashingTextBackend
from streams.bench_kafka import percentiles, saturation_rate
from streams.bench_speed import (
    Row,
    feature_dicts,
    bench_index_memory,
    format_table,
    log_lines,
    make_pipeline,
    pairwise_rank_correlation,
    run_pipeline,
    run_river,
    tabular_lines,
    text_lines,
)
from streams.cli import build_parser


@pytest.fixture
def X(rng) -> np.ndarray:
    return rng.normal(size=(600, 5))


@pytest.mark.parametrize("kind", ["transaction", "vector"])
def test_tabular_lines_are_events_the_pipeline_scores_without_rejects(X, kind):
    lines = tabular_lines(X, kind=kind)
    assert len(lines) == 600 and orjson.loads(lines[3])["id"] == "r3"
    result = make_pipeline().process_raw(lines[:300])
    assert not result.rejects and len(result.scores) == 300


def test_run_pipeline_times_only_the_events_after_warm_up(X):
    lines = tabular_lines(X, kind="vector")
    timed, seconds, scored = run_pipeline(make_pipeline(), lines, warmup=250, batch=64)
    assert timed == 350 and scored == 600 and seconds > 0


def test_run_river_scores_and_learns_each_event_once():
    class Counting:
        def __init__(self):
            self.scored, self.learnt = [], []

        def score_one(self, x):
            self.scored.append(x)
            return 0.0

        def learn_one(self, x):
            self.learnt.append(x)

    xs = feature_dicts(np.arange(40.0).reshape(20, 2))
    model = Counting()
    timed, _ = run_river(model, xs, warmup=5)
    assert timed == 15 and model.scored == xs and model.learnt == xs
    assert xs[1] == {"f0": 2.0, "f1": 3.0}


def test_log_lines_replay_the_file_with_fresh_ids_and_strip_the_loghub_label(tmp_path):
    f = tmp_path / "x.log"
    f.write_text("- 1117838570 2005.06.03 R02 RAS KERNEL INFO ok\nAPPREAD 1 2 R03 RAS APP FATAL bad\n")
    lines = [orjson.loads(x) for x in log_lines(f, source="bgl", passes=3, loghub_label=True)]
    assert len(lines) == 6 and len({d["id"] for d in lines}) == 6
    assert lines[0]["line"].startswith("1117838570") and lines[3]["line"] == lines[1]["line"]


def test_text_pipeline_runs_on_a_stand_in_backend():
    backend = HashingTextBackend(dim=32)
    p = make_pipeline(lambda: backend)
    lines = text_lines(["card declined", "refund please", "card declined"] * 100)
    timed, _, scored = run_pipeline(p, lines, warmup=0)
    assert timed == scored == 300


def test_rank_correlation_is_one_for_the_same_embedding_and_lower_for_noise(rng):
    A = rng.normal(size=(30, 16))
    assert pairwise_rank_correlation(A, A * 3.0) == pytest.approx(1.0)
    assert pairwise_rank_correlation(A, rng.normal(size=(30, 16))) < 0.5


def test_percentiles_are_in_milliseconds():
    p = percentiles([i / 1000 for i in range(1, 101)])
    assert p["p50_ms"] == pytest.approx(50.5) and p["p99_ms"] == pytest.approx(99.01) and p["max_ms"] == 100
    assert np.isnan(percentiles([])["p99_ms"])


def test_saturation_rate_counts_intervals_after_the_skipped_events():
    stamps = [0, 0, 0] + [1000 + 10 * i for i in range(101)]  # 100 events in 1 s after 3 skipped
    assert saturation_rate(stamps[::-1], skip=3) == pytest.approx(100.0)
    assert np.isnan(saturation_rate([1, 2], skip=3))


def test_table_shows_our_rate_over_each_baseline():
    rows = [Row("w", "neighbourwatch", 1000, 1.0), Row("w", "river x", 100, 1.0)]
    lines = format_table(rows)
    assert "10.0x" in lines[2]
    assert not any(t.endswith("x") for t in lines[1].split()[2:])  # no ratio on our own row


def test_index_memory_is_measured_in_a_fresh_interpreter_per_index():
    # in this process, memory freed by earlier tests would be reused and hide the growth
    exact, graph = bench_index_memory(n=20_000, dims=(32,))
    assert exact["backend"] == "exact" and graph["backend"] == "hnsw"
    assert exact["raw_vectors_bytes"] == graph["raw_vectors_bytes"] == 20_000 * 32 * 4
    assert exact["graph_bytes"] == 0 and graph["graph_bytes"] == 20_000 * 33 * 4
    assert exact["rss_growth_bytes"] > 0.5 * exact["raw_vectors_bytes"]
    assert graph["rss_growth_bytes"] > exact["rss_growth_bytes"]


def test_bench_speed_is_a_bench_choice():
    args = build_parser().parse_args(["bench", "speed", "--only", "tabular", "--events", "5000", "--kafka"])
    assert args.what == "speed" and args.only == ["tabular"] and args.events == 5000 and args.kafka


def test_cpu_seconds_counts_this_process_and_nan_for_none():
    import os
    import time

    from streams.bench_kafka import cpu_seconds

    before = cpu_seconds(os.getpid())
    end = time.process_time() + 0.3
    while time.process_time() < end:  # busy for 0.3 s of CPU
        pass
    after = cpu_seconds(os.getpid())
    assert after - before >= 0.2
    assert np.isnan(cpu_seconds(None))


def test_shuttle_lines_repeat_the_rows_with_fresh_ids(X):
    from streams.bench_kafka import shuttle_lines

    once, twice = shuttle_lines(X), shuttle_lines(X, 2)
    assert twice[: len(once)] == once
    ids = [orjson.loads(line)["id"] for line in twice]
    assert len(set(ids)) == 2 * len(X)  # no id comes back: each repeat is new events to the worker's dedup
    first, again = orjson.loads(twice[0]), orjson.loads(twice[len(X)])
    assert first["fields"] == again["fields"] and first["id"] != again["id"]

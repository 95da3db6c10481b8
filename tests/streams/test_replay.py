"""End to end: the sample stream of every kind, with broken lines, through the replay pipeline."""

from __future__ import annotations

import io
import subprocess
import sys

import orjson
import pytest

from models.text import HashingTextBackend
from streams.config import Settings, SourceSettings
from streams.pipeline import Pipeline
from streams.replay import replay
from streams.samples import BROKEN_LINES, SampleStream, valid_ids, write_sample_stream

SCORE_FIELDS = {"id", "source", "kind", "ts", "score", "p_value", "is_anomaly", "warming_up", "neighbours", "encoder"}
DRIFT_FIELDS = {"source", "kind", "ts", "detected_at", "events_seen", "statistic", "threshold",
                "reference_size", "window_size", "explanation", "encoder"}


@pytest.fixture(scope="module")
def sample() -> bytes:
    buf = io.BytesIO()
    write_sample_stream(buf, events=6000, seed=3, broken=len(BROKEN_LINES))
    return buf.getvalue()


def _run(data: bytes, batch_size: int = 256, settings: Settings | None = None):
    backend = HashingTextBackend(dim=64)
    pipe = Pipeline(settings=settings or Settings(), text_backend=lambda: backend)
    out, drift, rej = io.BytesIO(), io.BytesIO(), io.BytesIO()
    summary = replay(pipe, io.BytesIO(data), out=out, drift_out=drift, rejects=rej, batch_size=batch_size)
    parse = lambda b: [orjson.loads(x) for x in b.getvalue().splitlines()]  # noqa: E731
    return summary, parse(out), parse(drift), parse(rej), pipe


def test_every_valid_event_scored_once_with_every_field(sample):
    summary, scores, drifts, rejects, pipe = _run(sample)
    lines = sample.splitlines()
    expected = valid_ids(lines)
    assert len(expected) == 6000
    assert [s["id"] for s in scores] == expected  # once each, in file order
    for s in scores:
        assert SCORE_FIELDS <= s.keys()
        assert 0 < s["p_value"] <= 1 and s["score"] >= 0
        assert "@" in s["encoder"]
        assert not (s["warming_up"] and s["is_anomaly"])
        if s["is_anomaly"]:
            assert s["neighbours"] and all({"id", "distance"} <= n.keys() for n in s["neighbours"])
    assert {s["kind"] for s in scores} == {"transaction", "log", "text", "audio", "vector"}
    assert summary.events == 6000 and summary.lines == len(lines)


def test_every_broken_line_reported_with_its_reason(sample):
    summary, _, _, rejects, _ = _run(sample)
    expected = [reason for _, reason in BROKEN_LINES]
    assert sorted(r["reason"] for r in rejects) == sorted(expected)
    lines = sample.splitlines()
    for r in rejects:
        assert r["error"]
        assert lines[r["line"] - 1].decode("utf-8", "replace") == r["raw"]
    assert summary.rejects == len(BROKEN_LINES)


def test_anomalies_found_and_false_alarms_within_budget(sample):
    summary, scores, drifts, _, _ = _run(sample)
    judged = [s for s in scores if not s["warming_up"]]
    normal = [s for s in judged if s["label"] == 0]
    anomalous = [s for s in judged if s["label"] == 1]
    fpr = sum(s["is_anomaly"] for s in normal) / len(normal)
    assert fpr <= 0.02  # alpha 0.01, factor two
    recall = sum(s["is_anomaly"] for s in anomalous) / len(anomalous)
    assert recall >= 0.5, recall
    for d in drifts:
        assert DRIFT_FIELDS <= d.keys()
        assert d["explanation"]["exemplars"]


def test_results_do_not_depend_on_file_reading_beyond_batching(sample):
    a = _run(sample, batch_size=256)[1]
    b = _run(sample, batch_size=256)[1]
    assert a == b  # deterministic for a seed


@pytest.fixture(scope="module")
def long_sample() -> bytes:
    buf = io.BytesIO()
    write_sample_stream(buf, events=12_000, seed=4, broken=0, kinds=["transaction", "vector", "log"])
    return buf.getvalue()


def test_drift_of_the_sample_stream_is_found_after_the_change_point(long_sample):
    # cards and embeddings change at 60% of the stream; the logs do not change
    _, scores, drifts, _, _ = _run(long_sample)
    change = int(12_000 * 0.6)
    ids = [s["id"] for s in scores]
    by_source = {}
    for d in drifts:
        by_source.setdefault(d["source"], []).append(ids.index(d["detected_at"]))
    assert set(by_source) == {"cards", "embeddings"}, by_source
    for source, positions in by_source.items():
        assert len(positions) == 1, (source, positions)  # one alarm per drift
        assert change <= positions[0] <= change + 1500, (source, positions)


def test_sample_stream_is_deterministic():
    a = list(SampleStream(events=200, seed=1))
    b = list(SampleStream(events=200, seed=1))
    assert a == b and a != list(SampleStream(events=200, seed=2))


@pytest.mark.model
def test_cli_replay_with_the_real_model(tmp_path):
    src = tmp_path / "events.jsonl"
    with open(src, "wb") as f:
        write_sample_stream(f, events=1500, seed=5, broken=4)
    out, drift, rej = tmp_path / "s.jsonl", tmp_path / "d.jsonl", tmp_path / "r.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", "replay", str(src), "--out", str(out),
         "--drift-out", str(drift), "--rejects", str(rej)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "events scored 1,500" in proc.stderr and "rejected 4" in proc.stderr
    scores = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert len(scores) == 1500
    encoders = {s["kind"]: s["encoder"] for s in scores}
    assert encoders["text"].startswith("text-all-MiniLM-L6-v2@")
    assert encoders["log"].startswith("log-all-MiniLM-L6-v2@")
    assert len(rej.read_bytes().splitlines()) == 4


def test_cli_replay_reads_stdin_and_reports_rejects(tmp_path):
    data = b'{"id": "v1", "kind": "vector", "vector": [1, 2]}\nnot json\n\n{"id": "v2", "kind": "vector", "vector": [2, 1]}\n'
    rej = tmp_path / "r.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", "replay", "-", "--out", "-" if False else str(tmp_path / "o.jsonl"),
         "--rejects", str(rej)],
        input=data, capture_output=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rejects = [orjson.loads(x) for x in rej.read_bytes().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "not_json")]
    assert len((tmp_path / "o.jsonl").read_bytes().splitlines()) == 2


def test_cli_missing_file_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", "replay", str(tmp_path / "nope.jsonl")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1 and "nope.jsonl" in proc.stderr


def test_ctrl_c_ends_a_replay_with_whole_batches_written_and_says_where(sample):
    """Ctrl-C (KeyboardInterrupt while the input is read) returns the summary, marked interrupted,
    with ``lines`` the lines whose outputs are all written."""
    lines = sample.splitlines(keepends=True)[:95]

    def interrupted_input():
        for n, line in enumerate(lines, start=1):
            if n == 95:
                raise KeyboardInterrupt
            yield line

    backend = HashingTextBackend(dim=64)
    pipe = Pipeline(settings=Settings(), text_backend=lambda: backend)
    out, rej = io.BytesIO(), io.BytesIO()
    summary = replay(pipe, interrupted_input(), out=out, rejects=rej, batch_size=20)
    assert summary.interrupted
    assert summary.lines == 80  # four batches of 20 written; the fifth was being read
    scored = [orjson.loads(x)["id"] for x in out.getvalue().splitlines()]
    assert scored == valid_ids(lines[:80])
    assert summary.events == len(scored) and summary.rejects == len(rej.getvalue().splitlines())
    full = _run(b"".join(lines[:80]), batch_size=20)[0]
    assert not full.interrupted and full.lines == 80

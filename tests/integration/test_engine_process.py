"""The pipeline in its own process (``kafka.pipeline_path = "process"``) on the real broker.

What it must keep from the "thread" path: the same outputs (score records equal
to the in-process pipeline's on the same events, broken events dead-lettered
byte for byte with their reasons, the same /metrics counts); and a pipeline
process that dies stops the worker with a clear error, with no input offset
committed whose outputs were not produced.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.config import Settings
from streams.pipeline import Pipeline
from streams.runtime import stop_process_group
from streams.samples import BROKEN_LINES, sample_lines, valid_ids
from tests.integration.conftest import (
    end_run,
    free_port,
    produce_paced,
    read_topic,
    start_worker,
    wait_until_scored,
    worker_env,
    worker_scored,
    worker_topics,
)

pytestmark = pytest.mark.timeout(300)

KINDS = ["transaction", "vector", "log", "audio"]  # no text: the test's own pipeline need not load the model


def _engine_pid(worker: subprocess.Popen, timeout: float = 60.0) -> int:
    """The pid of the worker's pipeline process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(worker.pid)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, _, args = line.strip().partition(" ")
            if "streams.engine_process" in args:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError("no pipeline process")


def _start(broker, topics: dict[str, str], log_path, *args: str, **env: str) -> tuple:
    """``nwatch run [args]`` on the pipeline process path: (process, log file, metrics port)."""
    port = free_port()
    env = worker_env(broker.bootstrap_servers, topics, NWATCH_METRICS__PORT=str(port),
                     NWATCH_KAFKA__PIPELINE_PATH="process", **env)
    return *start_worker(env, log_path, *args), port


def test_outputs_equal_the_in_process_pipeline(broker, tmp_path):
    bootstrap = broker.bootstrap_servers
    topics = worker_topics(bootstrap, "e")
    lines = list(sample_lines(events=2500, seed=31, broken=len(BROKEN_LINES), kinds=KINDS))
    produce_paced(bootstrap, topics["events"], lines)
    expected_ids = valid_ids(lines)

    worker, log, port = _start(broker, topics, tmp_path / "worker.log", "--loglevel", "info")
    try:
        engine = _engine_pid(worker)
        deadline = time.monotonic() + 200
        scores: list = []
        while time.monotonic() < deadline:
            scores = read_topic(bootstrap, topics["scores"])
            if len({orjson.loads(r.value)["id"] for r in scores}) >= len(expected_ids):
                break
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(1)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        code = stop_process_group(worker, timeout=60)
        log.close()
    assert code in (0, -15)
    with pytest.raises(ProcessLookupError):  # stopped with the worker
        os.kill(engine, 0)
    # The worker's --loglevel holds in the pipeline process: its state logs a fresh start at INFO.
    assert "no snapshot; starting afresh" in (tmp_path / "worker.log").read_text(errors="replace")

    # The same records as the pipeline of this process on the same events, in input order.
    pipeline = Pipeline(settings=Settings(), merge_shards=False)
    want = [rec.to_dict() for i in range(0, len(lines), 256) for _, rec in pipeline.process_raw(lines[i:i + 256]).scores]
    got = list({d["id"]: d for d in (orjson.loads(r.value) for r in scores)}.values())
    assert [d["id"] for d in got] == expected_ids
    assert got == want

    dlq = read_topic(bootstrap, topics["dlq"])
    assert sorted(dict(r.headers)["nwatch-error-reason"].decode() for r in dlq) == sorted(r for _, r in BROKEN_LINES)
    broken = {raw for raw in lines if not raw.startswith(b'{"id":"')}
    for r in dlq:
        h = dict(r.headers)
        assert r.value in broken and h["nwatch-source-topic"].decode() == topics["events"]
        assert lines[int(h["nwatch-source-offset"])] == r.value  # the offset named is the message's

    # /metrics as on the thread path: counted in the pipeline process, applied in the worker
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert sum(v for (n, _), v in samples.items() if n == "nwatch_events_total") == len(scores)
    assert sum(v for (n, _), v in samples.items() if n == "nwatch_rejected_total") == len(BROKEN_LINES)
    assert sum(v for (n, _), v in samples.items() if n == "nwatch_end_to_end_seconds_count") == len(scores)
    assert samples[("nwatch_reference_size", (("kind", "vector"), ("source", "embeddings")))] > 0
    # the state's own metrics come from the pipeline process: the partition's first snapshot
    assert samples[("nwatch_snapshots_total", (("outcome", "written"),))] >= 1


def test_a_killed_pipeline_process_stops_the_worker_and_nothing_unproduced_is_committed(broker, tmp_path):
    """Killed mid-stream: the worker stops, its committed offset covers only scored events; the
    next worker restores the state the pipeline process saved (a snapshot loaded there, its
    anchor checked here) and scores the rest."""
    from kafka import KafkaConsumer, TopicPartition

    bootstrap = broker.bootstrap_servers
    topics = worker_topics(bootstrap, "k")
    lines = list(sample_lines(events=20_000, seed=32, broken=0, kinds=["transaction", "vector"]))
    stop, produced = threading.Event(), [0]
    producing = threading.Thread(target=produce_paced, args=(bootstrap, topics["events"], lines, 400.0),
                                 kwargs={"stop": stop, "counter": produced}, daemon=True)
    producing.start()
    state = {"NWATCH_STATE__DIR": str(tmp_path / "state"), "NWATCH_STATE__SNAPSHOT_INTERVAL": "1"}
    worker, log, port = _start(broker, topics, tmp_path / "worker.log", **state)
    try:
        engine = _engine_pid(worker)
        deadline = time.monotonic() + 120
        while worker_scored(port) < 1500 and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.2)
        os.kill(engine, signal.SIGKILL)  # mid-stream: events keep coming at 400 a second
        code = worker.wait(timeout=60)  # the worker stops by itself
    finally:
        end_run(worker, log, stop, producing)
    text = (tmp_path / "worker.log").read_text(errors="replace")
    assert code != 0, text[-3000:]
    assert "the pipeline process ended (exit code -9: SIGKILL, as the OOM killer sends" in text, text[-3000:]

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=f"g-{topics['events']}", enable_auto_commit=False)
    committed = consumer.committed(TopicPartition(topics["events"], 0)) or 0
    consumer.close()
    scored = {orjson.loads(r.value)["id"] for r in read_topic(bootstrap, topics["scores"])}
    assert 0 < committed < len(lines)
    first = [orjson.loads(x)["id"] for x in lines[:committed]]
    assert not [i for i in first if i not in scored], "offsets committed for events never scored"

    ids = {orjson.loads(x)["id"] for x in lines[:produced[0]]}
    worker, log, _ = _start(broker, topics, tmp_path / "worker-2.log", **state)
    try:
        scored = wait_until_scored(bootstrap, topics["scores"], ids, worker, tmp_path / "worker-2.log", 120)
    finally:
        stop_process_group(worker, timeout=30)
        log.close()
    assert not ids - scored, f"{len(ids - scored)} events never scored"
    assert "restored" in (tmp_path / "worker-2.log").read_text(errors="replace")

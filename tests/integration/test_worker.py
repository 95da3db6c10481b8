"""The worker end to end on the real broker: every event scored or dead-lettered, drift and metrics.

The worker runs as ``nwatch run`` in a child process, exactly as deployed; events
go in through kafka-python, results are read back without a consumer group
(manual assignment), so nothing waits for a group join but the worker itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from streams.broker import ensure_topics
from streams.samples import BROKEN_LINES, sample_lines

pytestmark = pytest.mark.timeout(400)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_all(bootstrap: str, topic: str) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    out = []
    while True:
        batch = consumer.poll(timeout_ms=1000, max_records=5000)
        if not batch:
            break
        for records in batch.values():
            out.extend(records)
    consumer.close()
    return out


@pytest.fixture
def topics(broker):
    suffix = uuid.uuid4().hex[:8]
    names = {n: f"t{suffix}.{n}" for n in ("events", "scores", "anomalies", "drift", "alerts", "dlq")}
    ensure_topics(broker.bootstrap_servers, list(names.values()) + [f"{names['alerts']}.dlq"])
    return names


def test_worker_scores_every_event_and_dead_letters_broken_ones(broker, topics, tmp_path):
    bootstrap = broker.bootstrap_servers
    mixed = list(sample_lines(events=1500, seed=11, broken=len(BROKEN_LINES)))
    # a longer stream of the embeddings source alone, drifting at 60%
    vectors = [
        line.replace(b'"id":"embeddings-', b'"id":"embeddings-long-', 1)
        for line in sample_lines(events=3000, seed=12, broken=0, kinds=["vector"])
    ]
    lines = mixed + vectors
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=10)
    for line in lines:
        try:
            key = orjson.loads(line).get("source", "").encode() or None
        except Exception:
            key = None
        producer.send(topics["events"], key=key, value=line)
    producer.flush()
    producer.close()

    valid_ids = []
    for line in lines:
        try:
            d = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(d, dict) and "id" in d and not str(d["id"]).startswith("broken"):
            valid_ids.append(d["id"])

    port = _free_port()
    env = dict(os.environ)
    env.update({
        "NWATCH_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "NWATCH_KAFKA__INPUT_TOPICS": f'["{topics["events"]}"]',
        "NWATCH_KAFKA__SCORES_TOPIC": topics["scores"],
        "NWATCH_KAFKA__ANOMALIES_TOPIC": topics["anomalies"],
        "NWATCH_KAFKA__DRIFT_TOPIC": topics["drift"],
        "NWATCH_KAFKA__ALERTS_TOPIC": topics["alerts"],
        "NWATCH_KAFKA__DLQ_TOPIC": topics["dlq"],
        "NWATCH_KAFKA__GROUP_ID": f"g-{topics['events']}",
        "NWATCH_METRICS__PORT": str(port),
    })
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "streams.cli", "run"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        scores = []
        while time.monotonic() < deadline:
            scores = _read_all(bootstrap, topics["scores"])
            if len(scores) >= len(valid_ids):
                break
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(2)
        ids = [orjson.loads(r.value)["id"] for r in scores]
        assert sorted(set(ids)) == sorted(valid_ids)  # every valid event scored (duplicates allowed)
        for r in scores[:50]:
            assert r.key == orjson.loads(r.value)["source"].encode()

        dlq = _read_all(bootstrap, topics["dlq"])
        reasons = sorted(dict(r.headers)["nwatch-error-reason"].decode() for r in dlq)
        assert reasons == sorted(reason for _, reason in BROKEN_LINES)
        broken_raw = {raw for raw in lines if not raw.startswith(b'{"id":"')}  # valid lines are orjson's
        for r in dlq:
            h = dict(r.headers)
            assert h["nwatch-source-topic"].decode() == topics["events"]
            assert int(h["nwatch-source-offset"]) >= 0 and h["nwatch-error"]
            assert r.value in broken_raw  # the original bytes

        anomalies = [orjson.loads(r.value) for r in _read_all(bootstrap, topics["anomalies"])]
        assert anomalies and all(a["is_anomaly"] for a in anomalies)
        drifts = [orjson.loads(r.value) for r in _read_all(bootstrap, topics["drift"])]
        assert any(d["source"] == "embeddings" for d in drifts)
        alerts = _read_all(bootstrap, topics["alerts"])
        assert len(alerts) >= len(anomalies) + len(drifts) - 2  # one per anomaly/drift (dedup by key)

        time.sleep(6)  # one lag reading (every 5 s)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples
        }
        scored_events = sum(v for (n, _), v in samples.items() if n == "nwatch_events_total")
        assert scored_events == len(scores)
        rejected = sum(v for (n, _), v in samples.items() if n == "nwatch_rejected_total")
        assert rejected == len(BROKEN_LINES)
        assert any(n == "nwatch_consumer_lag" for n, _ in samples)
        assert samples[("nwatch_reference_size", (("kind", "vector"), ("source", "embeddings")))] > 0
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        log.close()
    assert worker.returncode in (0, -signal.SIGTERM)

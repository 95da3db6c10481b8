"""The worker end to end on the real broker: every event scored or dead-lettered, drift and metrics.

The worker runs as ``nwatch run`` in a child process, exactly as deployed; events
go in through kafka-python, results are read back without a consumer group
(manual assignment), so nothing waits for a group join but the worker itself.
"""

from __future__ import annotations

import time
import urllib.request

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.runtime import stop_process_group
from streams.samples import BROKEN_LINES, sample_lines, valid_ids
from tests.integration.conftest import (
    free_port,
    produce_paced,
    read_topic,
    start_worker,
    wait_until_scored,
    worker_env,
    worker_topics,
)

pytestmark = pytest.mark.timeout(400)


def produce_lines(bootstrap: str, topic: str, lines: list[bytes]) -> None:
    produce_paced(bootstrap, topic, lines)


@pytest.mark.parametrize(("input_path", "output_path"), [("faust", "aiokafka"), ("aiokafka", "aiokafka"), ("aiokafka", "faust")],
                         ids=["faust", "aiokafka", "aiokafka-faust-output"])
def test_worker_scores_every_event_and_dead_letters_broken_ones(broker, tmp_path, input_path, output_path):
    bootstrap = broker.bootstrap_servers
    topics = worker_topics(bootstrap, "t")
    mixed = list(sample_lines(events=1500, seed=11, broken=len(BROKEN_LINES)))
    # a longer stream of the embeddings source alone, drifting at 60%
    vectors = [
        line.replace(b'"id":"embeddings-', b'"id":"embeddings-long-', 1)
        for line in sample_lines(events=3000, seed=12, broken=0, kinds=["vector"])
    ]
    lines = mixed + vectors
    produce_lines(bootstrap, topics["events"], lines)
    expected = valid_ids(lines)

    port = free_port()
    env = worker_env(bootstrap, topics, NWATCH_METRICS__PORT=str(port), NWATCH_KAFKA__INPUT_PATH=input_path,
                     NWATCH_KAFKA__OUTPUT_PATH=output_path)
    worker, log = start_worker(env, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 300
        scores = []
        while time.monotonic() < deadline:
            scores = read_topic(bootstrap, topics["scores"])
            if len(scores) >= len(expected):
                break
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(2)
        ids = [orjson.loads(r.value)["id"] for r in scores]
        assert sorted(set(ids)) == sorted(expected)  # every valid event scored (duplicates allowed)
        # one partition in, one out: results come out in input order, across batches too
        # (the aiokafka paths issue a batch's outputs whole and in pipeline order)
        first_seen = list(dict.fromkeys(ids))
        assert first_seen == expected
        for r in scores[:50]:
            assert r.key == orjson.loads(r.value)["source"].encode()

        dlq = read_topic(bootstrap, topics["dlq"])
        reasons = sorted(dict(r.headers)["nwatch-error-reason"].decode() for r in dlq)
        assert reasons == sorted(reason for _, reason in BROKEN_LINES)
        broken_raw = {raw for raw in lines if not raw.startswith(b'{"id":"')}  # valid lines are orjson's
        for r in dlq:
            h = dict(r.headers)
            assert h["nwatch-source-topic"].decode() == topics["events"]
            assert int(h["nwatch-source-offset"]) >= 0 and h["nwatch-error"]
            assert r.value in broken_raw  # the original bytes

        anomalies = [orjson.loads(r.value) for r in read_topic(bootstrap, topics["anomalies"])]
        assert anomalies and all(a["is_anomaly"] for a in anomalies)
        drifts = [orjson.loads(r.value) for r in read_topic(bootstrap, topics["drift"])]
        assert any(d["source"] == "embeddings" for d in drifts)
        alerts = read_topic(bootstrap, topics["alerts"])
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
        code = stop_process_group(worker, timeout=30)
        log.close()
    assert code in (0, -15)


def test_a_worker_starting_on_a_backlog_of_several_partitions_scores_every_event(broker, tmp_path):
    """The aiokafka input path keeps two batches in flight; at the start every partition is taken
    over (snapshot looked up, nothing to restore). A partition's take-over must start at the first
    event of it in flight, whichever batch asks first: a later batch of the same partition must not
    set where it starts, or the events before are taken for a snapshot's and never scored."""
    from tests.integration.test_chaos import _topics
    from tests.integration.test_scale_out import _spread

    bootstrap = broker.bootstrap_servers
    topics = _topics(bootstrap, partitions=6)
    lines = _spread(list(sample_lines(events=4000, seed=23, broken=0, kinds=["transaction", "vector"])))
    produce_lines(bootstrap, topics["events"], lines)  # a backlog on every partition before the worker starts
    ids = {orjson.loads(x)["id"] for x in lines}
    # ~670 events a partition, 1,024 a batch: the first batch ends inside its second partition
    env = worker_env(bootstrap, topics, NWATCH_METRICS__PORT=str(free_port()), NWATCH_KAFKA__INPUT_PATH="aiokafka",
                     NWATCH_KAFKA__INPUT_BATCH_SIZE="1024")
    worker, log = start_worker(env, tmp_path / "worker.log")
    try:
        scored = wait_until_scored(bootstrap, topics["scores"], ids, worker, tmp_path / "worker.log", 240)
    finally:
        stop_process_group(worker, timeout=30)
        log.close()
    assert not ids - scored, f"{len(ids - scored)} of {len(ids)} events never scored"

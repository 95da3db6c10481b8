"""``nwatch run`` as a user starts it, on the real broker: its log at the default level, the
``--metrics-port`` flag (DESIGN.md), and the start-up check of the cluster and its input topics."""

from __future__ import annotations

import logging
import time
import urllib.request

import pytest

from streams.config import KafkaSettings
from streams.runtime import stop_process_group
from streams.samples import sample_lines, valid_ids
from tests.integration.conftest import (
    free_port,
    produce_paced,
    start_worker,
    wait_until_scored,
    worker_env,
    worker_topics,
)

pytestmark = pytest.mark.timeout(300)


def test_default_log_level_holds_in_the_pipeline_process_and_metrics_port_flag(broker, tmp_path):
    """At the default level ("warning") neither the worker nor its pipeline process logs INFO or
    DEBUG lines, and no terminal codes go into the log (faust's spinner set the root logger to
    DEBUG, which the pipeline process took as the worker's level)."""
    bootstrap = broker.bootstrap_servers
    topics = worker_topics(bootstrap, "s")
    lines = list(sample_lines(events=300, seed=3, broken=0, kinds=["transaction", "vector"]))
    produce_paced(bootstrap, topics["events"], lines)
    port, unused = free_port(), free_port()
    env = worker_env(bootstrap, topics, NWATCH_METRICS__PORT=str(unused))
    log_path = tmp_path / "worker.log"
    worker, log = start_worker(env, log_path, "--metrics-port", str(port))
    try:
        scored = wait_until_scored(bootstrap, topics["scores"], set(valid_ids(lines)), worker, log_path, 200)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        stop_process_group(worker, timeout=60)
        log.close()
    assert scored == set(valid_ids(lines))
    assert "nwatch_events_total" in body
    text = log_path.read_text(errors="replace")
    assert f"metrics on http://127.0.0.1:{port}/metrics" in text
    assert " INFO " not in text and " DEBUG " not in text, text[-3000:]
    assert "\x1b[" not in text


def test_cluster_check_lists_topics_and_warns_of_a_missing_input_topic(broker, caplog):
    from streams.run import check_cluster

    topics = worker_topics(broker.bootstrap_servers, "c")
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers,
                             input_topics=(topics["events"], "missing." + topics["events"]))
    with caplog.at_level(logging.WARNING, logger="neighbourwatch"):
        found = check_cluster(settings)
    assert topics["events"] in found and topics["dlq"] in found
    warned = [r.getMessage() for r in caplog.records if "not on the cluster" in r.getMessage()]
    assert len(warned) == 1 and "missing." + topics["events"] in warned[0]
    assert f"input topic {topics['events']} " not in warned[0]
    caplog.clear()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="neighbourwatch"):
        check_cluster(KafkaSettings(bootstrap_servers=broker.bootstrap_servers, input_topics=(topics["events"],)))
    assert not [r for r in caplog.records if "not on the cluster" in r.getMessage()]
    assert time.monotonic() - t0 < 10

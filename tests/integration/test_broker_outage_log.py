"""The worker while its broker is away: each third-party message logged at most once per 30 s
(aiokafka's clients retry every ~50 ms and logged an ERROR line at each try: ~150 lines a second),
and a stop that fits a container's grace period."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from streams.broker import EmbeddedBroker, ensure_topics
from streams.runtime import stop_process_group
from streams.samples import sample_lines, valid_ids
from tests.integration.conftest import free_port, produce_paced, start_worker, wait_until_scored, worker_env

pytestmark = pytest.mark.timeout(300)

OUTAGE_SECONDS = 15.0  # shorter than the limiter's 30 s window: each message may show once


def test_broker_outage_does_not_flood_the_log(tmp_path):
    broker = EmbeddedBroker().start()
    try:
        bootstrap = broker.bootstrap_servers
        topics = {n: f"outage.{n}" for n in ("events", "scores", "anomalies", "drift", "alerts", "dlq")}
        ensure_topics(bootstrap, [*topics.values(), "outage.alerts.dlq"])
        lines = list(sample_lines(events=200, seed=5, broken=0, kinds=["vector"]))
        produce_paced(bootstrap, topics["events"], lines)
        log_path = tmp_path / "worker.log"
        worker, log = start_worker(worker_env(bootstrap, topics, NWATCH_METRICS__PORT=str(free_port())), log_path)
        try:
            assert wait_until_scored(bootstrap, topics["scores"], set(valid_ids(lines)), worker, log_path, 200)
            before = len(log_path.read_text(errors="replace").splitlines())
            broker.stop()
            time.sleep(OUTAGE_SECONDS)
            assert worker.poll() is None  # it waits for the broker
            during = log_path.read_text(errors="replace").splitlines()[before:]
        finally:
            t0 = time.monotonic()
            code = stop_process_group(worker, timeout=90)
            stopped_after = time.monotonic() - t0
            log.close()
    finally:
        broker.stop()
    # A stop with the broker away fits the compose stack's 30 s grace (faust's consumer thread had
    # mode's 60 s to stop: 62 s), and the worker exits by itself, not by the SIGKILL that follows.
    assert code in (0, -15) and stopped_after < 30, (code, stopped_after)
    # A message is its text without numbers (node ids, ports, errnos); tracebacks' lines are not messages.
    messages = Counter(re.sub(r"\d+", "N", line.split("] ", 3)[-1]) for line in during if line.startswith("["))
    assert messages, "the outage was not logged at all"
    assert max(messages.values()) <= 2, messages.most_common(5)

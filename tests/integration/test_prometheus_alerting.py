"""The operations stack end to end: worker -> Prometheus -> drift rule -> Alertmanager -> webhook.

Real processes on loopback, each on a free port with its own temporary config
and data directory: the Tansu broker (session fixture), ``nwatch run``,
Debian's ``prometheus`` and ``prometheus-alertmanager`` servers, and the webhook
receiver of the compose stack (deploy/receiver/webhook_receiver.py). Prometheus
loads deploy/prometheus/rules.yml unchanged; only the intervals are short here
(1 s scrapes and evaluations, 1 s group wait) so the test takes well under a
minute once the worker runs. Everything started is stopped in ``finally``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import orjson
import pytest
import yaml
from kafka import KafkaProducer

from streams.runtime import stop_process_group
from streams.samples import sample_lines
from tests.deploy.promql import DEPLOY, RULES, dashboard_exprs, substitute
from tests.integration.conftest import free_port, read_topic, start_worker, worker_env, worker_topics

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not (shutil.which("prometheus") and shutil.which("prometheus-alertmanager")),
        reason="Debian's prometheus/prometheus-alertmanager not installed (./dev test installs them)",
    ),
]

DRIFT_AT = 1800  # sample_lines(kinds=["vector"], events=3000) drifts at 60%


def produce(bootstrap: str, topic: str, lines: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=10)
    for line in lines:
        producer.send(topic, key=orjson.loads(line)["source"].encode(), value=line)
    producer.flush()
    producer.close()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def wait_ready(url: str, procs: dict[str, subprocess.Popen], logs: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited:\n" + (logs / f"{name}.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready in {timeout} s")


def query(prom: str, expr: str) -> list[dict]:
    doc = get_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert doc["status"] == "success", (expr, doc)
    return doc["data"]["result"]


def test_drift_rule_fires_through_alertmanager_to_a_webhook(broker, tmp_path):
    bootstrap = broker.bootstrap_servers
    topics = worker_topics(bootstrap, "prom")
    lines = list(sample_lines(events=3000, seed=12, broken=0, kinds=["vector"]))
    before, after = lines[:1500], lines[1500:]

    ports = {name: free_port() for name in ("receiver", "alertmanager", "prometheus", "metrics")}
    received = tmp_path / "notifications.jsonl"
    (tmp_path / "am").mkdir()
    (tmp_path / "prom").mkdir()
    (tmp_path / "am" / "alertmanager.yml").write_text(yaml.safe_dump({
        "route": {
            "receiver": "webhook", "group_by": ["alertname", "source"],
            "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h",
        },
        "receivers": [{"name": "webhook", "webhook_configs": [
            {"url": f"http://127.0.0.1:{ports['receiver']}/alerts", "send_resolved": False}]}],
    }))
    (tmp_path / "prom" / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],  # the deployed rules, unchanged
        "alerting": {"alertmanagers": [
            {"static_configs": [{"targets": [f"127.0.0.1:{ports['alertmanager']}"]}]}]},
        "scrape_configs": [{
            "job_name": "neighbourwatch",
            "static_configs": [{"targets": [f"127.0.0.1:{ports['metrics']}"]}],
        }],
    }))

    commands = {
        "receiver": [sys.executable, str(DEPLOY / "receiver" / "webhook_receiver.py"),
                     "--host", "127.0.0.1", "--port", str(ports["receiver"]), "--out", str(received)],
        "alertmanager": [
            "prometheus-alertmanager", f"--config.file={tmp_path / 'am' / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'am' / 'data'}",
            f"--web.listen-address=127.0.0.1:{ports['alertmanager']}",
            "--cluster.listen-address=",  # no HA gossip port
        ],
        "prometheus": [
            "prometheus", f"--config.file={tmp_path / 'prom' / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'prom' / 'data'}",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
            f"--web.external-url=http://127.0.0.1:{ports['prometheus']}/",  # the alerts' generatorURL
        ],
    }
    procs: dict[str, subprocess.Popen] = {}
    logs: list = []
    prom = f"http://127.0.0.1:{ports['prometheus']}"
    try:
        for name, cmd in commands.items():
            log = open(tmp_path / f"{name}.log", "wb")
            logs.append(log)
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs["worker"], wlog = start_worker(
            worker_env(bootstrap, topics, NWATCH_METRICS__PORT=str(ports["metrics"])), tmp_path / "worker.log")
        logs.append(wlog)
        wait_ready(f"http://127.0.0.1:{ports['alertmanager']}/-/ready", procs, tmp_path)
        wait_ready(f"{prom}/-/ready", procs, tmp_path)

        # Before the drift: Prometheus must have seen the drift counter at 0, or
        # increase() has no earlier sample to compare the alarm with.
        produce(bootstrap, topics["events"], before)
        deadline = time.monotonic() + 120
        selector = 'nwatch_drift_alarms_total{job="neighbourwatch",source="embeddings",kind="vector"}'
        while not query(prom, selector):
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            assert procs["worker"].poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(1)
        assert float(query(prom, selector)[0]["value"][1]) == 0
        assert not query(prom, 'ALERTS{alertname="NeighbourwatchDriftAlarm"}')
        time.sleep(2)  # a second scrape at 0

        produce(bootstrap, topics["events"], after)
        deadline = time.monotonic() + 120
        alerts: list[dict] = []
        while not alerts:
            assert time.monotonic() < deadline, "no drift alert reached the receiver:\n" + "\n".join(
                f"--- {n}\n" + (tmp_path / f"{n}.log").read_text()[-1500:] for n in procs)
            for name, proc in procs.items():
                assert proc.poll() is None, f"{name} exited:\n" + (tmp_path / f"{name}.log").read_text()[-3000:]
            if received.exists():
                for line in received.read_text().splitlines():
                    body = json.loads(line)["body"]
                    alerts += [a for a in body["alerts"] if a["labels"]["alertname"] == "NeighbourwatchDriftAlarm"]
            time.sleep(1)

        # Alertmanager's webhook notification, with the rule's labels and the
        # source the worker reported the drift on.
        notification = json.loads(received.read_text().splitlines()[0])
        assert notification["path"] == "/alerts"
        assert notification["body"]["receiver"] == "webhook"
        assert notification["body"]["version"] == "4"
        alert = alerts[0]
        assert alert["status"] == "firing"
        assert alert["labels"] == {
            "alertname": "NeighbourwatchDriftAlarm", "source": "embeddings", "kind": "vector",
            "severity": "warning",
        }
        assert alert["annotations"]["summary"] == "Drift on source embeddings (vector)"
        assert alert["generatorURL"].startswith(prom)

        # The alarm Prometheus saw is the one the worker published.
        drifts = [orjson.loads(r.value) for r in read_topic(bootstrap, topics["drift"])]
        assert [d["source"] for d in drifts] and {d["source"] for d in drifts} == {"embeddings"}
        firing = query(prom, 'ALERTS{alertname="NeighbourwatchDriftAlarm", alertstate="firing"}')
        assert [a["metric"]["source"] for a in firing] == ["embeddings"]
        deadline = time.monotonic() + 15  # the next scrapes catch up with the topic
        while True:
            drifts = [orjson.loads(r.value) for r in read_topic(bootstrap, topics["drift"])]
            stat = query(prom, 'sum(nwatch_drift_alarms_total{job="neighbourwatch"})')
            if float(stat[0]["value"][1]) == len(drifts) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert float(stat[0]["value"][1]) == len(drifts)

        # Every dashboard query runs on this Prometheus, and the main panels have data.
        empty = []
        for title, ref, expr in dashboard_exprs():
            if not query(prom, substitute(expr)):
                empty.append((title, ref))
        for title in ("Events/s by source", "Drift statistic vs threshold", "Reference size",
                      "kNN score quantiles", "p-value quantiles", "End-to-end latency", "Consumer lag"):
            assert title not in {t for t, _ in empty}, (title, empty)
        # both processes of the worker (A the worker, B its pipeline process; no producer process)
        for title in ("Resident memory per process", "CPU cores per process"):
            assert {(title, "A"), (title, "B")}.isdisjoint(empty), (title, empty)
        assert ("Worker restarts (30 min)", "A") not in empty, empty
    finally:
        for name, proc in reversed(list(procs.items())):
            stop_process_group(proc, timeout=20)
        for log in logs:
            log.close()
    assert all(p.returncode is not None for p in procs.values())

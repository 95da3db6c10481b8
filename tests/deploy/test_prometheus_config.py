"""The Prometheus and Alertmanager files of deploy/ checked by the real tools.

Debian bookworm's ``prometheus`` (2.42) gives promtool, ``prometheus-alertmanager``
(0.25) gives amtool; ``./dev test`` installs them when missing. Every alerting
rule must have a unit test that shows it firing and one that shows it silent,
and every recording rule a ``promql_expr_test``.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.deploy.promql import DEPLOY, RULES

PROM = DEPLOY / "prometheus"


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (./dev test installs Debian's prometheus packages)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def test_promtool_check_config():
    done = run("promtool", "check", "config", str(PROM / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout


def test_promtool_check_rules():
    done = run("promtool", "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_test_rules():
    done = run("promtool", "test", "rules", str(PROM / "rules_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_test_rules_fails_when_a_rule_changes(tmp_path):
    # The unit tests pin the thresholds: loosen one and they fail.
    (tmp_path / "rules.yml").write_text(RULES.read_text().replace(
        "increase(nwatch_rejected_total[10m])) > 10", "increase(nwatch_rejected_total[10m])) > 100"))
    shutil.copy(PROM / "rules_test.yml", tmp_path / "rules_test.yml")
    done = run("promtool", "test", "rules", str(tmp_path / "rules_test.yml"))
    assert done.returncode != 0
    assert "NeighbourwatchDeadLettersGrowing" in done.stdout + done.stderr


def test_every_rule_is_unit_tested_firing_and_silent():
    rules = yaml.safe_load(RULES.read_text())
    tests = yaml.safe_load((PROM / "rules_test.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    records = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    firing, silent, recorded = set(), set(), set()
    for case in tests["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else silent).add(t["alertname"])
        for t in case.get("promql_expr_test", []):
            recorded.add(t["expr"])
    assert alerts and alerts == firing == silent, (alerts - firing, alerts - silent)
    assert records <= recorded, records - recorded
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in ("info", "warning", "critical")
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_amtool_check_config():
    done = run("amtool", "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))
    assert done.returncode == 0, done.stdout + done.stderr

"""The Grafana dashboard and the rules only query series the worker really exports.

The exported names come from a real ``streams.metrics.Metrics`` fed a sample
stream (``promql.exported_series``), so renaming a metric in the code without
updating deploy/ fails here, and so does a panel on a misspelt name, a label a
metric does not have, a histogram quantile over anything but ``_bucket``, or a
``rate()`` over a gauge. Syntax is left to the real PromQL parser: every
dashboard query goes through ``promtool check rules`` as a recording rule.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.promql import (
    DEPLOY,
    Expr,
    dashboard,
    dashboard_exprs,
    exported_series,
    problems,
    recording_rules,
    rule_exprs,
    substitute,
)


@pytest.fixture(scope="module")
def exported() -> dict:
    return exported_series()


@pytest.fixture(scope="module")
def recorded() -> dict[str, set[str]]:
    return {name: Expr(expr).grouping for name, expr in recording_rules().items()}


def test_the_sample_run_exports_every_metric_family(exported):
    # The reference set must be complete, or a correct panel would look wrong.
    from streams.metrics import Metrics

    families = {f.name for f in Metrics().registry.collect()}
    for family in families:
        assert any(name.startswith(family) for name in exported), family
    assert exported["nwatch_score_bucket"][1] == {"source", "kind", "le"}
    assert exported["nwatch_events_total"][0] == "counter"
    assert {"text_encoder", "vector_encoder"} <= exported["nwatch_build_info"][1]


def test_every_dashboard_query_uses_exported_names(exported, recorded):
    checked = 0
    for title, ref, expr in dashboard_exprs():
        assert not problems(expr, exported, recorded), (title, ref, expr, problems(expr, exported, recorded))
        checked += 1
    assert checked >= 25


def test_every_rule_uses_exported_names(exported, recorded):
    for name, expr in rule_exprs():
        assert not problems(expr, exported, recorded), (name, problems(expr, exported, recorded))


def test_template_variable_and_legends_use_real_labels(exported):
    dash = dashboard()
    (var,) = dash["templating"]["list"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["definition"]).groups()
    assert label in exported[metric][1]
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            e = Expr(target["expr"])
            # {{label}} in a legend shows a label the query's result keeps
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert label in e.grouping, (panel["title"], label)


@pytest.mark.parametrize(
    "expr, complaint",
    [
        ('sum(rate(nwatch_event_total[5m]))', "no such series: nwatch_event_total"),
        ('histogram_quantile(0.5, sum by (le) (rate(nwatch_score[5m])))', "no such series: nwatch_score"),
        ('histogram_quantile(0.9, sum by (source) (rate(nwatch_score_bucket[5m])))', "without `by (..., le)`"),
        ('histogram_quantile(0.9, sum by (le) (rate(nwatch_score_sum[5m])))', "not a _bucket series"),
        ('rate(nwatch_drift_statistic[5m])', "not a counter"),
        ('nwatch_consumer_lag{source="cards"}', "has no label ['source']"),
        ('sum by (reason) (nwatch_events_total)', "grouping by labels no series has"),
        ('nwatch_anomalies', "no such series: nwatch_anomalies"),
    ],
)
def test_the_name_check_catches_wrong_queries(exported, recorded, expr, complaint):
    found = problems(expr, exported, recorded)
    assert any(complaint in p for p in found), found


def test_panels_are_well_formed():
    dash = dashboard()
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] and dash["title"]
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel.get("description"), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
    # what the issue asks the dashboard to show
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("events/s by source", "anomalies/s", "score quantiles", "p-value quantiles",
                  "drift statistic vs threshold", "reference size", "dead-lettered by reason",
                  "latency", "consumer lag", "alert deliveries"):
        assert topic in titles, topic


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (./dev test installs it)")
def test_every_dashboard_query_parses_with_promtool(tmp_path):
    rules = [
        {"record": f"dashboard:query:{i}", "expr": substitute(expr)}
        for i, (_, _, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout
    # and promtool does reject a broken one: the check is not vacuous
    path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [
        {"record": "dashboard:bad", "expr": "sum by (source (rate(nwatch_events_total[5m]))"}]}]}))
    assert subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True).returncode != 0

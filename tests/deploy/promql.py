"""What the deployment checks share: the exported metric names, and the names a PromQL expression uses.

There is no PromQL parser in our dependencies, and none is needed for this: the
real parser (promtool) checks the syntax; here a small tokenizer finds which
series names and label names an expression refers to, so they can be checked
against what the worker really exports (:func:`exported_series`).
"""

from __future__ import annotations

import io
import os
import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "neighbourwatch.json"

# Labels Prometheus puts on every scraped series, and the series it makes itself.
TARGET_LABELS = {"job", "instance"}
BUILTIN_SERIES = {"up": set(), "ALERTS": {"alertname", "alertstate", "severity"}}

# Grafana's variables, replaced by what they stand for so promtool can parse the query.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s", "$source": ".*"}

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "atan2", "inf", "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^{}]*)\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_NAME = re.compile(r"(?<![A-Za-z0-9_:.$])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(\"(?:[^\"\\]|\\.)*\")")


def substitute(expr: str) -> str:
    """The expression with Grafana's variables replaced (longest names first)."""
    for var in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(var, GRAFANA_VARS[var])
    return expr


class Expr:
    """The series and labels one PromQL expression names.

    Attributes
    ----------
    series : list of (name, set of label names)
        Each vector selector: its metric name and the label names of its matchers.
    grouping : set of str
        Labels named in ``by``, ``without``, ``on``, ``ignoring``, ``group_*``.
    functions : list of (function, first series name)
        ``rate``, ``increase``, ``histogram_quantile`` ... and the series they apply to.
    """

    def __init__(self, expr: str) -> None:
        self.text = expr
        body = substitute(expr)
        self.series: list[tuple[str, set[str]]] = []
        self.grouping: set[str] = set()
        for kind, labels in _GROUPING.findall(body):
            self.grouping |= {x.strip() for x in labels.split(",") if x.strip()}
        body = _GROUPING.sub(" ", body)
        body = re.sub(r"\[[^\]]*\]", " ", body)  # ranges and subqueries: [5m], [1h:1m]
        for m in _SELECTOR.finditer(body):
            labels = {name for name, _, _ in _MATCHER.findall(m.group(2))}
            name = m.group(1)
            if name is None:  # {__name__="..."} style
                raise AssertionError(f"selector without a metric name in {expr!r}")
            self.series.append((name, labels))
        rest = _SELECTOR.sub(" ", body)
        rest = _STRING.sub(" ", rest)
        rest = re.sub(r"\boffset\s+\S+", " ", rest)
        for name in _NAME.findall(rest):
            if name.lower() in _KEYWORDS or re.fullmatch(r"[0-9.eE+-]+", name):
                continue
            self.series.append((name, set()))
        self.functions: list[tuple[str, str]] = []
        for m in re.finditer(r"\b(rate|irate|increase|histogram_quantile)\s*\(", body):
            after = _SELECTOR.sub(lambda s: (s.group(1) or "") + " ", body[m.end():])
            for name in _NAME.findall(after):
                if name.lower() not in _KEYWORDS:
                    self.functions.append((m.group(1), name))
                    break

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.series}


def exported_series() -> dict[str, tuple[str, set[str]]]:
    """``{sample name: (metric type, label names)}`` of everything the worker exports.

    Built from a real :class:`streams.metrics.Metrics` after a sample stream of
    every kind went through a pipeline (hashing text backend, small references
    so drift and warm-up gauges are set), plus the metrics set outside batches
    (lag, deliveries, suppressed alerts): the names a scrape of a busy worker shows.
    """
    import models.text
    from streams.config import Settings, SourceSettings
    from streams.metrics import Metrics
    from streams.pipeline import Pipeline
    from streams.samples import BROKEN_LINES, write_sample_stream

    settings = Settings(defaults=SourceSettings(
        min_reference=50, calibration_size=200, reference_size=500,
        drift_reference_size=100, drift_block=20, drift_cooldown=100, drift_alpha=0.05,
    ))
    pipeline = Pipeline(settings=settings, text_backend=lambda: models.text.HashingTextBackend())
    metrics = Metrics()
    buf = io.BytesIO()
    write_sample_stream(buf, events=2000, seed=5, broken=len(BROKEN_LINES))
    lines = buf.getvalue().splitlines()
    for start in range(0, len(lines), 256):
        result = pipeline.process_raw(lines[start:start + 256])
        metrics.observe_batch(result, pipeline=pipeline, input_topic="nwatch.events", batch_seconds=0.01)
    metrics.observe_lag("nwatch.events", 0, 3)
    metrics.init_deliveries(["webhook"], ["delivered", "failed"])
    metrics.observe_suppressed("cards")
    metrics.observe_snapshot("written")
    metrics.observe_snapshot_time("nwatch.events", 0, 0.0)
    metrics.observe_restore(1, 0, 10)
    metrics.observe_merge("cards", "transaction", merged=4, waiting=1, statistic=0.5, threshold=9.0)
    for child in ("pipeline", "producer"):  # nwatch run tracks its children; this process stands in
        metrics.track_process(child, os.getpid)

    out: dict[str, tuple[str, set[str]]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            typ, labels = out.setdefault(sample.name, (family.type, set()))
            labels.update(sample.labels)
    return out


def rule_exprs() -> Iterator[tuple[str, str]]:
    """``(rule name, expression)`` of every rule in deploy/prometheus/rules.yml."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule["record"], rule["expr"]


def recording_rules() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["record"]: r["expr"] for g in doc["groups"] for r in g["rules"] if "record" in r}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(dash: dict | None = None) -> Iterator[tuple[str, str, str]]:
    """``(panel title, refId or "annotation", expression)`` of every query in the dashboard."""
    dash = dash if dash is not None else dashboard()

    def panels(items: list[dict]) -> Iterator[dict]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(dash["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target["refId"], target["expr"]
    for ann in dash.get("annotations", {}).get("list", []):
        if "expr" in ann:
            yield ann["name"], "annotation", ann["expr"]


def problems(expr: str, exported: dict[str, tuple[str, set[str]]], recorded: dict[str, set[str]]) -> list[str]:
    """What is wrong with the names ``expr`` uses; empty when every one exists.

    ``recorded`` maps recording-rule names to the labels they keep.
    """
    e = Expr(expr)
    out: list[str] = []
    available: set[str] = set(TARGET_LABELS)
    for name, labels in e.series:
        if name in exported:
            typ, known = exported[name]
            known = known | TARGET_LABELS
        elif name in recorded:
            known = recorded[name]
        elif name in BUILTIN_SERIES:
            known = BUILTIN_SERIES[name] | TARGET_LABELS
        else:
            out.append(f"no such series: {name}")
            continue
        available |= known
        if labels - known:
            out.append(f"{name} has no label {sorted(labels - known)}")
    if e.grouping - available - {"le"}:
        out.append(f"grouping by labels no series has: {sorted(e.grouping - available)}")
    for fn, name in e.functions:
        if fn == "histogram_quantile":
            if not name.endswith("_bucket"):
                out.append(f"histogram_quantile over {name}, not a _bucket series")
            elif "le" not in e.grouping:
                out.append("histogram_quantile without `by (..., le)`")
        elif fn in ("rate", "irate", "increase") and name in exported:
            typ = exported[name][0]
            if typ == "gauge" or not name.endswith(("_total", "_bucket", "_sum", "_count")):
                out.append(f"{fn} over {name}, which is not a counter")
    return out

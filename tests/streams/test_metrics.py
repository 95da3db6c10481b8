"""Prometheus metrics: counts equal the batches' contents; naming rules, label caps, /metrics."""

from __future__ import annotations

import inspect
import io
import math
import re
import urllib.error
import urllib.request
from collections import Counter as Tally
from datetime import datetime

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

import models.text
from streams.config import MetricsSettings, Settings, SourceSettings
from streams.metrics import (
    OTHER_SOURCE,
    P_VALUE_BUCKETS,
    BatchHistogram,
    Metrics,
    reason_codes,
    start_http_server,
)
from streams.pipeline import BatchResult, Pipeline
from streams.samples import BROKEN_LINES, START, write_sample_stream

TOPIC = "nwatch.events"
# The fake "now" of the metrics clock: after every event of the sample stream
# (4000 events, 2 s apart), so latencies from the events' own ts are positive.
NOW = START + 10 * 86400.0
KAFKA_DELAY = 0.5  # the fake Kafka timestamps are this much before NOW
BATCH = 256

# Small references and a looser drift budget than the defaults, so that 4000
# events judge most sources, flag anomalies and raise drift alarms (the sample
# stream drifts after 60% of it).
FAST = Settings(
    defaults=SourceSettings(
        min_reference=50, calibration_size=200, reference_size=500,
        drift_reference_size=100, drift_block=20, drift_cooldown=100, drift_alpha=0.05,
    )
)


def _pipeline(settings: Settings = FAST) -> Pipeline:
    return Pipeline(settings=settings, text_backend=lambda: models.text.HashingTextBackend())


def _vector_lines(
    source: str, n: int, *, start: int = 0, dim: int = 4, seed: int = 0
) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [
        orjson.dumps({"id": f"{source}-{start + i}", "source": source, "kind": "vector",
                      "vector": rng.normal(size=dim).round(4).tolist()})
        for i in range(n)
    ]


class Run:
    """The sample stream through a pipeline, each batch observed; the results kept to compare."""

    def __init__(self) -> None:
        buf = io.BytesIO()
        write_sample_stream(buf, events=4000, seed=3, broken=len(BROKEN_LINES))
        self.lines = buf.getvalue().splitlines()
        self.pipeline = _pipeline()
        self.metrics = Metrics(clock=lambda: NOW)
        self.results: list[BatchResult] = []
        self.kafka_timed = 0  # events whose latency came from the fake Kafka timestamp
        self.latency_sum = 0.0  # what the end-to-end histogram should sum to
        for b, start in enumerate(range(0, len(self.lines), BATCH)):
            raws = self.lines[start:start + BATCH]
            result = self.pipeline.process_raw(raws)
            times: list[float | None] | None = None
            if b % 2 == 0:
                # Kafka timestamps, except two messages without a usable one
                # (None, and Kafka's -1): those fall back to the event's ts.
                times = [NOW - KAFKA_DELAY] * len(raws)
                times[0], times[1] = None, -1.0
                self.kafka_timed += sum(1 for i, _ in result.scores if i > 1)
            for i, rec in result.scores:
                kafka = times is not None and i > 1
                own = NOW - datetime.fromisoformat(rec.ts).timestamp()
                self.latency_sum += KAFKA_DELAY if kafka else own
            self.metrics.observe_batch(
                result, pipeline=self.pipeline, input_topic=TOPIC, batch_seconds=0.01 * (b + 1),
                event_times=times,
            )
            self.results.append(result)

    def records(self):
        return [rec for r in self.results for _, rec in r.scores]


@pytest.fixture(scope="module")
def run() -> Run:
    return Run()


def _value(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return m.registry.get_sample_value(name, labels or {})


def test_counters_equal_what_the_batches_contained(run: Run):
    records = run.records()
    m = run.metrics
    events = Tally((r.source, r.kind) for r in records)
    anomalies = Tally((r.source, r.kind) for r in records if r.is_anomaly)
    drifts = Tally((d.source, d.kind) for r in run.results for d in r.drifts)
    rejects = Tally(j.reason for r in run.results for j in r.rejects)
    # the stream exercises every counter: otherwise equality below proves little
    assert len(events) == 5 and sum(anomalies.values()) > 0 and sum(drifts.values()) > 0
    assert sum(rejects.values()) == len(BROKEN_LINES) and len(rejects) >= 10
    for (source, kind), n in events.items():
        labels = {"source": source, "kind": kind}
        assert _value(m, "nwatch_events_total", labels) == n
        assert _value(m, "nwatch_anomalies_total", labels) == anomalies[(source, kind)]
        # a source without alarms exports 0, not nothing
        assert _value(m, "nwatch_drift_alarms_total", labels) == drifts[(source, kind)]
    for reason in reason_codes():
        labels = {"reason": reason, "topic": TOPIC}
        assert _value(m, "nwatch_rejected_total", labels) == rejects[reason]
    assert _value(m, "nwatch_rejected_total", {"reason": "not_json", "topic": "other"}) is None


def test_histograms_count_what_they_should(run: Run):
    m = run.metrics
    records = run.records()
    judged: dict[tuple[str, str], list] = {}
    for r in records:
        if not r.warming_up:
            judged.setdefault((r.source, r.kind), []).append(r)
    assert any(judged.values())
    for (source, kind), recs in judged.items():
        labels = {"source": source, "kind": kind}
        assert _value(m, "nwatch_score_count", labels) == len(recs)
        assert _value(m, "nwatch_score_sum", labels) == pytest.approx(sum(r.score for r in recs))
        assert _value(m, "nwatch_p_value_count", labels) == len(recs)
        # the bucket at the default alpha counts p <= 0.01
        at_alpha = sum(1 for r in recs if r.p_value <= 0.01)
        assert _value(m, "nwatch_p_value_bucket", {**labels, "le": "0.01"}) == at_alpha
        assert _value(m, "nwatch_p_value_bucket", {**labels, "le": "+Inf"}) == len(recs)
    encodes = Tally(name for r in run.results for name in r.encode_seconds)
    for name, n in encodes.items():
        kind = run.pipeline.sources[name].kind
        assert _value(m, "nwatch_encode_seconds_count", {"source": name, "kind": kind}) == n
    batches = len(run.results)
    assert _value(m, "nwatch_batch_size_count") == batches
    assert _value(m, "nwatch_batch_size_sum") == len(run.lines)
    assert _value(m, "nwatch_batch_seconds_count") == batches
    seconds = sum(0.01 * (b + 1) for b in range(batches))
    assert _value(m, "nwatch_batch_seconds_sum") == pytest.approx(seconds)


def test_end_to_end_latency_from_kafka_timestamp_else_event_ts(run: Run):
    m = run.metrics
    records = run.records()
    total = sum(_value(m, "nwatch_end_to_end_seconds_count", {"source": s, "kind": k}) or 0
                for s, k in {(r.source, r.kind) for r in records})
    assert total == len(records)  # every event observed once (all ts lie before NOW)
    total_sum = sum(_value(m, "nwatch_end_to_end_seconds_sum", {"source": s, "kind": k}) or 0
                    for s, k in {(r.source, r.kind) for r in records})
    assert total_sum == pytest.approx(run.latency_sum, rel=1e-9)
    # Kafka-timed events took exactly KAFKA_DELAY; the others days (their own ts).
    fast = sum(_value(m, "nwatch_end_to_end_seconds_bucket", {"source": s, "kind": k, "le": "0.5"})
               or 0
               for s, k in {(r.source, r.kind) for r in records})
    assert fast == run.kafka_timed
    slow = [NOW - datetime.fromisoformat(r.ts).timestamp() for r in records]
    assert min(slow) > 900  # so they all land in +Inf only, above the last finite bucket


def test_gauges_read_from_the_pipeline(run: Run):
    m = run.metrics
    assert _value(m, "nwatch_sources") == len(run.pipeline.sources) == 5
    thresholds = 0
    for name, state in run.pipeline.sources.items():
        labels = {"source": name, "kind": state.kind}
        mon = state.monitor
        assert _value(m, "nwatch_reference_size", labels) == mon.detector.size
        assert _value(m, "nwatch_warming_up", labels) == (1.0 if mon.is_warming_up else 0.0)
        thr = mon.drift_monitor.threshold
        if math.isnan(thr):
            assert _value(m, "nwatch_drift_threshold", labels) is None
        else:
            thresholds += 1
            assert _value(m, "nwatch_drift_threshold", labels) == thr
            assert _value(m, "nwatch_drift_statistic", labels) == mon.drift_monitor.statistic
    assert thresholds > 0
    info = {"version": m.version}
    info.update({f"{s.kind}_encoder": s.tag for s in run.pipeline.sources.values()})
    assert _value(m, "nwatch_build_info", info) == 1.0


def test_nan_drift_threshold_is_not_exported():
    pipe = _pipeline()
    m = Metrics(clock=lambda: NOW)
    result = pipe.process_raw(_vector_lines("v", 20))
    result.drifts += pipe.flush().drifts  # learn the incomplete block: the reference holds all 20
    m.observe_batch(result, pipeline=pipe, input_topic=TOPIC, batch_seconds=0.001)
    assert math.isnan(pipe.sources["v"].monitor.drift_monitor.threshold)  # no reference yet
    labels = {"source": "v", "kind": "vector"}
    assert _value(m, "nwatch_drift_threshold", labels) is None
    assert _value(m, "nwatch_drift_statistic", labels) is None
    assert _value(m, "nwatch_reference_size", labels) == 20
    assert _value(m, "nwatch_warming_up", labels) == 1.0
    # warming-up events are counted but neither scored nor p-valued in the histograms
    assert _value(m, "nwatch_events_total", labels) == 20
    assert _value(m, "nwatch_score_count", labels) is None


def test_latency_in_the_future_is_not_observed():
    pipe = _pipeline()
    m = Metrics(clock=lambda: NOW)
    raws = _vector_lines("v", 4)
    result = pipe.process_raw(raws)
    m.observe_batch(result, pipeline=pipe, input_topic=TOPIC, batch_seconds=0.001,
                    event_times=[NOW + 5, NOW - 2, NOW - 3, NOW + 1])
    labels = {"source": "v", "kind": "vector"}
    assert _value(m, "nwatch_end_to_end_seconds_count", labels) == 2
    assert _value(m, "nwatch_end_to_end_seconds_sum", labels) == pytest.approx(5.0)


def test_sources_beyond_the_cap_share_the_other_label():
    pipe = _pipeline()
    m = Metrics(max_sources=2)
    raws = [line for s in ("s0", "s1", "s2", "s3") for line in _vector_lines(s, 3)]
    result = pipe.process_raw(raws)
    pipe.flush()  # learn the incomplete blocks: each reference holds its 3 events
    m.observe_batch(result, pipeline=pipe, input_topic=TOPIC, batch_seconds=0.001)
    get = lambda name, src: _value(m, name, {"source": src, "kind": "vector"})  # noqa: E731
    assert get("nwatch_events_total", "s0") == get("nwatch_events_total", "s1") == 3
    assert get("nwatch_events_total", "s2") is None and get("nwatch_events_total", "s3") is None
    assert get("nwatch_events_total", OTHER_SOURCE) == 6
    assert get("nwatch_encode_seconds_count", OTHER_SOURCE) == 2  # one per source's encode
    # gauges of several sources do not add up: none for _other
    assert get("nwatch_reference_size", "s0") == 3
    assert get("nwatch_reference_size", OTHER_SOURCE) is None
    assert get("nwatch_warming_up", OTHER_SOURCE) is None
    assert _value(m, "nwatch_sources") == 4  # the worker holds more than are labelled
    m.observe_suppressed("s3", 2)
    m.observe_suppressed("s0")
    assert _value(m, "nwatch_alerts_suppressed_total", {"source": OTHER_SOURCE}) == 2
    assert _value(m, "nwatch_alerts_suppressed_total", {"source": "s0"}) == 1
    # a tracked source stays tracked; a later one never displaces it
    m.observe_batch(pipe.process_raw(_vector_lines("s1", 2, start=3)), pipeline=pipe,
                    input_topic=TOPIC, batch_seconds=0.001)
    assert get("nwatch_events_total", "s1") == 5


def test_lag_deliveries_and_rejects_outside_batches():
    m = Metrics()
    m.observe_lag("nwatch.events", 0, 120)
    m.observe_lag("nwatch.events", 0, 7)
    m.observe_lag("nwatch.events", 3, 0)
    assert _value(m, "nwatch_consumer_lag", {"topic": "nwatch.events", "partition": "0"}) == 7
    assert _value(m, "nwatch_consumer_lag", {"topic": "nwatch.events", "partition": "3"}) == 0
    m.forget_lag("nwatch.events", 3)
    m.forget_lag("nwatch.events", 9)  # never set: no error
    assert _value(m, "nwatch_consumer_lag", {"topic": "nwatch.events", "partition": "3"}) is None
    for outcome in ("delivered", "delivered", "failed"):
        m.observe_delivery("webhook", outcome)
    delivered = {"hook": "webhook", "outcome": "delivered"}
    assert _value(m, "nwatch_alert_deliveries_total", delivered) == 2
    assert _value(m, "nwatch_alert_deliveries_total", {**delivered, "outcome": "failed"}) == 1
    m.observe_rejected("internal_error", topic="in2", n=5)
    assert _value(m, "nwatch_rejected_total", {"reason": "internal_error", "topic": "in2"}) == 5
    assert _value(m, "nwatch_rejected_total", {"reason": "not_json", "topic": "in2"}) == 0


def test_delivery_outcomes_start_at_zero_for_configured_hooks():
    # A failure counted from a series already at 0 is seen by increase() (rules.yml).
    m = Metrics()
    assert _value(m, "nwatch_alert_deliveries_total", {"hook": "webhook", "outcome": "failed"}) is None
    m.init_deliveries(["webhook", "alertmanager"], ["delivered", "failed"])
    for hook in ("webhook", "alertmanager"):
        for outcome in ("delivered", "failed"):
            assert _value(m, "nwatch_alert_deliveries_total", {"hook": hook, "outcome": outcome}) == 0
    m.observe_delivery("webhook", "failed", n=2)
    assert _value(m, "nwatch_alert_deliveries_total", {"hook": "webhook", "outcome": "failed"}) == 2
    assert _value(m, "nwatch_alert_deliveries_total", {"hook": "alertmanager", "outcome": "failed"}) == 0


EXPECTED = {
    "nwatch_events": "counter", "nwatch_anomalies": "counter", "nwatch_drift_alarms": "counter",
    "nwatch_rejected": "counter", "nwatch_alert_deliveries": "counter",
    "nwatch_alerts_suppressed": "counter",
    "nwatch_score": "histogram", "nwatch_p_value": "histogram",
    "nwatch_end_to_end_seconds": "histogram", "nwatch_encode_seconds": "histogram",
    "nwatch_batch_size": "histogram", "nwatch_batch_seconds": "histogram",
    "nwatch_drift_statistic": "gauge", "nwatch_drift_threshold": "gauge",
    "nwatch_reference_size": "gauge", "nwatch_warming_up": "gauge", "nwatch_sources": "gauge",
    "nwatch_consumer_lag": "gauge", "nwatch_build": "info",
    "nwatch_snapshots": "counter",
    "nwatch_snapshot_age_seconds": "gauge",
    "nwatch_restored_sources": "counter",
    "nwatch_replayed_events": "counter",
    "nwatch_shard_summaries": "counter", "nwatch_shard_merge_waiting": "gauge",
}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def test_names_and_labels_follow_the_prometheus_rules(run: Run):
    m = run.metrics
    m.observe_lag("nwatch.events", 0, 1)
    m.observe_delivery("webhook", "delivered")
    m.observe_suppressed("cards")
    m.observe_snapshot("written")
    m.observe_snapshot_time("nwatch.events", 0, 0.0)
    m.observe_merge("cards", "transaction", merged=2, waiting=1, statistic=0.3, threshold=8.0)
    m.observe_restore(1, 0, 5)
    families = {f.name: f for f in m.registry.collect()}
    # the standard process_* of prometheus_client's process collector (this process's own), as is
    process = {n: families.pop(n).type for n in list(families) if n.startswith("process_")}
    assert process == {"process_virtual_memory_bytes": "gauge", "process_resident_memory_bytes": "gauge",
                       "process_start_time_seconds": "gauge", "process_cpu_seconds": "counter",
                       "process_open_fds": "gauge", "process_max_fds": "gauge"}
    assert {n: f.type for n, f in families.items()} == EXPECTED
    for name, family in families.items():
        assert re.fullmatch(r"nwatch_[a-z][a-z0-9_]*", name), name
        # durations, and only durations, are in seconds and say so in the name
        assert name.endswith("_seconds") == family.documentation.startswith("Seconds"), name
        assert family.samples, f"{name} exports nothing after a run"
        for sample in family.samples:
            suffix = sample.name[len(name):]
            assert sample.name.startswith(name) and suffix in SUFFIXES[family.type], sample.name
            for label in sample.labels:
                assert label != "id" and not label.endswith("_id"), (sample.name, label)
                assert re.fullmatch(r"[a-z][a-z0-9_]*", label), label
    # counters end in _total, durations in _seconds (checked on samples, as scraped)
    samples = {s.name for f in families.values() for s in f.samples}
    assert "nwatch_events_total" in samples and "nwatch_encode_seconds_bucket" in samples


def test_registries_are_private():
    a, b = Metrics(), Metrics()  # no clash: each has its own registry
    assert a.registry is not b.registry
    a.observe_delivery("webhook", "delivered")
    delivered = {"hook": "webhook", "outcome": "delivered"}
    assert _value(a, "nwatch_alert_deliveries_total", delivered) == 1
    assert _value(b, "nwatch_alert_deliveries_total", delivered) is None
    assert not [f.name for f in REGISTRY.collect() if f.name.startswith("nwatch_")]
    shared = CollectorRegistry()
    c = Metrics(registry=shared)
    assert c.registry is shared
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry=shared)  # the batch histograms describe themselves, so they clash too
    with pytest.raises(ValueError, match="nwatch_score"):
        BatchHistogram("score", "x", ("a",), buckets=(1.0,), namespace="nwatch", registry=shared)


def test_batch_histogram_matches_prometheus_client_histogram():
    bounds = P_VALUE_BUCKETS
    values = [0.0, 1e-5, 0.0001, 0.00010001, 0.01, 0.0099, 0.5, 0.75, 1.0, 3.0]
    ours_reg, theirs_reg = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram("h", "doc", ("x",), buckets=bounds, registry=ours_reg)
    theirs = Histogram("h", "doc", ("x",), buckets=bounds, registry=theirs_reg)
    ours.observe_many(("a",), values[:4])
    ours.observe_many(("a",), values[4:] + [math.nan, math.inf])  # non-finite skipped
    for v in values:
        theirs.labels("a").observe(v)
    def samples(registry: CollectorRegistry) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in registry.collect() for s in f.samples if not s.name.endswith("_created")}

    theirs_samples, ours_samples = samples(theirs_reg), samples(ours_reg)
    assert ours_samples.keys() == theirs_samples.keys()
    for key, value in theirs_samples.items():
        assert ours_samples[key] == pytest.approx(value), key
    with pytest.raises(ValueError):
        ours.observe_many(("a", "b"), [1.0])
    with pytest.raises(ValueError):
        BatchHistogram("g", "doc", (), buckets=(2.0, 1.0))


def test_http_endpoint_serves_the_registry_on_loopback():
    sig = inspect.signature(start_http_server).parameters
    assert sig["host"].default == MetricsSettings().host == "127.0.0.1"
    assert sig["port"].default == MetricsSettings().port == 9650
    pipe = _pipeline()
    m = Metrics()  # real clock: the events carry no ts, so their time is their arrival
    lines = _vector_lines("v", 30) + [BROKEN_LINES[0][0], b"[1]"] + _vector_lines("w", 5, seed=1)
    result = pipe.process_raw(lines)
    m.observe_batch(result, pipeline=pipe, input_topic=TOPIC, batch_seconds=0.002)
    server = start_http_server(m, host="127.0.0.1", port=0)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        # Timeout: a loopback scrape of a few kB answers in milliseconds; 10 s
        # only bounds a hang on the shared machine.
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
    finally:
        server.stop()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    key = lambda name, **labels: (name, tuple(sorted(labels.items())))  # noqa: E731
    assert samples[key("nwatch_events_total", source="v", kind="vector")] == 30
    assert samples[key("nwatch_events_total", source="w", kind="vector")] == 5
    assert samples[key("nwatch_rejected_total", reason="not_json", topic=TOPIC)] == 1
    assert samples[key("nwatch_rejected_total", reason="not_an_object", topic=TOPIC)] == 1
    assert samples[key("nwatch_batch_size_count")] == 1
    assert samples[key("nwatch_batch_size_sum")] == len(lines)
    assert samples[key("nwatch_end_to_end_seconds_count", source="v", kind="vector")] == 30
    assert all(name.startswith(("nwatch_", "process_")) for name, _ in samples)
    assert samples[key("process_resident_memory_bytes")] > 0  # this process's, the standard name
    # stopped: the port no longer answers, and stop() may be called again
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)
    server.stop()


def test_the_merge_of_a_sharded_source_is_counted_under_its_own_name():
    m = Metrics()
    m.observe_merge("hot", "vector", merged=3, waiting=2, statistic=1.5, threshold=9.0, drifts=1)
    m.observe_merge("hot", "vector", merged=2, waiting=0, statistic=0.0, threshold=9.0)
    assert _value(m, "nwatch_shard_summaries_total", {"source": "hot", "outcome": "merged"}) == 5
    assert _value(m, "nwatch_shard_merge_waiting", {"source": "hot"}) == 0
    assert _value(m, "nwatch_drift_threshold", {"source": "hot", "kind": "vector"}) == 9.0
    assert _value(m, "nwatch_drift_alarms_total", {"source": "hot", "kind": "vector"}) == 1
    m.observe_checkpoint("hot", 40)
    assert _value(m, "nwatch_shard_summaries_total", {"source": "hot", "outcome": "tombstoned"}) == 40
    assert _value(m, "nwatch_shard_summaries_total", {"source": "hot", "outcome": "checkpoint"}) == 1

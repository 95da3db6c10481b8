"""End to end through Kafka for ``nwatch bench speed --kafka``: saturation, latency, start-up.

An embedded Tansu broker on loopback, ``nwatch run`` as a child process
(exactly as deployed), tabular events of a real data set (ADBench shuttle, as
``transaction`` events of one source), and results read back from the scores
topic by this process without a consumer group. For each output path of the
worker (``NWATCH_KAFKA__OUTPUT_PATH``: faust's per-record ``topic.send``, and
the batch hand-off to faust's aiokafka producer):

- saturation: a backlog of events is produced first, then the worker starts;
  events per second from the worker's own produce timestamps of the score
  records (after the first ``WARMUP`` events), set against the in-process
  pipeline on the same events in this process, measured again before each
  design (a run's share moved by 10 % with one in-process figure for all);
- start-up: from spawning the worker to its first score record;
- latency: a fresh worker, warmed up, then events produced at half the
  measured saturation rate for ``latency_seconds``; produce-to-result latency
  is the time from handing an event to the producer to reading its score
  record back (p50, p95, p99); with the worker's mean batch (events and
  seconds per batch, from its /metrics), which tells a worker keeping up in
  small batches from one falling behind in full ones.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from streams.bench_speed import WARMUP, load_tabular, make_pipeline, run_pipeline, tabular_lines

# (input path, output path) of the worker: faust's per-event stream and
# per-record topic.send; faust's stream with the batch hand-off of outputs;
# aiokafka batches in and out, inside the faust app; aiokafka batches in,
# produced by the worker's producer process (kafka.output_path = "process");
# aiokafka batches in and out, the pipeline in its own process (a third
# element: kafka.pipeline_path = "process"; "thread" when absent).
DESIGNS = (("faust", "faust"), ("faust", "aiokafka"), ("aiokafka", "aiokafka"), ("aiokafka", "process"),
           ("aiokafka", "aiokafka", "process"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 and max in milliseconds of latencies given in seconds."""
    if not values:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    a = np.asarray(values) * 1000.0
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "max_ms": float(a.max())}


def saturation_rate(create_ms: list[int], *, skip: int) -> float:
    """Events per second from the produce timestamps of the results, the first ``skip`` excluded."""
    ts = sorted(create_ms)
    if len(ts) <= skip + 1:
        return float("nan")
    span = (ts[-1] - ts[skip]) / 1000.0
    return (len(ts) - 1 - skip) / span if span > 0 else float("inf")


def child_pids(pid: int | None) -> list[int]:
    """The pids of a process's children."""
    return [int(c) for c in subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()]


def tree_cpu_seconds(pid: int | None) -> float:
    """:func:`cpu_seconds` of a process and its descendants (the worker and its pipeline or producer process)."""
    return cpu_seconds(pid) + sum(tree_cpu_seconds(c) for c in child_pids(pid))


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process and its threads so far (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


async def _bare_loop(bootstrap: str, source: str, target: str) -> None:
    """The ceiling of one Python process between two topics: getmany, decode each event, produce a
    record of the score record's size per event (one record batch), commit after the acks. Runs
    until stopped."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id=f"bare-{source}",
                                enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=50)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=512 * 1024)
    await consumer.start()
    await producer.start()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=50, max_records=256)
            futures = []
            for recs in batches.values():
                batch = producer.create_batch()
                for r in recs:
                    d = orjson.loads(r.value)
                    value = orjson.dumps({"id": d["id"], "source": d["source"], "kind": d.get("kind"), "ts": d.get("ts"),
                                          "score": 0.5, "p_value": 0.5, "is_anomaly": False, "warming_up": False,
                                          "neighbours": [{"id": d["id"], "distance": 0.5}] * 10, "encoder": "bare"})
                    if batch.append(key=r.key, value=value, timestamp=None, headers=[]) is None:
                        futures.append(await producer.send_batch(batch, target, partition=0))
                        batch = producer.create_batch()
                        batch.append(key=r.key, value=value, timestamp=None, headers=[])
                futures.append(await producer.send_batch(batch, target, partition=0))
            await asyncio.gather(*futures)
            if batches:
                await consumer.commit({tp: recs[-1].offset + 1 for tp, recs in batches.items() if recs})
    finally:
        await consumer.stop()
        await producer.stop()


class _Run:
    """One worker on fresh topics of the broker."""

    def __init__(self, bootstrap: str, design: tuple[str, ...], log_dir: Path, cpus: str | None = None) -> None:
        self.bootstrap = bootstrap
        self.cpus = cpus  # a taskset CPU list the worker (and its children) is pinned to
        self.input_path, self.output_path = design[:2]
        self.pipeline_path = design[2] if len(design) > 2 else "thread"
        suffix = uuid.uuid4().hex[:8]
        self.topics = {n: f"bench.{suffix}.{n}" for n in ("events", "scores", "anomalies", "drift", "alerts", "dlq")}
        from streams.broker import ensure_topics

        ensure_topics(bootstrap, [*self.topics.values(), f"{self.topics['alerts']}.dlq"])
        self.log_path = log_dir / f"worker-{self.input_path}-{self.output_path}-{self.pipeline_path}-{suffix}.log"
        self.proc: subprocess.Popen | None = None
        self.spawned_at = 0.0
        self.metrics_port = _free_port()

    def start(self) -> None:
        env = dict(os.environ)
        t = self.topics
        env.update({
            "NWATCH_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "NWATCH_KAFKA__INPUT_TOPICS": f'["{t["events"]}"]',
            "NWATCH_KAFKA__SCORES_TOPIC": t["scores"],
            "NWATCH_KAFKA__ANOMALIES_TOPIC": t["anomalies"],
            "NWATCH_KAFKA__DRIFT_TOPIC": t["drift"],
            "NWATCH_KAFKA__ALERTS_TOPIC": t["alerts"],
            "NWATCH_KAFKA__DLQ_TOPIC": t["dlq"],
            "NWATCH_KAFKA__GROUP_ID": f"g-{t['events']}",
            "NWATCH_KAFKA__OUTPUT_PATH": self.output_path,
            "NWATCH_KAFKA__INPUT_PATH": self.input_path,
            "NWATCH_KAFKA__PIPELINE_PATH": self.pipeline_path,
            "NWATCH_METRICS__PORT": str(self.metrics_port),
            "HF_HUB_OFFLINE": "1",
        })
        log = open(self.log_path, "wb")
        self.spawned_at = time.time()
        command = [sys.executable, "-m", "streams.cli", "run"]
        if self.input_path == "bare":
            command = [sys.executable, "-c", "import asyncio, sys; from streams.bench_kafka import _bare_loop; "
                       "asyncio.run(_bare_loop(*sys.argv[1:4]))",
                       self.bootstrap, t["events"], t["scores"]]
        if self.cpus:
            command = ["taskset", "-c", self.cpus, *command]
        self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def batches(self) -> dict[str, float]:
        """The worker's batches so far, from its /metrics: count, mean events and mean seconds per batch."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        sums = {}
        for family in text_string_to_metric_families(text):
            if family.name in ("nwatch_batch_size", "nwatch_batch_seconds"):
                for s in family.samples:
                    if s.name.endswith(("_sum", "_count")):
                        sums[s.name] = sums.get(s.name, 0.0) + s.value
        n = sums.get("nwatch_batch_size_count", 0.0)
        return {
            "batches": n,
            "events_per_batch": sums.get("nwatch_batch_size_sum", 0.0) / n if n else float("nan"),
            "seconds_per_batch": sums.get("nwatch_batch_seconds_sum", 0.0) / n if n else float("nan"),
        }

    def stop(self) -> None:
        from streams.runtime import stop_process_group

        if self.proc is not None:
            stop_process_group(self.proc, timeout=20)


async def _producer(bootstrap: str, *, linger_ms: int) -> Any:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms, max_batch_size=1 << 20, acks=1)
    await p.start()
    return p


async def _reader(bootstrap: str, topic: str) -> Any:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                         fetch_max_wait_ms=20)
    await c.start()
    await c.topics()
    tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or {0})]
    c.assign(tps)
    await c.seek_to_beginning(*tps)
    return c


async def _read_until(consumer: Any, count: int, timeout: float, seen: dict[str, tuple[float, int]], proc: Any) -> None:
    """Read score records into ``seen`` (id -> (receive time, produce timestamp ms)) until ``count`` ids."""
    deadline = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        batch = await consumer.getmany(timeout_ms=100, max_records=10_000)
        now = time.perf_counter()
        for recs in batch.values():
            for r in recs:
                i = orjson.loads(r.value)["id"]
                if i not in seen:
                    seen[i] = (now, r.timestamp)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}")


async def _saturation(bootstrap: str, design: tuple[str, ...], lines: list[bytes], log_dir: Path, timeout: float,
                      broker_pid: int | None = None, cpus: str | None = None) -> dict[str, Any]:
    run = _Run(bootstrap, design, log_dir, cpus)
    p = await _producer(bootstrap, linger_ms=20)
    futs = [await p.send(run.topics["events"], line, key=b"tab") for line in lines]
    await asyncio.gather(*futs)
    await p.stop()
    consumer = await _reader(bootstrap, run.topics["scores"])
    seen: dict[str, tuple[float, int]] = {}
    run.start()
    try:
        await _read_until(consumer, WARMUP, timeout, seen, run.proc)
        # CPU seconds of the worker, the broker and this process (the reader) while the rest is scored
        cpu0 = (tree_cpu_seconds(run.proc.pid), cpu_seconds(broker_pid), time.process_time(), len(seen))
        await _read_until(consumer, len(lines), timeout, seen, run.proc)
        cpu1 = (tree_cpu_seconds(run.proc.pid), cpu_seconds(broker_pid), time.process_time(), len(seen))
    finally:
        run.stop()
        await consumer.stop()
    stamps = [ts for _, ts in seen.values()]
    first = min(stamps) / 1000.0 if stamps else float("nan")
    per_1000 = 1000.0 / max(1, cpu1[3] - cpu0[3])
    return {
        "design": design_name(design), "events": len(lines), "scored": len(seen),
        "events_per_second": saturation_rate(stamps, skip=WARMUP),
        "startup_seconds": first - run.spawned_at,
        "cpu_seconds_per_1000": {"worker": (cpu1[0] - cpu0[0]) * per_1000, "broker": (cpu1[1] - cpu0[1]) * per_1000,
                                 "reader": (cpu1[2] - cpu0[2]) * per_1000},
    }


async def _latency(bootstrap: str, design: tuple[str, ...], warm: list[bytes], rate: float, seconds: float,
                   log_dir: Path) -> dict[str, Any]:
    run = _Run(bootstrap, design, log_dir)
    consumer = await _reader(bootstrap, run.topics["scores"])
    p = await _producer(bootstrap, linger_ms=0)
    seen: dict[str, tuple[float, int]] = {}
    run.start()
    try:
        futs = [await p.send(run.topics["events"], line, key=b"tab") for line in warm]
        await asyncio.gather(*futs)
        await _read_until(consumer, len(warm), 120.0, seen, run.proc)  # warmed up: the reference is full
        sent: dict[str, float] = {}
        reader = asyncio.create_task(_read_until(consumer, len(warm) + int(rate * seconds), seconds + 30.0, seen, run.proc))
        t0 = time.perf_counter()
        n = 0
        src = warm
        while (elapsed := time.perf_counter() - t0) < seconds:
            due = int(rate * elapsed)
            while n < due:
                line = src[n % len(src)]
                i = f"lat{n}"
                line = line.replace(b'"id":"', f'"id":"{i}-'.encode(), 1)
                i = orjson.loads(line)["id"]
                sent[i] = time.perf_counter()
                await p.send(run.topics["events"], line, key=b"tab")
                n += 1
            await asyncio.sleep(0.005)
        await p.flush()
        await reader
        batches = run.batches()  # warm-up included
    finally:
        run.stop()
        await p.stop()
        await consumer.stop()
    lat = [seen[i][0] - t for i, t in sent.items() if i in seen]
    out = {"design": design_name(design), "rate": rate, "seconds": seconds, "sent": len(sent), "scored": len(lat)}
    out.update(percentiles(lat))
    out.update(batches)
    return out


def _cpu_text(sat: dict[str, Any]) -> str:
    cpu = sat["cpu_seconds_per_1000"]
    return (f"CPU s per 1,000 events: worker {cpu['worker']:.3f}, broker {cpu['broker']:.3f}, "
            f"reader {cpu['reader']:.3f}")


def design_name(design: tuple[str, ...]) -> str:
    if design[0] == "bare":
        return "bare aiokafka loop"
    pipeline = f" / pipeline {design[2]}" if len(design) > 2 and design[2] != "thread" else ""
    return f"in {design[0]} / out {design[1]}{pipeline}"


def shuttle_lines(X: np.ndarray, repeat: int = 1) -> list[bytes]:
    """The rows as transaction events, ``repeat`` times over with fresh ids (a longer measuring window)."""
    return [line for r in range(repeat) for line in tabular_lines(X, kind="transaction", prefix=f"k{r}-" if r else "k")]


def bench_kafka(data_dir: Path, *, events: int = 40_000, repeat: int = 2, latency_seconds: float = 15.0,
                designs: tuple[tuple[str, ...], ...] = DESIGNS, bare: bool = True) -> dict[str, Any]:
    """Every design through the embedded broker, each against the in-process pipeline on the same
    events measured just before it (``events`` shuttle rows, ``repeat`` times over); with ``bare`` also the saturation of a bare aiokafka loop (:func:`_bare_loop`) on the same broker:
    what one Python process moves between two topics with no detection, the ceiling of the design."""
    from streams.broker import EmbeddedBroker

    X, _ = load_tabular(data_dir, "32_shuttle", limit=events)
    lines = shuttle_lines(X, repeat)

    def pipeline_rate() -> float:
        n, s, _ = run_pipeline(make_pipeline(), lines)
        return n / s

    in_process = pipeline_rate()
    print(f"kafka: in-process pipeline on the same {len(lines):,} shuttle events: {in_process:,.0f} events/s", flush=True)
    result: dict[str, Any] = {"in_process_events_per_second": in_process, "designs": {}}
    rates = [in_process]
    log_dir = Path(tempfile.mkdtemp(prefix="nwatch-bench-"))
    with EmbeddedBroker() as broker:
        result["broker_startup_seconds"] = broker.startup_seconds
        for i, design in enumerate(designs):
            name = design_name(design)
            if i:  # each design against the in-process rate of the same minutes (the machine's load drifts)
                in_process = pipeline_rate()
                rates.append(in_process)
            sat = asyncio.run(_saturation(broker.bootstrap_servers, design, lines, log_dir, timeout=300.0,
                                          broker_pid=broker.pid))
            rate = sat["events_per_second"]
            lat = asyncio.run(_latency(broker.bootstrap_servers, design, lines[:WARMUP + 500], rate / 2,
                                       latency_seconds, log_dir)) if rate == rate else {}
            sat["ratio_to_in_process"] = rate / in_process
            sat["in_process_events_per_second"] = in_process
            result["designs"][name] = {"saturation": sat, "latency": lat}
            print(f"kafka [{name:>35}] saturation {rate:,.0f} events/s ({rate / in_process:.0%} of in-process {in_process:,.0f}), "
                  f"start-up to first result {sat['startup_seconds']:.1f} s; at {lat.get('rate', 0):,.0f} events/s: "
                  f"p50 {lat.get('p50_ms', float('nan')):.0f} ms, p95 {lat.get('p95_ms', float('nan')):.0f} ms, "
                  f"p99 {lat.get('p99_ms', float('nan')):.0f} ms ({lat.get('scored', 0):,} of {lat.get('sent', 0):,} back; "
                  f"worker batches of {lat.get('events_per_batch', float('nan')):.0f} events, "
                  f"{lat.get('seconds_per_batch', float('nan')) * 1000:.0f} ms each); "
                  f"{_cpu_text(sat)}", flush=True)
        if bare:
            sat = asyncio.run(_saturation(broker.bootstrap_servers, ("bare", "bare"), lines, log_dir, timeout=300.0,
                                          broker_pid=broker.pid))
            rate = sat["events_per_second"]
            sat["ratio_to_in_process"] = rate / in_process
            sat["in_process_events_per_second"] = in_process
            result["bare_loop"] = sat
            print(f"kafka [{design_name(('bare', 'bare')):>35}] saturation {rate:,.0f} events/s "
                  f"({rate / in_process:.0%} of in-process {in_process:,.0f}); {_cpu_text(sat)}", flush=True)
    result["in_process_events_per_second"] = float(np.median(rates))
    result["in_process_runs"] = rates
    result["worker_logs"] = str(log_dir)
    return result

"""Memory and CPU of one ``nwatch run`` worker and its child processes: the figures behind the sizing in deploy/OPERATIONS.md.

Starts the embedded Tansu broker on loopback and runs one worker exactly as
deployed (``python -m streams.cli run``, default settings: the pipeline in a
child process). The sample stream (all five kinds, the text source through the
real MiniLM model, unless ``--kinds``) is either produced in full before the
worker starts (saturation: the worker runs flat out) or paced at ``--rate``
events/s while it runs (a steady load). Every second it samples, per process
(the worker, its pipeline process, any other child), the resident memory and
the CPU time, and the worker's ``nwatch_events_total``, until every event is
scored. Prints peak RSS per process and of the tree, CPU cores used per
process over the steady window (first scored event to the last) and events/s.

``--cpus 0`` pins the worker and its children to those CPUs (``taskset``), a
stand-in for a container CPU limit of that many cores (a CFS quota averages the
same, in bursts).

    python bench/worker_footprint.py [--events 20000] [--kinds transaction log audio vector] [--rate 300] [--cpus 0]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from streams.runtime import stop_process_group  # noqa: E402
from streams.samples import sample_lines  # noqa: E402


def scored(port: int) -> float:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("nwatch_events_total{"))


def role(p: psutil.Process, worker_pid: int) -> str:
    """``worker``, ``pipeline`` (streams.engine_process), ``producer`` (streams.producer_process) or the pid."""
    if p.pid == worker_pid:
        return "worker"
    try:
        args = " ".join(p.cmdline())
    except psutil.Error:
        return str(p.pid)
    for module, name in (("streams.engine_process", "pipeline"), ("streams.producer_process", "producer")):
        if module in args:
            return name
    return str(p.pid)


def produce(bootstrap: str, lines: list[bytes], rate: float) -> None:
    """Publish the lines keyed by source, at ``rate`` per second (inf: as fast as the client goes)."""
    from kafka import KafkaProducer
    import orjson

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    t0 = time.monotonic()
    for i, line in enumerate(lines):
        wait = t0 + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        producer.send("nwatch.events", key=orjson.loads(line)["source"].encode(), value=line)
    producer.flush()
    producer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--kinds", nargs="+", help="only these kinds (default all five)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="events/s produced while the worker runs (default 0: all produced before it starts)")
    parser.add_argument("--cpus", help="pin the worker and its children to these CPUs (taskset list, e.g. 0)")
    parser.add_argument("--env", nargs="*", default=[], help="NAME=VALUE settings for the worker")
    args = parser.parse_args()

    lines = list(sample_lines(events=args.events, seed=0, broken=0, kinds=args.kinds))
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        bootstrap = broker.bootstrap_servers
        topics = ["nwatch.events", "nwatch.scores", "nwatch.anomalies", "nwatch.drift",
                  "nwatch.alerts", "nwatch.dlq", "nwatch.alerts.dlq"]
        ensure_topics(bootstrap, topics)
        producing = None
        if args.rate > 0:
            producing = threading.Thread(target=produce, args=(bootstrap, lines, args.rate), daemon=True)
        else:
            produce(bootstrap, lines, float("inf"))

        with socket.socket() as s:  # a free loopback port for /metrics
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, NWATCH_KAFKA__BOOTSTRAP_SERVERS=bootstrap, NWATCH_METRICS__PORT=str(port),
                   NWATCH_STATE__DIR=str(Path(tmp) / "state"), HF_HUB_OFFLINE="1")
        env.update(dict(kv.split("=", 1) for kv in args.env))
        cmd = [sys.executable, "-m", "streams.cli", "run"]
        if args.cpus:
            cmd = ["taskset", "-c", args.cpus, *cmd]  # children inherit the affinity
        log = open(Path(tmp) / "worker.log", "wb")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if producing is not None:
            producing.start()
        started = time.monotonic()
        peak: dict[str, int] = {}
        peak_tree = 0
        cpu: dict[str, float] = {}
        first = last = None
        cpu_first: dict[str, float] = {}
        n = 0.0
        try:
            ps = psutil.Process(proc.pid)
            while time.monotonic() - started < 1800:
                tree = {}
                for p in [ps, *ps.children(recursive=True)]:
                    try:
                        times = p.cpu_times()
                        tree[role(p, proc.pid)] = (p.memory_info().rss, times.user + times.system)
                    except psutil.Error:
                        continue
                for name, (rss, secs) in tree.items():
                    peak[name] = max(peak.get(name, 0), rss)
                    cpu[name] = secs
                peak_tree = max(peak_tree, sum(rss for rss, _ in tree.values()))
                n = scored(port)
                now = time.monotonic()
                if n > 0 and first is None:
                    first, cpu_first = (now, n), dict(cpu)
                if n >= len(lines):
                    last = (now, n)
                    break
                assert proc.poll() is None, (Path(tmp) / "worker.log").read_text()[-2000:]
                time.sleep(1)
        finally:
            stop_process_group(proc, timeout=60)
            log.close()
    load = os.getloadavg()
    print(f"events: {len(lines)}, scored: {n:.0f}, rate: {'all before the start' if args.rate <= 0 else args.rate}, "
          f"cpus: {args.cpus or 'all'}, load average at the end {load[0]:.1f}")
    print(f"peak RSS: tree {peak_tree / 2**20:.0f} MiB; " +
          ", ".join(f"{name} {rss / 2**20:.0f} MiB" for name, rss in sorted(peak.items())))
    if first and last and last[0] > first[0]:
        wall = last[0] - first[0]
        rate = (last[1] - first[1]) / wall
        used = {name: (cpu[name] - cpu_first.get(name, 0.0)) / wall for name in cpu}
        print(f"first result after {first[0] - started:.1f} s; throughput {rate:.0f} events/s "
              f"({last[1] - first[1]:.0f} events in {wall:.1f} s)")
        print(f"CPU cores used in that window: tree {sum(used.values()):.2f}; " +
              ", ".join(f"{name} {c:.2f}" for name, c in sorted(used.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

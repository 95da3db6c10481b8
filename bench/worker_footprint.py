"""Memory and throughput of one ``nwatch run`` worker: the figures behind the sizing in deploy/OPERATIONS.md.

Starts the embedded Tansu broker on loopback, produces the sample stream (all
five kinds, the text source through the real MiniLM model), runs one worker
exactly as deployed (``python -m streams.cli run``, default settings) and
samples the worker's resident memory and its ``nwatch_events_total`` every
second until every event is scored. Prints peak RSS, RSS at the end, and
events/s in steady state (from the first scored event to the last).

    python bench/worker_footprint.py [--events 20000] [--kinds transaction log audio vector]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--kinds", nargs="+", help="only these kinds (default all five)")
    args = parser.parse_args()
    from kafka import KafkaProducer
    import orjson

    lines = list(sample_lines(events=args.events, seed=0, broken=0, kinds=args.kinds))
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        bootstrap = broker.bootstrap_servers
        topics = ["nwatch.events", "nwatch.scores", "nwatch.anomalies", "nwatch.drift",
                  "nwatch.alerts", "nwatch.dlq", "nwatch.alerts.dlq"]
        ensure_topics(bootstrap, topics)
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
        for line in lines:
            producer.send("nwatch.events", key=orjson.loads(line)["source"].encode(), value=line)
        producer.flush()
        producer.close()

        with socket.socket() as s:  # a free loopback port for /metrics
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, NWATCH_KAFKA__BOOTSTRAP_SERVERS=bootstrap,
                   NWATCH_METRICS__PORT=str(port), HF_HUB_OFFLINE="1")
        log = open(Path(tmp) / "worker.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "run"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        peak = 0
        first = last = None
        n = 0.0
        try:
            ps = psutil.Process(proc.pid)
            while time.monotonic() - started < 900:
                rss = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)])
                peak = max(peak, rss)
                n = scored(port)
                now = time.monotonic()
                if n > 0 and first is None:
                    first = (now, n)
                if n >= len(lines):
                    last = (now, n)
                    break
                assert proc.poll() is None, (Path(tmp) / "worker.log").read_text()[-2000:]
                time.sleep(1)
            end_rss = rss
        finally:
            stop_process_group(proc, timeout=30)
            log.close()
    print(f"events: {len(lines)}, scored: {n:.0f}")
    print(f"worker RSS: peak {peak / 2**20:.0f} MiB, at the end {end_rss / 2**20:.0f} MiB")
    if first and last and last[0] > first[0]:
        rate = (last[1] - first[1]) / (last[0] - first[0])
        print(f"first result after {first[0] - started:.1f} s; throughput {rate:.0f} events/s "
              f"({last[1] - first[1]:.0f} events in {last[0] - first[0]:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

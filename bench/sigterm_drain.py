"""How long a worker takes to stop on SIGTERM, and what it leaves: the figures behind
deploy/OPERATIONS.md ("Processes, signals and health").

Starts the embedded broker, runs one worker as deployed (``python -m streams.cli run``, default
settings: the pipeline in a child process, a state directory), sends SIGTERM to the worker's
pid alone (as kubelet and ``docker stop`` do) once 10,000 events are scored, and prints the
exit code, the seconds from the signal to the exit, the group's committed offset and the
offset of the snapshot left behind (equal: the next owner replays nothing). Two loads: the
sample stream of all five kinds paced at ``--rate`` events/s while the worker runs, and the
same stream produced in full before the start (saturation).

    python bench/sigterm_drain.py [--rate 300]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams.broker import EmbeddedBroker  # noqa: E402
from streams.samples import sample_lines  # noqa: E402
from streams.snapshots import SnapshotStore  # noqa: E402
from tests.integration.conftest import (  # noqa: E402
    free_port, produce_paced, start_worker, worker_env, worker_scored, worker_topics,
)


def one(bootstrap: str, rate: float) -> str:
    from kafka import KafkaConsumer, TopicPartition

    topics = worker_topics(bootstrap, "d")
    lines = list(sample_lines(events=60_000, seed=5, broken=0))
    stop = threading.Event()
    producing = threading.Thread(target=produce_paced, args=(bootstrap, topics["events"], lines, rate),
                                 kwargs={"stop": stop}, daemon=True)
    producing.start()
    if rate == float("inf"):
        producing.join()
    tmp = Path(tempfile.mkdtemp(prefix="nwatch-drain-"))
    port = free_port()
    worker, log = start_worker(worker_env(bootstrap, topics, NWATCH_METRICS__PORT=str(port),
                                          NWATCH_STATE__DIR=str(tmp / "state")), tmp / "worker.log")
    try:
        while worker_scored(port) < 10_000:
            assert worker.poll() is None, (tmp / "worker.log").read_text(errors="replace")[-2000:]
            time.sleep(0.2)
        t0 = time.monotonic()
        os.kill(worker.pid, signal.SIGTERM)
        code = worker.wait(120)
        seconds = time.monotonic() - t0
    finally:
        stop.set()
        log.close()
        producing.join(30)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=f"g-{topics['events']}", enable_auto_commit=False)
    committed = consumer.committed(TopicPartition(topics["events"], 0))
    consumer.close()
    snapshot = SnapshotStore(tmp / "state" / "snapshots" / f"g-{topics['events']}").load(topics["events"], 0)
    return (f"exit {code} {seconds:.1f} s after SIGTERM; committed offset {committed}, "
            f"snapshot at {snapshot.offset if snapshot else None}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=300.0)
    args = parser.parse_args()
    with EmbeddedBroker() as broker:
        for rate in (args.rate, float("inf")):
            label = "saturation" if rate == float("inf") else f"paced {rate:.0f} events/s"
            print(f"{label}: {one(broker.bootstrap_servers, rate)}; load {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a CPU limit of one core costs the worker: its saturation rate with the worker and its
children pinned to one CPU (``taskset``, a stand-in for a container's CPU limit of 1) against
unpinned, each design against the in-process pipeline rate measured just before it.

The Kafka bench's saturation run (streams/bench_kafka.py: shuttle rows, the embedded broker,
unpinned) for the default design (the pipeline process) and the pipeline thread, alternating
pinned and unpinned, ``--rounds`` times. The broker and this process stay unpinned.

    python bench/cpu_limit.py [--events 40000] [--repeat 2] [--rounds 2] [--cpus 0]

On a machine of two cores the broker and the reader share them with the worker: the
cores they use are printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams.bench_kafka import _saturation, design_name, shuttle_lines  # noqa: E402
from streams.bench_speed import load_tabular, make_pipeline, run_pipeline  # noqa: E402
from streams.broker import EmbeddedBroker  # noqa: E402

DESIGNS = (("aiokafka", "aiokafka", "process"), ("aiokafka", "aiokafka", "thread"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", default="0", help="the taskset CPU list of the pinned runs")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    args = parser.parse_args()
    X, _ = load_tabular(Path(args.data), "32_shuttle", limit=args.events)
    lines = shuttle_lines(X, args.repeat)
    log_dir = Path(tempfile.mkdtemp(prefix="nwatch-cpu-limit-"))
    with EmbeddedBroker() as broker:
        for r in range(args.rounds):
            for design in DESIGNS:
                for cpus in (None, args.cpus):
                    n, s, _ = run_pipeline(make_pipeline(), lines)
                    in_process = n / s
                    sat = asyncio.run(_saturation(broker.bootstrap_servers, design, lines, log_dir, timeout=300.0,
                                                  broker_pid=broker.pid, cpus=cpus))
                    rate = sat["events_per_second"]
                    cores = {k: rate * v / 1000 for k, v in sat["cpu_seconds_per_1000"].items()}
                    print(f"round {r + 1} [{design_name(design):>35}] cpus {cpus or 'all':>3}: {rate:,.0f} events/s, "
                          f"{rate / in_process:.0%} of in-process {in_process:,.0f}; cores used: worker tree "
                          f"{cores['worker']:.2f}, broker {cores['broker']:.2f}, reader {cores['reader']:.2f}; "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

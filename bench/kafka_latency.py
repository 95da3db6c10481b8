"""Produce-to-result latency of the Kafka worker at a fixed event rate, to compare trees at equal load.

``nwatch bench speed --kafka`` measures latency at half of each build's own
saturation, so a faster build is also asked for more events per second. This
runs the same latency phase (``streams.bench_kafka._latency``: embedded Tansu,
``nwatch run`` as a child, ADBench shuttle as transaction events, 2,500 warm-up
events, then ``--rate`` events/s for ``--seconds``) at a rate given here. It
imports ``streams`` from the working directory, so run it from the root of the
tree to measure (another tree: ``cd TREE && python /path/to/bench/kafka_latency.py``).

    python bench/kafka_latency.py --rate 2500 --rounds 2

Measured (2026-11-29, 2,500 events/s, aiokafka input and output, load average
4-5 from other jobs; main at 966a766 and branch speed3 alternating):
p99 main 478 / 221 / 886 / 764 ms, speed3 244 / 109 / 306 ms;
p50 main 158 / 87 / 263 / 290 ms, speed3 55 / 47 / 54 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.getcwd())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=2500.0, help="events per second (default 2500)")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--input-path", default="aiokafka", choices=["aiokafka", "faust"])
    p.add_argument("--output-path", default="aiokafka", choices=["aiokafka", "faust"])
    p.add_argument("--data-dir", default="../shared/data")
    args = p.parse_args()

    from streams.runtime import configure_threads

    configure_threads()
    from streams.bench_kafka import _latency
    from streams.bench_speed import WARMUP, load_tabular, tabular_lines
    from streams.broker import EmbeddedBroker

    X, _ = load_tabular(Path(args.data_dir), "32_shuttle", limit=WARMUP + 500)
    warm = tabular_lines(X, kind="transaction", prefix="k")
    log_dir = Path(tempfile.mkdtemp(prefix="nwatch-latency-"))
    with EmbeddedBroker() as broker:
        for _ in range(args.rounds):
            out = asyncio.run(_latency(broker.bootstrap_servers, (args.input_path, args.output_path), warm,
                                       args.rate, args.seconds, log_dir))
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Events per wall and per CPU second of the replay pipeline on an ADBench stream, as ``nwatch bench speed`` runs it.

The stream, batches and warm-up of ``nwatch bench speed`` (30,000 events, the
first 2,000 untimed), with the worker's collector thresholds; the CPU rate
(``time.process_time``) moves far less than the wall rate on a shared
machine, so two trees are compared by it, alternating::

    python bench/pipeline_rate.py [--runs N] [SET ...]    # default: 5 runs of 32_shuttle, 30_satellite
    PYTHONPATH=/work/main python bench/pipeline_rate.py   # another tree (run from its root)

Each set is replayed ``N`` times (a new pipeline each time); the median run is printed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from streams.runtime import configure_gc, configure_threads

configure_gc()
configure_threads()

from streams.bench_speed import WARMUP, load_tabular, make_pipeline, run_pipeline, tabular_lines  # noqa: E402

DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data"))


def rate(name: str, kind: str = "transaction", events: int = 30_000) -> tuple[float, float]:
    X, _ = load_tabular(DATA, name, limit=events)
    lines = tabular_lines(X, kind=kind)
    p = make_pipeline()
    run_pipeline(p, lines[:WARMUP], warmup=WARMUP)  # untimed, as the speed bench warms up
    c0 = time.process_time()
    n, wall, _ = run_pipeline(p, lines[WARMUP:], warmup=0)
    return n / wall, n / (time.process_time() - c0)


if __name__ == "__main__":
    args = sys.argv[1:]
    runs = 5
    if args[:1] == ["--runs"]:
        runs, args = int(args[1]), args[2:]
    for name in args or ["32_shuttle", "30_satellite"]:
        walls, cpus = zip(*(rate(name) for _ in range(runs)))
        wall, cpu = sorted(walls)[runs // 2], sorted(cpus)[runs // 2]
        print(f"{name}: median of {runs}: {wall:,.0f} events per wall second, {cpu:,.0f} per CPU second "
              f"(CPU {min(cpus):,.0f}-{max(cpus):,.0f})", flush=True)

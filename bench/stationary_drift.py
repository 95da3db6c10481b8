"""Drift records on stationary tabular streams: every one is a false alarm.

Each ADBench set is shuffled by a seed (the whole set, anomalies included, so
the stream is stationary by construction), cut at ``MAX_EVENTS`` rows and
replayed as ``transaction`` events through the pipeline of ``nwatch replay``
at default settings, in batches of 256. Prints, per set and seed, the drift
records (their positions in events seen) and the rate of flagged events among
the judged normal ones.

Run from the repository root: ``python bench/stationary_drift.py``
(``SETS`` the seven ADBench sets of the report, ``SEEDS=3``, ``MAX_EVENTS=30000``
are the defaults; ``SETS=32_shuttle`` for one).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from streams.bench_speed import load_tabular, tabular_lines
from streams.config import Settings
from streams.pipeline import Pipeline
from streams.quality_streams import TABULAR

DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data"))
SEEDS = int(os.environ.get("SEEDS", "3"))
MAX_EVENTS = int(os.environ.get("MAX_EVENTS", "30000"))
SETS = os.environ.get("SETS", ",".join(TABULAR)).split(",")
BATCH = 256


def run(name: str, seed: int) -> tuple[list[int], float, int]:
    """Drift alarm positions, false-alarm rate on judged normal events, events."""
    X, y = load_tabular(DATA, name, limit=MAX_EVENTS, seed=seed)
    lines = tabular_lines(X, kind="transaction")
    pipeline = Pipeline(settings=Settings())
    flagged: dict[str, bool] = {}
    judged: dict[str, bool] = {}
    alarms: list[int] = []
    for i in range(0, len(lines), BATCH):
        out = pipeline.process_raw(lines[i : i + BATCH])
        for d in out.drifts:
            alarms.append(d.events_seen)
        for _, r in out.scores:
            flagged[r.id] = r.is_anomaly
            judged[r.id] = not r.warming_up
    for d in pipeline.flush().drifts:
        alarms.append(d.events_seen)
    normal = [f"r{i}" for i in range(len(X)) if y[i] == 0 and judged.get(f"r{i}")]
    far = float(np.mean([flagged[i] for i in normal])) if normal else float("nan")
    return alarms, far, len(X)


def main() -> None:
    total = 0
    for name in SETS:
        for seed in range(SEEDS):
            t0 = time.perf_counter()
            alarms, far, n = run(name, seed)
            total += len(alarms)
            print(f"{name:<16} seed {seed}: {len(alarms)} drift records {alarms} "
                  f"| FAR {far:.4f} | {n} events, {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"total drift records: {total}")


if __name__ == "__main__":
    main()

"""Where the replay pipeline's time goes per event, stage by stage, on an ADBench stream.

The stream is the one of ``nwatch bench speed`` (an ADBench set shuffled with
seed 0, raw JSON lines, batches of 256); the first 4,096 events warm up
untimed; the collector runs at the worker's thresholds
(``streams.runtime.configure_gc``), as under ``nwatch``. Each stage is timed by wrapping its method with a clock, so the
figures are microseconds of wall time per event with the nesting of the
calls (``learn.commit.drift`` is part of ``learn.commit``); the wrappers add
well under a microsecond per event.

Run from the repository root::

    python bench/pipeline_stages.py [SET] [KIND] [EVENTS]   # default: 32_shuttle transaction 49000

To compare two trees, run it from each (``PYTHONPATH=<tree>``) in the same minutes.
Per-source settings come from the environment as for ``nwatch run``, e.g.
``NWATCH_SOURCES='{"tab": {"forest_trees": 50}}'``.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from pathlib import Path

from streams.runtime import configure_gc, configure_threads

configure_gc()  # the worker's collector thresholds, as nwatch sets them
configure_threads()

import detectors.drift as drift  # noqa: E402
import detectors.forest as forest  # noqa: E402
import detectors.index as index  # noqa: E402
import detectors.kernels as kernels  # noqa: E402
import detectors.knn as knn  # noqa: E402
import detectors.monitor as monitor  # noqa: E402
import models.tabular as tabular  # noqa: E402
import streams.pipeline as pipeline  # noqa: E402
from streams.bench_speed import BATCH, load_tabular, make_pipeline, tabular_lines  # noqa: E402

DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data"))
WARMUP = 4096

STAGES = [  # (owner, attribute, label)
    (pipeline.Pipeline, "decode_batch", "decode"),
    (pipeline.Pipeline, "decode", "decode"),
    (pipeline.Pipeline, "process", "process"),
    (pipeline.Pipeline, "_score", "score"),
    (pipeline.Pipeline, "_encode", "score.encode"),
    (monitor.SourceMonitor, "score", "score.monitor"),
    (knn.KNNDetector, "query", "score.monitor.knn"),
    (forest.IsolationForest, "score", "score.monitor.forest"),
    (index, "_candidates", "score.monitor.knn.candidates"),
    (index, "_nearest", "score.monitor.knn.nearest"),
    (kernels, "nearest_from_products", "score.monitor.knn.kernel"),
    (pipeline.Pipeline, "_learn", "learn"),
    (tabular.TransactionEncoder, "learn", "learn.encoder"),
    (monitor.SourceMonitor, "commit", "learn.commit"),
    (knn.KNNDetector, "learn", "learn.commit.knn"),
    (monitor.SourceMonitor, "_learn_components", "learn.commit.calibrate_components"),
    (forest.IsolationForest, "_grow", "learn.commit.grow_forest"),
    (drift.CentroidDriftMonitor, "update", "learn.commit.drift"),
    (drift.CentroidDriftMonitor, "_establish", "learn.commit.drift.new_reference"),
]


def main(name: str = "32_shuttle", kind: str = "transaction", events: int = 49_000) -> None:
    spent: collections.Counter[str] = collections.Counter()

    def timed(fn, label):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - t0

        return wrapper

    for owner, attr, label in STAGES:
        if hasattr(owner, attr):
            setattr(owner, attr, timed(getattr(owner, attr), label))
    X, _ = load_tabular(DATA, name, limit=events)
    lines = tabular_lines(X, kind=kind)
    p = make_pipeline()
    for i in range(0, min(WARMUP, len(lines)), BATCH):
        p.process_raw(lines[i : i + BATCH])
    spent.clear()
    t0 = time.perf_counter()
    for i in range(WARMUP, len(lines), BATCH):
        p.process_raw(lines[i : i + BATCH])
    total = time.perf_counter() - t0
    n = max(1, len(lines) - WARMUP)
    print(f"{name} ({kind}): {n:,} events timed, {total / n * 1e6:.1f} us per event")
    for label in dict.fromkeys(label for _, _, label in STAGES):  # decode: decode_batch, or decode in older trees
        if label in spent:
            print(f"  {label:<36} {spent[label] / n * 1e6:6.1f} us  {100 * spent[label] / total:5.1f}%")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*args[:2], *(int(a) for a in args[2:3]))

"""Tabular sets of ``nwatch bench quality`` under scoring variants (no baselines).

Each variant is a set of per-source settings for the ``tab`` source (k,
aggregate, ...); every ADBench set is replayed through the pipeline with seeds
0..SEEDS-1 (at most MAX_EVENTS events), as in the report. Prints judged ROC-AUC
per set, the mean over the sets and the worst false-alarm rate.

Run from the repository root: ``python bench/quality_tabular.py [variant ...]``
(variants: the keys of ``VARIANTS``; default: all).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from streams.bench_quality import run_anomaly_sets
from streams.config import Settings, SourceSettings
from streams.quality_streams import TABULAR

DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data"))
SEEDS = int(os.environ.get("SEEDS", "3"))
MAX_EVENTS = int(os.environ.get("MAX_EVENTS", "50000"))
SETS = os.environ.get("SETS", ",".join(TABULAR)).split(",")

VARIANTS: dict[str, dict] = {
    "default": {},
    "nopca": {"drift_components": 0},
    "k5": {"k": 5},
    "k20": {"k": 20},
    "max": {"aggregate": "max"},
    "k5max": {"k": 5, "aggregate": "max"},
    "admit3": {"admit_repeats": 3},  # the log sources' default, for transactions
    "ref5000": {"reference_size": 5000},
    "learn05": {"learn_alpha": 0.05},  # the default before quality3
    "learn10": {"learn_alpha": 0.1},
    "learn15": {"learn_alpha": 0.15},
    "learn20": {"learn_alpha": 0.2},
    "learn30": {"learn_alpha": 0.3},
    # the kNN distance combined with isolation trees on the reference (50: the
    # transaction default; 0: the kNN alone)
    "forest0": {"forest_trees": 0},
    "forest25": {"forest_trees": 25},
    "forest50": {"forest_trees": 50},
    "forest100": {"forest_trees": 100},
    "forest200": {"forest_trees": 200},
    "forest50k20": {"forest_trees": 50, "k": 20},
}


def main(names: list[str]) -> None:
    for name in names:
        settings = Settings(sources={"tab": SourceSettings(**VARIANTS[name])})
        res = run_anomaly_sets(DATA, settings, names=SETS, folder="tabular", seeds=SEEDS,
                               max_events=MAX_EVENTS, baselines=False, progress=lambda m: None)
        judged = {n: r["nwatch"]["roc_auc_judged"] for n, r in res.items()}
        far = max(r["nwatch"]["false_alarm_rate"] for r in res.values())
        print(f"{name:<8} " + " ".join(f"{n.split('_', 1)[1]} {v:.3f}" for n, v in judged.items())
              + f" | mean {np.mean(list(judged.values())):.4f} | worst FAR {far:.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(VARIANTS))

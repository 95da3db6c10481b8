"""How much of a tabular set's judged ROC-AUC is the stream order and how much the forest's draws.

Replays one ADBench set through the pipeline (``nwatch replay`` path, default
settings or the JSON in ``VARIANT``) for every pair of stream seed (the
shuffle of the set) and forest seed (the isolation trees' random draws, moved
by offsetting the seed the monitor gives its forest; the kNN, drift monitor
and every other draw keep theirs), and splits the spread: the standard
deviation between stream seeds of their means over the forest seeds, the
standard deviation within a stream seed over the forest seeds, and what a
3-seed mean (stream seeds 0-2, as in the report) moves with the forest's draws.

Run from the repository root:
``python bench/quality_spread.py [set] [stream seeds] [forest seeds]``
(default: ``23_mammography 10 10``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

import detectors.monitor as monitor
from detectors.forest import IsolationForest
from streams.bench_quality import figures, load_npz, replay
from streams.config import Settings, SourceSettings
from streams.quality_streams import tabular_stream

DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data")) / "tabular"
_offset = 0  # added (x 1000) to the forest's seed


class _OffsetForest(IsolationForest):
    def __init__(self, *, trees: int = 50, sample_size: int = 256, seed: int = 0) -> None:
        super().__init__(trees=trees, sample_size=sample_size, seed=seed + 1000 * _offset)


def main(name: str, stream_seeds: int, forest_seeds: int) -> None:
    global _offset
    monitor.IsolationForest = _OffsetForest  # type: ignore[misc]
    X, y = load_npz(DATA / f"{name}.npz")
    settings = Settings(sources={"tab": SourceSettings(**json.loads(os.environ.get("VARIANT", "{}")))})
    A = np.empty((stream_seeds, forest_seeds))
    for s in range(stream_seeds):
        stream = tabular_stream(name, X, y, seed=s, max_events=50_000)
        for f in range(forest_seeds):
            _offset = f
            A[s, f] = figures(stream.labels, replay(stream, settings))["roc_auc_judged"]
        print(f"stream seed {s}: " + " ".join(f"{v:.3f}" for v in A[s]), flush=True)
    by_stream = A.mean(axis=1)
    print(f"{name}: mean {A.mean():.4f} over {A.size} runs; range {A.min():.3f}-{A.max():.3f}")
    print(f"  stream order: sd of the stream seeds' means {by_stream.std(ddof=1):.4f} "
          f"(means {by_stream.min():.3f}-{by_stream.max():.3f})")
    if forest_seeds > 1:
        print(f"  forest draws: sd within a stream seed {np.sqrt(A.var(axis=1, ddof=1).mean()):.4f}")
    if stream_seeds >= 3:
        three = A[:3].mean(axis=0)
        print(f"  3-seed mean (stream seeds 0-2) over the forest seeds: {three.min():.4f}-{three.max():.4f}, "
              f"sd {three.std(ddof=1) if forest_seeds > 1 else 0.0:.4f}; forest seed 0 alone, "
              f"{stream_seeds} stream seeds: {A[:, 0].mean():.4f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "23_mammography", int(args[1]) if len(args) > 1 else 10,
         int(args[2]) if len(args) > 2 else 10)

"""Drift scenarios of ``nwatch bench quality``, the drift monitor alone, several scenario seeds.

The streams are those of the report (``streams.bench_quality.drift_streams``),
built with scenario seeds 0..SEEDS-1; text is embedded once with MiniLM (as the
pipeline does) and cached under ``/tmp``. Each stream goes through a
:class:`detectors.drift.CentroidDriftMonitor` with the pipeline's default
settings, once per value of ``components`` (0: the centroid statistic alone).
Prints the alarm positions and the delay after the change.

Run from the repository root: ``python bench/quality_drift.py [components ...]``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from detectors.drift import CentroidDriftMonitor
from streams.bench_quality import drift_streams

DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data"))
SEEDS = int(os.environ.get("SEEDS", "3"))
CACHE = Path("/tmp/nwatch-drift-embeddings")


def vectors(stream) -> np.ndarray:
    """The vectors the drift monitor sees for a stream's events (text through MiniLM, cached)."""
    events = [json.loads(line) for line in stream.lines]
    if events[0]["kind"] == "vector":
        return np.array([e["vector"] for e in events], dtype=np.float32)
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"{stream.name}_{stream.seed}.npy"
    if not path.exists():
        from models.text import shared_backend

        np.save(path, shared_backend().embed([e["text"] for e in events]))
    return np.load(path)


def main(components: list[int]) -> None:
    for seed in range(SEEDS):
        for stream in drift_streams(DATA, n_before=1500, n_after=1000, seed=seed):
            X = vectors(stream)
            ids = [f"e{i}" for i in range(len(X))]
            row = []
            for m in components:
                t0 = time.perf_counter()
                alarms = CentroidDriftMonitor(components=m).update(X, ids)
                at = [a.events_seen for a in alarms]
                delay = next((a - stream.change_at for a in at if stream.change_at and a > stream.change_at), None)
                false = sum(1 for a in at if stream.change_at is None or a <= stream.change_at)
                row.append(f"m={m}: {at} delay {delay} false {false} ({time.perf_counter() - t0:.1f}s)")
            print(f"seed {seed} {stream.name:<24} " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [0, 16])

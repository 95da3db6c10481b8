"""The isolation forest's compiled kernels against its NumPy code, on shuttle rows.

The reference is 2,000 standardised shuttle rows in 100 columns (9 filled, as
the transaction encoder lays them out); 50 trees of 256 rows, as the
``transaction`` default. Times, in the same process, alternating: scoring
blocks of 32 rows never scored before (a new path through every tree, as in
the pipeline), and regrowing the oldest 5 trees. Both paths give the same
scores and trees (tests/detectors/test_forest.py).

    python bench/forest_kernels.py [ROUNDS]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from detectors import kernels
from detectors.forest import IsolationForest
from streams.bench_speed import load_tabular

DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data"))


def main(rounds: int = 3) -> None:
    X, _ = load_tabular(DATA, "32_shuttle", limit=2_000 + 32 * 400)
    X = ((X - X.mean(axis=0)) / X.std(axis=0)).astype(np.float32)
    wide = np.zeros((len(X), 100), np.float32)
    wide[:, : X.shape[1]] = X
    R, Q = wide[:2_000], wide[2_000:]
    assert kernels.loaded(), "numba kernels off (NWATCH_SCAN_KERNEL=0?)"
    forest = IsolationForest(trees=50, seed=0)
    forest.fit(R)
    forest.score(Q[:32])  # compiled or loaded from the cache before timing
    blocks = [Q[i : i + 32] for i in range(0, len(Q), 32)]
    for r in range(rounds):
        line = []
        for on in (True, False):
            kernels.enabled = on
            t0 = time.perf_counter()
            for block in blocks:
                forest.score(block)
            score = (time.perf_counter() - t0) / len(blocks) * 1e6
            t0 = time.perf_counter()
            for _ in range(20):
                forest.regrow(R, 5)
            grow = (time.perf_counter() - t0) / 20 * 1e3
            name = "compiled" if on else "NumPy"
            line.append(f"{name}: score 32 rows {score:6.1f} us, regrow 5 trees {grow:5.2f} ms")
        print(f"round {r + 1}: " + "; ".join(line))
    kernels.enabled = True


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))

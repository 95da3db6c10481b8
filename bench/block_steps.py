"""Thread CPU time per 32-event block of the transaction path's compiled steps, against their NumPy paths, in one process.

The stream of ``nwatch bench speed`` (an ADBench set shuffled with seed 0, raw
JSON lines) is replayed to event 6,000 (4,000 for satellite); the next blocks of
32 events are then scored again and again, alternating:

- ``SourceMonitor.score`` with the compiled kNN + forest step and without it
  (``_score_compiled`` off: the scan and the forest compiled apart, the calibration
  and combination in NumPy);
- ``TransactionEncoder.encode`` then ``learn`` of the same block (the raw rows kept
  for learn), the scaler refresh held off.

Medians of 30 rounds, microseconds per block of 32 events (``time.thread_time``). In a
tree without the compiled step (``PYTHONPATH=<tree>``, run from its root) the score is
timed as it is::

    python bench/block_steps.py [SET]      # default 32_shuttle; 30_satellite
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from streams.runtime import configure_gc, configure_threads

configure_gc()
configure_threads()

from streams.bench_speed import load_tabular, make_pipeline, run_pipeline, tabular_lines  # noqa: E402

DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data"))
BLOCK, BLOCKS, ROUNDS = 32, 40, 30


def per_block(fn, blocks) -> float:
    """Median over ROUNDS of the thread CPU time of ``fn`` over every block, per block (us)."""
    times = []
    for _ in range(ROUNDS):
        t0 = time.thread_time()
        for b in blocks:
            fn(b)
        times.append((time.thread_time() - t0) / len(blocks) * 1e6)
    return float(np.median(times))


def main(name: str = "32_shuttle") -> None:
    X, _ = load_tabular(DATA, name, limit=30_000)
    lines = tabular_lines(X, kind="transaction")
    start = min(6_000, len(lines) - BLOCK * BLOCKS)
    p = make_pipeline()
    run_pipeline(p, lines[:start], warmup=start)
    state = next(iter(p.sources.values()))
    monitor, encoder = state.monitor, state.encoder
    events = [[e for _, e in p.decode(lines[s : s + BLOCK])[0]] for s in range(start, start + BLOCK * BLOCKS, BLOCK)]
    rows = [encoder.encode(b) for b in events]
    compiled = getattr(monitor, "_score_compiled", None)  # None in a tree without it
    if compiled is None:
        print(f"{name}: SourceMonitor.score per block of {BLOCK}: {per_block(monitor.score, rows):.1f} us")
    else:
        assert compiled(rows[0]) is not None, "the compiled step does not apply here"
        got: dict[str, list[float]] = {"compiled": [], "numpy": []}
        for _ in range(3):
            for label, step in (("compiled", compiled), ("numpy", lambda X: None)):
                monitor._score_compiled = step
                got[label].append(per_block(monitor.score, rows))
        monitor._score_compiled = compiled
        print(f"{name}: SourceMonitor.score per block of {BLOCK}: compiled step {np.median(got['compiled']):.1f} us, "
              f"NumPy path {np.median(got['numpy']):.1f} us")

    def encode_learn(b):
        encoder._scaler._since_refresh = 0  # no refresh: not what is compared
        encoder.encode(b)
        encoder.learn(b)

    print(f"{name}: TransactionEncoder.encode + learn per block of {BLOCK}: {per_block(encode_learn, events):.1f} us")


if __name__ == "__main__":
    main(*sys.argv[1:2])

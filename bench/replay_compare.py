"""Does a speed change keep the detection? Replays ADBench streams through two trees and compares every result.

Each tree's pipeline runs in a child process (``PYTHONPATH=<tree>``) on the
streams of ``nwatch bench speed`` (shuttle 30,000 events, satellite as
transaction and as vector events, cardio; batches of 256, then a flush) and
records, per event, the score, p-value, flags and neighbours (ids and
distances), the drift records whole and each source's drift statistic, threshold
and centroid at the end. Prints, per stream, how many of each differ
and the largest relative difference of scores and neighbour distances.

    python bench/replay_compare.py /work/main            # this tree against another
    python bench/replay_compare.py /work/main /work/wt-x # two other trees
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data")).resolve()
STREAMS = [("32_shuttle", "transaction", 30_000), ("30_satellite", "transaction", None),
           ("30_satellite", "vector", None), ("6_cardio", "transaction", None)]


def dump(out: str) -> None:
    """In the child: replay every stream through the tree on sys.path; pickle the results to ``out``."""
    from streams.runtime import configure_threads

    configure_threads()
    from streams.bench_speed import BATCH, load_tabular, make_pipeline, tabular_lines

    results = {}
    for name, kind, limit in STREAMS:
        X, _ = load_tabular(DATA, name, limit=limit)
        lines = tabular_lines(X, kind=kind)
        p = make_pipeline()
        recs, drifts = [], []
        for r in [p.process_raw(lines[i : i + BATCH]) for i in range(0, len(lines), BATCH)] + [p.flush()]:
            recs += [(rec.id, rec.score, rec.p_value, rec.is_anomaly, rec.warming_up,
                      tuple(n.id for n in rec.neighbours), tuple(n.distance for n in rec.neighbours))
                     for _, rec in r.scores]
            # the whole record (statistic, explanation...) but its time: the events carry none, so
            # it is the arrival time, the clock's
            drifts += [repr({k: v for k, v in d.to_dict().items() if k != "ts"}) for d in r.drifts]
        # and where each source's drift test stands at the end (its CUSUM, threshold and centroid)
        drifts += [(s.name, s.monitor.drift_monitor.statistic, s.monitor.drift_monitor.threshold,
                    s.monitor.drift_monitor._mu.tobytes()) for s in p.sources.values()
                   if s.monitor.drift_monitor is not None]
        results[f"{name} ({kind})"] = (recs, drifts)
    with open(out, "wb") as f:
        pickle.dump(results, f)


def replay(tree: Path, out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, __file__, "--dump", out], env=env, check=True, cwd=tree)
    with open(out, "rb") as f:
        return pickle.load(f)


def main(a: Path, b: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ra, rb = replay(a, f"{tmp}/a.pkl"), replay(b, f"{tmp}/b.pkl")
    print(f"A = {a}\nB = {b}")
    for key, (recs_a, drifts_a) in ra.items():
        recs_b, drifts_b = rb[key]
        if [r[0] for r in recs_a] != [r[0] for r in recs_b]:
            print(f"{key}: the events scored differ ({len(recs_a)} vs {len(recs_b)})")
            continue
        sa, sb = np.array([r[1] for r in recs_a]), np.array([r[1] for r in recs_b])
        rel = float(np.max(np.abs(sa - sb) / np.maximum(np.abs(sa), 1e-12), initial=0.0))
        drel = max((abs(x - y) / max(abs(x), 1e-12) for ea, eb in zip(recs_a, recs_b)
                    for x, y in zip(ea[6], eb[6])), default=0.0)
        print(f"{key}: {len(recs_a)} events; differ: p-values {sum(x[2] != y[2] for x, y in zip(recs_a, recs_b))}, "
              f"flags {sum(x[3:5] != y[3:5] for x, y in zip(recs_a, recs_b))}, "
              f"neighbour ids {sum(x[5] != y[5] for x, y in zip(recs_a, recs_b))}, "
              f"scores {int(np.sum(sa != sb))} (largest relative {rel:.1e}), neighbour distances largest relative {drel:.1e}; "
              f"anomalies {sum(r[3] for r in recs_a)} / {sum(r[3] for r in recs_b)}; "
              f"drift alarms {'the same' if drifts_a == drifts_b else 'DIFFER'} ({len(drifts_a)} / {len(drifts_b)})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--dump"]:
        dump(sys.argv[2])
    else:
        trees = [Path(t).resolve() for t in sys.argv[1:3]]
        main(trees[0], trees[1] if len(trees) > 1 else HERE)

"""Where the log workloads of ``nwatch bench speed --only logs`` spend their CPU, and what they output.

Replays BGL_2k and HDFS_2k x10 (the speed bench's streams, batches of 256,
the first sight of every template included) through the pipeline of the tree
given (its root: this checkout, or another one such as ``../main``) and prints
per workload the lines per second of wall time and of process CPU time (the
CPU figure moves less with the other jobs on a shared machine) and the CPU
seconds of the main stages (a stage's time includes the stages it calls: the
drift references include their calibrations).

``--records FILE`` also writes every score record and drift record; ``--compare
A B`` says where two such files differ (flags, p-values, neighbours, scores,
drift records with their explanations).

    python bench/log_stages.py [--tree ../main] [--records out.json]
    python bench/log_stages.py --compare main.json branch.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

DATA = Path("../shared/data")


def _timed(acc: collections.Counter, obj: object, name: str, label: str) -> None:
    f = getattr(obj, name)

    def g(*a, **k):
        c = time.process_time()
        try:
            return f(*a, **k)
        finally:
            acc[label] += time.process_time() - c

    setattr(obj, name, g)


def run(data: Path, records: Path | None) -> None:
    from streams.runtime import configure_gc, configure_threads

    configure_threads()
    configure_gc()
    import detectors.drift as dr
    import detectors.index as di
    import models.text as mt
    from streams.bench_speed import log_lines, make_pipeline

    acc: collections.Counter = collections.Counter()
    for obj, name, label in (
        (dr.CentroidDriftMonitor, "update", "drift"),
        (dr.CentroidDriftMonitor, "_establish", "drift references"),
        (dr, "calibrated_threshold", "threshold calibrations"),
        (dr.CentroidDriftMonitor, "_ensure_clusters", "explanation k-means"),
        (di.ReferenceIndex, "query", "kNN search"),
        (mt.OpenVINOBackend, "embed", "text model"),
    ):
        _timed(acc, obj, name, label)
    out = {}
    for fname, source, label in (("BGL_2k.log", "bgl", True), ("HDFS_2k.log", "hdfs", False)):
        lines = log_lines(data / "logs" / fname, source=source, passes=10, loghub_label=label)
        p = make_pipeline(None)
        p.preload()
        acc.clear()
        scores, drifts = [], []
        c, w = time.process_time(), time.perf_counter()
        for i in range(0, len(lines), 256):
            r = p.process_raw(lines[i : i + 256])
            if records is not None:
                scores += [(s.id, s.score, s.p_value, s.is_anomaly, [n[0] for n in s.neighbours]) for _, s in r.scores]
                drifts += [d.to_dict() | {"ts": None} for d in r.drifts]
        cpu, wall = time.process_time() - c, time.perf_counter() - w
        stages = ", ".join(f"{k} {v:.2f}" for k, v in acc.most_common())
        print(f"{fname} x10: {len(lines) / wall:,.0f} lines/s wall, {len(lines) / cpu:,.0f} per CPU second "
              f"({cpu:.2f} s CPU: {stages})", flush=True)
        out[source] = {"scores": scores, "drifts": drifts}
    if records is not None:
        records.write_text(json.dumps(out))


def compare(a_path: Path, b_path: Path) -> None:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    for source in a:
        sa, sb = a[source]["scores"], b[source]["scores"]
        differ = collections.Counter()
        for x, y in zip(sa, sb):
            differ["ids"] += x[0] != y[0]
            differ["scores"] += x[1] != y[1]
            differ["p-values"] += x[2] != y[2]
            differ["flags"] += x[3] != y[3]
            differ["neighbours"] += x[4] != y[4]
        same = a[source]["drifts"] == b[source]["drifts"]
        print(f"{source}: {len(sa)} / {len(sb)} score records, differing: {dict(differ)}; "
              f"{len(a[source]['drifts'])} / {len(b[source]['drifts'])} drift records, identical: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=Path("."), help="repository root whose code runs")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--records", type=Path)
    ap.add_argument("--compare", type=Path, nargs=2)
    args = ap.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    sys.path.insert(0, str(args.tree.resolve()))
    run(args.data.resolve(), args.records)


if __name__ == "__main__":
    main()

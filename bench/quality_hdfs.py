"""HDFS block sessions: how far template counts can go, and what the pipeline makes of them.

1. The ceiling: anomalous sessions whose template-count vector (or whole
   template sequence) also occurs as a normal session cannot be told apart
   by any detector that sees only templates.
2. The pipeline (``nwatch replay`` path) on the sessions in time order as
   ``transaction`` and as ``vector`` (l2) events, with the default drift
   policy, with drift ``keep``, with drift off, with ``admit_repeats = 3``
   (the log sources' default), with ``forest_trees = 0`` (the kNN alone; the
   transaction default combines it with 50 isolation trees) and 100: F1 at
   alpha and ROC-AUC.

Run from the repository root: ``python bench/quality_hdfs.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

from streams.bench_quality import figures, replay
from streams.config import Settings, SourceSettings
from streams.quality_streams import hdfs_sessions, hdfs_stream

DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data")) / "logs" / "hdfs_sessions"


def main() -> None:
    sessions, y = hdfs_sessions(DATA)
    s = hdfs_stream(DATA)
    X = s.X
    normal_counts = {tuple(r) for r in X[y == 0]}
    normal_seqs = {tuple(x["templates"]) for x in sessions if x["label"] == 0}
    anomalies = int(y.sum())
    same_counts = sum(tuple(r) in normal_counts for r in X[y == 1])
    same_seq = sum(tuple(x["templates"]) in normal_seqs for x in sessions if x["label"] == 1)
    print(f"{len(y)} sessions, {anomalies} anomalous, {X.shape[1]} templates")
    print(f"anomalous sessions with the count vector of a normal one: {same_counts}; same sequence: {same_seq}")
    best_recall = (anomalies - same_counts) / anomalies
    print(f"without false alarms recall <= {best_recall:.3f}, F1 <= {2 * best_recall / (1 + best_recall):.3f}")
    for kind in ("transaction", "vector"):
        stream = hdfs_stream(DATA, kind=kind)
        metric = "l2" if kind == "vector" else None
        for label, extra in (("default", {}), ("drift keep", {"drift_policy": "keep"}), ("drift off", {"drift": False}),
                             ("admit 3", {"admit_repeats": 3}), ("forest 0", {"forest_trees": 0}),
                             ("forest 100", {"forest_trees": 100})):
            st = Settings(sources={"hdfs": SourceSettings(metric=metric, **extra)})
            f = figures(stream.labels, replay(stream, st))
            print(f"{kind:<11} {label:<10} ROC-AUC {f['roc_auc']:.3f}  precision {f['precision']:.3f}  "
                  f"recall {f['recall']:.3f}  F1 {f['f1']:.3f}  FAR {f['false_alarm_rate']:.4f}")


if __name__ == "__main__":
    main()

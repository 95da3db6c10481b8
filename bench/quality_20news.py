"""20news BERT vectors (issue #4: ROC-AUC >= 0.75 wanted): the batch figure behind the target,
and the pipeline's scorers over many stream seeds.

``batch``: the 70/30 protocol of ADBench (a stratified split per seed, PyOD's
KNN: k=5, the largest of the 5 distances, fitted on the 70 % with its
anomalies, scoring the 30 %), over 30 split seeds, l2 and cosine, fitted on
all of the 70 % or on its normal rows only; then the same splits scored by the
Mahalanobis distance under the Ledoit-Wolf covariance of the 70 %
(``detectors.shrunk``).

``stream``: the sets as ``vector`` events (``streams.quality_streams``) in
shuffled orders, each through a fresh pipeline as in ``nwatch bench quality``
(``streams.bench_quality.replay``), once per scorer variant; mean (and
spread) over seeds of judged ROC-AUC, ROC-AUC over all events, and the
false-alarm rate on judged normals. 20news over ``--seeds`` seeds (10), CIFAR
over ``--cifar-seeds`` (3; 5,263 events each).

Run from the repository root: ``python bench/quality_20news.py [batch] [stream]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from detectors.shrunk import ShrunkMahalanobis
from streams.bench_quality import figures, replay
from streams.config import Settings
from streams.quality_metrics import roc_auc
from streams.quality_streams import load_npz, vector_stream

DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data"))

VARIANTS: dict[str, dict] = {
    "default (kNN, cosine)": {},
    "mahalanobis, cosine": {"scorer": "mahalanobis"},
    "mahalanobis, l2": {"scorer": "mahalanobis", "metric": "l2"},
    "kNN, l2": {"metric": "l2"},
    "kNN + 50 trees, cosine": {"forest_trees": 50},
    "kNN k=5 largest, cosine": {"k": 5, "aggregate": "max"},
}


def split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified 70/30 split: 30 % of each class to the test side."""
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: round(0.3 * np.sum(y == c))]
                           for c in (0, 1)])
    return np.setdiff1d(np.arange(len(y)), test), np.sort(test)


def kth_distance(F: np.ndarray, T: np.ndarray, k: int = 5, metric: str = "l2") -> np.ndarray:
    """Distance of each row of ``T`` to its ``k``-th nearest row of ``F`` (PyOD KNN "largest")."""
    if metric == "cosine":
        F = F / np.linalg.norm(F, axis=1, keepdims=True)
        T = T / np.linalg.norm(T, axis=1, keepdims=True)
        D = 1.0 - T @ F.T
    else:
        D = np.sqrt(np.maximum((T**2).sum(1)[:, None] + (F**2).sum(1)[None] - 2.0 * T @ F.T, 0.0))
    return np.partition(D, k - 1, axis=1)[:, k - 1]


def batch(X: np.ndarray, y: np.ndarray, seeds: int = 30) -> None:
    rows: dict[str, list[float]] = {}
    for seed in range(seeds):
        tr, te = split(y, seed)
        normal = tr[y[tr] == 0]
        for metric in ("l2", "cosine"):
            rows.setdefault(f"kNN {metric}, fit on the 70 %", []).append(
                roc_auc(y[te], kth_distance(X[tr], X[te], metric=metric)))
            rows.setdefault(f"kNN {metric}, fit on its normals", []).append(
                roc_auc(y[te], kth_distance(X[normal], X[te], metric=metric)))
        m = ShrunkMahalanobis()
        m.fit(X[tr])
        rows.setdefault("Mahalanobis (Ledoit-Wolf), fit on the 70 %", []).append(roc_auc(y[te], m.score(X[te])))
    print(f"batch 70/30, {seeds} split seeds: ROC-AUC mean, sd, min, max; mean of seeds 0-2")
    for name, r in rows.items():
        a = np.array(r)
        print(f"  {name:44s} {a.mean():.3f} {a.std(ddof=1):.3f} {a.min():.3f} {a.max():.3f}; {a[:3].mean():.3f}")


def stream(name: str, seeds: int, variants: list[str]) -> None:
    X, y = load_npz(DATA / "vectors" / f"{name}.npz")
    stream_figures(name, [(X, y)] * seeds, variants)


def stream_figures(name: str, sets: list[tuple[np.ndarray, np.ndarray]], variants: list[str]) -> dict[str, np.ndarray]:
    """Each variant over the sets, set ``i`` shuffled by seed ``i``: judged ROC-AUC, ROC-AUC, FAR per set."""
    print(f"{name}, pipeline, {len(sets)} stream seeds: judged ROC-AUC mean (sd; seeds 0-2), all events, "
          "FAR judged (seeds 0-2)")
    out = {}
    for v in variants:
        res = []
        for seed, (X, y) in enumerate(sets):
            s = vector_stream(name, X, y, seed=seed, max_events=len(X))
            # the variant's settings alone (the report's opt-in row: streams.bench_quality.OPT_IN)
            f = figures(s.labels, replay(s, Settings(sources={s.source: VARIANTS[v]})))
            res.append((f["roc_auc_judged"], f["roc_auc"], f["false_alarm_rate"]))
        a = out[v] = np.array(res)
        sd = a[:, 0].std(ddof=1) if len(a) > 1 else float("nan")
        print(f"  {v:24s} {a[:, 0].mean():.3f} ({sd:.3f}; {a[:3, 0].mean():.3f}) "
              f"{a[:, 1].mean():.3f} {a[:, 2].mean():.4f} ({a[:3, 2].mean():.4f})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("parts", nargs="*", default=["batch", "stream"])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--cifar-seeds", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    a = ap.parse_args()
    if "batch" in a.parts:
        X, y = load_npz(DATA / "vectors" / "20news_3_bert.npz")
        batch(X, y)
    if "stream" in a.parts:
        stream("20news_3_bert", a.seeds, a.variants)
    if "cifar" in a.parts or ("stream" in a.parts and a.cifar_seeds):
        stream("cifar10_0_resnet18", a.cifar_seeds, a.variants)


if __name__ == "__main__":
    main()

"""``nwatch bench quality``: detection quality of the replay pipeline on the labelled data.

First figures (the full evaluation with baselines grows from here):

- the ADBench tabular sets as ``transaction`` events in shuffled order (seeds 0, 1, 2),
- BGL_2k as ``log`` events in file order (the label token stripped from each line),
- the ADBench NLP/CV embeddings as ``vector`` events in shuffled order,

each scored by exactly the pipeline of ``nwatch replay``: ROC-AUC and PR-AUC
over all scored events, and at the source's alpha the false-alarm rate on
normal events and the recall on anomalies (warm-up excluded).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from streams.config import Settings
from streams.pipeline import Pipeline

TABULAR = ["6_cardio", "38_thyroid", "30_satellite", "23_mammography", "32_shuttle", "34_smtp", "16_http"]
VECTORS = ["20news_3_bert", "cifar10_0_resnet18"]


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) identity, ties averaged."""
    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = np.asarray(s)[order]
    # average ranks over ties
    uniq, start, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pr_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision (the step-wise area under the precision-recall curve)."""
    y = np.asarray(y, dtype=bool)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-np.asarray(s), kind="mergesort")
    hits = y[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / hits.sum())


def _score(pipeline: Pipeline, lines: Iterator[bytes], batch: int = 256) -> list:
    out, buf = [], []
    for line in lines:
        buf.append(line)
        if len(buf) == batch:
            out.extend(r for _, r in pipeline.process_raw(buf).scores)
            buf = []
    if buf:
        out.extend(r for _, r in pipeline.process_raw(buf).scores)
    return out


def _figures(records: list, seconds: float) -> dict:
    y = np.array([r.label for r in records])
    s = np.array([r.score for r in records])
    judged = np.array([not r.warming_up for r in records])
    flag = np.array([r.is_anomaly for r in records])
    normal, anomalous = judged & (y == 0), judged & (y == 1)
    return {
        "events": len(records),
        "roc_auc": roc_auc(y, s),
        "pr_auc": pr_auc(y, s),
        "roc_auc_judged": roc_auc(y[judged], s[judged]),
        "false_alarm_rate": float(flag[normal].mean()) if normal.any() else float("nan"),
        "recall": float(flag[anomalous].mean()) if anomalous.any() else float("nan"),
        "events_per_second": len(records) / seconds if seconds else 0.0,
    }


def _tabular_lines(X: np.ndarray, y: np.ndarray, order: np.ndarray) -> Iterator[bytes]:
    names = [f"f{j}" for j in range(X.shape[1])]
    for i in order:
        fields = {n: float(v) for n, v in zip(names, X[i])}
        yield json.dumps({"id": f"r{i}", "source": "tab", "kind": "transaction", "fields": fields,
                          "label": int(y[i])}).encode()


def _vector_lines(X: np.ndarray, y: np.ndarray, order: np.ndarray) -> Iterator[bytes]:
    for i in order:
        yield json.dumps({"id": f"r{i}", "source": "vec", "kind": "vector",
                          "vector": [round(float(v), 6) for v in X[i]], "label": int(y[i])}).encode()


def _bgl_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f):
            label_token, _, rest = raw.decode("utf-8", "replace").rstrip("\n").partition(" ")
            yield json.dumps({"id": f"bgl{n}", "source": "bgl", "kind": "log", "line": rest,
                              "label": int(label_token != "-")}).encode()


def _published(data_dir: Path) -> dict[str, dict[str, float]]:
    path = data_dir / "tabular" / "ADBench_TableD4_AUCROC_unsupervised.csv"
    with open(path) as f:
        return {row["dataset"]: row for row in csv.DictReader(f)}


def main(*, data_dir: str, seeds: int = 3, max_events: int = 50_000, json_out: str | None = None,
         only: list[str] | None = None) -> int:
    data = Path(data_dir)
    if not data.is_dir():
        print(f"no labelled data at {data} (NWATCH_DATA_DIR or --data-dir)")
        return 1
    published = _published(data)
    results: dict[str, dict] = {}
    want = lambda name: only is None or any(o in name for o in only)  # noqa: E731

    print("ROC-AUC over all events / over judged events (warm-up excluded); FAR and recall at alpha")
    print(f"{'stream':<26} {'events':>7} {'ROC-AUC':>8} {'judged':>7} {'PR-AUC':>7} {'FAR@a':>7} {'recall':>7} "
          f"{'ADBench KNN':>11} {'IForest':>8} {'ev/s':>7}")
    sets = [(n, "tabular", _tabular_lines) for n in TABULAR] + [(n, "vectors", _vector_lines) for n in VECTORS]
    for name, folder, to_lines in sets:
        if not want(name):
            continue
        d = np.load(data / folder / f"{name}.npz", allow_pickle=True)
        X, y = d["X"].astype(np.float64), d["y"].astype(int)
        runs = []
        for seed in range(seeds):
            order = np.random.default_rng(seed).permutation(len(X))[:max_events]
            pipe = Pipeline(settings=Settings())
            t0 = time.perf_counter()
            recs = _score(pipe, to_lines(X, y, order))
            runs.append(_figures(recs, time.perf_counter() - t0))
        agg = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        agg["seeds"] = seeds
        agg["roc_auc_judged_by_seed"] = [r["roc_auc_judged"] for r in runs]
        pub = published.get(name.split("_", 1)[1], {})
        if pub:
            agg["adbench_knn"] = float(pub.get("KNN", "nan")) / 100
            agg["adbench_iforest"] = float(pub.get("IForest", "nan")) / 100
        results[name] = agg
        _row(name, agg)
    if want("BGL"):
        pipe = Pipeline(settings=Settings())
        t0 = time.perf_counter()
        recs = _score(pipe, _bgl_lines(data / "logs" / "BGL_2k.log"))
        results["BGL_2k"] = agg = _figures(recs, time.perf_counter() - t0)
        _row("BGL_2k (file order)", agg)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _row(name: str, r: dict) -> None:
    print(
        f"{name:<26} {r['events']:>7,.0f} {r['roc_auc']:>8.3f} {r['roc_auc_judged']:>7.3f} {r['pr_auc']:>7.3f} {r['false_alarm_rate']:>7.4f} "
        f"{r['recall']:>7.3f} {r.get('adbench_knn', float('nan')):>11.3f} {r.get('adbench_iforest', float('nan')):>8.3f} "
        f"{r['events_per_second']:>7,.0f}",
        flush=True,
    )

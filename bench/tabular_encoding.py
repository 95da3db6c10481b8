"""Measure the transaction encoder: detection quality on ADBench streams, and speed.

Quality: each ADBench "Classical" set in ``$NWATCH_DATA_DIR/tabular`` (default
``../shared/data`` beside the repository) becomes a stream of transaction
events with fields ``f0 .. f{d-1}`` in a shuffled order (seeds 0, 1, 2). The
first 256 events warm up the encoder (learnt, then encoded into the reference,
never scored). Then, batch by batch (256 events, as the pipeline does):

1. encode the batch with the encoder's current state;
2. score every event by its mean L2 distance to its k = 10 nearest neighbours
   in the reference: a rolling window of the last 2000 *accepted* events
   (exact kNN, brute force);
3. accept the events whose score is not in the top 1 % of all scores so far
   (score, then learn; never learn from what you flagged): the encoder learns
   them and their vectors (as encoded in step 1) enter the window.

Events of one batch do not see each other, as in the pipeline. ROC-AUC is over
the scored events (the warm-up excluded). ``http`` and ``smtp`` (567k / 95k
rows) are cut to the first 50k events of each shuffled order by default.

The ``reencode`` variant re-encodes the whole window with the current state
before scoring each batch: the gap to the default shows how much the stale
vectors of a rolling reference cost. ``raw`` scores the unscaled features
with the same kNN, for scale.

``synth-heavy`` is a synthetic set (see :func:`heavy_tailed`), not ADBench:
a log-normal amount whose tail is normal, to check what the squash is for.

Speed: encode + learn of synthetic transactions in batches of 256, in events
per CPU-second of this process (``time.process_time``, so other load on the
machine counts less).

Run from the repository root::

    python bench/tabular_encoding.py                # everything: 30 to 60 min on 2 cores
    python bench/tabular_encoding.py --quick        # seed 0, fewer variants
    python bench/tabular_encoding.py --speed-only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.events import Event  # noqa: E402
from models.tabular import TransactionEncoder  # noqa: E402

DATASETS = ["cardio", "thyroid", "satellite", "mammography", "shuttle", "smtp", "http"]
WARMUP = 256
BATCH = 256
K = 10
WINDOW = 2000
FLAG_QUANTILE = 0.99  # top 1 % of scores so far are kept out of the reference


@dataclass(frozen=True)
class Variant:
    name: str
    encoder: dict = field(default_factory=dict)  # TransactionEncoder keywords
    reencode: bool = False
    raw: bool = False


VARIANTS = [
    Variant("default", {}),  # squash_scale 30, reservoir 2048, refresh 512
    Variant("knee1", {"squash_scale": 1.0}),  # arcsinh(z), as RobustScaler(squash=True)
    Variant("knee5", {"squash_scale": 5.0}),
    Variant("knee10", {"squash_scale": 10.0}),
    Variant("no-squash", {"squash": False}),
    Variant("res256", {"scaler_reservoir": 256}),
    Variant("res8192", {"scaler_reservoir": 8192}),
    Variant("refresh128", {"scaler_refresh": 128}),
    Variant("reencode", {}, reencode=True),
    Variant("raw", raw=True),
]
QUICK = ["default", "knee1", "no-squash", "res256", "raw"]


def data_dir() -> Path:
    return Path(os.environ.get("NWATCH_DATA_DIR", ROOT.parent / "shared" / "data"))


def heavy_tailed(n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic payments: a log-normal amount (the tail is normal, not fraud)
    and 7 correlated features; 2 % anomalies sit 4 standard deviations off in
    the correlated features with an ordinary amount. Not ADBench: it checks
    that the squash keeps the amount's tail from swamping the other fields.
    """
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(7, 7)) / np.sqrt(7)
    Z = rng.normal(size=(n, 7))
    y = (rng.random(n) < 0.02).astype(int)
    shift = rng.normal(size=(n, 7))
    shift *= 4.0 / np.linalg.norm(shift, axis=1, keepdims=True)
    Z[y == 1] += shift[y == 1]
    amount = rng.lognormal(3.0, 1.5, size=n)
    return np.column_stack([amount, Z @ mix]), y


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "synth-heavy":
        return heavy_tailed()
    path = next((data_dir() / "tabular").glob(f"*_{name}.npz"))
    with np.load(path, allow_pickle=True) as d:
        return np.asarray(d["X"], dtype=np.float64), np.asarray(d["y"], dtype=int)


def to_events(X: np.ndarray, source: str) -> list[Event]:
    names = [f"f{j}" for j in range(X.shape[1])]
    return [
        Event(id=str(i), kind="transaction", source=source, ts=0.0,
              payload=dict(zip(names, row)))
        for i, row in enumerate(X.tolist())
    ]


def knn_scores(Q: np.ndarray, R: np.ndarray, k: int) -> np.ndarray:
    """Mean L2 distance of each row of Q to its k nearest rows of R (exact)."""
    d2 = (Q * Q).sum(1)[:, None] + (R * R).sum(1)[None, :] - 2.0 * Q @ R.T
    np.maximum(d2, 0.0, out=d2)
    kk = min(k, R.shape[0])
    nearest = np.partition(d2, kk - 1, axis=1)[:, :kk]
    return np.sqrt(nearest).mean(1)


def run_stream(X: np.ndarray, source: str, variant: Variant, seed: int) -> np.ndarray:
    """Scores of events WARMUP.. of the stream X (rows already in stream order)."""
    events = to_events(X, source)
    if variant.raw:
        enc = None

        def encode(evs: Sequence[Event], idx: np.ndarray) -> np.ndarray:
            return X[idx]
    else:
        enc = TransactionEncoder(seed=seed, **variant.encoder)

        def encode(evs: Sequence[Event], idx: np.ndarray) -> np.ndarray:
            return enc.encode(evs).astype(np.float64)

    warm = np.arange(WARMUP)
    if enc is not None:
        enc.learn(events[:WARMUP])
    window_idx = list(warm)  # indices of accepted events, oldest first
    window_vec = encode(events[:WARMUP], warm)
    out = np.empty(len(events) - WARMUP)
    for start in range(WARMUP, len(events), BATCH):
        idx = np.arange(start, min(start + BATCH, len(events)))
        batch = events[start : idx[-1] + 1]
        V = encode(batch, idx)
        if variant.reencode:
            window_vec = encode([events[i] for i in window_idx], np.asarray(window_idx))
        s = knn_scores(V, window_vec, K)
        out[start - WARMUP : idx[-1] + 1 - WARMUP] = s
        threshold = np.quantile(out[: idx[-1] + 1 - WARMUP], FLAG_QUANTILE)
        ok = s <= threshold
        accepted = idx[ok]
        if enc is not None and len(accepted):
            enc.learn([events[i] for i in accepted])
        window_idx.extend(accepted.tolist())
        window_vec = np.vstack([window_vec, V[ok]])
        if len(window_idx) > WINDOW:
            drop = len(window_idx) - WINDOW
            window_idx = window_idx[drop:]
            window_vec = window_vec[drop:]
    return out


def published(name: str) -> dict[str, float]:
    import csv

    path = data_dir() / "tabular" / "ADBench_TableD4_AUCROC_unsupervised.csv"
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["dataset"].lower() == name:
                return {k: float(row[k]) for k in ("KNN", "IForest")}
    return {}


def quality(
    variants: list[Variant], seeds: list[int], max_events: int, datasets: list[str]
) -> dict:
    from sklearn.metrics import roc_auc_score

    results: dict = {}
    for name in datasets:
        X, y = load(name)
        results[name] = {"rows": len(X), "d": X.shape[1], "auc": {}, "published": published(name)}
        for v in variants:
            aucs = []
            t0 = time.perf_counter()
            for seed in seeds:
                order = np.random.default_rng(seed).permutation(len(X))[:max_events]
                scores = run_stream(X[order], name, v, seed)
                aucs.append(100.0 * roc_auc_score(y[order][WARMUP:], scores))
            results[name]["auc"][v.name] = aucs
            results[name]["used"] = min(len(X), max_events)
            print(
                f"{name:12s} {v.name:18s} AUC {np.mean(aucs):6.2f} +- {np.std(aucs):5.2f}"
                f"  ({time.perf_counter() - t0:5.1f} s)",
                flush=True,
            )
    return results


def synthetic(n: int, d: int, n_cat: int, seed: int = 0) -> list[Event]:
    rng = np.random.default_rng(seed)
    num = rng.lognormal(size=(n, d)).tolist()
    cats = rng.zipf(1.5, size=(n, n_cat)) % 500
    names = [f"f{j}" for j in range(d)]
    out = []
    for i in range(n):
        payload: dict = dict(zip(names, num[i]))
        for c in range(n_cat):
            payload[f"c{c}"] = f"v{cats[i, c]}"
        out.append(Event(id=str(i), kind="transaction", source="s", ts=1.7e9 + i,
                         payload=payload, has_ts=True))
    return out


def speed(configs: list[tuple[int, int]], n_batches: int = 60, **encoder_kw) -> list[dict]:
    rows = []
    for d, n_cat in configs:
        events = synthetic(BATCH * (n_batches + 20), d, n_cat)
        enc = TransactionEncoder(**encoder_kw)
        batches = [events[b : b + BATCH] for b in range(0, len(events), BATCH)]
        for b in batches[:20]:  # past the scaler's frequent early refreshes
            enc.learn(b)
        t_enc = t_learn = 0.0
        for b in batches[20:]:
            t0 = time.process_time()
            enc.encode(b)
            t1 = time.process_time()
            enc.learn(b)
            t2 = time.process_time()
            t_enc += t1 - t0
            t_learn += t2 - t1
        n = BATCH * (len(batches) - 20)
        row = {"numeric": d, "categorical": n_cat, "encode_eps": n / t_enc,
               "learn_eps": n / t_learn, "both_eps": n / (t_enc + t_learn), **encoder_kw}
        rows.append(row)
        print(
            f"d={d:2d} cat={n_cat} {encoder_kw or ''}: encode {row['encode_eps']:9,.0f}/s  "
            f"learn {row['learn_eps']:9,.0f}/s  encode+learn {row['both_eps']:9,.0f}/s",
            flush=True,
        )
    return rows


def table(results: dict, variants: list[str]) -> str:
    head = ["dataset", "n", "d"] + variants + ["ADB KNN", "ADB IForest"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means: dict[str, list[float]] = {v: [] for v in variants}
    for name, r in results.items():
        cells = [name, str(r["used"]), str(r["d"])]
        for v in variants:
            a = r["auc"][v]
            if r["published"]:  # the mean row is over the ADBench sets only
                means[v].append(float(np.mean(a)))
            cells.append(f"{np.mean(a):.1f}" + (f" ±{np.std(a):.1f}" if len(a) > 1 else ""))
        cells += [f"{r['published'].get('KNN', float('nan')):.1f}",
                  f"{r['published'].get('IForest', float('nan')):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    adb = [r for r in results.values() if r["published"]]
    if not adb:
        return "\n".join(lines)
    pub = {k: np.mean([r["published"][k] for r in adb]) for k in ("KNN", "IForest")}
    lines.append(
        "| mean (ADBench) | | | " + " | ".join(f"{np.mean(means[v]):.1f}" for v in variants)
        + f" | {pub['KNN']:.1f} | {pub['IForest']:.1f} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="seed 0 and five variants")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-events", type=int, default=50_000)
    p.add_argument("--datasets", nargs="+", default=DATASETS)
    p.add_argument("--variants", nargs="+", default=None, help="names, see VARIANTS")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)

    report: dict = {}
    print("== speed (synthetic, batches of 256, events per CPU-second) ==")
    report["speed"] = speed([(10, 0), (20, 3), (32, 0)])
    report["speed"] += speed([(32, 0)], scaler_refresh=128)
    if not args.speed_only:
        seeds = [0] if args.quick else args.seeds
        names = args.variants or (QUICK if args.quick else [v.name for v in VARIANTS])
        chosen = [v for v in VARIANTS if v.name in names]
        print(f"== quality (ROC-AUC x100, seeds {seeds}, k={K}, window {WINDOW}) ==")
        res = quality(chosen, seeds, args.max_events, args.datasets)
        report["quality"] = res
        print()
        print(table(res, [v.name for v in chosen]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()

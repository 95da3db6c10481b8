"""Measure the log encoder on the Loghub 2k samples: templates, speed, a first quality figure.

Run from the project root::

    python bench/log_templates.py [--data ../shared/data] [--quick]

1. Templates per file (``*_2k.log``) and templater-only throughput.
2. Throughput of template + encode (+ learn, as the pipeline does) over BGL_2k
   and HDFS_2k with the real all-MiniLM-L6-v2 backend, model load excluded:
   pass 1 includes the first sight of every template (model calls), later
   passes replay the same lines against a warm encoder. Batch size 1 (one
   event at a time, the worst case) and 64; raw-line cache off, and on with
   64 entries (enough for the encode-then-learn of one batch; a cache holding
   the whole replayed file would only measure the replay).
3. Quality: BGL_2k in file order; the first token of a line is the label
   ('-' normal, anything else alert) and is stripped before templating.
   Streaming exact kNN: each line is scored against the previously accepted
   lines (k=5 mean L2 distance, window 2000), then accepted lines are learnt
   by the encoder and join the reference. Two acceptance rules: every line,
   and "not above the 95th percentile of accepted scores" after 100 lines.
   ROC-AUC and average precision over the lines from index k on, for several
   ``novelty_weight`` values, a rarity-only and a raw-line (no templating)
   baseline.

Timings are best-of-``--repeat`` wall clock on a shared 2-core machine: read
them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.events import Event  # noqa: E402
from models.logs import LogEncoder, LogTemplater  # noqa: E402
from models.text import EmbeddingCache, TextEncoder, shared_backend  # noqa: E402

K = 5
WINDOW = 2000


def read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [ln for ln in text.splitlines() if ln.strip()]


def events_of(lines: list[str], source: str) -> list[Event]:
    return [
        Event(id=f"{source}-{i}", kind="log", source=source, ts=float(i), payload=ln)
        for i, ln in enumerate(lines)
    ]


def templates_per_file(logs_dir: Path, repeat: int) -> None:
    print("## templates per file (templater only)")
    print(f"{'file':<22}{'lines':>7}{'templates':>11}{'lines/s':>10}")
    for path in sorted(logs_dir.glob("*_2k.log")):
        lines = read_lines(path)
        best = float("inf")
        for _ in range(repeat):
            t = LogTemplater()  # no cache: every line templated
            t0 = time.perf_counter()
            out = t.templates(lines)
            best = min(best, time.perf_counter() - t0)
        print(f"{path.name:<22}{len(lines):>7}{len(set(out)):>11}{len(lines) / best:>10.0f}")


def replay(enc: LogEncoder, events: list[Event], batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(events), batch):
        chunk = events[i : i + batch]
        enc.encode(chunk)
        enc.learn(chunk)
    return time.perf_counter() - t0


def throughput(logs_dir: Path, backend, passes: int) -> None:
    print("\n## template + encode + learn throughput, real model (load excluded)")
    print(f"{'file':<14}{'batch':>6}{'line cache':>11}{'pass 1 l/s':>12}"
          f"{'passes 2+ l/s':>15}{'model calls':>13}{'templates':>11}")
    for name in ("BGL_2k.log", "HDFS_2k.log"):
        events = events_of(read_lines(logs_dir / name), name)
        for batch in (1, 64):
            for line_cache in (0, 64):
                enc = LogEncoder(backend=backend, line_cache_size=line_cache)
                first = replay(enc, events, batch)
                warm = min(replay(enc, events, batch) for _ in range(passes))
                print(
                    f"{name:<14}{batch:>6}{line_cache:>11}{len(events) / first:>12.0f}"
                    f"{len(events) / warm:>15.0f}{enc.cache.misses:>13}{enc.templates_seen:>11}"
                )


def strip_label(line: str) -> tuple[str, int]:
    label, _, rest = line.partition(" ")
    return rest, int(label != "-")


def knn_scores(
    encode, learn, events: list[Event], *, alpha: float | None = None, warm_up: int = 100
) -> np.ndarray:
    """Score each event against the accepted previous ones, then maybe accept it.

    Mean L2 distance to the K nearest of the last WINDOW accepted vectors. With
    ``alpha`` None every line is accepted (learnt by the encoder and added to
    the reference). Otherwise, after ``warm_up`` lines, a line is accepted only
    if its score is at most the (1 - alpha) quantile of the accepted lines'
    scores so far: "never learn from what you flagged".
    """
    ref: deque[np.ndarray] = deque(maxlen=WINDOW)
    accepted: list[float] = []
    scores = np.zeros(len(events))
    for i, e in enumerate(events):
        x = encode([e])[0].astype(np.float64)
        if ref:
            d = np.sqrt(((np.asarray(ref) - x) ** 2).sum(axis=1))
            kk = min(K, len(d))
            scores[i] = np.partition(d, kk - 1)[:kk].mean()
        if alpha is None or i < warm_up or scores[i] <= np.quantile(accepted, 1.0 - alpha):
            learn([e])
            ref.append(x)
            accepted.append(scores[i])
    return scores


def quality(logs_dir: Path, backend, weights: list[float], raw_baseline: bool) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    pairs = [strip_label(ln) for ln in read_lines(logs_dir / "BGL_2k.log")]
    y = np.array([lab for _, lab in pairs])
    events = events_of([ln for ln, _ in pairs], "bgl")
    templates = LogTemplater().templates([e.payload for e in events])
    first = np.zeros(len(y), dtype=bool)
    first[[templates.index(t) for t in set(templates)]] = True
    first[:K] = False
    # One embedding cache for every variant, filled in one batched call: the
    # embedding is stateless, so this changes no score, only the bench's time.
    shared_cache = EmbeddingCache(maxsize=50_000)
    shared_cache.embed(sorted(set(templates)), backend)

    print(
        f"\n## BGL_2k streaming kNN (k={K}, window={WINDOW}): {y.sum()} alerts / {len(y)} lines, "
        f"{len(set(templates))} templates ({int(y[first].sum())} alert templates)"
    )
    print("AUCs over lines 5..1999; 'first' = first sightings of each template only")
    print(f"{'variant':<36}{'accept':>8}{'ROC-AUC':>9}{'AP':>8}{'first AUC':>11}")

    def report(label: str, accept: str, scores: np.ndarray) -> None:
        s, t = scores[K:], y[K:]
        print(
            f"{label:<36}{accept:>8}{roc_auc_score(t, s):>9.4f}"
            f"{average_precision_score(t, s):>8.4f}{roc_auc_score(y[first], scores[first]):>11.4f}"
        )

    for alpha in (None, 0.05):
        accept = "all" if alpha is None else f"a={alpha:g}"
        for w in weights:
            enc = LogEncoder(backend=backend, novelty_weight=w)
            enc.cache = shared_cache
            report(f"log encoder novelty_weight={w:g}", accept,
                   knn_scores(enc.encode, enc.learn, events, alpha=alpha))
        # The rarity column alone (what the counts say, without the embedding).
        enc = LogEncoder(backend=backend, novelty_weight=1.0)
        enc.cache = shared_cache
        report("rarity column only", accept,
               knn_scores(lambda ev: enc.encode(ev)[:, -1:], enc.learn, events, alpha=alpha))

    if raw_baseline:
        text = TextEncoder(backend=backend, cache_size=len(events))
        text.encode(events)  # batched warm-up of the stateless embedding, as above
        report("raw line embedding (no templates)", "all",
               knn_scores(text.encode, lambda ev: None, events))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("NWATCH_DATA_DIR", "../shared/data"))
    ap.add_argument("--repeat", type=int, default=3, help="best-of-N for timings")
    ap.add_argument("--weights", default="0,0.25,0.5,1,2,4")
    ap.add_argument("--no-raw", action="store_true", help="skip the raw-line baseline")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the shared model")
    args = ap.parse_args()
    logs_dir = Path(args.data) / "logs"

    templates_per_file(logs_dir, args.repeat)

    backend = shared_backend(threads=args.threads)
    t0 = time.perf_counter()
    backend.embed(["warm up"])
    print(f"\n(model load + first call: {time.perf_counter() - t0:.1f} s, excluded below)")

    throughput(logs_dir, backend, args.repeat)
    quality(logs_dir, backend, [float(w) for w in args.weights.split(",")], not args.no_raw)


if __name__ == "__main__":
    main()

"""Sharded drift against unsharded drift: alarm positions and false alarms, through the replay pipeline.

Each stream is replayed by the pipeline of ``nwatch replay`` unsharded and with
the source split into N shards (``shards = N``: per-shard references, drift
from the merged shard summaries). Reported per configuration: the alarm
positions (``events_seen``), the gap to the unsharded alarm against the
unsharded alarm's window, and alarms on no-change twins.

    python bench/shard_drift.py                  # synthetic Gaussian d=64 and CIFAR-10 ResNet class mix
    python bench/shard_drift.py --seeds 3 --only gauss

Streams: ``gauss``: 12,000 events of N(0, I_64), from event 7,000 on three
dimensions move by 0.3 sd (twin: no move). ``cifar``: the class-mix change
of ``nwatch bench quality`` (ResNet-18 embeddings, 512-d, class 0 alone, then
a quarter of other classes), 2,500 + 2,000 events (twin: class 0 throughout);
only 2 shards, as the merged reference (shards x 1,000 events) must fit before
the change.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams.config import Settings, SourceSettings  # noqa: E402
from streams.pipeline import Pipeline  # noqa: E402


def _vector_lines(X: np.ndarray, source: str) -> list[bytes]:
    t0 = time.time() - len(X)
    return [orjson.dumps({"id": f"v{i}", "source": source, "kind": "vector", "ts": t0 + i,
                          "vector": [round(float(v), 6) for v in x]}) for i, x in enumerate(X)]


def gauss(seed: int, change: bool) -> tuple[list[bytes], int | None]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(12_000, 64))
    if change:
        X[7000:, :3] += 0.3
    return _vector_lines(X, "gauss"), 7000 if change else None


def cifar(seed: int, change: bool, data: Path) -> tuple[list[bytes], int | None]:
    from streams.bench_quality import cifar_drift_streams

    streams = {s.name: s for s in cifar_drift_streams(data, n_before=2500, n_after=2000, seed=seed)}
    s = streams["cifar_mix_change" if change else "cifar_nochange"]
    return s.lines, s.change_at


def alarms(lines: list[bytes], shards: int) -> list[tuple[int, int]]:
    """(events_seen, window_size) of every drift record of a replay."""
    settings = Settings(defaults=SourceSettings(shards=shards), state={"dir": None})
    pipeline = Pipeline(settings=settings)
    out = []
    for i in range(0, len(lines), 256):
        out += pipeline.process_raw(lines[i : i + 256]).drifts
    out += pipeline.flush().drifts
    return [(d.events_seen, d.window_size) for d in out]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--only", choices=["gauss", "cifar"])
    ap.add_argument("--data", default="../shared/data")
    args = ap.parse_args()
    plans = {"gauss": (gauss, [2, 4]), "cifar": (lambda s, c: cifar(s, c, Path(args.data)), [2])}
    for name, (make, shard_counts) in plans.items():
        if args.only and name != args.only:
            continue
        rows = {n: {"gaps": [], "within": 0, "missed": 0, "false": 0} for n in shard_counts}
        base_false = 0
        for seed in range(args.seeds):
            lines, change_at = make(seed, True)
            twin, _ = make(seed, False)
            ref = [a for a in alarms(lines, 1) if a[0] > (change_at or 0)]
            base_false += len(alarms(twin, 1))
            for n in shard_counts:
                got = [a for a in alarms(lines, n) if a[0] > (change_at or 0)]
                rows[n]["false"] += len(alarms(twin, n))
                if not ref or not got:
                    rows[n]["missed"] += bool(ref) and not got
                    print(f"{name} seed {seed} shards {n}: unsharded {ref[:1]}, sharded {got[:1]}", flush=True)
                    continue
                gap = got[0][0] - ref[0][0]
                rows[n]["gaps"].append(gap)
                rows[n]["within"] += abs(gap) <= max(ref[0][1], got[0][1])
                print(f"{name} seed {seed} shards {n}: unsharded {ref[0]}, sharded {got[0]} (gap {gap:+d})",
                      flush=True)
        print(f"\n{name}: {args.seeds} seeds; unsharded false alarms on the twins: {base_false}")
        for n, r in rows.items():
            g = np.array(r["gaps"]) if r["gaps"] else np.zeros(1)
            print(f"  shards {n}: gap to unsharded median {np.median(g):+.0f}, max |gap| {np.abs(g).max():.0f}; "
                  f"within one window {r['within']}/{len(r['gaps'])}; missed {r['missed']}; "
                  f"false alarms on the twins {r['false']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Model time of the first sight of BGL's templates, worker batch by worker batch.

The 2,000 BGL_2k lines in worker batches of 256; each batch's new templates go
to the model in one call (as the pipeline's prefetch does). Compares, in one
process and alternating rounds (each round on fresh backends, so the time the
runtime spends on shapes it has not met counts):

- ``before``: int8 weights, texts sorted by characters, fixed batches of 16
  padded by the tokenizer (the backend before textspeed4);
- ``now``: the default backend (int8-sq, token-count batches on the shape grid).

    python bench/text_first_sights.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def first_sights(data_dir: Path, batch: int = 256) -> list[list[str]]:
    from models.logs import LogTemplater

    lines = [ln.partition(" ")[2] for ln in (data_dir / "logs" / "BGL_2k.log").read_text("utf-8", "replace").splitlines()]
    templater, seen, out = LogTemplater(), set(), []
    for start in range(0, len(lines), batch):
        new = []
        for line in lines[start : start + batch]:
            t = templater.template(line)
            if t not in seen:
                seen.add(t)
                new.append(t)
        if new:
            out.append(new)
    return out


def before(backend, texts: list[str]) -> None:
    """The earlier batching: sorted by characters, batches of 16 padded by the tokenizer."""
    tok = backend._padding_tokenizer
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), 16):
        enc = tok.encode_batch([texts[i] for i in order[start : start + 16]])
        backend._request.infer({"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    args = ap.parse_args(argv)
    from models.text import OpenVINOBackend

    calls = first_sights(Path(args.data_dir))
    times: dict[str, list[float]] = {"before": [], "now": []}
    for _ in range(args.rounds):
        for name in times:
            b = OpenVINOBackend(precision="int8" if name == "before" else "int8-sq")
            b.embed(["warm up"])
            if name == "before":
                b._padding_tokenizer = b._tokenizer_of(b._source()[0])
                b._padding_tokenizer.enable_padding(pad_id=b._pad_id, pad_token="[PAD]")
            t0 = time.perf_counter()
            for texts in calls:
                before(b, texts) if name == "before" else b.embed(texts)
            times[name].append(time.perf_counter() - t0)
    n = sum(map(len, calls))
    for name, ts in times.items():
        print(f"{name}: {n} templates in {len(calls)} calls, model time median {statistics.median(ts):.3f} s, "
              f"min {min(ts):.3f} s over {len(ts)} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

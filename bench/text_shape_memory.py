"""Resident memory of the text model as a stream brings batch shapes it has not met.

Encodes batches of 1-32 random texts of 1-60 words through the default text
backend (OpenVINO int8-sq), ``--batches`` of them with new shapes, then the same
batches twice more, and prints resident memory and model time. ``--variant``
sets the OpenVINO CPU runtime cache and the oneDNN primitive cache, which
keep kernels and buffers per input shape:

    python bench/text_shape_memory.py                      # default settings
    python bench/text_shape_memory.py --variant runtime32  # CPU_RUNTIME_CACHE_CAPACITY=32
    python bench/text_shape_memory.py --variant onednn16   # ONEDNN_PRIMITIVE_CACHE_CAPACITY=16
    python bench/text_shape_memory.py --variant both

One process per variant: the oneDNN setting is read when the library loads.
Measured 2026-11-29, 300 batches, one run each (docs/reliability.md): default
362 -> 572 MB, new shapes 32.7 s, repeats 32.1 s; runtime32 -> 520 MB;
onednn16 -> 589 MB; both -> 413 MB and flat, new shapes 47.7 s, repeats 33.9 s.
With the int8-sq default and its grid of shapes (textspeed4): 487 -> 566 MB,
new shapes 21.4 s, repeats 21.6 s (main in the same minutes: 424 -> 634 MB).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = "the a disk failure at node error timeout user request payment card cannot open file please help".split()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["default", "runtime32", "onednn16", "both"], default="default")
    ap.add_argument("--batches", type=int, default=300)
    args = ap.parse_args(argv)
    if args.variant in ("onednn16", "both"):
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "16"
    import openvino as ov
    import psutil

    if args.variant in ("runtime32", "both"):
        compile_model = ov.Core.compile_model

        def with_cap(self, model, device, config=None):  # the backend's own call, one more property
            return compile_model(self, model, device, {**(config or {}), "CPU_RUNTIME_CACHE_CAPACITY": 32})

        ov.Core.compile_model = with_cap
    from models.text import shared_backend

    backend = shared_backend()
    backend.embed(["warm up"])
    proc = psutil.Process()

    def rss() -> int:
        return proc.memory_info().rss >> 20

    def run() -> float:
        rng = random.Random(0)  # the same shapes on every pass
        spent = 0.0
        for _ in range(args.batches):
            texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(rng.randint(1, 32))]
            t0 = time.perf_counter()
            backend.embed(texts)
            spent += time.perf_counter() - t0
        return spent

    start = rss()
    new = run()
    after_new = rss()
    again = [run(), run()]
    print(f"{args.variant}: resident {start} -> {after_new} -> {rss()} MB; new shapes {new:.1f} s, "
          f"repeats {again[0]:.1f} s, {again[1]:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write (or check) detectors/_drift_thresholds.py: the CUSUM thresholds of the default drift settings.

A drift reference's threshold is a simulation (``drift._calibrated_threshold``,
~0.1 s of CPU) that depends only on the null pool, the steps of the horizon,
alpha, the seed and the bias sd ``tau``. Under the default settings the pool
is that of any untied bootstrap null of 2,000 blocks and ``tau`` takes one of
a few grid values (kurtosis 1 to the cap), so every threshold a default
monitor can need is computed here once, by the same function, and looked up.

    python bench/drift_threshold_table.py           # rewrite the table
    python bench/drift_threshold_table.py --check   # recompute, compare bit for bit
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

TABLE = ROOT / "detectors" / "_drift_thresholds.py"


def default_entries() -> dict[tuple[str, int, float, float, int], float]:
    """Every (pool digest, steps, alpha, tau, seed) a default monitor asks for, with its threshold."""
    from detectors import drift as dr

    m = dr.CentroidDriftMonitor()
    b, n, B = m.block_size, m.reference_size, m.bootstrap
    pool = dr._null_pool(np.arange(B, dtype=np.float64))  # an untied null: ranks 0 .. B - 1
    steps = max(1, -(-m.horizon_events // b))
    lo = round(dr._bias_sd(b, n, 1.0, B) / dr._TAU_STEP)
    hi = round(dr._bias_sd(b, n, dr._MAX_KURTOSIS, B) / dr._TAU_STEP)
    out = {}
    for k in range(lo, hi + 1):
        tau = k * dr._TAU_STEP  # the float _bias_sd gives for grid point k
        key = (dr._pool_digest(pool), steps, m.alpha, tau, m.seed)
        out[key] = dr._calibrated_threshold.__wrapped__(pool.tobytes(), steps, m.alpha, tau, m.seed)
    return out


def render(entries: dict) -> str:
    rows = "\n".join(f"    {k!r}: {v!r}," for k, v in entries.items())
    return (
        '"""CUSUM thresholds of the default drift settings, made by bench/drift_threshold_table.py.\n\n'
        "Keys: (digest of the null pool, steps of the horizon, alpha, tau, seed), the arguments of\n"
        "``detectors.drift._calibrated_threshold``; values: what it returns for them. Do not edit:\n"
        "rerun the script when the simulation or the default settings change\n"
        "(tests/detectors/test_drift.py recomputes every entry).\n"
        '"""\n\n'
        f"THRESHOLDS: dict[tuple[str, int, float, float, int], float] = {{\n{rows}\n}}\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the table instead of writing it")
    args = ap.parse_args()
    entries = default_entries()
    if args.check:
        from detectors._drift_thresholds import THRESHOLDS

        same = THRESHOLDS == entries
        print(f"{len(entries)} thresholds recomputed; table {'up to date' if same else 'STALE'}")
        return 0 if same else 1
    TABLE.write_text(render(entries))
    print(f"wrote {len(entries)} thresholds to {TABLE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

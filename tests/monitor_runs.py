"""Driving a ``SourceMonitor`` over a matrix in blocks, for the detector tests."""

from __future__ import annotations

import numpy as np


def run(mon, X: np.ndarray, batch: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, anomaly flags and warm-up flags of ``X`` processed in blocks of ``batch`` rows."""
    out = [mon.process(X[i : i + batch], [f"e{j}" for j in range(i, min(i + batch, len(X)))])
           for i in range(0, len(X), batch)]
    return (np.concatenate([d.scores for d in out]), np.concatenate([d.is_anomaly for d in out]),
            np.concatenate([d.warming_up for d in out]))


def assert_restored_carries_on_alike(saved, restored, X: np.ndarray, batch: int = 50) -> None:
    """``restored`` (loaded from ``saved``'s state) scores and flags ``X`` exactly as ``saved`` does."""
    restored.set_state(saved.get_state())
    sa, fa, _ = run(saved, X, batch)
    sb, fb, _ = run(restored, X, batch)
    np.testing.assert_array_equal(sa, sb)
    np.testing.assert_array_equal(fa, fb)

"""``nwatch bench index`` times the steady state: a first call's one-off cost (the compiled scan
kernel loaded from numba's cache) is not counted in a row."""

from __future__ import annotations

import time

import numpy as np

import streams.bench_index as bench_index


class FirstCallSlow:
    """A reference index whose first query costs 0.3 s, every later one nothing."""

    def __init__(self, **_: object) -> None:
        self.queries = 0

    def add(self, X: np.ndarray, ids: list[str]) -> None:
        pass

    def query(self, X: np.ndarray, k: int) -> None:
        self.queries += 1
        if self.queries == 1:
            time.sleep(0.3)


def test_the_first_call_is_not_timed(monkeypatch):
    monkeypatch.setattr(bench_index, "ReferenceIndex", FirstCallSlow)
    q, a = bench_index._cost_per_event("exact", 1000, 16, np.random.default_rng(0), seconds=0.0)
    # seconds=0: two timed batches of 256; with the 0.3 s call among them, ~590 us per event
    assert q < 50.0 and a < 50.0

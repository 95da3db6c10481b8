"""The window of recent vectors an adoption learns: the latest ``adopt_window``, however committed."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from detectors.monitor import SourceMonitor


@pytest.mark.parametrize("window", [0, 1, 7, 50])
def test_recent_window_is_the_latest_rows_of_a_bounded_deque(window):
    rng = np.random.default_rng(window)
    monitor = SourceMonitor(adopt_window=window)
    reference: deque = deque(maxlen=window)  # what it kept before: one (row, id) per event
    n = 0
    for size in rng.integers(1, 40, 30).tolist():
        X = rng.normal(size=(size, 3)).astype(np.float32)
        ids = [f"e{n + j}" for j in range(size)]
        n += size
        monitor._remember(X, ids)
        reference.extend(zip(X, ids))
        if reference:
            got, got_ids = monitor._recent_window()
            assert np.array_equal(got, np.stack([x for x, _ in reference]))
            assert got_ids == [i for _, i in reference]
        assert len(monitor._recent) <= 1 + window  # blocks beyond the window are let go
    state = monitor.get_state()
    again = SourceMonitor(adopt_window=window)
    again._remember(np.zeros((5, 3), np.float32), list("abcde"))  # replaced by the state
    again.set_state(state)
    assert again.get_state()["recent_ids"] == state["recent_ids"]
    assert np.array_equal(again.get_state()["recent_vectors"], state["recent_vectors"])

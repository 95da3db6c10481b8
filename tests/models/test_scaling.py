"""RobustScaler frames: vectors transformed before a refresh, mapped onto the current transform."""

from __future__ import annotations

import numpy as np
import pytest

from models.events import Event
from models.scaling import RobustScaler, _small_integers
from models.tabular import TransactionEncoder


def _events(rng: np.random.Generator, n: int, loc: float, spread: float) -> list[Event]:
    X = rng.normal(loc, spread, size=(n, 4))
    return [
        Event(id=f"e{i}", kind="transaction", source="t", ts=0.0,
              payload={f"f{j}": float(v) for j, v in enumerate(row)})
        for i, row in enumerate(X.tolist())
    ]


def test_a_refresh_that_moves_centre_or_scale_starts_a_frame_and_one_that_does_not_does_not():
    scaler = RobustScaler(dim=2, refresh=1, squash=False)
    scaler.learn(np.repeat([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]], 100, axis=0))
    frame = scaler.frame
    scaler.learn(np.array([[2.0, 20.0]]))  # median and quartiles stay on the same values
    assert scaler.frame == frame
    scaler.learn(np.array([[10.0, 20.0]] * 300))
    assert scaler.frame == frame + 1


def test_rebase_maps_vectors_of_an_earlier_frame_onto_the_current_one():
    rng = np.random.default_rng(1)
    enc = TransactionEncoder()
    enc.learn(_events(rng, 3000, 0.0, 1.0))
    probe = _events(rng, 50, 0.0, 40.0)  # far into the tails, where the squash bends
    before, frame = enc.encode(probe), enc.frame
    enc.learn(_events(rng, 20_000, 5.0, 4.0))
    assert enc.frame != frame
    now = enc.encode(probe)
    assert not np.allclose(before, now, atol=1e-2)
    np.testing.assert_allclose(enc.rebase(before, frame), now, rtol=1e-4, atol=1e-4)
    # a drift view (the time columns left out) maps the same way
    np.testing.assert_allclose(enc.rebase(before[:, :-4], frame), now[:, :-4], rtol=1e-4, atol=1e-4)
    # the current frame maps to itself; one no longer kept to nothing
    np.testing.assert_array_equal(enc.rebase(now, enc.frame), now)
    assert enc.rebase(before, -1) is None


def test_rebase_of_the_scaler_own_squash():
    rng = np.random.default_rng(2)
    scaler = RobustScaler(dim=3, refresh=64, squash=True)
    scaler.learn(rng.normal(0.0, 1.0, size=(500, 3)))
    probe = rng.normal(0.0, 30.0, size=(20, 3))
    before, frame = scaler.transform(probe), scaler.frame
    scaler.learn(rng.normal(3.0, 10.0, size=(3000, 3)))
    np.testing.assert_allclose(scaler.rebase(before, frame), scaler.transform(probe), rtol=1e-4, atol=1e-4)


def _sorted_quartiles(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The quartiles as the scaler read them off a full sort before (np.nanpercentile's interpolation)."""
    ordered = np.sort(rows, axis=0)
    counts = (~np.isnan(rows)).sum(axis=0)
    last = np.maximum(counts - 1, 0)
    out = []
    for q in (0.25, 0.5, 0.75):
        pos = q * last
        lo = np.floor(pos).astype(np.int64)
        a = np.take_along_axis(ordered, lo[None, :], axis=0)[0]
        b = np.take_along_axis(ordered, np.minimum(lo + 1, last)[None, :], axis=0)[0]
        out.append(np.where(counts > 0, a + (b - a) * (pos - lo), np.nan))
    return out[0], out[1], out[2]


@pytest.mark.parametrize("seed", range(8))
def test_quartiles_by_partition_or_int16_sort_equal_those_of_the_sort(seed):
    # without missing values the refresh partitions, or sorts whole numbers as int16,
    # instead of sorting the doubles: the same centre and scale
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 3000)), int(rng.integers(1, 12))
    rows = rng.integers(-4, 5, (n, d)).astype(float) if seed % 2 else rng.lognormal(size=(n, d))
    if seed == 6:  # whole numbers beyond int16: the partition
        rows = rng.integers(-40_000, 40_000, (n, d)).astype(float)
    if seed in (1, 3):
        assert _small_integers(rows) is not None
    if seed >= 4 and seed != 6:
        rows[rng.random(rows.shape) < 0.2] = np.nan  # the sort's path
    q25, med, q75 = _sorted_quartiles(rows)
    center, scale = RobustScaler._estimate(rows)
    assert np.array_equal(center, np.where(np.isfinite(med), med, 0.0))
    iqr = (q75 - q25) / 1.349
    assert np.array_equal(scale[iqr > 1e-12], iqr[iqr > 1e-12])


@pytest.mark.parametrize("missing", [False, True])
def test_the_std_fallback_is_that_of_the_nan_masked_sums(missing):
    # columns with IQR 0 fall back to the standard deviation: with or without missing values,
    # the value of the masked sums, bit for bit
    rng = np.random.default_rng(7)
    rows = np.where(rng.random((2048, 5)) < 0.9, 0.0, rng.lognormal(size=(2048, 5)))  # IQR 0
    if missing:
        rows[rng.random(rows.shape) < 0.1] = np.nan
    counts = (~np.isnan(rows)).sum(axis=0)
    mean = np.where(np.isnan(rows), 0.0, rows).sum(axis=0) / counts
    std = np.sqrt(np.where(np.isnan(rows), 0.0, (rows - mean) ** 2).sum(axis=0) / counts)
    assert np.array_equal(RobustScaler._estimate(rows)[1], std)

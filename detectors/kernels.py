"""Compiled kernels for the exact scan's hot path (numba, imported on first use),
and, once numba is loaded, for the isolation forest and the calibration sets.

:func:`nearest_from_products` does, per query row, in one pass and without
temporaries, what the exact scan of :mod:`detectors.index` otherwise does in
about twenty NumPy calls per batch (``_candidates``, the pair-by-pair
distances, ``_nearest``): pick the ``c`` smallest approximate distances of
the row, recompute those exactly in float32, and keep the ``k`` nearest, ties
by slot. The exact distances are summed in NumPy's own order (its pairwise
summation), so they equal the NumPy path's bit for bit; the NumPy path stays
as the reference, for rows wider than ``MAX_WIDTH`` and without numba.

numba is imported when the scan first needs it, not when the worker starts
(~0.7 s), and the kernel is compiled at that first use and cached on disk
(numba's ``cache=True``: beside the module, else in the user's cache
directory): ~4 s the first time on a machine, ~1 s to load from the cache
(2 loaded cores). The image compiles it at build time (:func:`warm_up`).

The same module holds :func:`forest_paths` and :func:`grow_levels` (scoring
and growing :class:`detectors.forest.IsolationForest`) and :func:`replaced`
(a full calibration set's sorted copy rolled forward with its slots). Each
gives what the NumPy code it replaces gives, which stays as the fallback and
as the reference of the tests; all follow ``NWATCH_SCAN_KERNEL``. The
calibration uses its kernel only once numba is loaded (:func:`already_loaded`),
so log and text sources never import it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

# NumPy sums a row of up to 128 values (its PW_BLOCKSIZE) with eight
# accumulators, not recursively; wider rows take the NumPy path.
MAX_WIDTH = 128

# False: the NumPy path everywhere (the tests compare the two). numba and
# LLVM hold ~120 MiB of resident memory once loaded; NWATCH_SCAN_KERNEL=0
# trades the kernel's speed (~5 us per tabular event) for that memory.
enabled = os.environ.get("NWATCH_SCAN_KERNEL", "1") != "0"
_kernel: Callable[..., None] | None = None
_forest: Callable[..., None] | None = None
_replace: Callable[..., None] | None = None
_grow: Callable[..., int] | None = None
_knn_forest: Callable[..., bool] | None = None
_moments: Callable[..., None] | None = None
_own_p: Callable[..., None] | None = None
_distinct: Callable[..., int] | None = None
_drift: tuple[Callable[..., None], Callable[..., None], Callable[..., None]] | None = None
_tried = False


def loaded() -> bool:
    """Whether the compiled scan is there to use (imports numba the first time)."""
    global _kernel, _forest, _replace, _grow, _knn_forest, _own_p, _distinct, _drift, _moments, _tried
    if not enabled:
        return False
    if not _tried:
        _tried = True
        try:
            from detectors._numba_scan import (
                _column_moments_kernel,
                _distinct_kernel,
                _drift_blocks_kernel,
                _drift_larger_kernel,
                _drift_projected_kernel,
                _forest_kernel,
                _grow_kernel,
                _knn_forest_kernel,
                _nearest_kernel,
                _own_p_kernel,
                _replaced_slots_kernel,
            )
        except ImportError:  # pragma: no cover - numba is a pinned dependency
            _nearest_kernel = _forest_kernel = _replaced_slots_kernel = _grow_kernel = None
            _knn_forest_kernel = _own_p_kernel = _distinct_kernel = None
            _drift_blocks_kernel = _drift_projected_kernel = _drift_larger_kernel = None
            _column_moments_kernel = None
        _kernel, _forest, _replace, _grow = _nearest_kernel, _forest_kernel, _replaced_slots_kernel, _grow_kernel
        _knn_forest, _own_p, _distinct = _knn_forest_kernel, _own_p_kernel, _distinct_kernel
        _moments = _column_moments_kernel
        if _drift_blocks_kernel is not None:
            _drift = (_drift_blocks_kernel, _drift_projected_kernel, _drift_larger_kernel)
    return _kernel is not None


def already_loaded() -> bool:
    """Whether the kernels are loaded, without importing numba: for code that every source
    kind runs (the calibration), which should not load numba for log or text sources."""
    return enabled and _kernel is not None


def replaced(
    sorted_: np.ndarray, order: np.ndarray, slots: np.ndarray, coming: np.ndarray, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """A full calibration ring's sorted copy after ``coming`` took ring ``slots``: ``sorted_``
    (float64, ascending, nan last; ``order`` the ring slot of each) without the values those
    slots held and with ``coming``, sorted, and the slots in that order. One merge pass
    instead of :func:`detectors.calibration._replaced`'s sorts and searches, and the slots
    come with it (:meth:`~detectors.calibration.ConformalThresholder.own_p_values` needs no
    argsort then)."""
    n = len(sorted_) - len(slots) + len(coming)
    out, out_order = np.empty(n), np.empty(n, np.int64)
    assert _replace is not None, "loaded() first"
    # the slots flagged and the coming scores ordered in the kernel too: one call, not eight
    _replace(np.ascontiguousarray(sorted_, np.float64), np.ascontiguousarray(order, np.int64),
             np.ascontiguousarray(slots, np.int64), np.ascontiguousarray(coming, np.float64), window,
             out, out_order)
    return out, out_order


def distinct_rows(X: np.ndarray, max_share: float) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`detectors.index.distinct_rows` of a float32 matrix in one compiled pass: rows
    told apart by their bytes (``-0.0`` is not ``0.0``), the same distinct rows in the same
    order and the same inverse, or None when more than ``max_share`` of the rows are distinct.
    Without a dict entry and a ``bytes`` object per row (~10 against ~2 us for 32 rows)."""
    X = np.ascontiguousarray(X, np.float32)
    n = len(X)
    inverse, first = np.empty(n, np.intp), np.empty(n, np.intp)
    assert _distinct is not None, "loaded() first"
    count = _distinct(X.view(np.uint32), inverse, first)
    if count > max_share * n:
        return None
    return X[first[:count]], inverse


def own_p_values(ascending: np.ndarray, order: np.ndarray) -> np.ndarray:
    """:meth:`~detectors.calibration.ConformalThresholder.own_p_values` from the set's sorted
    scores (float64, nan last) and the slot of each: ``#{scores >= s} / n`` per slot, in one
    pass (~95 against ~10 us for 2,000 scores)."""
    out = np.empty(len(ascending))
    assert _own_p is not None, "loaded() first"
    _own_p(np.ascontiguousarray(ascending, np.float64), np.ascontiguousarray(order, np.int64), out)
    return out


def nearest_from_products(
    D: np.ndarray,
    sqnorm: np.ndarray | None,
    V: np.ndarray,
    Xa: np.ndarray,
    rest: np.ndarray | None,
    c: int,
    k: int,
    *,
    cosine: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest of each query row from its approximate distances ``D`` (n, m).

    ``D[r, j] + sqnorm[j]`` ranks slot ``j`` for row ``r`` (``sqnorm`` None for
    cosine); the ``c`` smallest are recomputed exactly from ``V`` (m, a) and
    ``Xa`` (n, a) (l2: squared difference plus ``rest[r]``, the row's squares
    outside these columns; cosine: ``1 - dot``). Returns distances ``(n, k)``
    float32 ascending (Euclidean or ``1 - cos``, floored at 0) and their slots
    ``(n, k)`` int64, ties by slot. ``k <= c <= m``; ``a <= MAX_WIDTH``.
    """
    n = D.shape[0]
    out_dist = np.empty((n, k), np.float32)
    out_slot = np.empty((n, k), np.int64)
    if sqnorm is None:
        sqnorm = np.zeros(D.shape[1], np.float32)
    if rest is None:
        rest = np.zeros(0, np.float32)
    assert _kernel is not None, "loaded() first"
    _kernel(
        np.ascontiguousarray(D, np.float32), np.ascontiguousarray(sqnorm, np.float32),
        np.ascontiguousarray(V, np.float32), np.ascontiguousarray(Xa, np.float32),
        np.ascontiguousarray(rest, np.float32), c, k, cosine, out_dist, out_slot,
    )
    return out_dist, out_slot


def forest_paths(
    X: np.ndarray, feature: np.ndarray, threshold: np.ndarray, leaf_depth: np.ndarray, depth: int
) -> np.ndarray:
    """``(n, trees)`` float64: each row's depth-corrected path length in each complete tree.

    The arrays are :meth:`detectors.forest.IsolationForest._complete`'s: ``feature`` and
    ``threshold`` ``(trees, 2**depth - 1)`` in heap order, ``leaf_depth`` ``(trees, 2**depth)``.
    The same leaves as the forest's NumPy descent, in one compiled pass instead of three
    gathers over ``(n, trees)`` per level.
    """
    out = np.empty((len(X), feature.shape[0]), np.float64)
    assert _forest is not None, "loaded() first"
    _forest(np.ascontiguousarray(X, np.float32), np.ascontiguousarray(feature, np.int32),
            np.ascontiguousarray(threshold, np.float32), np.ascontiguousarray(leaf_depth, np.float64),
            depth, out)
    return out


def knn_forest_step(
    D: np.ndarray, sqnorm: np.ndarray, V: np.ndarray, Xa: np.ndarray, rest: np.ndarray | None, c: int, k: int,
    *, mean: bool, X: np.ndarray, packed: tuple[np.ndarray, np.ndarray, np.ndarray], depth: int,
    knn_cal: np.ndarray, forest_cal: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """One compiled pass for a block of a source with a forest (l2): the scan of
    :func:`nearest_from_products`, the forest's paths (:func:`forest_paths`, ``packed`` its
    arrays) and what ``SourceMonitor.score`` makes of both, each as its NumPy code computes it.

    Returns distances ``(n, k)`` and slots as :func:`nearest_from_products`, the component
    matrix of ``SourceMonitor._components`` (stage 2: both calibration sets, sorted ascending
    in ``knn_cal`` and ``forest_cal``, hold scores), and per row the p-value whose ``-log`` is
    the combined score (``_tippett``'s argument), and whether a score lies past the top of a
    calibration set, where ``mid_rank_p_values`` fits its tail: then the last is not to be
    used (the caller combines the components in NumPy). ``k`` and the trees at most ``MAX_WIDTH``.
    """
    n = D.shape[0]
    feature, threshold, leaf_depth = packed
    out_dist = np.empty((n, k), np.float32)
    out_slot = np.empty((n, k), np.int64)
    comp = np.empty((n, 3))
    least = np.empty(n)
    assert _knn_forest is not None, "loaded() first"
    tail = _knn_forest(
        np.ascontiguousarray(D, np.float32), np.ascontiguousarray(sqnorm, np.float32),
        np.ascontiguousarray(V, np.float32), np.ascontiguousarray(Xa, np.float32),
        np.zeros(0, np.float32) if rest is None else np.ascontiguousarray(rest, np.float32), c, k, mean,
        np.ascontiguousarray(X, np.float32), np.ascontiguousarray(feature, np.int32),
        np.ascontiguousarray(threshold, np.float32), np.ascontiguousarray(leaf_depth, np.float64), depth,
        np.ascontiguousarray(knn_cal, np.float64), np.ascontiguousarray(forest_cal, np.float64),
        out_dist, out_slot, np.empty((n, feature.shape[0]), np.float64), comp, least,
    )
    return out_dist, out_slot, comp, least, bool(tail)


def grow_levels(S: np.ndarray, m: int, count: int, depth: int, draws: np.ndarray, c_of: np.ndarray,
                columns: np.ndarray, *out: np.ndarray) -> int:
    """:meth:`detectors.forest.IsolationForest._levels` in one compiled pass: the node arrays
    ``out`` (feature, threshold, left, right, leaf depth, tree; room for complete trees) filled
    in the same order with the same values, from the doubles that method would draw level by
    level (``draws``). Returns the number of nodes."""
    assert _grow is not None, "loaded() first"
    return int(_grow(np.ascontiguousarray(S, np.float32), m, count, depth, draws, c_of,
                     np.ascontiguousarray(columns, np.int64), *out))


def drift_block_scores(
    rows: np.ndarray, b: int, mu: np.ndarray, sigma: np.ndarray, basis: np.ndarray,
    null_t: np.ndarray, null_tp: np.ndarray, null_v: np.ndarray,
) -> np.ndarray:
    """``CentroidDriftMonitor._block_scores`` of the complete blocks of ``b`` float32 ``rows``
    (at most ``MAX_WIDTH`` columns): the block means, their standardisation, both statistics
    and the three mid-rank ECDFs in three compiled passes, the same values bit for bit; NumPy
    keeps the projection (``z @ basis``, BLAS) and ``ndtri`` (SciPy's). Seven calls a block
    instead of ~35 NumPy calls."""
    from scipy.special import ndtri

    assert _drift is not None, "loaded() first"
    blocks, projected, larger = _drift
    nb = len(rows) // b
    z, p = np.empty((nb, rows.shape[1])), np.empty(nb)
    blocks(np.ascontiguousarray(rows, np.float32), b, np.ascontiguousarray(mu, np.float64),
           np.ascontiguousarray(sigma, np.float64), np.ascontiguousarray(null_t, np.float64), z, p)
    u = ndtri(p)
    if basis.shape[1] == 0:
        return u
    y = np.ascontiguousarray(z @ basis, np.float64)
    projected(y, b, np.ascontiguousarray(null_tp, np.float64), p)
    up = ndtri(p)
    larger(u, up, np.ascontiguousarray(null_v, np.float64), p)
    return ndtri(p)


def column_moments(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` over the rows of a float32 matrix of at least two columns, as
    ``rows.astype(np.float64).mean(axis=0)`` and ``.std(axis=0)`` give them, bit for bit, in
    one compiled pass each without the float64 copy and NumPy's temporaries (~180 -> ~40 us
    for the drift monitor's 1,000 x 96 reference)."""
    assert _moments is not None, "loaded() first"
    mean, sd = np.empty(rows.shape[1]), np.empty(rows.shape[1])
    _moments(np.ascontiguousarray(rows, np.float32), mean, sd)
    return mean, sd


def warm_up() -> None:
    """Compile (or load from the on-disk cache) the kernels now: an image build calls it, so no
    worker pays the compilation at its first batch."""
    if not loaded():
        return
    V = np.zeros((4, 2), np.float32)
    nearest_from_products(np.zeros((1, 4), np.float32), np.zeros(4, np.float32), V, V[:1], None, 2, 1, cosine=False)
    replaced(np.zeros(2), np.arange(2), np.arange(1), np.ones(1), 2)
    from detectors.forest import IsolationForest

    forest = IsolationForest(trees=1, sample_size=2)
    forest.fit(V)  # grown and scored with the compiled kernels
    forest.score(V)
    knn_forest_step(np.zeros((1, 4), np.float32), np.zeros(4, np.float32), V, V[:1], None, 2, 1, mean=True,
                    X=V[:1], packed=forest.packed(), depth=forest.depth, knn_cal=np.zeros(1), forest_cal=np.zeros(1))
    distinct_rows(V, 1.0)
    own_p_values(np.zeros(2), np.arange(2))
    column_moments(np.zeros((2, 2), np.float32))
    drift_block_scores(np.zeros((2, 2), np.float32), 1, np.zeros(2), np.ones(2), np.eye(2), np.zeros(3),
                       np.zeros(3), np.zeros(3))

"""The numba kernels of :mod:`detectors.kernels` (numba is imported here only, on first use of the scan)."""

from __future__ import annotations

import numpy as np
from numba import njit

from detectors.index import _FOLD, _MAX_CANDIDATE_FACTOR


@njit(cache=True, nogil=True)
def _pairwise_sum(buf: np.ndarray, n: int, zero: float) -> float:
    """``buf[:n].sum()`` in NumPy's order (``pairwise_sum`` for n <= 128), in the type of
    ``buf`` and ``zero`` (0 of that type: float32 or float64)."""
    if n < 8:
        res = zero
        for i in range(n):
            res += buf[i]
        return res
    r0, r1, r2, r3 = buf[0], buf[1], buf[2], buf[3]
    r4, r5, r6, r7 = buf[4], buf[5], buf[6], buf[7]
    i = 8
    stop = n - (n % 8)
    while i < stop:
        r0 += buf[i]
        r1 += buf[i + 1]
        r2 += buf[i + 2]
        r3 += buf[i + 3]
        r4 += buf[i + 4]
        r5 += buf[i + 5]
        r6 += buf[i + 6]
        r7 += buf[i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += buf[i]
        i += 1
    # NumPy's reduction starts from the identity: 0 + res
    return zero + res


@njit(cache=True, nogil=True)
def _before(v: float, j: int, w: float, i: int) -> bool:
    """(v, j) orders before (w, i): by value, then by slot."""
    return v < w or (v == w and j < i)


@njit(cache=True, nogil=True)
def _nearest_kernel(
    D: np.ndarray,
    sqnorm: np.ndarray,
    V: np.ndarray,
    Xa: np.ndarray,
    rest: np.ndarray,
    c: int,
    k: int,
    cosine: bool,
    out_dist: np.ndarray,
    out_slot: np.ndarray,
) -> None:
    n, m = D.shape
    a = V.shape[1]
    # strided groups of up to _FOLD columns, as detectors.index._candidates folds them
    g = min(_FOLD, m // (4 * c))
    if g < 1:
        g = 1
    groups = m // g
    tail = m - groups * g  # columns past the groups: each its own group
    row = np.empty(m, np.float32)
    folded = np.empty(groups + tail, np.float32)
    bar = np.empty(c, np.float32)
    cand = np.empty(m, np.int64)
    picked = np.empty(groups, np.int64)
    best_v = np.empty(c, np.float32)
    best_j = np.empty(c, np.int64)
    exact = np.empty(m, np.float32)
    order = np.empty(m, np.int64)
    buf = np.empty(max(a, 1), np.float32)
    one = np.float32(1.0)
    for r in range(n):
        # (Slices and loop counters as indices: numba then drops its negative-index
        # checks and the loops vectorise, ~3x faster than D[r, j].)
        Dr = D[r]
        for j in range(m):
            row[j] = Dr[j] + sqnorm[j]
        # the row's minimum of each group, elementwise over contiguous runs
        fold = folded[:groups]
        fold[:] = row[:groups]
        for i in range(1, g):
            seg = row[i * groups : (i + 1) * groups]
            for j in range(groups):
                if seg[j] < fold[j]:
                    fold[j] = seg[j]
        folded[groups:] = row[groups * g :]
        # t: the c-th smallest group minimum; at least c entries of the row are <= t
        filled = 0
        for j in range(groups + tail):
            v = folded[j]
            if filled == c:
                if not v < bar[c - 1]:
                    continue
                pos = c - 1
            else:
                pos = filled
                filled += 1
            while pos > 0 and bar[pos - 1] > v:
                bar[pos] = bar[pos - 1]
                pos -= 1
            bar[pos] = v
        t = bar[c - 1]
        # every entry <= t lies in a group whose minimum is <= t
        # (written without branches: whether an entry is <= t is new data at every
        # step, and a mispredicted branch per taken candidate cost more than the
        # store; each column is written and kept by advancing the count or not)
        chosen = 0
        for j in range(groups):
            picked[chosen] = j
            chosen += np.intp(fold[j] <= t)
        count = 0
        for q in range(chosen):
            j = picked[q]
            for i in range(g):
                col = i * groups + j
                cand[count] = col
                count += np.intp(row[col] <= t)
        for j in range(groups * g, m):
            cand[count] = j
            count += np.intp(row[j] <= t)
        if count > _MAX_CANDIDATE_FACTOR * c:
            # ties (a reference of repeated vectors): the c smallest by value, then slot
            kept = 0
            for q in range(count):
                j = cand[q]
                v = row[j]
                if kept == c:
                    if not _before(v, j, best_v[c - 1], best_j[c - 1]):
                        continue
                    pos = c - 1
                else:
                    pos = kept
                    kept += 1
                while pos > 0 and _before(v, j, best_v[pos - 1], best_j[pos - 1]):
                    best_v[pos] = best_v[pos - 1]
                    best_j[pos] = best_j[pos - 1]
                    pos -= 1
                best_v[pos] = v
                best_j[pos] = j
            for q in range(c):
                cand[q] = best_j[q]
            count = c
        # exact distances of the candidates, as the NumPy path computes them
        for q in range(count):
            j = cand[q]
            if cosine:
                for u in range(a):
                    buf[u] = V[j, u] * Xa[r, u]
                exact[q] = one - _pairwise_sum(buf, a, np.float32(0.0))
            else:
                for u in range(a):
                    d = V[j, u] - Xa[r, u]
                    buf[u] = d * d
                s = _pairwise_sum(buf, a, np.float32(0.0))
                if rest.shape[0]:
                    s = s + rest[r]
                exact[q] = s
        # the k nearest by (distance, slot): insertion sort of the candidates
        for q in range(count):
            v = exact[q]
            j = cand[q]
            pos = q
            while pos > 0 and _before(v, j, exact[order[pos - 1]], cand[order[pos - 1]]):
                order[pos] = order[pos - 1]
                pos -= 1
            order[pos] = q
        for q in range(k):
            v = exact[order[q]]
            if v < 0:
                v = np.float32(0.0)
            out_dist[r, q] = v if cosine else np.sqrt(v)
            out_slot[r, q] = cand[order[q]]


@njit(cache=True, nogil=True)
def _forest_kernel(
    X: np.ndarray, feature: np.ndarray, threshold: np.ndarray, leaf_depth: np.ndarray, depth: int,
    out: np.ndarray,
) -> None:
    """``out[r, t]``: the depth-corrected path length of row ``r`` of ``X`` in complete tree ``t``
    (:meth:`detectors.forest.IsolationForest._complete`'s heap-ordered arrays), descending level by
    level as :meth:`~detectors.forest.IsolationForest.score` does.

    A tree at a time, so its nodes stay in cache; eight rows descend together, and a step is
    ``2j + 1 + (x >= t)`` without a branch: each row's path is new data, and a branch per
    step was mispredicted about half the time (~65 against ~26 us for 32 rows x 50 trees).
    Each step waits for the node the last one chose (and, in the pipeline, often for memory):
    eight independent paths in flight instead of four, ~25 -> ~18 us hot, ~57 -> ~49 with the
    caches flushed (32 rows x 50 trees; sixteen through an array of positions: ~27).
    """
    n = X.shape[0]
    trees, inner = feature.shape
    for t in range(trees):
        f = feature[t]
        h = threshold[t]
        leaf = leaf_depth[t]
        r = 0
        while r + 8 <= n:
            x0, x1, x2, x3 = X[r], X[r + 1], X[r + 2], X[r + 3]
            x4, x5, x6, x7 = X[r + 4], X[r + 5], X[r + 6], X[r + 7]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0
            for _ in range(depth):
                a0 = 2 * a0 + 1 + np.intp(x0[f[a0]] >= h[a0])
                a1 = 2 * a1 + 1 + np.intp(x1[f[a1]] >= h[a1])
                a2 = 2 * a2 + 1 + np.intp(x2[f[a2]] >= h[a2])
                a3 = 2 * a3 + 1 + np.intp(x3[f[a3]] >= h[a3])
                a4 = 2 * a4 + 1 + np.intp(x4[f[a4]] >= h[a4])
                a5 = 2 * a5 + 1 + np.intp(x5[f[a5]] >= h[a5])
                a6 = 2 * a6 + 1 + np.intp(x6[f[a6]] >= h[a6])
                a7 = 2 * a7 + 1 + np.intp(x7[f[a7]] >= h[a7])
            out[r, t] = leaf[a0 - inner]
            out[r + 1, t] = leaf[a1 - inner]
            out[r + 2, t] = leaf[a2 - inner]
            out[r + 3, t] = leaf[a3 - inner]
            out[r + 4, t] = leaf[a4 - inner]
            out[r + 5, t] = leaf[a5 - inner]
            out[r + 6, t] = leaf[a6 - inner]
            out[r + 7, t] = leaf[a7 - inner]
            r += 8
        while r + 4 <= n:
            x0, x1, x2, x3 = X[r], X[r + 1], X[r + 2], X[r + 3]
            a = b = c = d = 0
            for _ in range(depth):
                a = 2 * a + 1 + np.intp(x0[f[a]] >= h[a])
                b = 2 * b + 1 + np.intp(x1[f[b]] >= h[b])
                c = 2 * c + 1 + np.intp(x2[f[c]] >= h[c])
                d = 2 * d + 1 + np.intp(x3[f[d]] >= h[d])
            out[r, t] = leaf[a - inner]
            out[r + 1, t] = leaf[b - inner]
            out[r + 2, t] = leaf[c - inner]
            out[r + 3, t] = leaf[d - inner]
            r += 4
        while r < n:
            x = X[r]
            a = 0
            for _ in range(depth):
                a = 2 * a + 1 + np.intp(x[f[a]] >= h[a])
            out[r, t] = leaf[a - inner]
            r += 1


@njit(cache=True, nogil=True)
def _ahead(a: float, b: float) -> bool:
    """``a`` sorts before ``b`` in NumPy's order (nan last)."""
    return a < b or (b != b and a == a)


@njit(cache=True, nogil=True)
def _replaced_kernel(
    sorted_: np.ndarray, order: np.ndarray, drop: np.ndarray, coming: np.ndarray,
    coming_slots: np.ndarray, out: np.ndarray, out_order: np.ndarray,
) -> None:
    """``out``: ``sorted_`` (``order``: the ring slot of each) without the slots flagged in ``drop``
    and with ``coming`` (sorted, nan last; ``coming_slots`` theirs), in one merge; ``out_order``
    the slots of ``out``."""
    w = q = 0
    nc = coming.shape[0]
    for i in range(sorted_.shape[0]):
        slot = order[i]
        if drop[slot]:
            continue
        s = sorted_[i]
        while q < nc and _ahead(coming[q], s):
            out[w] = coming[q]
            out_order[w] = coming_slots[q]
            w += 1
            q += 1
        out[w] = s
        out_order[w] = slot
        w += 1
    while q < nc:
        out[w] = coming[q]
        out_order[w] = coming_slots[q]
        w += 1
        q += 1


@njit(cache=True, nogil=True)
def _grow_kernel(
    S: np.ndarray,
    m: int,
    count: int,
    max_depth: int,
    draws: np.ndarray,
    c_of: np.ndarray,
    columns: np.ndarray,
    feature: np.ndarray,
    threshold: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    leaf: np.ndarray,
    tree_of: np.ndarray,
) -> int:
    """:meth:`detectors.forest.IsolationForest._levels` compiled: the same nodes in the same order
    from the same draws (``draws``: what ``rng.random`` gives level after level, the picks of a
    level's nodes, then their split points). Returns the number of nodes written."""
    d = S.shape[1]
    rows = np.arange(count * m)
    nxt = np.empty(count * m, np.int64)
    n_cap = feature.shape[0]
    start = np.empty(n_cap, np.int64)  # the rows of node i: rows[start[i] : start[i] + size[i]]
    size = np.empty(n_cap, np.int64)
    lo = np.empty(d, np.float32)
    hi = np.empty(d, np.float32)
    for i in range(count):
        start[i] = i * m
        size[i] = m
        tree_of[i] = i
    first, n_nodes, used = 0, count, 0
    for depth in range(max_depth + 1):
        level = n_nodes - first
        picks = draws[used : used + level]
        points = draws[used + level : used + 2 * level]
        used += 2 * level
        child = n_nodes
        w = 0  # where the next child's rows go in nxt
        for k in range(level):
            node = first + k
            sz = size[node]
            s0 = start[node]
            n_varying = 0
            if sz > 0:
                r0 = rows[s0]
                for u in range(d):
                    lo[u] = S[r0, u]
                    hi[u] = S[r0, u]
                for q in range(s0 + 1, s0 + sz):
                    row = S[rows[q]]
                    for u in range(d):
                        v = row[u]
                        if v < lo[u]:
                            lo[u] = v
                        if v > hi[u]:
                            hi[u] = v
                for u in range(d):
                    if hi[u] > lo[u]:
                        n_varying += 1
            if sz > 1 and n_varying > 0 and depth < max_depth:
                pick = np.int64(picks[k] * n_varying)
                if pick > n_varying - 1:
                    pick = n_varying - 1
                f = 0
                seen = 0
                for u in range(d):  # the pick-th varying column
                    if hi[u] > lo[u]:
                        if seen == pick:
                            f = u
                            break
                        seen += 1
                t = lo[f] + np.float32(points[k]) * (hi[f] - lo[f])
                feature[node] = columns[f]
                threshold[node] = t
                left[node] = child
                right[node] = child + 1
                leaf[node] = 0.0
                # the rows below t, then those at or above it, as the children's runs
                start[child] = w
                for q in range(s0, s0 + sz):
                    if S[rows[q], f] < t:
                        nxt[w] = rows[q]
                        w += 1
                size[child] = w - start[child]
                start[child + 1] = w
                for q in range(s0, s0 + sz):
                    if S[rows[q], f] >= t:
                        nxt[w] = rows[q]
                        w += 1
                size[child + 1] = w - start[child + 1]
                tree_of[child] = tree_of[node]
                tree_of[child + 1] = tree_of[node]
                child += 2
            else:
                feature[node] = 0
                threshold[node] = 0.0
                left[node] = node
                right[node] = node
                leaf[node] = depth + c_of[sz]
        if child == n_nodes:
            return n_nodes
        rows, nxt = nxt, rows
        first, n_nodes = n_nodes, child
    return n_nodes


@njit(cache=True, nogil=True)
def _mid_rank(cal: np.ndarray, s: float) -> float:
    """:meth:`detectors.calibration.ConformalThresholder.mid_rank_p_values` of ``s`` against the
    sorted set ``cal`` before its tail: ``(1 + #{cal >= s}) / (n + 1) - 0.5 / (n + 1)``."""
    n = cal.shape[0]
    lo, hi = 0, n
    while lo < hi:  # searchsorted, side left, in NumPy's order (nan last)
        mid = (lo + hi) // 2
        if _ahead(cal[mid], s):
            lo = mid + 1
        else:
            hi = mid
    return (1.0 + (n - lo)) / (n + 1.0) - 0.5 / (n + 1.0)


@njit(cache=True, nogil=True)
def _knn_forest_kernel(
    D: np.ndarray, sqnorm: np.ndarray, V: np.ndarray, Xa: np.ndarray, rest: np.ndarray, c: int, k: int,
    mean: bool, X: np.ndarray, feature: np.ndarray, threshold: np.ndarray, leaf_depth: np.ndarray,
    depth: int, knn_cal: np.ndarray, forest_cal: np.ndarray,
    out_dist: np.ndarray, out_slot: np.ndarray, paths: np.ndarray, comp: np.ndarray, least: np.ndarray,
) -> bool:
    """The l2 scan (:func:`_nearest_kernel`), the forest's paths (:func:`_forest_kernel`), and per
    row what ``SourceMonitor`` makes of them: ``comp[r]`` its kNN score (mean or largest of the
    ``k`` distances), forest score (minus the mean path) and stage 2; ``least[r]`` the p-value
    :func:`detectors.monitor._tippett` takes ``-log`` of (the smaller mid-rank p-value of the
    two, the kNN's alone at kNN score 0). True when some p-value falls where
    ``mid_rank_p_values`` continues the tail (``least`` is then not to be used)."""
    _nearest_kernel(D, sqnorm, V, Xa, rest, c, k, False, out_dist, out_slot)
    _forest_kernel(X, feature, threshold, leaf_depth, depth, paths)
    n = D.shape[0]
    trees = paths.shape[1]
    nk, nf = knn_cal.shape[0], forest_cal.shape[0]
    floor_k, floor_f = 0.5 / (nk + 1.0), 0.5 / (nf + 1.0)
    buf = np.empty(k, np.float64)
    tail = False
    for r in range(n):
        if mean:
            for q in range(k):
                buf[q] = np.float64(out_dist[r, q])
            ks = _pairwise_sum(buf, k, 0.0) / k
        else:
            ks = np.float64(out_dist[r, k - 1])
        fs = -(_pairwise_sum(paths[r], trees, 0.0) / trees)
        comp[r, 0] = ks
        comp[r, 1] = fs
        comp[r, 2] = 2.0
        pk = _mid_rank(knn_cal, ks)
        pf = _mid_rank(forest_cal, fs)
        if (nk > 5 and pk <= floor_k) or (nf > 5 and pf <= floor_f):
            tail = True
        least[r] = pk if ks <= 0.0 else min(pk, pf)
    return tail


@njit(cache=True, nogil=True)
def _own_p_kernel(ascending: np.ndarray, order: np.ndarray, out: np.ndarray) -> None:
    """``out[order[i]] = #{scores >= ascending[i]} / n``: the count from where the run of
    values equal to ``ascending[i]`` starts (``searchsorted`` side left, in NumPy's order),
    found in one pass over the sorted scores instead of a binary search per score."""
    n = ascending.shape[0]
    start = 0
    for i in range(n):
        if i and _ahead(ascending[i - 1], ascending[i]):
            start = i
        out[order[i]] = (n - start) / n


@njit(cache=True, nogil=True)
def _distinct_kernel(B: np.ndarray, inverse: np.ndarray, first: np.ndarray) -> int:
    """The distinct rows of ``B`` (rows as raw words: equal bytes, equal rows): ``first[:count]``
    the row of each one's first occurrence, in order, and ``inverse[r]`` which of them row ``r``
    is. Returns ``count``. Rows compared with the distinct ones so far, each comparison ending at
    the first word that differs (a few words per pair for a block of 32 rows)."""
    n, w = B.shape
    count = 0
    for r in range(n):
        found = -1
        for q in range(count):
            f = first[q]
            same = True
            for u in range(w):
                if B[r, u] != B[f, u]:
                    same = False
                    break
            if same:
                found = q
                break
        if found < 0:
            first[count] = r
            inverse[r] = count
            count += 1
        else:
            inverse[r] = found
    return count


@njit(cache=True, nogil=True)
def _mid_rank_ecdf(null: np.ndarray, t: float) -> float:
    """:func:`detectors.drift._normal_scores`'s argument of ``ndtri`` for one ``t``: the mid-rank
    ECDF ``(lo + hi + 1) / (2 (B + 1))`` of ``t`` among the sorted (finite) null sample."""
    n = null.shape[0]
    lo, hi = 0, n
    while lo < hi:  # searchsorted, side left
        mid = (lo + hi) // 2
        if null[mid] < t:
            lo = mid + 1
        else:
            hi = mid
    left = lo
    hi = n
    while lo < hi:  # side right, from the left one
        mid = (lo + hi) // 2
        if null[mid] <= t:
            lo = mid + 1
        else:
            hi = mid
    return (left + lo + 1.0) / (2.0 * (n + 1))


@njit(cache=True, nogil=True)
def _drift_blocks_kernel(
    rows: np.ndarray, b: int, mu: np.ndarray, sigma: np.ndarray, null_t: np.ndarray,
    z: np.ndarray, p: np.ndarray,
) -> None:
    """The first half of ``CentroidDriftMonitor._block_scores`` for ``nb`` complete blocks of
    ``b`` float32 rows: ``z[i]`` the block's standardised mean (a float64 sum row after row,
    as ``np.add.reduce`` over the block's axis) and ``p[i]`` the mid-rank ECDF of its
    statistic ``T = b * mean(z**2)`` (NumPy's pairwise sum of the row) among ``null_t``."""
    nb, d = z.shape
    acc = np.empty(d, np.float64)
    sq = np.empty(d, np.float64)
    for i in range(nb):
        acc[:] = 0.0
        for r in range(i * b, (i + 1) * b):
            row = rows[r]
            for j in range(d):
                acc[j] += np.float64(row[j])
        zi = z[i]
        for j in range(d):
            v = (acc[j] / b - mu[j]) / sigma[j]
            zi[j] = v
            sq[j] = v * v
        p[i] = _mid_rank_ecdf(null_t, b * (_pairwise_sum(sq, d, 0.0) / d))


@njit(cache=True, nogil=True)
def _drift_projected_kernel(y: np.ndarray, b: int, null_tp: np.ndarray, p: np.ndarray) -> None:
    """``_block_scores``' second statistic ``b * mean(y**2)`` of each projected block mean, as
    its mid-rank ECDF among ``null_tp``."""
    nb, m = y.shape
    sq = np.empty(m, np.float64)
    for i in range(nb):
        for j in range(m):
            sq[j] = y[i, j] * y[i, j]
        p[i] = _mid_rank_ecdf(null_tp, b * (_pairwise_sum(sq, m, 0.0) / m))


@njit(cache=True, nogil=True)
def _drift_larger_kernel(u: np.ndarray, up: np.ndarray, null_v: np.ndarray, p: np.ndarray) -> None:
    """``_normal_scores(null_v, _larger(u, up))``'s ECDF argument: the larger normal score with
    ``_larger``'s tie-breaks, as its mid-rank among ``null_v``."""
    for i in range(u.shape[0]):
        a, c = u[i], up[i]
        v = max(a, c) + 1e-6 * min(a, c) + 1e-9 * (1.0 if a > c else 0.0)
        p[i] = _mid_rank_ecdf(null_v, v)


@njit(cache=True, nogil=True)
def _column_moments_kernel(rows: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> None:
    """``rows.astype(float64).mean(axis=0)`` and ``.std(axis=0)`` of float32 ``rows`` (at least two
    columns), as NumPy computes them: sums row after row (NumPy's order along the outer axis of
    a C-ordered matrix), the mean, then the squared deviations from it summed the same way."""
    n, d = rows.shape
    mean[:] = 0.0
    for r in range(n):
        row = rows[r]
        for j in range(d):
            mean[j] += np.float64(row[j])
    for j in range(d):
        mean[j] = mean[j] / n
    sd[:] = 0.0
    for r in range(n):
        row = rows[r]
        for j in range(d):
            x = np.float64(row[j]) - mean[j]
            sd[j] += x * x
    for j in range(d):
        sd[j] = np.sqrt(sd[j] / n)


@njit(cache=True, nogil=True)
def _replaced_slots_kernel(
    sorted_: np.ndarray, order: np.ndarray, slots: np.ndarray, coming: np.ndarray, window: int,
    out: np.ndarray, out_order: np.ndarray,
) -> None:
    """:func:`_replaced_kernel` from the ring ``slots`` that ``coming`` (in slot order) takes: the
    slots flagged and ``coming`` put in order (stable, nan last: ``argsort(kind="stable")``'s
    order, by insertion: a block of scores is a few dozen) here, not by NumPy calls."""
    nc = coming.shape[0]
    drop = np.zeros(window, np.bool_)
    for q in range(slots.shape[0]):
        drop[slots[q]] = True
    idx = np.empty(nc, np.int64)
    for q in range(nc):
        v = coming[q]
        pos = q
        while pos > 0 and _ahead(v, coming[idx[pos - 1]]):
            idx[pos] = idx[pos - 1]
            pos -= 1
        idx[pos] = q
    values = np.empty(nc, np.float64)
    their_slots = np.empty(nc, np.int64)
    for q in range(nc):
        values[q] = coming[idx[q]]
        their_slots[q] = slots[idx[q]]
    _replaced_kernel(sorted_, order, drop, values, their_slots, out, out_order)

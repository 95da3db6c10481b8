"""The numba kernels of :mod:`detectors.kernels` (numba is imported here only, on first use of the scan)."""

from __future__ import annotations

import numpy as np
from numba import njit

# Candidates are looked for in chunks of this many columns: a chunk whose
# smallest value is above the c-th best so far is skipped after one
# vectorisable minimum (most chunks, once the first few set the bar).
_CHUNK = 16


@njit(cache=True, nogil=True)
def _pairwise_sum(buf: np.ndarray, n: int) -> np.float32:
    """``buf[:n].sum()`` in float32 in NumPy's order (``pairwise_sum`` for n <= 128)."""
    if n < 8:
        res = np.float32(0.0)
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
    return np.float32(0.0) + res


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
    cand_v = np.empty(c, np.float32)
    cand_j = np.empty(c, np.int64)
    exact = np.empty(c, np.float32)
    order = np.empty(c, np.int64)
    buf = np.empty(max(a, 1), np.float32)
    one = np.float32(1.0)
    for r in range(n):
        # the c smallest of D[r] (+ sqnorm), ties by column: sorted insertion
        count = 0
        start = 0
        while start < m:
            stop = min(start + _CHUNK, m)
            if count == c:
                low = D[r, start] + sqnorm[start]
                for j in range(start + 1, stop):
                    v = D[r, j] + sqnorm[j]
                    if v < low:
                        low = v
                if not low < cand_v[c - 1]:
                    start = stop
                    continue
            for j in range(start, stop):
                v = D[r, j] + sqnorm[j]
                if count == c:
                    if not v < cand_v[c - 1]:
                        continue
                    pos = c - 1
                else:
                    pos = count
                    count += 1
                # after every equal value (an earlier column)
                while pos > 0 and cand_v[pos - 1] > v:
                    cand_v[pos] = cand_v[pos - 1]
                    cand_j[pos] = cand_j[pos - 1]
                    pos -= 1
                cand_v[pos] = v
                cand_j[pos] = j
            start = stop
        # exact distances of the candidates, as the NumPy path computes them
        for t in range(count):
            j = cand_j[t]
            if cosine:
                for q in range(a):
                    buf[q] = V[j, q] * Xa[r, q]
                exact[t] = one - _pairwise_sum(buf, a)
            else:
                for q in range(a):
                    d = V[j, q] - Xa[r, q]
                    buf[q] = d * d
                s = _pairwise_sum(buf, a)
                if rest.shape[0]:
                    s = s + rest[r]
                exact[t] = s
        # the k nearest by (distance, slot): insertion sort of the candidates
        for t in range(count):
            v = exact[t]
            j = cand_j[t]
            pos = t
            while pos > 0 and (exact[order[pos - 1]] > v or (exact[order[pos - 1]] == v and cand_j[order[pos - 1]] > j)):
                order[pos] = order[pos - 1]
                pos -= 1
            order[pos] = t
        for t in range(k):
            v = exact[order[t]]
            if v < 0:
                v = np.float32(0.0)
            out_dist[r, t] = v if cosine else np.sqrt(v)
            out_slot[r, t] = cand_j[order[t]]

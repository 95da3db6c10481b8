"""A bounded, rolling reference index of recent normal vectors.

hnswlib is touched from this module only. Two backends share one interface:

- ``exact``: a NumPy ring buffer scanned with one matrix product per batch.
  Inserting is free and the answer exact; cost grows with the capacity.
- ``hnsw``: an hnswlib graph whose oldest entry is evicted by slot reuse:
  the new vector takes the oldest element's slot (label) and hnswlib updates
  it in place and repairs its links, so memory stays at ``capacity`` elements
  however long the stream runs.

``backend="auto"`` picks exact search up to ``exact_max`` stored vectors,
where it is faster than the graph (see ``nwatch bench index`` for the
measurement behind the default).
"""

from __future__ import annotations

import os
import tempfile
from typing import Literal

import numpy as np

from detectors import kernels
from models.base import State
from models.errors import NonFinite, StateMismatch, WrongDimension, ZeroVector

Metric = Literal["l2", "cosine"]

# Every normal event is inserted, so the cost that matters is query + insert
# per event. `nwatch bench index` (2 cores, batches of 256, k=10) measured the
# exact scan at 50-500 us per event up to 16k x 64-d, and hnswlib at 0.5-3 ms,
# almost all of it the in-place update that reuses the oldest slot: exact
# search wins at every size up to 16k. hnswlib serves larger references, where
# a linear scan per query grows past the insert cost.
DEFAULT_EXACT_MAX = 16_384
# Batches of at least this many rows are searched once per distinct row when
# at most this share of their rows is distinct (np.unique costs ~0.1 ms per
# 256 rows; below that share the saving pays for it).
DEDUP_MIN_ROWS = 8
DEDUP_MAX_SHARE = 0.8


# Candidates beyond k whose distances are recomputed exactly (see ReferenceIndex._query_exact).
_SPARE_CANDIDATES = 8


# Candidate selection of the exact scan: the columns of each row are folded
# into groups of up to this many (by stride), the row's c-th smallest group
# minimum is a threshold at or above its c-th smallest entry, and every entry
# at or below it is a candidate. A partial sort of ~m/16 group minima instead
# of argpartition over all m entries: argpartition cost ~20 us per row of
# 2,000 (most of the tabular pipeline's kNN time; `nwatch bench speed`).
_FOLD = 16
# A row with more candidates than this many times c (ties: a reference full of
# one repeated vector) takes argpartition's c instead.
_MAX_CANDIDATE_FACTOR = 4

# The exact scan multiplies only the columns some stored vector is non-zero in
# (a column of zeros adds nothing to a dot product) when they are at most this
# share of the width. Fixed-width encoders leave most of theirs at zero: a
# transaction source of 9 numeric fields fills 9 of its 100 dimensions, and
# the product over all of them was ~12% of the tabular pipeline.
_COMPACT_MAX_SHARE = 0.75


def _candidates(D: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of entries of ``D`` (n, m) holding, per row, at least its ``c`` smallest.

    Rows ascending; at least ``c`` entries per row (every column when ``c >= m``).
    """
    n, m = D.shape
    if c >= m:
        return np.repeat(np.arange(n), m), np.tile(np.arange(m), n)
    g = min(_FOLD, m // (4 * c))
    if g > 1:
        groups = m // g
        folded = D[:, : groups * g].reshape(n, g, groups).min(axis=1)  # strided groups: contiguous minima
        if groups * g < m:
            folded = np.concatenate([folded, D[:, groups * g :]], axis=1)
    else:
        folded = D
    t = np.partition(folded, c - 1, axis=1)[:, c - 1]
    # flatnonzero and a division, not 2-D nonzero: the same pairs in the same
    # (row-major) order, ~12 us instead of ~140 us for 32 x 2,000.
    rows, cols = np.divmod(np.flatnonzero(D <= t[:, None]), m)
    counts = np.bincount(rows, minlength=n)
    heavy = np.flatnonzero(counts > _MAX_CANDIDATE_FACTOR * c)
    if len(heavy):
        keep = counts[rows] <= _MAX_CANDIDATE_FACTOR * c
        part = np.argpartition(D[heavy], c - 1, axis=1)[:, :c]
        rows = np.concatenate([rows[keep], np.repeat(heavy, c)])
        cols = np.concatenate([cols[keep], part.ravel()])
    return rows, cols


def _squares_outside(X: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row of ``X``, the sum of its squares outside the columns of ``mask``."""
    rest = X[:, ~mask]
    return np.einsum("ij,ij->i", rest, rest)


def _nearest(rows: np.ndarray, cols: np.ndarray, dist: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``n``, the ``k`` candidates of least distance, ties by column: ``(dist, cols)`` (n, k).

    The same whatever order the candidates came in; every row has at least ``k``.
    """
    flat = np.lexsort((cols, dist, rows))
    starts = np.searchsorted(rows[flat], np.arange(n))
    pick = flat[starts[:, None] + np.arange(k)]
    return dist[pick], cols[pick]


def distinct_rows(X: np.ndarray, max_share: float) -> tuple[np.ndarray, np.ndarray] | None:
    """``(the distinct rows of X, first occurrences in order; each row's index among them)``,
    or None when more than ``max_share`` of the rows are distinct.

    Rows are told apart by their bytes through a dict: ``np.unique(axis=0)``
    sorts rows as structured records, ~2 ms for 256 rows of dim 385.
    """
    first: dict[bytes, int] = {}
    inverse = np.fromiter((first.setdefault(row.tobytes(), len(first)) for row in X), np.intp, len(X))
    if len(first) > max_share * len(X):
        return None
    return X[np.unique(inverse, return_index=True)[1]], inverse


class ReferenceIndex:
    """First-in first-out reference of at most ``capacity`` vectors with their ids.

    Parameters
    ----------
    dim : int
        Vector width.
    capacity : int
        Most vectors kept; the oldest is evicted first.
    metric : {"l2", "cosine"}
        Euclidean distance, or cosine distance ``1 - cos`` (vectors are normalised on entry).
    backend : {"auto", "exact", "hnsw"}
    exact_max : int
        With ``auto``, the largest capacity served by exact search.
    M, ef_construction, ef_search : int
        hnswlib graph parameters.

    >>> idx = ReferenceIndex(dim=2, capacity=3)
    >>> idx.add(np.array([[0, 0], [1, 0], [5, 5], [6, 6]], dtype=np.float32), ["a", "b", "c", "d"])
    >>> idx.size, idx.ids_of(idx.query(np.array([[0.9, 0.0]], dtype=np.float32), 1)[1])[0]
    (3, ['b'])
    """

    def __init__(
        self,
        *,
        dim: int,
        capacity: int = 2000,
        metric: Metric = "l2",
        backend: Literal["auto", "exact", "hnsw"] = "auto",
        exact_max: int = DEFAULT_EXACT_MAX,
        M: int = 16,
        ef_construction: int = 100,
        ef_search: int = 64,
        seed: int = 0,
    ) -> None:
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', not {metric!r}")
        if backend not in ("auto", "exact", "hnsw"):
            raise ValueError(f"backend must be 'auto', 'exact' or 'hnsw', not {backend!r}")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.dim = dim
        self.capacity = capacity
        self.metric = metric
        self.backend = backend
        self.exact_max = exact_max
        self.M = M
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.seed = seed
        # an object array: the ids of a batch's neighbours are one gather (ids_of)
        self._ids = np.full(capacity, None, dtype=object)
        self._added = 0  # total ever added; slot of sequence number s is s % capacity
        self._vecs: np.ndarray | None = None  # exact backend
        self._sqnorm: np.ndarray | None = None
        # exact backend: columns that may hold a non-zero (every column some
        # stored vector fills, and perhaps a few no longer filled), their
        # indices (None: too many to be worth it) and _vecs restricted to them
        self._active_mask: np.ndarray | None = None
        self._active: np.ndarray | None = None
        self._compact: np.ndarray | None = None
        self._hnsw = None

    # -- properties -----------------------------------------------------------
    @property
    def is_exact(self) -> bool:
        return self.backend == "exact" or (
            self.backend == "auto" and self.capacity <= self.exact_max
        )

    @property
    def size(self) -> int:
        return min(self._added, self.capacity)

    @property
    def n_added(self) -> int:
        return self._added

    @property
    def nbytes(self) -> int:
        """Memory held by vectors and graph (ids excluded)."""
        if self.is_exact:
            return 0 if self._vecs is None else self._vecs.nbytes + self._sqnorm.nbytes
        if self._hnsw is None:
            return 0
        # hnswlib: per element the vector, level-0 links (2*M ints + count) and a label.
        per = self.dim * 4 + (2 * self.M + 1) * 4 + 8
        return self.capacity * per

    # -- input checks ---------------------------------------------------------
    def as_stored(self, X: np.ndarray) -> np.ndarray:
        """``X`` checked (dimension, finite values) and as the index stores it: float32, unit rows
        for the cosine metric."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise WrongDimension(f"expected vectors of dimension {self.dim}, got shape {X.shape}")
        if not np.logical_and.reduce(np.isfinite(X), axis=None):  # .all() without its wrapper
            raise NonFinite("vectors contain NaN or infinity")
        if self.metric == "cosine":
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            if (norms == 0).any():
                raise ZeroVector("a zero vector has no direction for the cosine metric")
            X = X / norms
        return X

    # -- building -------------------------------------------------------------
    def _init_storage(self) -> None:
        if self.is_exact:
            self._vecs = np.zeros((self.capacity, self.dim), dtype=np.float32)
            self._sqnorm = np.zeros(self.capacity, dtype=np.float32)
            self._set_active(np.zeros(self.dim, dtype=bool))
        else:
            import hnswlib

            self._hnsw = hnswlib.Index(space="l2" if self.metric == "l2" else "cosine", dim=self.dim)
            self._hnsw.init_index(
                max_elements=self.capacity,
                ef_construction=self.ef_construction,
                M=self.M,
                random_seed=self.seed,
            )
            self._hnsw.set_ef(self.ef_search)
            self._hnsw.set_num_threads(1)

    def add(self, X: np.ndarray, ids: list[str]) -> None:
        """Insert vectors, evicting the oldest beyond capacity."""
        X = self.as_stored(X)
        if len(ids) != len(X):
            raise ValueError("one id per vector")
        if len(X) == 0:
            return
        if len(X) > self.capacity:  # only the newest capacity rows can survive
            X, ids = X[-self.capacity :], ids[-self.capacity :]
        if self._vecs is None and self._hnsw is None:
            self._init_storage()
        seq = np.arange(self._added, self._added + len(X), dtype=np.int64)
        slots = seq % self.capacity
        if self.is_exact:
            self._vecs[slots] = X
            self._sqnorm[slots] = np.einsum("ij,ij->i", X, X)
            mask = self._active_mask
            if (self._added + len(X)) // self.capacity > self._added // self.capacity:
                # A reference's worth inserted since the last count: columns
                # whose vectors were all evicted leave (a count per insert cost
                # more than the scan saved).
                self._set_active(np.any(self._vecs[: min(self._added + len(X), self.capacity)] != 0, axis=0))
            elif self._compact is not None:
                # no non-zero outside the stored columns when the counts agree (as_stored
                # let no NaN through): two counts instead of gathering the other columns
                Xa = X[:, self._active]
                if np.count_nonzero(Xa) != np.count_nonzero(X):
                    self._set_active(mask | np.any(X != 0, axis=0))
                else:
                    self._compact[slots] = Xa
            elif not mask.all() and (X[:, ~mask] != 0).any():
                self._set_active(mask | np.any(X != 0, axis=0))
        else:
            # The oldest slot is reused by updating its element in place: its
            # label (the slot number) stays, hnswlib re-links its neighbours.
            # hnswlib 0.8.0's mark_deleted + replace_deleted path loses track of
            # labels once replacements span batches (a present label then reads
            # as "already deleted"; chroma-core/chroma#2621 reproduces it), so
            # it is not used.
            self._hnsw.add_items(X, slots, num_threads=1)
        self._ids[slots] = ids
        self._added += len(X)

    def _set_active(self, mask: np.ndarray) -> None:
        """Take ``mask`` as the columns stored vectors may be non-zero in; rebuild the compact copy."""
        self._active_mask = mask
        active = np.flatnonzero(mask)
        if len(active) > _COMPACT_MAX_SHARE * self.dim:
            self._active = self._compact = None
        else:
            self._active = active
            self._compact = np.ascontiguousarray(self._vecs[:, active])

    # -- searching ------------------------------------------------------------
    def query(self, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``min(k, size)`` nearest stored vectors of each row.

        Returns distances ``(n, k')`` float32 in increasing order (Euclidean, or
        ``1 - cos``) and their slots ``(n, k')`` (see :meth:`ids_of`).
        Does not change the index.
        """
        X = self.as_stored(X)
        k = min(k, self.size)
        n = len(X)
        if k == 0 or n == 0:
            return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
        if n >= DEDUP_MIN_ROWS:
            # Streams repeat themselves: a batch of log lines holds a few
            # templates, texts and records recur. Each distinct row is searched
            # once (a row's answer does not depend on the other rows), which
            # took BGL log batches from ~10 distinct of 256 rows to ~10 searches.
            found = distinct_rows(X, DEDUP_MAX_SHARE)
            if found is not None:
                rows, inverse = found
                dist, slots = self._search(rows, k)
                return dist[inverse], slots[inverse]
        return self._search(X, k)

    def _search(self, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.is_exact:
            return self._query_exact(X, k)
        self._hnsw.set_ef(max(self.ef_search, k))
        labels, dist = self._hnsw.knn_query(X, k=k, num_threads=1)
        if self.metric == "l2":
            dist = np.sqrt(np.maximum(dist, 0.0))
        return dist.astype(np.float32), labels.astype(np.int64)

    def _query_exact(self, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """A matrix product picks candidates; their distances are then computed pair by pair.

        ``|x|^2 + |v|^2 - 2 x.v`` in float32 cancels badly for close pairs, and
        BLAS rounds it differently for batches of different shapes: the
        recomputed distance is exact to float32 and the same however the
        queries were batched. A few spare candidates keep near ties right.
        """
        D, sqnorm, V, Xa, rest, c = self.products(X, k)
        if Xa.shape[1] <= kernels.MAX_WIDTH and kernels.loaded():
            # The same answer in one compiled pass per row (detectors.kernels).
            return kernels.nearest_from_products(D, sqnorm, V, Xa, rest, c, k, cosine=self.metric == "cosine")
        if sqnorm is not None:
            D += sqnorm[None, :]
        rows, cols = _candidates(D, c)
        cand = V[cols]  # (pairs, columns), a fresh gather: worked in place
        if self.metric == "cosine":
            dpart = 1.0 - np.multiply(cand, Xa[rows], out=cand).sum(axis=1)
        else:
            diff = np.subtract(cand, Xa[rows], out=cand)
            dpart = np.multiply(diff, diff, out=diff).sum(axis=1)
            if rest is not None:
                dpart += rest[rows]
        dist, slots = _nearest(rows, cols, dpart, len(X), k)
        dist = np.maximum(dist, 0.0)
        if self.metric == "l2":
            dist = np.sqrt(dist)
        return dist.astype(np.float32), slots.astype(np.int64)

    def products(
        self, X: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray, np.ndarray | None, int]:
        """What the exact scan picks candidates from (rows of ``X`` as stored, ``1 <= k <= size``):
        ``(D, sqnorm, V, Xa, rest, c)`` as :func:`detectors.kernels.nearest_from_products` takes
        them (``sqnorm`` None for cosine)."""
        m = self.size
        # Over the columns some stored vector fills, when few: the rest of a
        # dot product is zero, and the rest of a squared distance is the
        # query's own squares there (``_query_exact`` docstring: the distances
        # are still recomputed pair by pair, only over fewer columns).
        rest = None
        if self._compact is not None:
            V, Xa = self._compact[:m], X[:, self._active]
            # Queries are nearly always zero where no stored vector is (a source's
            # unfilled slots): then the rest is 0 and adding it changes no distance,
            # which two counts tell cheaper than gathering those columns.
            if self.metric == "l2" and np.count_nonzero(Xa) != np.count_nonzero(X):
                rest = _squares_outside(X, self._active_mask)
        else:
            V, Xa = self._vecs[:m], X
        # Turned into distances in place. A few wide rows (log lines, texts:
        # repeated rows are searched once) go faster through OpenBLAS as
        # V @ X.T: 0.35 ms instead of 0.68 ms for 10 x 385 against 2,000.
        # Only the order within a row picks candidates, so D leaves out what is
        # the same along a row (1 for cosine, |x|^2 for l2) and the factor -2
        # goes into the query before the product: one pass over D instead of
        # three.
        Q = Xa * (-1.0 if self.metric == "cosine" else -2.0)
        D = np.ascontiguousarray((V @ Q.T).T) if 4 * len(Q) <= Q.shape[1] else Q @ V.T
        c = min(m, k + _SPARE_CANDIDATES)
        return D, self._sqnorm[:m] if self.metric == "l2" else None, V, Xa, rest, c

    def ids_of(self, slots: np.ndarray) -> list[list[str]]:
        return self._ids[slots].tolist()

    def vectors(self) -> np.ndarray:
        """The stored vectors, oldest first (a copy). Exact search over them is the recall oracle."""
        if self.size == 0:
            return np.zeros((0, self.dim), np.float32)
        slots = np.arange(self._added - self.size, self._added) % self.capacity
        if self.is_exact:
            return self._vecs[slots]  # a gather: a copy already
        return np.asarray(self._hnsw.get_items(slots), dtype=np.float32)

    def stored_columns(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The stored vectors, oldest first, as :meth:`vectors`, but only the columns some stored
        vector fills when the scan keeps them apart (the others are 0 in every one): ``(rows,
        columns)``; ``columns`` None when ``rows`` are whole."""
        if self._compact is None or self.size == 0:
            return self.vectors(), None
        slots = np.arange(self._added - self.size, self._added) % self.capacity
        return self._compact[slots], self._active

    def ids(self) -> list[str]:
        """The stored vectors' ids, oldest first (the order of :meth:`vectors`)."""
        slots = np.arange(self._added - self.size, self._added) % self.capacity
        return [self._ids[s] for s in slots.tolist()]

    # -- state ----------------------------------------------------------------
    def get_state(self) -> State:
        state: State = {
            "dim": self.dim,
            "capacity": self.capacity,
            "metric": self.metric,
            "exact": self.is_exact,
            "added": self._added,
            "ids": [i if i is not None else "" for i in self._ids],
        }
        if self.is_exact:
            if self._vecs is not None:
                state["vectors"] = self._vecs.copy()
        elif self._hnsw is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "index.bin")
                self._hnsw.save_index(path)
                with open(path, "rb") as f:
                    state["hnsw"] = np.frombuffer(f.read(), dtype=np.uint8).copy()
        return state

    def set_state(self, state: State) -> None:
        if (
            int(state["dim"]) != self.dim
            or int(state["capacity"]) != self.capacity
            or state["metric"] != self.metric
            or bool(state["exact"]) != self.is_exact
        ):
            raise StateMismatch(
                "saved index (dim {dim}, capacity {capacity}, metric {metric}) does not fit this one "
                f"(dim {self.dim}, capacity {self.capacity}, metric {self.metric})".format(**state)
            )
        self._added = int(state["added"])
        self._ids = np.array([i if i != "" else None for i in state["ids"]], dtype=object)
        self._vecs = self._sqnorm = self._hnsw = None
        self._active_mask = self._active = self._compact = None
        if self.is_exact:
            if "vectors" in state:
                self._vecs = np.array(state["vectors"], dtype=np.float32)
                self._sqnorm = np.einsum("ij,ij->i", self._vecs, self._vecs)
                self._set_active(np.any(self._vecs != 0, axis=0))
        elif "hnsw" in state:
            import hnswlib

            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "index.bin")
                with open(path, "wb") as f:
                    f.write(np.asarray(state["hnsw"], dtype=np.uint8).tobytes())
                index = hnswlib.Index(space="l2" if self.metric == "l2" else "cosine", dim=self.dim)
                index.load_index(path, max_elements=self.capacity)
            index.set_ef(self.ef_search)
            index.set_num_threads(1)
            self._hnsw = index

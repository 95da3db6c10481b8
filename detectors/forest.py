"""Isolation trees grown on the kNN reference: a second, differently-biased anomaly score.

The kNN distance measures how far an event is from its nearest normal events
in a fixed metric, so every feature weighs by its scale. An isolation tree
(Liu, Ting and Zhou, *Isolation Forest*, ICDM 2008) instead splits one
feature at a time at a uniform point of its range: an event is anomalous when
few splits isolate it, whatever the feature's scale or the density elsewhere.
The two disagree most where features are zero-inflated or heavy-tailed, which
is where the kNN distance is weakest (ADBench mammography, cardio).

The forest is grown on subsamples of the source's reference (the events that
were accepted as normal), never on flagged events, and renewed tree by tree as
the reference rolls: after ``refresh`` events have been learnt, the oldest
tree is regrown from the reference as it stands. Pure NumPy, deterministic
given the seed and the sequence of calls.

>>> rng = np.random.default_rng(0)
>>> f = IsolationForest(trees=20, sample_size=64, seed=0)
>>> f.fit(rng.normal(size=(500, 3)).astype(np.float32))
>>> s = f.score(np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0]], dtype=np.float32))
>>> bool(s[1] > s[0])
True
"""

from __future__ import annotations

import math

import numpy as np

from detectors import kernels
from models.base import State
from models.errors import StateMismatch

_EULER = 0.5772156649015329


def average_path(n: np.ndarray | float) -> np.ndarray:
    """Expected path length of an unsuccessful search in a binary tree of ``n`` points (c(n) of the paper)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    big = n > 2
    out[n == 2] = 1.0
    out[big] = 2.0 * (np.log(n[big] - 1.0) + _EULER) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def _average_paths(upto: int) -> np.ndarray:
    """``c(0) .. c(upto)`` as a table: a node's size indexes it while growing."""
    return average_path(np.arange(upto + 1, dtype=np.float64))


class IsolationForest:
    """A fixed number of isolation trees kept in flat arrays, scored all at once.

    ``score(X)`` is the mean path length over the trees, negated (higher = more
    anomalous, as every detector here); ``fit(R)`` grows every tree from
    subsamples of ``R``; ``regrow(R, count)`` replaces the ``count`` oldest trees.
    """

    def __init__(self, *, trees: int = 50, sample_size: int = 256, seed: int = 0) -> None:
        if trees < 1:
            raise ValueError("trees must be at least 1")
        if sample_size < 2:
            raise ValueError("sample_size must be at least 2")
        self.trees = trees
        self.sample_size = sample_size
        self.seed = seed
        self.depth = math.ceil(math.log2(sample_size))
        self._grown = 0  # trees grown so far: tree i draws from the seed and i alone
        self._forest: list[dict[str, np.ndarray]] = []
        self._next = 0  # the oldest tree, regrown next
        self._packed: tuple[np.ndarray, ...] | None = None

    @property
    def is_ready(self) -> bool:
        return len(self._forest) == self.trees

    def fit(self, R: np.ndarray, *, columns: np.ndarray | None = None) -> None:
        """Grow every tree afresh from subsamples of the rows of ``R``.

        ``columns``: ``R`` (not empty) holds only these columns of the rows, every
        other column of them being 0; the trees split on them by their place in a
        full row. The same trees as from the full rows, without copying the zeros.
        """
        if columns is not None and not len(R):
            raise ValueError("a forest grown on some columns needs rows")
        self._forest = self._grow(np.asarray(R, dtype=np.float32), self.trees, columns)
        self._next = 0
        self._packed = None

    def regrow(self, R: np.ndarray, count: int = 1, *, columns: np.ndarray | None = None) -> None:
        """Replace the ``count`` oldest trees by trees grown on subsamples of ``R`` (``columns``:
        as :meth:`fit`)."""
        if not self.is_ready:
            self.fit(R, columns=columns)
            return
        count = min(count, self.trees)
        new = self._grow(np.asarray(R, dtype=np.float32), count, columns)
        slots = [(self._next + i) % self.trees for i in range(count)]
        for i, tree in zip(slots, new):
            self._forest[i] = tree
        if self._packed is not None:
            for packed, rows in zip(self._packed, self._complete(new)):
                packed[slots] = rows
        self._next = (self._next + count) % self.trees

    def _grow(self, R: np.ndarray, count: int, within: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        """``count`` trees, each on its own subsample, grown together a level at a time.

        Every node of a level, in every tree, is split in one pass (:meth:`_levels`,
        or its compiled equal): a feature drawn uniformly among those that vary
        in the node, at a point uniform in its range; a node of one row, of
        identical rows, or at the depth limit is a leaf, scored ``depth + c(rows)``.
        """
        rng = np.random.default_rng([self.seed, self._grown])
        self._grown += count
        m = min(self.sample_size, len(R))
        # A column constant over R is constant in every node, so it is never
        # drawn: growing on the others alone draws the same trees, at a fraction
        # of the cost where most of the encoder's slots are unused (shuttle: 9
        # of 100). ``columns`` maps the features drawn back to R's.
        varying = np.flatnonzero(R.max(axis=0) > R.min(axis=0)) if len(R) else np.arange(R.shape[1])
        if within is None:
            columns = take = varying if len(varying) else np.arange(1)
        elif len(varying):
            columns, take = np.asarray(within, np.intp)[varying], varying
        else:  # nothing varies: the full rows' first column, as above (R's copy of it, or 0)
            columns, take = np.arange(1), np.flatnonzero(np.asarray(within) == 0)
        S = np.concatenate([R[rng.choice(len(R), size=m, replace=False)][:, take] for _ in range(count)])
        if S.shape[1] < len(columns):
            S = np.zeros((len(S), len(columns)), np.float32)
        c_of = _average_paths(m)
        if kernels.loaded():
            # The same levels in one compiled pass: the draws NumPy would make
            # level by level are made at once (Generator.random draws doubles one
            # after another, so the first ones are the same), enough for every
            # node of complete trees; the kernel uses what the levels need.
            nodes = count * (2 ** (self.depth + 1) - 1)
            draws = rng.random(2 * nodes)
            feature, left, right, tree_of = (np.empty(nodes, np.int64) for _ in range(4))
            threshold, leaf = np.empty(nodes, np.float32), np.empty(nodes, np.float64)
            used = kernels.grow_levels(S, m, count, self.depth, draws, c_of, columns,
                                       feature, threshold, left, right, leaf, tree_of)
            feature, threshold, left, right, leaf, tree_of = (
                a[:used] for a in (feature, threshold, left, right, leaf, tree_of))
        else:
            feature, threshold, left, right, leaf, tree_of = self._levels(
                S, m, count, rng, c_of, columns)
        trees = []
        for i in range(count):
            idx = np.flatnonzero(tree_of == i)  # breadth first, its root first
            local_id = np.zeros(len(tree_of), np.int64)
            local_id[idx] = np.arange(len(idx))
            trees.append({
                "feature": feature[idx].astype(np.int32),
                "threshold": threshold[idx],
                "left": local_id[left[idx]].astype(np.int32),
                "right": local_id[right[idx]].astype(np.int32),
                "leaf_depth": leaf[idx],
            })
        return trees

    def _levels(self, S: np.ndarray, m: int, count: int, rng: np.random.Generator, c_of: np.ndarray,
                columns: np.ndarray) -> tuple[np.ndarray, ...]:
        """The nodes of ``count`` trees grown on ``S`` (``count`` subsamples of ``m`` rows), every
        node of a level, in every tree, split in one pass of NumPy; node arrays in level order:
        feature (``columns``' numbering), threshold, left, right (ids; a leaf's are its own),
        leaf depth, tree. :func:`detectors.kernels.grow_levels` is the compiled equal."""
        d = S.shape[1]
        parts: list[tuple[np.ndarray, ...]] = []  # per level: feature, threshold, left, right, leaf, tree
        rows = np.arange(len(S))
        node_of = np.repeat(np.arange(count), m)  # the node each live row is in (global id)
        tree_of_level = np.arange(count)
        first, n_nodes = 0, count  # the level's nodes are first .. n_nodes - 1
        for depth in range(self.depth + 1):
            level = n_nodes - first
            order = np.argsort(node_of, kind="stable")
            rows, local = rows[order], node_of[order] - first
            sizes = np.bincount(local, minlength=level)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            occupied = sizes > 0
            lo = np.zeros((level, d), S.dtype)
            hi = np.zeros((level, d), S.dtype)
            if occupied.any():
                sub = S[rows]
                lo[occupied] = np.minimum.reduceat(sub, starts[occupied], axis=0)
                hi[occupied] = np.maximum.reduceat(sub, starts[occupied], axis=0)
            varying = hi > lo
            n_varying = varying.sum(axis=1)
            splits = (sizes > 1) & (n_varying > 0) & (depth < self.depth)
            pick = np.minimum((rng.random(level) * n_varying).astype(np.int64), np.maximum(n_varying - 1, 0))
            f = np.minimum((np.cumsum(varying, axis=1) <= pick[:, None]).sum(axis=1), d - 1)
            ar = np.arange(level)
            t = lo[ar, f] + rng.random(level).astype(S.dtype) * (hi[ar, f] - lo[ar, f])
            n_split = int(splits.sum())
            child = np.full(level, -1, np.int64)
            child[splits] = n_nodes + 2 * np.arange(n_split)
            ids = first + ar
            f = np.where(splits, f, 0).astype(np.int32)
            t = np.where(splits, t, 0).astype(np.float32)
            parts.append((np.where(splits, columns[f], 0), t, np.where(splits, child, ids), np.where(splits, child + 1, ids),
                          np.where(splits, 0.0, depth + c_of[sizes]),
                          tree_of_level))
            if not n_split:
                break
            live = splits[local]
            rows, local = rows[live], local[live]
            node_of = child[local] + (S[rows, f[local]] >= t[local])
            tree_of_level = np.repeat(tree_of_level[splits], 2)
            first, n_nodes = n_nodes, n_nodes + 2 * n_split
        return tuple(np.concatenate(c) for c in zip(*parts))

    def _complete(self, trees: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``trees`` as complete binary trees of ``depth`` levels, for scoring without child pointers.

        Row ``i`` of each array is tree ``i``; node ``j`` (heap order: root 0,
        children ``2j + 1`` and ``2j + 2``) holds a feature and a threshold, and
        the ``2 ** depth`` leaves their depth-corrected path lengths. A leaf
        reached above the last level stands for all its descendants: its
        threshold is +inf, so every row goes left, to a copy of itself.
        """
        sizes = [len(t["feature"]) for t in trees]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
        cat = {key: np.concatenate([t[key] for t in trees]) for key in trees[0]}
        left = cat["left"].astype(np.intp) + np.repeat(offsets, sizes)
        right = cat["right"].astype(np.intp) + np.repeat(offsets, sizes)
        is_leaf = left == np.arange(len(left))
        threshold = np.where(is_leaf, np.float32(np.inf), cat["threshold"]).astype(np.float32)
        at = offsets[:, None]  # the node at each position of the current level, per tree
        features, thresholds = [], []
        for _ in range(self.depth):
            features.append(cat["feature"][at])
            thresholds.append(threshold[at])
            at = np.stack([left[at], right[at]], axis=2).reshape(len(trees), -1)
        return (np.concatenate(features, axis=1).astype(np.int32),
                np.concatenate(thresholds, axis=1), cat["leaf_depth"][at])

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every tree's complete form (:meth:`_complete`), stacked: ``(trees, 2**depth - 1)`` twice
        and ``(trees, 2**depth)``; after a regrow only the new trees' rows are rebuilt."""
        if self._packed is None:
            self._packed = self._complete(self._forest)
        return self._packed

    def score(self, X: np.ndarray) -> np.ndarray:
        """``(n,)`` float64: minus the mean path length (0 for every row until fitted).

        With the compiled kernels (:func:`detectors.kernels.forest_paths`) the
        rows descend each tree in one compiled pass; without them every row
        descends every tree at once in NumPy, a level per step, over an
        ``(n, trees)`` array of heap positions: three gathers and a comparison
        per level. Both reach the same leaves, and the mean is NumPy's in both.
        """
        X = np.asarray(X, dtype=np.float32)
        n = len(X)
        if not self._forest or n == 0:
            return np.zeros(n, np.float64)
        feature, threshold, leaf_depth = self.packed()
        if kernels.loaded():
            # np.mean's arithmetic (add.reduce, then a division) without its Python wrapper
            paths = kernels.forest_paths(X, feature, threshold, leaf_depth, self.depth)
            return -(np.add.reduce(paths, axis=1) / paths.shape[1])
        inner = feature.shape[1]
        feature, threshold = feature.ravel(), threshold.ravel()
        base = np.arange(self.trees, dtype=np.intp) * inner
        flat = X.ravel()
        row = (np.arange(n, dtype=np.intp) * X.shape[1])[:, None]
        node = np.zeros((n, self.trees), np.intp)
        for _ in range(self.depth):
            at = base + node
            node = 2 * node + 1 + (flat[row + feature[at]] >= threshold[at])
        leaves = leaf_depth.shape[1]
        return -leaf_depth.ravel()[base // inner * leaves + (node - inner)].mean(axis=1)

    def get_state(self) -> State:
        return {
            "trees": self.trees,
            "sample_size": self.sample_size,
            "forest": [dict(t) for t in self._forest],
            "next": self._next,
            "grown": self._grown,
        }

    def set_state(self, state: State) -> None:
        if int(state["trees"]) != self.trees or int(state["sample_size"]) != self.sample_size:
            raise StateMismatch(
                f"saved forest has {state['trees']} trees of {state['sample_size']}, "
                f"this one {self.trees} of {self.sample_size}"
            )
        self._forest = [
            {key: np.asarray(v) for key, v in t.items()} for t in state["forest"]
        ]
        self._next = int(state["next"])
        self._grown = int(state["grown"])
        self._packed = None

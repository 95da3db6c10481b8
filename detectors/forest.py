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


class IsolationForest:
    """A fixed number of isolation trees kept in flat arrays, scored all at once.

    ``score(X)`` is the mean path length over the trees, negated (higher = more
    anomalous, as every detector here); ``fit(R)`` grows every tree from
    subsamples of ``R``; ``regrow(R)`` replaces the oldest tree only.
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

    def fit(self, R: np.ndarray) -> None:
        """Grow every tree afresh from subsamples of the rows of ``R``."""
        R = np.asarray(R, dtype=np.float32)
        self._forest = [self._grow(R) for _ in range(self.trees)]
        self._next = 0
        self._packed = None

    def regrow(self, R: np.ndarray) -> None:
        """Replace the oldest tree by one grown on a subsample of ``R``."""
        if not self.is_ready:
            self.fit(R)
            return
        self._forest[self._next] = self._grow(np.asarray(R, dtype=np.float32))
        self._next = (self._next + 1) % self.trees
        self._packed = None

    def _grow(self, R: np.ndarray) -> dict[str, np.ndarray]:
        """One tree, grown a level at a time (every node of a level in one pass of NumPy)."""
        rng = np.random.default_rng([self.seed, self._grown])
        self._grown += 1
        m = min(self.sample_size, len(R))
        S = R[rng.choice(len(R), size=m, replace=False)] if m < len(R) else R
        feature = [np.zeros(1, np.int32)]
        threshold = [np.zeros(1, np.float32)]
        left = [np.zeros(1, np.int32)]
        right = [np.zeros(1, np.int32)]
        leaf_depth = [np.zeros(1)]
        rows = np.arange(len(S))
        node_of = np.zeros(len(S), np.int64)  # the node (of the current level) each live row is in
        first = 0  # id of the level's first node
        n_nodes = 1
        for depth in range(self.depth + 1):
            order = np.argsort(node_of, kind="stable")
            rows, node_of = rows[order], node_of[order]
            level = n_nodes - first
            local = node_of - first
            sizes = np.bincount(local, minlength=level)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            sub = S[rows]
            occupied = sizes > 0
            lo = np.zeros((level, S.shape[1]), S.dtype)
            hi = np.zeros((level, S.shape[1]), S.dtype)
            if occupied.any():
                lo[occupied] = np.minimum.reduceat(sub, starts[occupied], axis=0)
                hi[occupied] = np.maximum.reduceat(sub, starts[occupied], axis=0)
            varying = hi > lo
            n_varying = varying.sum(axis=1)
            splits = (sizes > 1) & (n_varying > 0) & (depth < self.depth)
            # a feature drawn uniformly among those that vary in the node, a point uniform in its range
            pick = np.minimum((rng.random(level) * n_varying).astype(np.int64), np.maximum(n_varying - 1, 0))
            f = (np.cumsum(varying, axis=1) <= pick[:, None]).sum(axis=1)
            f = np.minimum(f, S.shape[1] - 1)
            ar = np.arange(level)
            t = lo[ar, f] + rng.random(level).astype(S.dtype) * (hi[ar, f] - lo[ar, f])
            ids = first + ar
            n_split = int(splits.sum())
            child = np.full(level, -1, np.int64)
            child[splits] = n_nodes + 2 * np.arange(n_split)
            lvl_feature = np.where(splits, f, 0).astype(np.int32)
            lvl_threshold = np.where(splits, t, 0).astype(np.float32)
            lvl_left = np.where(splits, child, ids).astype(np.int32)
            lvl_right = np.where(splits, child + 1, ids).astype(np.int32)
            lvl_leaf = np.where(splits, 0.0, depth + average_path(sizes.astype(np.float64)))
            if depth == 0:
                feature[0], threshold[0], left[0], right[0], leaf_depth[0] = (
                    lvl_feature, lvl_threshold, lvl_left, lvl_right, lvl_leaf)
            else:
                feature.append(lvl_feature)
                threshold.append(lvl_threshold)
                left.append(lvl_left)
                right.append(lvl_right)
                leaf_depth.append(lvl_leaf)
            if not n_split:
                break
            live = splits[local]
            rows, local = rows[live], local[live]
            go_right = S[rows, lvl_feature[local]] >= lvl_threshold[local]
            node_of = child[local] + go_right
            first, n_nodes = n_nodes, n_nodes + 2 * n_split
        return {
            "feature": np.concatenate(feature),
            "threshold": np.concatenate(threshold),
            "left": np.concatenate(left),
            "right": np.concatenate(right),
            "leaf_depth": np.concatenate(leaf_depth),
        }

    def _pack(self) -> tuple[np.ndarray, ...]:
        """All trees in one node array (child indices offset), and each tree's root."""
        if self._packed is None:
            sizes = [len(t["feature"]) for t in self._forest]
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
            cat = {key: np.concatenate([t[key] for t in self._forest]) for key in self._forest[0]}
            for key in ("left", "right"):
                cat[key] = cat[key] + np.repeat(offsets, sizes)
            self._packed = (cat["feature"], cat["threshold"], cat["left"], cat["right"],
                            cat["leaf_depth"], offsets)
        return self._packed

    def score(self, X: np.ndarray) -> np.ndarray:
        """``(n,)`` float64: minus the mean path length (0 for every row until fitted)."""
        X = np.asarray(X, dtype=np.float32)
        n = len(X)
        if not self._forest or n == 0:
            return np.zeros(n, np.float64)
        feature, threshold, left, right, leaf_depth, roots = self._pack()
        node = np.broadcast_to(roots, (n, len(roots))).copy()
        rows = np.arange(n)[:, None]
        # a leaf points to itself, so depth steps take every row to its leaf
        for _ in range(self.depth):
            node = np.where(X[rows, feature[node]] < threshold[node], left[node], right[node])
        return -leaf_depth[node].mean(axis=1)

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

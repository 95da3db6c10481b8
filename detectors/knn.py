"""kNN scoring against a rolling reference: the distance to the k nearest normal events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from detectors.index import DEFAULT_EXACT_MAX, Metric, ReferenceIndex
from models.base import State
from models.errors import StateMismatch


@dataclass(frozen=True, slots=True)
class KNNResult:
    """Scores of a batch with the neighbours behind them (``distances``/``slots`` are ``(n, k')``)."""

    scores: np.ndarray
    distances: np.ndarray
    neighbour_ids: list[list[str]]


class KNNDetector:
    """Mean (or largest) distance to the ``k`` nearest vectors of a rolling reference.

    ``score`` never changes state; ``learn`` adds vectors to the reference. The
    caller scores a batch first and learns afterwards only what it accepted, so
    an event is never its own neighbour and flagged events never become normal.
    The index is created on the first ``learn``, when the dimension is known.

    >>> det = KNNDetector(k=1, capacity=10)
    >>> det.learn(np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32), ["a", "b"])
    >>> det.score(np.array([[0.0, 3.0]], dtype=np.float32)).round(3).tolist()
    [3.0]
    """

    def __init__(
        self,
        *,
        k: int = 10,
        capacity: int = 2000,
        metric: Metric = "l2",
        aggregate: Literal["mean", "max"] = "mean",
        backend: Literal["auto", "exact", "hnsw"] = "auto",
        exact_max: int = DEFAULT_EXACT_MAX,
        ef_search: int = 64,
        seed: int = 0,
    ) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        if aggregate not in ("mean", "max"):
            raise ValueError("aggregate must be 'mean' or 'max'")
        self.k = k
        self.capacity = capacity
        self.metric = metric
        self.aggregate = aggregate
        self.backend = backend
        self.exact_max = exact_max
        self.ef_search = ef_search
        self.seed = seed
        self.index: ReferenceIndex | None = None

    @property
    def size(self) -> int:
        return 0 if self.index is None else self.index.size

    def _make_index(self, dim: int) -> ReferenceIndex:
        return ReferenceIndex(
            dim=dim,
            capacity=self.capacity,
            metric=self.metric,
            backend=self.backend,
            exact_max=self.exact_max,
            ef_search=self.ef_search,
            seed=self.seed,
        )

    def query(self, X: np.ndarray) -> KNNResult:
        """Scores and neighbours of each row; scores are 0 while the reference is empty."""
        n = len(X)
        if self.index is None or self.index.size == 0:
            return KNNResult(np.zeros(n, np.float64), np.zeros((n, 0), np.float32), [[] for _ in range(n)])
        dist, slots = self.index.query(X, self.k)
        if self.aggregate == "mean":
            # np.mean's arithmetic without its Python wrapper
            scores = np.add.reduce(dist, axis=1, dtype=np.float64) / dist.shape[1]
        else:
            scores = dist[:, -1].astype(np.float64)
        return KNNResult(scores, dist, self.index.ids_of(slots))

    def score(self, X: np.ndarray) -> np.ndarray:
        """``(n,)`` float64, higher = farther from the reference."""
        return self.query(X).scores

    def learn(self, X: np.ndarray, ids: list[str] | None = None) -> None:
        X = np.asarray(X, dtype=np.float32)
        if len(X) == 0:
            return
        if self.index is None:
            self.index = self._make_index(X.shape[1])
        if ids is None:
            ids = [str(self.index.n_added + i) for i in range(len(X))]
        self.index.add(X, list(ids))

    def get_state(self) -> State:
        return {"k": self.k, "index": None if self.index is None else self.index.get_state()}

    def set_state(self, state: State) -> None:
        if int(state["k"]) != self.k:
            raise StateMismatch(f"saved detector has k={state['k']}, this one k={self.k}")
        if state["index"] is None:
            self.index = None
            return
        index = self._make_index(int(state["index"]["dim"]))
        index.set_state(state["index"])
        self.index = index

"""Precomputed embeddings, passed through with their dimension checked per source."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.base import State
from models.errors import StateMismatch, WrongDimension, ZeroVector
from models.events import Event


class VectorEncoder:
    """``vector`` events as they are. The first accepted event fixes the source's dimension.

    >>> from models.events import decode_event
    >>> enc = VectorEncoder(dim=2)
    >>> enc.encode([decode_event('{"id": "a", "kind": "vector", "vector": [3, 4]}', arrival_ts=0)]).tolist()
    [[3.0, 4.0]]
    """

    name = "vector"
    version = "1"

    def __init__(self, *, dim: int | None = None, metric: str = "cosine") -> None:
        self.metric = metric
        self._dim = dim

    @property
    def dim(self) -> int | None:
        return self._dim

    def encode(self, events: Sequence[Event]) -> np.ndarray:
        if not events:
            return np.zeros((0, self._dim or 0), np.float32)
        dim = self._dim if self._dim is not None else len(events[0].payload)
        for e in events:
            if len(e.payload) != dim:
                raise WrongDimension(
                    f"vector of dimension {len(e.payload)} for source {e.source!r} of dimension {dim}",
                    field="vector",
                )
        X = np.stack([e.payload for e in events]).astype(np.float32, copy=False)
        if self.metric == "cosine" and (np.abs(X).max(axis=1) == 0).any():
            raise ZeroVector("a zero vector has no direction for the cosine metric", field="vector")
        return X

    def learn(self, events: Sequence[Event]) -> None:
        if self._dim is None and events:
            self._dim = len(events[0].payload)

    def get_state(self) -> State:
        return {"dim": self._dim}

    def set_state(self, state: State) -> None:
        dim = state["dim"]
        if self._dim is not None and dim is not None and int(dim) != self._dim:
            raise StateMismatch(f"saved vector dimension {dim} differs from {self._dim}")
        self._dim = None if dim is None else int(dim)

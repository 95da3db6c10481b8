"""Mahalanobis distance to the reference under a Ledoit-Wolf shrunk covariance.

Embeddings from language models are anisotropic: a few directions carry most
of the spread, shared by every text, while what sets a text apart lies in
directions of little spread. A Euclidean or cosine kNN is dominated by the
former; the Mahalanobis distance weighs each direction by the reference's own
spread along it. With fewer reference rows than dimensions (20news: 768-d,
200-600 rows) the sample covariance is singular; Ledoit and Wolf's shrinkage
towards a multiple of the identity (J. Multivariate Anal. 88, 2004, the
intensity estimated from the rows themselves) makes it invertible, and the
distance then mostly measures how far an event lies outside the span of the
reference's rows.
"""

from __future__ import annotations

import numpy as np

from models.base import State
from models.errors import StateMismatch


def ledoit_wolf(Z: np.ndarray) -> tuple[np.ndarray, float]:
    """``(S, s)``: the covariance of the centred rows ``Z`` (n, p) and the shrinkage intensity
    in [0, 1] of the Ledoit-Wolf estimator ``s mu I + (1 - s) S`` (``mu = trace(S) / p``)."""
    n, p = Z.shape
    S = (Z.T @ Z) / n
    mu = float(np.trace(S)) / p
    # squared Frobenius distance of S to mu I, and the estimated error of S:
    # (1 / n^2) sum_i ||z_i z_i' - S||^2 = (sum_i |z_i|^4 / n - ||S||^2) / n
    S2 = float(np.einsum("ij,ij->", S, S))
    d2 = S2 - 2.0 * mu * float(np.trace(S)) + mu * mu * p
    b2 = (float(np.sum(np.einsum("ij,ij->i", Z, Z) ** 2)) / n - S2) / n
    if d2 <= 0.0:
        return S, 1.0
    return S, min(max(b2, 0.0), d2) / d2


class ShrunkMahalanobis:
    """Distance of each row to the reference's mean in the metric of its shrunk covariance.

    ``fit(R)`` estimates mean and covariance from the reference rows; ``score(X)``
    is higher for rows farther out (0 before the first fit). Same interface as
    :class:`detectors.forest.IsolationForest` as far as the monitor uses it.

    >>> rng = np.random.default_rng(0)
    >>> m = ShrunkMahalanobis()
    >>> m.fit(rng.normal(size=(200, 4)) * [10, 1, 1, 1])
    >>> a, b = m.score(np.array([[10.0, 0, 0, 0], [0, 10.0, 0, 0]]))
    >>> bool(b > 5 * a)
    True
    """

    def __init__(self) -> None:
        self._mean: np.ndarray | None = None
        self._whiten: np.ndarray | None = None  # (p, p): |(x - mean) @ W| is the distance
        self.shrinkage = float("nan")

    @property
    def is_ready(self) -> bool:
        return self._whiten is not None

    def fit(self, R: np.ndarray) -> None:
        R = np.asarray(R, dtype=np.float64)
        if len(R) < 2:
            raise ValueError("a covariance needs at least two rows")
        mean = R.mean(axis=0)
        S, s = ledoit_wolf(R - mean)
        p = S.shape[0]
        mu = float(np.trace(S)) / p
        if mu <= 0.0:  # every row the same: any direction is as unexpected as any other
            mu = 1.0
        w, V = np.linalg.eigh((1.0 - s) * S + s * mu * np.eye(p))
        w = np.maximum(w, 1e-12 * max(float(w.max()), 1e-300))
        self._mean = mean.astype(np.float32)
        self._whiten = (V / np.sqrt(w)).astype(np.float32)
        self.shrinkage = s

    def regrow(self, R: np.ndarray, count: int = 1) -> None:
        """Fit again on the reference as it stands (``count`` is the forest's, unused)."""
        self.fit(R)

    def score(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if self._whiten is None:
            return np.zeros(len(X))
        Y = (X - self._mean) @ self._whiten
        return np.sqrt(np.einsum("ij,ij->i", Y, Y, dtype=np.float64))

    def get_state(self) -> State:
        if self._whiten is None:
            return {"mean": None, "whiten": None, "shrinkage": self.shrinkage}
        return {"mean": self._mean.copy(), "whiten": self._whiten.copy(), "shrinkage": self.shrinkage}

    def set_state(self, state: State) -> None:
        if state.get("whiten") is None:
            self._mean = self._whiten = None
        else:
            W = np.asarray(state["whiten"], dtype=np.float32)
            mean = np.asarray(state["mean"], dtype=np.float32)
            if W.ndim != 2 or W.shape[0] != W.shape[1] or mean.shape != (W.shape[0],):
                raise StateMismatch(f"saved covariance of shape {W.shape} with a mean of shape {mean.shape}")
            self._mean, self._whiten = mean, W
        self.shrinkage = float(state.get("shrinkage", float("nan")))

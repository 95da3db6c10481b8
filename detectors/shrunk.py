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


def ledoit_wolf(Z: np.ndarray) -> tuple[float, float]:
    """``(s, mu)`` of the Ledoit-Wolf estimator ``s mu I + (1 - s) S`` of the centred rows ``Z``
    (n, p): ``S = Z'Z / n``, ``mu = trace(S) / p``, the intensity ``s`` in [0, 1].

    Computed from the smaller of ``Z'Z`` and ``ZZ'`` (same trace and Frobenius norm).
    """
    n, p = Z.shape
    G = (Z @ Z.T if n < p else Z.T @ Z) / n
    trace = float(np.trace(G))
    mu = trace / p
    # squared Frobenius distance of S to mu I, and the estimated error of S:
    # (1 / n^2) sum_i ||z_i z_i' - S||^2 = (sum_i |z_i|^4 / n - ||S||^2) / n
    S2 = float(np.einsum("ij,ij->", G, G))
    d2 = S2 - 2.0 * mu * trace + mu * mu * p
    b2 = (float(np.sum(np.einsum("ij,ij->i", Z, Z) ** 2)) / n - S2) / n
    if d2 <= 0.0:
        return 1.0, mu
    return min(max(b2, 0.0), d2) / d2, mu


def principal_axes(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sigma, U)``: the non-zero eigenvalues (r,) of ``S = Z'Z / n`` and their unit
    eigenvectors as columns of ``U`` (p, r), through the ``n x n`` Gram matrix when ``n < p``."""
    n, p = Z.shape
    if n < p:
        sigma, A = np.linalg.eigh(Z @ Z.T / n)
    else:
        sigma, A = np.linalg.eigh(Z.T @ Z / n)
    keep = sigma > 1e-10 * max(float(sigma[-1]), 1e-300)
    sigma, A = sigma[keep], A[:, keep]
    if n < p:
        return sigma, (Z.T @ A) / np.sqrt(n * sigma)
    return sigma, A


class ShrunkMahalanobis:
    """Distance of each row to the reference's mean in the metric of its shrunk covariance.

    ``fit(R)`` estimates mean and covariance from the reference rows; ``score(X)``
    is higher for rows farther out (0 before the first fit). With the covariance
    ``C = (1 - s) S + c I`` (``c = s mu``) and ``S``'s eigenpairs ``(sigma_j, u_j)``,
    the Mahalanobis distance is
    ``d(x)^2 = |x - m|^2 / c + sum_j (u_j . (x - m))^2 (1 / ((1 - s) sigma_j + c) - 1 / c)``,
    and the score ``sqrt(c) d(x)``: the same ranking for one fit, in the data's units.
    While the reference grows, the scaled score of a typical event falls from fit
    to fit (20news normals, 150 held out: median 1.23, 0.96, 0.76, 0.63 for fits on
    50, 100, 200, 400 rows; unscaled 21.5, 21.8, 21.9, 18.3), so a calibration set
    holding earlier fits' scores errs on the safe side: on 20news (stream seeds
    0-2) the false-alarm rate was 0.0208 with ``d`` and 0.0083 with ``sqrt(c) d``
    (20 seeds: 0.0069 and 0.0038), judged ROC-AUC 0.745 both.
    One product with the ``r <= min(n, p)`` axes of ``S`` per row, and an
    eigendecomposition of the smaller of ``n x n`` and ``p x p`` per fit (20news,
    600 rows of 768-d: 0.13 against 0.29 s on a loaded 2-core machine).

    >>> rng = np.random.default_rng(0)
    >>> m = ShrunkMahalanobis()
    >>> m.fit(rng.normal(size=(200, 4)) * [10, 1, 1, 1])
    >>> a, b = m.score(np.array([[10.0, 0, 0, 0], [0, 10.0, 0, 0]]))
    >>> bool(b > 5 * a)
    True
    """

    def __init__(self) -> None:
        self._mean: np.ndarray | None = None
        self._axes: np.ndarray | None = None  # (p, r) eigenvectors of S
        self._weights: np.ndarray | None = None  # (r,) 1 / ((1 - s) sigma_j + c) - 1 / c
        self._isotropic = 1.0  # 1 / c
        self.shrinkage = float("nan")

    @property
    def is_ready(self) -> bool:
        return self._axes is not None

    def fit(self, R: np.ndarray) -> None:
        R = np.asarray(R, dtype=np.float64)
        if len(R) < 2:
            raise ValueError("a covariance needs at least two rows")
        mean = R.mean(axis=0)
        Z = R - mean
        s, mu = ledoit_wolf(Z)
        sigma, U = principal_axes(Z)
        # every row the same, or no shrinkage: a floor keeps the silent directions finite
        c = max(s * mu, 1e-6 * max(mu, 1e-300), 1e-30)
        self._mean = mean.astype(np.float32)
        self._axes = U.astype(np.float32)
        self._weights = 1.0 / ((1.0 - s) * sigma + c) - 1.0 / c
        self._isotropic = 1.0 / c
        self.shrinkage = s

    def score(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if self._axes is None:
            return np.zeros(len(X))
        Y = X - self._mean
        P = (Y @ self._axes).astype(np.float64)
        d2 = np.einsum("ij,ij->i", Y, Y, dtype=np.float64) * self._isotropic + (P * P) @ self._weights
        return np.sqrt(np.maximum(d2, 0.0) / self._isotropic)

    def get_state(self) -> State:
        if self._axes is None:
            return {"mean": None, "shrinkage": self.shrinkage}
        return {"mean": self._mean.copy(), "axes": self._axes.copy(), "weights": self._weights.copy(),
                "isotropic": self._isotropic, "shrinkage": self.shrinkage}

    def set_state(self, state: State) -> None:
        if state.get("mean") is None:
            self._mean = self._axes = self._weights = None
        else:
            mean = np.asarray(state["mean"], dtype=np.float32)
            axes = np.asarray(state["axes"], dtype=np.float32)
            weights = np.asarray(state["weights"], dtype=np.float64)
            if axes.ndim != 2 or mean.shape != (axes.shape[0],) or weights.shape != (axes.shape[1],):
                raise StateMismatch(f"saved axes of shape {axes.shape} with a mean of shape {mean.shape}")
            self._mean, self._axes, self._weights = mean, axes, weights
            self._isotropic = float(state["isotropic"])
        self.shrinkage = float(state.get("shrinkage", float("nan")))

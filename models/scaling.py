"""Online robust standardisation for heavy-tailed numeric features."""

from __future__ import annotations

import numpy as np

from models.base import State
from models.errors import StateMismatch

# A normal distribution's interquartile range is 1.349 standard deviations;
# dividing by it puts robust z-scores on the usual scale.
_IQR_TO_SIGMA = 1.349


class RobustScaler:
    """Median/IQR standardisation learnt from a reservoir sample of rows.

    The reservoir (Vitter's algorithm R) keeps a uniform sample of everything
    learnt, so after warm-up the statistics change ever more slowly and vectors
    already in a reference index stay comparable with new ones. Missing values
    are NaN in input and 0 (the median) in output. With ``squash`` the z-score
    goes through ``arcsinh``: linear near the centre, logarithmic in the tails,
    so one amount of 10^7 does not flatten every other dimension in a distance.

    >>> s = RobustScaler(dim=1)
    >>> s.learn(np.array([[1.0], [2.0], [3.0], [4.0], [5.0]]))
    >>> float(s.transform(np.array([[3.0]]))[0, 0])
    0.0
    """

    def __init__(
        self,
        *,
        dim: int,
        reservoir: int = 2048,
        refresh: int = 128,
        squash: bool = True,
        seed: int = 0,
    ) -> None:
        self.dim = dim
        self.reservoir = reservoir
        self.refresh = refresh
        self.squash = squash
        self.seed = seed
        self._rows = np.full((reservoir, dim), np.nan, dtype=np.float64)
        self._seen = 0
        self._since_refresh = 0
        self._rng = np.random.default_rng(seed)
        self._center = np.zeros(dim)
        self._scale = np.ones(dim)

    @property
    def n_seen(self) -> int:
        return self._seen

    def learn(self, X: np.ndarray) -> None:
        X = np.asarray(X, dtype=np.float64)
        for row in X:
            if self._seen < self.reservoir:
                self._rows[self._seen] = row
            else:
                j = int(self._rng.integers(0, self._seen + 1))
                if j < self.reservoir:
                    self._rows[j] = row
            self._seen += 1
        self._since_refresh += len(X)
        # Refresh often while the sample is small, then rarely: once the
        # reservoir is full each new row replaces one with probability R/n.
        if self._since_refresh >= min(self.refresh, max(1, self._seen // 8)):
            self._refresh()

    def _refresh(self) -> None:
        self._since_refresh = 0
        rows = self._rows[: min(self._seen, self.reservoir)]
        if len(rows) == 0:
            return
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                q25, med, q75 = np.nanpercentile(rows, [25, 50, 75], axis=0)
                std = np.nanstd(rows, axis=0)
        scale = (q75 - q25) / _IQR_TO_SIGMA
        # Binary or mostly-constant columns have IQR 0: fall back to the std.
        scale = np.where(scale > 1e-12, scale, std)
        scale = np.where(np.isfinite(scale) & (scale > 1e-12), scale, 1.0)
        self._center = np.where(np.isfinite(med), med, 0.0)
        self._scale = scale

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        Z = (X - self._center) / self._scale
        Z = np.where(np.isnan(Z), 0.0, Z)
        if self.squash:
            Z = np.arcsinh(Z)
        return Z.astype(np.float32)

    def get_state(self) -> State:
        return {
            "dim": self.dim,
            "rows": self._rows.copy(),
            "seen": self._seen,
            "since_refresh": self._since_refresh,
            "center": self._center.copy(),
            "scale": self._scale.copy(),
            "rng": self._rng.bit_generator.state,
        }

    def set_state(self, state: State) -> None:
        if int(state["dim"]) != self.dim or state["rows"].shape != self._rows.shape:
            raise StateMismatch(
                f"scaler state for dim {state['dim']} does not fit dim {self.dim}"
            )
        self._rows = np.array(state["rows"], dtype=np.float64)
        self._seen = int(state["seen"])
        self._since_refresh = int(state["since_refresh"])
        self._center = np.array(state["center"], dtype=np.float64)
        self._scale = np.array(state["scale"], dtype=np.float64)
        self._rng = np.random.default_rng(self.seed)
        self._rng.bit_generator.state = state["rng"]

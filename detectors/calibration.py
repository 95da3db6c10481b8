"""Calibrated alarms: kNN scores -> conformal p-values -> decisions at a false-alarm budget."""

from __future__ import annotations

import math

import numpy as np

from detectors import kernels
from models.base import State


# mid_rank_p_values: the tail past the largest calibration score stops falling this many
# fitted scales out (exp(-600) ~ 1e-261: -log p stays finite and far from overflow).
_TAIL_SCALES = 600.0


class ConformalThresholder:
    """Turns scores into p-values against a rolling calibration set of recent scores.

    ``p = (1 + #{calibration scores >= s}) / (n + 1)``: the conformal p-value,
    valid when the scores of normal events are exchangeable. Each calibration
    score was computed before its event joined the reference, so no point is
    scored with itself among its neighbours. An event is an anomaly when
    ``p < alpha``: on normal data about ``alpha`` of events are flagged.

    Every scored event enters the calibration set, flagged ones included. Keeping
    only accepted events would truncate the set at the threshold, and the
    threshold taken from a truncated set drops each round until everything is
    flagged. The price is conservatism under contamination: a burst of
    anomalies raises the threshold while it lasts.

    >>> t = ConformalThresholder(alpha=0.1, window=100, min_calibration=10)
    >>> t.learn(np.arange(10.0))
    >>> t.p_values(np.array([9.0, 100.0])).round(3).tolist()
    [0.182, 0.091]
    """

    def __init__(
        self, *, alpha: float = 0.01, window: int = 2000, min_calibration: int | None = None
    ) -> None:
        if not 0 < alpha < 1:
            raise ValueError("alpha must be in (0, 1)")
        self.alpha = alpha
        self.window = window
        # p cannot fall below 1/(n+1): with fewer than 1/alpha scores nothing could
        # ever be flagged, so wait for twice that before judging.
        self.min_calibration = (
            min_calibration if min_calibration is not None else math.ceil(2.0 / alpha)
        )
        if self.min_calibration > window:
            raise ValueError(
                f"the calibration window ({window}) must hold at least {self.min_calibration} scores"
            )
        self._ring = np.zeros(window, dtype=np.float64)
        self._n = 0
        self._sorted: np.ndarray | None = None
        # with the compiled kernels: the ring slot of each entry of _sorted
        # (rolled forward with it, so own_p_values needs no argsort); else None
        self._order: np.ndarray | None = None

    @property
    def size(self) -> int:
        return min(self._n, self.window)

    @property
    def n_learned(self) -> int:
        """Scores learnt since the last reset, those that left the window too."""
        return self._n

    @property
    def is_ready(self) -> bool:
        return self.size >= self.min_calibration

    @property
    def threshold(self) -> float:
        """The smallest score flagged right now (inf until ready)."""
        if not self.is_ready:
            return math.inf
        cal = self.sorted_scores()
        n = len(cal)
        # p < alpha  <=>  #{cal >= s} < alpha (n+1) - 1
        m = math.ceil(self.alpha * (n + 1) - 1)  # largest count allowed is m - 1
        if m <= 0:
            return math.inf
        return float(np.nextafter(cal[n - m], np.inf))

    def score_quantile(self, q: float) -> float:
        """The ``q`` quantile of the calibration scores (nan while the set is empty)."""
        if self.size == 0:
            return math.nan
        cal = self.sorted_scores()
        # The scores are sorted already: NumPy's linear interpolation between
        # the two around the position, written out (np.quantile's own
        # arithmetic, so the same value bit for bit), instead of np.quantile's
        # partition and ~50 us of set-up at every learning block.
        pos = (len(cal) - 1) * q
        lo = min(math.floor(pos), len(cal) - 1)
        if lo + 1 >= len(cal):
            return float(cal[lo])
        a, b = float(cal[lo]), float(cal[lo + 1])
        t = pos - lo
        return b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t

    def sorted_scores(self) -> np.ndarray:
        """The set's scores in ascending order (nan last), sorted once per change of the set."""
        if self._sorted is None:
            if kernels.already_loaded():
                self._order = self._ring[: self.size].argsort(kind="stable")
                self._sorted = self._ring[self._order]
            else:
                self._sorted = np.sort(self._ring[: self.size])
        return self._sorted

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """``(n,)`` p-values in (0, 1]; all 1.0 while the calibration set is empty."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.size == 0:
            return np.ones(len(scores))
        cal = self.sorted_scores()
        n = len(cal)
        n_ge = n - cal.searchsorted(scores, side="left")  # the method: no wrapper
        return (1.0 + n_ge) / (n + 1.0)

    def mid_rank_p_values(self, scores: np.ndarray) -> np.ndarray:
        """``(n,)`` mid-rank p-values, :meth:`p_values` less ``0.5 / (n + 1)``, continued past the
        largest calibration score.

        Every score past the largest one used to get the same floor ``0.5 / (n + 1)``:
        where these p-values are combined (``SourceMonitor._combined``), events far
        out on either component tied at the top of the ranking with normal events
        just past the other component's set. Past the largest score ``s_max`` the
        p-value goes on falling as an exponential tail fitted to the top of the set:
        ``floor * exp(-(s - s_max) / b)``, ``b`` the mean excess of the top
        ``max(5, n // 100)`` scores over the next one (the exponential's maximum
        likelihood scale), at most ``_TAIL_SCALES`` scales out (``-log p`` stays finite where
        the top of the set is nearly flat: the HDFS sessions as vectors gave inf without it).
        Continuous at ``s_max`` and monotone; every p-value at or below ``s_max`` is
        unchanged, and one past it stays below every other, so decisions taken against
        the set do not move. All 0.5 while the set is empty.

        >>> t = ConformalThresholder(alpha=0.1, window=100, min_calibration=10)
        >>> t.learn(np.arange(10.0))
        >>> t.mid_rank_p_values(np.array([9.0, 10.0, 12.0])).round(4).tolist()
        [0.1364, 0.0326, 0.0167]
        """
        n = self.size
        floor = 0.5 / (n + 1.0)  # the p-value of a score past every calibration score
        p = self.p_values(scores) - floor
        if n > 5 and len(p) and np.minimum.reduce(p) <= floor:  # most blocks have none: ~1 us, not ~20
            cal = self.sorted_scores()  # p_values sorted it: no work
            m = max(5, n // 100)
            top = float(cal[-1])
            b = (math.fsum(cal[n - m:]) - m * float(cal[n - m - 1])) / m
            if b > 0:
                beyond = p <= floor
                s = np.asarray(scores, dtype=np.float64)[beyond]
                p[beyond] = floor * np.exp(-np.minimum((s - top) / b, _TAIL_SCALES))
        return p

    def calibration_scores(self) -> np.ndarray:
        """The scores of the set in slot order (see :meth:`own_p_values`), a copy."""
        return self._ring[: self.size].copy()

    def own_p_values(self) -> np.ndarray:
        """The calibration scores' own p-values, ``#{calibration scores >= s} / n`` (each counted
        among the others and itself, as :meth:`p_values` counts a new score), in slot order: two
        sets of the same window that learnt the same sequence give theirs pair by pair.

        >>> t = ConformalThresholder(alpha=0.1, window=4, min_calibration=1)
        >>> t.learn(np.array([3.0, 1.0, 2.0, 5.0]))
        >>> t.learn(np.array([4.0]))  # 3.0 leaves, 4.0 takes its slot
        >>> t.own_p_values().tolist()
        [0.5, 1.0, 0.75, 0.25]
        """
        n = self.size
        if n == 0:
            return np.ones(0)
        # counted in sorted order (a binary search per unsorted score is ten times slower);
        # the order is the one kept with the sorted copy where there is one (any order of
        # equal scores counts the same)
        if self._sorted is None and kernels.already_loaded():
            self.sorted_scores()
        ascending, order = self._sorted, self._order
        if ascending is None or order is None:
            order = np.argsort(self._ring[:n], kind="stable")
            ascending = self._ring[:n][order]
        if kernels.already_loaded():
            return kernels.own_p_values(ascending, order)
        out = np.empty(n)
        out[order] = (n - ascending.searchsorted(ascending, side="left")) / n
        return out

    def learn(self, scores: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        if len(scores) > self.window:
            scores = scores[-self.window :]
        slots = np.arange(self._n, self._n + len(scores)) % self.window
        sorted_, order = self._sorted, self._order
        if sorted_ is not None and self._n >= self.window and 4 * len(scores) <= self.window:
            # A full set trades a few scores: the sorted copy drops the ones
            # leaving and takes the new ones in place (the same array as a
            # sort of the ring), instead of sorting 2,000 scores every block;
            # with the kernels, one compiled merge that carries the slots along
            # (~6 against ~22 us).
            if not kernels.already_loaded():
                sorted_, order = _replaced(sorted_, self._ring[slots], scores), None
            elif order is not None:
                sorted_, order = kernels.replaced(sorted_, order, slots, scores, self.window)
            else:  # sorted before the kernels were loaded: sorted again, with its order, when read
                sorted_ = None
        else:
            sorted_ = order = None
        self._ring[slots] = scores
        self._n += len(scores)
        self._sorted, self._order = sorted_, order

    def reset(self) -> None:
        """Forget the calibration set (after the reference adopted a new normal)."""
        self._n = 0
        self._sorted = self._order = None

    def get_state(self) -> State:
        return {"alpha": self.alpha, "window": self.window, "ring": self._ring.copy(), "n": self._n}

    def set_state(self, state: State) -> None:
        self._ring = np.array(state["ring"], dtype=np.float64)
        self._n = int(state["n"])
        self._sorted = self._order = None


def _replaced(sorted_: np.ndarray, leaving: np.ndarray, coming: np.ndarray) -> np.ndarray:
    """``sorted_`` (ascending) without the values ``leaving`` (each present) and with ``coming``, sorted."""
    leaving = np.sort(leaving)
    # equal values leaving take consecutive positions of their run
    pos = np.searchsorted(sorted_, leaving, side="left") + (
        np.arange(len(leaving)) - np.searchsorted(leaving, leaving, side="left")
    )
    keep = np.ones(len(sorted_), dtype=bool)
    keep[pos] = False
    kept = sorted_[keep]
    # merged: the new values at their places among the kept (np.insert's
    # order for equal values), the kept ones around them
    coming = np.sort(coming)
    at = np.searchsorted(kept, coming, side="left") + np.arange(len(coming))
    out = np.empty(len(kept) + len(coming))
    out[at] = coming
    rest = np.ones(len(out), dtype=bool)
    rest[at] = False
    out[rest] = kept
    return out

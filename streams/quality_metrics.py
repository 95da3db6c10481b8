"""The figures of ``nwatch bench quality``: ranking, alarm and drift-timing metrics.

Plain NumPy, so the bench needs no scikit-learn at run time; the tests check
each function against scikit-learn on small made-up data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) identity, ties averaged."""
    y = np.asarray(y, dtype=bool)
    s = np.asarray(s, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    _, start, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(start + (counts + 1) / 2.0, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pr_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision: sum over thresholds of (recall step) x precision, ties as one step.

    The same definition as scikit-learn's ``average_precision_score`` (no
    interpolation), so tied scores are one threshold, not an arbitrary order.
    """
    y = np.asarray(y, dtype=bool)
    s = np.asarray(s, dtype=np.float64)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, hits = s[order], y[order]
    # the last index of each run of equal scores is a threshold
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tp = np.cumsum(hits)[last]
    precision = tp / (last + 1)
    recall = tp / hits.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y, dtype=bool)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, hits = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tp = np.cumsum(hits)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / max(1, (~y).sum())], np.r_[0.0, tp / max(1, y.sum())]


@dataclass(frozen=True, slots=True)
class AlarmFigures:
    """Decisions at the alarm threshold against the labels."""

    false_alarm_rate: float  # flagged normals / normals
    recall: float  # flagged anomalies / anomalies
    precision: float
    f1: float


def alarm_figures(y: np.ndarray, flagged: np.ndarray) -> AlarmFigures:
    """FAR on normals, recall, precision and F1 of boolean decisions (nan where undefined)."""
    y = np.asarray(y, dtype=bool)
    flagged = np.asarray(flagged, dtype=bool)
    tp = int((y & flagged).sum())
    fp = int((~y & flagged).sum())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    far = fp / n_neg if n_neg else float("nan")
    recall = tp / n_pos if n_pos else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + (n_pos - tp)) if n_pos or fp else float("nan")
    return AlarmFigures(far, recall, precision, f1)


@dataclass(frozen=True, slots=True)
class DriftTiming:
    """How one stream's drift alarms line up with its true change point (None: no change)."""

    change_at: int | None
    alarms: tuple[int, ...]  # events seen when each alarm was raised
    detected: bool  # an alarm in (change_at, change_at + max_delay]
    delay: int | None  # events from the change to the first alarm after it
    false_alarms: int  # alarms before the change, or any alarm on a no-change stream


def drift_timing(change_at: int | None, alarms: list[int], *, max_delay: int = 300) -> DriftTiming:
    """Score a stream's alarm positions against its change point.

    An alarm at or before the change is false (it saw no changed event); the first
    alarm after it gives the delay, and counts as detection when within ``max_delay``
    events. Alarms after the first true one (the adopted new normal settling)
    are neither.
    """
    alarms = sorted(int(a) for a in alarms)
    if change_at is None:
        return DriftTiming(None, tuple(alarms), False, None, len(alarms))
    before = [a for a in alarms if a <= change_at]
    after = [a for a in alarms if a > change_at]
    delay = after[0] - change_at if after else None
    return DriftTiming(
        change_at, tuple(alarms), delay is not None and delay <= max_delay, delay, len(before)
    )

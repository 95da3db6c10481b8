"""One source's detection: kNN score -> conformal p-value -> decision, then learn; drift alongside.

The order inside :meth:`SourceMonitor.process` is the contract:

1. score the batch against the reference as it stands (no event sees itself);
2. turn scores into p-values against the calibration set; flag ``p < alpha``
   unless the source is still warming up;
3. add the batch's scores to the calibration set;
4. add to the reference only events whose p-value is at least ``learn_alpha``
   (>= ``alpha``): never learn from what you flagged, nor from near misses;
   with ``admit_repeats = m``, the one exception is a recurring pattern: a
   flagged event joins, with its look-alikes, once ``m`` of them were flagged
   (see :meth:`SourceMonitor._admit_recurring`);
5. feed every event to the drift monitor (a drift to a new region is flagged
   event by event, so it must not be hidden from the drift test); on a confirmed
   drift with the ``adopt`` policy, the reference learns the recent window, so
   the new normal stops being flagged. The calibration set keeps rolling: a
   restart from nothing would be a second warm-up, in which every event
   (anomalies too) joins the reference unjudged, and a fresh set judging as
   soon as it holds its minimum of scores takes them from the stretch that
   raised the alarm, anomalies included (see :meth:`SourceMonitor._adopt_recent`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from detectors import kernels
from detectors.calibration import ConformalThresholder
from detectors.drift import CentroidDriftMonitor, DriftAlarm
from detectors.forest import IsolationForest
from detectors.index import DEDUP_MAX_SHARE, DEDUP_MIN_ROWS, DEFAULT_EXACT_MAX, Metric
from detectors.knn import KNNDetector
from detectors.shrunk import ShrunkMahalanobis
from models.base import State
from models.errors import StateMismatch


# Flagged events kept for admit_repeats: enough for a few patterns' repeats
# at alpha 0.01 (about 25,000 events' worth), bounded per source.
_FLAGGED_KEPT = 256


def _distances(B: np.ndarray, x: np.ndarray, metric: Metric) -> np.ndarray:
    """Distances of the rows of ``B`` to ``x`` in the index's metric (cosine: ``1 - cos``)."""
    if metric == "cosine":
        nb = np.maximum(np.linalg.norm(B, axis=1), 1e-12)
        return 1.0 - (B @ x) / (nb * max(float(np.linalg.norm(x)), 1e-12))
    return np.linalg.norm(B - x, axis=1)


def _tippett(knn_scores: np.ndarray, p_knn: np.ndarray, p_forest: np.ndarray) -> np.ndarray:
    """The combined score of :meth:`SourceMonitor._combined` from the components' mid-rank
    p-values: ``-log`` of the smaller one, or of the kNN's alone for an event with k exact
    copies in the reference (kNN score 0). Positive, higher = more surprising on either scale."""
    return -np.log(np.where(knn_scores <= 0.0, p_knn, np.minimum(p_knn, p_forest)))


# With forest_trees, the combined score's calibration set is rebuilt from the
# component sets each time this many events joined them (SourceMonitor._recalibrate):
# a rebuild costs two sorts of the sets, too much for every block of 32 events,
# and learning the combined scores in between costs a third rolling set's upkeep.
_RECALIBRATE_EVERY = 256


# With forest_trees, the forest is renewed in this many rounds, a tenth of the
# trees at a time: trees grown together share one pass per level (NumPy, or the
# compiled kernel), about a third of the cost of growing them one by one (NumPy:
# 1.1 against 3.7 ms per tree of 256 rows, 30 features, on a loaded 2-core machine).
_REGROW_ROUNDS = 10
# ... once per this many turnovers of the reference as it stands (every 80
# learnt events while it holds 200, every 800 once it holds 2,000): growing was
# the forest's main cost, 15 % of the pipeline on shuttle with one turnover,
# 4 % with four (bench/pipeline_stages.py). A drift adoption regrows every tree.
_FOREST_TURNOVER = 4

# With scorer "mahalanobis", the covariance is estimated again from the reference
# each time this many events joined it (an eigendecomposition of dim x dim: about
# 0.1 s at 768-d), and at a drift adoption. 20news BERT, 20 stream seeds: judged
# ROC-AUC 0.743 / 0.747 / 0.747 refitting every 64 / 256 / 1,024 learnt events (l2).
_COVARIANCE_REFIT = 256


@dataclass(frozen=True, slots=True)
class Decisions:
    """Per-event results of one batch (arrays of length n) and the drift alarms it raised."""

    scores: np.ndarray
    p_values: np.ndarray
    is_anomaly: np.ndarray
    learned: np.ndarray  # joined the reference
    warming_up: np.ndarray
    distances: np.ndarray
    neighbour_ids: list[list[str]]
    drift_alarms: list[DriftAlarm]
    # with forest_trees: (n, 3) kNN score, forest score, stage (SourceMonitor._components),
    # what commit() needs to calibrate the combined score; None otherwise
    components: np.ndarray | None = None


class SourceMonitor:
    """Reference index, calibration and drift monitor of one source.

    Parameters map one-to-one onto the per-source settings (``streams.config.SourceSettings``).
    """

    def __init__(
        self,
        *,
        metric: Metric = "l2",
        k: int = 10,
        reference_size: int = 2000,
        aggregate: Literal["mean", "max"] = "mean",
        index_backend: Literal["auto", "exact", "hnsw"] = "auto",
        exact_max: int = DEFAULT_EXACT_MAX,
        alpha: float = 0.01,
        learn_alpha: float = 0.1,
        calibration_size: int = 2000,
        min_reference: int = 200,
        drift: bool = True,
        drift_reference_size: int = 1000,
        drift_block: int = 50,
        drift_alpha: float = 0.001,
        drift_policy: Literal["adopt", "keep"] = "adopt",
        drift_cooldown: int = 500,
        drift_components: int = 8,
        adopt_window: int = 200,
        admit_repeats: int = 0,
        forest_trees: int = 0,
        scorer: Literal["knn", "mahalanobis"] = "knn",
        seed: int = 0,
    ) -> None:
        if admit_repeats < 0:
            raise ValueError("admit_repeats must be 0 (off) or a count of repeats")
        if scorer not in ("knn", "mahalanobis"):
            raise ValueError(f"scorer must be 'knn' or 'mahalanobis', not {scorer!r}")
        if scorer == "mahalanobis" and (forest_trees or admit_repeats):
            # both read the calibration set as kNN distances
            raise ValueError("scorer 'mahalanobis' goes with neither forest_trees nor admit_repeats")
        self.metric = metric
        self.k = k
        self.reference_size = reference_size
        self.aggregate = aggregate
        self.index_backend = index_backend
        self.exact_max = exact_max
        self.alpha = alpha
        self.learn_alpha = learn_alpha
        self.calibration_size = calibration_size
        self.min_reference = min_reference
        self.drift = drift
        self.drift_reference_size = drift_reference_size
        self.drift_block = drift_block
        self.drift_alpha = drift_alpha
        self.drift_policy = drift_policy
        self.drift_cooldown = drift_cooldown
        self.drift_components = drift_components
        self.adopt_window = adopt_window
        self.admit_repeats = admit_repeats
        self.forest_trees = forest_trees
        self.scorer = scorer
        self.seed = seed
        self.detector = KNNDetector(
            k=k,
            capacity=reference_size,
            metric=metric,
            aggregate=aggregate,
            backend=index_backend,
            exact_max=exact_max,
            seed=seed,
        )
        self.thresholder = ConformalThresholder(alpha=alpha, window=calibration_size)
        # With forest_trees, the score is the combination of two calibrated
        # scores (see _combined); each component keeps its own calibration set.
        self.forest = IsolationForest(trees=forest_trees, seed=seed) if forest_trees else None
        self._component_cal = (
            [ConformalThresholder(alpha=alpha, window=calibration_size, min_calibration=1) for _ in range(2)]
            if forest_trees
            else []
        )
        self._learned_since_regrow = 0
        # With scorer "mahalanobis": the score is the distance under the reference's
        # shrunk covariance (detectors.shrunk); the kNN still names the neighbours.
        self.covariance = ShrunkMahalanobis() if scorer == "mahalanobis" else None
        self._learned_since_refit = 0
        self.drift_monitor = (
            CentroidDriftMonitor(
                reference_size=drift_reference_size,
                block_size=drift_block,
                alpha=drift_alpha,
                cooldown=drift_cooldown,
                policy=drift_policy,
                components=drift_components,
                seed=seed,
            )
            if drift
            else None
        )
        # the latest adopt_window vectors and ids, as the blocks committed (a block of
        # rows and its ids each; the oldest block may hold more): no row view per event
        self._recent: deque[tuple[np.ndarray, list[str]]] = deque()
        self._recent_rows = 0
        # flagged events not (yet) admitted, for admit_repeats
        self._flagged: deque[tuple[np.ndarray, str]] = deque(maxlen=_FLAGGED_KEPT)
        self.events_seen = 0
        self.anomalies = 0

    @property
    def is_warming_up(self) -> bool:
        return self.detector.size < self.min_reference or not self.thresholder.is_ready

    def process(self, X: np.ndarray, ids: list[str], *, drift_X: np.ndarray | None = None) -> Decisions:
        """Score, decide and learn one batch of this source's vectors, in order.

        ``drift_X`` is what the drift monitor sees instead of ``X`` (the same rows
        without seasonal dimensions, say). The same as :meth:`score` then
        :meth:`commit` on the whole batch.
        """
        X = np.asarray(X, dtype=np.float32)
        s = self.score(X)
        alarms = self.commit(X, ids, s.scores, s.is_anomaly, s.learned, drift_X=drift_X,
                             components=s.components)
        return Decisions(
            scores=s.scores,
            p_values=s.p_values,
            is_anomaly=s.is_anomaly,
            learned=s.learned,
            warming_up=s.warming_up,
            distances=s.distances,
            neighbour_ids=s.neighbour_ids,
            drift_alarms=alarms,
            components=s.components,
        )

    def score(self, X: np.ndarray) -> Decisions:
        """Steps 1 and 2 alone: score and decide without learning anything (reads only).

        ``learned`` says what :meth:`commit` should add to the reference; the
        returned ``drift_alarms`` is always empty.
        """
        X = np.asarray(X, dtype=np.float32)
        n = len(X)
        warming = self.is_warming_up
        fused = self._score_compiled(X) if self.forest is not None else None
        if fused is not None:
            distances, neighbour_ids, components, scores = fused
        else:
            result = self.detector.query(X)
            distances, neighbour_ids, scores = result.distances, result.neighbour_ids, result.scores
            if self.covariance is not None:
                # the rows as the reference holds them (unit rows for cosine); before the
                # first reference there is no covariance and every score is 0
                index = self.detector.index
                scores = self.covariance.score(X if index is None else index.as_stored(X))
            components = None
            if self.forest is not None:
                components = self._components(X, result.scores)
                scores = self._combined(components)
        if warming:
            p = np.ones(n)
            flagged = np.zeros(n, dtype=bool)
            keep = np.ones(n, dtype=bool)
        else:
            p = self.thresholder.p_values(scores)
            flagged = p < self.alpha
            # The reference is guarded more strictly than the alarm: unflagged
            # anomalies would otherwise become neighbours of the next ones.
            keep = p >= max(self.alpha, self.learn_alpha)
        return Decisions(
            scores=scores,
            p_values=p,
            is_anomaly=flagged,
            learned=keep,
            warming_up=np.full(n, warming),
            distances=distances,
            neighbour_ids=neighbour_ids,
            drift_alarms=[],
            components=components,
        )

    def _score_compiled(self, X: np.ndarray) -> tuple[np.ndarray, list[list[str]], np.ndarray, np.ndarray] | None:
        """:meth:`score`'s distances, neighbour ids, components and combined scores with a forest,
        in one compiled pass (:func:`detectors.kernels.knn_forest_step`) instead of ~40 NumPy
        and Python calls per block: the same values, bit for bit. None where that pass does not
        apply (no kernels, not l2, an HNSW index, a wide row, the forest or a component
        calibration set not there yet): the caller takes the NumPy path."""
        index, forest = self.detector.index, self.forest
        assert forest is not None
        if (
            not len(X) or index is None or index.size == 0 or not forest.is_ready or self.metric != "l2"
            or not index.is_exact or not kernels.loaded() or max(self.k, self.forest_trees) > kernels.MAX_WIDTH
            or not all(c.size for c in self._component_cal)
        ):
            return None
        rows = index.as_stored(X)
        inverse = None
        if len(rows) >= DEDUP_MIN_ROWS:  # each distinct row once, as ReferenceIndex.query does
            found = kernels.distinct_rows(rows, DEDUP_MAX_SHARE)
            if found is not None:
                rows, inverse = found
        k = min(self.k, index.size)
        D, sqnorm, V, Xa, rest, c = index.products(rows, k)
        if Xa.shape[1] > kernels.MAX_WIDTH or sqnorm is None:
            return None
        knn_cal, forest_cal = self._component_cal
        dist, slots, components, least, tail = kernels.knn_forest_step(
            D, sqnorm, V, Xa, rest, c, k, mean=self.aggregate == "mean", X=rows, packed=forest.packed(),
            depth=forest.depth, knn_cal=knn_cal.sorted_scores(), forest_cal=forest_cal.sorted_scores(),
        )
        if inverse is not None:
            dist, slots, components, least = dist[inverse], slots[inverse], components[inverse], least[inverse]
        # past a calibration set's top the mid-rank p-values fit their tail: NumPy's path
        scores = self._combined(components) if tail else -np.log(least)
        return dist, index.ids_of(slots), components, scores

    def commit(
        self,
        X: np.ndarray,
        ids: list[str],
        scores: np.ndarray,
        is_anomaly: np.ndarray,
        keep: np.ndarray,
        *,
        drift_X: np.ndarray | None = None,
        components: np.ndarray | None = None,
    ) -> list[DriftAlarm]:
        """Steps 3 to 5 for events scored by :meth:`score` since the last commit: learn, watch for drift.

        ``components`` are those of the :class:`Decisions` (with ``forest_trees``); without
        them they are computed again, which the unchanged reference and forest make the same.
        """
        X = np.asarray(X, dtype=np.float32)
        keep = np.asarray(keep, dtype=bool)
        n = len(X)
        # Scores against a reference smaller than min_reference are inflated
        # and would make the calibration too lenient for long after.
        if self.forest is not None:
            self._learn_components(X, components)
        elif self.detector.size >= self.min_reference:
            self.thresholder.learn(np.asarray(scores))
        if keep.any():
            self.detector.learn(X[keep], [i for i, k in zip(ids, keep) if k])
        if self.forest is not None:
            self._grow_forest(int(np.count_nonzero(keep)))
        if self.covariance is not None:
            self._refit_covariance(int(np.count_nonzero(keep)))
        if self.admit_repeats and self.thresholder.is_ready:
            self._admit_recurring(X, ids, np.asarray(is_anomaly, dtype=bool))
        alarms: list[DriftAlarm] = []
        if self.drift_monitor is not None:
            alarms = self.drift_monitor.update(X if drift_X is None else drift_X, list(ids))
            self._remember(X, ids)
            if alarms and self.drift_policy == "adopt":
                self._adopt_recent()
        self.events_seen += n
        self.anomalies += int(np.count_nonzero(is_anomaly))
        return alarms

    def _components(self, X: np.ndarray, knn_scores: np.ndarray) -> np.ndarray:
        """``(n, 3)``: kNN score, forest score, and what they are good for: 0 nothing (no
        forest yet), 1 the components' calibration (whose sets are still empty), 2 everything."""
        assert self.forest is not None
        stage = 0.0
        if self.forest.is_ready:
            stage = 2.0 if all(c.size > 0 for c in self._component_cal) else 1.0
        out = np.empty((len(X), 3))  # column_stack's float64 columns, without its wrappers
        out[:, 0] = knn_scores
        out[:, 1] = self.forest.score(X)
        out[:, 2] = stage
        return out

    def _combined(self, components: np.ndarray) -> np.ndarray:
        """The smaller of the two components' p-values, each against its own calibration set, as ``-log p``.

        Each score becomes a mid-rank p-value among the recent scores of its
        kind; ``-log`` of the smaller one is the combined score (Tippett's
        combination; an earlier version reported the normal score ``-ndtri(p)``,
        which ranks the same but is negative for most events): an
        event far out on either scale stands out, so one detector's blind spot
        is covered by the other. The mean of the two (Stouffer's) was measured
        too and ranks worse where one component is blind (docs/quality-notes.md).
        The result is a score like any other: the source's own calibration set
        turns it into the p-value that decides, so the false-alarm budget holds
        for the combination, not for each part. That set holds the combined
        scores of the component sets' own events, as they stand now
        (:meth:`_recalibrate`). 0 for events scored before both calibration
        sets held a score.

        An event whose k nearest reference events are exact copies of it (kNN
        score 0) is judged by the kNN alone: it occurred k times among accepted
        events. Isolation trees cannot see repeats: a pattern held by 10 of 2,000
        reference rows is alone in most 256-row samples and isolated in a few
        splits (HDFS sessions, repeated template counts: false-alarm rate 0.0108
        and F1 0.20 without this rule, 0.0004 and 0.55 with it).
        """
        u = np.zeros(len(components))
        if not len(components) or components[0, 2] < 2:
            return u
        knn_cal, forest_cal = self._component_cal
        return _tippett(components[:, 0], knn_cal.mid_rank_p_values(components[:, 0]),
                        forest_cal.mid_rank_p_values(components[:, 1]))

    def _learn_components(self, X: np.ndarray, pending: np.ndarray | None) -> None:
        """Calibration of the components from the committed events, and of the combined score.

        The combined set is rebuilt from the component sets (:meth:`_recalibrate`)
        each ``_RECALIBRATE_EVERY`` events they learn, and at every commit until
        it holds enough scores to judge.
        """
        if pending is None or len(pending) != len(X):
            pending = self._components(X, self.detector.score(X))
        if self.detector.size < self.min_reference:
            return
        some = pending[:, 2] >= 1
        knn_cal = self._component_cal[0]
        before = knn_cal.n_learned
        for j, cal in enumerate(self._component_cal):
            cal.learn(pending[some, j])
        if knn_cal.size and (before // _RECALIBRATE_EVERY < knn_cal.n_learned // _RECALIBRATE_EVERY
                             or not self.thresholder.is_ready):
            self._recalibrate()

    def _recalibrate(self) -> None:
        """The combined score's calibration set, rebuilt from the component sets as they stand.

        Both component sets learn the same events in the same order, so slot
        ``i`` of each holds one event's kNN and forest scores; each becomes a
        p-value against its own set now, as :meth:`_combined` scores a new
        event, and their combination joins the rebuilt set. Combined scores kept
        from when they were scored would not be comparable: a p-value
        depends on the component set it was read against, and that set moves
        (on the HDFS sessions the anomaly-rich test part fills the kNN set's
        top, so a session's kNN p-value rises over time; kept scores made
        the threshold stale and F1 0.554, rebuilt 0.621, the kNN alone 0.605;
        `python bench/quality_hdfs.py`).
        """
        knn_cal, forest_cal = self._component_cal
        n = knn_cal.size
        combined = _tippett(knn_cal.calibration_scores(), knn_cal.own_p_values() - 0.5 / n,
                            forest_cal.own_p_values() - 0.5 / n)
        self.thresholder.reset()
        self.thresholder.learn(combined)

    def _grow_forest(self, learned: int) -> None:
        """Grow the forest once the reference is large enough; then, each time
        ``_FOREST_TURNOVER`` tenths of the reference's size joined it, regrow the oldest
        tenth of the trees, so the forest turns over once per ``_FOREST_TURNOVER``
        turnovers of the reference."""
        assert self.forest is not None
        if self.detector.index is None or self.detector.size < self.min_reference:
            return
        if not self.forest.is_ready:
            self._refit_forest()
            return
        self._learned_since_regrow += learned
        count = max(1, self.forest_trees // _REGROW_ROUNDS)
        every = max(1, round(self.detector.size * _FOREST_TURNOVER * count / self.forest_trees))
        while self._learned_since_regrow >= every:
            # the filled columns only (9 of 100 on shuttle): the same trees, a tenth of the copy
            R, columns = self.detector.index.stored_columns()
            self.forest.regrow(R, count, columns=columns)
            self._learned_since_regrow -= every

    def _refit_forest(self) -> None:
        """Grow every tree afresh on the reference, from its filled columns only."""
        assert self.forest is not None and self.detector.index is not None
        R, columns = self.detector.index.stored_columns()
        self.forest.fit(R, columns=columns)
        self._learned_since_regrow = 0

    def _refit_covariance(self, learned: int, *, now: bool = False) -> None:
        """Estimate the covariance from the reference as it grows (each time it doubled,
        so the warm-up's scores are distances too, though never judged), when it reaches
        ``min_reference``, then each ``_COVARIANCE_REFIT`` events it learnt (or ``now``).

        The calibration set learns scores from the commit after the reference
        reached ``min_reference``, so each of them was read against a covariance
        of at least that many rows.
        """
        assert self.covariance is not None
        size = self.detector.size
        if self.detector.index is None or size < 2:
            return
        self._learned_since_refit += learned
        since = self._learned_since_refit
        if (now or not self.covariance.is_ready or since >= min(_COVARIANCE_REFIT, size - since)
                or size - learned < self.min_reference <= size):
            self.covariance.fit(self.detector.index.vectors())
            self._learned_since_refit = 0

    def _admit_recurring(self, X: np.ndarray, ids: list[str], flagged: np.ndarray) -> None:
        """Flagged events that recur join the reference: ``admit_repeats`` look-alikes make a pattern.

        Each flagged event of the block, in order, is compared with the last
        flagged events not admitted (at most 256) and with its nearest
        reference events. Those within the median calibration score of it
        (closer to it than a typical normal event is to its neighbours) are
        its look-alikes; with ``admit_repeats - 1`` of them, it and its
        flagged look-alikes join the reference. Later repeats find the
        admitted ones among their neighbours, so each joins at once, and the
        pattern stops being flagged as its repeats fill its neighbourhood. Without it, a log template first seen after the warm-up
        is flagged at every repeat, for ever: on BGL_2k 34 of 1,503 normal
        lines (FAR 0.0226), 21 with ``admit_repeats = 3``, no anomaly admitted.
        Off by default and for every kind but ``log`` (``streams.config``):
        where anomalies recur as dense clusters (network attacks, the failure
        types of HDFS sessions: F1 0.605 -> 0.571 with it) it would teach the
        reference the attack.
        """
        # a distance: the median kNN score, not that of the combined score
        radius = (self._component_cal[0] if self.forest is not None else self.thresholder).score_quantile(0.5)
        rows = np.flatnonzero(flagged)
        if not len(rows):
            return
        # look-alikes already in the reference (a pattern admitted before)
        known = (self.detector.query(X[rows]).distances <= radius).sum(axis=1)
        for j, n_known in zip(rows.tolist(), known.tolist()):
            x = X[j]
            near: list[int] = []
            if self._flagged:
                B = np.stack([b for b, _ in self._flagged])
                near = np.flatnonzero(_distances(B, x, self.metric) <= radius).tolist()
            if n_known + len(near) + 1 < self.admit_repeats:
                self._flagged.append((x, ids[j]))
                continue
            pattern = [self._flagged[i] for i in near]
            self.detector.learn(
                np.stack([x] + [b for b, _ in pattern]), [ids[j]] + [i for _, i in pattern]
            )
            gone = set(near)
            rest = [item for i, item in enumerate(self._flagged) if i not in gone]
            self._flagged.clear()
            self._flagged.extend(rest)

    def rebase_drift(self, move: Callable[[np.ndarray], np.ndarray]) -> None:
        """The encoder's space moved (a scaler refresh): the drift monitor's rows move with it.

        ``move`` maps rows of the drift view, as the encoder gave them before,
        to what it gives now (``models.base.Rebasing``). Without it the drift
        test reads every refresh as drift: a shuffled, stationary shuttle
        stream raised 5 to 9 drift alarms in 30,000 events, 0 or 1 with it
        (``python bench/stationary_drift.py``).

        The kNN reference is left as it was encoded, on purpose: rebasing it
        too was measured (shuttle judged ROC-AUC 0.995 -> 0.925, drift off).
        Its warm-up rows, anomalies included, were encoded by a young scaler;
        left in those frames they are not the neighbours of later anomalies,
        moved into the current one they are, and the anomalies join the
        reference (docs/quality-notes.md).
        """
        if self.drift_monitor is not None:
            self.drift_monitor.rebase(move)

    def _remember(self, X: np.ndarray, ids: list[str]) -> None:
        """Keep ``X`` and ``ids`` among the latest ``adopt_window`` (see :meth:`_recent_window`)."""
        if not self.adopt_window or not len(X):
            return
        self._recent.append((X, list(ids)))
        self._recent_rows += len(X)
        while self._recent_rows - len(self._recent[0][0]) >= self.adopt_window:
            self._recent_rows -= len(self._recent.popleft()[0])

    def _recent_window(self) -> tuple[np.ndarray, list[str]]:
        """The latest ``adopt_window`` vectors (at most) and their ids, oldest first."""
        m = min(self.adopt_window, self._recent_rows)
        X = np.concatenate([x for x, _ in self._recent])[self._recent_rows - m :]
        ids = [i for _, block in self._recent for i in block][self._recent_rows - m :]
        return X, ids

    def _adopt_recent(self) -> None:
        """The new normal: learn the recent window (flagged events too).

        The calibration set is not replaced: it keeps rolling, so the scores
        against the adopted reference take it over within ``calibration_size``
        events, and sooner at its top, which sets the threshold, when the new
        normal scores higher. Two earlier versions cost the HDFS sessions,
        whose anomaly-rich test part raises the alarm (``python
        bench/quality_hdfs.py``): a reset (a second warm-up in which every
        event joined the reference unjudged) F1 0.48, and a fresh set that
        took over once it held its minimum of 2 / alpha scores, all from that
        stretch and 5 % of them anomalies, F1 0.50; rolling on, 0.605, as with
        no adoption at all. On a Gaussian stream whose spread doubles, the
        false-alarm rate of the 500 events after the alarm was 0.042 rolling
        against 0.037 with the fresh set (5 seeds; docs/quality-notes.md).
        """
        if self._recent:
            self.detector.learn(*self._recent_window())
            self._recent.clear()
            self._recent_rows = 0
        if self.forest is not None and self.forest.is_ready and self.detector.index is not None:
            # the forest turns over slowly (_FOREST_TURNOVER): the new normal
            # must not stay isolated by trees of the old one
            self._refit_forest()
        if self.covariance is not None:
            self._refit_covariance(0, now=True)
        if not self.thresholder.is_ready:
            self.thresholder.reset()

    def get_state(self) -> State:
        recent, recent_ids = self._recent_window() if self._recent else (np.zeros((0, 0), np.float32), [])
        return {
            "detector": self.detector.get_state(),
            "thresholder": self.thresholder.get_state(),
            "drift": None if self.drift_monitor is None else self.drift_monitor.get_state(),
            "recent_vectors": recent,
            "recent_ids": recent_ids,
            "flagged_vectors": (
                np.stack([x for x, _ in self._flagged]) if self._flagged else np.zeros((0, 0), np.float32)
            ),
            "flagged_ids": [i for _, i in self._flagged],
            "events_seen": self.events_seen,
            "anomalies": self.anomalies,
        } | ({} if self.covariance is None else {
            "covariance": self.covariance.get_state(),
            "learned_since_refit": self._learned_since_refit,
        }) | ({} if self.forest is None else {
            "forest": self.forest.get_state(),
            "component_calibration": [c.get_state() for c in self._component_cal],
            "learned_since_regrow": self._learned_since_regrow,
        })

    def set_state(self, state: State) -> None:
        self.detector.set_state(state["detector"])
        self.thresholder.set_state(state["thresholder"])
        if self.drift_monitor is not None and state["drift"] is not None:
            self.drift_monitor.set_state(state["drift"])
        self._recent.clear()
        self._recent_rows = 0
        if len(state["recent_ids"]):
            self._remember(np.asarray(state["recent_vectors"], dtype=np.float32), list(state["recent_ids"]))
        self._flagged.clear()
        # absent from states saved before admit_repeats: no flagged event kept
        for x, i in zip(state.get("flagged_vectors", ()), state.get("flagged_ids", ())):
            self._flagged.append((np.asarray(x, dtype=np.float32), i))
        self.events_seen = int(state["events_seen"])
        self.anomalies = int(state["anomalies"])
        if self.covariance is None and "covariance" in state:
            raise StateMismatch("saved with scorer 'mahalanobis': its calibration set holds no kNN distances")
        if self.covariance is not None:
            if "covariance" in state:
                self.covariance.set_state(state["covariance"])
                self._learned_since_refit = int(state["learned_since_refit"])
            else:
                # saved by the kNN scorer: the reference carries on, the covariance is
                # estimated from it, and the calibration set, which held kNN
                # distances, fills again
                self.covariance = ShrunkMahalanobis()
                self._learned_since_refit = 0
                self.thresholder.reset()
                self._refit_covariance(0, now=True)
        if self.forest is None and "forest" in state:
            raise StateMismatch("saved with a forest: its calibration set holds combined scores, not kNN ones")
        if self.forest is not None and "forest" not in state:
            # Saved by the kNN alone (an earlier version's default for the kind):
            # the reference and the drift state carry on; the forest grows from the
            # restored reference at the next commit, and the calibration sets,
            # which held kNN scores, fill again (a warm-up of min_calibration events).
            self.forest = IsolationForest(trees=self.forest_trees, seed=self.seed)
            self.thresholder.reset()
            for cal in self._component_cal:
                cal.reset()
            self._learned_since_regrow = 0
        elif self.forest is not None:
            self.forest.set_state(state["forest"])
            for cal, st in zip(self._component_cal, state["component_calibration"]):
                cal.set_state(st)
            self._learned_since_regrow = int(state["learned_since_regrow"])
        # A state saved while an older version refilled a second calibration set
        # ("next_thresholder") loads without it: the set it keeps went on learning
        # every score meanwhile, so it is the rolling set this version keeps.

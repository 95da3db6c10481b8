"""Centroid drift: a sequential test that the embedding centroid has moved.

:class:`CentroidDriftMonitor` freezes the first ``reference_size`` vectors of a
stream as its reference, then cuts the rest into non-overlapping blocks of
``block_size`` vectors. Each block gets the statistic

    T = b * mean_j ((mean_block_j - mu_j) / sigma_j) ** 2,

the shift of the block centroid from the reference centroid in units of the
reference spread, scaled so that T is about 1 when nothing moved. T is turned
into a normal score ``u`` through its bootstrap null distribution (blocks drawn
from the reference itself). A second statistic of the same form is computed on
the reference's ``components`` leading principal components, each whitened to
unit spread: when the dimensions are strongly correlated (embeddings), the
per-dimension T moves with the common factors, its null is wide, and a shift
along a minor direction drowns in it; whitened it stands out. The block's
``u`` is the larger of the two normal scores, referred once more to its own
bootstrap null (the same resampled blocks give both statistics, so the two are
calibrated jointly). A one-sided CUSUM on ``u`` accumulates the
evidence: a small shift that persists adds up, one odd block does not. The
alarm threshold is calibrated by simulation to the false-alarm budget: with
probability at least ``1 - alpha`` a stationary stream runs ``horizon_events``
events without an alarm.

Two points go beyond a plain bootstrap of blocks; both were measured on
stationary Gaussian streams (d = 4 and 64, 300 streams of 20,000 events each,
``alpha = 0.05``, CUSUM reference value 0.5 at the time, see ``_CUSUM_K``):

* The reference's centroid and spread are estimates whose error every live
  block shares, so live T runs larger than T of blocks drawn from the
  reference (by ``block_size / reference_size`` on average, more in high
  dimension once divided by the spread of T). The CUSUM accumulates that bias:
  with the plain bootstrap 183 of 300 streams of dim 64 alarmed (budget: 15).
  Here each bootstrap block is measured against the centroid and spread of a
  pseudo-reference resampled from the reference, which puts the estimation
  error into the null distribution: 8 of 300 (d = 4: 19 of 300).
* What is left is the error of *this* reference: a small bias of ``u`` (sd
  about 0.06) that lasts as long as the reference. The calibration gives each
  simulated CUSUM path a random bias of that size, so the budget holds for a
  reference one actually got, not only on average over references.

Each alarm comes with an explanation: the events of the recent window farthest
from the reference, how the window spreads over k-means clusters of the
reference (and how much of it lies where the reference never was), and the
dimensions whose standardised mean moved most.

>>> rng = np.random.default_rng(1)
>>> X = rng.normal(size=(4000, 8)).astype(np.float32)
>>> X[2500:, :2] += 0.5  # half a sigma on two dimensions from event 2500 on
>>> monitor = CentroidDriftMonitor(reference_size=1000, block_size=50)
>>> alarms = monitor.update(X, [f"e{i}" for i in range(len(X))])
>>> [(a.detected_at, a.events_seen) for a in alarms]
[('e2649', 2650)]
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import ndtri

from detectors import kernels
from detectors._drift_thresholds import THRESHOLDS as _TABLED
from detectors.index import distinct_rows
from models.base import State
from models.errors import NonFinite, StateMismatch, WrongDimension, WrongType

# CUSUM reference value in units of the normal score u: the detector is tuned
# to a mean shift of 2k = 2 standard deviations of u; a persistent drift whose
# u-mean exceeds 1 is found in about h / (E[u] - 1) blocks, anything below that
# is treated as noise. k = 0.5 (tuned to a shift of 1) was the first choice:
# its threshold at the default budget is about 14 (18 on a heavy-tailed
# reference), so even blocks at the largest u (3.48) need 5 to 6 blocks to
# alarm; with k = 1 the threshold is about 6.5 (7 heavy-tailed). Measured
# (bench/quality_drift.py, docs/quality-notes.md): the report's drift
# scenarios are found 100 events sooner, the CIFAR class mix within 150 events
# instead of 550; 120 stationary Gaussian and Student-t5 streams raised 0 alarms
# against 6 and 5 with k = 0.5 (budget 12); a shift of 0.2 sd on 8 of 16 dims
# (E[u] near 1) is still found sooner (median 475 events against 650, 10 seeds).
_CUSUM_K = 1.0

# Spreads below this fraction of the typical (median) spread are floored to it,
# so a dimension constant in the reference does not divide by zero; a constant
# dimension that starts moving still gives a very large T (and the largest u).
_SIGMA_FLOOR = 1e-6

# Calibration paths: enough that about 20 paths exceed the chosen threshold, so
# the estimated tail probability has a relative error near 1/sqrt(20) = 22%;
# the tail of max S falls tenfold every 2.8 in h, so that moves h by about 0.3.
_TAIL_PATHS = 20
# At least this many paths even when alpha is large (20 / alpha is then small):
# the quantile of the maximum is better estimated with more paths, and it is cheap.
_MIN_PATHS = 20_000
# Cap on simulated path-steps (about 0.25 s of NumPy). When horizon / block /
# alpha asks for more, fewer paths are simulated and the exponential tail of
# the CUSUM maximum (Lundberg's exponent of u - k) carries the estimate from
# the deepest well-estimated level down to alpha.
_MAX_PATH_STEPS = 40_000_000
# Chunk of pre-drawn random indices during calibration (memory: 2M int16).
_DRAW_CHUNK = 2_000_000

# Cap of the mean kurtosis used for the per-reference bias of u (a Student t
# with 4.5 degrees of freedom has 20 at n = 1000 in practice; beyond that the
# estimate is driven by a handful of outliers, not by the spread's error).
_MAX_KURTOSIS = 20.0

_TAU_STEP = 0.005
# Blocks of the largest possible score that may not alarm by themselves.
_BURST_BLOCKS = 2

# Bootstrap blocks measured against one pseudo-reference (see _establish).
_BLOCKS_PER_PSEUDO = 4

# Lloyd iterations of the reference k-means: the clusters only label regions
# for the explanation, so a rough partition is enough.
_KMEANS_ITERATIONS = 10
# A window point farther from every centre than this quantile of the
# reference's own nearest-centre distances counts as "novel".
_NOVEL_QUANTILE = 0.99
# The explanation window holds at least this many events even when the CUSUM
# run is shorter, so cluster shares are not read off a handful of points.
_MIN_WINDOW = 200
# How many dimensions and clusters the explanation names.
_TOP_DIMENSIONS = 5
_TOP_CLUSTERS = 3

_POLICIES = ("adopt", "keep")

# Monitor phases.
_COLLECTING = "collecting"  # filling the reference
_HOLDOFF = "holdoff"  # new reference after an alarm; cooldown before re-arming
_ARMED = "armed"  # watching, may alarm
_ALARMED = "alarmed"  # policy "keep": drift reported, waiting for the stream to return

_STATE_VERSION = 1


@dataclass(frozen=True)
class DriftAlarm:
    """One drift alarm: the block that crossed the threshold and what moved.

    Attributes
    ----------
    detected_at : str
        Id of the event that closed the alarming block.
    events_seen : int
        Events the monitor had seen up to and including that event.
    statistic, threshold : float
        CUSUM value S at the alarm and the threshold h it crossed.
    reference_size : int
        Events in the reference the stream was compared with.
    window_size : int
        Events in the CUSUM run that led to the alarm (since S was last 0).
    explanation : dict
        JSON-able: ``exemplars`` (ids of the window events farthest from the
        reference), ``clusters`` (shares of reference and window per reference
        cluster, ``novel_share``, ``most_changed``), ``top_dimensions``.
    """

    detected_at: str
    events_seen: int
    statistic: float
    threshold: float
    reference_size: int
    window_size: int
    explanation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The fields of the drift record this alarm fills (JSON-able)."""
        return {
            "detected_at": self.detected_at,
            "events_seen": self.events_seen,
            "statistic": self.statistic,
            "threshold": self.threshold,
            "reference_size": self.reference_size,
            "window_size": self.window_size,
            "explanation": self.explanation,
        }


def _setting(name: str, doc: str) -> property:
    """A read-only property over the constructor keyword ``name``."""
    return property(lambda self: getattr(self, "_" + name), doc=doc)


class CentroidDriftMonitor:
    """Sequential detector of a shift of the embedding centroid.

    Parameters
    ----------
    reference_size : int
        Vectors that form the frozen reference (the first ones seen, and after
        an alarm under policy ``"adopt"`` the next ones).
    block_size : int
        Vectors per block; one statistic per block.
    alpha : float
        False-alarm budget: probability of any alarm over ``horizon_events``
        events of a stationary stream.
    horizon_events : int
        The horizon of that budget.
    n_clusters : int
        k-means clusters of the reference used by the explanation.
    cooldown : int
        Events before the monitor re-arms: after the new reference is
        established (policy ``"adopt"``), or after S came back to 0 (``"keep"``).
    policy : {"adopt", "keep"}
        After an alarm, ``"adopt"`` takes the next ``reference_size`` vectors as
        the new reference; ``"keep"`` keeps the reference and stays in alarm
        (no further alarms) until the stream returns.
    n_exemplars : int
        Event ids named in an explanation.
    bootstrap : int
        Bootstrap blocks of the null distribution of T.
    components : int
        Leading principal components of the reference behind the second
        statistic (at most the dimension); 0 uses the centroid statistic alone.
    seed : int
        Seed of the bootstrap, the calibration and the k-means.

    Notes
    -----
    Life cycle: collecting the reference (``is_ready`` false) -> armed. An
    alarm sets ``drift_detected``. Under ``"adopt"`` the monitor then collects
    a new reference, holds S at 0 for ``cooldown`` events (the change may still
    be settling) and re-arms. Under ``"keep"`` S goes on (capped at h, so that
    it can come back down) and the monitor re-arms once S has returned to 0
    and ``cooldown`` more events passed without S crossing h again. Either way
    one drift gives one alarm.

    ``update`` costs O(n * d) for a batch of n vectors of dim d. Establishing a
    reference costs O(bootstrap * (block_size + reference_size / 4) * d) for
    the bootstrap (the k-means of the explanation runs at the first alarm or
    state save of a reference, not before) plus a calibration of at most ``_MAX_PATH_STEPS`` simulated CUSUM
    steps (about 0.1 s), which monitors with equal settings and similar data
    share through a cache; at the default settings it is a table lookup. Memory: two references' worth of
    vectors (the reference being collected and the explanation ring).
    """

    def __init__(
        self,
        *,
        reference_size: int = 1000,
        block_size: int = 50,
        alpha: float = 0.001,
        horizon_events: int = 100_000,
        n_clusters: int = 8,
        cooldown: int = 500,
        policy: str = "adopt",
        n_exemplars: int = 5,
        bootstrap: int = 2000,
        components: int = 8,
        seed: int = 0,
    ) -> None:
        if reference_size < 2:
            raise ValueError("reference_size must be at least 2")
        if not 1 <= block_size <= reference_size:
            raise ValueError("block_size must be in [1, reference_size]")
        if not 0.0 < alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        if horizon_events < 1 or n_clusters < 1 or cooldown < 0 or n_exemplars < 0:
            raise ValueError("horizon_events, n_clusters >= 1; cooldown, n_exemplars >= 0")
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {_POLICIES}")
        if not 10 <= bootstrap <= 32_000:  # int16 indices in the calibration
            raise ValueError("bootstrap must be in [10, 32000]")
        if components < 0:
            raise ValueError("components must be >= 0")
        self._reference_size = reference_size
        self._block_size = block_size
        self._alpha = alpha
        self._horizon_events = horizon_events
        self._n_clusters = n_clusters
        self._cooldown = cooldown
        self._policy = policy
        self._n_exemplars = n_exemplars
        self._bootstrap = bootstrap
        self._components = components
        self._seed = seed
        self._reset()

    # Settings are read-only: the threshold and the saved state depend on them.
    reference_size = _setting("reference_size", "Vectors in a reference.")
    block_size = _setting("block_size", "Vectors per block.")
    alpha = _setting("alpha", "False-alarm budget over ``horizon_events``.")
    horizon_events = _setting("horizon_events", "Horizon of the false-alarm budget.")
    n_clusters = _setting("n_clusters", "k-means clusters of the reference.")
    cooldown = _setting("cooldown", "Events before re-arming after a drift.")
    policy = _setting("policy", 'What follows an alarm: "adopt" or "keep".')
    n_exemplars = _setting("n_exemplars", "Event ids named in an explanation.")
    bootstrap = _setting("bootstrap", "Bootstrap blocks of the null of T.")
    components = _setting("components", "Leading principal components of the second statistic (0: off).")
    seed = _setting("seed", "Seed of the bootstrap, calibration and k-means.")

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        """Empty monitor: no dimension yet, nothing allocated."""
        self._dim: int | None = None
        self._phase = _COLLECTING
        self._events_seen = 0
        self._n_established = 0
        self._in_alarm = False
        # reference being collected
        self._ref_rows: np.ndarray | None = None
        self._ref_count = 0
        # _ref_rows still holds the established reference (not after a restore)
        self._ref_kept = False
        # established reference
        self._mu = np.zeros(0)
        self._sigma = np.ones(0)
        self._null_t = np.zeros(0)  # sorted bootstrap T
        # second statistic: T on the reference's leading principal components
        self._basis = np.zeros((0, 0))  # (d, m) unit-spread projection of z; m = 0: T alone
        self._null_tp = np.zeros(0)  # sorted bootstrap T of the projection
        self._null_v = np.zeros(0)  # sorted bootstrap max of the two normal scores
        self._h = math.nan
        self._centres: np.ndarray | None = None  # None: not computed for this reference yet
        self._ref_shares = np.zeros(0)
        self._novel_radius = math.inf
        # CUSUM
        self._s = 0.0
        self._run_blocks = 0
        self._cooldown_left = 0
        self._returned = False  # policy "keep": S came back to 0 since the alarm
        # partial block carried between update calls
        self._pending = np.zeros((0, 0), dtype=np.float32)
        self._pending_ids: list[str] = []
        # ring of the latest vectors that went into blocks (explanations)
        self._ring = np.zeros((0, 0), dtype=np.float32)
        self._ring_ids: list[str] = []
        self._ring_pos = 0
        self._ring_count = 0

    @property
    def _ring_capacity(self) -> int:
        # The window an explanation compares with the reference needs to be no
        # larger than the reference itself; that also bounds memory per source
        # at twice the reference.
        return max(_MIN_WINDOW, self.reference_size)

    def _allocate(self, dim: int) -> None:
        self._dim = dim
        self._ref_rows = np.zeros((self.reference_size, dim), dtype=np.float32)
        self._pending = np.zeros((0, dim), dtype=np.float32)
        self._ring = np.zeros((self._ring_capacity, dim), dtype=np.float32)
        self._ring_ids = [""] * self._ring_capacity

    # ------------------------------------------------------------- properties

    @property
    def statistic(self) -> float:
        """Current CUSUM value S (capped at the threshold while in alarm)."""
        return float(self._s)

    @property
    def threshold(self) -> float:
        """Alarm threshold h on S (NaN before the first reference is established)."""
        return float(self._h)

    @property
    def is_ready(self) -> bool:
        """True when a reference is established and blocks are being tested."""
        return self._phase != _COLLECTING

    @property
    def drift_detected(self) -> bool:
        """True from an alarm until the monitor re-arms."""
        return self._in_alarm

    @property
    def events_seen(self) -> int:
        """Events passed to :meth:`update` since the start."""
        return self._events_seen

    @property
    def null_sample(self) -> np.ndarray:
        """Sorted bootstrap null sample of the block statistic T (empty before a reference)."""
        return self._null_t.copy()

    @property
    def references_established(self) -> int:
        """How many references were established so far (a new one after each adoption)."""
        return self._n_established

    @property
    def window_size(self) -> int:
        """Events in the current CUSUM run (since S was last 0)."""
        return self._run_blocks * self.block_size

    # ----------------------------------------------------------------- update

    def update(self, X: np.ndarray, ids: Sequence[str]) -> list[DriftAlarm]:
        """Feed a batch of vectors in stream order; return the alarms it raised.

        Parameters
        ----------
        X : array (n, d)
            Vectors (float32 is expected; any real dtype is accepted).
        ids : sequence of str, length n
            Event ids, used in alarms and explanations.

        Returns
        -------
        list of DriftAlarm
            Usually empty. The result does not depend on how the stream is cut
            into batches.

        Raises
        ------
        WrongDimension
            ``X`` is not 2-D or its width differs from the first batch's.
        NonFinite
            ``X`` holds NaN or infinity. The batch is then not used at all.
        """
        X = self._validate(X, ids)
        ids = list(ids)
        alarms: list[DriftAlarm] = []
        pos = 0
        while pos < len(X):
            if self._phase == _COLLECTING:
                pos += self._collect(X[pos:])
            else:
                used, alarm = self._monitor(X[pos:], ids[pos:])
                pos += used
                alarms.extend(alarm)
        return alarms

    def _validate(self, X: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        try:
            X = np.asarray(X, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise WrongType(f"drift monitor input is not a numeric matrix: {err}") from err
        if X.ndim != 2 or X.shape[1] == 0:
            raise WrongDimension(f"drift monitor expects a 2-D batch, got shape {X.shape}")
        if self._dim is not None and X.shape[1] != self._dim:
            raise WrongDimension(f"vector dimension {X.shape[1]}, this monitor's is {self._dim}")
        if not np.logical_and.reduce(np.isfinite(X), axis=None):  # .all() without its wrapper
            raise NonFinite("drift monitor input holds NaN or infinite values")
        if len(ids) != len(X):
            raise ValueError(f"{len(ids)} ids for {len(X)} vectors")
        if self._dim is None and len(X):
            self._allocate(X.shape[1])
        return X

    def _collect(self, X: np.ndarray) -> int:
        """Add rows to the reference being collected; establish it when full."""
        assert self._ref_rows is not None
        take = min(len(X), self.reference_size - self._ref_count)
        self._ref_rows[self._ref_count : self._ref_count + take] = X[:take]
        self._ref_count += take
        self._events_seen += take
        if self._ref_count == self.reference_size:
            self._establish(self._ref_rows.astype(np.float64))
            self._ref_count = 0
        return take

    def _block_scores(self, rows: np.ndarray) -> np.ndarray:
        """Normal scores u of consecutive complete blocks of ``rows``."""
        b = self.block_size
        if rows.shape[1] <= kernels.MAX_WIDTH and kernels.already_loaded():
            return kernels.drift_block_scores(rows, b, self._mu, self._sigma, self._basis,
                                              self._null_t, self._null_tp, self._null_v)
        nb = len(rows) // b
        # add.reduce and a division: np.mean's own arithmetic, without its Python
        # wrapper (~3 us a call, three calls every block)
        means = np.add.reduce(rows[: nb * b].reshape(nb, b, -1), axis=1, dtype=np.float64) / b
        z = (means - self._mu) / self._sigma
        u = _normal_scores(self._null_t, b * (np.add.reduce(z * z, axis=1) / z.shape[1]))
        if self._basis.shape[1] == 0:
            return u
        y = z @ self._basis
        up = _normal_scores(self._null_tp, b * (np.add.reduce(y * y, axis=1) / y.shape[1]))
        return _normal_scores(self._null_v, _larger(u, up))

    def _monitor(self, X: np.ndarray, ids: list[str]) -> tuple[int, list[DriftAlarm]]:
        """Run the CUSUM over the complete blocks of pending + X.

        Returns how many rows of X were consumed (all of them, unless an alarm
        under policy "adopt" hands the rest to a new reference) and the alarms.
        """
        b = self.block_size
        n_pending = len(self._pending)
        rows = np.concatenate([self._pending, X]) if n_pending else X
        row_ids = self._pending_ids + ids if n_pending else ids
        nb = len(rows) // b
        if nb == 0:
            self._pending = np.array(rows)  # X may be the caller's array
            self._pending_ids = row_ids
            self._events_seen += len(X)
            return len(X), []
        u = self._block_scores(rows)
        h = self._h
        alarms: list[DriftAlarm] = []
        done = nb  # blocks consumed in this call
        for i in range(nb):
            if self._phase == _HOLDOFF:
                # Fresh reference after an alarm: the blocks right after it may
                # still be in transition; they neither accumulate nor alarm.
                self._cooldown_left -= b
                if self._cooldown_left <= 0:
                    self._phase = _ARMED
                    self._in_alarm = False
                continue
            s = max(0.0, self._s + float(u[i]) - _CUSUM_K)
            self._run_blocks = self._run_blocks + 1 if s > 0.0 else 0
            if self._phase == _ALARMED:
                self._follow_alarm(s, h)
                continue
            self._s = s
            if s <= h:
                continue
            end = (i + 1) * b
            alarms.append(self._make_alarm(rows, row_ids, end, end - n_pending))
            if self.policy == "keep":
                self._phase = _ALARMED
                self._in_alarm = True
                self._returned = False
                self._s = min(self._s, h)
                continue
            # policy "adopt": the rows after this block start the new reference
            self._start_collecting()
            done = i + 1
            break
        end = done * b
        self._push_ring(rows[:end], row_ids[:end])
        if self._phase == _COLLECTING:
            used = end - n_pending
            self._pending = rows[:0]
            self._pending_ids = []
        else:
            used = len(X)
            self._pending = rows[end:].copy()
            self._pending_ids = row_ids[end:]
        self._events_seen += used
        return used, alarms

    def _follow_alarm(self, s: float, h: float) -> None:
        """Policy "keep": stay alarmed until S returns to 0 and cooldown passes."""
        if s > h:
            # Still (or again) drifting: wait for a new return to 0. S is capped
            # at h so that after a long drift it decays back in about h / k blocks.
            self._returned = False
            self._s = h
            return
        self._s = s
        if not self._returned:
            if s == 0.0:
                self._returned = True
                self._cooldown_left = self.cooldown
            else:
                return
        else:
            self._cooldown_left -= self.block_size
        if self._cooldown_left <= 0:
            self._phase = _ARMED
            self._in_alarm = False
            self._returned = False

    def _start_collecting(self) -> None:
        self._phase = _COLLECTING
        self._in_alarm = True
        self._ref_count = 0
        self._s = 0.0
        self._run_blocks = 0

    def rebase(self, move: Callable[[np.ndarray], np.ndarray]) -> None:
        """The input space moved: map what is kept of it through ``move`` (rows in, rows out).

        ``move`` is a per-dimension increasing map, such as a scaler's new
        centre and scale (``models.base.Rebasing``). The rows kept (reference
        being collected, partial block, explanation window) are mapped. An
        established reference's centroid and spread are computed again
        from its mapped rows; a restored monitor, which does not keep them,
        maps them as ``move`` maps the neighbourhood of the centroid (the
        slope between ``mu - sigma`` and ``mu + sigma``, exact for an affine
        move; on shuffled shuttle 1 / 1 / 0 false alarms on seeds 0-2 against
        1 / 0 / 0 from the rows, ``bench/stationary_drift.py``). The null
        samples, principal axes and threshold stay: they are in units of the
        reference's spread, which an affine move leaves as they were (the
        transaction encoder's squash bends this only far out in the tails).
        Without it a scaler refresh shifts every later block against the
        reference, and the test reads the shift as drift.
        """
        if self._dim is None or self._ref_rows is None:
            return
        if self._phase == _COLLECTING:
            if self._ref_count:
                self._ref_rows[: self._ref_count] = move(self._ref_rows[: self._ref_count])
        elif self._ref_kept:
            self._ref_rows[:] = move(self._ref_rows)
            if self._ref_rows.shape[1] >= 2 and kernels.already_loaded():
                mu, sd = kernels.column_moments(self._ref_rows)  # NumPy's values, one pass each
            else:
                ref = self._ref_rows.astype(np.float64)
                mu, sd = ref.mean(axis=0), ref.std(axis=0)
            self._mu, self._sigma = mu, np.maximum(sd, sigma_floor(sd))
        else:
            lo, mid, hi = move(np.stack([self._mu - self._sigma, self._mu, self._mu + self._sigma]))
            self._mu = np.asarray(mid, dtype=np.float64)
            self._sigma = np.maximum((np.asarray(hi, np.float64) - lo) / 2.0, sigma_floor(self._sigma) * 1e-3)
        if len(self._pending):
            self._pending = np.asarray(move(self._pending), dtype=np.float32)
        if self._ring_count:
            # every slot is mapped; those never filled hold zeros and are never read
            self._ring[:] = move(self._ring)

    # ------------------------------------------------------------ reference

    def _establish(self, ref: np.ndarray) -> None:
        """Freeze ``ref`` as the reference: centroid, spread, null of T, threshold, clusters."""
        n = len(ref)
        b = self.block_size
        # The bootstrap depends on the seed and on how many references came
        # before, so a re-established reference gets fresh draws.
        rng = np.random.default_rng([self.seed, self._n_established])
        mu = ref.mean(axis=0)
        sd = ref.std(axis=0)
        floor = sigma_floor(sd)
        sigma = np.maximum(sd, floor)
        zref = (ref - mu) / sigma

        # Null of T. The reference is only a sample, so its centroid and spread
        # are off by an error every live block shares. The bootstrap world
        # treats the reference as the truth: each null block (b rows drawn
        # from it) is measured against the centroid and spread of a
        # pseudo-reference (n rows resampled from it), which carries that
        # error into the null distribution. Resampling is done with weight
        # matrices (rows: draws, columns: reference rows) and three products.
        # float32 products: half the time of float64 at d = 384, and the
        # moments of standardised data lose nothing that matters in T.
        d = zref.shape[1]
        # A reference of repeated rows (log templates, recurring texts) is
        # resampled through its distinct rows: a draw of row i is a draw of its
        # distinct row, so the same draws give the same blocks and
        # pseudo-references, with products over the distinct rows only (the
        # sums grouped differently: equal to float rounding).
        distinct = _distinct_rows(zref)
        zu, inverse, counts = (zref, None, None) if distinct is None else distinct
        basis = _principal_basis(zu, min(self.components, d, n - 1), counts)
        m = basis.shape[1]
        z32 = zu.astype(np.float32)
        if m:
            # The projected coordinates are linear in z, so the same resampled
            # blocks and pseudo-references give both statistics' nulls jointly.
            z32 = np.concatenate([z32, (zu @ basis).astype(np.float32)], axis=1)
        # A block is b rows, so its mean is a sparse product (b terms per draw,
        # not n); the pseudo-references are dense resamples of all n rows and
        # cost B * n * d each, so fewer of them are drawn and each is paired
        # with several blocks. The pseudo-reference only adds the reference's
        # estimation error (about b / n of T), which a few hundred draws hold.
        block_means = _block_means(rng, z32, self.bootstrap, b, n, inverse)
        n_pseudo = max(1, math.ceil(self.bootstrap / _BLOCKS_PER_PSEUDO))
        pseudo = _resample_weights(rng, n_pseudo, n, n, inverse, len(zu))
        # Both moments from one product against [z | z^2]: BLAS packs the
        # weights once (each entry the same sum as from two products).
        width = z32.shape[1]
        both = np.empty((len(z32), 2 * width), np.float32)
        both[:, :width] = z32
        np.multiply(z32, z32, out=both[:, width:])
        moments = pseudo @ both
        pseudo_means = moments[:, :width]
        pseudo_var = moments[:, width:] - pseudo_means**2
        # zref is in units of sigma; the floor keeps constant dimensions at 0 / floor = 0
        unit_floor = np.concatenate([floor / sigma, np.full(m, _SIGMA_FLOOR)])
        pseudo_sd = np.maximum(np.sqrt(np.maximum(pseudo_var, 0.0)), unit_floor)
        # Block i is measured against pseudo-reference i % n_pseudo; squared in place.
        zc = _paired_squares(block_means, pseudo_means, pseudo_sd)
        t_all = b * np.mean(zc[:, :d], axis=1)
        null_t = np.sort(t_all)
        null_tp = np.zeros(0)
        null = null_t
        if m:
            # Two statistics, one test: the larger of the two normal scores,
            # itself referred to its bootstrap null.
            tp_all = b * np.mean(zc[:, d:], axis=1)
            null_tp = np.sort(tp_all)
            null = np.sort(_larger(_normal_scores(null_t, t_all), _normal_scores(null_tp, tp_all)))

        zsq = zref * zref
        m2 = np.mean(zsq, axis=0)
        m4 = np.mean(zsq * zsq, axis=0)  # not zref**4: pow() is 100x slower
        live = m2 > 0.0
        kurtosis = float(np.mean(m4[live] / m2[live] ** 2)) if live.any() else 3.0
        h = calibrated_threshold(
            null,  # with principal components: the null of the larger normal score
            block_size=b,
            reference_size=n,
            kurtosis=kurtosis,
            horizon_events=self.horizon_events,
            alpha=self.alpha,
            seed=self.seed,
        )

        self._mu = mu
        self._sigma = sigma
        self._ref_kept = True
        self._null_t = null_t
        self._basis = basis
        self._null_tp = null_tp
        self._null_v = null if m else np.zeros(0)
        self._h = h
        # The clusters only serve explanations: computed at the first alarm
        # (or state save) of this reference, from its rows, which stay in
        # _ref_rows until an alarm under "adopt" starts collecting the next.
        self._centres = None
        self._s = 0.0
        self._run_blocks = 0
        self._ring_pos = 0
        self._ring_count = 0
        if self._n_established > 0 and self.cooldown > 0:
            self._phase = _HOLDOFF
            self._cooldown_left = self.cooldown
        else:
            self._phase = _ARMED
            self._in_alarm = False
        self._n_established += 1

    # ---------------------------------------------------------- explanation

    def _ensure_clusters(self) -> None:
        """k-means of the established reference, once per reference, when first needed."""
        if self._centres is not None:
            return
        assert self._ref_rows is not None and self._phase != _COLLECTING
        zref = (self._ref_rows.astype(np.float64) - self._mu) / self._sigma
        n = len(zref)
        rng = np.random.default_rng([self.seed, self._n_established - 1, 1])
        distinct = _distinct_rows(zref)
        if distinct is None:
            centres = _kmeans(zref, min(self.n_clusters, n), rng)
            near, dist = _nearest(zref, centres)
        else:  # a reference of repeats: over its distinct rows (see _establish)
            zu, inverse, _ = distinct
            centres = _kmeans(zu, min(self.n_clusters, n), rng, inverse)
            near, dist = _nearest(zu, centres)
            near, dist = near[inverse], dist[inverse]
        self._centres = centres
        self._ref_shares = np.bincount(near, minlength=len(centres)) / n
        self._novel_radius = float(np.quantile(dist, _NOVEL_QUANTILE))

    def _push_ring(self, rows: np.ndarray, ids: list[str]) -> None:
        cap = self._ring_capacity
        if len(rows) >= cap:
            rows, ids = rows[-cap:], ids[-cap:]
        n = len(rows)
        if n == 0:
            return
        first = min(n, cap - self._ring_pos)
        self._ring[self._ring_pos : self._ring_pos + first] = rows[:first]
        self._ring_ids[self._ring_pos : self._ring_pos + first] = ids[:first]
        if first < n:
            self._ring[: n - first] = rows[first:]
            self._ring_ids[: n - first] = ids[first:]
        self._ring_pos = (self._ring_pos + n) % cap
        self._ring_count = min(cap, self._ring_count + n)

    def _ring_tail(self, m: int) -> tuple[np.ndarray, list[str]]:
        """The last ``m`` (at most) rows and ids in the ring, oldest first."""
        m = min(m, self._ring_count)
        if m == 0:
            return self._ring[:0], []
        idx = (self._ring_pos - m + np.arange(m)) % self._ring_capacity
        return self._ring[idx], [self._ring_ids[j] for j in idx]

    def _make_alarm(self, rows: np.ndarray, row_ids: list[str], end: int, used: int) -> DriftAlarm:
        """The alarm closing block ``rows[end - b:end]``; ``used`` rows of the batch so far."""
        window = self._run_blocks * self.block_size
        m = min(self._ring_capacity, max(window, _MIN_WINDOW))
        start = max(0, end - m)
        old_rows, old_ids = self._ring_tail(m - (end - start))
        recent = np.concatenate([old_rows, rows[start:end]])
        recent_ids = old_ids + list(row_ids[start:end])
        return DriftAlarm(
            detected_at=str(row_ids[end - 1]),
            events_seen=self._events_seen + used,
            statistic=float(self._s),
            threshold=float(self._h),
            reference_size=self.reference_size,
            window_size=window,
            explanation=self._explain(recent, recent_ids),
        )

    def _explain(self, window: np.ndarray, ids: list[str]) -> dict[str, Any]:
        """What moved between the reference and ``window`` (JSON-able)."""
        self._ensure_clusters()
        z = (window.astype(np.float64) - self._mu) / self._sigma
        near, dist = _nearest(z, self._centres)
        k = len(self._centres)
        shares = np.bincount(near, minlength=k) / len(z)
        change = shares - self._ref_shares
        most_changed = np.argsort(-np.abs(change), kind="stable")[:_TOP_CLUSTERS]
        far = np.argsort(-dist, kind="stable")[: self.n_exemplars]
        shift = z.mean(axis=0)
        top = np.argsort(-np.abs(shift), kind="stable")[:_TOP_DIMENSIONS]
        return {
            "window_events": len(z),
            "exemplars": [str(ids[j]) for j in far],
            "exemplar_distances": [round(float(dist[j]), 4) for j in far],
            "clusters": {
                "reference_share": [round(float(v), 4) for v in self._ref_shares],
                "window_share": [round(float(v), 4) for v in shares],
                "most_changed": [int(j) for j in most_changed],
                "novel_share": round(float(np.mean(dist > self._novel_radius)), 4),
            },
            "top_dimensions": [int(j) for j in top],
            "dimension_shifts": [round(float(shift[j]), 4) for j in top],
        }

    # ---------------------------------------------------------------- state

    def get_state(self) -> State:
        """Everything needed to continue exactly where this monitor is (JSON values and arrays)."""
        if self._centres is None and self._phase != _COLLECTING:
            self._ensure_clusters()
        ring, ring_ids = self._ring_tail(self._ring_count)
        centres = np.zeros((0, 0)) if self._centres is None else self._centres
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "dim": self._dim,
            "phase": self._phase,
            "events_seen": self._events_seen,
            "n_established": self._n_established,
            "in_alarm": self._in_alarm,
            "ref_rows": None
            if self._ref_rows is None
            else self._ref_rows[: self._ref_count].copy(),
            "mu": self._mu.copy(),
            "sigma": self._sigma.copy(),
            "null_t": self._null_t.copy(),
            "basis": self._basis.copy(),
            "null_tp": self._null_tp.copy(),
            "null_v": self._null_v.copy(),
            "threshold": None if math.isnan(self._h) else float(self._h),
            "centres": centres.copy(),
            "ref_shares": self._ref_shares.copy(),
            "novel_radius": None if math.isinf(self._novel_radius) else self._novel_radius,
            "s": float(self._s),
            "run_blocks": self._run_blocks,
            "cooldown_left": self._cooldown_left,
            "returned": self._returned,
            "pending": self._pending.copy(),
            "pending_ids": [str(i) for i in self._pending_ids],
            "ring": ring,
            "ring_ids": [str(i) for i in ring_ids],
        }

    def set_state(self, state: State) -> None:
        """Restore :meth:`get_state` output; raises StateMismatch if it came from other settings."""
        if state.get("version") != _STATE_VERSION:
            raise StateMismatch(f"drift monitor state version {state.get('version')!r}")
        saved = state.get("config")
        if isinstance(saved, dict) and "components" not in saved:
            # Saved before the principal-component statistic: its reference
            # goes on with the centroid statistic alone; the next one has both.
            saved = {**saved, "components": self.components}
        if saved != self._config():
            raise StateMismatch(
                f"drift monitor state for settings {state.get('config')!r}, not {self._config()!r}"
            )
        self._reset()
        dim = state["dim"]
        if dim is None:
            return
        self._allocate(int(dim))
        try:
            ref = np.asarray(state["ref_rows"], dtype=np.float32).reshape(-1, self._dim)
            self._ref_count = len(ref)
            self._ref_rows[: len(ref)] = ref
            self._phase = str(state["phase"])
            self._events_seen = int(state["events_seen"])
            self._n_established = int(state["n_established"])
            self._in_alarm = bool(state["in_alarm"])
            self._mu = np.asarray(state["mu"], dtype=np.float64)
            self._sigma = np.asarray(state["sigma"], dtype=np.float64)
            self._null_t = np.asarray(state["null_t"], dtype=np.float64)
            if "basis" in state:
                self._basis = np.asarray(state["basis"], dtype=np.float64).reshape(self._dim, -1)
                self._null_tp = np.asarray(state["null_tp"], dtype=np.float64)
                self._null_v = np.asarray(state["null_v"], dtype=np.float64)
            else:
                self._basis = np.zeros((self._dim, 0))
            self._h = math.nan if state["threshold"] is None else float(state["threshold"])
            centres = np.asarray(state["centres"], dtype=np.float64)
            self._centres = centres if centres.size else None
            self._ref_shares = np.asarray(state["ref_shares"], dtype=np.float64)
            radius = state["novel_radius"]
            self._novel_radius = math.inf if radius is None else float(radius)
            self._s = float(state["s"])
            self._run_blocks = int(state["run_blocks"])
            self._cooldown_left = int(state["cooldown_left"])
            self._returned = bool(state["returned"])
            self._pending = np.asarray(state["pending"], dtype=np.float32).reshape(-1, self._dim)
            self._pending_ids = [str(i) for i in state["pending_ids"]]
            ring = np.asarray(state["ring"], dtype=np.float32).reshape(-1, self._dim)
            self._push_ring(ring, [str(i) for i in state["ring_ids"]])
        except (KeyError, ValueError, TypeError) as err:
            self._reset()
            raise StateMismatch(f"drift monitor state is malformed: {err}") from err
        if self._phase not in (_COLLECTING, _HOLDOFF, _ARMED, _ALARMED) or (
            self._phase != _COLLECTING and self._mu.shape != (self._dim,)
        ):
            self._reset()
            raise StateMismatch("drift monitor state is inconsistent")

    def _config(self) -> dict[str, Any]:
        return {
            "reference_size": self.reference_size,
            "block_size": self.block_size,
            "alpha": self.alpha,
            "horizon_events": self.horizon_events,
            "n_clusters": self.n_clusters,
            "cooldown": self.cooldown,
            "policy": self.policy,
            "n_exemplars": self.n_exemplars,
            "bootstrap": self.bootstrap,
            "components": self.components,
            "seed": self.seed,
        }


# ------------------------------------------------------------------ helpers


def sigma_floor(sd: np.ndarray) -> float:
    """The smallest spread a dimension is standardised by: a share of the typical one.

    Shared with the merged monitor of a sharded source (``detectors.shards``).
    """
    typical = float(np.median(sd))
    return _SIGMA_FLOOR * typical if typical > 0.0 else _SIGMA_FLOOR


def calibrated_threshold(
    null_t: np.ndarray,
    *,
    block_size: int,
    reference_size: int,
    kurtosis: float,
    horizon_events: int,
    alpha: float,
    seed: int,
) -> float:
    """CUSUM threshold h for blocks of ``block_size`` tested against a reference of ``reference_size``.

    ``null_t`` is the sorted null sample of the block statistic T, ``kurtosis``
    the mean kurtosis of the reference's dimensions. Shared by
    :class:`CentroidDriftMonitor` and the merged monitor of a sharded source
    (``detectors.shards``).
    """
    pool = _null_pool(null_t)
    tau = _bias_sd(block_size, reference_size, kurtosis, len(null_t))
    n_steps = max(1, math.ceil(horizon_events / block_size))
    # The default settings' thresholds are a table of this same simulation
    # (detectors/_drift_thresholds.py): ~0.1 s of CPU per reference otherwise.
    h = _TABLED.get((_pool_digest(pool), n_steps, alpha, tau, seed))
    if h is None:
        h = _calibrated_threshold(pool.tobytes(), n_steps, alpha, tau, seed)
    # One or two odd blocks must never alarm on their own (a burst is not a
    # drift), whatever the calibration says; this only binds when the null
    # has almost no spread, e.g. a reference of identical vectors.
    u_max = float(ndtri((2.0 * len(null_t) + 1.0) / (2.0 * (len(null_t) + 1))))
    return max(h, _BURST_BLOCKS * (u_max - _CUSUM_K))


def _null_pool(null_t: np.ndarray) -> np.ndarray:
    """float32 normal scores of the sorted null sample itself, each ranked among the others."""
    lo = np.searchsorted(null_t, null_t, side="left")
    hi = np.searchsorted(null_t, null_t, side="right") - 1
    return ndtri((lo + hi + 1.0) / (2.0 * len(null_t))).astype(np.float32)


def _pool_digest(pool: np.ndarray) -> str:
    """Key of a null pool in the threshold table: untied nulls of one size share one pool."""
    return hashlib.sha256(pool.tobytes()).hexdigest()[:16]


def _bias_sd(block_size: int, reference_size: int, kurtosis: float, n_null: int) -> float:
    """tau: the sd of the bias of u that *this* reference carries, on the calibration's grid.

    What the null cannot hold is the error of this reference: a bias of u that
    lasts as long as the reference. Its variance, in units of the sd of T (so
    of u): (b / n)^2 from the centroid, (kurtosis - 1) / (2 n) from the spread
    (var(sd^2 / sigma^2) = (kurtosis - 1) / n), 1 / B from the finite
    bootstrap. Measured across 100 Gaussian references, d = 4 and 64: sd 0.057
    against 0.063 from this formula; Student t5: 0.068.
    """
    b, n = block_size, reference_size
    # Kurtosis capped so that a few giant outliers in one dimension cannot blow up h.
    kurtosis = min(max(kurtosis, 1.0), _MAX_KURTOSIS)
    tau = math.sqrt((b / n) ** 2 + (kurtosis - 1.0) / (2.0 * n) + 1.0 / n_null)
    # Rounded up to a grid of 0.005 (a tenth of its typical size): slightly
    # conservative, and references of similar data share one calibration.
    return math.ceil(tau / _TAU_STEP) * _TAU_STEP


# A reference is resampled through its distinct rows when they are at most
# this share of it (fewer, and grouping the draws costs more than it saves).
_DISTINCT_MAX_SHARE = 0.5
# Block means go through a dense weight matrix instead of a sparse one when
# there are at most this many distinct rows per drawn row of a block (BLAS
# against scipy's sparse product: ~5 against ~22 ms for 2,000 blocks of 50
# rows from 150 distinct ones, d = 393).
_DENSE_BLOCKS_PER_ROW = 4


def _distinct_rows(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(distinct rows, index of each row's distinct row, counts)``, first occurrences in order;
    None when more than ``_DISTINCT_MAX_SHARE`` of the rows are distinct."""
    found = distinct_rows(z, _DISTINCT_MAX_SHARE)
    if found is None:
        return None
    zu, inverse = found
    return zu, inverse, np.bincount(inverse, minlength=len(zu))


def _resample_weights(
    rng: np.random.Generator, draws: int, size: int, n: int,
    inverse: np.ndarray | None = None, groups: int = 0,
) -> np.ndarray:
    """(draws, n) weights: row i is the mean over ``size`` rows drawn with replacement from n.

    With ``inverse`` (row -> its group of equal rows, ``groups`` of them): the
    same draws, weights per group, (draws, groups).
    """
    picks = rng.integers(0, n, size=(draws, size))
    if inverse is not None:
        picks, n = inverse[picks], groups
    picks += (np.arange(draws) * n)[:, None]
    weights = np.bincount(picks.ravel(), minlength=draws * n).astype(np.float32)
    weights *= np.float32(1.0 / size)
    return weights.reshape(draws, n)


def _block_means(
    rng: np.random.Generator, z: np.ndarray, draws: int, size: int,
    n: int | None = None, inverse: np.ndarray | None = None,
) -> np.ndarray:
    """(draws, d): row i is the mean of ``size`` rows drawn with replacement from ``n`` rows.

    The rows are those of ``z``, or with ``inverse`` (``n`` rows -> their row of
    ``z``) row j is ``z[inverse[j]]``.
    """
    groups = len(z)
    n = groups if n is None else n
    picks = rng.integers(0, n, size=draws * size)
    if inverse is not None:
        picks = inverse[picks]
    if inverse is not None and groups <= _DENSE_BLOCKS_PER_ROW * size:
        picks += np.repeat(np.arange(draws) * groups, size)
        weights = np.bincount(picks, minlength=draws * groups).astype(np.float32)
        weights *= np.float32(1.0 / size)
        return weights.reshape(draws, groups) @ z
    from scipy.sparse import csr_matrix  # here: a dense path (log templates) never imports scipy.sparse

    weights = csr_matrix(
        (np.full(draws * size, 1.0 / size, dtype=np.float32), picks, np.arange(0, draws * size + 1, size)),
        shape=(draws, groups),
    )
    return np.asarray(weights @ z, dtype=np.float32)


def _paired_squares(block_means: np.ndarray, pseudo_means: np.ndarray, pseudo_sd: np.ndarray) -> np.ndarray:
    """float64 ``((block_means[i] - pseudo_means[j]) / pseudo_sd[j]) ** 2`` with ``j = i % len(pseudo_means)``.

    When the blocks are a whole number of rounds of the pseudo-references (the
    default: 2,000 blocks, 500 pseudo-references) they pair by broadcasting
    instead of two gathers, and the float64 copy is divided and squared in
    place: the same values, fewer passes over ~6 MB.
    """
    draws, width = block_means.shape
    n_pseudo = len(pseudo_means)
    if draws % n_pseudo:
        pair = np.arange(draws) % n_pseudo
        return ((block_means - pseudo_means[pair]).astype(np.float64) / pseudo_sd[pair]) ** 2
    rounds = (draws // n_pseudo, n_pseudo, width)
    zc = (block_means.reshape(rounds) - pseudo_means).astype(np.float64)
    np.divide(zc, pseudo_sd, out=zc)
    np.square(zc, out=zc)
    return zc.reshape(draws, width)


def _larger(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The larger of two normal scores; ties broken by the smaller one, then by which was larger.

    Both scores live on the same grid of bootstrap ranks, so plain maxima would
    share values, and the pool of null scores (and with it the calibrated
    threshold) would depend on the data. With the tie-breaks the pool is the
    rank grid, as for one statistic.
    """
    return np.maximum(u, v) + 1e-6 * np.minimum(u, v) + 1e-9 * (u > v)


def _principal_basis(z: np.ndarray, m: int, counts: np.ndarray | None = None) -> np.ndarray:
    """(d, m): the ``m`` leading principal axes of centred ``z``, each scaled to unit spread.

    With ``counts``, row i of ``z`` stands for ``counts[i]`` equal rows.

    ``z @ basis`` are the reference's leading principal components in units of
    their own standard deviation (whitened); axes with no spread are dropped.
    The axes are the leading eigenvectors of the smaller of the two Gram
    matrices (d x d, or n x n mapped back through ``z``), found without the
    full decomposition: ~9 ms instead of the thin SVD's ~45 ms at n = 1000,
    d = 385, one re-established reference per drift (same axes and spreads
    to float precision).
    """
    if m <= 0:
        return np.zeros((z.shape[1], 0))
    from scipy.linalg import eigh

    if counts is None:
        zc = z - z.mean(axis=0)
        n = len(zc)
    else:  # sqrt(count) times each distinct row: the same Gram matrix z^T z
        n = int(counts.sum())
        zc = (z - (counts @ z) / n) * np.sqrt(counts)[:, None]
    rows, d = zc.shape
    gram = zc.T @ zc if d <= rows else zc @ zc.T
    size = len(gram)
    m = min(m, size)
    w, v = eigh(gram, subset_by_index=[size - m, size - 1])
    w, v = w[::-1], v[:, ::-1]  # leading first
    sv = np.sqrt(np.maximum(w, 0.0))
    if d > rows:  # eigenvectors of z z^T: the axes are z^T u / sv
        v = (zc.T @ v) / np.where(sv > 0.0, sv, 1.0)
    sd = sv / math.sqrt(n)
    keep = sd > _SIGMA_FLOOR * max(float(sd[0]), 1.0) if len(sd) else sd > 0
    return v[:, keep] / sd[keep]


def _normal_scores(null_t: np.ndarray, t: np.ndarray) -> np.ndarray:
    """u = Phi^-1 of the mid-rank ECDF of ``t`` among the sorted null sample.

    The mid-rank keeps ties neutral (a reference of identical vectors gives
    u = 0, not the maximum) and keeps p inside (0, 1): u is finite, at most
    Phi^-1(1 - 1 / (2 (B + 1))), 3.48 for B = 2000.
    """
    # the array's own method: np.searchsorted's Python wrapper costs as much at these sizes
    lo = null_t.searchsorted(t, side="left")
    hi = null_t.searchsorted(t, side="right")
    return ndtri((lo + hi + 1.0) / (2.0 * (len(null_t) + 1)))


@functools.lru_cache(maxsize=64)
def _calibrated_threshold(
    pool_bytes: bytes, n_steps: int, alpha: float, tau: float, seed: int
) -> float:
    """Threshold h with P(max_t S_t > h within n_steps) <= alpha under the null.

    Simulates CUSUM paths whose increments are drawn from ``pool`` (null normal
    scores) plus a per-path bias N(0, tau^2). A pure function of its arguments,
    cached: monitors with equal settings and untied data share one calibration.
    """
    pool = np.frombuffer(pool_bytes, dtype=np.float32)
    rng = np.random.default_rng([seed, 0x5EED])
    # 20 / alpha paths (at least _MIN_PATHS), within the work cap; never fewer
    # than 1000, which still puts 10 paths above the 0.99 quantile.
    n_paths = max(math.ceil(_TAIL_PATHS / alpha), _MIN_PATHS)
    n_paths = max(1000, min(n_paths, _MAX_PATH_STEPS // n_steps))
    s = np.zeros(n_paths, dtype=np.float32)
    top = np.zeros(n_paths, dtype=np.float32)
    drift = (rng.normal(0.0, tau, n_paths) - _CUSUM_K).astype(np.float32)
    # Increments are pool entries picked by 16-bit uniforms, four to a raw
    # 64-bit draw, through a table of the pool at 2^16 evenly spaced
    # quantiles (each entry's share is off by under 2^-16): about a fifth of
    # the time of ``rng.integers`` and a gather, which made up most of a
    # calibration (~0.2 s per cache miss).
    table = pool[(np.arange(1 << 16, dtype=np.uint32) * len(pool)) >> 16]
    chunk = max(1, _DRAW_CHUNK // n_paths)
    # One step's increments at a time, gathered into one reused row: the same
    # values in the same order as a gather of the whole chunk, without its
    # temporaries (tens of MB per chunk, most of them page faults): ~30% of
    # a calibration, measured at equal thresholds.
    row = np.empty(n_paths, dtype=np.float32)
    # bound methods and ufuncs looked up once (2,000 steps x 5 calls)
    take, add, maximum = table.take, np.add, np.maximum
    for t0 in range(0, n_steps, chunk):
        rows = min(chunk, n_steps - t0)
        codes = rng.bit_generator.random_raw((rows * n_paths + 3) // 4).view(np.uint16)
        for r in range(0, rows * n_paths, n_paths):
            take(codes[r : r + n_paths], out=row, mode="clip")
            add(row, drift, out=row)
            add(s, row, out=s)
            maximum(s, 0.0, out=s)
            maximum(top, s, out=top)
    top = np.sort(top.astype(np.float64))[::-1]
    allowed = math.floor(alpha * n_paths)  # paths that may exceed h
    if allowed >= _TAIL_PATHS:
        return float(top[allowed])
    # Too few paths for alpha: take the level _TAIL_PATHS paths exceed and
    # extend it down the exponential tail P(max S > h) ~ C exp(-theta h). The
    # deep tail is made of paths with an unlucky bias, so theta is taken at a
    # bias of +2 tau: measured with 100,000 paths (B = 2000, 2000 steps,
    # tau = 0.065) the tail falls by 10 every 2.8 in h; theta without the bias
    # (1.0) would say 2.3 and put h too low, at +2 tau it says 3.1.
    theta = _lundberg_exponent(pool.astype(np.float64), 2.0 * tau)
    level = float(top[_TAIL_PATHS])
    return level + math.log(_TAIL_PATHS / (alpha * n_paths)) / theta


def _lundberg_exponent(pool: np.ndarray, bias: float) -> float:
    """theta > 0 with E exp(theta (u + bias - k)) = 1: the decay rate of the CUSUM's tail."""
    if float(np.mean(pool)) + bias >= _CUSUM_K:
        return 1e-3  # no negative drift: no exponential tail, h far out

    def excess(theta: float) -> float:
        m = theta * (pool + bias - _CUSUM_K)
        top = float(m.max())
        return top + math.log(float(np.mean(np.exp(m - top))))

    lo, hi = 1e-6, 1.0
    while excess(hi) < 0.0 and hi < 1e3:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if excess(mid) < 0.0:
            lo = mid
        else:
            hi = mid
    return max(hi, 1e-3)


def _nearest(
    z: np.ndarray, centres: np.ndarray, zz: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest centre and the distance to it, per dimension (RMS).

    ``zz``: the rows' squared norms, when the caller has them (k-means asks for
    the same rows at every iteration). The factor 2 scales the product, not
    ``z`` (a power of two: the same values, one pass over ``z`` fewer).
    """
    if zz is None:
        zz = np.einsum("ij,ij->i", z, z)
    d2 = zz[:, None] - 2.0 * (z @ centres.T) + np.einsum("ij,ij->i", centres, centres)[None, :]
    near = np.argmin(d2, axis=1)
    best = np.maximum(d2[np.arange(len(z)), near], 0.0)
    return near, np.sqrt(best / z.shape[1])


def _kmeans(
    z: np.ndarray, k: int, rng: np.random.Generator, inverse: np.ndarray | None = None
) -> np.ndarray:
    """Seeded k-means++ start and a few Lloyd steps; returns the centres (k, d).

    With ``inverse`` the rows are ``z[inverse]`` (``z`` their distinct rows):
    the same start (distances per row, picks among all rows) and Lloyd steps
    over the distinct rows, each weighted by its count (the same centres to
    float rounding, in a fraction of the time for a reference of repeats).
    """
    rows = np.arange(len(z)) if inverse is None else inverse
    n = len(rows)
    centres = np.empty((k, z.shape[1]))
    centres[0] = z[rows[rng.integers(n)]]
    d2 = np.sum((z - centres[0]) ** 2, axis=1)
    for j in range(1, k):
        full = d2[rows]
        total = float(full.sum())
        pick = int(rng.choice(n, p=full / total)) if total > 0.0 else int(rng.integers(n))
        centres[j] = z[rows[pick]]
        d2 = np.minimum(d2, np.sum((z - centres[j]) ** 2, axis=1))
    weight = np.ones(len(z)) if inverse is None else np.bincount(inverse, minlength=len(z)).astype(np.float64)
    zz = np.einsum("ij,ij->i", z, z)
    for _ in range(_KMEANS_ITERATIONS):
        near, _ = _nearest(z, centres, zz)
        members = np.zeros((len(z), k))
        members[np.arange(len(z)), near] = weight
        counts = members.sum(axis=0)
        sums = members.T @ z
        filled = counts > 0  # an emptied cluster keeps its old centre
        centres[filled] = sums[filled] / counts[filled, None]
    return centres

"""Sharding a hot source: per-shard block summaries and the drift test on their exact merge.

A source configured with ``shards = N`` is split by a stable hash of the event
id (:func:`shard_of`): shard ``k`` is its own source inside the pipeline, with
its own kNN reference, calibration and drift monitor (its drift alarms only
drive its own adoption of a new normal). The source's drift test runs on the
merged stream instead:

* each shard cuts its drift vectors into blocks of ``block_size`` events and
  publishes one :class:`BlockSummary` per block: the count and the power sums
  of the vectors (sum, sum of squares, cubes and fourth powers per
  dimension), all additive; and, whenever its drift monitor establishes a
  reference, a :class:`ShardNull` (the bootstrap null sample of the block
  statistic T);
* :class:`MergedDriftMonitor` aligns the shards' blocks by sequence number
  (window ``k`` = block ``k`` of every shard: shards that run ahead wait),
  adds their sums (exact: the merged window's centroid is the centroid of its
  ``N * block_size`` events) and runs the centroid CUSUM of
  :class:`detectors.drift.CentroidDriftMonitor` on the merged windows, with a
  reference of ``N * reference_size`` events (its centroid and spread from
  the merged sums, its kurtosis from the third and fourth power sums).

The null of T comes from the shards: T is scaled so that its null does not
depend on the block size beyond the ratio block / reference, which shard and
merge share (``b / R`` = ``N b / N R``); events are split by a hash of their
id, so every shard sees the same distribution, and the shards' bootstrap
samples are pooled. That is the one approximation; the sums are exact.

>>> ids = [f"e{i}" for i in range(6000)]
>>> [sum(shard_of(i, 2) == k for i in ids) for k in range(2)]
[2998, 3002]
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detectors.drift import (
    _CUSUM_K,
    DriftAlarm,
    _normal_scores,
    calibrated_threshold,
    sigma_floor,
)
from models.base import State, join_arrays, split_arrays
from models.errors import StateMismatch

_STATE_VERSION = 1
# Power sums carried per block: x, x^2 (centroid, spread), x^3, x^4 (kurtosis).
POWERS = 4
# The calibration simulates CUSUM paths with int16 draws from the pooled null.
_MAX_POOL = 32_000
# How many dimensions an alarm names.
_TOP_DIMENSIONS = 5

_COLLECTING, _HOLDOFF, _ARMED, _ALARMED = "collecting", "holdoff", "armed", "alarmed"


@dataclass(frozen=True)
class MergedDriftAlarm(DriftAlarm):
    """A drift alarm of the merged test; ``ts`` is the event time of ``detected_at``."""

    ts: float = 0.0


def shard_of(event_id: str, shards: int) -> int:
    """Shard of an event: CRC-32 of its id (UTF-8) modulo ``shards``; the same in every process."""
    return zlib.crc32(event_id.encode("utf-8")) % shards if shards > 1 else 0


def _pack(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f8").tobytes()).decode("ascii")


def _unpack(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f8").copy()


@dataclass(frozen=True)
class BlockSummary:
    """One block of a shard: ``count`` events, ``sums[p]`` = sum of x^(p+1) per dimension.

    ``last_id`` and ``last_ts`` (epoch seconds) are those of the block's last event.
    """

    source: str
    shard: int
    shards: int
    seq: int
    count: int
    sums: np.ndarray  # (POWERS, d) float64
    last_id: str
    last_ts: float

    @property
    def key(self) -> str:
        """Kafka key: one record per block (compaction keeps one copy of a block published twice)."""
        return block_key(self.source, self.shard, self.seq)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "block", "source": self.source, "shard": self.shard, "shards": self.shards,
            "seq": self.seq, "count": self.count, "dim": int(self.sums.shape[1]),
            "sums": _pack(self.sums), "last_id": self.last_id, "last_ts": self.last_ts,
        }


@dataclass(frozen=True)
class ShardNull:
    """A shard's null sample of T for its ``established``-th reference."""

    source: str
    shard: int
    shards: int
    established: int
    null_t: np.ndarray

    @property
    def key(self) -> str:
        """Kafka key: the latest null of each shard is the one that counts."""
        return f"{self.source}#{self.shard}#null"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "null", "source": self.source, "shard": self.shard, "shards": self.shards,
            "established": self.established, "null_t": _pack(self.null_t),
        }


@dataclass(frozen=True)
class MergeCheckpoint:
    """The merged monitor of a source as of window ``next_window`` (every earlier window merged).

    Written to the shard-summaries topic by the merging worker now and then,
    followed by tombstones for the blocks it covers, so that compaction keeps
    the topic bounded: a worker that rebuilds the merge starts from the newest
    checkpoint instead of every block since the beginning. ``tombstoned_to`` is
    the first window whose blocks were not tombstoned yet.
    """

    source: str
    shards: int
    next_window: int
    tombstoned_to: int
    state: State

    @property
    def key(self) -> str:
        """Kafka key: compaction keeps the newest checkpoint of each source."""
        return f"{self.source}#checkpoint"

    def to_dict(self) -> dict[str, Any]:
        tree, arrays = split_arrays(self.state)
        return {
            "type": "checkpoint", "source": self.source, "shards": self.shards, "next_window": self.next_window,
            "tombstoned_to": self.tombstoned_to, "state": tree,
            "arrays": {name: {"f8": _pack(a), "shape": list(a.shape)} for name, a in arrays.items()},
        }


def block_key(source: str, shard: int, seq: int) -> str:
    """The Kafka key of block ``seq`` of ``shard`` (see :attr:`BlockSummary.key`)."""
    return f"{source}#{shard}#{seq}"


def summary_from_dict(d: dict[str, Any]) -> BlockSummary | ShardNull | MergeCheckpoint:
    """The inverse of ``to_dict``; raises ``KeyError``/``ValueError`` on a malformed record."""
    if d["type"] == "block":
        sums = _unpack(d["sums"]).reshape(POWERS, int(d["dim"]))
        return BlockSummary(str(d["source"]), int(d["shard"]), int(d["shards"]), int(d["seq"]),
                            int(d["count"]), sums, str(d["last_id"]), float(d["last_ts"]))
    if d["type"] == "null":
        return ShardNull(str(d["source"]), int(d["shard"]), int(d["shards"]), int(d["established"]),
                         _unpack(d["null_t"]))
    if d["type"] == "checkpoint":
        arrays = {name: _unpack(a["f8"]).reshape([int(n) for n in a["shape"]]) for name, a in d["arrays"].items()}
        state = join_arrays(d["state"], arrays)
        if not isinstance(state, dict):
            raise ValueError("a checkpoint's state must be an object")
        return MergeCheckpoint(str(d["source"]), int(d["shards"]), int(d["next_window"]),
                               int(d["tombstoned_to"]), state)
    raise ValueError(f"unknown summary type {d['type']!r}")


def power_sums(X: np.ndarray) -> np.ndarray:
    """(POWERS, d) float64: the sums of X, X^2, X^3, X^4 over the rows."""
    x = np.asarray(X, dtype=np.float64)
    out = np.empty((POWERS, x.shape[1]))
    p = x
    for j in range(POWERS):
        out[j] = p.sum(axis=0)
        if j + 1 < POWERS:
            p = p * x
    return out


class ShardSummarizer:
    """Cuts one shard's drift vectors into blocks and summarises each.

    Parameters
    ----------
    source : str
        The user's source name.
    shard, shards : int
        This shard and how many there are.
    block_size : int
        Events per block (the source's drift block).
    """

    def __init__(self, *, source: str, shard: int, shards: int, block_size: int) -> None:
        if not 0 <= shard < shards:
            raise ValueError("shard must be in [0, shards)")
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.source = source
        self.shard = shard
        self.shards = shards
        self.block_size = block_size
        self.seq = 0  # blocks completed
        self.nulls_sent = 0  # references whose null was published
        self._sums: np.ndarray | None = None
        self._count = 0

    @property
    def pending(self) -> int:
        """Events in the block in progress."""
        return self._count

    def update(self, X: np.ndarray, ids: Sequence[str], ts: Sequence[float]) -> list[BlockSummary]:
        """Add rows in stream order; returns the summaries of the blocks they completed."""
        out: list[BlockSummary] = []
        pos, n = 0, len(X)
        while pos < n:
            take = min(n - pos, self.block_size - self._count)
            part = power_sums(X[pos : pos + take])
            self._sums = part if self._sums is None else self._sums + part
            self._count += take
            pos += take
            if self._count == self.block_size:
                out.append(BlockSummary(self.source, self.shard, self.shards, self.seq, self._count,
                                        self._sums, str(ids[pos - 1]), float(ts[pos - 1])))
                self.seq += 1
                self._sums, self._count = None, 0
        return out

    def null(self, null_t: np.ndarray, established: int) -> ShardNull | None:
        """The shard's new null, once per reference its drift monitor establishes (else None)."""
        if established <= self.nulls_sent or len(null_t) == 0:
            return None
        self.nulls_sent = established
        return ShardNull(self.source, self.shard, self.shards, established, np.asarray(null_t, np.float64))

    def get_state(self) -> State:
        return {"version": _STATE_VERSION, "seq": self.seq, "nulls_sent": self.nulls_sent,
                "count": self._count, "sums": None if self._sums is None else self._sums.copy()}

    def set_state(self, state: State) -> None:
        if state.get("version") != _STATE_VERSION:
            raise StateMismatch(f"shard summarizer state version {state.get('version')!r}")
        self.seq = int(state["seq"])
        self.nulls_sent = int(state["nulls_sent"])
        self._count = int(state["count"])
        sums = state["sums"]
        self._sums = None if sums is None else np.asarray(sums, np.float64).reshape(POWERS, -1)


class MergedDriftMonitor:
    """The centroid drift test of a sharded source, on the exact merge of its shards' blocks.

    Parameters
    ----------
    shards : int
    block_size, reference_size : int
        Per shard (the source's drift settings): a merged window holds
        ``shards * block_size`` events, the reference ``shards * reference_size``
        (rounded up to whole windows).
    alpha, horizon_events, cooldown, policy, seed
        As :class:`detectors.drift.CentroidDriftMonitor`; ``cooldown`` and the
        horizon count events of the merged stream.

    Notes
    -----
    :meth:`add` takes summaries in any order across shards and ignores a
    block it already merged (at-least-once delivery); a shard's blocks must
    come in order of ``seq`` per shard, as one producer on one partition
    writes them. A monitor that starts after the first blocks were lost
    starts at the first window every shard has.
    """

    def __init__(
        self,
        *,
        source: str,
        shards: int,
        block_size: int = 50,
        reference_size: int = 1000,
        alpha: float = 0.001,
        horizon_events: int = 100_000,
        cooldown: int = 500,
        policy: str = "adopt",
        seed: int = 0,
    ) -> None:
        if shards < 1 or block_size < 1 or reference_size < block_size:
            raise ValueError("shards >= 1, block_size >= 1, reference_size >= block_size")
        if policy not in ("adopt", "keep"):
            raise ValueError('policy must be "adopt" or "keep"')
        self.source = source
        self.shards = shards
        self.block_size = block_size
        self.reference_size = reference_size
        self.alpha = alpha
        self.horizon_events = horizon_events
        self.cooldown = cooldown
        self.policy = policy
        self.seed = seed
        self._reset()

    def _reset(self) -> None:
        self._next: int | None = None  # next window (seq) to merge
        self._waiting: dict[int, dict[int, BlockSummary]] = {}  # seq -> shard -> block
        self._nulls: dict[int, np.ndarray] = {}
        self._phase = _COLLECTING
        self._ref = np.zeros((POWERS, 0))
        self._ref_windows = 0
        self._ref_count = 0
        self._mu = np.zeros(0)
        self._sigma = np.ones(0)
        self._null_t = np.zeros(0)
        self._h = math.nan
        self._s = 0.0
        self._run = np.zeros(0)  # sum of x over the CUSUM run
        self._run_windows = 0
        self._cooldown_left = 0
        self._returned = False
        self._events_seen = 0
        self._windows = 0
        self._in_alarm = False

    # ------------------------------------------------------------ properties
    @property
    def window_events(self) -> int:
        """Events in one merged window."""
        return self.shards * self.block_size

    @property
    def reference_windows(self) -> int:
        return math.ceil(self.reference_size / self.block_size)

    @property
    def statistic(self) -> float:
        return float(self._s)

    @property
    def threshold(self) -> float:
        return float(self._h)

    @property
    def is_ready(self) -> bool:
        return self._phase != _COLLECTING

    @property
    def drift_detected(self) -> bool:
        return self._in_alarm

    @property
    def events_seen(self) -> int:
        """Events of the merged stream in the windows merged so far."""
        return self._events_seen

    @property
    def windows_merged(self) -> int:
        return self._windows

    @property
    def next_window(self) -> int | None:
        """Sequence number of the next window to merge (None before the first)."""
        return self._next

    @property
    def waiting(self) -> int:
        """Blocks received but not merged yet (their window still lacks a shard)."""
        return sum(len(v) for v in self._waiting.values())

    # ---------------------------------------------------------------- input
    def add_null(self, null: ShardNull) -> list[MergedDriftAlarm]:
        """A shard's null sample of T (the newest of each shard is kept)."""
        self._check(null.shards, null.shard)
        self._nulls[null.shard] = np.asarray(null.null_t, np.float64)
        return self._drain()

    def add(self, block: BlockSummary) -> list[MergedDriftAlarm]:
        """Take one shard block; merge every window now complete; return the alarms raised."""
        self._check(block.shards, block.shard)
        if self._next is not None and block.seq < self._next:
            return []  # merged already (a block delivered twice)
        self._waiting.setdefault(block.seq, {})[block.shard] = block
        if self._next is None:
            full = [s for s, got in self._waiting.items() if len(got) == self.shards]
            if not full:
                return []
            self._next = min(full)  # the first window every shard has
            for s in [s for s in self._waiting if s < self._next]:
                del self._waiting[s]
        return self._drain()

    def _drain(self) -> list[MergedDriftAlarm]:
        alarms: list[MergedDriftAlarm] = []
        while self._next is not None and len(self._waiting.get(self._next, ())) == self.shards:
            if self._phase == _COLLECTING and self._ref_windows == self.reference_windows - 1 and not self._nulls:
                break  # this window completes the reference, and no shard null came yet: wait for one
            window = self._waiting.pop(self._next)
            self._next += 1
            alarm = self._merge([window[k] for k in range(self.shards)])
            if alarm is not None:
                alarms.append(alarm)
        return alarms

    def _check(self, shards: int, shard: int) -> None:
        if shards != self.shards or not 0 <= shard < shards:
            raise StateMismatch(f"source {self.source!r}: a summary of shard {shard} of {shards}, "
                                f"this monitor merges {self.shards} shards")

    # ---------------------------------------------------------------- merge
    def _merge(self, blocks: list[BlockSummary]) -> MergedDriftAlarm | None:
        sums = blocks[0].sums.copy()
        for b in blocks[1:]:
            sums += b.sums
        count = sum(b.count for b in blocks)
        last = max(blocks, key=lambda b: (b.last_ts, b.shard))
        self._windows += 1
        self._events_seen += count
        if self._phase == _COLLECTING:
            self._ref = sums if self._ref_windows == 0 else self._ref + sums
            self._ref_windows += 1
            self._ref_count += count
            if self._ref_windows == self.reference_windows:
                self._establish()
            return None
        return self._step(sums, count, last.last_id, last.last_ts)

    def _establish(self) -> None:
        n = self._ref_count
        s1, s2, s3, s4 = self._ref
        mu = s1 / n
        var = np.maximum(s2 / n - mu * mu, 0.0)
        sd = np.sqrt(var)
        floor = sigma_floor(sd)
        live = var > 0.0
        m4 = (s4 - 4 * mu * s3 + 6 * mu * mu * s2) / n - 3 * mu**4
        kurtosis = float(np.mean(m4[live] / var[live] ** 2)) if live.any() else 3.0
        pooled = np.sort(np.concatenate([self._nulls[k] for k in sorted(self._nulls)]))
        if len(pooled) > _MAX_POOL:  # evenly spaced order statistics keep the shape
            pooled = pooled[np.linspace(0, len(pooled) - 1, _MAX_POOL).astype(int)]
        self._mu = mu
        self._sigma = np.maximum(sd, floor)
        self._null_t = pooled
        self._h = calibrated_threshold(
            pooled, block_size=self.window_events, reference_size=n,
            kurtosis=kurtosis, horizon_events=self.horizon_events,
            alpha=self.alpha, seed=self.seed,
        )
        self._s = 0.0
        self._run = np.zeros_like(mu)
        self._run_windows = 0
        if self._in_alarm and self.cooldown > 0:
            self._phase, self._cooldown_left = _HOLDOFF, self.cooldown
        else:
            self._phase, self._in_alarm = _ARMED, False

    def _step(self, sums: np.ndarray, count: int, last_id: str, last_ts: float) -> MergedDriftAlarm | None:
        """One merged window through the CUSUM (the rules of CentroidDriftMonitor, per window)."""
        if self._phase == _HOLDOFF:
            self._cooldown_left -= count
            if self._cooldown_left <= 0:
                self._phase, self._in_alarm = _ARMED, False
            return None
        z = (sums[0] / count - self._mu) / self._sigma
        t = count * float(np.mean(z * z))
        u = float(_normal_scores(self._null_t, np.asarray([t]))[0])
        s = max(0.0, self._s + u - _CUSUM_K)
        if s > 0.0:
            self._run = self._run + sums[0]
            self._run_windows += 1
        else:
            self._run = np.zeros_like(self._mu)
            self._run_windows = 0
        if self._phase == _ALARMED:
            self._after_alarm(s, count)
            return None
        self._s = s
        if s <= self._h:
            return None
        alarm = MergedDriftAlarm(
            detected_at=last_id,
            events_seen=self._events_seen,
            statistic=float(s),
            threshold=float(self._h),
            reference_size=self._ref_count,
            window_size=self._run_windows * count,
            explanation=self._explain(count),
            ts=last_ts,
        )
        self._in_alarm = True
        if self.policy == "keep":
            self._phase, self._returned, self._s = _ALARMED, False, min(s, self._h)
        else:  # adopt: the next windows form the new reference
            self._phase, self._ref_windows, self._ref_count, self._s = _COLLECTING, 0, 0, 0.0
        return alarm

    def _after_alarm(self, s: float, count: int) -> None:
        """Policy "keep": in alarm until S returns to 0 and ``cooldown`` events pass below h."""
        if s > self._h:
            self._returned, self._s = False, self._h
            return
        self._s = s
        if not self._returned and s == 0.0:
            self._returned, self._cooldown_left = True, self.cooldown
        elif self._returned:
            self._cooldown_left -= count
        if self._returned and self._cooldown_left <= 0:
            self._phase, self._in_alarm, self._returned = _ARMED, False, False

    def _explain(self, count: int) -> dict[str, Any]:
        events = max(1, self._run_windows * count)
        shift = (self._run / events - self._mu) / self._sigma
        top = np.argsort(-np.abs(shift), kind="stable")[:_TOP_DIMENSIONS]
        return {
            "window_events": int(self._run_windows * count),
            "shards": self.shards,
            "merged_windows": self._windows,
            "top_dimensions": [int(j) for j in top],
            "dimension_shifts": [round(float(shift[j]), 4) for j in top],
        }

    # ---------------------------------------------------------------- state
    def checkpoint(self, tombstoned_to: int) -> MergeCheckpoint | None:
        """This monitor as a :class:`MergeCheckpoint` (None before its first window)."""
        if self._next is None:
            return None
        return MergeCheckpoint(self.source, self.shards, self._next, tombstoned_to, self.get_state())

    def restore(self, checkpoint: MergeCheckpoint) -> list[MergedDriftAlarm]:
        """Take ``checkpoint``'s state unless this monitor merged past it; the alarms of windows it completes.

        The worker that wrote a checkpoint reads it back at or past it (at it,
        the state is its own). A worker rebuilding the merge may have merged
        the blocks before the checkpoint that compaction has not dropped yet,
        from a reference of its own: up to the checkpoint's window, the
        checkpoint wins. Blocks read before it that it does not cover are kept.
        """
        self._check(checkpoint.shards, 0)
        if self._next is not None and self._next > checkpoint.next_window:
            return []
        waiting = [b for got in self._waiting.values() for b in got.values()]
        self.set_state(checkpoint.state)
        for b in waiting:
            if b.seq >= checkpoint.next_window:
                self._waiting.setdefault(b.seq, {}).setdefault(b.shard, b)
        return self._drain()

    def _config(self) -> dict[str, Any]:
        return {"shards": self.shards, "block_size": self.block_size, "reference_size": self.reference_size,
                "alpha": self.alpha, "horizon_events": self.horizon_events, "cooldown": self.cooldown,
                "policy": self.policy, "seed": self.seed}

    def get_state(self) -> State:
        """JSON values and arrays; blocks still waiting for their window are included."""
        return {
            "version": _STATE_VERSION, "config": self._config(), "next": self._next,
            "waiting": [b.to_dict() for got in self._waiting.values() for b in got.values()],
            "nulls": {str(k): v.copy() for k, v in self._nulls.items()},
            "phase": self._phase, "ref": self._ref.copy(), "ref_windows": self._ref_windows,
            "ref_count": self._ref_count, "mu": self._mu.copy(), "sigma": self._sigma.copy(),
            "null_t": self._null_t.copy(), "threshold": None if math.isnan(self._h) else self._h,
            "s": self._s, "run": self._run.copy(), "run_windows": self._run_windows,
            "cooldown_left": self._cooldown_left, "returned": self._returned,
            "events_seen": self._events_seen, "windows": self._windows, "in_alarm": self._in_alarm,
        }

    def set_state(self, state: State) -> None:
        if state.get("version") != _STATE_VERSION or state.get("config") != self._config():
            raise StateMismatch(f"merged drift state for {state.get('config')!r}, not {self._config()!r}")
        self._reset()
        self._next = None if state["next"] is None else int(state["next"])
        for d in state["waiting"]:
            b = summary_from_dict(d)
            assert isinstance(b, BlockSummary)
            self._waiting.setdefault(b.seq, {})[b.shard] = b
        self._nulls = {int(k): np.asarray(v, np.float64) for k, v in state["nulls"].items()}
        self._phase = str(state["phase"])
        self._ref = np.asarray(state["ref"], np.float64).reshape(POWERS, -1)
        self._ref_windows = int(state["ref_windows"])
        self._ref_count = int(state["ref_count"])
        self._mu = np.asarray(state["mu"], np.float64)
        self._sigma = np.asarray(state["sigma"], np.float64)
        self._null_t = np.asarray(state["null_t"], np.float64)
        self._h = math.nan if state["threshold"] is None else float(state["threshold"])
        self._s = float(state["s"])
        self._run = np.asarray(state["run"], np.float64)
        self._run_windows = int(state["run_windows"])
        self._cooldown_left = int(state["cooldown_left"])
        self._returned = bool(state["returned"])
        self._events_seen = int(state["events_seen"])
        self._windows = int(state["windows"])
        self._in_alarm = bool(state["in_alarm"])

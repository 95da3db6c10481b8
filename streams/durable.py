"""Durable detector state of a worker: which partition each source lives on, how far each
partition's state goes, and the snapshots that let another worker carry on.

Kafka-free bookkeeping (the worker in ``streams.app`` does the I/O), so it can be
tested alone. Partitions are ``(topic, partition)`` tuples.

The rules, for one input partition whose snapshot covers offsets below ``S``
and whose committed offset (where consumption starts) is ``C``:

- ``S < C``: the events ``[S, C)`` are replayed from Kafka into the state, with
  no outputs (theirs were produced before ``C`` was committed);
- ``S > C``: the events ``[C, S)`` are acknowledged without processing (their
  outputs were produced before the snapshot was written, see below);
- no snapshot: the partition's sources start afresh at ``C``.

A snapshot is only written between batches, after the outputs of every event
it covers were acknowledged by the broker: so ``S`` never runs ahead of an
output, and a restored worker neither misses an event nor learns one twice.
The at-least-once duplicates that remain are the outputs of events after ``C``
produced before a crash, as many as the commit interval lets through.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from streams.pipeline import BatchResult, Pipeline
from streams.snapshots import Snapshot, SnapshotError, SnapshotStore

log = logging.getLogger("neighbourwatch.state")

TP = tuple[str, int]


class DurableState:
    """Per-partition positions, source homes and snapshots of one worker's pipeline.

    Parameters
    ----------
    pipeline : Pipeline
    store : SnapshotStore, optional
        Without one nothing is saved and taken-over partitions start afresh.
    interval : float
        Seconds between snapshots.
    metrics : optional
        A ``streams.metrics.Metrics``.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        store: SnapshotStore | None,
        *,
        interval: float = 30.0,
        metrics: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pipeline = pipeline
        self.store = store
        self.interval = interval
        self.metrics = metrics
        self.clock = clock
        self.skip_below: dict[TP, int] = {}  # ready partitions: offsets below this are acknowledged unprocessed
        self.positions: dict[TP, int] = {}  # next offset not yet in the state
        self.sources_of: dict[TP, set[str]] = {}
        self.anchors: dict[TP, tuple[int, int]] = {}  # (offset, crc32 of the value) of the last event in the state
        self.saved: dict[TP, int] = {}  # the position of each partition's newest snapshot
        self.in_flight = 0  # batches in the state whose outputs are not yet acknowledged
        self._last_snapshot = clock()
        self._strays: set[str] = set()

    # -- taking a partition over ---------------------------------------------------------
    def is_ready(self, tp: TP) -> bool:
        return tp in self.skip_below

    def load(self, tp: TP) -> Snapshot | None:
        """The partition's snapshot, or None (none, or unusable: logged and counted, never half-used)."""
        if self.store is None:
            return None
        try:
            return self.store.load(*tp)
        except SnapshotError as err:
            log.error("partition %s[%d]: %s; its sources start afresh", tp[0], tp[1], err)
            if self.metrics is not None:
                self.metrics.observe_restore(0, 1, 0)
            return None

    def take_over(self, tp: TP, first_offset: int, snapshot: Snapshot | None) -> tuple[int, int] | None:
        """Restore the partition's sources; returns the offsets ``[start, end)`` to replay, if any.

        ``first_offset`` is where consumption of the partition starts (its committed offset).
        Runs where the pipeline runs (its thread).
        """
        self.sources_of[tp] = set()
        if snapshot is None:
            self.skip_below[tp] = first_offset
            self.positions[tp] = first_offset
            log.info("partition %s[%d]: no snapshot; starting afresh at offset %d", tp[0], tp[1], first_offset)
            if self.store is not None:
                # Where the sources started afresh, saved at once (no sources yet, so
                # consistent whatever else is in flight): a worker killed before its
                # first periodic snapshot leaves its successor a point to replay
                # from to the committed offset, not a fresh start past events it
                # has already scored.
                self._write(tp)
            return None
        refused = self.pipeline.restore_sources(snapshot.sources)
        for why in refused:
            log.error("partition %s[%d]: %s", tp[0], tp[1], why)
        names = {str(s.get("name")) for s in snapshot.sources}
        restored = {n for n in names if n in self.pipeline.sources}
        for name in restored:
            self.pipeline.sources[name].home = tp
        self.sources_of[tp] = restored
        if self.metrics is not None:
            self.metrics.observe_restore(len(restored), len(refused), 0)
            self.metrics.observe_snapshot_time(tp[0], tp[1], snapshot.written_at)
        s = snapshot.offset
        if snapshot.anchor is not None:
            self.anchors[tp] = snapshot.anchor
        log.warning(
            "partition %s[%d]: restored %d sources from the snapshot at offset %d (consumption starts at %d)",
            tp[0], tp[1], len(restored), s, first_offset,
        )
        self.saved[tp] = s
        if s > first_offset:
            self.skip_below[tp] = s
            self.positions[tp] = s
            return None
        self.skip_below[tp] = first_offset
        self.positions[tp] = first_offset
        return (s, first_offset) if s < first_offset else None

    def refuse(self, tp: TP, snapshot: Snapshot, why: str) -> None:
        log.error("partition %s[%d]: the snapshot at offset %d is not used: %s; its sources start afresh",
                  tp[0], tp[1], snapshot.offset, why)
        if self.metrics is not None:
            self.metrics.observe_restore(0, len(snapshot.sources), 0)

    def replayed(self, tp: TP, result: BatchResult, n: int, last: tuple[int, bytes]) -> None:
        """Sources first seen in a replayed chunk of ``tp`` live there too."""
        self._home(result, [tp] * n)
        self.anchors[tp] = (last[0], zlib.crc32(last[1]))
        if self.metrics is not None:
            self.metrics.observe_restore(0, 0, n)

    # -- the live path -------------------------------------------------------------------
    def begin(self) -> None:
        self.in_flight += 1

    def abandon(self) -> None:
        """A batch that went whole to the dead-letter topic: state and outputs agree again."""
        self.in_flight = max(0, self.in_flight - 1)

    def done(self, tps: Sequence[TP], offsets: Sequence[int], result: BatchResult, values: Sequence[bytes]) -> None:
        """A batch's outputs are acknowledged: its events are in the state for good."""
        self._home(result, tps)
        # A partition's offsets rise through a batch (fetch order): its last event is its newest.
        for tp, j in {tp: j for j, tp in enumerate(tps)}.items():
            if offsets[j] >= self.positions.get(tp, 0):
                self.positions[tp] = offsets[j] + 1
                self.anchors[tp] = (offsets[j], zlib.crc32(values[j]))
        self.in_flight = max(0, self.in_flight - 1)

    def _home(self, result: BatchResult, tps: Sequence[TP]) -> None:
        sources = self.pipeline.sources
        keys = result.state_keys  # source#k for a shard of a sharded source
        # Each (source, partition) once, in the order first seen: a batch holds few of them.
        pairs = ({(keys.get(i, rec.source), tps[i]): None for i, rec in result.scores} if keys
                 else {(rec.source, tps[i]): None for i, rec in result.scores})
        for key, tp in pairs:
            state = sources.get(key)
            if state is None:
                continue
            if state.home is None:
                state.home = tp
                self.sources_of.setdefault(tp, set()).add(key)
            elif state.home != tp and key not in self._strays:
                self._strays.add(key)
                log.warning(
                    "source %r arrives on %s[%d] as well as on %s[%d]: key events by source, "
                    "or its saved state cannot follow a rebalance exactly",
                    key[:80], tp[0], tp[1], state.home[0], state.home[1],
                )

    # -- snapshots -----------------------------------------------------------------------
    def due(self) -> bool:
        return self.store is not None and self.clock() - self._last_snapshot >= self.interval

    def snapshot(self, tps: Iterable[TP] | None = None, *, final: bool = False) -> int:
        """Write the snapshots of ``tps`` (default: every ready partition); returns how many.
        Runs where the pipeline runs; writes nothing while a batch is in flight (``final``:
        the last chance, at shutdown, so say so)."""
        if self.store is None:
            return 0
        if self.in_flight:
            if final:
                log.warning("a batch was interrupted before its outputs were acknowledged: no snapshot; "
                            "the previous one and a replay will rebuild the state")
            return 0
        written = 0
        for tp in list(self.skip_below if tps is None else tps):
            if tp not in self.positions or self.saved.get(tp) == self.positions[tp]:
                continue  # nothing new since its last snapshot
            written += self._write(tp)
        self._last_snapshot = self.clock()
        return written

    def _write(self, tp: TP) -> bool:
        """The snapshot of one partition at its position; False (logged, counted) if it failed."""
        assert self.store is not None
        names = sorted(self.sources_of.get(tp, ()))
        try:
            self.store.save(
                tp[0], tp[1], offset=self.positions[tp], sources=self.pipeline.source_states(names),
                anchor=self.anchors.get(tp),
            )
        except Exception:
            log.exception("snapshot of %s[%d] failed", tp[0], tp[1])
            if self.metrics is not None:
                self.metrics.observe_snapshot("failed")
            return False
        self.saved[tp] = self.positions[tp]
        if self.metrics is not None:
            self.metrics.observe_snapshot("written")
            self.metrics.observe_snapshot_time(tp[0], tp[1], time.time())
        return True

    def forget(self, tp: TP) -> None:
        """Drop a partition and its sources without saving (a take-over that failed half-way)."""
        self.pipeline.drop_sources(self.sources_of.pop(tp, ()))
        self.skip_below.pop(tp, None)
        self.positions.pop(tp, None)
        self.anchors.pop(tp, None)
        self.saved.pop(tp, None)

    def release(self, tps: Iterable[TP]) -> None:
        """Partitions taken away: save them one last time, then forget their sources."""
        tps = [tp for tp in tps if tp in self.skip_below]
        if not tps:
            return
        self.snapshot(tps)
        for tp in tps:
            self.forget(tp)
            if self.metrics is not None:
                self.metrics.forget_snapshot(*tp)

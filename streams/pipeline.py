"""The detection pipeline shared by ``nwatch replay`` and the Kafka worker.

Raw messages in, score records, drift records and rejects out. Per source it
keeps an encoder and a :class:`detectors.monitor.SourceMonitor`. Within a
batch, events of one source are processed in arrival order: scored against the
reference as it stood before the batch, then learnt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detectors.monitor import SourceMonitor
from detectors.records import DriftRecord, Neighbour, ScoreRecord
from models.base import Encoder, Learner, Seasonal, encoder_tag
from models.errors import InvalidEvent, NonFinite, WrongDimension, WrongType
from models.events import DEFAULT_LIMITS, Event, Limits, decode_event, format_ts
from models.registry import make_encoder
from models.text import TextBackend, shared_backend
from streams.config import Settings

# Normal events carry their nearest few neighbours; anomalies carry all k,
# which is what an analyst opens first.
NEIGHBOURS_FOR_NORMAL = 3


@dataclass(frozen=True, slots=True)
class Reject:
    """An input that could not be scored: its position in the batch, the reason code and words."""

    index: int
    reason: str
    message: str


@dataclass(slots=True)
class BatchResult:
    scores: list[tuple[int, ScoreRecord]] = field(default_factory=list)  # (batch index, record)
    drifts: list[DriftRecord] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    encode_seconds: dict[str, float] = field(default_factory=dict)  # per source


@dataclass
class SourceState:
    name: str
    kind: str
    encoder: Encoder
    monitor: SourceMonitor
    tag: str

    def drift_view(self, X: np.ndarray) -> np.ndarray | None:
        """``X`` without the encoder's seasonal dimensions, for the drift test (None: all of X)."""
        if not isinstance(self.encoder, Seasonal) or not self.encoder.seasonal_dims:
            return None
        return np.delete(X, list(self.encoder.seasonal_dims), axis=1)


class Pipeline:
    """All sources of one worker (or one replay)."""

    def __init__(
        self,
        *,
        settings: Settings,
        text_backend: Callable[[], TextBackend] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.limits = limits
        self.clock = clock
        self._text_backend = text_backend or (
            lambda: shared_backend(
                model_path=settings.models.text_model_path, threads=settings.models.threads
            )
        )
        self.sources: dict[str, SourceState] = {}

    # -- sources --------------------------------------------------------------
    def _source(self, event: Event) -> SourceState:
        state = self.sources.get(event.source)
        if state is not None:
            if state.kind != event.kind:
                raise WrongType(
                    f"source {event.source[:40]!r} carries {state.kind} events, not {event.kind}",
                    field="kind",
                )
            return state
        conf = self.settings.source(event.source, event.kind)
        if conf.kind is not None and conf.kind != event.kind:
            raise WrongType(
                f"source {event.source[:40]!r} is configured for {conf.kind} events, not {event.kind}",
                field="kind",
            )
        encoder = make_encoder(
            event.kind,
            text_backend=self._text_backend,
            metric=conf.metric,
            text_cache_size=self.settings.models.text_cache_size,
        )
        monitor = SourceMonitor(metric=encoder.metric, **conf.monitor_kwargs())  # type: ignore[arg-type]
        state = SourceState(event.source, event.kind, encoder, monitor, encoder_tag(encoder))
        self.sources[event.source] = state
        return state

    # -- processing -------------------------------------------------------------
    def decode(self, raws: Sequence[bytes | str]) -> tuple[list[tuple[int, Event]], list[Reject]]:
        now = self.clock()
        events: list[tuple[int, Event]] = []
        rejects: list[Reject] = []
        for i, raw in enumerate(raws):
            try:
                events.append((i, decode_event(raw, arrival_ts=now, limits=self.limits)))
            except InvalidEvent as err:
                rejects.append(Reject(i, err.reason, str(err)))
        return events, rejects

    def process_raw(self, raws: Sequence[bytes | str]) -> BatchResult:
        events, rejects = self.decode(raws)
        result = self.process(events)
        result.rejects[:0] = rejects
        result.rejects.sort(key=lambda r: r.index)
        return result

    def process(self, events: Sequence[tuple[int, Event]]) -> BatchResult:
        """Score and learn a batch of ``(position, event)`` pairs."""
        result = BatchResult()
        groups: dict[str, list[tuple[int, Event]]] = {}
        for i, e in events:
            groups.setdefault(e.source, []).append((i, e))
        for group in groups.values():
            self._process_source(group, result)
        result.scores.sort(key=lambda t: t[0])
        return result

    def _process_source(self, group: list[tuple[int, Event]], result: BatchResult) -> None:
        accepted: list[tuple[int, Event]] = []
        state: SourceState | None = None
        for i, e in group:
            try:
                state = self._source(e)
            except InvalidEvent as err:
                result.rejects.append(Reject(i, err.reason, str(err)))
                continue
            accepted.append((i, e))
        if not accepted or state is None:
            return
        t0 = time.perf_counter()
        accepted, X = self._encode(state.encoder, accepted, result)
        learner = isinstance(state.encoder, Learner)
        warming = state.monitor.is_warming_up
        if warming and learner and accepted:
            # While warming up nothing is judged, so the encoder may learn a batch
            # before encoding it: a fresh encoder has no field slots and no scale
            # yet, and its first vectors would enter the reference as near-zeros.
            state.encoder.learn([e for _, e in accepted])
            X = state.encoder.encode([e for _, e in accepted])
        result.encode_seconds[state.name] = time.perf_counter() - t0
        if not accepted:
            return
        ids = [e.id for _, e in accepted]
        d = state.monitor.process(X, ids, drift_X=state.drift_view(X))
        if learner and not warming:
            normal = [e for (_, e), k in zip(accepted, d.learned) if k]
            if normal:
                state.encoder.learn(normal)
        scores = d.scores.tolist()
        pvals = d.p_values.tolist()
        flags = d.is_anomaly.tolist()
        warm = d.warming_up.tolist()
        dists = d.distances.tolist()
        for j, (i, e) in enumerate(accepted):
            m = len(dists[j]) if flags[j] else min(NEIGHBOURS_FOR_NORMAL, len(dists[j]))
            neighbours = tuple(
                Neighbour(nid, dist) for nid, dist in zip(d.neighbour_ids[j][:m], dists[j][:m])
            )
            result.scores.append(
                (
                    i,
                    ScoreRecord(
                        id=e.id,
                        source=e.source,
                        kind=e.kind,
                        ts=format_ts(e.ts),
                        score=scores[j],
                        p_value=pvals[j],
                        is_anomaly=flags[j],
                        warming_up=warm[j],
                        neighbours=neighbours,
                        encoder=state.tag,
                        label=e.label,
                    ),
                )
            )
        by_id = {e.id: e for _, e in accepted}
        for alarm in d.drift_alarms:
            at = by_id.get(alarm.detected_at)
            result.drifts.append(
                DriftRecord(
                    source=state.name,
                    kind=state.kind,
                    ts=format_ts(at.ts if at is not None else self.clock()),
                    encoder=state.tag,
                    **alarm.to_dict(),
                )
            )

    def _encode(
        self, encoder: Encoder, items: list[tuple[int, Event]], result: BatchResult
    ) -> tuple[list[tuple[int, Event]], np.ndarray]:
        """Encode a source's batch; an invalid event is rejected alone, the rest go on."""
        try:
            X = encoder.encode([e for _, e in items])
            good = items
        except InvalidEvent:
            # Rare: find the culprits one by one rather than losing the batch.
            rows: list[np.ndarray] = []
            good = []
            for i, e in items:
                try:
                    rows.append(encoder.encode([e])[0])
                    good.append((i, e))
                except InvalidEvent as err:
                    result.rejects.append(Reject(i, err.reason, str(err)))
            if rows:
                # A source without a fixed dimension yet takes the first event's.
                width = len(rows[0])
                for (i, _), row in zip(good, rows):
                    if len(row) != width:
                        result.rejects.append(
                            Reject(i, WrongDimension.reason, f"dimension {len(row)}, expected {width}")
                        )
                keep = [len(r) == width for r in rows]
                good = [g for g, k in zip(good, keep) if k]
                rows = [r for r, k in zip(rows, keep) if k]
            X = np.stack(rows) if rows else np.zeros((0, encoder.dim or 0), np.float32)
        finite = np.isfinite(X).all(axis=1)
        if not finite.all():
            for (i, _), ok in zip(good, finite):
                if not ok:
                    result.rejects.append(Reject(i, NonFinite.reason, "the encoded vector is not finite"))
            good = [g for g, ok in zip(good, finite) if ok]
            X = X[finite]
        return good, X

    def preload(self) -> None:
        """Load the text model now (one embedding of a short text) rather than on first use."""
        self._text_backend().embed(["warm up"])

    def summary(self) -> dict[str, Any]:
        return {
            name: {
                "kind": s.kind,
                "encoder": s.tag,
                "events": s.monitor.events_seen,
                "anomalies": s.monitor.anomalies,
                "reference_size": s.monitor.detector.size,
                "warming_up": s.monitor.is_warming_up,
            }
            for name, s in self.sources.items()
        }

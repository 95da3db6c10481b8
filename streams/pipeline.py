"""The detection pipeline shared by ``nwatch replay`` and the Kafka worker.

Raw messages in, score records, drift records and rejects out. Per source it
keeps an encoder and a :class:`detectors.monitor.SourceMonitor`.

Learning goes by blocks of the source's own events (``learn_block``), not by
batches: an event is scored as soon as it arrives, against the reference and
the encoder statistics as they stood at the start of its block; at the end of
the block the reference, the calibration, the drift monitor and the encoder
learn the block. A result therefore depends only on the sequence of a
source's events, never on how a consumer happened to batch them: ``nwatch
replay`` of a file gives the Kafka worker's results, and a worker restored
from a snapshot gives what an uninterrupted one would have given.

A source's state (:meth:`SourceState.get_state`) is plain JSON plus arrays and
includes the block in progress, its de-duplication window and its event-time
watermark.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import compress
from operator import itemgetter
from typing import Any

import numpy as np

from detectors.monitor import SourceMonitor
from detectors.shards import (
    BlockSummary,
    MergeCheckpoint,
    MergedDriftMonitor,
    ShardNull,
    ShardSummarizer,
    block_key,
    shard_of,
)
from detectors.records import DriftRecord, Neighbour, ScoreRecord

from models.base import (
    Encoder,
    Learner,
    Named,
    NumberTaker,
    Prefetcher,
    Rebasing,
    Seasonal,
    State,
    Stateful,
    encoder_tag,
)
from models.errors import (
    DuplicateId,
    FutureTimestamp,
    InvalidEvent,
    LateEvent,
    NonFinite,
    StateMismatch,
    WrongDimension,
    WrongType,
)
from models.events import (
    DEFAULT_LIMITS,
    Event,
    Limits,
    NumberRows,
    decode_batch,
    event_has_ts,
    event_id,
    event_kind,
    event_from_state,
    event_to_state,
    format_ts,
)
from models.registry import make_encoder
from models.text import TextBackend, shared_backend
from streams.config import Settings, SourceSettings
from streams.heap import HeapTrimmer, load_malloc_trim

# Saved source state carries this; a snapshot of another layout is refused.
STATE_FORMAT = 1

# Normal events carry their nearest few neighbours; anomalies carry all k,
# which is what an analyst opens first.
NEIGHBOURS_FOR_NORMAL = 3

# Neighbour from an (id, distance) pair by tuple's own constructor: a named
# tuple's __new__ is Python code, and score records carry 3 to 10 per event.
_neighbour = partial(tuple.__new__, Neighbour)
_score_record = partial(tuple.__new__, ScoreRecord)


class RecentIds:
    """A source's recent event ids, oldest first: the dedup window.

    A set for the membership test and a list for the order, so that a batch
    of ids goes in, and the oldest go out, by a few calls over the batch
    rather than an ``OrderedDict`` insertion or ``popitem`` per id (~2.5 % of
    a tabular pipeline). Iterates, and saves, oldest first, as that dict did.
    """

    __slots__ = ("_ids", "_order", "_start")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._order: list[str] = list(dict.fromkeys(ids))
        self._ids: set[str] = set(self._order)
        self._start = 0  # self._order[self._start:] are the ids held, oldest first

    def __contains__(self, eid: object) -> bool:
        return eid in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order[self._start :])

    def add(self, eid: str) -> None:
        """Remember a new id (one not held)."""
        self._ids.add(eid)
        self._order.append(eid)

    def add_new(self, ids: Sequence[str]) -> bool:
        """Remember ``ids`` if they are distinct and none is held; else False, nothing changed."""
        new = set(ids)
        if len(new) != len(ids) or not self._ids.isdisjoint(new):
            return False
        self._ids |= new
        self._order += ids
        return True

    def discard(self, eid: str) -> None:
        """Forget one id (an event refused after it was admitted may come again, corrected)."""
        if eid in self._ids:
            self._ids.remove(eid)
            del self._order[self._order.index(eid, self._start)]

    def keep_last(self, window: int) -> None:
        """Forget the oldest ids past ``window``."""
        excess = len(self._ids) - window
        if excess <= 0:
            return
        stop = self._start + excess
        self._ids.difference_update(self._order[self._start : stop])
        if stop > len(self._ids):  # the forgotten head outgrew what is held: drop it
            del self._order[:stop]
            stop = 0
        self._start = stop


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
    # Sharded sources: the state (``source#k``) of each scored event whose state is not
    # named after its source, by batch index; and the shards' summaries to publish.
    state_keys: dict[int, str] = field(default_factory=dict)
    summaries: list[tuple[BlockSummary | ShardNull, str, str]] = field(default_factory=list)  # (summary, kind, encoder)


@dataclass
class Pending:
    """The block in progress: events scored since the last learning step, with what scoring found."""

    events: list[Event] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)  # (rows, dim) arrays, one per scored segment
    scores: list[float] = field(default_factory=list)
    flags: list[bool] = field(default_factory=list)
    keep: list[bool] = field(default_factory=list)
    warming: bool = True  # the monitor's state at the start of the block
    # the monitor's component scores, with forest_trees (SourceMonitor.commit):
    # (rows, 3) arrays, one per scored segment
    components: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events)

    def clear(self) -> None:
        self.events.clear()
        self.vectors.clear()
        self.scores.clear()
        self.flags.clear()
        self.keep.clear()
        self.components.clear()


def name_fields(explanation: dict, names: list[str]) -> None:
    """Add ``top_fields``, the names of the explanation's ``top_dimensions`` (in place)."""
    dims = explanation.get("top_dimensions")
    if dims:
        explanation["top_fields"] = [names[j] if 0 <= j < len(names) else f"#{j}" for j in dims]


@dataclass
class SourceState:
    name: str
    kind: str
    encoder: Encoder
    monitor: SourceMonitor
    tag: str
    conf: SourceSettings = field(default_factory=SourceSettings)
    pending: Pending = field(default_factory=Pending)
    seen: RecentIds = field(default_factory=RecentIds)  # recent ids, oldest first
    watermark: float | None = None  # newest event time seen (events with their own ts only)
    home: tuple[str, int] | None = None  # the input partition its events arrive on (set by the worker)
    summarizer: ShardSummarizer | None = None  # one shard of a sharded source (name ``source#k``)
    # What the encoder is, asked once: an isinstance check against a runtime
    # Protocol walks its members (~5% of the learning step of a tabular source).
    is_learner: bool = field(init=False)
    is_prefetcher: bool = field(init=False)
    is_rebasing: bool = field(init=False)
    takes_numbers: bool = field(init=False)  # encode_numbers: the decoder's NumberRows
    _drift_columns: slice | tuple[int, ...] | None = field(init=False)  # kept (slice) or dropped (tuple)

    def __post_init__(self) -> None:
        self.is_learner = isinstance(self.encoder, Learner)
        self.is_prefetcher = isinstance(self.encoder, Prefetcher)
        self.is_rebasing = isinstance(self.encoder, Rebasing)
        self.takes_numbers = isinstance(self.encoder, NumberTaker)
        seasonal = tuple(self.encoder.seasonal_dims) if isinstance(self.encoder, Seasonal) else ()
        dim = self.encoder.dim
        if not seasonal:
            self._drift_columns = None
        elif dim is not None and sorted(seasonal) == list(range(dim - len(seasonal), dim)):
            self._drift_columns = slice(0, dim - len(seasonal))  # the last columns: a view
        else:
            self._drift_columns = seasonal

    @property
    def source(self) -> str:
        """The user's source name (``name`` is ``source#k`` for a shard)."""
        return self.summarizer.source if self.summarizer is not None else self.name

    def drift_view(self, X: np.ndarray) -> np.ndarray | None:
        """``X`` without the encoder's seasonal dimensions, for the drift test (None: all of X)."""
        cols = self._drift_columns
        if cols is None:
            return None
        return X[:, cols] if isinstance(cols, slice) else np.delete(X, list(cols), axis=1)

    def drift_dim_names(self) -> list[str] | None:
        """A name per column of the drift test's vectors (the encoder's, less the seasonal
        ones), or None for an encoder whose dimensions have no names (embeddings)."""
        if not isinstance(self.encoder, Named):
            return None
        names = self.encoder.dim_names()
        cols = self._drift_columns
        if cols is None:
            return names
        if isinstance(cols, slice):
            return names[cols]
        dropped = set(cols)
        return [name for j, name in enumerate(names) if j not in dropped]

    def admit(self, e: Event, *, now: float, max_future: float) -> None:
        """Refuse a repeated id, or an event time too far ahead of ``now`` or too far behind the
        source's newest event time; else remember the event."""
        window = self.conf.dedup_window
        if window:
            if e.id in self.seen:
                raise DuplicateId(f"id {e.id[:80]!r} was already seen in source {self.name[:40]!r}", field="id")
        if e.has_ts:
            if e.ts > now + max_future:
                raise FutureTimestamp(
                    f"event time {format_ts(e.ts)} is {e.ts - now:.0f} s ahead of arrival "
                    f"(at most {max_future:.0f} s)",
                    field="ts",
                )
            lateness = self.conf.max_lateness
            if lateness is not None and self.watermark is not None and e.ts < self.watermark - lateness:
                raise LateEvent(
                    f"event time {format_ts(e.ts)} is {self.watermark - e.ts:.0f} s behind the newest of "
                    f"source {self.name[:40]!r} (at most {lateness:.0f} s)",
                    field="ts",
                )
            if self.watermark is None or e.ts > self.watermark:
                self.watermark = e.ts
        if window:
            self.seen.add(e.id)
            self.seen.keep_last(window)

    def admit_all(self, events: list[Event]) -> bool:
        """:meth:`admit` of every event at once, if none can be refused: events of this
        source's kind without an event time, whose ids are new and distinct. False (and
        nothing changed) otherwise: the caller admits them one by one."""
        kind = self.kind
        if True in map(event_has_ts, events) or any(k != kind for k in map(event_kind, events)):
            return False
        window = self.conf.dedup_window
        if window:
            if not self.seen.add_new(list(map(event_id, events))):
                return False
            self.seen.keep_last(window)
        return True

    def get_state(self) -> State:
        p = self.pending
        width = self.encoder.dim or (p.vectors[0].shape[1] if p.vectors else 0)
        return {
            "format": STATE_FORMAT,
            "name": self.name,
            "kind": self.kind,
            "encoder_tag": self.tag,
            "settings": self.conf.model_dump(mode="json", exclude={"kind", "metric", "shards"}),
            "encoder": self.encoder.get_state() if isinstance(self.encoder, Stateful) else None,
            "monitor": self.monitor.get_state(),
            "pending": {
                "events": [event_to_state(e) for e in p.events],
                "vectors": np.concatenate(p.vectors) if p.vectors else np.zeros((0, width), np.float32),
                "scores": np.asarray(p.scores, np.float64),
                "flags": np.asarray(p.flags, bool),
                "keep": np.asarray(p.keep, bool),
                "warming": p.warming,
                "components": np.concatenate(p.components) if p.components else np.zeros((0, 3)),
            },
            "seen": list(self.seen),
            "watermark": self.watermark,
            "home": None if self.home is None else list(self.home),
        } | ({} if self.summarizer is None else {"shard": self.summarizer.get_state()})

    def set_state(self, state: State) -> None:
        """Load saved state; :class:`StateMismatch` (nothing changed) if it was written by another
        encoder version, for other settings, or in another layout: never mixed in."""
        if state.get("format") != STATE_FORMAT:
            raise StateMismatch(f"source {self.name!r}: saved state format {state.get('format')!r}, expected {STATE_FORMAT}")
        if state["kind"] != self.kind or state["encoder_tag"] != self.tag:
            raise StateMismatch(
                f"source {self.name!r}: saved by encoder {state['encoder_tag']} ({state['kind']}), "
                f"this worker runs {self.tag} ({self.kind}); the saved state is not used"
            )
        mine = self.conf.model_dump(mode="json", exclude={"kind", "metric", "shards"})
        changed = sorted(k for k in mine if state["settings"].get(k) != mine[k])
        if changed:
            raise StateMismatch(
                f"source {self.name!r}: saved with other settings ({', '.join(changed)}); the saved state is not used"
            )
        if isinstance(self.encoder, Stateful) and state["encoder"] is not None:
            self.encoder.set_state(state["encoder"])
        self.monitor.set_state(state["monitor"])
        p = state["pending"]
        self.pending = Pending(
            events=[event_from_state(e) for e in p["events"]],
            vectors=[np.asarray(p["vectors"], np.float32)] if len(p["vectors"]) else [],
            scores=[float(x) for x in p["scores"]],
            flags=[bool(x) for x in p["flags"]],
            keep=[bool(x) for x in p["keep"]],
            warming=bool(p["warming"]),
            # absent from states saved before forest_trees: commit computes them again
            components=([np.asarray(p["components"], np.float64).reshape(-1, 3)]
                        if len(p.get("components", ())) else []),
        )
        self.seen = RecentIds(state["seen"])
        self.watermark = None if state["watermark"] is None else float(state["watermark"])
        self.home = None if state["home"] is None else (str(state["home"][0]), int(state["home"][1]))
        if self.summarizer is not None:
            if "shard" not in state:
                raise StateMismatch(f"source {self.name!r}: saved without its shard summaries")
            self.summarizer.set_state(state["shard"])


class Pipeline:
    """All sources of one worker (or one replay)."""

    def __init__(
        self,
        *,
        settings: Settings,
        text_backend: Callable[[], TextBackend] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        merge_shards: bool = True,
    ) -> None:
        self.settings = settings
        # True (replay): the shards' summaries are merged here and the merged drift records
        # come out of the pipeline; False (the Kafka worker): they are left in
        # ``BatchResult.summaries`` for the shard-summaries topic, merged by one worker.
        self.merge_shards = merge_shards
        self.mergers: dict[str, tuple[MergedDriftMonitor, str, str]] = {}  # source -> (monitor, kind, encoder)
        # source -> [next window of the last checkpoint, first window not tombstoned yet]
        self._merge_marks: dict[str, list[int]] = {}
        self._shard_counts: dict[str, int] = {}
        self.limits = limits
        self.clock = clock
        self._text_backend = text_backend or (
            lambda: shared_backend(
                model_path=settings.models.text_model_path,
                threads=settings.models.threads,
                backend=settings.models.text_backend,
                export_dir=settings.models.export_dir,
            )
        )
        self.sources: dict[str, SourceState] = {}
        self.heap_trim = HeapTrimmer(every=settings.heap_trim_events, trim=load_malloc_trim())

    # -- sources --------------------------------------------------------------
    def state_key(self, event: Event) -> str:
        """The state an event belongs to: its source, or ``source#k`` for shard k of a sharded source."""
        n = self._shard_counts.get(event.source)
        if n is None:
            n = self._shard_counts[event.source] = self.settings.source(event.source, event.kind).shards
        return event.source if n == 1 else f"{event.source}#{shard_of(event.id, n)}"

    def _source(self, event: Event) -> SourceState:
        key = self.state_key(event)
        state = self.sources.get(key)
        if state is not None:
            if state.kind != event.kind:
                raise WrongType(
                    f"source {event.source[:40]!r} carries {state.kind} events, not {event.kind}",
                    field="kind",
                )
            return state
        state = self.new_source(key, event.kind)
        self.sources[key] = state
        return state

    def new_source(self, name: str, kind: str) -> SourceState:
        """A fresh source of this kind with its effective settings (not yet registered).

        ``name`` may be ``source#k``, shard k of a source configured with more than k shards.
        """
        source, shard = name, None
        base, _, k = name.rpartition("#")
        if base and k.isdigit():
            n = self.settings.source(base, kind).shards
            if int(k) < n:
                source, shard = base, int(k)
        conf = self.settings.source(source, kind)
        if conf.kind is not None and conf.kind != kind:
            raise WrongType(
                f"source {name[:40]!r} is configured for {conf.kind} events, not {kind}",
                field="kind",
            )
        encoder = make_encoder(
            kind,
            text_backend=self._text_backend,
            metric=conf.metric,
            text_cache_size=self.settings.models.text_cache_size,
        )
        monitor = SourceMonitor(metric=encoder.metric, **conf.monitor_kwargs(kind))  # type: ignore[arg-type]
        state = SourceState(name, kind, encoder, monitor, encoder_tag(encoder), conf=conf)
        if shard is not None and conf.drift:
            state.summarizer = ShardSummarizer(source=source, shard=shard, shards=conf.shards,
                                               block_size=conf.drift_block)
        return state

    def source_states(self, names: Iterable[str]) -> list[State]:
        """Saved state of the named sources (those that exist)."""
        return [self.sources[n].get_state() for n in names if n in self.sources]

    def restore_sources(self, states: Iterable[State]) -> list[str]:
        """Load saved sources, replacing any of the same name. Returns the refusals, in words:
        a source whose state does not fit (another encoder version, other settings) is left
        out whole, never mixed in, and starts afresh when its next event comes."""
        refused: list[str] = []
        for st in states:
            name = str(st.get("name"))
            try:
                fresh = self.new_source(name, str(st.get("kind")))
                fresh.set_state(st)
            except (StateMismatch, InvalidEvent, KeyError, ValueError, TypeError) as err:
                refused.append(f"{type(err).__name__}: {err}")
                self.sources.pop(name, None)
                continue
            self.sources[name] = fresh
        return refused

    def drop_sources(self, names: Iterable[str]) -> None:
        for n in list(names):
            self.sources.pop(n, None)

    # -- processing -------------------------------------------------------------
    def decode(self, raws: Sequence[bytes | str]) -> tuple[list[tuple[int, Event]], list[Reject]]:
        events, rejects, _ = self.decode_batch(raws)
        return events, rejects

    def decode_batch(
        self, raws: Sequence[bytes | str]
    ) -> tuple[list[tuple[int, Event]], list[Reject], NumberRows | None]:
        """:meth:`decode`, and the batch's numbers when it is one of common transactions
        (:func:`models.events.decode_batch`)."""
        events, errors, numbers = decode_batch(raws, arrival_ts=self.clock(), limits=self.limits)
        return events, [Reject(i, err.reason, str(err)) for i, err in errors], numbers

    def process_raw(self, raws: Sequence[bytes | str]) -> BatchResult:
        events, rejects, numbers = self.decode_batch(raws)
        result = self.process(events, numbers=numbers)
        result.rejects[:0] = rejects
        result.rejects.sort(key=lambda r: r.index)
        self.heap_trim.count(len(raws))
        return result

    def process(self, events: Sequence[tuple[int, Event]], *, numbers: NumberRows | None = None) -> BatchResult:
        """Score and learn a batch of ``(position, event)`` pairs (``numbers``: the fields of the
        batch's events by position, as :func:`models.events.decode_batch` read them)."""
        result = BatchResult()
        groups: dict[str, list[tuple[int, Event]]] = {}
        for i, e in events:
            key = self.state_key(e)
            groups.setdefault(key, []).append((i, e))
            if key != e.source:
                result.state_keys[i] = key
        for group in groups.values():
            self._process_source(group, result, numbers)
        result.scores.sort(key=itemgetter(0))
        return result

    def _process_source(
        self, group: list[tuple[int, Event]], result: BatchResult, numbers: NumberRows | None = None
    ) -> None:
        accepted: list[tuple[int, Event]] = []
        state: SourceState | None = None
        try:
            state = self._source(group[0][1])
        except InvalidEvent:
            pass  # refused again below, with its position
        if state is not None and state.admit_all([e for _, e in group]):
            accepted, group = group, []
        now = self.clock()
        max_future = self.limits.max_future_seconds
        for i, e in group:
            try:
                # One state per group (its events share a state key); _source
                # again only to refuse an event of another kind.
                if state is None or e.kind != state.kind:
                    state = self._source(e)
                state.admit(e, now=now, max_future=max_future)
            except InvalidEvent as err:
                result.rejects.append(Reject(i, err.reason, str(err)))
                continue
            accepted.append((i, e))
        if not accepted or state is None:
            return
        t0 = time.perf_counter()
        block = state.conf.learn_block
        if len(accepted) > block - len(state.pending) and state.is_prefetcher:
            # The batch is scored in several segments; their new texts go to
            # the model together, once. A bad event is left to _encode to reject.
            try:
                state.encoder.prefetch([e for _, e in accepted])
            except InvalidEvent:
                pass
        while accepted:
            room = block - len(state.pending)
            segment, accepted = accepted[:room], accepted[room:]
            self._score(state, segment, result, numbers)
            if len(state.pending) >= block:
                self._learn(state, result)
        result.encode_seconds[state.name] = time.perf_counter() - t0

    def _score(
        self, state: SourceState, items: list[tuple[int, Event]], result: BatchResult,
        numbers: NumberRows | None = None,
    ) -> None:
        """Score events of the block in progress; they join the block, nothing learns yet."""
        if numbers is not None and state.takes_numbers:
            # the rows of these events (by batch position): a slice when they are consecutive
            first, last = items[0][0], items[-1][0]
            rows = (numbers.values[first : last + 1] if last - first == len(items) - 1
                    else numbers.values[[i for i, _ in items]])
            numbers = NumberRows(numbers.names, rows)
        else:
            numbers = None
        good, X = self._encode(state.encoder, items, result, numbers)
        if len(good) < len(items):
            # An event the encoder refused may come again corrected, with its id.
            kept = {i for i, _ in good}
            for i, e in items:
                if i not in kept:
                    state.seen.discard(e.id)
        items = good
        if not items:
            return
        d = state.monitor.score(X)
        p = state.pending
        if not p:
            p.warming = bool(state.monitor.is_warming_up)
        scores = d.scores.tolist()
        flags = d.is_anomaly.tolist()
        p.events.extend(e for _, e in items)
        p.vectors.append(X)
        p.scores.extend(scores)
        p.flags.extend(flags)
        p.keep.extend(d.learned.tolist())
        if d.components is not None:
            p.components.append(d.components)
        pvals = d.p_values.tolist()
        warm = d.warming_up.tolist()
        # the distances a normal event carries, and (if any is flagged) all k
        near = d.distances[:, :NEIGHBOURS_FOR_NORMAL].tolist()
        every = d.distances.tolist() if True in flags else near
        tag = state.tag
        append = result.scores.append
        last_ts, stamp = None, ""
        # One pass, tuple constructors, the event unpacked at once: this loop
        # runs per event. zip stops at the distances: the ids need no slicing.
        for (i, (eid, kind, source, ts, _, label, _)), score, pv, flag, w, nd, full, ni in zip(
            items, scores, pvals, flags, warm, near, every, d.neighbour_ids
        ):
            if ts != last_ts:  # a batch without event times shares its arrival time
                last_ts, stamp = ts, format_ts(ts)
            neighbours = tuple(map(_neighbour, zip(ni, full if flag else nd)))
            append((i, _score_record((eid, source, kind, stamp, score, pv, flag, w, neighbours, tag, label))))

    def _learn(self, state: SourceState, result: BatchResult) -> None:
        """End of a block: the encoder, the reference, the calibration and the drift monitor learn it."""
        p = state.pending
        if not p:
            return
        events = list(p.events)
        X = np.concatenate(p.vectors)
        keep = np.asarray(p.keep, bool)
        learner = state.is_learner
        frame = state.encoder.frame if state.is_rebasing else None  # type: ignore[attr-defined]
        reencoded = False
        if learner and p.warming:
            # While warming up nothing is judged, so the encoder learns the block
            # first and the reference gets the block encoded with what it learnt:
            # a fresh encoder has no field slots and no scale yet, and its first
            # vectors would enter the reference as near-zeros.
            state.encoder.learn(events)
            try:
                again = state.encoder.encode(events)
                if again.shape == X.shape and np.isfinite(again).all():
                    X, reencoded = again, True
            except InvalidEvent:
                pass
        elif learner:
            normal = list(compress(events, p.keep))  # the list, not the array: no NumPy bools
            if normal:
                state.encoder.learn(normal)
        drift_X = state.drift_view(X)
        if frame is not None and state.encoder.frame != frame:  # type: ignore[attr-defined]
            # The scaler moved: the drift monitor's rows follow, and this block
            # goes to it in the new frame too (unless just encoded in it).
            move = partial(state.encoder.rebase, frame=frame)  # type: ignore[attr-defined]
            view = X if drift_X is None else drift_X
            if state.monitor.drift_monitor is not None and move(view[:0]) is not None:
                state.monitor.rebase_drift(move)
                if not reencoded:
                    drift_X = move(view)
        ids = list(map(event_id, events))
        components = np.concatenate(p.components) if p.components else None
        if components is not None and len(components) != len(events):
            components = None
        alarms = state.monitor.commit(
            X, ids, np.asarray(p.scores), np.asarray(p.flags, bool), keep, drift_X=drift_X,
            components=components,
        )
        p.clear()
        if state.summarizer is not None:
            view = state.drift_view(X)
            self._summarise(state, X if view is None else view, events, result)
            return  # a shard's own alarms only drive its adoption; the source's drift is the merged test
        if not alarms:
            return
        by_id = {e.id: e for e in events}
        names = state.drift_dim_names()
        for alarm in alarms:
            at = by_id.get(alarm.detected_at)
            if names is not None:
                name_fields(alarm.explanation, names)
            result.drifts.append(
                DriftRecord(
                    source=state.name,
                    kind=state.kind,
                    ts=format_ts(at.ts if at is not None else self.clock()),
                    encoder=state.tag,
                    **alarm.to_dict(),
                )
            )

    def _summarise(self, state: SourceState, X: np.ndarray, events: list[Event], result: BatchResult) -> None:
        """A shard's new block summaries (and its null, after a new drift reference)."""
        summ = state.summarizer
        assert summ is not None
        dm = state.monitor.drift_monitor
        out: list[BlockSummary | ShardNull] = []
        if dm is not None:
            null = summ.null(dm.null_sample, dm.references_established)
            if null is not None:
                out.append(null)
        out += summ.update(X, [e.id for e in events], [e.ts for e in events])
        for msg in out:
            if self.merge_shards:
                result.drifts += self.merge(msg, state.kind, state.tag)
            else:
                result.summaries.append((msg, state.kind, state.tag))

    def merge(self, msg: BlockSummary | ShardNull | MergeCheckpoint, kind: str, encoder: str) -> list[DriftRecord]:
        """Feed one shard summary to its source's merged drift monitor; returns its drift records.

        The worker holding the shard-summaries partition calls this for every
        summary it reads. A checkpoint ahead of the monitor replaces its state.
        """
        entry = self.mergers.get(msg.source)
        if entry is None:
            conf = self.settings.source(msg.source, kind)
            # The configured count: summaries of an earlier configuration are refused, not mixed in.
            monitor = MergedDriftMonitor(
                source=msg.source, shards=conf.shards if conf.shards > 1 else msg.shards,
                block_size=conf.drift_block,
                reference_size=conf.drift_reference_size, alpha=conf.drift_alpha,
                cooldown=conf.drift_cooldown, policy=conf.drift_policy,
            )
            entry = self.mergers[msg.source] = (monitor, kind, encoder)
        monitor = entry[0]
        self.mergers[msg.source] = (monitor, kind, encoder)
        if isinstance(msg, MergeCheckpoint):
            alarms = monitor.restore(msg)
            mark = self._merge_marks.setdefault(msg.source, [msg.next_window, msg.tombstoned_to])
            mark[0], mark[1] = max(mark[0], msg.next_window), max(mark[1], msg.tombstoned_to)
        elif isinstance(msg, ShardNull):
            alarms = monitor.add_null(msg)
        else:
            # the oldest block still in the topic: windows count and tombstones start there
            self._merge_marks.setdefault(msg.source, [msg.seq, msg.seq])
            alarms = monitor.add(msg)
        return [
            DriftRecord(source=msg.source, kind=kind, ts=format_ts(a.ts), encoder=encoder, **a.to_dict())
            for a in alarms
        ]

    def merge_checkpoints(self, every: int) -> list[tuple[MergeCheckpoint, list[str], str, str]]:
        """Checkpoints due (``every`` windows merged since the last), with the block keys they cover.

        Returns ``(checkpoint, tombstone keys, kind, encoder)`` per source due. The
        caller writes the checkpoint first and the tombstones (null values under
        those keys) after its acknowledgement: compaction may then drop the blocks.
        At most ``10 * every`` windows are tombstoned at once (a topic written
        before checkpoints existed is cleaned over several checkpoints).
        """
        out: list[tuple[MergeCheckpoint, list[str], str, str]] = []
        for source, (monitor, kind, encoder) in self.mergers.items():
            mark, nxt = self._merge_marks.get(source), monitor.next_window
            if mark is None or nxt is None or nxt - mark[0] < every:
                continue
            start = mark[1]
            stop = min(nxt, start + 10 * every)
            keys = [block_key(source, k, seq) for seq in range(start, stop) for k in range(monitor.shards)]
            checkpoint = monitor.checkpoint(tombstoned_to=stop)
            assert checkpoint is not None
            mark[0], mark[1] = nxt, stop
            out.append((checkpoint, keys, kind, encoder))
        return out

    def flush(self) -> BatchResult:
        """Learn every source's incomplete block now (the end of a replay: no more events come)."""
        result = BatchResult()
        for state in self.sources.values():
            self._learn(state, result)
        return result

    def _encode(
        self, encoder: Encoder, items: list[tuple[int, Event]], result: BatchResult,
        numbers: NumberRows | None = None,
    ) -> tuple[list[tuple[int, Event]], np.ndarray]:
        """Encode a source's batch; an invalid event is rejected alone, the rest go on.
        ``numbers``: the items' fields, a row each, for an encoder that takes them."""
        try:
            events = [e for _, e in items]
            X = encoder.encode(events) if numbers is None else encoder.encode_numbers(events, numbers)  # type: ignore[attr-defined]
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
        # .all() by the ufunc itself: the method's Python wrapper costs more than the check
        finite = np.logical_and.reduce(np.isfinite(X), axis=1)
        if not np.logical_and.reduce(finite):
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

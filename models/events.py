"""Events in: decoding and validating the JSON contract of ``DESIGN.md``.

:func:`decode_event` turns raw message bytes (or a JSONL line) into an
:class:`Event`, or raises one :class:`~models.errors.InvalidEvent` subclass that
names the reason. Nothing here performs I/O; the stream shell calls it at the edge.

>>> e = decode_event(b'{"id": "t1", "kind": "vector", "vector": [1, 2.5]}', arrival_ts=0.0)
>>> e.source, e.kind, e.payload.tolist()
('vector', 'vector', [1.0, 2.5])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache, partial
from itertools import chain, repeat
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np
import orjson

from models.errors import (
    BadEncoding,
    BadTimestamp,
    EmptyPayload,
    InvalidEvent,
    MissingField,
    NonFinite,
    NotAnObject,
    NotJSON,
    Oversized,
    UnknownField,
    UnknownKind,
    WrongType,
)

KINDS = ("transaction", "log", "text", "audio", "vector")
PAYLOAD_FIELDS = {
    "transaction": ("fields",),
    "log": ("line",),
    "text": ("text",),
    "audio": ("mfcc", "samples", "sample_rate"),
    "vector": ("vector",),
}
COMMON_FIELDS = frozenset({"id", "source", "kind", "ts", "label"})
_ALLOWED = {kind: COMMON_FIELDS | set(fields) for kind, fields in PAYLOAD_FIELDS.items()}


@dataclass(frozen=True, slots=True)
class Limits:
    """Input size caps. Each guards memory or CPU against one hostile message."""

    max_bytes: int = 1_048_576  # one Kafka message at the broker's default max.message.bytes
    max_text_chars: int = 20_000  # MiniLM reads 256 tokens; longer text only costs tokenising time
    max_fields: int = 256
    max_vector_dim: int = 4096
    max_mfcc_frames: int = 20_000
    max_mfcc_coeffs: int = 128
    max_samples: int = 48_000 * 30  # 30 s at 48 kHz
    max_id_chars: int = 512
    # Event time may run ahead of arrival by clock skew, not by an hour: an
    # event from the future would hold its source's lateness watermark hostage.
    # (Checked by the pipeline, which knows the arrival time.)
    max_future_seconds: float = 3600.0


DEFAULT_LIMITS = Limits()


class Event(NamedTuple):
    """A validated event. ``payload`` depends on the kind.

    transaction: ``dict[str, float | str]`` (bools as 0/1 floats); log, text: ``str``;
    audio: ``("mfcc", float32 (frames, coeffs))`` or ``("samples", float32 (n,), sample_rate)``;
    vector: float32 ``(dim,)``.

    Immutable, and a named tuple rather than a frozen dataclass: one is made
    per message decoded, and a frozen dataclass sets each of its seven fields
    through ``object.__setattr__`` (~1 us, against ~0.3 us by tuple's own
    constructor).
    """

    id: str
    kind: str
    source: str
    ts: float  # epoch seconds (event time, or arrival time when the event has none)
    payload: Any
    label: int | None = None
    has_ts: bool = False


_new_event = partial(tuple.__new__, Event)
# Getters of an Event's fields by position (the tuple's own item access, for map()
# over a batch: faster than attribute access in a lambda).
event_id, event_kind, event_has_ts = (itemgetter(Event._fields.index(f)) for f in ("id", "kind", "has_ts"))


def decode_event(
    raw: bytes | str, *, arrival_ts: float, limits: Limits = DEFAULT_LIMITS
) -> Event:
    """Decode one message value or JSONL line into an :class:`Event`.

    Raises
    ------
    InvalidEvent
        A subclass naming the reason: ``bad_encoding``, ``oversized``, ``not_json``,
        ``not_an_object``, ``missing_field``, ``wrong_type``, ``unknown_kind``,
        ``unknown_field``, ``empty_payload``, ``non_finite``, ``bad_timestamp``.
    """
    if len(raw) > limits.max_bytes:
        raise Oversized(f"message of {len(raw)} bytes exceeds the cap of {limits.max_bytes}")
    try:
        # orjson reads bytes itself (and refuses invalid UTF-8); the slow path
        # below only names what is wrong.
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        if isinstance(raw, (bytes, bytearray, memoryview)):
            try:
                raw = bytes(raw).decode("utf-8")
            except UnicodeDecodeError as bad:
                raise BadEncoding(f"not valid UTF-8: {bad.reason} at byte {bad.start}") from None
        _raise_json_error(raw, err)
    return _event(obj, arrival_ts, limits, True)


class NumberRows(NamedTuple):
    """The fields of transaction events as one matrix, read while they were decoded: every
    event's ``fields`` has these ``names`` in this order and a float for each; row ``i`` of
    ``values`` (float64, finite) holds the values of event ``i``."""

    names: tuple[str, ...]
    values: np.ndarray


def decode_batch(
    raws: Sequence[bytes | str], *, arrival_ts: float, limits: Limits = DEFAULT_LIMITS
) -> tuple[list[tuple[int, Event]], list[tuple[int, InvalidEvent]], NumberRows | None]:
    """:func:`decode_events`, and for a batch of common transaction events whose fields share
    their names and order, those fields as :class:`NumberRows` (row ``i``: the message at
    position ``i``; None for any other batch): an encoder can take its numbers from there
    instead of walking every payload again."""
    common = _common_transactions(raws, arrival_ts, limits)
    if common is not None:
        return common[0], [], common[1]
    return (*_decode_each(raws, arrival_ts, limits), None)


def decode_events(
    raws: Sequence[bytes | str], *, arrival_ts: float, limits: Limits = DEFAULT_LIMITS
) -> tuple[list[tuple[int, Event]], list[tuple[int, InvalidEvent]]]:
    """:func:`decode_event` over a batch: ``(position, event)`` pairs and ``(position, error)`` pairs.

    The same events and the same errors. The common transaction event (numbers
    only, an id and a source within their caps, no label) is checked in line,
    here; anything else goes through :func:`_event`'s checks in their order,
    which name what is wrong (~3.2 -> ~1.8 us per 9-field shuttle event).
    """
    events, errors, _ = decode_batch(raws, arrival_ts=arrival_ts, limits=limits)
    return events, errors


def _decode_each(
    raws: Sequence[bytes | str], arrival_ts: float, limits: Limits
) -> tuple[list[tuple[int, Event]], list[tuple[int, InvalidEvent]]]:
    """:func:`decode_events` message by message."""
    events: list[tuple[int, Event]] = []
    errors: list[tuple[int, InvalidEvent]] = []
    append, loads, new = events.append, orjson.loads, _new_event
    allowed, floats = _ALLOWED["transaction"], _FLOATS
    max_bytes, max_id, max_fields = limits.max_bytes, limits.max_id_chars, limits.max_fields
    for i, raw in enumerate(raws):
        try:
            obj = loads(raw) if len(raw) <= max_bytes else None
        except orjson.JSONDecodeError:
            obj = None
        try:
            if type(obj) is not dict:
                # not JSON, too large, or not an object: decode_event names which
                append((i, decode_event(raw, arrival_ts=arrival_ts, limits=limits)))
                continue
            if obj.get("kind") == "transaction" and obj.keys() <= allowed and obj.get("label") is None:
                eid, source, fields = obj.get("id"), obj.get("source", "transaction"), obj.get("fields")
                if (
                    type(eid) is str and type(source) is str and type(fields) is dict
                    and 0 < len(eid) <= max_id and 0 < len(source) <= max_id and 0 < len(fields) <= max_fields
                    and set(map(type, fields.values())) == floats
                ):
                    raw_ts = obj.get("ts")
                    ts = arrival_ts if raw_ts is None else parse_ts(raw_ts)
                    append((i, new((eid, "transaction", source, ts, fields, None, raw_ts is not None))))
                    continue
            append((i, _event(obj, arrival_ts, limits, True)))
        except InvalidEvent as err:
            errors.append((i, err))
    return events, errors


def _common_transactions(
    raws: Sequence[bytes | str], arrival_ts: float, limits: Limits
) -> tuple[list[tuple[int, Event]], NumberRows | None] | None:
    """The events of a batch in which every message is the common transaction event with
    the same keys (no ``ts``, no ``label``), else None: :func:`decode_events`'s per-event
    loop then decodes it (and names any error).

    The checks of that loop's fast path, each over the whole batch by ``map`` and
    ``set`` rather than per event in Python (~1.3 -> ~0.5 us per 9-field shuttle
    event besides orjson's parse); a batch that fails any of them is decoded again
    by the loop, so its events and errors are the loop's.
    """
    if not raws or max(map(len, raws)) > limits.max_bytes:
        return None
    try:
        objs = list(map(orjson.loads, raws))
    except orjson.JSONDecodeError:
        return None
    if set(map(type, objs)) != _DICT_ONLY:
        return None
    keys = tuple(objs[0])
    if not _COMMON_KEYS.issuperset(keys) or not _REQUIRED_KEYS.issubset(keys):
        return None
    # decoded keys are orjson's cached strings: the comparison is mostly by identity
    if not all(map(keys.__eq__, map(tuple, objs))):
        return None
    if set(map(_get_kind, objs)) != _TRANSACTION_ONLY:
        return None
    max_id = limits.max_id_chars
    ids = list(map(_get_id, objs))
    if set(map(type, ids)) != _STR_ONLY or not 0 < min(map(len, ids)) <= max(map(len, ids)) <= max_id:
        return None
    if "source" in keys:
        sources: Any = list(map(_get_source, objs))
        if set(map(type, sources)) != _STR_ONLY or not 0 < min(map(len, sources)) <= max(map(len, sources)) <= max_id:
            return None
    elif len("transaction") <= max_id:  # the default source, the kind's name
        sources = repeat("transaction")
    else:
        return None
    fields = list(map(_get_fields, objs))
    if set(map(type, fields)) != _DICT_ONLY or not 0 < min(map(len, fields)) <= max(map(len, fields)) <= limits.max_fields:
        return None
    values = list(chain.from_iterable(map(dict.values, fields)))
    if set(map(type, values)) != _FLOATS:
        return None
    events = map(_new_event, zip(ids, repeat("transaction"), sources, repeat(arrival_ts), fields,
                                 repeat(None), repeat(False)))
    # The fields' numbers as a matrix, while they are in cache, when every event names the
    # same fields in the same order (one schema: decoded names are orjson's cached strings,
    # compared mostly by identity); orjson refuses NaN and infinities, so all are finite.
    names = tuple(fields[0])
    numbers = None
    if all(map(names.__eq__, map(tuple, fields))):
        numbers = NumberRows(names, np.array(values, np.float64).reshape(len(fields), len(names)))
    return list(zip(range(len(objs)), events)), numbers


def _raise_json_error(raw: str, err: Exception) -> None:
    # orjson refuses NaN and Infinity literals and numbers too large for a
    # double (1e999); say so instead of "not JSON".
    try:
        json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except NonFinite:
        raise
    except ValueError:
        pass
    raise NotJSON(f"not valid JSON: {err}") from None


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise NonFinite(f"{text[:40]} is not a finite double")
    return x


def _refuse_constant(name: str) -> float:
    raise NonFinite(f"{name} is not a finite number")


def event_from_dict(obj: Any, *, arrival_ts: float, limits: Limits = DEFAULT_LIMITS) -> Event:
    """Validate a decoded JSON value as an event (see :func:`decode_event`)."""
    return _event(obj, arrival_ts, limits, False)


def _event(obj: Any, arrival_ts: float, limits: Limits, from_json: bool) -> Event:
    """:func:`event_from_dict`; ``from_json``: ``obj`` is orjson's fresh output (see ``_parse_transaction``)."""
    if not isinstance(obj, dict):
        raise NotAnObject(f"an event is a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind is None:
        raise MissingField("missing field 'kind'", field="kind")
    if not isinstance(kind, str):
        raise WrongType("'kind' must be a string", field="kind")
    if kind not in PAYLOAD_FIELDS:
        raise UnknownKind(f"unknown kind {kind[:40]!r}; one of {', '.join(KINDS)}", field="kind")
    if not obj.keys() <= _ALLOWED[kind]:  # one set comparison per event; the loop names the culprit
        allowed = PAYLOAD_FIELDS[kind]
        for name in obj:
            if name not in COMMON_FIELDS and name not in allowed:
                raise UnknownField(
                    f"unknown field {str(name)[:40]!r} for kind {kind!r}", field=str(name)[:40]
                )

    event_id = obj.get("id")
    if event_id is None:
        raise MissingField("missing field 'id'", field="id")
    if not isinstance(event_id, str):
        raise WrongType("'id' must be a string", field="id")
    if not event_id:
        raise EmptyPayload("'id' is empty", field="id")
    if len(event_id) > limits.max_id_chars:
        raise Oversized(f"'id' longer than {limits.max_id_chars} characters", field="id")

    source = obj.get("source", kind)
    if not isinstance(source, str):
        raise WrongType("'source' must be a string", field="source")
    if not source:
        raise EmptyPayload("'source' is empty", field="source")
    if len(source) > limits.max_id_chars:
        raise Oversized(f"'source' longer than {limits.max_id_chars} characters", field="source")

    raw_ts = obj.get("ts")
    ts = arrival_ts if raw_ts is None else parse_ts(raw_ts)

    label = obj.get("label")
    if label is not None:
        if isinstance(label, bool):
            label = int(label)
        if label not in (0, 1) or isinstance(label, float) and not label.is_integer():
            raise WrongType("'label' must be 0 or 1", field="label")
        label = int(label)

    if from_json and kind == "transaction":
        payload = _parse_transaction(obj, limits, from_json=True)
    else:
        payload = _PARSERS[kind](obj, limits)
    # by tuple's constructor: a named tuple's __new__ is Python code (decoding is per event)
    return _new_event((event_id, kind, source, ts, payload, label, raw_ts is not None))


def event_to_state(e: Event) -> dict[str, Any]:
    """An event as plain JSON values and arrays (see ``models.base.State``), for saved state."""
    payload = e.payload
    if e.kind == "audio":
        payload = list(payload)
    return {
        "id": e.id, "kind": e.kind, "source": e.source, "ts": e.ts,
        "payload": payload, "label": e.label, "has_ts": e.has_ts,
    }


def event_from_state(d: dict[str, Any]) -> Event:
    """The inverse of :func:`event_to_state` (state comes from our own snapshots, already validated)."""
    payload = d["payload"]
    kind = d["kind"]
    if kind == "audio":
        payload = (payload[0], np.asarray(payload[1], np.float32), *payload[2:])
    elif kind == "vector":
        payload = np.asarray(payload, np.float32)
    elif kind == "transaction":
        payload = dict(payload)
    return Event(
        id=d["id"], kind=kind, source=d["source"], ts=float(d["ts"]), payload=payload,
        label=d["label"], has_ts=bool(d["has_ts"]),
    )


def parse_ts(value: Any) -> float:
    """An RFC 3339 string or epoch seconds, as epoch seconds."""
    if isinstance(value, bool):
        raise BadTimestamp("'ts' must be an RFC 3339 string or epoch seconds", field="ts")
    if isinstance(value, (int, float)):
        ts = float(value)
        if not math.isfinite(ts):
            raise BadTimestamp("'ts' is not finite", field="ts")
        return ts
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise BadTimestamp(f"'ts' {value[:40]!r} is not an RFC 3339 timestamp", field="ts") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    raise BadTimestamp("'ts' must be an RFC 3339 string or epoch seconds", field="ts")


@lru_cache(maxsize=4096)
def format_ts(ts: float) -> str:
    """Epoch seconds as RFC 3339 UTC with milliseconds.

    Cached: events of a batch without their own time share its arrival time,
    and events that carry one repeat it within a millisecond-resolution
    stream; the datetime round trip was ~4% of the tabular pipeline's time.
    """
    return (
        datetime.fromtimestamp(ts, tz=timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _require(obj: dict, name: str) -> Any:
    value = obj.get(name)
    if value is None:
        raise MissingField(f"missing field {name!r}", field=name)
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WrongType(f"{name!r} must be a number", field=name)
    x = float(value)
    if not math.isfinite(x):
        raise NonFinite(f"{name!r} is not finite", field=name)
    return x


def _numeric_array(values: Any, name: str, ndim: int) -> np.ndarray:
    """``values`` (nested lists of numbers) as float32, checked by NumPy rather than per element."""
    try:
        arr = np.array(values)
    except (ValueError, TypeError):  # ragged nesting
        raise WrongType(f"{name!r} must be a rectangular array of numbers", field=name) from None
    if arr.dtype.kind not in "iuf" or arr.ndim != ndim:
        shape = "an array of numbers" if ndim == 1 else "an array of frames (arrays of numbers)"
        raise WrongType(f"{name!r} must be {shape}", field=name)
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise NonFinite(f"{name!r} has a non-finite number", field=name)
    return arr.astype(np.float32)


def _float_array(values: Any, name: str, max_len: int) -> np.ndarray:
    if not isinstance(values, list):
        raise WrongType(f"{name!r} must be an array of numbers", field=name)
    if not values:
        raise EmptyPayload(f"{name!r} is empty", field=name)
    if len(values) > max_len:
        raise Oversized(f"{name!r} has {len(values)} entries, more than {max_len}", field=name)
    return _numeric_array(values, name, 1)


_FLOATS = {float}
_DICT_ONLY, _STR_ONLY, _TRANSACTION_ONLY = {dict}, {str}, {"transaction"}
# The keys of the common transaction event (:func:`_common_transactions`): without a
# time or a label, which that path leaves to the per-event loop.
_COMMON_KEYS = frozenset({"id", "source", "kind", "fields"})
_REQUIRED_KEYS = frozenset({"id", "kind", "fields"})
_get_kind, _get_id, _get_source, _get_fields = map(itemgetter, ("kind", "id", "source", "fields"))


def _parse_transaction(obj: dict, limits: Limits, *, from_json: bool = False) -> dict[str, float | str]:
    """``fields`` checked and cleaned. ``from_json``: ``obj`` was just decoded by orjson, which
    refuses NaN, Infinity and numbers beyond a double, and nobody else holds it."""
    fields = _require(obj, "fields")
    if not isinstance(fields, dict):
        raise WrongType("'fields' must be an object", field="fields")
    if not fields:
        raise EmptyPayload("'fields' is empty", field="fields")
    if len(fields) > limits.max_fields:
        raise Oversized(f"'fields' has more than {limits.max_fields} entries", field="fields")
    values = fields.values()
    if set(map(type, values)) == _FLOATS:
        # The common record of numbers only: what the loop below would build,
        # without a type dispatch per field (a fifth of decoding a 36-field record).
        if from_json:
            return fields  # finite already, and ours: neither a check nor a copy
        if all(map(math.isfinite, values)):
            return dict(fields)
    out: dict[str, float | str] = {}
    for name, value in fields.items():
        if value is None:
            continue  # a missing value; the encoder imputes it
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            x = float(value)
            if not math.isfinite(x):
                raise NonFinite(f"field {name[:40]!r} is not finite", field="fields")
            out[name] = x
        elif isinstance(value, str):
            if len(value) > limits.max_id_chars:
                raise Oversized(f"field {name[:40]!r} is too long", field="fields")
            out[name] = value
        else:
            raise WrongType(
                f"field {name[:40]!r} must be a number, string or bool", field="fields"
            )
    if not out:
        raise EmptyPayload("'fields' has no values", field="fields")
    return out


def _parse_str(name: str):
    def parse(obj: dict, limits: Limits) -> str:
        value = _require(obj, name)
        if not isinstance(value, str):
            raise WrongType(f"{name!r} must be a string", field=name)
        if not value.strip():
            raise EmptyPayload(f"{name!r} is empty", field=name)
        if len(value) > limits.max_text_chars:
            raise Oversized(
                f"{name!r} has {len(value)} characters, more than {limits.max_text_chars}",
                field=name,
            )
        return value

    return parse


def _parse_audio(obj: dict, limits: Limits) -> tuple:
    if obj.get("mfcc") is not None:
        frames = obj["mfcc"]
        if not isinstance(frames, list) or not all(isinstance(f, list) for f in frames):
            raise WrongType("'mfcc' must be an array of frames (arrays of numbers)", field="mfcc")
        if not frames:
            raise EmptyPayload("'mfcc' is empty", field="mfcc")
        if len(frames) > limits.max_mfcc_frames:
            raise Oversized(f"'mfcc' has more than {limits.max_mfcc_frames} frames", field="mfcc")
        width = len(frames[0])
        if width == 0 or width > limits.max_mfcc_coeffs:
            raise WrongType(
                f"'mfcc' frames must have 1 to {limits.max_mfcc_coeffs} coefficients", field="mfcc"
            )
        if any(len(f) != width for f in frames):
            raise WrongType("'mfcc' frames differ in length", field="mfcc")
        return ("mfcc", _numeric_array(frames, "mfcc", 2))
    if obj.get("samples") is not None:
        samples = _float_array(obj["samples"], "samples", limits.max_samples)
        rate = _number(_require(obj, "sample_rate"), "sample_rate")
        if not 1000 <= rate <= 384_000 or not rate.is_integer():
            raise WrongType("'sample_rate' must be an integer from 1000 to 384000 Hz", field="sample_rate")
        return ("samples", samples, int(rate))
    raise MissingField("audio needs 'mfcc', or 'samples' with 'sample_rate'", field="mfcc")


def _parse_vector(obj: dict, limits: Limits) -> np.ndarray:
    return _float_array(_require(obj, "vector"), "vector", limits.max_vector_dim)


_PARSERS = {
    "transaction": _parse_transaction,
    "log": _parse_str("line"),
    "text": _parse_str("text"),
    "audio": _parse_audio,
    "vector": _parse_vector,
}

__all__ = [
    "DEFAULT_LIMITS",
    "KINDS",
    "Event",
    "InvalidEvent",
    "Limits",
    "NumberRows",
    "decode_batch",
    "decode_event",
    "decode_events",
    "event_from_dict",
    "format_ts",
    "parse_ts",
]

"""The errors bad data raises, one class per dead-letter reason.

Every class carries a stable ``reason`` code. The stream shell maps an
exception to a dead-letter record and a metric label by that code alone, so
the codes are part of the outside contract: rename none of them.
"""

from __future__ import annotations


class NeighbourwatchError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidEvent(NeighbourwatchError):
    """An event that cannot be scored. ``reason`` names why, ``str(err)`` says it in words."""

    reason = "invalid_event"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotJSON(InvalidEvent):
    reason = "not_json"


class BadEncoding(InvalidEvent):
    reason = "bad_encoding"


class Oversized(InvalidEvent):
    reason = "oversized"


class NotAnObject(InvalidEvent):
    reason = "not_an_object"


class MissingField(InvalidEvent):
    reason = "missing_field"


class WrongType(InvalidEvent):
    reason = "wrong_type"


class UnknownKind(InvalidEvent):
    reason = "unknown_kind"


class EmptyPayload(InvalidEvent):
    reason = "empty_payload"


class NonFinite(InvalidEvent):
    reason = "non_finite"


class WrongDimension(InvalidEvent):
    reason = "wrong_dimension"


class ZeroVector(InvalidEvent):
    """A vector of norm zero where the metric is the cosine: it has no direction."""

    reason = "zero_vector"


class UnknownField(InvalidEvent):
    reason = "unknown_field"


class BadTimestamp(InvalidEvent):
    reason = "bad_timestamp"


class FutureTimestamp(InvalidEvent):
    """Event time further ahead of arrival than clock skew explains (``Limits.max_future_seconds``)."""

    reason = "future_timestamp"


class LateEvent(InvalidEvent):
    """Event time further behind its source's newest event time than the source allows (``max_lateness``)."""

    reason = "late_event"


class DuplicateId(InvalidEvent):
    """An id the source has already seen (within its de-duplication window)."""

    reason = "duplicate_id"


class StateMismatch(NeighbourwatchError):
    """Saved state that does not fit the object asked to load it (other encoder version, dimension...)."""


__all__ = [
    "BadEncoding",
    "BadTimestamp",
    "DuplicateId",
    "FutureTimestamp",
    "LateEvent",
    "EmptyPayload",
    "InvalidEvent",
    "MissingField",
    "NeighbourwatchError",
    "NonFinite",
    "NotAnObject",
    "NotJSON",
    "Oversized",
    "StateMismatch",
    "UnknownKind",
    "WrongDimension",
    "WrongType",
    "UnknownField",
    "ZeroVector",
]

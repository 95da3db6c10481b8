"""The small protocols every encoder keeps.

An encoder turns a batch of validated events of one kind into a float32 matrix
of fixed width. Encoders that keep statistics (robust scaling, template
counts) also implement :class:`Learner`; the pipeline calls ``learn`` only with
events it accepted as normal, after scoring them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from models.events import Event

State = dict[str, Any]
"""Saved state: JSON values and NumPy arrays only (never pickled objects)."""


@runtime_checkable
class Encoder(Protocol):
    """``encode(events) -> float32 (n, dim)``: deterministic, no side effect beyond caches.

    ``name`` and ``version`` travel with every result as ``"name@version"``;
    ``metric`` (``"l2"`` or ``"cosine"``) is the distance the vectors are meant for.
    Raises :class:`~models.errors.InvalidEvent` for an event it cannot encode.
    """

    name: str
    version: str
    metric: str

    @property
    def dim(self) -> int | None: ...

    def encode(self, events: Sequence[Event]) -> np.ndarray: ...


@runtime_checkable
class Learner(Protocol):
    """``learn(events)``: update running statistics from events accepted as normal."""

    def learn(self, events: Sequence[Event]) -> None: ...


@runtime_checkable
class NumberTaker(Protocol):
    """``encode_numbers(events, numbers)``: what ``encode(events)`` returns, the events' numbers
    taken from ``numbers`` (a :class:`models.events.NumberRows` with a row per event, read by
    the decoder) instead of from each payload again."""

    def encode_numbers(self, events: Sequence[Event], numbers: Any) -> np.ndarray: ...


@runtime_checkable
class Prefetcher(Protocol):
    """``prefetch(events)``: compute ahead what encoding these events will need.

    For model-backed encoders: every text not cached yet goes to the model in
    one call, instead of one call per block the events are later encoded in.
    Changes caches only, never what ``encode`` returns.
    """

    def prefetch(self, events: Sequence[Event]) -> None: ...


@runtime_checkable
class Stateful(Protocol):
    """``get_state() -> State`` and ``set_state(state)``: a round trip gives identical outputs."""

    def get_state(self) -> State: ...

    def set_state(self, state: State) -> None: ...


@runtime_checkable
class Seasonal(Protocol):
    """``seasonal_dims``: dimensions that follow the clock (time of day, day of week).

    Their mean moves every hour by design; a drift test must not read that as
    drift. The kNN score keeps them (a payment at 3 a.m. is unusual).
    """

    @property
    def seasonal_dims(self) -> tuple[int, ...]: ...


@runtime_checkable
class Named(Protocol):
    """``dim_names()``: a name per dimension (``num:amount``, ``rarity:country``), so that a
    drift explanation can say which fields moved instead of which column numbers."""

    def dim_names(self) -> list[str]: ...


def encoder_tag(encoder: Encoder) -> str:
    return f"{encoder.name}@{encoder.version}"


_ARRAY = "__array__"


def split_arrays(state: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """A state as JSON values with ``{"__array__": name}`` in place of each array, and the arrays by name.

    The one walker of saved state: file snapshots (``streams.snapshots``) and
    the merge checkpoints of sharded sources (``detectors.shards``) store the
    arrays their own way. Refuses what would need pickling.
    """
    arrays: dict[str, np.ndarray] = {}
    return _split(state, arrays), arrays


# The walkers are module functions, not closures: a recursive closure refers to
# itself through its cell, and that cycle kept every array of a snapshot alive
# until the collector's oldest generation ran, which with the worker's
# thresholds (``streams.runtime``) was ~15 MB per snapshot for tens of minutes.
def _split(x: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError("object arrays cannot be saved (they would need pickling)")
        name = f"a{len(arrays)}"
        arrays[name] = x
        return {_ARRAY: name}
    if isinstance(x, dict):
        if _ARRAY in x:
            raise ValueError(f"a state key may not be {_ARRAY!r}")
        return {str(k): _split(v, arrays) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_split(v, arrays) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    raise TypeError(f"cannot save a {type(x).__name__} in a snapshot")


def join_arrays(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    """The inverse of :func:`split_arrays`."""
    if isinstance(tree, dict):
        if set(tree) == {_ARRAY}:
            return arrays[tree[_ARRAY]]
        return {k: join_arrays(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_arrays(v, arrays) for v in tree]
    return tree


@runtime_checkable
class Rebasing(Protocol):
    """``frame`` and ``rebase(X, frame)``: map vectors encoded earlier into how they encode now.

    An encoder whose ``learn`` changes what ``encode`` returns (a scaler's
    new centre or scale) starts a new ``frame`` each time; vectors kept
    encoded (a reference index, a drift reference) are rebased so that old
    and new vectors stay comparable. ``rebase`` returns None for a frame it
    no longer knows.
    """

    @property
    def frame(self) -> int: ...

    def rebase(self, X: np.ndarray, frame: int) -> np.ndarray | None: ...

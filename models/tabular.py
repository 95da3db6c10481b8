"""Transaction events -> fixed-width vectors for L2 nearest-neighbour scoring.

A transaction payload is a flat ``{name: float | str}`` mapping. Numbers become
robust z-scores in fixed slots, strings become a rarity score per field plus
signed feature hashing of ``(field, value)``, and the event time adds
hour-of-day and day-of-week on the unit circle. The layout of a vector is::

    [ numeric (numeric_slots) | rarity (categorical_slots) | hashed (hash_buckets) | time (4) ]

Dimensions never move. A field name gets its slot when it is first *learnt*
(in order of first appearance) and keeps it for ever; until then it is
treated as missing, which is also what every vector already in a reference
index says about it, so old and new vectors stay comparable. Once every slot
is taken, further names share slots by a stable hash (CRC-32, not Python's
per-process salted ``hash()``), so the width is fixed at construction.

>>> from models.events import Event
>>> enc = TransactionEncoder(numeric_slots=4, categorical_slots=2, hash_buckets=4)
>>> events = [
...     Event(id=str(i), kind="transaction", source="t", ts=0.0,
...           payload={"amount": float(10 + i), "country": "FR"})
...     for i in range(20)
... ]
>>> enc.learn(events)
>>> enc.dim, enc.encode(events[:2]).shape
(14, (2, 14))
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from itertools import chain
from dataclasses import dataclass
from operator import is_, itemgetter

import numpy as np

from models.base import State
from models.errors import NonFinite, StateMismatch, WrongType
from models.events import Event, NumberRows, event_has_ts
from models.scaling import RobustScaler

ENCODER_VERSION = "1"

# Each categorical field adds one signed unit to one bucket, times 1/sqrt(2):
# two events differing only in that field's value (no collision) are then at
# L2 distance 1, one robust standard deviation of a numeric field. However
# many categorical fields an event has, each weighs the same, and none can
# outweigh a clearly unusual number.
_HASH_WEIGHT = 1.0 / math.sqrt(2.0)

# Krichevsky-Trofimov smoothing: a value seen c times in N observations has
# frequency (c + 1/2) / (N + 1), so an unseen value is never infinitely rare
# and after few observations it is only moderately rare.
_KT_PSEUDOCOUNT = 0.5

# Separates field and value in hashed keys; a unit separator cannot occur in
# ordinary field names, so ("ab", "c") and ("a", "bc") never share a key.
_SEP = "\x1f"

# Bounded caches of derived, stateless values (hash buckets of names and
# (field, value) pairs). They are caches, not state: dropped when full.
_CACHE_LIMIT = 65_536

_SECONDS_PER_DAY = 86_400.0
# 1970-01-01 was a Thursday; shifting by 3 days puts Monday 00:00 at angle 0.
_EPOCH_WEEKDAY_SHIFT = 3.0

_TIME_DIMS = 4

# Cached per-schema plans. A source has a handful of schemas (fields present
# or absent); a stream whose schemas churn past this just rebuilds plans.
_PLAN_LIMIT = 4096

_FLOAT_ONLY = {float}


@dataclass(frozen=True, slots=True)
class _Plan:
    """Where the fields of one payload schema go (see ``TransactionEncoder._plan``)."""

    numeric: Callable[[tuple], tuple]  # payload values -> the numeric ones
    slots: np.ndarray  # their slots, -1 for a name not learnt yet
    categorical: tuple[int, ...]  # positions of string values
    new_numeric: tuple[str, ...]  # numeric names that would get a slot if learnt
    new_categorical: tuple[str, ...]
    shared: bool  # two fields of the schema share a slot (hash overflow)
    unslotted: bool  # some numeric field has no slot yet (slot -1)
    takes_all: bool  # every value is numeric: ``numeric`` returns them all, in order


def _getter(positions: list[int]) -> Callable[[tuple], tuple]:
    if not positions:
        return lambda values: ()
    if len(positions) == 1:
        j = positions[0]
        return lambda values: (values[j],)
    return itemgetter(*positions)


def stable_hash(text: str) -> int:
    """A 32-bit hash of ``text`` that is the same in every process and release."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


class TransactionEncoder:
    """``transaction`` events -> float32 ``(n, dim)`` vectors for the L2 metric.

    Parameters
    ----------
    numeric_slots
        Slots for numeric fields, given out in order of first appearance
        during :meth:`learn`; later names share slots by a stable hash (their
        values add up). Each slot is scaled online by median and IQR
        (:class:`~models.scaling.RobustScaler`); a missing value is 0.
    categorical_slots
        Slots for the rarity of string fields, given out the same way. The
        rarity of a value is ``-log10`` of its smoothed frequency in its field,
        floored at the count error of the bounded counter (see ``max_values``):
        0 for a value that is always there, about 1 for a value seen one time
        in ten, ``log10(max_values / 2)`` (3.0 by default) for an unseen one:
        as far as a number three robust standard deviations out, clearly
        unusual without drowning the numeric fields. Fields sharing a slot
        (overflow) share one counter and the rarer value of an event wins.
    hash_buckets
        Signed feature hashing of ``(field, value)`` for every string field,
        learnt or not: events with the same merchant, country... lie closer.
        0 switches it off.
    time_features
        Adds sin/cos of hour-of-day and day-of-week (UTC) of ``event.ts`` when
        the event carries a time (``has_ts``); zeros otherwise, the centre of
        both circles, equally far from every time.
    time_weight
        Radius of the time circles. At 0.5, opposite hours are 1.0 apart, one
        robust standard deviation of a numeric field: the time of day nudges
        which neighbours are nearest but cannot make an outlier on its own
        (night-time shopping is unusual, not fraud).
    scaler_reservoir, scaler_refresh
        Passed to :class:`~models.scaling.RobustScaler`: rows kept to estimate
        median and IQR, and rows between re-estimates once the sample is
        large. On the ADBench streams (``bench/tabular_encoding.py``) reservoirs
        of 256, 2048 and 8192 rows score alike, with no size better on every
        set; 2048 keeps the estimates steady for 1 MB per source at 64 slots.
        Refreshing every 512 rows instead of 128 changed no ROC-AUC beyond
        seed noise and makes ``learn`` about 1.5 times faster: the re-estimate
        (percentiles of the whole reservoir) is most of its cost.
    squash, squash_scale
        With ``squash``, a robust z-score ``z`` becomes
        ``squash_scale * arcsinh(z / squash_scale)``: unchanged up to about
        ``squash_scale`` robust standard deviations, logarithmic beyond. It is
        a safety bound, not a shaping: on ADBench, kNN ROC-AUC rises steadily
        with the knee (the scaler's own ``arcsinh(z)``, a knee at 1, lost 5 to
        16 points on cardio, thyroid, satellite and shuttle), and a knee at 30
        scores as no squash at all, while an amount of 10^9 still lands a few
        hundred units away rather than 10^7, which float32 distances in an
        index could not take next to the other dimensions.
    max_values
        Distinct values counted per categorical slot. When a counter exceeds
        it, the median count is subtracted from every entry and entries at or
        below zero are dropped (Misra-Gries in batch form): memory stays below
        ``max_values`` entries per slot, and every count is under-estimated by
        at most ``2 N / max_values``, so every value more frequent than
        ``2 / max_values`` is kept and its frequency is known to that accuracy.
        Rarer values are told apart no further: the floor of the frequency.
    seed
        Seeds the scaler's reservoir sampling.

    Notes
    -----
    :meth:`encode` reads state only (it may fill caches of hash values);
    :meth:`learn` updates slots, scaler and counts. The pipeline learns only
    from events it accepted as normal, after scoring them.
    """

    name = "transaction"
    version = ENCODER_VERSION
    metric = "l2"

    def __init__(
        self,
        *,
        numeric_slots: int = 64,
        categorical_slots: int = 16,
        hash_buckets: int = 16,
        time_features: bool = True,
        time_weight: float = 0.5,
        scaler_reservoir: int = 2048,
        scaler_refresh: int = 512,
        squash: bool = True,
        squash_scale: float = 30.0,
        max_values: int = 2048,
        seed: int = 0,
    ) -> None:
        if numeric_slots < 1 or categorical_slots < 0 or hash_buckets < 0:
            raise ValueError("numeric_slots >= 1, categorical_slots >= 0, hash_buckets >= 0")
        if max_values < 2:
            raise ValueError("max_values must be at least 2")
        self.numeric_slots = numeric_slots
        self.categorical_slots = categorical_slots
        self.hash_buckets = hash_buckets
        self.time_features = time_features
        self.time_weight = time_weight
        self.scaler_reservoir = scaler_reservoir
        self.scaler_refresh = scaler_refresh
        self.squash = squash
        self.squash_scale = squash_scale
        self.max_values = max_values
        self.seed = seed
        self._scaler = RobustScaler(
            dim=numeric_slots,
            reservoir=scaler_reservoir,
            refresh=scaler_refresh,
            squash=False,  # squashed here, with a knee further out (see squash_scale)
            seed=seed,
        )
        self._numeric: dict[str, int] = {}
        self._categorical: dict[str, int] = {}
        self._counts: list[dict[str, int]] = [{} for _ in range(categorical_slots)]
        self._totals: list[int] = [0] * categorical_slots
        self._n_learned = 0
        # The smoothed frequency is floored here: below it the bounded
        # counter cannot tell values apart (see ``max_values``).
        self._log_floor = math.log10(2.0 / max_values)
        self._overflow_cache: dict[tuple[bool, str], int] = {}
        self._pair_cache: dict[tuple[str, str], tuple[int, float]] = {}
        self._plans: dict[tuple[tuple[str, ...], tuple[type, ...]], _Plan] = {}
        # The batches encoded since the last learn with their raw matrices (the
        # events themselves kept, so their ids are not reused meanwhile): learn()
        # of the same events, the pipeline's next step, takes their rows instead
        # of gathering each payload a second time (~5% of a tabular pipeline).
        # Only batches of numbers that all have their slots are kept.
        self._gathered: list[tuple[tuple[Event, ...], np.ndarray]] = []
        self._gathered_rows = 0
        # After _gather: the only columns of its raw matrix that hold values (the
        # slots of the batch's one schema), or None (any may).
        self._filled: np.ndarray | None = None

    # -- public properties -------------------------------------------------

    @property
    def dim(self) -> int:
        return (
            self.numeric_slots
            + self.categorical_slots
            + self.hash_buckets
            + (_TIME_DIMS if self.time_features else 0)
        )

    @property
    def seasonal_dims(self) -> tuple[int, ...]:
        """The time-of-day and day-of-week dimensions (the last four): cyclic by design, not drift."""
        if not self.time_features:
            return ()
        return tuple(range(self.dim - _TIME_DIMS, self.dim))

    @property
    def frame(self) -> int:
        """Changes whenever the scaler's centre or scale does (see :meth:`rebase`)."""
        return self._scaler.frame

    def rebase(self, X: np.ndarray, frame: int) -> np.ndarray | None:
        """Vectors encoded in ``frame``, as they would be encoded now (None: too old a frame).

        Only the numeric slots (the first ``numeric_slots`` columns) move with
        the scaler, so ``X`` may lack the columns after them (a drift view
        without the time dimensions). Rarity columns are left as they were.
        """
        return self._scaler.rebase(X, frame, knee=self.squash_scale if self.squash else 0.0)

    @property
    def n_learned(self) -> int:
        """Events learnt so far."""
        return self._n_learned

    @property
    def numeric_fields(self) -> tuple[str, ...]:
        """Numeric field names holding their own slot, in slot order."""
        return tuple(self._numeric)

    @property
    def categorical_fields(self) -> tuple[str, ...]:
        """Categorical field names holding their own rarity slot, in slot order."""
        return tuple(self._categorical)

    def dim_names(self) -> list[str]:
        """A name per dimension (``num:amount``, ``rarity:country``...), for explanations."""
        num = list(self._numeric) + [f"#{i}" for i in range(len(self._numeric), self.numeric_slots)]
        cat = list(self._categorical) + [
            f"#{i}" for i in range(len(self._categorical), self.categorical_slots)
        ]
        names = [f"num:{n}" for n in num] + [f"rarity:{c}" for c in cat]
        names += [f"hash:{b}" for b in range(self.hash_buckets)]
        if self.time_features:
            names += ["time:hour_sin", "time:hour_cos", "time:weekday_sin", "time:weekday_cos"]
        return names

    # -- encode and learn ----------------------------------------------------

    def encode(self, events: Sequence[Event]) -> np.ndarray:
        """Vectors of ``events``, float32 ``(n, dim)``. Reads state, never changes it.

        Raises
        ------
        WrongType
            An event that is not a transaction, or a field that is neither a
            number nor a string.
        NonFinite
            A numeric field that is NaN or infinite.
        """
        return self._encode(events, None)

    def encode_numbers(self, events: Sequence[Event], numbers: NumberRows) -> np.ndarray:
        """:meth:`encode` of events whose fields ``numbers`` holds, a row per event, as
        :func:`models.events.decode_batch` read them: the same vectors, the raw matrix filled
        from its rows instead of gathered from each payload (~1 us per shuttle event, most of
        it cache misses on payloads decoded a while before)."""
        return self._encode(events, numbers)

    def _encode(self, events: Sequence[Event], numbers: NumberRows | None) -> np.ndarray:
        n = len(events)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        raw, cats, new_numeric, new_categorical = self._gather(events, find_new=True, numbers=numbers)
        cols = self._filled
        if not cats and not new_numeric and not new_categorical:
            # Numbers only, every field in its slot: what learn() would gather
            # for these events again (a cache, not state; see _gathered).
            if self._gathered_rows > _CACHE_LIMIT:
                self._forget_gathered()
            self._gathered.append((tuple(events), raw))  # a copy: the caller may reuse its list
            self._gathered_rows += n
        S, C, B = self.numeric_slots, self.categorical_slots, self.hash_buckets
        # Slots no field of the batch filled are NaN in raw and 0 out: with one
        # schema, only its slots are scaled (each value as it would be in the
        # whole matrix; 9 of 64 columns on shuttle).
        z = self._scaler.transform(raw if cols is None else raw[:, cols], cols=cols)
        if self.squash:
            c = np.float32(self.squash_scale)
            z = c * np.arcsinh(z / c)
        if cols is None:
            out[:, :S] = z
        else:
            out[:, cols] = z
        if cats:
            self._encode_categorical(cats, out[:, S : S + C], out[:, S + C : S + C + B])
        if self.time_features and any(map(event_has_ts, events)):
            # without an event time in the batch the time features stay 0 (the
            # centre of both circles), as ``out`` was made
            out[:, S + C + B :] = self._time(events)
        return out

    def learn(self, events: Sequence[Event]) -> None:
        """Give slots to new field names, then update the scaler and the value counts."""
        if not events:
            return
        raw = self._gathered_raw(events)
        if raw is not None:
            # All encoded since the last learn, with the slots as they are.
            self._scaler.learn(raw)
            self._n_learned += len(events)
            return
        raw, cats, new_numeric, new_categorical = self._gather(events, find_new=True)
        if new_numeric or new_categorical:
            self._assign_slots(new_numeric, new_categorical)
            # The new fields' values of this very batch belong in their slots too.
            raw, cats, _, _ = self._gather(events)
        self._scaler.learn(raw)
        self._count(cats)
        self._n_learned += len(events)

    # -- internals ------------------------------------------------------------

    def _gathered_raw(self, events: Sequence[Event]) -> np.ndarray | None:
        """The raw rows of ``events`` if every one of them was encoded since the last learn
        (:attr:`_gathered`), else None; the cache is emptied either way. One index of the
        batches' matrices (~7 against ~21 us per 32 events for a row and a dict entry each)."""
        batches = self._gathered
        self._forget_gathered()
        if not batches:
            return None
        if len(batches) == 1:
            encoded, raw = batches[0]
            if len(events) == len(encoded) and all(map(is_, events, encoded)):
                return raw  # the batch itself (no event held back from learning): no index
        else:
            encoded = list(chain.from_iterable(e for e, _ in batches))
            raw = np.concatenate([r for _, r in batches])
        where = dict(zip(map(id, encoded), range(len(encoded))))
        rows = list(map(where.get, map(id, events)))
        if None in rows or not all(map(is_, events, map(encoded.__getitem__, rows))):
            return None
        return raw[rows]

    def _forget_gathered(self) -> None:
        self._gathered = []
        self._gathered_rows = 0

    def _assign_slots(self, numeric: list[str], categorical: list[str]) -> None:
        """Give free slots to new names, in order of first appearance."""
        for names, registry, slots in (
            (numeric, self._numeric, self.numeric_slots),
            (categorical, self._categorical, self.categorical_slots),
        ):
            for name in names:
                if len(registry) >= slots:
                    break
                if name not in registry:
                    registry[name] = len(registry)
        # Plans name the fields still without a slot: they are out of date now.
        self._plans.clear()
        self._forget_gathered()

    def _overflow_slot(self, name: str, is_numeric: bool) -> int:
        """The slot of a name without its own: -1 while free slots remain, else by hash."""
        registry, slots = (
            (self._numeric, self.numeric_slots)
            if is_numeric
            else (self._categorical, self.categorical_slots)
        )
        if len(registry) < slots or slots == 0:
            # Not learnt yet: treated as missing until learn() gives it a slot.
            return -1
        key = (is_numeric, name)
        slot = self._overflow_cache.get(key)
        if slot is None:
            slot = stable_hash(name) % slots
            if len(self._overflow_cache) >= _CACHE_LIMIT:
                self._overflow_cache.clear()
            self._overflow_cache[key] = slot
        return slot

    def _plan(self, names: tuple[str, ...], types: tuple[type, ...]) -> _Plan:
        """Where each field of a payload with these names and value types goes."""
        key = (names, types)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        numeric_get, categorical = self._numeric.get, self._categorical
        num_pos: list[int] = []
        num_slots: list[int] = []
        cat_pos: list[int] = []
        new_numeric: list[str] = []
        new_categorical: list[str] = []
        for j, (name, kind) in enumerate(zip(names, types)):
            if kind is str:
                cat_pos.append(j)
                if name not in categorical and len(categorical) < self.categorical_slots:
                    new_categorical.append(name)
            elif issubclass(kind, (int, float, np.integer, np.floating)):
                slot = numeric_get(name)
                if slot is None:
                    slot = self._overflow_slot(name, True)
                    if slot < 0:
                        # Not learnt yet: its value is still checked, then left out.
                        new_numeric.append(name)
                num_pos.append(j)
                num_slots.append(slot)
            else:
                raise WrongType(
                    f"field {str(name)[:40]!r} must be a number or a string", field="fields"
                )
        plan = _Plan(
            numeric=_getter(num_pos),
            slots=np.asarray(num_slots, dtype=np.intp),
            categorical=tuple(cat_pos),
            new_numeric=tuple(new_numeric),
            new_categorical=tuple(new_categorical),
            shared=len(set(s for s in num_slots if s >= 0)) < sum(s >= 0 for s in num_slots),
            unslotted=bool(new_numeric),
            takes_all=num_pos == list(range(len(names))),
        )
        if len(self._plans) >= _PLAN_LIMIT:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _gather(
        self, events: Sequence[Event], *, find_new: bool = False, numbers: NumberRows | None = None
    ) -> tuple[np.ndarray, list[tuple[int, str, str]], list[str], list[str]]:
        """Raw numeric matrix (NaN = missing), the ``(row, field, value)`` strings,
        and (with ``find_new``) the names still without a slot, in order of appearance.
        ``numbers``: the events' fields, as :meth:`encode_numbers` takes them.
        """
        n, S = len(events), self.numeric_slots
        self._filled = None
        fast = self._gather_numbers(events) if numbers is None else self._number_rows(numbers)
        if fast is not None:
            return fast, [], [], []
        values: list = []
        used: list[_Plan] = []  # the plan of each event
        cats: list[tuple[int, str, str]] = []
        new_numeric: list[str] = []
        new_categorical: list[str] = []
        plans_get, plan_for = self._plans.get, self._plan
        cats_append, used_append, extend = cats.append, used.append, values.extend
        last_names: tuple | None = None
        last_types: tuple | None = None
        last_plan: _Plan | None = None
        for i, e in enumerate(events):
            payload = e.payload
            if type(payload) is not dict or e.kind != "transaction":
                payload = _payload(e)  # raises WrongType (or takes a dict subclass)
            names = tuple(payload)
            vals = tuple(payload.values())
            # Events of one source nearly always share a schema: one cached
            # plan per (names, types) replaces a dict lookup per field, and
            # the previous event's plan is tried first (comparing the tuples
            # is cheaper than hashing them: decoded names are one shared
            # string per name, so the comparison is mostly by identity).
            types = tuple(map(type, vals))
            if names == last_names and types == last_types:
                plan = last_plan
            else:
                plan = plans_get((names, types)) or plan_for(names, types)
                last_names, last_types, last_plan = names, types, plan
            extend(vals if plan.takes_all else plan.numeric(vals))
            used_append(plan)
            if plan.categorical:
                for j in plan.categorical:
                    cats_append((i, names[j], vals[j]))
            if find_new:
                new_numeric.extend(plan.new_numeric)
                new_categorical.extend(plan.new_categorical)
        vals_arr = np.asarray(values, dtype=np.float64)
        one = used[0] if used and used.count(used[0]) == n else None  # one schema in the whole batch
        if one is not None:
            lengths = [len(one.slots)] * n
        else:
            lengths = [len(plan.slots) for plan in used]
        if not np.isfinite(vals_arr).all():
            first = np.flatnonzero(~np.isfinite(vals_arr))[0]
            bad = int(np.searchsorted(np.cumsum(lengths), first, side="right"))
            raise NonFinite(f"event {events[bad].id[:40]!r} has a non-finite field", field="fields")
        if one is not None and not one.shared and not one.unslotted:
            self._filled = one.slots
            return self._one_schema_rows(one, vals_arr, n), cats, new_numeric, new_categorical
        shared = any(plan.shared for plan in used)
        unslotted = any(plan.unslotted for plan in used)
        slots = np.concatenate([plan.slots for plan in used])
        idx = slots + np.repeat(np.arange(n, dtype=np.intp) * S, lengths)
        if unslotted:
            keep = slots >= 0
            idx, vals_arr = idx[keep], vals_arr[keep]
        if shared:
            # Fields sharing a slot (hash overflow) add up; a slot no field filled is NaN.
            raw = np.bincount(idx, weights=vals_arr, minlength=n * S).astype(np.float64)
            raw[np.bincount(idx, minlength=n * S) == 0] = np.nan
        else:
            raw = np.full(n * S, np.nan)
            raw[idx] = vals_arr
        return raw.reshape(n, S), cats, new_numeric, new_categorical

    def _gather_numbers(self, events: Sequence[Event]) -> np.ndarray | None:
        """:meth:`_gather`'s raw matrix for the common batch, else None: one schema of numbers
        only, every field in a slot of its own. Checked for the whole batch at once (names
        compared per event, value types in one pass over all values), not event by event."""
        first = events[0].payload
        if type(first) is not dict:
            return None
        names = tuple(first)
        payloads = [e.payload for e in events]
        for e, payload in zip(events, payloads):
            if e.kind != "transaction" or type(payload) is not dict or tuple(payload) != names:
                return None
        values = list(chain.from_iterable(map(dict.values, payloads)))
        if set(map(type, values)) != _FLOAT_ONLY:
            return None
        plan = self._plans.get((names, (float,) * len(names)))
        if plan is None or plan.shared or plan.unslotted or plan.new_categorical or not plan.takes_all:
            return None  # the general path builds (and caches) the plan
        vals_arr = np.asarray(values, dtype=np.float64)
        if not np.logical_and.reduce(np.isfinite(vals_arr)):  # .all() without its wrapper
            return None  # the general path names the event
        self._filled = plan.slots
        return self._one_schema_rows(plan, vals_arr, len(events))

    def _number_rows(self, numbers: NumberRows) -> np.ndarray | None:
        """:meth:`_gather_numbers` of the events whose fields ``numbers`` holds (one schema of
        finite floats by construction): the same raw matrix from its rows, or None where
        that method returns None for them (a plan still to make, a field without a slot)."""
        names = numbers.names
        plan = self._plans.get((names, (float,) * len(names)))
        if plan is None or plan.shared or plan.unslotted or plan.new_categorical or not plan.takes_all:
            return None
        self._filled = plan.slots
        return self._one_schema_rows(plan, numbers.values, len(numbers.values))

    def _one_schema_rows(self, plan: _Plan, values: np.ndarray, n: int) -> np.ndarray:
        """The raw matrix of ``n`` events of one schema whose numeric fields each have a slot
        of their own: ``values`` (the events' numbers in order) fill those columns."""
        raw = np.full((n, self.numeric_slots), np.nan)
        raw[:, plan.slots] = values.reshape(n, len(plan.slots))
        return raw

    def _cat_slot_key(self, name: str, value: str) -> tuple[int, str]:
        slot = self._categorical.get(name)
        if slot is not None:
            return slot, value
        slot = self._overflow_slot(name, False)
        # Fields sharing a slot count (field, value) pairs, so equal values of
        # different fields are not confused.
        return slot, name + _SEP + value

    def _encode_categorical(
        self, cats: list[tuple[int, str, str]], rarity: np.ndarray, hashed: np.ndarray
    ) -> None:
        if self.categorical_slots:
            counts, totals = self._counts, self._totals
            slot_key = self._cat_slot_key
            rows: list[int] = []
            slots: list[int] = []
            freqs: list[float] = []
            for i, name, value in cats:
                slot, key = slot_key(name, value)
                if slot >= 0:
                    rows.append(i)
                    slots.append(slot)
                    freqs.append(
                        (counts[slot].get(key, 0) + _KT_PSEUDOCOUNT) / (totals[slot] + 1.0)
                    )
            if rows:
                r = -np.maximum(np.log10(np.asarray(freqs)), self._log_floor)
                # Overflow fields sharing a slot: the rarer value of the event wins.
                np.maximum.at(rarity, (rows, slots), r.astype(np.float32))
        if self.hash_buckets:
            cached, pair_hash = self._pair_cache.get, self._pair_hash
            hashes = [cached((name, value)) or pair_hash(name, value) for _, name, value in cats]
            buckets, signs = zip(*hashes)
            rows = [i for i, _, _ in cats]
            np.add.at(hashed, (rows, list(buckets)), np.asarray(signs, dtype=np.float32))

    def _pair_hash(self, name: str, value: str) -> tuple[int, float]:
        key = (name, value)
        hit = self._pair_cache.get(key)
        if hit is None:
            h = stable_hash(name + _SEP + value)
            # Bucket from the low bits, sign from the top bit: independent for
            # any bucket count below 2**31.
            hit = (h % self.hash_buckets, _HASH_WEIGHT if h >> 31 else -_HASH_WEIGHT)
            if len(self._pair_cache) >= _CACHE_LIMIT:
                self._pair_cache.clear()
            self._pair_cache[key] = hit
        return hit

    def _count(self, cats: list[tuple[int, str, str]]) -> None:
        if not self.categorical_slots:
            return
        counts, totals = self._counts, self._totals
        for _, name, value in cats:
            slot, key = self._cat_slot_key(name, value)
            if slot < 0:
                continue
            table = counts[slot]
            table[key] = table.get(key, 0) + 1
            totals[slot] += 1
            if len(table) > self.max_values:
                _prune(table)

    def _time(self, events: Sequence[Event]) -> np.ndarray:
        has = np.fromiter((e.has_ts for e in events), dtype=bool, count=len(events))
        if not has.any():  # no event time in the batch: the centre of both circles
            return np.zeros((len(events), _TIME_DIMS))
        ts = np.fromiter((e.ts for e in events), dtype=np.float64, count=len(events))
        day = ts / _SECONDS_PER_DAY
        hour_angle = 2.0 * np.pi * (day % 1.0)
        week_angle = 2.0 * np.pi * (((day + _EPOCH_WEEKDAY_SHIFT) % 7.0) / 7.0)
        feats = np.stack(
            [np.sin(hour_angle), np.cos(hour_angle), np.sin(week_angle), np.cos(week_angle)],
            axis=1,
        )
        feats *= self.time_weight
        feats[~has] = 0.0
        return feats

    # -- state -----------------------------------------------------------------

    def _config(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "numeric_slots": self.numeric_slots,
            "categorical_slots": self.categorical_slots,
            "hash_buckets": self.hash_buckets,
            "time_features": self.time_features,
            "time_weight": self.time_weight,
            "scaler_reservoir": self.scaler_reservoir,
            "scaler_refresh": self.scaler_refresh,
            "squash": self.squash,
            "squash_scale": self.squash_scale,
            "max_values": self.max_values,
        }

    def get_state(self) -> State:
        """Slots, counts and scaler: JSON values and NumPy arrays only."""
        keys: list[str] = []
        key_slots: list[int] = []
        key_counts: list[int] = []
        for slot, table in enumerate(self._counts):
            keys.extend(table)
            key_slots.extend([slot] * len(table))
            key_counts.extend(table.values())
        state: State = {
            "config": self._config(),
            "numeric_fields": list(self._numeric),
            "categorical_fields": list(self._categorical),
            "count_keys": keys,
            "count_slots": np.asarray(key_slots, dtype=np.int64),
            "count_values": np.asarray(key_counts, dtype=np.int64),
            "count_totals": np.asarray(self._totals, dtype=np.int64),
            "n_learned": self._n_learned,
        }
        for k, v in self._scaler.get_state().items():
            state[f"scaler_{k}"] = v
        return state

    def set_state(self, state: State) -> None:
        """Load a state from :meth:`get_state` of an encoder with the same settings.

        Raises
        ------
        StateMismatch
            The state was saved by an encoder with other settings or version.
        """
        try:
            config = dict(state["config"])
            numeric = [str(n) for n in state["numeric_fields"]]
            categorical = [str(n) for n in state["categorical_fields"]]
            keys = [str(k) for k in state["count_keys"]]
            slots = np.asarray(state["count_slots"], dtype=np.int64)
            values = np.asarray(state["count_values"], dtype=np.int64)
            totals = np.asarray(state["count_totals"], dtype=np.int64)
            n_learned = int(state["n_learned"])
            scaler_state = {
                k[len("scaler_") :]: v for k, v in state.items() if k.startswith("scaler_")
            }
        except (KeyError, TypeError, ValueError) as err:
            raise StateMismatch(f"not a transaction encoder state: {err}") from None
        if config != self._config():
            raise StateMismatch(
                f"state saved with settings {config}, this encoder has {self._config()}"
            )
        if (
            len(numeric) > self.numeric_slots
            or len(categorical) > self.categorical_slots
            or len(keys) != len(slots)
            or len(keys) != len(values)
            or totals.shape != (self.categorical_slots,)
            or (len(slots) and (slots.min() < 0 or slots.max() >= self.categorical_slots))
        ):
            raise StateMismatch("transaction encoder state is inconsistent")
        scaler = RobustScaler(
            dim=self.numeric_slots,
            reservoir=self.scaler_reservoir,
            refresh=self.scaler_refresh,
            squash=False,
            seed=self.seed,
        )
        scaler.set_state(scaler_state)  # raises StateMismatch itself
        counts: list[dict[str, int]] = [{} for _ in range(self.categorical_slots)]
        for key, slot, count in zip(keys, slots.tolist(), values.tolist()):
            counts[slot][key] = count
        self._scaler = scaler
        self._numeric = {name: i for i, name in enumerate(numeric)}
        self._categorical = {name: i for i, name in enumerate(categorical)}
        self._counts = counts
        self._totals = totals.tolist()
        self._n_learned = n_learned
        self._overflow_cache.clear()
        self._pair_cache.clear()
        self._plans.clear()
        self._forget_gathered()


def _payload(event: Event) -> dict:
    payload = event.payload
    if event.kind != "transaction" or not isinstance(payload, dict):
        raise WrongType(
            f"the transaction encoder got a {event.kind!r} event", field="kind"
        )
    return payload


def _prune(table: dict[str, int]) -> None:
    """Subtract the median count from every entry and drop those left at zero or below.

    At least half the entries (those at or above the median) lose the full
    median ``t``, so the stored total drops by at least ``t * len / 2``; as it
    never exceeds the number of observations ``N``, the subtractions of all
    prunes add up to at most ``2 N / len``: that bounds every count's error.
    """
    t = sorted(table.values())[len(table) // 2]
    for key, count in list(table.items()):
        if count <= t:
            del table[key]
        else:
            table[key] = count - t


__all__ = ["TransactionEncoder", "stable_hash"]

"""A batch admitted at once (``SourceState.admit_all``) is admitted as one event at a time would be."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from models.errors import InvalidEvent
from models.events import Event
from streams.config import Settings, SourceSettings
from streams.pipeline import Pipeline


def _state(window: int):
    pipe = Pipeline(settings=Settings(defaults=SourceSettings(dedup_window=window)), clock=lambda: 1000.0)
    return pipe.new_source("s", "transaction")


def _event(eid: str, kind: str = "transaction", ts: float | None = None) -> Event:
    return Event(eid, kind, "s", 1000.0 if ts is None else ts, {"a": 1.0}, None, ts is not None)


batches = st.lists(
    st.lists(st.builds(_event, st.sampled_from("abcdefgh"), st.sampled_from(["transaction"] * 5 + ["vector"]),
                       st.none() | st.sampled_from([10.0, 999.0])), max_size=6),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(batches, st.sampled_from([0, 1, 3, 5]))
def test_admit_all_is_admit_per_event_or_nothing(batches, window):
    fast, slow = _state(window), _state(window)
    for batch in batches:
        before = list(fast.seen), fast.watermark
        refused = []
        for e in batch:
            try:
                if e.kind != slow.kind:
                    raise InvalidEvent("another kind")
                slow.admit(e, now=1000.0, max_future=3600.0)
            except InvalidEvent:
                refused.append(e)
        if fast.admit_all(batch):
            assert not refused  # taken at once only when none would be refused
        else:
            assert (list(fast.seen), fast.watermark) == before  # nothing changed
            for e in batch:
                try:
                    if e.kind == fast.kind:
                        fast.admit(e, now=1000.0, max_future=3600.0)
                except InvalidEvent:
                    pass
        assert list(fast.seen) == list(slow.seen) and fast.watermark == slow.watermark


def test_a_batch_repeating_an_id_is_left_to_the_per_event_path():
    state = _state(10)
    assert not state.admit_all([_event("a"), _event("a")])
    assert state.admit_all([_event("a"), _event("b")])
    assert not state.admit_all([_event("b")])  # seen
    assert list(state.seen) == ["a", "b"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "add_new", "discard", "keep"]),
                          st.lists(st.sampled_from("abcdefghij"), max_size=5), st.integers(0, 6)), max_size=40))
def test_recent_ids_hold_what_an_ordered_dict_holds(steps):
    # the dedup window against the OrderedDict it replaced, operation by operation
    from collections import OrderedDict

    from streams.pipeline import RecentIds

    fast, slow = RecentIds(), OrderedDict()
    for op, ids, window in steps:
        if op == "add" and ids and ids[0] not in slow:
            fast.add(ids[0])
            slow[ids[0]] = None
        elif op == "add_new":
            taken = fast.add_new(ids)
            assert taken == (len(set(ids)) == len(ids) and slow.keys().isdisjoint(ids))
            if taken:
                slow.update(dict.fromkeys(ids))
        elif op == "discard" and ids:
            fast.discard(ids[0])
            slow.pop(ids[0], None)
        elif op == "keep":
            fast.keep_last(window)
            while len(slow) > window:
                slow.popitem(last=False)
        assert list(fast) == list(slow) and len(fast) == len(slow)
        assert all((i in fast) == (i in slow) for i in "abcdefghij")
    assert list(RecentIds(list(slow))) == list(slow)

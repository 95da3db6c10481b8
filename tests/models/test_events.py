from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import errors
from models.events import Limits, decode_event, decode_events, format_ts, parse_ts


def dec(obj, **kw):
    raw = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
    return decode_event(raw, arrival_ts=1000.0, **kw)


def test_valid_events_of_every_kind():
    t = dec({"id": "a", "kind": "transaction", "fields": {"amount": 3, "ok": True, "c": "GB", "n": None}})
    assert t.payload == {"amount": 3.0, "ok": 1.0, "c": "GB"} and t.source == "transaction"
    assert t.ts == 1000.0 and not t.has_ts
    log = dec({"id": "b", "kind": "log", "line": "x y", "source": "svc", "ts": 5})
    assert (log.source, log.ts, log.has_ts) == ("svc", 5.0, True)
    text = dec({"id": "c", "kind": "text", "text": "hi", "ts": "2026-11-23T10:00:00Z", "label": 1})
    assert text.ts == parse_ts("2026-11-23T10:00:00+00:00") and text.label == 1
    audio = dec({"id": "d", "kind": "audio", "mfcc": [[1, 2], [3, 4], [5, 6]]})
    assert audio.payload[0] == "mfcc" and audio.payload[1].shape == (3, 2)
    raw = dec({"id": "e", "kind": "audio", "samples": [0.0, 0.5, -0.5], "sample_rate": 16000})
    assert raw.payload[0] == "samples" and raw.payload[2] == 16000
    vec = dec({"id": "f", "kind": "vector", "vector": [1, 2.5]})
    assert vec.payload.dtype == np.float32 and vec.payload.tolist() == [1.0, 2.5]


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json", "not_json"),
        (b'{"id": "a", "kind": "vector", "vector": [NaN]}', "non_finite"),
        (b'{"id": "a", "kind": "vector", "vector": [Infinity]}', "non_finite"),
        (b"\xff\xfe\x00", "bad_encoding"),
        (b"[1]", "not_an_object"),
        (b'"text"', "not_an_object"),
        ({"kind": "text", "text": "x"}, "missing_field"),
        ({"id": "a", "text": "x"}, "missing_field"),
        ({"id": 5, "kind": "text", "text": "x"}, "wrong_type"),
        ({"id": "", "kind": "text", "text": "x"}, "empty_payload"),
        ({"id": "a", "kind": "sound", "x": 1}, "unknown_kind"),
        ({"id": "a", "kind": 3}, "wrong_type"),
        ({"id": "a", "kind": "text", "text": "x", "extra": 1}, "unknown_field"),
        ({"id": "a", "kind": "text", "text": "  "}, "empty_payload"),
        ({"id": "a", "kind": "text", "text": 7}, "wrong_type"),
        ({"id": "a", "kind": "text"}, "missing_field"),
        ({"id": "a", "kind": "text", "text": "x", "ts": "yesterday"}, "bad_timestamp"),
        ({"id": "a", "kind": "text", "text": "x", "ts": True}, "bad_timestamp"),
        ({"id": "a", "kind": "text", "text": "x", "label": 2}, "wrong_type"),
        ({"id": "a", "kind": "text", "text": "x", "source": ""}, "empty_payload"),
        ({"id": "a", "kind": "transaction", "fields": {}}, "empty_payload"),
        ({"id": "a", "kind": "transaction", "fields": []}, "wrong_type"),
        ({"id": "a", "kind": "transaction", "fields": {"a": [1]}}, "wrong_type"),
        ({"id": "a", "kind": "transaction", "fields": {"a": None}}, "empty_payload"),
        ({"id": "a", "kind": "vector", "vector": []}, "empty_payload"),
        ({"id": "a", "kind": "vector", "vector": [1, "2"]}, "wrong_type"),
        ({"id": "a", "kind": "vector", "vector": [True]}, "wrong_type"),
        ({"id": "a", "kind": "audio", "mfcc": [[1, 2], [3]]}, "wrong_type"),
        ({"id": "a", "kind": "audio", "mfcc": []}, "empty_payload"),
        ({"id": "a", "kind": "audio", "samples": [0.1]}, "missing_field"),
        ({"id": "a", "kind": "audio", "samples": [0.1], "sample_rate": 3}, "wrong_type"),
        ({"id": "a", "kind": "audio"}, "missing_field"),
        ({"id": "a", "kind": "log", "line": "x" * 30_000}, "oversized"),
    ],
)
def test_invalid_events_name_their_reason(raw, reason):
    with pytest.raises(errors.InvalidEvent) as info:
        dec(raw)
    assert info.value.reason == reason
    assert str(info.value)  # a message a person can read


def test_oversized_message_is_refused_before_parsing():
    with pytest.raises(errors.Oversized):
        dec(b'{"id": "a", "kind": "text", "text": "' + b"x" * 2_000_000 + b'"}')
    with pytest.raises(errors.Oversized):
        dec({"id": "a", "kind": "vector", "vector": [1.0] * 10}, limits=Limits(max_vector_dim=5))


def test_reason_codes_are_unique():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.InvalidEvent)]
    reasons = [c.reason for c in classes]
    assert len(reasons) == len(set(reasons))


def test_format_ts_round_trips():
    assert format_ts(0) == "1970-01-01T00:00:00.000Z"
    assert parse_ts(format_ts(1_763_892_000.25)) == 1_763_892_000.25


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"id": st.text(max_size=5), "kind": st.sampled_from(["transaction", "log", "text", "audio", "vector"])},
            optional={
                "fields": json_values, "line": json_values, "text": json_values, "mfcc": json_values,
                "vector": json_values, "samples": json_values, "sample_rate": json_values,
                "ts": json_values, "label": json_values, "source": json_values,
            },
        ).map(lambda d: json.dumps(d).encode()),
    )
)
def test_decoder_only_ever_raises_invalid_event(raw):
    try:
        event = decode_event(raw, arrival_ts=0.0)
    except errors.InvalidEvent as err:
        assert err.reason != "invalid_event"
    else:
        assert event.id and event.source and event.kind


def test_a_record_of_floats_decodes_as_the_general_path_would():
    # the all-floats fast path and the per-field path build the same fields
    fields = {"amount": 42.5, "hour": 13.0, "ratio": -0.25}
    mixed = {**fields, "card_present": True, "n": 3, "merchant": "grocery", "gone": None}
    e1 = dec({"id": "a", "kind": "transaction", "fields": fields})
    e2 = dec({"id": "a", "kind": "transaction", "fields": mixed})
    assert e1.payload == fields and all(type(v) is float for v in e1.payload.values())
    assert e2.payload == {**fields, "card_present": 1.0, "n": 3.0, "merchant": "grocery"}
    with pytest.raises(errors.InvalidEvent) as info:
        dec(b'{"id": "a", "kind": "transaction", "fields": {"a": 1.5, "b": NaN}}')
    assert info.value.reason == "non_finite"


def _one_by_one(raws, limits):
    out, errs = [], []
    for i, raw in enumerate(raws):
        try:
            out.append((i, decode_event(raw, arrival_ts=5.0, limits=limits)))
        except errors.InvalidEvent as err:
            errs.append((i, type(err), err.reason, str(err)))
    return out, errs


transaction_like = st.fixed_dictionaries(
    {"id": st.text(max_size=6), "kind": st.sampled_from(["transaction", "transaction", "log"]),
     "fields": st.dictionaries(st.text(max_size=3), st.floats(allow_nan=False) | st.integers() | st.text(max_size=3),
                               max_size=5)},
    optional={"source": st.text(max_size=6) | st.integers(), "ts": st.floats(0, 2e9) | st.text(max_size=4),
              "label": st.sampled_from([None, 0, 1, 2]), "line": st.text(max_size=4), "extra": st.integers()},
).map(lambda d: json.dumps(d).encode())


@settings(max_examples=300, deadline=None)
@given(st.lists(transaction_like | st.binary(max_size=40) | json_values.map(lambda v: json.dumps(v).encode()),
                max_size=8))
def test_decode_events_is_decode_event_per_message(raws):
    # the batch decoder's in-line checks of common transactions: the same events, the same errors
    limits = Limits(max_id_chars=4, max_fields=3, max_bytes=150)
    events, errs = decode_events(raws, arrival_ts=5.0, limits=limits)
    assert (events, [(i, type(e), e.reason, str(e)) for i, e in errs]) == _one_by_one(raws, limits)


# Batches of nearly common transaction events: the whole-batch checks of
# decode_events (_common_transactions) take the batch or leave it to the per-event
# loop; either way the events and errors are decode_event's, message by message.
common_like = st.fixed_dictionaries(
    {"id": st.sampled_from(["a", "bb", "abcd", "abcde", ""]) | st.integers(0, 3),
     "kind": st.sampled_from(["transaction"] * 6 + ["log"]),
     "fields": st.dictionaries(st.sampled_from(["x", "y", "z", "w"]),
                               st.floats(-1e6, 1e6) | st.floats(-1e6, 1e6) | st.integers(-3, 3) | st.booleans()
                               | st.just("s") | st.none(), max_size=4)},
    optional={"source": st.sampled_from(["s", "src1", "sourc", ""]) | st.integers(0, 3),
              "ts": st.just(7.0), "label": st.sampled_from([None, 0])},
).map(lambda d: json.dumps(d).encode())


@settings(max_examples=400, deadline=None)
@given(st.lists(common_like, min_size=1, max_size=6), st.booleans())
def test_whole_batch_decoding_is_decode_event_per_message(raws, str_input):
    from models.events import _common_transactions

    limits = Limits(max_id_chars=4, max_fields=3, max_bytes=150)
    if str_input:
        raws = [r.decode() for r in raws]
    events, errs = decode_events(raws, arrival_ts=5.0, limits=limits)
    assert (events, [(i, type(e), e.reason, str(e)) for i, e in errs]) == _one_by_one(raws, limits)
    taken = _common_transactions(raws, 5.0, limits)
    if taken is not None:
        assert not errs and taken[0] == events
        assert all(type(v) is float for _, e in events for v in e.payload.values())


def test_a_batch_of_common_transactions_is_checked_whole():
    from models.events import _common_transactions

    raws = [json.dumps({"id": f"t{i}", "source": "cards", "kind": "transaction",
                        "fields": {"amount": 1.5 * i, "hour": 3.0}}).encode() for i in range(40)]
    events, _ = _common_transactions(raws, 5.0, Limits())
    assert events == decode_events(raws, arrival_ts=5.0)[0]
    assert [e.id for _, e in events] == [f"t{i}" for i in range(40)]
    # one message out of line (an int field, a time, another key order, a bad line)
    # leaves the batch to the per-event loop, which then decodes or names each message
    for bad in (b'{"id":"x","kind":"transaction","fields":{"amount":1}}',
                b'{"id":"x","kind":"transaction","fields":{"amount":1.0},"ts":3.0}',
                b'{"kind":"transaction","id":"x","fields":{"amount":1.0}}',
                b'{"id":"x","kind":"transaction","fields":{"amount":1.0}'):
        assert _common_transactions(raws[:5] + [bad], 5.0, Limits()) is None
        got, errs = decode_events(raws[:5] + [bad], arrival_ts=5.0)
        assert (got, [(i, type(e), e.reason, str(e)) for i, e in errs]) == _one_by_one(raws[:5] + [bad], Limits())

"""TransactionEncoder: fixed layout, stable dimensions, rarity, robust scaling, state."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from models.base import Encoder, Learner, Stateful
from models.errors import NonFinite, StateMismatch, WrongType
from models.events import Event
from models.tabular import TransactionEncoder, stable_hash

ROOT = Path(__file__).resolve().parents[2]

# 2024-01-01 00:00:00 UTC, a Monday.
MONDAY_MIDNIGHT = 1_704_067_200.0


def tx(payload: dict, *, i: int = 0, ts: float | None = None) -> Event:
    return Event(
        id=f"t{i}",
        kind="transaction",
        source="cards",
        ts=0.0 if ts is None else ts,
        payload=payload,
        has_ts=ts is not None,
    )


def stream(n: int, seed: int = 0, **extra) -> list[Event]:
    """A card-payment-like stream: heavy-tailed amount, a normal score, a skewed country."""
    rng = np.random.default_rng(seed)
    countries = rng.choice(["FR", "DE", "IT"], size=n, p=[0.8, 0.15, 0.05])
    out = []
    for i in range(n):
        payload = {
            "amount": float(rng.lognormal(3.0, 1.5)),
            "score": float(rng.normal()),
            "country": str(countries[i]),
        }
        payload.update(extra)
        out.append(tx(payload, i=i))
    return out


def state_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True):
                return False
        elif isinstance(x, dict):
            if not isinstance(y, dict) or not state_equal(x, y):
                return False
        elif x != y:
            return False
    return True


def small(**kw) -> TransactionEncoder:
    params = dict(numeric_slots=8, categorical_slots=4, hash_buckets=8)
    params.update(kw)
    return TransactionEncoder(**params)


def test_protocols_and_tags():
    enc = TransactionEncoder()
    assert isinstance(enc, Encoder) and isinstance(enc, Learner) and isinstance(enc, Stateful)
    assert (enc.name, enc.version, enc.metric) == ("transaction", "1", "l2")


def test_fixed_width_whatever_the_payload():
    enc = TransactionEncoder()
    assert enc.dim == 64 + 16 + 16 + 4
    assert TransactionEncoder(time_features=False).dim == 96
    assert len(enc.dim_names()) == enc.dim
    assert enc.encode([]).shape == (0, enc.dim)
    before = enc.encode([tx({"a": 1.0}), tx({"b": "x", "c": 2.0})])
    assert before.shape == (2, enc.dim) and before.dtype == np.float32
    enc.learn(stream(50) + [tx({f"f{j}": float(j) for j in range(100)})])  # more names than slots
    out = enc.encode(stream(5, seed=1) + [tx({"zzz": "new", "other": 1e12})])
    assert out.shape == (6, enc.dim) and out.dtype == np.float32
    assert np.isfinite(out).all()


def test_dimensions_never_move_when_new_fields_and_values_appear():
    # refresh=1 keeps the scaler's statistics current after every learn, and a
    # reservoir larger than everything learnt means rows without a field (NaN
    # there) leave that field's median and IQR exactly as they were.
    enc = small(scaler_refresh=1, scaler_reservoir=4096)
    old = stream(300)
    enc.learn(old)
    before = enc.encode(old[:20])
    fields_before = enc.numeric_fields, enc.categorical_fields

    rng = np.random.default_rng(5)
    newcomers = [
        tx({"velocity": float(rng.normal(10, 2)), "merchant": f"m{i % 7}"}, i=1000 + i)
        for i in range(100)
    ]
    enc.learn(newcomers)
    after = enc.encode(old[:20])
    np.testing.assert_array_equal(after, before)
    # The new names took the next free slots; the old ones kept theirs.
    assert enc.numeric_fields == fields_before[0] + ("velocity",)
    assert enc.categorical_fields == fields_before[1] + ("merchant",)
    new_vec = enc.encode(newcomers[:1])[0]
    names = enc.dim_names()
    assert new_vec[names.index("num:velocity")] != 0.0
    assert new_vec[names.index("rarity:merchant")] > 0.0


def test_new_field_is_missing_until_learnt_and_encode_assigns_no_slot():
    enc = small()
    enc.learn(stream(100))
    plain = enc.encode([tx({"amount": 20.0, "score": 0.5})])
    with_new = enc.encode([tx({"amount": 20.0, "score": 0.5, "velocity": 99.0})])
    np.testing.assert_array_equal(with_new, plain)
    assert "velocity" not in enc.numeric_fields


def test_names_beyond_the_slots_share_slots_by_stable_hash():
    enc = TransactionEncoder(numeric_slots=3, categorical_slots=1, hash_buckets=4)
    enc.learn([tx({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0}, i=i) for i in range(20)])
    assert enc.numeric_fields == ("a", "b", "c")
    overflow = enc.encode([tx({"d": 4.0})])[0, :3]
    slot = zlib.crc32(b"d") % 3
    assert stable_hash("d") == zlib.crc32(b"d")
    assert overflow[slot] != 0.0
    assert np.count_nonzero(overflow) == 1


def test_encoding_does_not_depend_on_the_process_hash_seed():
    code = (
        "import numpy as np\n"
        "from models.events import Event\n"
        "from models.tabular import TransactionEncoder\n"
        "enc = TransactionEncoder(numeric_slots=2, categorical_slots=1, hash_buckets=8)\n"
        "ev = [Event(id=str(i), kind='transaction', source='s', ts=0.0,\n"
        "            payload={'a': float(i), 'b': 1.0, 'c': 2.0, 'shop': f's{i % 3}',\n"
        "                     'city': 'x'}) for i in range(30)]\n"
        "enc.learn(ev)\n"
        "print(enc.encode(ev[:5]).tobytes().hex())\n"
    )
    outs = set()
    for seed in ("1", "2"):
        res = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
            timeout=60,
            check=True,
        )
        outs.add(res.stdout)
    assert len(outs) == 1


def test_unseen_value_is_rarer_than_a_frequent_one():
    enc = small(max_values=2048)
    enc.learn(stream(500))
    names = enc.dim_names()
    col = names.index("rarity:country")
    r = {c: enc.encode([tx({"country": c})])[0, col] for c in ("FR", "DE", "IT", "XX")}
    assert r["FR"] < r["DE"] < r["IT"] < r["XX"]
    # FR is ~80%: about -log10(0.8). An unseen value has the smoothed frequency
    # 0.5 / (N + 1), down to the floor of the bounded counter, 2 / max_values.
    assert r["FR"] == pytest.approx(-math.log10(0.8), abs=0.05)
    assert r["XX"] == pytest.approx(-math.log10(0.5 / 501), abs=1e-5)
    enc.learn(stream(1500, seed=1))
    floor = enc.encode([tx({"country": "XX"})])[0, col]
    assert floor == pytest.approx(math.log10(2048 / 2), abs=1e-5)
    # An event without the field says nothing unusual about it.
    assert enc.encode([tx({"amount": 3.0})])[0, col] == 0.0


def test_hashed_values_separate_by_value_at_bounded_weight():
    enc = small()
    enc.learn(stream(200))
    b0 = enc.numeric_slots + enc.categorical_slots
    h = enc.encode([tx({"country": "FR"}), tx({"country": "DE"}), tx({"country": "FR"})])
    hashed = h[:, b0 : b0 + enc.hash_buckets]
    np.testing.assert_array_equal(hashed[0], hashed[2])
    # One field adds one signed unit times 1/sqrt(2): a change of value moves by 1.
    assert np.linalg.norm(hashed[0]) == pytest.approx(1 / math.sqrt(2))
    assert np.linalg.norm(hashed[0] - hashed[1]) == pytest.approx(1.0)


def test_value_counts_stay_bounded_and_frequent_values_stay_accurate():
    enc = TransactionEncoder(numeric_slots=1, categorical_slots=1, hash_buckets=0, max_values=64)
    rng = np.random.default_rng(0)
    n = 20_000
    events = [
        tx({"merchant": "big" if rng.random() < 0.3 else f"m{i}"}, i=i) for i in range(n)
    ]
    for b in range(0, n, 500):
        enc.learn(events[b : b + 500])
        assert len(enc.get_state()["count_keys"]) <= 64
    rarity = float(enc.encode([tx({"merchant": "big"})])[0, 1])
    # Misra-Gries bound: the frequency is under-estimated by at most 2 / 64.
    p = 10**-rarity
    assert 0.3 - 2 / 64 - 0.02 <= p <= 0.3 + 0.02
    assert float(enc.encode([tx({"merchant": "m3"})])[0, 1]) == pytest.approx(math.log10(32))


def test_heavy_tailed_amounts_do_not_collapse_other_dims():
    rng = np.random.default_rng(1)
    events = []
    for i in range(2000):
        amount = float(rng.lognormal(3.0, 2.0))
        if i % 100 == 0:
            amount = 1e9  # a few absurd amounts
        events.append(tx({"amount": amount, "score": float(rng.normal())}, i=i))
    enc = small()
    enc.learn(events)
    amounts = np.array([e.payload["amount"] for e in events])
    q25, q75 = np.percentile(amounts, [25, 75])
    v = enc.encode(
        [
            tx({"amount": q25, "score": 0.0}),
            tx({"amount": q75, "score": 0.0}),
            tx({"amount": q25, "score": 1.0}),
            tx({"amount": 1e9, "score": 0.0}),
        ]
    )
    a, s = enc.dim_names().index("num:amount"), enc.dim_names().index("num:score")
    # Ordinary amounts keep their spread (IQR is 1.349 robust sigmas).
    assert abs(v[1, a] - v[0, a]) > 0.8
    # One robust sigma of the other field still counts the same.
    c = enc.squash_scale
    assert v[2, s] - v[0, s] == pytest.approx(c * math.asinh(1.0 / c), abs=0.1)
    # The absurd amount is far, but hundreds of units away at most, not 1e9 / IQR.
    assert 5 * c < v[3, a] < 20 * c
    unsquashed = small(squash=False)
    unsquashed.learn(events)
    assert unsquashed.encode([tx({"amount": 1e9})])[0, a] > 1e4


def test_missing_fields_are_the_median():
    enc = small()
    enc.learn(stream(300))
    full, missing = enc.encode(
        [
            tx({"amount": 500.0, "score": 2.0, "country": "DE"}),
            tx({"amount": 500.0, "country": "DE"}),
        ]
    )
    s = enc.dim_names().index("num:score")
    assert full[s] != 0.0 and missing[s] == 0.0
    np.testing.assert_array_equal(np.delete(full, s), np.delete(missing, s))


def test_encode_does_not_change_state():
    enc = small()
    enc.learn(stream(300))
    before = enc.get_state()
    enc.encode(stream(50, seed=3) + [tx({"brand_new": 1.0, "also_new": "v"}, ts=1e9)])
    assert state_equal(before, enc.get_state())


def test_learn_changes_state():
    enc = small()
    enc.learn(stream(300))
    before = enc.get_state()
    enc.learn(stream(10, seed=4))
    assert not state_equal(before, enc.get_state())


def _is_plain(value) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype != object
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def test_state_round_trip_gives_identical_outputs():
    a = small()
    a.learn(stream(400))
    state = a.get_state()
    assert _is_plain(state)
    json.dumps(state["config"])
    b = small()
    b.set_state(state)
    probe = stream(30, seed=9) + [tx({"country": "NEW", "amount": 1e6}, ts=MONDAY_MIDNIGHT)]
    np.testing.assert_array_equal(a.encode(probe), b.encode(probe))
    # And they go on learning the same way (the reservoir's random state came along).
    more = stream(3000, seed=10)
    a.learn(more)
    b.learn(more)
    np.testing.assert_array_equal(a.encode(probe), b.encode(probe))


def test_state_from_other_settings_is_refused():
    a = small()
    a.learn(stream(50))
    with pytest.raises(StateMismatch):
        small(numeric_slots=9).set_state(a.get_state())
    with pytest.raises(StateMismatch):
        small(squash=False).set_state(a.get_state())
    with pytest.raises(StateMismatch):
        small().set_state({"config": {}})


def test_time_features():
    enc = small(time_weight=0.5)
    t0 = enc.dim - 4
    monday = enc.encode([tx({"a": 1.0}, ts=MONDAY_MIDNIGHT)])[0, t0:]
    np.testing.assert_allclose(monday, [0.0, 0.5, 0.0, 0.5], atol=1e-6)
    six_am = enc.encode([tx({"a": 1.0}, ts=MONDAY_MIDNIGHT + 6 * 3600)])[0, t0:]
    np.testing.assert_allclose(six_am[:2], [0.5, 0.0], atol=1e-6)
    thursday = enc.encode([tx({"a": 1.0}, ts=MONDAY_MIDNIGHT + 3 * 86_400)])[0, t0:]
    angle = 2 * math.pi * 3 / 7
    expected = [0.5 * math.sin(angle), 0.5 * math.cos(angle)]
    np.testing.assert_allclose(thursday[2:], expected, atol=1e-6)
    no_ts = enc.encode([tx({"a": 1.0})])[0, t0:]
    np.testing.assert_array_equal(no_ts, np.zeros(4))
    assert small(time_features=False).encode([tx({"a": 1.0}, ts=MONDAY_MIDNIGHT)]).shape[1] == t0


def test_time_features_of_a_batch_are_those_of_its_events_alone():
    """A batch without event times skips the time features (left 0); with some, each row
    is what its event gives alone: batches mixing both, and none, encode row by row alike."""
    enc = small(time_weight=0.5)
    enc.learn(stream(200))
    t0 = enc.dim - 4
    mixed = [tx({"amount": 1.0 + i}, i=i, ts=None if i % 3 else MONDAY_MIDNIGHT + 7_000.0 * i) for i in range(9)]
    for batch in (mixed, [e for e in mixed if not e.has_ts], [e for e in mixed if e.has_ts]):
        X = enc.encode(batch)
        np.testing.assert_array_equal(X, np.concatenate([enc.encode([e]) for e in batch]))
        assert (X[:, t0:] != 0).any(axis=1).tolist() == [e.has_ts for e in batch]


def test_bad_events_raise_declared_errors():
    enc = small()
    with pytest.raises(WrongType):
        enc.encode([Event(id="x", kind="log", source="l", ts=0.0, payload="a line")])
    with pytest.raises(WrongType):
        enc.encode([tx({"a": [1, 2]})])
    with pytest.raises(NonFinite) as err:
        enc.encode([tx({"a": 1.0}, i=0), tx({"a": math.inf}, i=1)])
    assert "t1" in str(err.value)
    with pytest.raises(NonFinite):
        enc.learn([tx({"a": math.nan})])
    assert enc.n_learned == 0


def test_bools_and_ints_are_numbers():
    enc = small()
    enc.learn([tx({"flag": float(i % 2), "n": i}, i=i) for i in range(40)])
    a = enc.encode([tx({"flag": True, "n": 3})])
    b = enc.encode([tx({"flag": 1.0, "n": 3.0})])
    np.testing.assert_array_equal(a, b)


def test_categorical_overflow_shares_a_slot_by_hash_and_counts_pairs():
    enc = TransactionEncoder(numeric_slots=1, categorical_slots=2, hash_buckets=0)
    enc.learn([tx({"a": "x", "b": "y", "c": "z"}, i=i) for i in range(50)])
    assert enc.categorical_fields == ("a", "b")
    slot = 1 + stable_hash("c") % 2  # after the one numeric slot
    seen, unseen, other_field = enc.encode(
        [tx({"c": "z"}), tx({"c": "new"}), tx({"a": "z"})]
    )
    assert 0.0 < seen[slot] < unseen[slot]
    # "z" was counted as (c, z): the same value in field a is still unseen there.
    assert other_field[1] == pytest.approx(-math.log10(0.5 / 51), abs=1e-5)


def test_a_field_seen_as_number_and_as_string_gets_both_kinds_of_slot():
    enc = small()
    enc.learn([tx({"x": float(i)}, i=i) for i in range(20)] + [tx({"x": "code"}, i=99)])
    assert enc.numeric_fields == ("x",) and enc.categorical_fields == ("x",)
    names = enc.dim_names()
    v = enc.encode([tx({"x": "code"}), tx({"x": 3.0})])
    assert v[0, names.index("num:x")] == 0.0 and v[0, names.index("rarity:x")] > 0.0
    assert v[1, names.index("num:x")] != 0.0 and v[1, names.index("rarity:x")] == 0.0


def test_learning_what_was_just_encoded_learns_what_learning_alone_learns():
    # learn() takes the rows encode() gathered for the same events (numbers only,
    # every field with its slot); a new field, a string field, an event encoded
    # twice, or events never encoded take the full path. Both encoders must end
    # in the same state and encode alike.
    rng = np.random.default_rng(3)

    def batch(i0, n, **extra):
        return [tx({"a": float(rng.normal()), "b": float(rng.exponential())} | extra, i=i0 + i) for i in range(n)]

    blocks = [batch(0, 40), batch(40, 40), batch(80, 40, c=1.5), batch(120, 40, c=2.5),
              batch(160, 40, country="FR"), batch(200, 40)]
    cached, plain = small(), small()
    for j, block in enumerate(blocks):
        if j != 5:  # the last block is learnt without being encoded
            cached.encode(block[:25])
            cached.encode(block[25:])
        if j == 1:
            cached.encode(blocks[0])  # other events encoded in between: not learnt now
        cached.learn(block[::2] if j == 3 else block)  # a subset of what was encoded
        plain.learn(block[::2] if j == 3 else block)
        assert state_equal(cached.get_state(), plain.get_state())
    probe = batch(300, 20, c=0.5)
    np.testing.assert_array_equal(cached.encode(probe), plain.encode(probe))


def test_a_list_reused_after_encode_does_not_lend_its_old_rows_to_learn():
    # The rows kept for learn() belong to the events encoded, not to the caller's list:
    # a list refilled with other events between encode() and learn() learns the new ones.
    rng = np.random.default_rng(4)
    first = [tx({"a": float(rng.normal()), "b": float(rng.exponential())}, i=i) for i in range(30)]
    cached, plain = small(), small()
    cached.learn(first)
    plain.learn(first)
    again = [tx({"a": float(rng.normal()), "b": float(rng.exponential())}, i=100 + i) for i in range(30)]
    cached.encode(again)  # one batch learnt whole: its own matrix
    cached.learn(again)
    plain.learn(again)
    assert state_equal(cached.get_state(), plain.get_state())
    events = [tx({"a": float(rng.normal()), "b": float(rng.exponential())}, i=30 + i) for i in range(30)]
    cached.encode(events)
    events[5] = tx({"a": 50.0, "b": 70.0}, i=99)  # same schema, another event in the same place
    cached.learn(events)
    plain.learn(events)
    assert state_equal(cached.get_state(), plain.get_state())


@pytest.mark.parametrize("numbers_only", [True, False])
def test_one_schema_batch_scales_only_its_slots_and_equals_the_whole_matrix(numbers_only):
    # encode() scales just the slots of a one-schema batch; every other numeric
    # slot is NaN in the raw matrix and 0 out, so the vectors are those of the
    # whole matrix, bit for bit
    rng = np.random.default_rng(3)
    events = [tx({"b": float(rng.normal()), "a": float(rng.lognormal()), "z": float(rng.integers(3)),
                  **({} if numbers_only else {"c": str(rng.choice(["x", "y"]))})}, i=i) for i in range(300)]
    enc = small()
    enc.learn(events[:200])
    got = enc.encode(events[200:])
    assert enc._filled is not None and len(enc._filled) == 3
    raw = enc._gather(events[200:])[0]
    c = np.float32(enc.squash_scale)
    whole = c * np.arcsinh(enc._scaler.transform(raw) / c)
    assert np.array_equal(got[:, : enc.numeric_slots], whole)
    assert np.count_nonzero(got[:, : enc.numeric_slots].any(axis=0)) == 3


def _lines(rows: list[dict], start: int = 0) -> list[bytes]:
    return [json.dumps({"id": f"n{start + i}", "source": "s", "kind": "transaction", "fields": f}).encode()
            for i, f in enumerate(rows)]


def test_decoded_numbers_hold_the_fields_of_a_batch_of_one_schema():
    from models.events import decode_batch

    rows = [{"a": float(i), "b": -0.5 * i, "c": 1e300} for i in range(20)]
    events, errors, numbers = decode_batch(_lines(rows), arrival_ts=1.0)
    assert not errors and numbers is not None and numbers.names == ("a", "b", "c")
    assert numbers.values.dtype == np.float64 and numbers.values.shape == (20, 3)
    assert numbers.values.tolist() == [list(e.payload.values()) for _, e in events]
    # another key order, a missing field, a string: no numbers (the events all the same)
    for odd in ({"b": 1.0, "a": 2.0, "c": 3.0}, {"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0, "c": "x"}):
        ev, err, num = decode_batch(_lines(rows[:3] + [odd]), arrival_ts=1.0)
        assert num is None and not err and [e.payload for _, e in ev] == rows[:3] + [odd]


@pytest.mark.parametrize("learn_first", [True, False])
def test_encode_numbers_is_encode_bit_for_bit_and_learns_alike(learn_first):
    # the decoder's NumberRows against the payloads, block after block, slices and picks of rows
    from models.events import decode_batch

    rng = np.random.default_rng(4)
    a, b = TransactionEncoder(), TransactionEncoder()
    names = ["amount", "hour", "n"]
    for block in range(12):
        vals = rng.standard_normal((40, 3)) * [100.0, 5.0, 1.0]
        if block == 5:
            vals[:, 0] = 1e8  # far out: squashed
        rows = [dict(zip(names, map(float, r))) for r in vals]
        events, _, numbers = decode_batch(_lines(rows, 40 * block), arrival_ts=1.0)
        assert numbers is not None
        events = [e for _, e in events]
        if learn_first and block == 0:
            a.learn(events)
            b.learn(events)
        pick = [0, 3, 4, 9, 17, 30] if block % 2 else slice(5, 37)
        sub = events[pick] if isinstance(pick, slice) else [events[i] for i in pick]
        numbers = numbers._replace(values=numbers.values[pick])
        xa, xb = a.encode(sub), b.encode_numbers(sub, numbers)
        assert xa.dtype == xb.dtype == np.float32 and xa.tobytes() == xb.tobytes()
        a.learn(sub)
        b.learn(sub)
    assert a.get_state()["scaler_rows"].tobytes() == b.get_state()["scaler_rows"].tobytes()
    assert a.encode(sub).tobytes() == b.encode(sub).tobytes()

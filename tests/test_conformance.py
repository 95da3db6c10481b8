"""Conformance checks run over every encoder and every detector (river's ``check_estimator`` habit).

Each check is one property every implementation must keep: shapes and dtypes,
finite outputs, reading never changes state, bad input raises the declared
error, memory stays bounded after ten times the capacity, and a state round
trip gives identical results.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import numpy as np
import pytest

from detectors.drift import CentroidDriftMonitor
from detectors.knn import KNNDetector
from detectors.monitor import SourceMonitor
from models import errors
from models.audio import AudioEncoder
from models.base import Encoder, Learner, Stateful
from models.events import Event, event_from_dict
from models.logs import LogEncoder
from models.tabular import TransactionEncoder
from models.text import HashingTextBackend, TextEncoder
from models.vector import VectorEncoder
from tests.conftest import assert_plain_state, assert_state_equal

WORDS = "card payment declined refund login app crash balance transfer pending statement fee".split()


def _event(i: int, kind: str, payload: dict, rng: np.random.Generator) -> Event:
    d = {"id": f"{kind}-{i}", "kind": kind, "ts": 1_763_856_000 + 37 * i, **payload}
    return event_from_dict(d, arrival_ts=0.0)


def make_events(kind: str, n: int, seed: int = 0) -> list[Event]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if kind == "transaction":
            p = {"fields": {"amount": float(rng.lognormal(3, 1)), "items": int(rng.integers(1, 5)),
                            "country": str(rng.choice(["GB", "FR", "DE"])), "online": bool(rng.random() < 0.3)}}
        elif kind == "log":
            p = {"line": f"2026-11-23 10:00:{i % 60:02d} INFO worker {rng.integers(1, 99)} "
                         f"{rng.choice(['started', 'stopped', 'idle'])} job {rng.integers(1000, 9999)}"}
        elif kind == "text":
            p = {"text": " ".join(rng.choice(WORDS, size=6))}
        elif kind == "audio":
            frames = rng.normal(size=(int(rng.integers(5, 30)), 13)) * 10
            p = {"mfcc": frames.round(3).tolist()}
        elif kind == "vector":
            p = {"vector": (rng.normal(size=16) + 1).round(4).tolist()}
        out.append(_event(i, kind, p, rng))
    return out


ENCODERS: dict[str, Callable[[], Encoder]] = {
    "transaction": lambda: TransactionEncoder(),
    "log": lambda: LogEncoder(backend=HashingTextBackend(dim=32), cache_size=100),
    "text": lambda: TextEncoder(backend=HashingTextBackend(dim=32), cache_size=100),
    "audio": lambda: AudioEncoder(),
    "vector": lambda: VectorEncoder(),
}


@pytest.fixture(params=sorted(ENCODERS))
def kind(request) -> str:
    return request.param


def _learnt(kind: str, n: int = 300) -> tuple[Encoder, list[Event]]:
    enc = ENCODERS[kind]()
    events = make_events(kind, n)
    if isinstance(enc, Learner):
        enc.learn(events[: n // 2])
    return enc, events


def test_encoder_output_shape_dtype_and_finite(kind):
    enc, events = _learnt(kind)
    assert isinstance(enc, Encoder) and enc.metric in ("l2", "cosine")
    assert "@" not in enc.name and enc.version
    X = enc.encode(events[150:])
    assert X.dtype == np.float32 and X.shape == (150, enc.dim) and np.isfinite(X).all()
    assert enc.encode(events[150:151]).shape == (1, enc.dim)
    assert enc.encode(events[:0]).shape[0] == 0


def test_encoder_is_deterministic_and_encode_does_not_change_state(kind):
    enc, events = _learnt(kind)
    before = enc.get_state() if isinstance(enc, Stateful) else None
    a = enc.encode(events[150:])
    b = enc.encode(events[150:])
    np.testing.assert_array_equal(a, b)
    # batch composition does not matter
    np.testing.assert_array_equal(a[:10], enc.encode(events[150:160]))
    if before is not None:
        assert_state_equal(before, enc.get_state())


def test_encoder_state_round_trip_gives_identical_vectors(kind):
    enc, events = _learnt(kind)
    if not isinstance(enc, Stateful):
        pytest.skip(f"{kind} encoder keeps no state")
    state = enc.get_state()
    assert_plain_state(state)
    fresh = ENCODERS[kind]()
    fresh.set_state(state)
    np.testing.assert_array_equal(enc.encode(events[150:]), fresh.encode(events[150:]))
    if isinstance(enc, Learner):  # and they go on learning identically
        enc.learn(events[150:200])
        fresh.learn(events[150:200])
        np.testing.assert_array_equal(enc.encode(events[200:]), fresh.encode(events[200:]))


def test_encoder_state_survives_json_for_non_array_parts(kind):
    enc, _ = _learnt(kind)
    if not isinstance(enc, Stateful):
        pytest.skip(f"{kind} encoder keeps no state")

    def strip(v):
        if isinstance(v, np.ndarray):
            return None
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [strip(x) for x in v]
        return v

    json.dumps(strip(enc.get_state()))


def test_encoder_memory_is_bounded(kind):
    enc = ENCODERS[kind]()
    many = make_events(kind, 3000, seed=1)
    for i in range(0, 3000, 250):
        batch = many[i : i + 250]
        enc.encode(batch)
        if isinstance(enc, Learner):
            enc.learn(batch)
    size = len(json.dumps(_sizes(enc.get_state() if isinstance(enc, Stateful) else {})))
    more = make_events(kind, 3000, seed=2)
    for i in range(0, 3000, 250):
        batch = more[i : i + 250]
        enc.encode(batch)
        if isinstance(enc, Learner):
            enc.learn(batch)
    cache = getattr(enc, "cache", None)
    if cache is not None:
        assert len(cache) <= cache.maxsize
    # the saved state does not grow with the stream once warm (the sample stream has
    # bounded vocabularies, so a growing state would mean an unbounded structure)
    after = len(json.dumps(_sizes(enc.get_state() if isinstance(enc, Stateful) else {})))
    assert after <= size * 1.5 + 200


def _sizes(state):
    if isinstance(state, np.ndarray):
        return state.nbytes
    if isinstance(state, dict):
        return {k: _sizes(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return len(state)
    return state if isinstance(state, (int, float)) else sys.getsizeof(state)


def test_vector_encoder_refuses_wrong_dimension_and_zero_vectors():
    enc = VectorEncoder()
    events = make_events("vector", 5)
    enc.learn(events)
    bad = event_from_dict({"id": "x", "kind": "vector", "vector": [1.0, 2.0]}, arrival_ts=0)
    with pytest.raises(errors.WrongDimension):
        enc.encode([bad])
    zero = event_from_dict({"id": "z", "kind": "vector", "vector": [0.0] * 16}, arrival_ts=0)
    with pytest.raises(errors.ZeroVector):
        enc.encode([zero])


# -- detectors ------------------------------------------------------------------------

DETECTORS: dict[str, Callable[[], object]] = {
    "knn-exact": lambda: KNNDetector(k=5, capacity=200, backend="exact"),
    "knn-hnsw": lambda: KNNDetector(k=5, capacity=200, backend="hnsw"),
    "monitor": lambda: SourceMonitor(reference_size=200, calibration_size=400, min_reference=50,
                                     drift_reference_size=200, drift_block=20),
    "monitor-forest": lambda: SourceMonitor(reference_size=200, calibration_size=400, min_reference=50,
                                            drift_reference_size=200, drift_block=20, forest_trees=10),
    "drift": lambda: CentroidDriftMonitor(reference_size=200, block_size=20, bootstrap=500),
}


def _feed(det, X):
    ids = [f"e{i}" for i in range(len(X))]
    for i in range(0, len(X), 64):
        if isinstance(det, KNNDetector):
            det.learn(X[i : i + 64], ids[i : i + 64])
        elif isinstance(det, SourceMonitor):
            det.process(X[i : i + 64], ids[i : i + 64])
        else:
            det.update(X[i : i + 64], ids[i : i + 64])


@pytest.fixture(params=sorted(DETECTORS))
def detector_name(request) -> str:
    return request.param


def _probe(det, Q):
    """What a detector says about Q without learning from it."""
    if isinstance(det, KNNDetector):
        return det.score(Q)
    if isinstance(det, SourceMonitor):
        r = det.detector.query(Q)
        d = det.score(Q)  # the decision's own score: the combined one with forest_trees
        return np.concatenate([r.scores, det.thresholder.p_values(r.scores), d.scores, d.p_values])
    return np.array([det.statistic, det.threshold])


def test_detector_scores_shape_finite_and_reading_does_not_change_state(detector_name, rng):
    det = DETECTORS[detector_name]()
    _feed(det, rng.normal(size=(600, 8)).astype(np.float32))
    before = det.get_state()
    Q = rng.normal(size=(40, 8)).astype(np.float32)
    out = _probe(det, Q)
    assert np.isfinite(out).all()
    if isinstance(det, KNNDetector):
        assert out.shape == (40,) and (out >= 0).all()
    _probe(det, Q)
    assert_state_equal(before, det.get_state())


def test_detector_bad_input_raises_declared_errors(detector_name, rng):
    det = DETECTORS[detector_name]()
    _feed(det, rng.normal(size=(300, 8)).astype(np.float32))
    before = det.get_state()
    wrong = rng.normal(size=(3, 9)).astype(np.float32)
    nan = rng.normal(size=(3, 8)).astype(np.float32)
    nan[1, 2] = np.nan
    for bad, err in ((wrong, errors.WrongDimension), (nan, errors.NonFinite)):
        with pytest.raises(err):
            if isinstance(det, KNNDetector):
                det.learn(bad)
            elif isinstance(det, SourceMonitor):
                det.process(bad, ["a", "b", "c"])
            else:
                det.update(bad, ["a", "b", "c"])
    assert_state_equal(before, det.get_state())


def test_detector_memory_bounded_after_ten_times_capacity(detector_name, rng):
    det = DETECTORS[detector_name]()
    _feed(det, rng.normal(size=(400, 8)).astype(np.float32))
    size = _state_bytes(det.get_state())
    _feed(det, rng.normal(size=(4000, 8)).astype(np.float32))
    assert _state_bytes(det.get_state()) <= size * 1.05 + 4096


def _state_bytes(state) -> int:
    if isinstance(state, np.ndarray):
        return state.nbytes
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state) + 8 * len(state)
    return 8


def test_detector_state_round_trip_gives_identical_results(detector_name, rng):
    det = DETECTORS[detector_name]()
    _feed(det, rng.normal(size=(700, 8)).astype(np.float32))
    state = det.get_state()
    assert_plain_state(state)
    twin = DETECTORS[detector_name]()
    twin.set_state(state)
    Q = rng.normal(size=(50, 8)).astype(np.float32) + 0.5
    np.testing.assert_array_equal(_probe(det, Q), _probe(twin, Q))
    more = rng.normal(size=(300, 8)).astype(np.float32) + 1.0
    _feed(det, more)
    _feed(twin, more)
    np.testing.assert_array_equal(_probe(det, Q), _probe(twin, Q))

"""The audio encoder: MFCC parity with librosa, pooling, scaling state, and fault separation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from models.audio import AudioEncoder, mel_filterbank, mfcc, pool_frames
from models.base import Encoder, Learner, Stateful
from models.errors import EmptyPayload, NonFinite, StateMismatch, WrongType
from models.events import Event
from streams.synth_audio import FAULTS, machine_sound

librosa = pytest.importorskip("librosa")

# librosa computes in float32 (the dtype of its input and mel basis), this
# module in float64; the observed gap is a few float32 ulps of the largest
# coefficient (<= 6e-5 on values up to ~500). 1e-3 absolute (a thousandth of
# a dB-scaled cepstral unit) plus 1e-5 relative leaves a 10x margin and still
# fails on any real definitional difference (window, padding, mel norm, dB
# floor), each of which moves coefficients by 0.1 or more.
PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-5


def _signal(kind: str, sr: int, seconds: float = 0.75) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    if kind == "tones":
        y = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t)
        y += 0.05 * np.sin(2 * np.pi * 3100 * t)
    elif kind == "noise":
        y = 0.1 * np.random.default_rng(7).standard_normal(len(t))
    elif kind == "chirp":  # 100 Hz up to a quarter of the rate
        y = 0.8 * np.sin(2 * np.pi * (100 * t + (sr / 4 - 100) / (2 * seconds) * t**2))
    elif kind == "short":  # shorter than one window: one or two frames
        y = 0.3 * np.random.default_rng(8).standard_normal(300)
    else:
        raise AssertionError(kind)
    return y.astype(np.float32)


PARAMS = [
    pytest.param({}, id="defaults"),  # this module's defaults, passed to librosa explicitly
    pytest.param(
        {
            "n_fft": 2048,
            "hop_length": 512,
            "n_mels": 128,
            "n_mfcc": 40,
            "fmin": 30.0,
            "fmax": 6000.0,
        },
        id="librosa-like",
    ),
]


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("sr", [16000, 22050])
@pytest.mark.parametrize("kind", ["tones", "noise", "chirp", "short"])
def test_mfcc_matches_librosa(kind: str, sr: int, params: dict) -> None:
    full = {"n_mfcc": 20, "n_fft": 1024, "hop_length": 256, "n_mels": 64, **params}
    y = _signal(kind, sr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa warns about n_fft > len(y) for "short"
        expected = librosa.feature.mfcc(y=y, sr=sr, **full).T
    got = mfcc(y, sr, **params)
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=PARITY_RTOL, atol=PARITY_ATOL)


def test_mel_filterbank_matches_librosa() -> None:
    expected = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, dtype=np.float64)
    np.testing.assert_allclose(mel_filterbank(16000, 1024, 64), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 10, 255, 256, 257, 16000])
def test_frame_count_is_centred_and_never_zero(n: int) -> None:
    y = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    m = mfcc(y, 16000)
    assert m.shape == (1 + n // 256, 20)
    assert np.isfinite(m).all()


def test_silence_is_finite() -> None:
    m = mfcc(np.zeros(4000, dtype=np.float32), 16000)
    assert np.isfinite(m).all()
    assert np.ptp(m, axis=0).max() == 0.0  # every frame is the -100 dB floor


def test_mfcc_rejects_bad_samples() -> None:
    with pytest.raises(EmptyPayload):
        mfcc(np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(NonFinite):
        mfcc(np.array([0.0, np.nan, 1.0]), 16000)
    with pytest.raises(ValueError):
        mfcc(np.zeros(100), 16000, n_mfcc=65, n_mels=64)


def _ev(payload: tuple, i: int = 0) -> Event:
    return Event(id=f"a{i}", kind="audio", source="pump", ts=float(i), payload=payload)


def _clips(seed: int, n: int, *, fault: str | None = None, seconds: float = 0.5) -> list[Event]:
    rng = np.random.default_rng(seed)
    return [
        _ev(("samples", machine_sound(rng, seconds=seconds, fault=fault), 16000), i)
        for i in range(n)
    ]


def test_encoder_protocols_and_identity() -> None:
    enc = AudioEncoder(n_coeffs=13)
    assert isinstance(enc, Encoder) and isinstance(enc, Learner) and isinstance(enc, Stateful)
    assert (enc.name, enc.version, enc.metric, enc.dim) == ("audio-mfcc", "1", "l2", 52)


@pytest.mark.parametrize("shape", [(1, 1), (1, 20), (3, 5), (40, 20), (200, 64)])
def test_width_is_fixed_for_any_frames_and_coefficients(shape: tuple[int, int]) -> None:
    enc = AudioEncoder(n_coeffs=20)
    frames = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = enc.encode([_ev(("mfcc", frames))])
    assert out.shape == (1, 80) and out.dtype == np.float32
    assert np.isfinite(out).all()


def test_width_is_fixed_for_sample_payloads_of_any_length() -> None:
    enc = AudioEncoder()
    events = [_ev(("samples", np.ones(n, dtype=np.float32), 16000), n) for n in (1, 100, 16000)]
    events.append(_ev(("samples", np.ones(8000, dtype=np.float32), 8000)))
    out = enc.encode(events)
    assert out.shape == (4, enc.dim)
    assert np.isfinite(out).all()


def test_pooling_layout_padding_and_single_frame() -> None:
    frames = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 2.0]])
    v = pool_frames(frames, 3)
    mean, std, mad, dstd = v[:3], v[3:6], v[6:9], v[9:]
    np.testing.assert_allclose(mean, [2.0, 2.0, 0.0])
    np.testing.assert_allclose(std, [np.std([1.0, 3.0, 2.0]), 0.0, 0.0])
    np.testing.assert_allclose(mad, [1.5, 0.0, 0.0])  # deltas +2, -1
    np.testing.assert_allclose(dstd, [1.5, 0.0, 0.0])
    one = pool_frames(np.array([[5.0, -1.0, 7.0]]), 2)  # truncated to two coefficients
    np.testing.assert_array_equal(one, [5.0, -1.0, 0, 0, 0, 0, 0, 0])


def test_samples_payload_is_mfcc_payload_of_its_frames() -> None:
    enc = AudioEncoder()
    ev = _clips(3, 1)[0]
    frames = mfcc(ev.payload[1], 16000)
    np.testing.assert_array_equal(enc.encode([ev]), enc.encode([_ev(("mfcc", frames))]))


def test_encode_does_not_change_state_and_learn_does() -> None:
    enc = AudioEncoder()
    enc.learn(_clips(1, 20))
    before = enc.get_state()
    probe = _clips(2, 5)
    first = enc.encode(probe)
    second = enc.encode(probe)
    after = enc.get_state()
    np.testing.assert_array_equal(first, second)
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], np.ndarray):
            np.testing.assert_array_equal(before[key], after[key], err_msg=key)
        else:
            assert before[key] == after[key], key
    enc.learn(probe)
    assert not np.array_equal(enc.encode(probe), first)


def test_state_round_trip_gives_identical_vectors() -> None:
    enc = AudioEncoder(seed=4)
    enc.learn(_clips(1, 30))
    state = enc.get_state()
    for key, value in state.items():  # JSON values and arrays only
        assert isinstance(value, (np.ndarray, dict, list, str, int, float, bool, type(None))), key

    probe = _clips(2, 6)
    restored = AudioEncoder(seed=4)
    assert not np.array_equal(restored.encode(probe), enc.encode(probe))
    restored.set_state(state)
    np.testing.assert_array_equal(restored.encode(probe), enc.encode(probe))
    # The reservoir's random stream was restored too: further learning stays in step.
    more = _clips(5, 200, seconds=0.1)
    enc.learn(more)
    restored.learn(more)
    np.testing.assert_array_equal(restored.encode(probe), enc.encode(probe))


def test_state_of_another_configuration_is_refused() -> None:
    state = AudioEncoder(n_coeffs=20).get_state()
    with pytest.raises(StateMismatch):
        AudioEncoder(n_coeffs=13).set_state(state)
    with pytest.raises(StateMismatch):
        AudioEncoder(hop_length=512).set_state(state)
    with pytest.raises(StateMismatch):
        AudioEncoder().set_state({**state, "encoder": "audio-mfcc@0"})
    with pytest.raises(StateMismatch):
        AudioEncoder().set_state({k: v for k, v in state.items() if k != "scaler.rows"})


def test_non_finite_and_malformed_payloads_raise_declared_errors() -> None:
    enc = AudioEncoder()
    with pytest.raises(NonFinite):
        enc.encode([_ev(("mfcc", np.array([[1.0, np.inf]], dtype=np.float32)))])
    # Finite frames whose deltas (6e38) do not fit float32 once left unsquashed.
    huge = np.array([[3e38] * 20, [-3e38] * 20], dtype=np.float32)
    assert np.isfinite(enc.encode([_ev(("mfcc", huge))])).all()  # arcsinh tames them
    with pytest.raises(NonFinite), np.errstate(over="ignore"):
        AudioEncoder(squash=False).encode([_ev(("mfcc", huge))])
    with pytest.raises(EmptyPayload):
        enc.encode([_ev(("samples", np.zeros(0, dtype=np.float32), 16000))])
    with pytest.raises(WrongType):
        enc.encode([_ev(("vector", np.zeros(3)))])
    with pytest.raises(WrongType):
        enc.encode([_ev(("samples", np.zeros(10, dtype=np.float32), 0))])


def test_empty_batch() -> None:
    enc = AudioEncoder()
    assert enc.encode([]).shape == (0, enc.dim)
    enc.learn([])
    assert enc.scaler.n_seen == 0


def _mean_knn_distance(X: np.ndarray, R: np.ndarray, k: int = 5) -> np.ndarray:
    d = np.sqrt(((X[:, None, :] - R[None, :, :]) ** 2).sum(axis=-1))
    return np.sort(d, axis=1)[:, :k].mean(axis=1)


def test_every_fault_lies_farther_from_normal_reference_than_held_out_normal() -> None:
    enc = AudioEncoder()
    train = _clips(100, 60)
    enc.learn(train)
    reference = enc.encode(train)
    normal = _mean_knn_distance(enc.encode(_clips(101, 20)), reference)
    for i, fault in enumerate(FAULTS):
        faulty = _mean_knn_distance(enc.encode(_clips(200 + i, 12, fault=fault)), reference)
        assert faulty.mean() > normal.mean(), fault
        # Most faulty clips, not just a few extreme ones, sit beyond the typical normal clip.
        assert (faulty > np.median(normal)).mean() >= 0.75, fault

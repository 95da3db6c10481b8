"""The synthetic machine-sound generator: deterministic, well-formed, each fault leaves its mark."""

from __future__ import annotations

import numpy as np
import pytest

from streams.synth_audio import FAULTS, machine_sound

SR = 16000


def test_faults_are_named() -> None:
    assert FAULTS == ("bearing", "clicks", "resonance")


@pytest.mark.parametrize("fault", [None, *FAULTS])
def test_same_seed_same_clip(fault: str | None) -> None:
    a = machine_sound(np.random.default_rng(42), fault=fault)
    b = machine_sound(np.random.default_rng(42), fault=fault)
    c = machine_sound(np.random.default_rng(43), fault=fault)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("fault", [None, *FAULTS])
@pytest.mark.parametrize(
    ("seconds", "rate"), [(1.0, 16000), (0.25, 8000), (0.5, 44100), (1e-6, 16000)]
)
def test_shape_dtype_and_range(fault: str | None, seconds: float, rate: int) -> None:
    x = machine_sound(np.random.default_rng(0), seconds=seconds, sample_rate=rate, fault=fault)
    assert x.dtype == np.float32
    assert x.shape == (max(1, round(seconds * rate)),)
    assert np.isfinite(x).all() and np.abs(x).max() <= 1.0
    if len(x) > 100:
        # RMS 0.1 +- 3 dB by construction (before the clip to [-1, 1]).
        assert 0.07 < float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) < 0.145


def test_unknown_fault_is_refused() -> None:
    with pytest.raises(ValueError):
        machine_sound(np.random.default_rng(0), fault="rattle")


def test_normal_clips_vary() -> None:
    rng = np.random.default_rng(1)
    spectra = [np.abs(np.fft.rfft(machine_sound(rng))) for _ in range(3)]
    # Speed jitter moves the fundamental (bins are 1 Hz apart for a 1 s clip).
    peaks = {int(np.argmax(s[20:100])) + 20 for s in spectra}
    assert len(peaks) > 1


def _band_power(x: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1.0 / SR)
    return float(spec[(freqs >= lo) & (freqs < hi)].sum() / spec.sum())


def _high_band_kurtosis(x: np.ndarray) -> float:
    # Kurtosis of what lies above 1.8 kHz: there a normal clip is Gaussian
    # noise (kurtosis near 3), while the motor's peaky harmonics are filtered out.
    # Tapered first and only the middle half kept: a circular filter of a
    # clip that does not wrap around smoothly rings at both ends.
    spec = np.fft.rfft(x.astype(np.float64) * np.hanning(len(x)))
    spec[np.fft.rfftfreq(len(x), 1.0 / SR) < 1800] = 0
    y = np.fft.irfft(spec, n=len(x))[len(x) // 4 : 3 * len(x) // 4]
    return float(np.mean(y**4) / np.mean(y**2) ** 2)


def _resonance_hz(x: np.ndarray) -> float:
    # Peak of the power spectrum smoothed over 101 Hz, within 700-3500 Hz,
    # where only the noise and its resonance live (the 10 motor harmonics end
    # below 530 Hz).
    spec = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    spec = np.convolve(spec, np.ones(101) / 101, mode="same")
    freqs = np.fft.rfftfreq(len(x), 1.0 / SR)
    band = (freqs >= 700) & (freqs < 3500)
    return float(freqs[band][np.argmax(spec[band])])


def _clips(fault: str | None, seed: int, n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [machine_sound(rng, fault=fault) for _ in range(n)]


def test_each_fault_changes_what_it_names() -> None:
    normal = _clips(None, 10)
    bearing = _clips("bearing", 11)
    clicks = _clips("clicks", 12)
    resonance = _clips("resonance", 13)

    # Bearing: far more energy at 3-4.5 kHz than any normal clip has.
    assert min(_band_power(x, 2900, 4600) for x in bearing) > 2.5 * max(
        _band_power(x, 2900, 4600) for x in normal
    )
    # Clicks: impulsive, so the high band is heavy-tailed instead of Gaussian.
    assert max(_high_band_kurtosis(x) for x in normal) < 4.0  # Gaussian, slightly tapered
    assert min(_high_band_kurtosis(x) for x in clicks) > 2 * max(
        _high_band_kurtosis(x) for x in normal
    )
    # Resonance: the noise peak moved up by about 60 % from ~1.2 kHz.
    assert max(_resonance_hz(x) for x in normal) < 1300
    assert min(_resonance_hz(x) for x in resonance) > 1.4 * max(_resonance_hz(x) for x in normal)
    # And every fault gives a different clip from the same random state.
    base = machine_sound(np.random.default_rng(5))
    for fault in FAULTS:
        assert not np.array_equal(machine_sound(np.random.default_rng(5), fault=fault), base)


def test_severity_scales_the_fault() -> None:
    weak = machine_sound(np.random.default_rng(3), fault="bearing", severity=0.2)
    strong = machine_sound(np.random.default_rng(3), fault="bearing", severity=1.0)
    assert _band_power(strong, 2900, 4600) > 4 * _band_power(weak, 2900, 4600)

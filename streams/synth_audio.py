"""Synthetic machine sound with injectable faults, for the demo and the benchmarks.

A normal clip is a motor: a rotation frequency with harmonics (speed and
harmonic amplitudes jittered per clip, a slight speed wobble within it), a
structural resonance excited by broadband noise, and a noise floor. Each fault
adds or changes one physical thing:

- ``"bearing"``: a high-frequency tone (the ringing of a damaged race)
  amplitude-modulated at a bearing defect rate;
- ``"clicks"``: periodic impulses, each a short decaying burst (a loose part
  striking once per few revolutions);
- ``"resonance"``: the resonance peak moved up (a loosened mount or a crack
  changes the structure's stiffness).

Everything random comes from the ``numpy.random.Generator`` passed in, so a
seed gives the same clip on every machine.

>>> import numpy as np
>>> x = machine_sound(np.random.default_rng(0), seconds=0.5, fault="clicks")
>>> x.shape, x.dtype
((8000,), dtype('float32'))
"""

from __future__ import annotations

import numpy as np

FAULTS = ("bearing", "clicks", "resonance")

# A 2-pole motor on 50 Hz mains turns at just under 50 rev/s; clips vary by
# +-4 % (load and supply changes) so normal clips are not all alike.
_ROTATION_HZ = 48.0
_SPEED_JITTER = 0.04
_N_HARMONICS = 10
# Harmonic amplitudes fall as 1/k; per-clip log-normal jitter of 25 % on each.
_HARMONIC_JITTER = 0.25
# Within a clip the speed wobbles by 0.3 % at 0.5-2 Hz (load ripple).
_WOBBLE_DEPTH = 0.003

# The housing's resonance, excited by broadband noise: a Gaussian peak in the
# noise spectrum around 1.2 kHz, 8 % wide.
_RESONANCE_HZ = 1200.0
_RESONANCE_WIDTH = 0.08
# The fault moves it up by 60 % (times severity): a stiffness change of the
# mount by a factor of ~2.5, since frequency goes as its square root.
_RESONANCE_SHIFT = 0.6

# Bearing fault: ringing at 3-4.5 kHz modulated at ~3.6x the rotation rate
# (a typical outer-race defect frequency), 80 % depth, about -22 dB below the
# fundamental at severity 1.
_BEARING_HZ = (3000.0, 4500.0)
_BEARING_RATE = 3.6
_BEARING_AMPLITUDE = 0.08

# Clicks: once every 4-8 revolutions (6-12 a second), each a 3 ms decaying
# ring at 2-3 kHz, peak about 0.6 of the fundamental's at severity 1.
_CLICK_EVERY_REVS = (4, 8)
_CLICK_DECAY_S = 0.003
_CLICK_RING_HZ = (2000.0, 3000.0)
_CLICK_AMPLITUDE = 0.6

# Level of the broadband noise floor and of the resonance band relative to the
# fundamental's unit amplitude, before the per-clip gain.
_NOISE_LEVEL = 0.05
_RESONANCE_LEVEL = 0.12
# The floor falls 6 dB/octave above 2 kHz: airborne machine noise is mostly
# low and mid frequency, and a flat floor would hide the bearing band.
_NOISE_CORNER_HZ = 2000.0
# Final level: RMS 0.1 (-20 dBFS) +- 3 dB, like recordings at varying distance.
_TARGET_RMS = 0.1
_GAIN_JITTER_DB = 3.0


def machine_sound(
    rng: np.random.Generator,
    *,
    seconds: float = 1.0,
    sample_rate: int = 16000,
    fault: str | None = None,
    severity: float = 1.0,
) -> np.ndarray:
    """One clip of machine sound, float32 ``(round(seconds * sample_rate),)`` in [-1, 1].

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness; the same state gives the same clip.
    seconds : float
        Length of the clip.
    sample_rate : int
        Samples per second. Frequencies above 0.45 of it are pulled down so
        nothing aliases at low rates.
    fault : str or None
        ``None`` for a normal clip, or one of :data:`FAULTS`.
    severity : float
        Scales the fault (amplitude of the added sound, size of the shift);
        1 is clearly audible, smaller values make harder benchmarks.

    Returns
    -------
    numpy.ndarray
        float32 samples.
    """
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    n = max(1, int(round(seconds * sample_rate)))
    t = np.arange(n) / sample_rate
    top = 0.45 * sample_rate

    # Motor: harmonics of a wobbling rotation, phase integrated from the speed.
    f0 = _ROTATION_HZ * (1.0 + rng.uniform(-_SPEED_JITTER, _SPEED_JITTER))
    wobble_hz = rng.uniform(0.5, 2.0)
    wobble = np.sin(2 * np.pi * wobble_hz * t + rng.uniform(0, 2 * np.pi))
    speed = f0 * (1.0 + _WOBBLE_DEPTH * wobble)
    phase = 2 * np.pi * np.cumsum(speed) / sample_rate
    k = np.arange(1, _N_HARMONICS + 1)
    amps = rng.lognormal(0.0, _HARMONIC_JITTER, _N_HARMONICS) / k
    offsets = rng.uniform(0, 2 * np.pi, _N_HARMONICS)
    x = np.zeros(n)
    for h, a, o in zip(k, amps, offsets):
        if h * f0 < top:
            x += a * np.sin(h * phase + o)

    # Broadband noise shaped in the frequency domain: a gently falling floor
    # plus the resonance peak.
    freqs = np.fft.rfftfreq(n, d=1.0 / sample_rate)
    res_hz = _RESONANCE_HZ * (1.0 + rng.uniform(-0.03, 0.03))
    if fault == "resonance":
        res_hz *= 1.0 + _RESONANCE_SHIFT * severity
    res_hz = min(res_hz, top)
    floor = _NOISE_LEVEL / np.sqrt(1.0 + (freqs / _NOISE_CORNER_HZ) ** 2)
    peak = _RESONANCE_LEVEL * np.exp(-0.5 * ((freqs - res_hz) / (_RESONANCE_WIDTH * res_hz)) ** 2)
    # Filtering unit white noise by the gain curve: the spectrum density
    # follows the curve whatever the clip length.
    x += np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * (floor + peak), n=n)

    if fault == "bearing":
        ring_hz = min(rng.uniform(*_BEARING_HZ), top)
        mod_hz = _BEARING_RATE * f0 * (1.0 + rng.uniform(-0.02, 0.02))
        envelope = 1.0 - 0.8 * (0.5 + 0.5 * np.cos(2 * np.pi * mod_hz * t))
        x += _BEARING_AMPLITUDE * severity * envelope * np.sin(
            2 * np.pi * ring_hz * t + rng.uniform(0, 2 * np.pi)
        )
    elif fault == "clicks":
        period = rng.integers(*_CLICK_EVERY_REVS, endpoint=True) / f0
        ring_hz = min(rng.uniform(*_CLICK_RING_HZ), top)
        tail = np.arange(int(8 * _CLICK_DECAY_S * sample_rate) + 1) / sample_rate
        click = np.exp(-tail / _CLICK_DECAY_S) * np.sin(2 * np.pi * ring_hz * tail)
        start = rng.uniform(0, period)
        for onset in np.arange(start, seconds, period):
            i = int(onset * sample_rate)
            seg = click[: n - i] * _CLICK_AMPLITUDE * severity * rng.uniform(0.8, 1.2)
            x[i : i + len(seg)] += seg

    rms = float(np.sqrt(np.mean(x**2))) or 1.0
    gain = _TARGET_RMS / rms * 10.0 ** (rng.uniform(-_GAIN_JITTER_DB, _GAIN_JITTER_DB) / 20.0)
    return np.clip(x * gain, -1.0, 1.0).astype(np.float32)


__all__ = ["FAULTS", "machine_sound"]

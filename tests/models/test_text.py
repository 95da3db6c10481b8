from __future__ import annotations

import numpy as np
import pytest

from models.events import event_from_dict
from models.text import EmbeddingCache, HashingTextBackend, SentenceTransformerBackend, TextEncoder


class CountingBackend:
    name, version, dim = "counting", "1", 16

    def __init__(self):
        self.calls: list[list[str]] = []
        self.inner = HashingTextBackend(dim=16)

    def embed(self, texts):
        self.calls.append(list(texts))
        return self.inner.embed(texts)


def _events(texts):
    return [event_from_dict({"id": str(i), "kind": "text", "text": t}, arrival_ts=0) for i, t in enumerate(texts)]


def test_repeated_texts_reach_the_backend_once():
    backend = CountingBackend()
    enc = TextEncoder(backend=backend, cache_size=10)
    X = enc.encode(_events(["a b", "c d", "a b", " a b "]))
    assert backend.calls == [["a b", "c d"]]
    np.testing.assert_array_equal(X[0], X[2])
    np.testing.assert_array_equal(X[0], X[3])
    enc.encode(_events(["c d", "e f"]))
    assert backend.calls[-1] == ["e f"]
    assert enc.cache.hits == 3 and enc.cache.misses == 3


def test_cache_is_bounded_and_least_recently_used_goes_first():
    backend = CountingBackend()
    cache = EmbeddingCache(maxsize=2)
    cache.embed(["x", "y"], backend)
    cache.embed(["x"], backend)  # x is now most recent
    cache.embed(["z"], backend)  # evicts y
    assert len(cache) == 2
    cache.embed(["x", "y"], backend)
    assert backend.calls[-1] == ["y"]


def test_hashing_backend_is_unit_length_and_deterministic():
    b = HashingTextBackend(dim=32)
    X = b.embed(["hello there", "hello there", "something else entirely", "?"])
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(X[0], X[1])
    assert X[0] @ X[2] < 0.9


def test_backend_constructor_does_no_work():
    b = SentenceTransformerBackend(threads=1)
    assert b._model is None


@pytest.mark.model
def test_real_model_embeds_offline_with_meaningful_similarity():
    import torch

    b = SentenceTransformerBackend(threads=1)
    enc = TextEncoder(backend=b)
    X = enc.encode(_events([
        "my card was declined at the shop",
        "the payment with my card was refused",
        "preheat the oven to 180 degrees",
    ]))
    assert X.shape == (3, 384) and X.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-4)
    assert X[0] @ X[1] > X[0] @ X[2] + 0.3
    assert torch.get_num_threads() == 1
    assert enc.name == "text-all-MiniLM-L6-v2" and enc.version.startswith("1+gt")


def test_backend_choice_is_checked_and_shared_per_process():
    from models.text import OpenVINOBackend, shared_backend

    with pytest.raises(ValueError):
        shared_backend(backend="onnx-int4")
    a = shared_backend(backend="openvino-int8", export_dir="/nonexistent/never-used")
    assert a is shared_backend(backend="openvino-int8", export_dir="/nonexistent/never-used")
    assert isinstance(a, OpenVINOBackend) and a._request is None  # nothing loaded or exported yet
    assert isinstance(shared_backend(backend="torch-fp32"), SentenceTransformerBackend)


def test_backends_that_give_other_vectors_have_other_versions():
    from models.text import OpenVINOBackend

    versions = {
        TextEncoder(backend=b).version
        for b in (
            SentenceTransformerBackend(),
            OpenVINOBackend(precision="int8-sq"),
            OpenVINOBackend(precision="int8"),
            OpenVINOBackend(precision="int8-static"),
            OpenVINOBackend(precision="fp32"),
        )
    }
    assert len(versions) == 5


@pytest.mark.model
def test_openvino_int8_export_is_cached_and_ranks_similarities_like_fp32(tmp_path):
    from scipy.stats import spearmanr

    from models.text import OpenVINOBackend

    texts = [
        "my card was declined at the shop", "the payment with my card was refused",
        "preheat the oven to 180 degrees", "bake the cake for forty minutes",
        "the train to Paris is delayed", "our flight was cancelled this morning",
        "What is the capital of Australia?", "Who wrote War and Peace?",
        "ok", "a much longer sentence about the weather, the rain, the wind and whether the match goes on",
    ]
    first = OpenVINOBackend(export_dir=str(tmp_path), precision="int8")
    X = first.embed(texts)
    assert first.export_seconds is not None and first.exported_path().is_file()
    again = OpenVINOBackend(export_dir=str(tmp_path), precision="int8")
    np.testing.assert_allclose(again.embed(texts[::-1])[::-1], X, atol=1e-5)  # order and batching do not matter
    assert again.export_seconds is None  # loaded, not exported again
    assert X.shape == (10, 384) and X.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-4)
    ref = SentenceTransformerBackend(threads=1).embed(texts)
    assert float(np.min(np.sum(X * ref, axis=1))) > 0.99  # each vector close to fp32's
    iu = np.triu_indices(len(texts), k=1)
    assert spearmanr((X @ X.T)[iu], (ref @ ref.T)[iu]).statistic > 0.98
    assert X[0] @ X[1] > X[0] @ X[2] + 0.3


@pytest.mark.model
@pytest.mark.parametrize("precision", ["int8-sq", "int8-static"])
def test_openvino_static_int8_ranks_similarities_like_fp32(tmp_path, precision):
    from scipy.stats import spearmanr

    from models.text import OpenVINOBackend

    texts = [
        "my card was declined at the shop", "the payment with my card was refused",
        "preheat the oven to 180 degrees", "bake the cake for forty minutes",
        "the train to Paris is delayed", "our flight was cancelled this morning",
        "What is the capital of Australia?", "Who wrote War and Peace?",
        "How many people live in Tokyo?", "What is the boiling point of water?",
        "a much longer sentence about the weather, the rain, the wind and whether the match goes on",
    ]
    b = OpenVINOBackend(export_dir=str(tmp_path), precision=precision)
    X = b.embed(texts)
    assert b.version.endswith(f"+ov-{precision}") and b.exported_path().is_file()
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-4)
    # a text's vector does not depend on the batch it came in (token-length batches, padding)
    np.testing.assert_array_equal(np.vstack([b.embed([t]) for t in texts]), X)
    np.testing.assert_array_equal(b.embed(texts[::-1] + ["x " * 200])[: len(texts)][::-1], X)
    ref = SentenceTransformerBackend(threads=1).embed(texts)
    iu = np.triu_indices(len(texts), k=1)
    assert spearmanr((X @ X.T)[iu], (ref @ ref.T)[iu]).statistic >= 0.99  # the bar
    assert X[0] @ X[1] > X[0] @ X[2] + 0.3


def test_default_text_backend_is_the_static_int8_export():
    from models.text import OpenVINOBackend, shared_backend
    from streams.config import Settings

    m = Settings().models
    b = shared_backend(backend=m.text_backend, export_dir="/nonexistent/never-used")
    assert isinstance(b, OpenVINOBackend) and b.precision == "int8-sq" == OpenVINOBackend().precision


def test_batches_cover_the_texts_in_order_on_the_shape_grid():
    from models.text import _CALL_TOKENS, _ROWS, _WIDTH_STEP, _batches, _shape

    rng = np.random.default_rng(0)
    for n in (1, 5, 33, 256):
        lengths = sorted(rng.integers(3, 90, size=n).tolist())
        cuts = _batches(lengths, 32)
        assert [a for a, _ in cuts] == [0] + [b for _, b in cuts[:-1]] and cuts[-1][1] == n
        assert all(0 < b - a <= 32 for a, b in cuts)
        shapes = [_shape(b - a, lengths[b - 1]) for a, b in cuts]
        assert all(r in _ROWS and w % _WIDTH_STEP == 0 and w >= lengths[b - 1] for (r, w), (_, b) in zip(shapes, cuts))
        # never worse than fixed batches of 16 at the same shapes
        fixed = sum(_CALL_TOKENS + r * w for r, w in (_shape(len(lengths[s:s + 16]), lengths[s:s + 16][-1])
                                                      for s in range(0, n, 16)))
        assert sum(_CALL_TOKENS + r * w for r, w in shapes) <= fixed

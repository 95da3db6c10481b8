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

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from models.text import HashingTextBackend
from streams.runtime import configure_threads

configure_threads()

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("NWATCH_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture
def hashing_backend() -> HashingTextBackend:
    return HashingTextBackend(dim=64)


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"labelled data not found at {DATA_DIR} (set NWATCH_DATA_DIR)")
    return DATA_DIR


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def assert_state_equal(a, b, path="state"):
    """Deep equality of two saved states (dicts, lists, scalars, arrays)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_same_results(a, b, path="result"):
    """Equal results: floats to 1e-5 (BLAS may round a distance differently in a batch of
    another shape, and MiniLM pads by batch), everything else exactly."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same_results(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (path, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_results(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def assert_plain_state(state, path="state"):
    """A saved state holds JSON values and numeric arrays only: nothing that needs unpickling."""
    if isinstance(state, np.ndarray):
        assert state.dtype != object, f"{path} is an object array"
    elif isinstance(state, dict):
        for k, v in state.items():
            assert isinstance(k, str), f"{path} has a non-string key {k!r}"
            assert_plain_state(v, f"{path}.{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            assert_plain_state(v, f"{path}[{i}]")
    else:
        assert state is None or isinstance(state, (str, int, float, bool)), (
            f"{path} holds a {type(state).__name__}"
        )

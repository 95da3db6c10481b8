"""A batch's new texts reach the model in one call, and prefetching changes no result."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson

from models.base import Prefetcher
from models.logs import LogEncoder
from models.text import HashingTextBackend, TextEncoder
from streams.config import Settings
from streams.pipeline import Pipeline


class CountingBackend(HashingTextBackend):
    def __init__(self) -> None:
        super().__init__(dim=32)
        self.calls: list[int] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return super().embed(texts)


def log_lines(n: int, *, templates: int) -> list[bytes]:
    # template j first appears at line 8 * j: new templates are spread over
    # the whole batch, so over several learn blocks of 32 lines
    return [
        orjson.dumps({"id": f"l{i}", "source": "s", "kind": "log",
                      "line": f"worker{'abcdefghijklmnopqrstuvwxyz'[min(i // 8, templates - 1)]} step {i} done"})
        for i in range(n)
    ]


def run(lines: list[bytes], batch: int) -> tuple[list, CountingBackend]:
    backend = CountingBackend()
    pipe = Pipeline(settings=Settings(), text_backend=lambda: backend)
    out = []
    for i in range(0, len(lines), batch):
        # everything but the time stamp, which events without one take from the clock
        out.extend({**r.to_dict(), "ts": None} for _, r in pipe.process_raw(lines[i : i + batch]).scores)
    return out, backend


def test_encoders_that_call_a_model_are_prefetchers() -> None:
    assert isinstance(LogEncoder(backend=HashingTextBackend()), Prefetcher)
    assert isinstance(TextEncoder(backend=HashingTextBackend()), Prefetcher)


def test_new_templates_of_a_batch_go_to_the_model_in_one_call() -> None:
    lines = log_lines(200, templates=20)
    _, backend = run(lines, batch=200)
    assert backend.calls == [20]


def test_prefetch_changes_no_score() -> None:
    lines = log_lines(400, templates=26)
    together, one = run(lines, batch=256)
    apart, many = run(lines, batch=32)  # one learn block per batch: nothing to prefetch
    assert len(one.calls) < len(many.calls)
    assert together == apart

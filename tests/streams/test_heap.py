"""The periodic heap trim: at the configured interval, off at 0, a no-op without glibc."""

from __future__ import annotations

import json
import platform
import sys

import pytest

from streams import heap
from streams.config import Settings
from streams.heap import HeapTrimmer, load_malloc_trim
from streams.pipeline import Pipeline


class Recorder:
    def __init__(self) -> None:
        self.pads: list[int] = []

    def __call__(self, pad: int) -> int:
        self.pads.append(pad)
        return 1


def test_trims_once_per_interval_of_events():
    rec = Recorder()
    t = HeapTrimmer(every=1000, trim=rec)
    for _ in range(9):
        t.count(256)  # 2,304 events: past 1,000 at 1,024 and again at 2,048
    assert rec.pads == [0, 0]
    assert t.calls == 2 and t.seconds >= 0.0


def test_zero_interval_or_no_malloc_trim_never_trims():
    rec = Recorder()
    off = HeapTrimmer(every=0, trim=rec)
    off.count(10**6)
    assert rec.pads == [] and not off.active
    absent = HeapTrimmer(every=1, trim=None)
    absent.count(10**6)
    assert absent.calls == 0 and not absent.active


def test_malloc_trim_found_on_glibc_only(monkeypatch):
    load_malloc_trim.cache_clear()
    try:
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
            fn = load_malloc_trim()
            assert fn is not None
            assert fn(0) in (0, 1)  # 1: memory was released, 0: none was
        load_malloc_trim.cache_clear()
        monkeypatch.setattr(heap.platform, "libc_ver", lambda: ("", ""))  # musl reports no name
        assert load_malloc_trim() is None
        load_malloc_trim.cache_clear()
        monkeypatch.setattr(heap.sys, "platform", "darwin")
        assert load_malloc_trim() is None
    finally:
        load_malloc_trim.cache_clear()


def _lines(n: int, start: int = 0) -> list[bytes]:
    return [
        json.dumps({"id": f"e{i}", "source": "s", "kind": "vector", "vector": [i % 7, i % 5, 1.0]}).encode()
        for i in range(start, start + n)
    ]


@pytest.mark.parametrize("every, trims", [(100, 3), (0, 0)])
def test_pipeline_trims_at_the_configured_interval(every, trims):
    p = Pipeline(settings=Settings(state={"dir": None}, heap_trim_events=every))
    rec = Recorder()
    p.heap_trim.trim = rec  # count the calls whatever the C library
    for start in range(0, 350, 50):
        p.process_raw(_lines(50, start) + [b"not json"])  # rejects count too: 51 lines a batch
    assert len(rec.pads) == trims


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("NWATCH_HEAP_TRIM_EVENTS", "0")
    assert Settings().heap_trim_events == 0
    assert Settings(state={"dir": None}).heap_trim_events == 0
    monkeypatch.delenv("NWATCH_HEAP_TRIM_EVENTS")
    assert Settings().heap_trim_events == 250_000

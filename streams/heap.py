"""Give freed heap back to the operating system now and then (glibc's ``malloc_trim``).

A long run of the pipeline allocates and frees many short-lived buffers (decoded
batches, score arrays, blocks of the reference). glibc keeps freed memory in
its arenas rather than returning it, so resident memory creeps up by a few MiB
per million events although no live data grows (docs/speed.md). A call of
``malloc_trim(0)`` every ``every`` events hands the free pages back and keeps
resident memory flat.

Linux with glibc only: elsewhere (musl, macOS, Windows) :func:`load_malloc_trim`
finds nothing and :class:`HeapTrimmer` does nothing. ``every=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
import time
from collections.abc import Callable
from functools import cache


@cache
def load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` through ctypes, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class HeapTrimmer:
    """Calls ``trim(0)`` once per ``every`` events counted; ``every=0`` or ``trim=None``: never.

    ``trim`` is :func:`load_malloc_trim`'s result in the pipeline. ``calls``
    and ``seconds`` tell how often it ran and how long it took in all.

    >>> t = HeapTrimmer(every=3, trim=lambda pad: 1)
    >>> for _ in range(7): t.count(1)
    >>> t.calls
    2
    """

    def __init__(self, *, every: int, trim: Callable[[int], int] | None) -> None:
        self.every = every
        self.trim = trim
        self._since = 0
        self.calls = 0
        self.seconds = 0.0

    @property
    def active(self) -> bool:
        return self.every > 0 and self.trim is not None

    def count(self, events: int) -> None:
        """Add ``events`` processed; trim once the interval is reached."""
        if not self.active:
            return
        self._since += events
        if self._since >= self.every:
            self._since = 0
            t0 = time.perf_counter()
            self.trim(0)  # type: ignore[misc]
            self.seconds += time.perf_counter() - t0
            self.calls += 1

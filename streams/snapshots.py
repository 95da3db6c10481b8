"""Snapshots of detector state on disk, one file per input partition.

A snapshot holds the saved state of every source whose events arrive on one
input partition, and the offset it covers: every event of that partition below
``offset`` is in the state, none at or above it. A worker that takes the
partition over loads the snapshot and replays the partition from ``offset``
(see ``streams.app``), so nothing is missed and nothing is learnt twice.

The file is an ``.npz`` archive: the arrays of the state by name, plus one
entry ``__meta__`` holding the rest of the state as JSON (arrays replaced by
``{"__array__": name}``). It is read with ``allow_pickle=False``: a snapshot is
data, never code, wherever it came from. Files are written owner-only (0600)
in an owner-only directory (0700), to a temporary name first and renamed
into place, so a crash mid-write leaves the previous snapshot intact. A file
that others could have written is refused.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from models.base import State, join_arrays, split_arrays

SNAPSHOT_FORMAT = 1
_META = "__meta__"


class SnapshotError(Exception):
    """A snapshot that cannot be used: unreadable, another format, not ours, or unsafe permissions."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    topic: str
    partition: int
    offset: int  # the next offset to process: every event below it is in ``sources``
    sources: list[State]
    written_at: float
    writer: str  # the neighbourwatch version that wrote it
    # (offset, CRC-32 of the message value) of the last event in the state: a
    # snapshot of an earlier incarnation of the topic (deleted and recreated,
    # an embedded broker restarted) does not match it and is refused.
    anchor: tuple[int, int] | None = None


def pack(state: Any) -> tuple[bytes, dict[str, np.ndarray]]:
    """Split a state into JSON (with array references) and its arrays."""
    tree, arrays = split_arrays(state)
    return json.dumps(tree, separators=(",", ":")).encode(), arrays


def unpack(meta: bytes, arrays: dict[str, np.ndarray]) -> Any:
    return join_arrays(json.loads(meta), arrays)


class SnapshotStore:
    """Snapshots of one consumer group's partitions under ``root``."""

    def __init__(self, root: str | os.PathLike[str], *, writer: str = "") -> None:
        self.root = Path(root)
        self.writer = writer
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    def path(self, topic: str, partition: int) -> Path:
        return self.root / f"{quote(topic, safe='')}-{int(partition)}.npz"

    def save(
        self, topic: str, partition: int, *, offset: int, sources: list[State], anchor: tuple[int, int] | None = None
    ) -> Path:
        meta, arrays = pack(
            {
                "format": SNAPSHOT_FORMAT,
                "topic": topic,
                "partition": int(partition),
                "offset": int(offset),
                "written_at": time.time(),
                "writer": self.writer,
                "anchor": None if anchor is None else [int(anchor[0]), int(anchor[1])],
                "sources": sources,
            }
        )
        final = self.path(topic, partition)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **{_META: np.frombuffer(meta, np.uint8)}, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    def load(self, topic: str, partition: int) -> Snapshot | None:
        """The partition's snapshot, None if there is none; :class:`SnapshotError` if it is unusable."""
        path = self.path(topic, partition)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            raise SnapshotError(f"{path}: not owned by this user or writable by others; refusing to load it")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = arrays.pop(_META).tobytes()
            state = unpack(meta, arrays)
        except Exception as err:  # truncated, not an npz, bad JSON, pickled content...
            raise SnapshotError(f"{path}: unreadable snapshot ({type(err).__name__}: {err})") from None
        if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"{path}: snapshot format {state.get('format') if isinstance(state, dict) else '?'!r}, "
                                f"this worker reads format {SNAPSHOT_FORMAT}")
        if state.get("topic") != topic or state.get("partition") != int(partition):
            raise SnapshotError(f"{path}: holds {state.get('topic')}[{state.get('partition')}], not {topic}[{partition}]")
        return Snapshot(
            topic=topic,
            partition=int(partition),
            offset=int(state["offset"]),
            sources=list(state["sources"]),
            written_at=float(state["written_at"]),
            writer=str(state.get("writer", "")),
            anchor=None if state.get("anchor") is None else (int(state["anchor"][0]), int(state["anchor"][1])),
        )

"""Event streams for ``nwatch bench quality``, built from the labelled data in ``../shared/data``.

Each builder returns a :class:`Stream`: the JSON lines a producer would send
(the pipeline sees nothing else; the ``label`` field is passed through for
evaluation and never used to decide), the labels, and where a batch baseline
can use them, the raw feature rows in the same order. Nothing here scores.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TABULAR = ["6_cardio", "38_thyroid", "30_satellite", "23_mammography", "32_shuttle", "34_smtp", "16_http"]
VECTORS = ["20news_3_bert", "cifar10_0_resnet18"]
# The event source of each vector set ("vec" unless named here): language-model
# embeddings get their own source, so the report can run them with opt-in settings
# too (streams.bench_quality.OPT_IN).
VECTOR_SOURCES = {"20news_3_bert": "bert"}


@dataclass
class Stream:
    """One replayable stream with its ground truth."""

    name: str
    group: str  # tabular, vectors, logs, drift, audio
    source: str  # the event source name inside the stream
    lines: list[bytes]
    labels: np.ndarray  # 0 normal / 1 anomaly, one per line
    X: np.ndarray | None = None  # raw features in stream order, for the batch baselines
    change_at: int | None = None  # drift scenarios: first changed event (None: no change)
    classes: np.ndarray | None = None  # audio: fault class per event ("" for normal)
    seed: int | None = None
    meta: dict = field(default_factory=dict)


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(path, allow_pickle=True)
    return d["X"].astype(np.float64), d["y"].astype(int)


def tabular_stream(name: str, X: np.ndarray, y: np.ndarray, *, seed: int, max_events: int) -> Stream:
    """Rows as ``transaction`` events (fields f0..fd) in an order shuffled by ``seed``."""
    order = np.random.default_rng(seed).permutation(len(X))[:max_events]
    names = [f"f{j}" for j in range(X.shape[1])]
    lines = [
        _dumps({"id": f"r{i}", "source": "tab", "kind": "transaction",
                "fields": dict(zip(names, map(float, X[i]))), "label": int(y[i])})
        for i in order
    ]
    return Stream(name, "tabular", "tab", lines, y[order], X=X[order], seed=seed)


def vector_stream(name: str, X: np.ndarray, y: np.ndarray, *, seed: int, max_events: int) -> Stream:
    """Rows as ``vector`` events in an order shuffled by ``seed`` (6 decimals, as a producer would),
    from the source ``VECTOR_SOURCES[name]`` (``vec`` by default)."""
    order = np.random.default_rng(seed).permutation(len(X))[:max_events]
    source = VECTOR_SOURCES.get(name, "vec")
    lines = [
        _dumps({"id": f"r{i}", "source": source, "kind": "vector",
                "vector": [round(float(v), 6) for v in X[i]], "label": int(y[i])})
        for i in order
    ]
    return Stream(name, "vectors", source, lines, y[order], X=X[order], seed=seed)


def bgl_stream(path: Path) -> Stream:
    """BGL_2k as ``log`` events in file order; the label token (``-`` = normal) is stripped."""
    lines, labels = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f):
            token, _, rest = raw.decode("utf-8", "replace").rstrip("\n").partition(" ")
            labels.append(int(token != "-"))
            lines.append(_dumps({"id": f"bgl{n}", "source": "bgl", "kind": "log", "line": rest,
                                 "label": labels[-1]}))
    return Stream("BGL_2k", "logs", "bgl", lines, np.array(labels))


def hdfs_sessions(folder: Path) -> tuple[list[dict], np.ndarray]:
    """The HDFS block sessions of train then test, each file in its time order."""
    sessions = []
    for part in ("session_train.jsonl", "session_test.jsonl"):
        with open(folder / part) as f:
            sessions.extend(json.loads(line) for line in f if line.strip())
    return sessions, np.array([int(s["label"]) for s in sessions])


def hdfs_stream(folder: Path, *, kind: str = "transaction") -> Stream:
    """One event per block session: the counts of each template among the block's log lines.

    What a user with a log parser would send for a finished block session: its
    template-count vector, the representation of the loglizer baselines (PCA,
    Invariants Mining). By default a session is a ``transaction`` event
    ``{template: count}`` of the templates present: no vocabulary to agree on
    up front, and new templates simply become new fields. ``kind="vector"``
    sends the fixed-width count vector over the templates of the data (in
    order of first appearance) instead. ``X`` is the count matrix, for the
    batch baselines.
    """
    sessions, y = hdfs_sessions(folder)
    vocab: dict[str, int] = {}
    for s in sessions:
        for t in s["templates"]:
            vocab.setdefault(t, len(vocab))
    X = np.zeros((len(sessions), len(vocab)))
    lines = []
    for i, s in enumerate(sessions):
        counts: dict[str, int] = {}
        for t in s["templates"]:
            counts[t] = counts.get(t, 0) + 1
            X[i, vocab[t]] += 1
        if kind == "vector":
            payload = {"kind": "vector", "vector": X[i].tolist()}
        else:
            payload = {"kind": "transaction", "fields": {t: float(c) for t, c in counts.items()}}
        lines.append(_dumps({"id": s["block_id"], "source": "hdfs", **payload, "label": int(s["label"])}))
    return Stream("HDFS_sessions", "logs", "hdfs", lines, y, X=X)


# ------------------------------------------------------------------ drift scenarios

def _text_lines(texts: list[str], source: str, prefix: str) -> list[bytes]:
    return [_dumps({"id": f"{prefix}{i}", "source": source, "kind": "text", "text": t, "label": 0})
            for i, t in enumerate(texts)]


def vader_texts(folder: Path, domain: str) -> list[str]:
    """Texts of one VADER domain file (``tweets``, ``movieReviewSnippets``, ...)."""
    path = folder / f"{domain}_GroundTruth.txt"
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3 and parts[2].strip():
                out.append(parts[2].strip())
    return out


def trec_questions(path: Path) -> list[tuple[str, str]]:
    """``(coarse class, question)`` pairs of a TREC file (``COARSE:fine question``)."""
    out = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            label, _, question = line.strip().partition(" ")
            if question:
                out.append((label.split(":")[0], question))
    return out


def drift_scenario(
    name: str, before: list, after: list | None, *, to_lines: Callable[[list, str], list[bytes]],
    n_before: int, n_after: int, seed: int,
) -> Stream:
    """``n_before`` items of ``before`` then ``n_after`` of ``after`` (None: more of ``before``).

    Items are drawn without replacement in an order shuffled by ``seed``, so the
    no-change stream is the same population for its whole length.
    """
    rng = np.random.default_rng(seed)
    if after is None:
        idx = rng.choice(len(before), n_before + n_after, replace=False)
        items = [before[i] for i in idx]
        change_at = None
    else:
        a = rng.choice(len(before), n_before, replace=False)
        b = rng.choice(len(after), n_after, replace=False)
        items = [before[i] for i in a] + [after[i] for i in b]
        change_at = n_before
    lines = to_lines(items, name)
    return Stream(name, "drift", name, lines, np.zeros(len(lines), int), change_at=change_at, seed=seed)


def text_lines(items: list[str], source: str) -> list[bytes]:
    return _text_lines(items, source, "t")


def vector_rows_lines(items: list[np.ndarray], source: str) -> list[bytes]:
    return [_dumps({"id": f"v{i}", "source": source, "kind": "vector",
                    "vector": [round(float(v), 6) for v in x], "label": 0})
            for i, x in enumerate(items)]


# ------------------------------------------------------------------ audio

def audio_stream(
    *, seed: int, normals: int = 1800, per_fault: int = 15, warmup: int = 300, seconds: float = 1.0,
    sample_rate: int = 16000,
) -> Stream:
    """Machine-sound clips as MFCC ``audio`` events: normals, then faults mixed in after a warm-up.

    The first ``warmup`` clips are normal (a new machine is installed healthy);
    after that ``per_fault`` clips of each fault class are placed at random:
    2.4 % faults by default. Faults far more common than alpha would fill the
    calibration set (every score joins it) and hide each other; a first version
    with 12 % faults measured a recall of 0 at alpha 0.01 while ROC-AUC was 0.97.
    """
    from models.audio import mfcc
    from streams.synth_audio import FAULTS, machine_sound

    rng = np.random.default_rng(seed)
    tail = ["" for _ in range(normals - warmup)] + [f for f in FAULTS for _ in range(per_fault)]
    order = rng.permutation(len(tail))
    classes = np.array([""] * warmup + [tail[i] for i in order], dtype=object)
    lines = []
    for n, fault in enumerate(classes):
        x = machine_sound(rng, seconds=seconds, sample_rate=sample_rate, fault=fault or None)
        frames = mfcc(x, sample_rate)
        lines.append(_dumps({"id": f"clip{n}", "source": "pump", "kind": "audio",
                             "mfcc": np.round(frames.astype(np.float64), 3).tolist(),
                             "label": int(bool(fault))}))
    labels = np.array([int(bool(c)) for c in classes])
    return Stream("machine_sound", "audio", "pump", lines, labels, classes=classes, seed=seed)

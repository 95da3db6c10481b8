"""``nwatch bench speed``: throughput and memory per event kind, against the tools users would pick instead.

Every figure is paired with a baseline run in the same process on the same
events, because absolute times on a shared 2-core machine move from run to
run while ratios within one process hold:

- tabular and vector events (the ADBench sets in ../shared/data, shuffled):
  the replay pipeline (``Pipeline.process_raw`` on the raw JSON lines, batches
  of 256: decoding, encoding, kNN scoring, calibration, drift, learning) vs
  river's ``MinMaxScaler | HalfSpaceTrees`` and river's incremental
  ``LocalOutlierFactor``, both fed the already parsed feature dicts
  (``score_one`` then ``learn_one``, as a streaming user would run them);
- logs (BGL and HDFS samples replayed in a loop, the first pass, where every
  template is new, included);
- text (VADER snippets): the pipeline vs plain sentence-transformers fp32
  ``encode`` of the same texts, each on 1 and on 2 model threads (a workload
  per thread count, so the ratio compares like with like), and the rank
  correlation of pairwise
  similarities between the pipeline's text backend and fp32 on held-out texts
  (TREC questions);
- memory: resident set size after each workload, the reference index's
  memory against its raw vectors plus graph, and (``--long``) the slope of the
  resident set over a long tabular run after warm-up.

Saturation throughput is events divided by wall time over the events after
a warm-up (the first ``WARMUP`` events, while the reference fills, are
processed but not timed: they are the start of a stream, not its steady state).

``--kafka`` adds the end-to-end measurement through the embedded broker
(:mod:`streams.bench_kafka`).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

BATCH = 256
WARMUP = 2_000


@dataclass
class Row:
    """One measured line of the table."""

    workload: str
    system: str
    events: int
    seconds: float
    rss_mb: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["events_per_second"] = self.events_per_second
        return d


def rss_mb() -> float:
    """Resident set size of this process in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# -- streams of real events -----------------------------------------------------------------------
def load_tabular(data_dir: Path, name: str, *, limit: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An ADBench set, shuffled (seed), at most ``limit`` rows."""
    with np.load(data_dir / "tabular" / f"{name}.npz", allow_pickle=True) as z:
        X, y = np.asarray(z["X"], dtype=np.float64), np.asarray(z["y"]).astype(int)
    order = np.random.default_rng(seed).permutation(len(X))[:limit]
    return X[order], y[order]


def tabular_lines(X: np.ndarray, *, kind: str, source: str = "tab", prefix: str = "r") -> list[bytes]:
    """Rows as JSON event lines: ``transaction`` (named fields) or ``vector``."""
    names = [f"f{j}" for j in range(X.shape[1])]
    out = []
    for i, row in enumerate(X.tolist()):
        if kind == "transaction":
            ev = {"id": f"{prefix}{i}", "source": source, "kind": "transaction", "fields": dict(zip(names, row))}
        else:
            ev = {"id": f"{prefix}{i}", "source": source, "kind": "vector", "vector": row}
        out.append(orjson.dumps(ev))
    return out


def feature_dicts(X: np.ndarray) -> list[dict[str, float]]:
    names = [f"f{j}" for j in range(X.shape[1])]
    return [dict(zip(names, row)) for row in X.tolist()]


def log_lines(path: Path, *, source: str, passes: int, loghub_label: bool) -> list[bytes]:
    """A Loghub sample replayed ``passes`` times as ``log`` events (ids unique per pass)."""
    raw = path.read_text("utf-8", "replace").splitlines()
    if loghub_label:  # BGL: the first token is the label, not log content
        raw = [line.partition(" ")[2] for line in raw]
    out = []
    for p in range(passes):
        for n, line in enumerate(raw):
            out.append(orjson.dumps({"id": f"{source}-{p}-{n}", "source": source, "kind": "log", "line": line}))
    return out


def vader_texts(data_dir: Path) -> list[str]:
    texts = []
    for f in sorted((data_dir / "text" / "vader").glob("*_GroundTruth.txt")):
        for line in f.read_text("utf-8", "replace").splitlines():
            parts = line.split("\t", 2)
            if len(parts) == 3 and parts[2].strip():
                texts.append(parts[2].strip())
    return texts


def trec_questions(data_dir: Path) -> list[str]:
    out = []
    for line in (data_dir / "text" / "trec_qc" / "test.txt").read_text("utf-8", "replace").splitlines():
        _, _, q = line.partition(" ")
        if q.strip():
            out.append(q.strip())
    return out


def text_lines(texts: Sequence[str], *, source: str = "txt") -> list[bytes]:
    return [orjson.dumps({"id": f"{source}-{i}", "source": source, "kind": "text", "text": t})
            for i, t in enumerate(texts)]


# -- measurement ------------------------------------------------------------------------------------
def run_pipeline(pipeline: Any, lines: Sequence[bytes], *, warmup: int = WARMUP, batch: int = BATCH) -> tuple[int, float, int]:
    """Feed ``lines`` in batches; returns (events timed, seconds, events scored in all).

    The first ``warmup`` lines are processed before the clock starts.
    """
    scored = 0
    warm = min(warmup, len(lines))
    for i in range(0, warm, batch):
        scored += len(pipeline.process_raw(lines[i : min(i + batch, warm)]).scores)
    t0 = time.perf_counter()
    for i in range(warm, len(lines), batch):
        scored += len(pipeline.process_raw(lines[i : i + batch]).scores)
    return len(lines) - warm, time.perf_counter() - t0, scored


def run_river(model: Any, xs: Sequence[dict[str, float]], *, warmup: int = WARMUP, budget: float | None = None) -> tuple[int, float]:
    """``score_one`` then ``learn_one`` per event; returns (events timed, seconds).

    With ``budget`` the timed part stops after that many seconds (river's LOF
    manages tens of events per second; the rate is what is compared).
    """
    warm = min(warmup, len(xs))
    for x in xs[:warm]:
        model.score_one(x)
        model.learn_one(x)
    t0 = time.perf_counter()
    n = 0
    for x in xs[warm:]:
        model.score_one(x)
        model.learn_one(x)
        n += 1
        if budget is not None and (n & 7) == 0 and time.perf_counter() - t0 > budget:
            break
    return n, time.perf_counter() - t0


def river_hst() -> Any:
    from river import anomaly, preprocessing

    return preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=0)


def river_ilof() -> Any:
    from river import anomaly

    return anomaly.LocalOutlierFactor(n_neighbors=10)


def make_pipeline(text_backend: Callable[[], Any] | None = None) -> Any:
    from streams.config import Settings
    from streams.pipeline import Pipeline

    return Pipeline(settings=Settings(), text_backend=text_backend)


def pairwise_rank_correlation(A: np.ndarray, B: np.ndarray) -> float:
    """Spearman correlation between the pairwise cosine similarities of two embeddings of the same texts."""
    from scipy.stats import spearmanr

    def sims(M: np.ndarray) -> np.ndarray:
        M = M / np.linalg.norm(M, axis=1, keepdims=True)
        S = M @ M.T
        return S[np.triu_indices(len(M), k=1)]

    return float(spearmanr(sims(A), sims(B)).statistic)


# -- workloads --------------------------------------------------------------------------------------
def bench_tabular(data_dir: Path, name: str, *, kind: str, events: int, ilof_seconds: float) -> list[Row]:
    X, _ = load_tabular(data_dir, name, limit=events)
    lines = tabular_lines(X, kind=kind)
    xs = feature_dicts(X)
    workload = f"{name} ({kind}, {X.shape[1]} features)"
    rows = []
    gc.collect()
    p = make_pipeline()
    n, s, _ = run_pipeline(p, lines)
    rows.append(Row(workload, "neighbourwatch", n, s, rss_mb(), note="replay pipeline, raw JSON lines"))
    del p
    n, s = run_river(river_hst(), xs)
    rows.append(Row(workload, "river MinMaxScaler|HalfSpaceTrees", n, s, rss_mb(), note="parsed dicts"))
    n, s = run_river(river_ilof(), xs, warmup=200, budget=ilof_seconds)
    rows.append(Row(workload, "river LocalOutlierFactor (ILOF)", n, s, rss_mb(), note=f"parsed dicts, {ilof_seconds:g} s budget"))
    return rows


def bench_logs(data_dir: Path, *, passes: int, text_backend: Callable[[], Any] | None) -> list[Row]:
    rows = []
    for fname, source, label in (("BGL_2k.log", "bgl", True), ("HDFS_2k.log", "hdfs", False)):
        lines = log_lines(data_dir / "logs" / fname, source=source, passes=passes, loghub_label=label)
        p = make_pipeline(text_backend)
        if text_backend is None:
            p.preload()  # the model load is start-up, measured apart
        n, s, _ = run_pipeline(p, lines, warmup=0)
        templates = p.sources[source].encoder.templates_seen
        rows.append(Row(f"{fname} x{passes} (log)", "neighbourwatch", n, s, rss_mb(),
                        note=f"{templates} templates, first sight included"))
    return rows


def bench_text(data_dir: Path, *, events: int, held_out: int) -> list[Row]:
    """Pipeline vs plain fp32 sentence-transformers on the same texts, at 1 and at 2 model threads.

    Each thread count is its own workload: the pipeline with ``ModelSettings.threads`` = n against
    fp32 with torch on n threads, so the ratio compares like with like (the worker's default is 1
    thread, see ``ModelSettings.threads``; a dedicated machine may give the model both cores).
    Also the similarity rank correlation with fp32 on held-out texts.
    """
    from models.text import OpenVINOBackend, SentenceTransformerBackend

    texts = vader_texts(data_dir)
    rng = np.random.default_rng(0)
    texts = [texts[i] for i in rng.permutation(len(texts))[:events]]
    rows = []
    import torch

    def workload(threads: int) -> str:
        return f"VADER {len(texts)} texts (text, {threads} thr.)"

    plain = SentenceTransformerBackend(batch_size=32)
    plain.embed(["warm up"])
    # torch's thread count matters more than anything on a shared 2-core
    # machine (OpenMP threads spin while the other core is taken).
    def baseline(threads: int, when: str = "") -> None:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        plain._model.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
        s = time.perf_counter() - t0
        rows.append(Row(workload(threads), f"sentence-transformers fp32{when}",
                        len(texts), s, rss_mb(), note="batch 32, encode only"))

    for threads in (2, 1):
        baseline(threads)
    # The pipeline with the default text backend, exported afresh into a
    # temporary folder so that the export time is measured in every run.
    import tempfile

    from streams.config import ModelSettings, Settings
    from streams.pipeline import Pipeline

    held = trec_questions(data_dir)[:held_out]
    fp32_held = plain.embed(held)
    with tempfile.TemporaryDirectory(prefix="nwatch-export-") as export_dir:
        # Exported in a child process, as `./dev` and the image do before any
        # worker starts: the export's NNCF, torch and OpenVINO state (threads,
        # caches) is not left in the process that is timed.
        backend_name = ModelSettings().text_backend
        export_s = _export_apart(backend_name, export_dir)
        for threads in (1, 2):
            settings = Settings(models=ModelSettings(export_dir=export_dir, threads=threads))
            p = Pipeline(settings=settings)
            t0 = time.perf_counter()
            p.preload()
            load_s = time.perf_counter() - t0
            backend = p._text_backend()
            n, s, _ = run_pipeline(p, text_lines(texts), warmup=0)
            rho = pairwise_rank_correlation(backend.embed(held), fp32_held)
            # the backend alone on the same texts (no pipeline, no cache)
            t0 = time.perf_counter()
            backend.embed(texts)
            alone = time.perf_counter() - t0
            tag = f"{backend.name}@{backend.version}"
            rows.append(Row(workload(threads), f"backend alone ({backend_name})",
                            len(texts), alone, rss_mb(), note="encode only, no cache"))
            rows.append(Row(workload(threads), "neighbourwatch", n, s, rss_mb(),
                            note=f"backend {tag}; rank corr. vs fp32 {rho:.4f} on {len(held)} TREC; "
                                 f"export {export_s if export_s is not None else 0:.1f} s, load {load_s:.1f} s",
                            extra={"rank_correlation_vs_fp32": rho, "held_out": len(held), "backend": tag,
                                   "threads": threads, "export_seconds": export_s, "load_seconds": load_s}))
        # int8 weights alone (the default before int8-sq), one thread
        other = OpenVINOBackend(export_dir=export_dir, precision="int8", threads=1)
        other.embed(["warm up"])
        t0 = time.perf_counter()
        other.embed(texts)
        other_s = time.perf_counter() - t0
        rho_other = pairwise_rank_correlation(other.embed(held), fp32_held)
        rows.append(Row(workload(1), "backend alone (openvino-int8)",
                        len(texts), other_s, rss_mb(),
                        note=f"encode only; rank corr. vs fp32 {rho_other:.4f}; export {other.export_seconds or 0:.1f} s",
                        extra={"rank_correlation_vs_fp32": rho_other, "export_seconds": other.export_seconds}))
    # The load of a shared machine drifts during a run: fp32 is timed again
    # after the pipelines, and the better row of each thread count is the one to compare with.
    baseline(2, ", after")
    baseline(1, ", after")
    return sorted(rows, key=lambda r: r.workload)


def _export_apart(backend: str, export_dir: str) -> float | None:
    """Export the text model of ``backend`` into ``export_dir`` in a child process; its export seconds."""
    import subprocess

    code = ("import sys; from models.text import shared_backend; "
            f"b = shared_backend(backend={backend!r}, export_dir={export_dir!r}); "
            "hasattr(b, 'export') and b.export(); print(getattr(b, 'export_seconds', None))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    last = done.stdout.strip().splitlines()[-1]
    return None if last == "None" else float(last)


def index_memory(backend: str, n: int, dim: int) -> dict[str, Any]:
    """Resident growth of building one full index of ``n`` random vectors, in this process."""
    from detectors.index import ReferenceIndex

    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    ids = [f"v{i}" for i in range(n)]
    gc.collect()
    before = rss_mb()
    idx = ReferenceIndex(dim=dim, capacity=n, backend=backend)  # type: ignore[arg-type]
    for i in range(0, n, 4096):
        idx.add(X[i : i + 4096], ids[i : i + 4096])
    grown = (rss_mb() - before) * 2**20
    raw = n * dim * 4
    graph = 0 if backend == "exact" else n * (2 * idx.M + 1) * 4  # hnswlib level 0: 2M links + count
    return {"backend": backend, "vectors": n, "dim": dim, "rss_growth_bytes": grown,
            "raw_vectors_bytes": raw, "graph_bytes": graph, "ratio": grown / (raw + graph),
            "nbytes_reported": idx.nbytes}


def bench_index_memory(*, n: int = 100_000, dims: Sequence[int] = (64, 384)) -> list[dict[str, Any]]:
    """Resident memory of a full reference index vs the raw vectors plus hnswlib's level-0 graph.

    Each index is built in a fresh interpreter and measured as the growth of
    its resident set, so hnswlib's C allocations count and memory freed by
    earlier workloads (which the allocator reuses) does not hide anything.
    The ids (Python strings, ~60 bytes each) are outside both sides.
    """
    import subprocess

    out = []
    for dim in dims:
        for backend in ("exact", "hnsw"):
            code = ("import json, sys; from streams.bench_speed import index_memory; "
                    f"print(json.dumps(index_memory({backend!r}, {n}, {dim})))")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def bench_rss_slope(data_dir: Path, *, events: int, every: int = 50_000) -> dict[str, Any]:
    """Resident set sampled every ``every`` events over a long tabular run; slope after warm-up.

    The stream is the http set (567k rows) looped with fresh ids, so the
    reference keeps turning over as it would in production.
    """
    X, _ = load_tabular(data_dir, "16_http")
    base = tabular_lines(X[:every], kind="transaction")
    p = make_pipeline()
    samples: list[tuple[int, float]] = []
    done = 0
    t0 = time.perf_counter()
    while done < events:
        lines = [line.replace(b'"id":"r', f'"id":"p{done}-'.encode(), 1) for line in base] if done else base
        for i in range(0, len(lines), BATCH):
            p.process_raw(lines[i : i + BATCH])
        done += len(lines)
        samples.append((done, rss_mb()))
    seconds = time.perf_counter() - t0
    after = [(e, r) for e, r in samples if e > 2 * every] or samples
    ev = np.array([e for e, _ in after], dtype=float)
    mb = np.array([r for _, r in after])
    slope = float(np.polyfit(ev, mb, 1)[0] * 1e6) if len(after) > 1 else 0.0
    return {"events": done, "seconds": seconds, "samples": samples, "slope_mb_per_million": slope,
            "rss_first_mb": after[0][1], "rss_last_mb": after[-1][1],
            "heap_trims": p.heap_trim.calls, "heap_trim_seconds": p.heap_trim.seconds}


# -- the command ------------------------------------------------------------------------------------
def format_table(rows: Iterable[Row]) -> list[str]:
    rows = list(rows)
    out = [f"{'workload':<34} {'system':<36} {'events':>8} {'events/s':>10} {'ratio':>8} {'RSS MiB':>8}  note"]
    base: dict[str, float] = {}
    for r in rows:
        if r.system == "neighbourwatch":
            base[r.workload] = r.events_per_second
    for r in rows:
        ours = base.get(r.workload)
        ratio = f"{ours / r.events_per_second:7.1f}x" if ours and r.system != "neighbourwatch" and r.events_per_second else ""
        out.append(f"{r.workload:<34} {r.system:<36} {r.events:>8,} {r.events_per_second:>10,.0f} {ratio:>8} "
                   f"{r.rss_mb:>8.0f}  {r.note}")
    return out


def main(*, data_dir: str, json_out: str | None = None, only: Sequence[str] | None = None,
         events: int = 30_000, log_passes: int = 10, text_events: int = 2_000, ilof_seconds: float = 10.0,
         long_events: int = 0, kafka: bool = False, kafka_events: int = 40_000,
         kafka_repeat: int = 2) -> int:
    data = Path(data_dir)
    if not data.is_dir():
        print(f"no labelled data at {data} (NWATCH_DATA_DIR or --data-dir)", file=sys.stderr)
        return 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    want = set(only or ["tabular", "vector", "logs", "text", "memory"] + (["kafka"] if kafka else []))
    rows: list[Row] = []
    report: dict[str, Any] = {"rows": [], "started": time.time()}
    t_start = time.perf_counter()

    def show(new: list[Row]) -> None:
        rows.extend(new)
        for line in format_table(new):
            print(line, flush=True)

    if "tabular" in want:
        for name in ("32_shuttle", "30_satellite"):
            show(bench_tabular(data, name, kind="transaction", events=events, ilof_seconds=ilof_seconds))
    if "vector" in want:
        show(bench_tabular(data, "30_satellite", kind="vector", events=events, ilof_seconds=ilof_seconds))
    if "logs" in want:
        show(bench_logs(data, passes=log_passes, text_backend=None))
    if "text" in want:
        show(bench_text(data, events=text_events, held_out=300))
    if "memory" in want:
        report["index_memory"] = bench_index_memory()
        for m in report["index_memory"]:
            print(f"index memory {m['backend']:<5} {m['vectors']:,} x {m['dim']}: resident growth "
                  f"{m['rss_growth_bytes'] / 2**20:.1f} MiB, raw vectors + graph "
                  f"{(m['raw_vectors_bytes'] + m['graph_bytes']) / 2**20:.1f} MiB, ratio {m['ratio']:.2f}", flush=True)
    if long_events:
        slope = bench_rss_slope(data, events=long_events)
        report["rss_slope"] = slope
        print(f"resident memory over {slope['events']:,} tabular events ({slope['seconds']:.0f} s): "
              f"{slope['rss_first_mb']:.0f} -> {slope['rss_last_mb']:.0f} MiB after warm-up, "
              f"slope {slope['slope_mb_per_million']:+.2f} MiB per million events; "
              f"heap trims {slope['heap_trims']} ({1e3 * slope['heap_trim_seconds'] / max(1, slope['heap_trims']):.1f} ms "
              f"each, {100 * slope['heap_trim_seconds'] / slope['seconds']:.2f} % of the run)", flush=True)
    if "kafka" in want:
        from streams.bench_kafka import bench_kafka

        report["kafka"] = bench_kafka(data, events=kafka_events, repeat=kafka_repeat)
    report["rows"] = [r.to_dict() for r in rows]
    report["seconds"] = time.perf_counter() - t_start
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))
    return 0

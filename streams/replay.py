"""``nwatch replay``: the pipeline offline over a JSONL file or stdin, in file order.

The file is streamed in batches, never loaded whole. Each valid event yields
one score record (``--out``), each drift alarm a drift record (``--drift-out``),
each invalid line a reject (``--rejects``: line number, reason, raw text).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, BinaryIO

import orjson

from streams.pipeline import Pipeline


@dataclass
class ReplaySummary:
    lines: int = 0
    events: int = 0
    anomalies: int = 0
    warming_up: int = 0
    drifts: int = 0
    rejects: int = 0
    reject_reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    labelled: int = 0
    labelled_anomalies_flagged: int = 0
    normals_flagged: int = 0
    normals_judged: int = 0
    interrupted: bool = False  # Ctrl-C: ``lines`` are the lines whose outputs were all written

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def lines_text(self) -> list[str]:
        out = [
            f"lines {self.lines:,}  events scored {self.events:,}  anomalies {self.anomalies:,}  "
            f"drifts {self.drifts:,}  rejected {self.rejects:,}",
            f"{self.seconds:.2f} s, {self.events_per_second:,.0f} events/s  "
            f"(warming up: {self.warming_up:,} events)",
        ]
        if self.reject_reasons:
            out.append(
                "rejected by reason: "
                + ", ".join(f"{r} {n}" for r, n in self.reject_reasons.most_common())
            )
        if self.labelled:
            pos = self.labelled_anomalies_flagged
            out.append(
                f"labelled events {self.labelled:,}: flagged share of normal ones "
                f"{self.normals_flagged / max(1, self.normals_judged):.4f}, "
                f"labelled anomalies flagged {pos:,}"
            )
        return out


def _batches(stream: BinaryIO, size: int) -> Iterator[list[tuple[int, bytes]]]:
    batch: list[tuple[int, bytes]] = []
    for n, line in enumerate(stream, start=1):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue  # blank lines separate nothing in JSONL; not an event
        batch.append((n, line))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def replay(
    pipeline: Pipeline,
    stream: BinaryIO,
    *,
    out: IO[bytes] | None = None,
    drift_out: IO[bytes] | None = None,
    rejects: IO[bytes] | None = None,
    batch_size: int = 256,
    progress: IO[str] | None = None,
    progress_every: float = 2.0,
) -> ReplaySummary:
    """Run ``stream`` through ``pipeline``; write outputs as they come.

    Ctrl-C (``KeyboardInterrupt``) ends the run early: the summary is returned
    with ``interrupted`` set and ``lines`` the lines whose outputs were all written.
    """
    summary = ReplaySummary()
    t0 = time.perf_counter()
    try:
        _replay(pipeline, stream, summary, t0, out, drift_out, rejects, batch_size, progress, progress_every)
    except KeyboardInterrupt:
        summary.interrupted = True
    summary.seconds = time.perf_counter() - t0
    if progress is not None and summary.seconds >= progress_every:
        progress.write("\n")
    return summary


def _replay(pipeline: Pipeline, stream: BinaryIO, summary: ReplaySummary, t0: float, out: IO[bytes] | None,
            drift_out: IO[bytes] | None, rejects: IO[bytes] | None, batch_size: int, progress: IO[str] | None,
            progress_every: float) -> None:
    last = t0
    for batch in _batches(stream, batch_size):
        result = pipeline.process_raw([raw for _, raw in batch])
        for i, rec in result.scores:
            summary.events += 1
            summary.anomalies += rec.is_anomaly
            summary.warming_up += rec.warming_up
            if rec.label is not None:
                summary.labelled += 1
                if rec.label == 1:
                    summary.labelled_anomalies_flagged += rec.is_anomaly
                elif not rec.warming_up:
                    summary.normals_judged += 1
                    summary.normals_flagged += rec.is_anomaly
            if out is not None:
                out.write(orjson.dumps(rec.to_dict()) + b"\n")
        for d in result.drifts:
            summary.drifts += 1
            if drift_out is not None:
                drift_out.write(orjson.dumps(d.to_dict()) + b"\n")
        for r in result.rejects:
            summary.rejects += 1
            summary.reject_reasons[r.reason] += 1
            if rejects is not None:
                line_no, raw = batch[r.index]
                rejects.write(
                    orjson.dumps(
                        {
                            "line": line_no,
                            "reason": r.reason,
                            "error": r.message,
                            "raw": raw.decode("utf-8", errors="replace"),
                        }
                    )
                    + b"\n"
                )
        summary.lines = batch[-1][0]
        now = time.perf_counter()
        if progress is not None and now - last >= progress_every:
            last = now
            rate = summary.events / (now - t0)
            progress.write(
                f"\r{summary.lines:,} lines  {summary.events:,} scored  {summary.anomalies:,} anomalies  "
                f"{summary.drifts} drifts  {summary.rejects:,} rejected  {rate:,.0f} ev/s"
            )
            progress.flush()
    # The end of the input: the last incomplete blocks learn too, so a drift
    # completed by the final events is still reported.
    for d in pipeline.flush().drifts:
        summary.drifts += 1
        if drift_out is not None:
            drift_out.write(orjson.dumps(d.to_dict()) + b"\n")


def open_input(path: str) -> BinaryIO:
    return sys.stdin.buffer if path == "-" else open(path, "rb")

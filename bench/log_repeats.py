"""``admit_repeats`` on log sources: BGL_2k (real, labelled) and the sample stream's service logs.

Each stream is replayed through the pipeline (``nwatch replay`` path) with
``admit_repeats`` 0 (off), 2, 3 (the log default) and 5; prints the
false-alarm rate on judged normal lines, the recall on judged anomalies and
the judged ROC-AUC. BGL_2k's flagged normal lines are mostly templates first
seen after the warm-up and then repeated; the sample stream's anomalies are 6
error templates that recur, the case where admitting a pattern costs recall.

Run from the repository root: ``python bench/log_repeats.py``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from streams.bench_quality import figures, replay
from streams.config import Settings, SourceSettings
from streams.quality_streams import Stream, bgl_stream
from streams.samples import write_sample_stream

DATA = Path(os.environ.get("NWATCH_DATA_DIR", "../shared/data"))


def sample_logs(events: int = 12_000, seed: int = 4) -> Stream:
    buf = io.BytesIO()
    write_sample_stream(buf, events=events, seed=seed, broken=0, kinds=["log"])
    lines = buf.getvalue().splitlines()
    y = np.array([json.loads(line).get("label", 0) for line in lines])
    return Stream("sample_logs", "logs", "checkout-svc", lines, y)


def main() -> None:
    for stream in (bgl_stream(DATA / "logs" / "BGL_2k.log"), sample_logs()):
        for m in (0, 2, 3, 5):
            settings = Settings(sources={stream.source: SourceSettings(admit_repeats=m)})
            f = figures(stream.labels, replay(stream, settings))
            judged = f["events"] - f["warmup_events"]
            print(f"{stream.name:<12} admit_repeats {m}: FAR {f['false_alarm_rate']:.4f}  "
                  f"recall {f['recall']:.3f}  ROC-AUC judged {f['roc_auc_judged']:.3f}  "
                  f"({judged} judged events)", flush=True)


if __name__ == "__main__":
    main()

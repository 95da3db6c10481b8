"""``nwatch demo`` as a user runs it: broker, worker, generator and live view, stopped by --duration."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from tests.integration.conftest import free_port

pytestmark = pytest.mark.timeout(300)


def test_demo_detects_anomalies_and_drift_and_leaves_nothing_running():
    port = free_port()
    before = {p.pid for p in psutil.process_iter()}
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", "demo", "--duration", "55", "--metrics-port", str(port)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "broker (Tansu) on 127.0.0.1:" in out
    assert f"metrics on http://127.0.0.1:{port}/metrics" in out
    assert "ANOMALY" in out and "labelled anomaly" in out
    assert "DRIFT     embeddings" in out or "DRIFT     cards" in out
    assert "rejected" in out
    summary = out[out.index("summary after"):]
    assert "scored 0," not in summary
    # the broker and the worker are gone
    leftovers = [
        p for p in psutil.process_iter(["pid", "cmdline"])
        if p.info["pid"] not in before and any("tansu" in c or "streams.cli" in c for c in (p.info["cmdline"] or []))
    ]
    assert leftovers == []

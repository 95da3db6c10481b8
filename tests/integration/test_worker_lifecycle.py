"""The worker as an operator runs it (Kubernetes, docker compose, systemd), on the real broker.

The pipeline process is the default (``kafka.pipeline_path = "auto"``): ``nwatch
run`` is two processes. What an operator relies on, each with real
subprocesses and real signals:

- SIGTERM sent to the worker alone (kubelet and ``docker stop`` signal PID 1
  only, not its process group): the worker stops consuming, the batches in
  flight finish and are committed, the pipeline process writes the final
  snapshot (at the committed offset), both exit, the worker with 0.
- SIGKILL of the worker alone (what a supervisor that is not a container
  does after its grace period): the pipeline process does not outlive it,
  and says why it ends.
- A pipeline process that hangs (SIGSTOP here; a deadlock or a write stuck
  on the state volume in life) is noticed: its pipe stays open, so only the
  age of the oldest unanswered request tells. The worker kills it and exits
  non-zero, so that its supervisor restarts it.
- As PID 1 of a PID namespace (a container without an init) the kernel drops
  every signal the process has no handler for: ``nwatch run`` handles SIGTERM
  as its main() starts (before faust's handler, 0.5-1 s later), and the image's
  entrypoint (deploy/Dockerfile) puts tini in front of it, which forwards it.
- /metrics exports the pipeline process's memory, CPU and start time
  (``nwatch_pipeline_process_*``) beside the worker's ``process_*``.
- The pipeline process's log lines, on the stderr it shares with the worker,
  name the process and its pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.engine_process import WORKER_GONE
from streams.samples import sample_lines
from streams.snapshots import SnapshotStore
from tests.integration.conftest import (
    end_run,
    free_port,
    produce_paced,
    start_worker,
    worker_env,
    worker_scored,
    worker_topics,
)

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def pipeline_process(worker: subprocess.Popen, timeout: float = 60.0) -> psutil.Process:
    """The worker's pipeline process (``streams.engine_process``), once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(worker.pid).children():
            try:
                if "streams.engine_process" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError("no pipeline process")


def gone(proc: psutil.Process, timeout: float) -> bool:
    """Whether ``proc`` has ended (or is a zombie) within ``timeout`` seconds."""
    try:
        proc.wait(timeout)
        return True
    except psutil.TimeoutExpired:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _running_worker(broker, tmp_path, prefix: str, **env: str) -> tuple:
    """A worker (default settings: the pipeline process) scoring a stream paced at 300 events/s:
    (worker, log, port, topics, state dir, stop event, producing thread), once 1000 are scored."""
    bootstrap = broker.bootstrap_servers
    topics = worker_topics(bootstrap, prefix)
    lines = list(sample_lines(events=30_000, seed=41, broken=0, kinds=["transaction", "vector", "log"]))
    stop = threading.Event()
    producing = threading.Thread(target=produce_paced, args=(bootstrap, topics["events"], lines, 300.0),
                                 kwargs={"stop": stop}, daemon=True)
    producing.start()
    state = tmp_path / "state"
    port = free_port()
    worker, log = start_worker(worker_env(bootstrap, topics, NWATCH_METRICS__PORT=str(port),
                                          NWATCH_STATE__DIR=str(state), **env),
                               tmp_path / "worker.log", "--loglevel", "info")
    deadline = time.monotonic() + 150
    while worker_scored(port) < 1000:
        assert worker.poll() is None, (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "nothing scored"
        time.sleep(0.3)
    return worker, log, port, topics, state, stop, producing


def test_sigterm_to_the_worker_alone_finishes_commits_and_writes_the_final_snapshot(broker, tmp_path):
    from kafka import KafkaConsumer, TopicPartition

    worker, log, port, topics, state, stop, producing = _running_worker(broker, tmp_path, "t")
    try:
        child = pipeline_process(worker)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        child_rss, worker_rss = child.memory_info().rss, psutil.Process(worker.pid).memory_info().rss
        worker_start = psutil.Process(worker.pid).create_time()
        os.kill(worker.pid, signal.SIGTERM)  # the worker only, as kubelet does; events keep coming
        code = worker.wait(timeout=60)  # the Deployment's terminationGracePeriodSeconds
        child_gone = gone(child, 10)
    finally:
        end_run(worker, log, stop, producing)
    text = (tmp_path / "worker.log").read_text(errors="replace")
    assert code == 0, text[-3000:]
    # /metrics covers both processes: the worker's process_* and the pipeline process's own.
    samples = {s.name: s.value for fam in text_string_to_metric_families(body) for s in fam.samples if not s.labels}
    assert samples["nwatch_pipeline_process_start_time_seconds"] == pytest.approx(child.create_time(), abs=0.05)
    assert samples["process_start_time_seconds"] == pytest.approx(worker_start, abs=0.05)
    assert 0.5 < samples["nwatch_pipeline_process_resident_memory_bytes"] / child_rss < 2
    assert 0.5 < samples["process_resident_memory_bytes"] / worker_rss < 2
    assert samples["nwatch_pipeline_process_cpu_seconds_total"] > 0
    assert "nwatch_producer_process_resident_memory_bytes" not in samples  # no producer process by default
    assert child_gone, "the pipeline process outlived the worker"
    assert "interrupted" not in text, text[-3000:]
    # The pipeline process's lines (its state's, at INFO: --loglevel holds there) name it and its pid.
    assert f"[pipeline {child.pid}] INFO neighbourwatch.state: partition {topics['events']}[0]: no snapshot" in text

    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=f"g-{topics['events']}",
                             enable_auto_commit=False)
    committed = consumer.committed(TopicPartition(topics["events"], 0))
    consumer.close()
    snapshot = SnapshotStore(state / "snapshots" / f"g-{topics['events']}").load(topics["events"], 0)
    assert snapshot is not None and committed
    # The final snapshot covers exactly what was committed: a restart replays nothing.
    assert snapshot.offset == committed, (snapshot.offset, committed)


def test_sigkill_of_the_worker_alone_leaves_no_pipeline_process_behind(broker, tmp_path):
    worker, log, _, _, _, stop, producing = _running_worker(broker, tmp_path, "o")
    try:
        child = pipeline_process(worker)
        os.kill(worker.pid, signal.SIGKILL)  # not the group: the child is not signalled
        worker.wait(timeout=30)
        child_gone = gone(child, 10)
    finally:
        if not gone(child, 0):
            child.kill()
        end_run(worker, log, stop, producing)
    assert child_gone, "the pipeline process outlived a killed worker"
    text = (tmp_path / "worker.log").read_text(errors="replace")
    assert f"[pipeline {child.pid}] WARNING neighbourwatch.engine: {WORKER_GONE}" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_a_hung_pipeline_process_is_killed_and_the_worker_exits_non_zero(broker, tmp_path):
    worker, log, _, _, _, stop, producing = _running_worker(
        broker, tmp_path, "h", NWATCH_KAFKA__PIPELINE_STALL_SECONDS="20")
    try:
        child = pipeline_process(worker)
        os.kill(child.pid, signal.SIGSTOP)  # alive, its pipes open, answering nothing
        code = worker.wait(timeout=90)
        child_gone = gone(child, 10)
    finally:
        if not gone(child, 0):
            child.kill()
        end_run(worker, log, stop, producing)
    text = (tmp_path / "worker.log").read_text(errors="replace")
    assert code != 0, text[-3000:]
    assert child_gone, "the hung pipeline process was left behind"
    assert "the pipeline process answered no request for" in text, text[-3000:]


def _as_pid_1(command: list[str], **env: str) -> subprocess.Popen:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a PID namespace")
    # --kill-child: the namespace (its PID 1 and so every process in it) ends with unshare
    return subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *command], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _pid_1(outer: subprocess.Popen) -> int:
    """The host pid of the namespace's PID 1 (unshare's child)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = psutil.Process(outer.pid).children()
        if children:
            return children[0].pid
        time.sleep(0.005)
    raise AssertionError("unshare started nothing")


def test_nwatch_run_as_pid_1_honours_sigterm_from_its_start():
    # The worker is replaced by one that signals itself before doing anything (faust has
    # installed nothing yet): only the handler nwatch installs first keeps the signal.
    code = ("import os, signal, sys, time\n"
            "from streams import cli\n"
            "def run(args):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(60)\n"
            "    return 0\n"
            "cli.cmd_run = run\n"
            "sys.exit(cli.main(['run']))\n")
    outer = _as_pid_1([sys.executable, "-c", code])
    try:
        rc = outer.wait(timeout=30)
    finally:
        if outer.poll() is None:
            outer.kill()
    assert rc == 128 + signal.SIGTERM, outer.stdout.read().decode(errors="replace")[-2000:]


def test_the_image_entrypoint_puts_an_init_before_the_worker_and_forwards_sigterm(broker):
    text = (DEPLOY / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert entrypoint[-1] == "nwatch" and len(entrypoint) > 1, "the worker must not be PID 1: an init first"
    if not shutil.which(Path(entrypoint[0]).name):
        pytest.skip(f"{entrypoint[0]} not installed (./dev test installs Debian's tini)")
    nwatch = str(Path(sys.executable).with_name("nwatch"))
    command = [shutil.which(Path(a).name) or a for a in entrypoint[:-1]] + [nwatch, *cmd]
    # a reachable broker: the worker would run on for good if the signal were lost
    outer = _as_pid_1(command, NWATCH_KAFKA__BOOTSTRAP_SERVERS=broker.bootstrap_servers, NWATCH_METRICS__PORT="0",
                      NWATCH_STATE__DIR=tempfile.mkdtemp(prefix="nwatch-pid1-"))
    try:
        init = psutil.Process(_pid_1(outer))
        deadline = time.monotonic() + 10
        # tini blocks the signals it forwards before it starts the worker: once the worker is
        # its child, a SIGTERM to PID 1 is kept (even while the worker itself handles none yet)
        while not (init.children() and Path(init.exe()).name == Path(entrypoint[0]).name):
            assert time.monotonic() < deadline, f"PID 1 is {init.exe()} with no child"
            time.sleep(0.001)
        os.kill(init.pid, signal.SIGTERM)  # as kubelet does, at once: the worker may not handle it yet
        rc = outer.wait(timeout=30)
    finally:
        if outer.poll() is None:
            outer.kill()
    assert rc in (0, 128 + signal.SIGTERM), outer.stdout.read().decode(errors="replace")[-2000:]

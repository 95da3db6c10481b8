"""Scale-out: several workers in one consumer group on the loopback broker, one of them killed.

Twelve sources keyed onto a six-partition topic. The workers share the
partitions (each scores some); all events of a source stay on one worker at a
time; when one worker is killed its partitions move to the others, which load
its snapshots (a state directory all of them reach, as a shared volume would
be) and replay from the snapshot. The oracle: every event scored or
dead-lettered, and every score equal to one uninterrupted offline pipeline's
(so equal to what a single worker gives).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time

import orjson
import pytest

from streams.runtime import stop_process_group
from streams.samples import sample_lines
from tests.conftest import assert_same_results
from tests.integration.conftest import free_port, read_topic, start_worker, worker_env, worker_scored
from tests.integration.test_chaos import _expected, _produce, _topics

pytestmark = pytest.mark.timeout(900)

RATE = 300.0


def _spread(lines: list[bytes], ways: int = 4) -> list[bytes]:
    """The sample sources split into ``ways`` sources each (``cards`` -> ``cards-0``..``cards-3``)."""
    out = []
    for i, line in enumerate(lines):
        d = orjson.loads(line)
        d["source"] = f"{d['source']}-{i % ways}"
        out.append(orjson.dumps(d))
    return out


@pytest.mark.parametrize(("workers", "input_path"), [(2, "aiokafka"), (3, "aiokafka"), (2, "faust")])
def test_workers_share_partitions_and_take_over_a_killed_one(broker, tmp_path, workers, input_path):
    bootstrap = broker.bootstrap_servers
    topics = _topics(bootstrap, partitions=6)
    lines = _spread(list(sample_lines(events=int(RATE * 40), seed=51 + workers, broken=0,
                                      kinds=["transaction", "vector", "audio"])))
    ids = [orjson.loads(x)["id"] for x in lines]
    state_dir = tempfile.mkdtemp(prefix="nwatch-scale-")
    ports = [free_port() for _ in range(workers)]
    procs, logs = [], []
    done = threading.Event()
    producer = threading.Thread(target=_produce, args=(bootstrap, topics["events"], lines, RATE, done), daemon=True)
    try:
        for k, port in enumerate(ports):
            env = worker_env(bootstrap, topics, NWATCH_METRICS__PORT=str(port), NWATCH_STATE__DIR=state_dir,
                             NWATCH_STATE__SNAPSHOT_INTERVAL="2", NWATCH_KAFKA__INPUT_PATH=input_path)
            env["NWATCH_KAFKA__GROUP_ID"] = f"g-{topics['events']}"  # one group
            proc, log = start_worker(env, tmp_path / f"worker-{k}.log")
            procs.append(proc)
            logs.append(log)
        producer.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and sum(worker_scored(p) > 0 for p in ports) < workers:
            for k, p in enumerate(procs):
                assert p.poll() is None, (tmp_path / f"worker-{k}.log").read_text(errors="replace")[-3000:]
            time.sleep(1)
        shares = [worker_scored(p) for p in ports]
        assert all(s > 0 for s in shares), shares  # every worker got partitions
        os.killpg(procs[0].pid, signal.SIGKILL)  # the others take its partitions over
        procs[0].wait(timeout=30)
        done.wait(timeout=len(lines) / RATE + 120)
        deadline = time.monotonic() + 240
        scored: set[str] = set()
        while time.monotonic() < deadline:
            scores = read_topic(bootstrap, topics["scores"])
            scored = {orjson.loads(r.value)["id"] for r in scores}
            if scored >= set(ids):
                break
            time.sleep(2)
        after = [worker_scored(p) for p in ports[1:]]
        took_over = "".join((tmp_path / f"worker-{k}.log").read_text(errors="replace") for k in range(1, workers))
    finally:
        for p in procs[1:]:
            stop_process_group(p, timeout=60)
        for log in logs:
            log.close()
    records = [orjson.loads(r.value) for r in scores]
    missing = set(ids) - scored
    print(f"\n{workers} workers: shares before the kill {shares}, survivors after {after}; "
          f"{len(records)} score records for {len(ids)} events ({len(records) - len(scored)} duplicates)")
    assert not missing, f"{len(missing)} events never scored"
    assert "restored" in took_over  # the killed worker's partitions came with their state
    expected = _expected(bootstrap, topics)
    for rec in records:
        assert_same_results(rec, expected[rec["id"]], rec["id"])

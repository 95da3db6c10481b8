"""A sharded hot source on the real broker: shards on separate partitions and workers, drift from
the merged shard summaries at the position of the unsharded run (within one drift window).

One vector source drifts (three dimensions move by half a standard deviation).
The oracle is the unsharded pipeline of ``nwatch replay`` over the same events;
the sharded run is two ``nwatch run`` workers in one group reading a
three-partition topic that ``produce_file`` filled with the events keyed
``hot#k``; the worker holding the shard-summaries partition merges the shards'
block summaries and publishes the drift record.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time

import numpy as np
import orjson
import pytest

from streams.broker import ensure_topics, shard_summaries_topic
from streams.config import KafkaSettings, Settings, SourceSettings
from streams.pipeline import Pipeline
from streams.produce import produce_file
from streams.runtime import stop_process_group
from tests.integration.conftest import free_port, metric_sum, read_topic, start_worker, worker_env, worker_scored
from tests.integration.test_chaos import _topics

pytestmark = pytest.mark.timeout(300)

EVENTS, DRIFT_AT, DIM = 9000, 5000, 16


def _lines(drift_at: int | None) -> list[bytes]:
    rng = np.random.default_rng(11)
    X = rng.normal(size=(EVENTS, DIM))
    if drift_at is not None:
        X[drift_at:, :3] += 0.5
    t0 = time.time() - EVENTS  # event times end now (never "future")
    return [orjson.dumps({"id": f"v-{i}", "source": "hot", "kind": "vector", "ts": t0 + i,
                          "vector": X[i].round(5).tolist()}) for i in range(EVENTS)]


def _replay_drifts(lines: list[bytes], shards: int) -> list:
    settings = Settings(sources={"hot": SourceSettings(shards=shards)}, state={"dir": None})
    pipeline = Pipeline(settings=settings)
    drifts = []
    for i in range(0, len(lines), 256):
        drifts += pipeline.process_raw(lines[i : i + 256]).drifts
    return drifts + pipeline.flush().drifts


def _wait_for_group(procs, ports, tmp_path) -> None:
    """Both workers up (serving /metrics) and, after a settling pause, in the group: produced
    before then, every partition would go to the first worker that joined."""
    import urllib.request

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for k, p in enumerate(procs):
            assert p.poll() is None, (tmp_path / f"worker-{k}.log").read_text(errors="replace")[-3000:]
        try:
            for port in ports:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            break
        except OSError:
            time.sleep(1)
    time.sleep(15)  # the group join and its rebalance (about 5 s each on Tansu)


def test_sharded_drift_is_found_where_the_unsharded_one_is(broker, tmp_path):
    lines = _lines(DRIFT_AT)
    [unsharded] = _replay_drifts(lines, 1)
    [sharded_replay] = _replay_drifts(lines, 2)
    assert _replay_drifts(_lines(None), 2) == []  # the no-change twin, sharded: no alarm

    bootstrap = broker.bootstrap_servers
    topics = _topics(bootstrap, partitions=3)  # hot#0 and hot#1 hash to partitions 2 and 1
    summaries = f"{topics['events']}.summaries"
    names, configs = shard_summaries_topic(KafkaSettings(shard_summaries_topic=summaries))
    ensure_topics(bootstrap, names, configs=configs)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    ports = [free_port() for _ in range(2)]
    procs, logs = [], []
    state_dir = tempfile.mkdtemp(prefix="nwatch-shard-")
    try:
        for k, port in enumerate(ports):
            env = worker_env(bootstrap, topics, NWATCH_METRICS__PORT=str(port), NWATCH_STATE__DIR=state_dir,
                             NWATCH_KAFKA__SHARD_SUMMARIES_TOPIC=summaries,
                             NWATCH_SOURCES='{"hot": {"shards": 2}}')
            proc, log = start_worker(env, tmp_path / f"worker-{k}.log")
            procs.append(proc)
            logs.append(log)
        _wait_for_group(procs, ports, tmp_path)
        summary = produce_file(str(path), topic=topics["events"], kafka_settings=KafkaSettings(bootstrap_servers=bootstrap),
                               shards={"hot": 2})
        assert summary.produced == EVENTS
        deadline = time.monotonic() + 150
        drifts: list = []
        while time.monotonic() < deadline and not drifts:
            for k, p in enumerate(procs):
                assert p.poll() is None, (tmp_path / f"worker-{k}.log").read_text(errors="replace")[-3000:]
            drifts = [orjson.loads(r.value) for r in read_topic(bootstrap, topics["drift"])]
            if not drifts:
                time.sleep(2)
        time.sleep(3)  # a second (wrong) record would come right after the first
        drifts = [orjson.loads(r.value) for r in read_topic(bootstrap, topics["drift"])]
        shares = [worker_scored(p) for p in ports]
    finally:
        for p in procs:
            stop_process_group(p, timeout=60)
        for log in logs:
            log.close()
    window = max(unsharded.window_size, sharded_replay.window_size)
    print(f"\nunsharded replay: drift at {unsharded.events_seen} (window {unsharded.window_size}); "
          f"sharded replay: {sharded_replay.events_seen} (window {sharded_replay.window_size}); "
          f"Kafka, 2 shards on 2 workers (scored {shares}): {[d['events_seen'] for d in drifts]}")
    assert all(s > 0 for s in shares), shares  # the two shards were on different workers
    assert len(drifts) == 1, drifts
    [drift] = drifts
    assert drift["source"] == "hot" and drift["kind"] == "vector"
    assert drift["events_seen"] == sharded_replay.events_seen  # the Kafka merge is replay's merge
    assert drift["detected_at"] == sharded_replay.detected_at
    assert drift["events_seen"] > DRIFT_AT
    assert abs(drift["events_seen"] - unsharded.events_seen) <= window


def _merged(port: int) -> float:
    """``nwatch_shard_summaries_total{outcome="merged"}`` of one worker (0 if it merges nothing)."""
    return metric_sum(port, "nwatch_shard_summaries_total", 'outcome="merged"')


def test_the_merge_survives_the_merging_worker_killed(broker, tmp_path):
    """The worker holding the summaries partition is SIGKILLed before the drift: the other one
    takes its partitions over (shard state from the snapshot, the merge rebuilt from the topic)
    and the one drift record is the uninterrupted sharded replay's."""
    lines = _lines(DRIFT_AT)
    [expected] = _replay_drifts(lines, 2)
    bootstrap = broker.bootstrap_servers
    topics = _topics(bootstrap, partitions=3)
    summaries = f"{topics['events']}.summaries"
    names, configs = shard_summaries_topic(KafkaSettings(shard_summaries_topic=summaries))
    ensure_topics(bootstrap, names, configs=configs)
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    head, tail = tmp_path / "head.jsonl", tmp_path / "tail.jsonl"
    head.write_bytes(b"\n".join(lines[:3000]) + b"\n")
    tail.write_bytes(b"\n".join(lines[3000:]) + b"\n")
    ports = [free_port() for _ in range(2)]
    procs, logs = [], []
    state_dir = tempfile.mkdtemp(prefix="nwatch-shard-kill-")
    try:
        for k, port in enumerate(ports):
            env = worker_env(bootstrap, topics, NWATCH_METRICS__PORT=str(port), NWATCH_STATE__DIR=state_dir,
                             NWATCH_STATE__SNAPSHOT_INTERVAL="2", NWATCH_KAFKA__SHARD_SUMMARIES_TOPIC=summaries,
                             NWATCH_KAFKA__SHARD_CHECKPOINT_WINDOWS="10",  # checkpoints before the kill
                             NWATCH_SOURCES='{"hot": {"shards": 2}}')
            proc, log = start_worker(env, tmp_path / f"worker-{k}.log")
            procs.append(proc)
            logs.append(log)
        _wait_for_group(procs, ports, tmp_path)
        assert produce_file(str(head), topic=topics["events"], kafka_settings=kafka, shards={"hot": 2}).produced == 3000
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and max(_merged(p) for p in ports) < 40:
            time.sleep(1)
        merging = max(range(2), key=lambda k: _merged(ports[k]))
        assert _merged(ports[merging]) >= 40, [_merged(p) for p in ports]  # of about 58 blocks (60 less partial ones)
        time.sleep(3)  # a snapshot of the shard states (every 2 s)
        os.killpg(procs[merging].pid, signal.SIGKILL)
        procs[merging].wait(timeout=30)
        survivor = 1 - merging
        assert produce_file(str(tail), topic=topics["events"], kafka_settings=kafka,
                            shards={"hot": 2}).produced == EVENTS - 3000
        deadline = time.monotonic() + 150
        drifts: list = []
        while time.monotonic() < deadline and not drifts:
            assert procs[survivor].poll() is None
            drifts = [orjson.loads(r.value) for r in read_topic(bootstrap, topics["drift"])]
            if not drifts:
                time.sleep(2)
        time.sleep(3)
        drifts = [orjson.loads(r.value) for r in read_topic(bootstrap, topics["drift"])]
        took_over = (tmp_path / f"worker-{survivor}.log").read_text(errors="replace")
        written = read_topic(bootstrap, summaries)
    finally:
        for p in procs:
            if p.poll() is None:
                stop_process_group(p, timeout=60)
        for log in logs:
            log.close()
    print(f"\nmerging worker {merging} killed; drift records {[d['events_seen'] for d in drifts]}, "
          f"sharded replay {expected.events_seen}")
    assert "rebuilt the merge" in took_over
    assert [d["events_seen"] for d in drifts] == [expected.events_seen]
    assert drifts[0]["detected_at"] == expected.detected_at
    # The merge was checkpointed, and the blocks each checkpoint covers were tombstoned after it
    # (the loopback broker does not compact; a Kafka broker would drop them).
    checkpoints = [(i, orjson.loads(r.value)) for i, r in enumerate(written) if r.key.endswith(b"#checkpoint")]
    tombstones = [(i, r.key.decode()) for i, r in enumerate(written) if r.value is None]
    blocks = {r.key.decode() for r in written if r.value is not None and b"#checkpoint" not in r.key
              and not r.key.endswith(b"#null")}
    print(f"summaries topic: {len(blocks)} blocks, {len(checkpoints)} checkpoints, {len(tombstones)} tombstones")
    assert len(checkpoints) >= 2 and tombstones
    for i, key in tombstones:
        covering = max(cp["next_window"] for j, cp in checkpoints if j < i)
        assert key in blocks and int(key.rsplit("#", 1)[1]) < covering

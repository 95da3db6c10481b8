"""Chaos on the real broker: workers killed mid-stream, poison input, and an oracle.

The oracle counts every produced event id in the outputs (scores) or the DLQ:
none may be missing. Because results depend only on each source's event
sequence (learning goes by blocks of the source's own events), every score the
killed-and-restarted workers produced, duplicates included, must equal what
one uninterrupted offline pipeline gives for the same event: the state was
restored, not relearned (a relearned source would be warming up again).

The default run kills once with SIGKILL and once with SIGTERM; ``-m chaos``
runs the full tier: ten kills of each at random points.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import threading
import time

import orjson
import pytest

from streams.broker import ensure_topics
from streams.config import Settings
from streams.pipeline import Pipeline
from streams.runtime import stop_process_group
from streams.samples import sample_lines
from tests.conftest import assert_same_results
from tests.integration.conftest import (
    drain,
    free_port,
    produce_paced,
    read_topic,
    start_worker,
    worker_env,
    worker_scored,
)

pytestmark = pytest.mark.timeout(1800)

KINDS = ["transaction", "vector", "audio"]  # no text model to load at every restart
RATE = 400.0  # events per second produced while the workers are killed
BATCH = 256
COMMIT_INTERVAL = 1.0  # faust's broker_commit_interval in streams.app


def _topics(bootstrap: str, partitions: int = 3) -> dict[str, str]:
    suffix = f"{os.getpid()}-{random.randrange(1 << 30):x}"
    names = {n: f"chaos{suffix}.{n}" for n in ("events", "scores", "anomalies", "drift", "alerts", "dlq")}
    names["alerts_dlq"] = f"{names['alerts']}.dlq"
    ensure_topics(bootstrap, {names["events"]: partitions})
    ensure_topics(bootstrap, [v for k, v in names.items() if k != "events"])
    return names


def _produce(bootstrap: str, topic: str, lines: list[bytes], rate: float, done: threading.Event,
             stop: threading.Event | None = None, counter: list[int] | None = None) -> None:
    produce_paced(bootstrap, topic, lines, rate, stop=stop, done=done, counter=counter)


def _read_all(bootstrap: str, topic: str) -> list:
    """Every record of every partition of ``topic``, by (partition, offset)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    parts = consumer.partitions_for_topic(topic) or {0}
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out = drain(consumer)
    consumer.close()
    return sorted(out, key=lambda r: (r.partition, r.offset))


def _wait_for_progress(port: int, proc, log_path, timeout: float = 90.0) -> None:
    """Wait until this worker process has scored events (it is consuming)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker_scored(port) > 0:
            return
        assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"worker scored nothing in {timeout} s:\n" + log_path.read_text(errors="replace")[-3000:])


def _expected(bootstrap: str, topics: dict[str, str], records: list | None = None) -> dict[str, dict]:
    """Each event's score record from one uninterrupted offline pipeline, in each partition's order
    (``records``: the input topic as already read, by partition and offset)."""
    pipe = Pipeline(settings=Settings())
    expected: dict[str, dict] = {}
    if records is None:
        records = _read_all(bootstrap, topics["events"])
    for i in range(0, len(records), BATCH):  # any batching gives the same results
        result = pipe.process_raw([r.value for r in records[i : i + BATCH]])
        for _, rec in result.scores:
            expected.setdefault(rec.id, rec.to_dict())
    return expected


def _chaos_run(broker, tmp_path, sig: int, kills: int, seed: int, input_path: str = "aiokafka") -> dict:
    bootstrap = broker.bootstrap_servers
    topics = _topics(bootstrap)
    rng = random.Random(seed)
    # The stream outlasts the kills (a cycle takes 10-20 s: the group waits out the
    # dead member's session); production stops 5 s after the last restart.
    n_events = int(RATE * (15 + 30 * kills))
    # Event times end now: a long stream from the fixed sample start would run
    # into the future, and its tail would be refused as future_timestamp.
    lines = list(sample_lines(events=n_events, seed=seed, broken=0, kinds=KINDS, start=time.time() - 2.0 * n_events))
    env = worker_env(bootstrap, topics, NWATCH_STATE__SNAPSHOT_INTERVAL="2", NWATCH_KAFKA__INPUT_PATH=input_path)
    done, stop = threading.Event(), threading.Event()
    sent = [0]
    producer = threading.Thread(target=_produce, args=(bootstrap, topics["events"], lines, RATE, done, stop, sent),
                                daemon=True)
    producer.start()
    restarts = 0
    logs = []
    try:
        for k in range(kills):
            log_path = tmp_path / f"worker-{k}.log"
            port = free_port()
            proc, log = start_worker({**env, "NWATCH_METRICS__PORT": str(port)}, log_path)
            logs.append(log)
            _wait_for_progress(port, proc, log_path)
            time.sleep(rng.uniform(0.5, 4.0))  # a random point of the stream
            if sig == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            else:
                assert stop_process_group(proc, timeout=60) in (0, -15)
            restarts += 1
        log_path = tmp_path / "worker-final.log"
        port = free_port()
        proc, log = start_worker({**env, "NWATCH_METRICS__PORT": str(port)}, log_path)
        logs.append(log)
        _wait_for_progress(port, proc, log_path)
        time.sleep(5)
        stop.set()
        done.wait(timeout=n_events / RATE + 120)
        deadline = time.monotonic() + 300
        scores: list = []
        ids: set[str] = set()
        dlq: list = []
        # The input is read once: the oracle's ids and its expected scores come from the same read.
        inputs = _read_all(bootstrap, topics["events"])
        produced_ids = [orjson.loads(r.value)["id"] for r in inputs]
        assert len(produced_ids) == sent[0], (len(produced_ids), sent[0])  # the read is whole
        while time.monotonic() < deadline:
            scores = read_topic(bootstrap, topics["scores"])
            dlq = read_topic(bootstrap, topics["dlq"])
            ids = {orjson.loads(r.value)["id"] for r in scores}
            if len(ids) + len(dlq) >= len(produced_ids):
                break
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            time.sleep(2)
        restored_log = "".join((tmp_path / f"worker-{k}.log").read_text(errors="replace") for k in range(1, kills))
        restored_log += log_path.read_text(errors="replace")
        assert stop_process_group(proc, timeout=60) in (0, -15)
    finally:
        for log in logs:
            log.close()
    records = [orjson.loads(r.value) for r in scores]
    dlq_ids = set()
    for r in dlq:
        try:
            dlq_ids.add(orjson.loads(r.value)["id"])
        except Exception:
            pass
    expected = _expected(bootstrap, topics, inputs)
    assert set(expected) == set(produced_ids)
    lost = set(produced_ids) - ids - dlq_ids
    for rec in records:
        assert_same_results(rec, expected[rec["id"]], rec["id"])
    return {
        "events": len(produced_ids), "kills": restarts, "lost": len(lost),
        "duplicates": len(records) - len(ids), "dead_letters": len(dlq),
        "restored": len(re.findall(r"restored \d+ sources", restored_log)),
        "replayed": len(re.findall(r"replayed \d+ events", restored_log)),
    }


def _check(stats: dict, sig: int) -> None:
    print(f"\nchaos {signal.Signals(sig).name}: {stats}")
    assert stats["lost"] == 0, stats
    assert stats["dead_letters"] == 0, stats  # the stream has no bad input
    # Duplicates: outputs of events processed after the last commit before a kill,
    # at most a commit interval of processing (~1,500 events/s here) and a batch.
    assert stats["duplicates"] <= stats["kills"] * (1500 * COMMIT_INTERVAL + BATCH), stats
    assert stats["restored"] >= stats["kills"], stats  # every restart restored snapshots


@pytest.mark.parametrize(("sig", "input_path"), [
    (signal.SIGKILL, "aiokafka"), (signal.SIGTERM, "aiokafka"),
    (signal.SIGKILL, "faust"),  # the other input path: one batch at a time, faust's consumer and commits
], ids=["sigkill", "sigterm", "sigkill-faust-input"])
def test_killed_worker_loses_nothing_and_restores_its_state(broker, tmp_path, sig, input_path):
    _check(_chaos_run(broker, tmp_path, sig, kills=1, seed=21 + sig, input_path=input_path), sig)


@pytest.mark.chaos
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_ten_kills_lose_nothing_and_restore_state(broker, tmp_path, sig):
    _check(_chaos_run(broker, tmp_path, sig, kills=10, seed=31 + sig), sig)


def test_poison_input_goes_to_the_dlq_with_its_reason_and_the_worker_keeps_running(broker, tmp_path):
    from tests.poison import poison_lines

    bootstrap = broker.bootstrap_servers
    topics = _topics(bootstrap, partitions=1)
    valid = list(sample_lines(events=1200, seed=41, broken=0, kinds=["vector", "transaction"]))
    dim = len(next(orjson.loads(x)["vector"] for x in valid if b'"kind":"vector"' in x))
    poison = poison_lines(now=time.time(), vector_dim=dim)
    lines = valid[:800] + [raw for raw, _ in poison] + valid[800:]
    done = threading.Event()
    _produce(bootstrap, topics["events"], lines, rate=1e9, done=done)
    log_path = tmp_path / "worker.log"
    # Secrets in the environment, and a webhook that refuses connections (its
    # failures are logged): none of the secrets may appear in the log.
    secrets = {"url": "hunter2-in-url", "signing": "whsec-not-to-be-logged", "sasl": "sasl-pw-not-to-be-logged"}
    env = worker_env(
        bootstrap, topics, NWATCH_METRICS__PORT="0",
        NWATCH_ALERTS__WEBHOOK_URL=f"http://nwuser:{secrets['url']}@127.0.0.1:{free_port()}/hook",
        NWATCH_ALERTS__WEBHOOK_SECRET=secrets["signing"], NWATCH_ALERTS__TIMEOUT="1",
        NWATCH_KAFKA__SASL_PASSWORD=secrets["sasl"],
    )
    proc, log = start_worker(env, log_path)
    try:
        deadline = time.monotonic() + 240
        ids: set[str] = set()
        dlq: list = []
        while time.monotonic() < deadline:
            ids = {orjson.loads(r.value)["id"] for r in read_topic(bootstrap, topics["scores"])}
            dlq = read_topic(bootstrap, topics["dlq"])
            if len(ids) >= len(valid) and len(dlq) >= len(poison):
                break
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]  # never restarted
            time.sleep(1)
        assert proc.poll() is None
        assert ids == {orjson.loads(x)["id"] for x in valid}
        got = []
        for r in dlq:
            h = dict(r.headers)
            value = r.value
            if "nwatch-truncated-from" in h:  # the 2 MB one: its first 900,000 bytes, and what it was
                original = next(raw for raw, _ in poison if len(raw) == int(h["nwatch-truncated-from"]))
                assert value == original[: len(value)] and len(value) == 900_000
                assert h["nwatch-original-sha256"].decode() == hashlib.sha256(original).hexdigest()
                value = original
            got.append((value, h["nwatch-error-reason"].decode()))
        assert sorted(got) == sorted(poison)  # each one, byte for byte, with its reason
        text = log_path.read_text(errors="replace")
        assert "Traceback" not in text and "internal_error" not in text
        assert "127.0.0.1" in text  # the failing webhook was logged ...
        for secret in secrets.values():
            assert secret not in text  # ... with its credentials masked
    finally:
        assert stop_process_group(proc, timeout=60) in (0, -15)
        log.close()


@pytest.mark.chaos
def test_broker_away_and_back_the_worker_waits_and_loses_nothing(tmp_path):
    """The broker frozen (SIGSTOP: every request times out) for 30 s mid-stream, then back
    (its in-memory log survives, unlike a restart): the worker rides it out and scores
    every event, with no restart."""
    from streams.broker import EmbeddedBroker

    with EmbeddedBroker() as own:
        bootstrap = own.bootstrap_servers
        topics = _topics(bootstrap, partitions=1)
        lines = list(sample_lines(events=int(RATE * 40), seed=61, broken=0, kinds=KINDS))
        ids = {orjson.loads(x)["id"] for x in lines}
        log_path = tmp_path / "worker.log"
        port = free_port()
        proc, log = start_worker(worker_env(bootstrap, topics, NWATCH_METRICS__PORT=str(port)), log_path)
        done = threading.Event()
        producer = threading.Thread(target=_produce, args=(bootstrap, topics["events"], lines[: len(lines) // 2],
                                                           RATE, done), daemon=True)
        try:
            producer.start()
            _wait_for_progress(port, proc, log_path)
            done.wait(timeout=120)
            os.kill(own.pid, signal.SIGSTOP)
            time.sleep(30)
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            os.kill(own.pid, signal.SIGCONT)
            done2 = threading.Event()
            _produce(bootstrap, topics["events"], lines[len(lines) // 2 :], RATE, done2)
            deadline = time.monotonic() + 240
            scored: set[str] = set()
            while time.monotonic() < deadline and scored < ids:
                scored = {orjson.loads(r.value)["id"] for r in read_topic(bootstrap, topics["scores"])}
                assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
                time.sleep(2)
            print(f"\nbroker away 30 s: {len(scored)} of {len(ids)} scored, worker pid {proc.pid} still up")
            assert scored == ids
        finally:
            try:
                os.kill(own.pid, signal.SIGCONT)
            except (ProcessLookupError, TypeError):
                pass
            stop_process_group(proc, timeout=60)
            log.close()

"""The embedded broker, topic administration, client settings and ``produce_file`` on real Tansu."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import orjson
import psutil
import pytest
from kafka import KafkaAdminClient
from pydantic import SecretStr

import streams.broker as broker_module
from streams.broker import (
    BrokerError,
    EmbeddedBroker,
    _probe_metadata,
    aiokafka_client_config,
    default_topics,
    ensure_topics,
    kafka_client_config,
)
from streams.config import KafkaSettings
from streams.produce import ProduceError, ProduceSummary, ProgressLine, produce_file

pytestmark = pytest.mark.timeout(120)


def _port(broker: EmbeddedBroker) -> int:
    return int(broker.bootstrap_servers.rsplit(":", 1)[1])


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _tansu_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "tansu" in p.name()]


def _describe(bootstrap: str, topics: list[str]) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(topics)}
    finally:
        admin.close()


def _list_topics(bootstrap: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


# ------------------------------------------------------------------ broker


def test_broker_answers_metadata_with_its_own_address(broker: EmbeddedBroker) -> None:
    assert broker.is_running and broker.pid is not None
    assert broker.bootstrap_servers.startswith("127.0.0.1:")
    assert broker.startup_seconds is not None and broker.startup_seconds > 0
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        cluster = admin.describe_cluster()
    finally:
        admin.close()
    assert cluster["cluster_id"] == broker.cluster_id
    # the advertised listener is the loopback port itself: clients connect back there
    assert [(b["host"], b["port"]) for b in cluster["brokers"]] == [("127.0.0.1", _port(broker))]
    assert _probe_metadata("127.0.0.1", _port(broker), broker.cluster_id or "", 1.0)
    assert not _probe_metadata("127.0.0.1", _port(broker), "some-other-cluster", 1.0)


def test_broker_runs_in_its_own_process_group(broker: EmbeddedBroker) -> None:
    assert broker.pid is not None
    # A terminal's Ctrl-C goes to the foreground group; the broker is not in it.
    assert os.getpgid(broker.pid) == broker.pid != os.getpgrp()
    assert psutil.Process(broker.pid).ppid() == os.getpid()


def test_stop_leaves_no_process_and_is_idempotent(tmp_path: Path) -> None:
    log_path = tmp_path / "broker.log"
    b = EmbeddedBroker(log_path=log_path)
    b.stop()  # before start: nothing to do
    with b:
        pid = b.pid
        assert pid is not None and not _gone(pid)
        port = _port(b)
    assert b.pid is None and not b.is_running
    assert _gone(pid)
    b.stop()  # twice: still fine
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass
    assert log_path.read_text().strip()  # the broker's own output went to the log file
    with pytest.raises(BrokerError, match="start"):
        b.bootstrap_servers  # noqa: B018 - the port is released with the broker


def test_a_broker_that_never_answers_and_ignores_sigterm_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in "broker" that ignores SIGTERM and never answers: start() must give
    # up at its timeout and SIGKILL it (and its child) rather than leave them running.
    monkeypatch.setattr(broker_module, "_FAILED_START_GRACE", 0.3)
    fake = tmp_path / "stubborn"
    fake.write_text("#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.05; done\n")
    fake.chmod(0o755)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    b = EmbeddedBroker(binary=fake, port=1, startup_timeout=0.5)
    with pytest.raises(BrokerError, match="did not answer"):
        b.start()
    after = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not [pid for pid in after if not _gone(pid)]
    assert b.pid is None


def test_a_broker_left_running_is_stopped_when_the_interpreter_exits() -> None:
    # the parent forgets stop() and dies of an uncaught exception: atexit stops the broker
    code = (
        "from streams.broker import EmbeddedBroker; b = EmbeddedBroker().start();"
        "print(b.pid, flush=True); raise SystemExit('left running')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.returncode == 1 and b"left running" in done.stderr
    pid = int(done.stdout.split()[0])
    assert _gone(pid)


def test_two_brokers_on_two_ports_are_independent(unique_topic) -> None:
    with EmbeddedBroker() as one, EmbeddedBroker() as two:
        assert _port(one) != _port(two) and one.pid != two.pid
        assert one.cluster_id != two.cluster_id
        topic = unique_topic()
        assert ensure_topics(one.bootstrap_servers, [topic]) == [topic]
        assert topic in _list_topics(one.bootstrap_servers)
        assert topic not in _list_topics(two.bootstrap_servers)
        pids = (one.pid, two.pid)
    assert all(_gone(pid) for pid in pids if pid is not None)


def test_a_taken_port_fails_cleanly(broker: EmbeddedBroker) -> None:
    before = {p.pid for p in _tansu_children()}
    with pytest.raises(BrokerError, match="exited"):
        EmbeddedBroker(port=_port(broker), startup_timeout=10).start()
    assert {p.pid for p in _tansu_children() if not _gone(p.pid)} == before
    assert broker.is_running  # the broker that holds the port is untouched


def test_a_missing_binary_is_a_broker_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="not an executable"):
        EmbeddedBroker(binary=tmp_path / "no-such-tansu").start()


def test_the_command_line_listens_and_advertises_the_same_loopback_port() -> None:
    cmd = EmbeddedBroker().command("tansu", 4321, "c1")
    assert cmd[:2] == ["tansu", "broker"]
    opts = dict(zip(cmd[2::2], cmd[3::2]))
    assert opts["--listener-url"] == opts["--advertised-listener-url"] == "tcp://127.0.0.1:4321"
    assert opts["--storage-engine"] == "memory://tansu/" and opts["--cluster-id"] == "c1"


# ------------------------------------------------------------------ topics


def test_ensure_topics_creates_missing_topics_once(broker: EmbeddedBroker, unique_topic) -> None:
    a, b = unique_topic("a"), unique_topic("b")
    assert ensure_topics(broker.bootstrap_servers, {a: 3, b: 1}) == [a, b]
    assert ensure_topics(broker.bootstrap_servers, {a: 3, b: 1}) == []  # idempotent
    c = unique_topic("c")
    assert ensure_topics(broker.bootstrap_servers, [a, c], partitions=2) == [c]
    assert _describe(broker.bootstrap_servers, [a, b, c]) == {a: 3, b: 1, c: 2}


def test_ensure_topics_creates_the_app_topics(broker: EmbeddedBroker, unique_topic) -> None:
    p = unique_topic("app")
    settings = KafkaSettings(
        input_topics=(f"{p}.events", f"{p}.more"), scores_topic=f"{p}.scores",
        anomalies_topic=f"{p}.anomalies", drift_topic=f"{p}.drift",
        alerts_topic=f"{p}.alerts", dlq_topic=f"{p}.dlq",
    )  # fmt: skip
    names = default_topics(settings)
    parts = ("events", "more", "scores", "anomalies", "drift", "alerts", "dlq", "alerts.dlq")
    assert names == [f"{p}.{n}" for n in parts]
    assert ensure_topics(broker.bootstrap_servers, names) == names
    assert set(names) <= _list_topics(broker.bootstrap_servers)


def test_default_topics_are_the_documented_names() -> None:
    assert default_topics(KafkaSettings()) == [
        "nwatch.events", "nwatch.scores", "nwatch.anomalies",
        "nwatch.drift", "nwatch.alerts", "nwatch.dlq", "nwatch.alerts.dlq",
    ]  # fmt: skip
    dup = KafkaSettings(input_topics=("x", "x"), scores_topic="x")
    assert default_topics(dup).count("x") == 1


@pytest.mark.parametrize("bad", ["", "has space", "ünï", "x" * 250, ".", ".."])
def test_ensure_topics_rejects_names_kafka_would_refuse(broker: EmbeddedBroker, bad: str) -> None:
    before = _list_topics(broker.bootstrap_servers)
    with pytest.raises(ValueError, match="invalid topic name"):
        ensure_topics(broker.bootstrap_servers, [bad])
    assert _list_topics(broker.bootstrap_servers) == before  # nothing was sent


def test_ensure_topics_rejects_bad_counts(broker: EmbeddedBroker) -> None:
    with pytest.raises(ValueError, match="partitions"):
        ensure_topics(broker.bootstrap_servers, {"ok": 0})
    with pytest.raises(ValueError, match="replication"):
        ensure_topics(broker.bootstrap_servers, ["ok"], replication=0)


def test_ensure_topics_without_a_broker_is_a_broker_error() -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BrokerError, match="cannot reach"):
        ensure_topics(f"127.0.0.1:{port}", ["t"], timeout=1.0)


# ------------------------------------------------------------- client config


def test_client_configs_map_plaintext_settings() -> None:
    s = KafkaSettings(bootstrap_servers="a:9092, b:9093")
    for cfg in (kafka_client_config(s), aiokafka_client_config(s)):
        assert dict(cfg) == {
            "bootstrap_servers": ["a:9092", "b:9093"], "security_protocol": "PLAINTEXT"
        }


def test_client_configs_carry_sasl_credentials_but_never_show_them(tmp_path: Path) -> None:
    secret = "s3cr3t-pa55"
    s = KafkaSettings(
        bootstrap_servers="k:9094", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
        sasl_username="nw", sasl_password=SecretStr(secret), ssl_cafile="/etc/ca.pem",
    )  # fmt: skip
    cfg = kafka_client_config(s)
    assert cfg["sasl_plain_password"] == secret  # what the client needs
    assert cfg["sasl_mechanism"] == "SCRAM-SHA-512" and cfg["sasl_plain_username"] == "nw"
    assert cfg["ssl_cafile"] == "/etc/ca.pem" and "ssl_certfile" not in cfg
    assert secret not in repr(cfg) and secret not in str(cfg) and secret not in f"{cfg}"
    assert "**********" in repr(cfg)
    assert secret not in repr(s)
    # aiokafka wants an SSLContext; with no CA file it trusts the system store
    acfg = aiokafka_client_config(s.model_copy(update={"ssl_cafile": None}))
    assert acfg["ssl_context"] is not None and "ssl_cafile" not in acfg
    assert acfg["sasl_plain_password"] == secret and secret not in repr(acfg)


def test_sasl_without_credentials_is_refused_with_the_missing_names() -> None:
    s = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN")
    with pytest.raises(ValueError, match=r"sasl_username.*sasl_password"):
        kafka_client_config(s)


# ------------------------------------------------------------------ produce


def _jsonl(tmp_path: Path) -> tuple[Path, list[tuple[bytes | None, bytes]]]:
    """A small JSONL file and the (key, value) each message must carry."""
    events = [
        {"id": f"c{i}", "source": "cards", "kind": "transaction", "fields": {"amount": i}}
        for i in range(6)
    ] + [
        {"id": f"l{i}", "source": "syslog", "kind": "log", "line": f"sshd[{i}]: accepted"}
        for i in range(5)
    ]
    expected: list[tuple[bytes | None, bytes]] = []
    lines: list[bytes] = []
    for e in events:
        raw = orjson.dumps(e)
        lines.append(raw)
        expected.append((e["source"].encode(), raw))
    # no source: keyed by kind; odd spacing and escapes must arrive byte for byte
    no_source = b'{"id": "t1",  "kind": "text", "text": "caf\xc3\xa9 \\u00e9"}'
    lines.insert(3, no_source)
    expected.insert(3, (b"text", no_source))
    lines.insert(5, b"this is not json {")
    expected.insert(5, (None, b"this is not json {"))
    lines.insert(7, b"[1, 2, 3]")  # JSON, but not an object
    expected.insert(7, (None, b"[1, 2, 3]"))
    lines.insert(9, b"")  # blank lines carry no message
    lines.insert(10, b"   ")
    crlf = b'{"id": "c99", "source": "cards", "kind": "transaction", "fields": {}}'
    last = b'{"source": 7, "kind": 3}'  # and no final newline
    text = b"\n".join(lines) + b"\n" + crlf + b"\r\n" + last
    expected.append((b"cards", crlf))
    expected.append((None, last))  # neither source nor kind is a string: null key
    path = tmp_path / "events.jsonl"
    path.write_bytes(text)
    return path, expected


def test_produce_file_then_consume_back_keys_and_bytes(
    broker: EmbeddedBroker, kafka_settings: KafkaSettings, unique_topic, consume_all, tmp_path: Path
) -> None:
    path, expected = _jsonl(tmp_path)
    topic = unique_topic()
    ensure_topics(broker.bootstrap_servers, {topic: 3})
    seen: list[ProduceSummary] = []
    summary = produce_file(
        path, topic=topic, kafka_settings=kafka_settings, batch=4, progress=seen.append
    )

    assert summary.produced == len(expected) == 16
    assert summary.lines == 18 and summary.blank == 2
    assert summary.not_json == 2 and summary.keyed == 13 and summary.failed == 0
    assert summary.bytes == sum(len(v) for _, v in expected)
    assert summary.errors == () and summary.seconds > 0
    assert [s.produced for s in seen] == [4, 8, 12, 16]  # one progress call per flushed batch

    records = consume_all(broker.bootstrap_servers, topic, len(expected))
    got = sorted((r.key or b"", r.value) for r in records)
    assert got == sorted((k or b"", v) for k, v in expected)
    # one key, one partition; within it, file order
    partitions: dict[bytes | None, set[int]] = defaultdict(set)
    for r in records:
        partitions[r.key].add(r.partition)
    assert all(len(p) == 1 for k, p in partitions.items() if k is not None)
    for key in (b"cards", b"syslog"):
        in_topic = [r.value for r in records if r.key == key]
        assert in_topic == [v for k, v in expected if k == key]


def test_produce_from_a_stream_and_with_another_key_field(
    broker: EmbeddedBroker, kafka_settings: KafkaSettings, unique_topic, consume_all
) -> None:
    topic = unique_topic()
    ensure_topics(broker.bootstrap_servers, [topic])
    data = b'{"id": "a", "kind": "log", "line": "x"}\n{"kind": "log", "line": "y"}\n'
    summary = produce_file(
        io.BytesIO(data), topic=topic, kafka_settings=kafka_settings, key_field="id"
    )
    assert (summary.produced, summary.keyed, summary.not_json) == (2, 2, 0)
    records = consume_all(broker.bootstrap_servers, topic, 2)
    assert [(r.key, r.value) for r in records] == [
        (b"a", data.splitlines()[0]),
        (b"log", data.splitlines()[1]),  # no id: the kind, as for a missing source
    ]


def test_produce_counts_a_too_large_line_and_goes_on(
    broker: EmbeddedBroker, kafka_settings: KafkaSettings, unique_topic, consume_all, tmp_path: Path
) -> None:
    topic = unique_topic()
    ensure_topics(broker.bootstrap_servers, [topic])
    big = orjson.dumps({"id": "big", "kind": "text", "text": "x" * 5000})
    small = b'{"id": "s", "kind": "text", "text": "ok"}'
    path = tmp_path / "big.jsonl"
    path.write_bytes(small + b"\n" + big + b"\n" + small + b"\n")
    summary = produce_file(
        path, topic=topic, kafka_settings=kafka_settings, producer_config={"max_request_size": 4096}
    )
    assert (summary.produced, summary.failed) == (2, 1)
    assert len(summary.errors) == 1 and summary.errors[0].startswith("line 2: MessageSizeTooLarge")
    assert any("1 failed" in line for line in summary.lines_text())
    assert [r.value for r in consume_all(broker.bootstrap_servers, topic, 2)] == [small, small]


def test_produce_without_a_broker_raises_produce_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"id": "a", "kind": "log", "line": "x"}\n')
    with pytest.raises(ProduceError, match="cannot reach") as info:
        produce_file(
            path, topic="t", kafka_settings=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"),
            producer_config={"bootstrap_timeout_ms": 1000},
        )  # fmt: skip
    assert info.value.summary.produced == 0


def test_produce_rejects_a_bad_batch(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch"):
        produce_file(tmp_path / "x", topic="t", kafka_settings=kafka_settings, batch=0)


def test_progress_line_rewrites_one_line_and_ends_it() -> None:
    out = io.StringIO()
    line = ProgressLine(out, every=0.0)
    line(ProduceSummary(topic="t", lines=10, produced=10, seconds=1.0))
    line(ProduceSummary(topic="t", lines=20, produced=20, seconds=2.0))
    line.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and "20 produced" in text
    quiet = io.StringIO()
    ProgressLine(quiet, every=3600.0)(ProduceSummary(topic="t"))
    assert quiet.getvalue() == ""


def test_produce_reads_stdin(
    broker: EmbeddedBroker, kafka_settings: KafkaSettings, unique_topic, consume_all, tmp_path: Path
) -> None:
    # through the real "-" path: a child Python whose stdin is the file
    topic = unique_topic()
    ensure_topics(broker.bootstrap_servers, [topic])
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a", "source": "s1", "kind": "log", "line": "x"}\n')
    code = (
        "import sys; from streams.produce import produce_file;"
        "from streams.config import KafkaSettings;"
        f"s = produce_file('-', topic={topic!r}, kafka_settings=KafkaSettings(bootstrap_servers="
        f"{broker.bootstrap_servers!r})); sys.exit(0 if s.produced == 1 else 1)"
    )
    with open(path, "rb") as stdin:
        done = subprocess.run(
            [sys.executable, "-c", code], stdin=stdin, capture_output=True, timeout=60,
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert [r.key for r in consume_all(broker.bootstrap_servers, topic, 1)] == [b"s1"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_python_m_streams_broker_serves_until_stopped_and_leaves_nothing(sig) -> None:
    """The README's broker for trying ``nwatch run`` by hand: it answers Kafka clients on the
    port it prints; Ctrl-C or SIGTERM stops it and its Tansu process, exit status 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "streams.broker", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert f"on 127.0.0.1:{port};" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert ensure_topics(f"127.0.0.1:{port}", ["by-hand"]) == ["by-hand"]
        tansu = [c.pid for c in psutil.Process(proc.pid).children() if "tansu" in " ".join(c.cmdline())]
        assert len(tansu) == 1
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _gone(tansu[0])
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass


def test_produce_interrupted_says_what_is_on_the_topic(broker: EmbeddedBroker, unique_topic, tmp_path: Path) -> None:
    """Ctrl-C in ``nwatch produce``: exit 130 and a summary of what the cluster acknowledged, every
    line up to the last acknowledged one on the topic (nothing silently half-sent)."""
    import re
    import time

    topic = unique_topic("ctrlc")
    ensure_topics(broker.bootstrap_servers, [topic])
    lines = [orjson.dumps({"id": f"e{i}", "kind": "vector", "vector": [i, 1.0]}) for i in range(300_000)]
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "produce", str(path), "--topic", topic,
                             "--bootstrap-servers", broker.bootstrap_servers], stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    match = re.search(r"nwatch: interrupted: .*?([\d,]+)", err)
    assert match, err
    done = re.search(r"produced ([\d,]+) messages", err)
    produced = int(done.group(1).replace(",", ""))
    last = int(re.search(r"(?:up to|the last at line) ([\d,]+)", err).group(1).replace(",", ""))
    assert 0 < produced <= last < len(lines)  # interrupted part way, after some were acknowledged
    from kafka import KafkaConsumer, TopicPartition

    from tests.integration.conftest import drain

    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False)
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    on_topic = {r.value for r in drain(consumer)}
    consumer.close()
    assert set(lines[:last]) <= on_topic  # every line up to the last acknowledged one
    assert len(on_topic) >= produced

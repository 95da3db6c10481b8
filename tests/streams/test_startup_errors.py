"""What a user sees when ``nwatch`` cannot start: one line naming the cause and the setting, no
traceback, a non-zero exit code, and nothing started (the commands run as child processes, as typed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from streams.config import explain_settings_error, unknown_variables
from streams.runtime import StartupError


def nwatch(*args: str, timeout: float = 60.0, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("NWATCH_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], env=full, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("nwatch: ")
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_with_the_metrics_port_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = nwatch("run", NWATCH_METRICS__PORT=str(port), NWATCH_STATE__DIR=str(tmp_path / "state"))
        flag = nwatch("run", "--metrics-port", str(port), NWATCH_STATE__DIR=str(tmp_path / "state"))
    assert proc.returncode == 1 and flag.returncode == 1
    line = one_line_error(proc)
    assert f"127.0.0.1:{port}" in line and "in use" in line and "NWATCH_METRICS__PORT" in line
    assert f"127.0.0.1:{port}" in one_line_error(flag)  # --metrics-port is the port bound


def test_run_with_a_state_dir_it_cannot_make(tmp_path):
    (tmp_path / "file").write_text("")
    proc = nwatch("run", "--metrics-port", str(free_port()), NWATCH_STATE__DIR=str(tmp_path / "file" / "state"))
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert str(tmp_path / "file" / "state") in line and "NWATCH_STATE__DIR" in line


def test_run_with_no_broker_at_the_address(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    proc = nwatch("run", "--metrics-port", str(free_port()), NWATCH_KAFKA__BOOTSTRAP_SERVERS=address,
                  NWATCH_STATE__DIR=str(tmp_path / "state"))
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert f"cannot reach Kafka at {address}" in line and "NWATCH_KAFKA__BOOTSTRAP_SERVERS" in line
    assert time.monotonic() - t0 < 40


def test_demo_with_the_metrics_port_taken_starts_nothing():
    from streams.config import Settings
    from streams.demo import run_demo

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"127.0.0.1:{port}"):
            run_demo(Settings(), duration=1, rate=10, events=10, seed=0, metrics_port=port)
        proc = nwatch("demo", "--duration", "5", "--metrics-port", str(port))
    assert proc.returncode == 1
    assert "in use" in one_line_error(proc)
    assert "broker" not in proc.stdout  # nothing was started


@pytest.mark.parametrize(("name", "value"), [
    ("NWATCH_KAFKA__INPUT_TOPICS", "nwatch.events"),  # a list, given as a plain name
    ("NWATCH_SOURCES", '{"cards": {"alpha": 0.005}'),  # a table, broken JSON
])
def test_a_list_or_table_setting_that_is_not_json(name, value):
    proc = nwatch("config", **{name: value})
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert f"{name}={value!r} is not JSON" in line


def test_explain_settings_error_names_the_variable():
    from pydantic_settings import SettingsError

    err = SettingsError('error parsing value for field "kafka" from source "EnvSettingsSource"')
    env = {"NWATCH_KAFKA__GROUP_ID": "plain text is fine here", "NWATCH_KAFKA__INPUT_TOPICS": "a,b"}
    assert explain_settings_error(err, env).startswith("NWATCH_KAFKA__INPUT_TOPICS='a,b' is not JSON")


def test_an_unknown_top_level_variable_is_warned_of():
    assert unknown_variables({"NWATCH_BATCHSIZE": "5", "NWATCH_BATCH_SIZE": "5", "NWATCH_SCAN_KERNEL": "0",
                              "NWATCH_SOAK_RATE": "1", "nwatch_defaults__k": "3", "OTHER": "1"}) == ["NWATCH_BATCHSIZE"]
    proc = nwatch("config", NWATCH_BATCHSIZE="5")
    assert proc.returncode == 0
    assert "NWATCH_BATCHSIZE is not a setting" in one_line_error(proc)
    assert '"batch_size": 256' in proc.stdout


def test_run_with_a_missing_tls_file(tmp_path):
    proc = nwatch("run", "--metrics-port", str(free_port()), NWATCH_STATE__DIR=str(tmp_path / "state"),
                  NWATCH_KAFKA__SECURITY_PROTOCOL="SSL", NWATCH_KAFKA__SSL_CAFILE=str(tmp_path / "ca.pem"))
    assert proc.returncode == 1
    assert one_line_error(proc) == f"nwatch: NWATCH_KAFKA__SSL_CAFILE {tmp_path / 'ca.pem'}: no such file"


def test_run_with_sasl_but_no_credentials(tmp_path):
    proc = nwatch("run", "--metrics-port", str(free_port()), NWATCH_STATE__DIR=str(tmp_path / "state"),
                  NWATCH_KAFKA__SECURITY_PROTOCOL="SASL_SSL")
    assert proc.returncode == 1
    assert "needs kafka.sasl_mechanism" in one_line_error(proc)


def test_demo_without_the_broker_binary():
    proc = nwatch("demo", "--duration", "5", "--metrics-port", str(free_port()), CALF_TANSU_BIN="/nonexistent/tansu")
    assert proc.returncode == 1
    assert "/nonexistent/tansu" in one_line_error(proc)


def test_a_topic_name_kafka_would_refuse():
    proc = nwatch("produce", "-", "--topic", "bad topic!", "--bootstrap-servers", "127.0.0.1:1")
    assert proc.returncode == 2
    assert "invalid topic name 'bad topic!'" in one_line_error(proc)
    proc = nwatch("config", NWATCH_KAFKA__INPUT_TOPICS='["nwatch events"]')
    assert proc.returncode == 2 and "invalid topic name 'nwatch events'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = nwatch("config", NWATCH_KAFKA__DLQ_TOPIC="dlq/x")
    assert proc.returncode == 2 and "invalid topic name 'dlq/x'" in proc.stderr

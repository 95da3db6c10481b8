"""A hanging alert receiver does not hold up detection; alerts still reach it, or the alerts DLQ."""

from __future__ import annotations

import socket
import threading
import time

import orjson
import pytest

from streams.runtime import stop_process_group
from streams.samples import sample_lines
from tests.integration.conftest import (
    free_port,
    produce_paced,
    read_topic,
    start_worker,
    worker_env,
    worker_scored,
    worker_topics,
)

pytestmark = pytest.mark.timeout(300)


class HangingReceiver:
    """Accepts TCP connections on loopback and never answers (a hung webhook endpoint)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.bytes_received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setblocking(False)
            self.connections.append(conn)
            for c in list(self.connections):
                try:
                    self.bytes_received += len(c.recv(65536))
                except (BlockingIOError, OSError):
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for c in self.connections:
            c.close()
        self.sock.close()


def _count(bootstrap: str, topic: str) -> int:
    return len(read_topic(bootstrap, topic))


def test_hung_receiver_does_not_hold_up_detection(broker, tmp_path):
    bootstrap = broker.bootstrap_servers
    t = worker_topics(bootstrap, "h")
    lines = list(sample_lines(events=2500, seed=21, broken=0, kinds=["transaction", "vector"]))
    receiver = HangingReceiver()
    env = worker_env(
        bootstrap, t,
        NWATCH_METRICS__PORT="0",
        NWATCH_ALERTS__WEBHOOK_URL=f"http://127.0.0.1:{receiver.port}/hook",
        NWATCH_ALERTS__TIMEOUT="2",
    )
    worker, log = start_worker(env, tmp_path / "worker.log")
    try:
        produce_paced(bootstrap, t["events"], lines)
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and _count(bootstrap, t["scores"]) < len(lines):
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(2)
        # every event scored although every delivery attempt hangs until its timeout
        assert _count(bootstrap, t["scores"]) >= len(lines)
        alerts = _count(bootstrap, t["alerts"])
        assert alerts > 0
        assert receiver.connections and receiver.bytes_received > 0  # deliveries were attempted
        # undeliverable alerts are kept on the alerts dead-letter topic, not dropped
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and _count(bootstrap, t["alerts_dlq"]) == 0:
            time.sleep(2)
        assert _count(bootstrap, t["alerts_dlq"]) > 0
    finally:
        stop_process_group(worker, timeout=30)
        log.close()
        receiver.close()


class RecordingReceiver:
    """A webhook receiver (http.server in a thread) that records the fingerprints it accepted.

    It answers ``status`` (200 unless a test sets 500, or 429 with ``Retry-After: 1``)
    and counts its answers by status.
    """

    def __init__(self, port: int) -> None:
        import http.server

        received = self.fingerprints = set()
        self.calls = 0
        self.status = 200
        self.answers: dict[int, int] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = outer.status
                outer.answers[status] = outer.answers.get(status, 0) + 1
                if status == 200:
                    for alert in orjson.loads(body).get("alerts", []):
                        received.add(alert["fingerprint"])
                outer.calls += 1
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "1")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_receiver_down_then_back_gets_every_alert(broker, tmp_path):
    bootstrap = broker.bootstrap_servers
    t = worker_topics(bootstrap, "r")
    port = free_port()  # nothing listens there yet: connections are refused
    env = worker_env(
        bootstrap, t,
        NWATCH_METRICS__PORT="0",
        NWATCH_ALERTS__WEBHOOK_URL=f"http://127.0.0.1:{port}/hook",
        NWATCH_ALERTS__TIMEOUT="2",
        NWATCH_ALERTS__REDELIVERY_DELAY="3",
        NWATCH_ALERTS__RATE_LIMIT_PER_SOURCE="100000",
    )
    worker, log = start_worker(env, tmp_path / "worker.log")
    receiver = None
    try:
        lines = list(sample_lines(events=2500, seed=22, broken=0, kinds=["transaction", "vector"]))
        produce_paced(bootstrap, t["events"], lines)
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and _count(bootstrap, t["alerts_dlq"]) == 0:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(2)
        assert _count(bootstrap, t["alerts_dlq"]) > 0  # the endpoint was down: dead letters
        receiver = RecordingReceiver(port)  # ... and now it is back
        while time.monotonic() < deadline and _count(bootstrap, t["scores"]) < len(lines):
            time.sleep(2)
        expected = {r.key.decode() for r in read_topic(bootstrap, t["alerts"])}
        assert expected
        while time.monotonic() < deadline and not expected <= receiver.fingerprints:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(2)
        assert expected <= receiver.fingerprints, f"missing {len(expected - receiver.fingerprints)}"
    finally:
        stop_process_group(worker, timeout=30)
        log.close()
        if receiver is not None:
            receiver.close()


@pytest.mark.chaos
def test_receiver_down_a_minute_then_failing_then_back_gets_every_alert_and_detection_keeps_pace(broker, tmp_path):
    """Down (connections refused) for 60 s, then 500s, then 429s with Retry-After, then fine:
    scoring keeps the produce rate throughout, and every alert arrives in the end."""
    bootstrap = broker.bootstrap_servers
    t = worker_topics(bootstrap, "m")
    port, metrics_port = free_port(), free_port()
    env = worker_env(
        bootstrap, t, NWATCH_METRICS__PORT=str(metrics_port),
        NWATCH_ALERTS__WEBHOOK_URL=f"http://127.0.0.1:{port}/hook",
        NWATCH_ALERTS__TIMEOUT="2", NWATCH_ALERTS__REDELIVERY_DELAY="5",
        NWATCH_ALERTS__RATE_LIMIT_PER_SOURCE="100000",
    )
    rate, seconds = 150.0, 160  # long enough to outlast a slow start, the warm-up and the outage
    lines = list(sample_lines(events=int(rate * seconds), seed=23, broken=0, kinds=["transaction", "vector"]))
    worker, log = start_worker(env, tmp_path / "worker.log")
    receiver = None
    stop = threading.Event()

    produced = [0]
    thread = threading.Thread(target=produce_paced, args=(bootstrap, t["events"], lines, rate),
                              kwargs={"stop": stop, "counter": produced}, daemon=True)
    try:
        # Progress from the worker's own /metrics: re-reading the growing scores
        # topic every second costs seconds per read on a busy machine.
        deadline = time.monotonic() + 90
        thread.start()
        while worker_scored(metrics_port) == 0 and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        assert worker_scored(metrics_port) > 0, "the worker scored nothing in 90 s"
        time.sleep(10)  # warm: scoring keeps pace with the producer
        down_from, scored_from, produced_from = time.monotonic(), worker_scored(metrics_port), produced[0]
        time.sleep(50)  # the endpoint has been down for a minute since the start
        span = time.monotonic() - down_from
        down_rate = (worker_scored(metrics_port) - scored_from) / span
        in_rate = (produced[0] - produced_from) / span
        assert _count(bootstrap, t["alerts_dlq"]) > 0  # undeliverable alerts kept, not dropped
        assert in_rate >= 0.5 * rate, (in_rate, rate)  # events kept coming while the endpoint was down
        assert down_rate >= 0.8 * in_rate, (down_rate, in_rate)  # and detection kept pace with them
        receiver = RecordingReceiver(port)
        receiver.status = 500
        time.sleep(10)
        receiver.status = 429
        time.sleep(10)
        receiver.status = 200
        thread.join(timeout=seconds + 60)
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and _count(bootstrap, t["scores"]) < len(lines):
            time.sleep(2)
        expected = {r.key.decode() for r in read_topic(bootstrap, t["alerts"])}
        while time.monotonic() < deadline and not expected <= receiver.fingerprints:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(2)
        print(f"\nscoring while down: {down_rate:.0f}/s at {in_rate:.0f}/s produced; answers {receiver.answers}; "
              f"{len(expected)} alerts, {len(expected & receiver.fingerprints)} delivered")
        assert receiver.answers.get(500) and receiver.answers.get(429)
        assert expected and expected <= receiver.fingerprints, f"missing {len(expected - receiver.fingerprints)}"
    finally:
        stop.set()
        stop_process_group(worker, timeout=30)
        log.close()
        if receiver is not None:
            receiver.close()

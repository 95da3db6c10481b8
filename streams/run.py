"""``nwatch run``: the worker against the configured Kafka cluster, until SIGINT or SIGTERM."""

from __future__ import annotations

import functools
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from streams.config import KafkaSettings, Settings
from streams.runtime import StartupError, limit_repeats


log = logging.getLogger("neighbourwatch")

# How long the start-up check waits for the cluster to answer. faust's own
# start gives up at once on a refused connection (with a traceback); a
# cluster that is still starting (a compose stack) gets these seconds.
CLUSTER_TIMEOUT_SECONDS = 10.0


def run_worker(settings: Settings, *, loglevel: str = "warning") -> int:
    """Start the worker and run it until SIGINT or SIGTERM.

    Raises :class:`~streams.runtime.StartupError` (``nwatch`` prints it on one
    line) when the state directory cannot be written, the ``/metrics`` port
    cannot be bound or the Kafka cluster does not answer: before anything is
    consumed.
    """
    from streams.metrics import Metrics, start_http_server

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python and aiokafka log every connection at INFO
    for noisy in ("kafka", "aiokafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    check_state_dir(settings.state.dir)
    metrics = Metrics()
    server = start_http_server(metrics, host=settings.metrics.host, port=settings.metrics.port)
    try:
        check_cluster(settings.kafka)
    except BaseException:
        server.stop()
        raise
    log.warning("metrics on %s", server.url)
    try:
        return _run(settings, loglevel, metrics, server)
    finally:
        server.stop()


def _run(settings: Settings, loglevel: str, metrics: Any, server: Any) -> int:
    # On the "process" pipeline path the pipeline (and its model preload) lives in the child.
    pipeline = None if settings.pipeline_in_process else _pipeline(settings)
    import faust

    from streams.alerts import OUTCOMES, Deliverer, hooks_from_settings
    from streams.app import Worker
    from streams.runtime import freeze_startup_objects

    worker = Worker(settings=settings, pipeline=pipeline, metrics=metrics)
    for role in ("pipeline", "producer"):  # their memory and CPU, beside the worker's own process_*
        metrics.track_process(role, functools.partial(worker.child_pid, role))
    hooks = hooks_from_settings(settings.alerts, timeout=settings.alerts.timeout)
    if hooks:
        metrics.init_deliveries([hook.name for hook in hooks], OUTCOMES)
        worker.deliverer = Deliverer(
            hooks=hooks,
            rate_limit_per_source=settings.alerts.rate_limit_per_source,
            on_dead_letter=worker.dead_letter_alerts,  # kept on <alerts topic>.dlq, never dropped
            on_outcome=lambda hook, outcome, n: metrics.observe_delivery(hook, outcome, n=n),
            on_suppressed=lambda source, alerts: metrics.observe_suppressed(source, n=len(alerts)),
        )
    if settings.is_sharded:
        from streams.broker import ensure_topics, kafka_client_config, shard_summaries_topic

        topics, configs = shard_summaries_topic(settings.kafka)
        ensure_topics(settings.kafka.bootstrap_servers, topics, configs=configs,
                      client_config=kafka_client_config(settings.kafka))
    app = worker.build()
    freeze_startup_objects()
    # Logs to stderr, line by line: stdout is block-buffered in a pipe, and a
    # worker that is killed would take its last (most telling) lines with it.
    runner = faust.Worker(app, loglevel=loglevel, logfile=sys.stderr, quiet=True, redirect_stdouts=False)
    # No progress spinner: it writes terminal codes into the log, and to keep
    # spinning it sets the root logger to DEBUG, which the pipeline process
    # takes as the worker's log level (INFO and DEBUG lines at "warning").
    runner.spinner = None
    # faust sets up the root logger as the worker starts; its handlers then hold back repeats.
    runner.on_setup_root_logger = lambda root, level: limit_repeats(root)
    try:
        runner.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        worker.close()
    return 0


def check_state_dir(path: str | None) -> None:
    """The state directory exists (made if missing) and takes a file, or StartupError."""
    if path is None:
        return
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise StartupError(f"state directory {directory} is not usable: {err.strerror or err}; "
                           "set NWATCH_STATE__DIR to a writable directory") from None


def check_cluster(kafka: KafkaSettings, timeout: float = CLUSTER_TIMEOUT_SECONDS) -> set[str]:
    """The cluster answers (or StartupError naming the address); warns of missing input topics.

    Returns the cluster's topics.
    """
    from streams.broker import BrokerError, cluster_topics, kafka_client_config

    try:
        config = kafka_client_config(kafka)
    except ValueError as err:  # a SASL protocol without its mechanism or credentials
        raise StartupError(f"invalid Kafka settings: {err}") from None
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = config.get(name)  # set only for the SSL protocols
        if path is not None and not Path(path).is_file():
            raise StartupError(f"NWATCH_KAFKA__{name.upper()} {path}: no such file")
    quiet = logging.getLogger("kafka")  # its retries would log a line each; the error below says it once
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        topics = cluster_topics(kafka.bootstrap_servers, timeout=timeout, client_config=config)
    except BrokerError as err:
        raise StartupError(f"{err} (after {timeout:.0f} s; check NWATCH_KAFKA__BOOTSTRAP_SERVERS and "
                           "the NWATCH_KAFKA__SECURITY_PROTOCOL / SASL / SSL settings)") from None
    finally:
        quiet.setLevel(level)
    missing = [t for t in kafka.input_topics if t not in topics]
    if missing and kafka.input_path == "aiokafka":  # faust's input path declares its topic
        log.warning("input topic %s not on the cluster at %s: nothing is read from it until it is created "
                    "(nwatch produce FILE --topic T --create-topic --partitions N, or kafka-topics.sh --create)",
                    ", ".join(missing), kafka.bootstrap_servers)
    return topics


def _pipeline(settings: Settings):
    """The pipeline; with ``models.preload`` its text model starts loading at once, in a thread.

    Importing sentence-transformers and loading MiniLM take ~10 s on 2 cores;
    started first, they overlap faust's start-up and group join. The backend's
    lock makes the first batch wait for the load rather than start a second one.
    """
    import threading

    from streams.pipeline import Pipeline

    pipeline = Pipeline(settings=settings, merge_shards=False)
    if settings.models.preload:
        threading.Thread(target=pipeline.preload, name="nwatch-preload", daemon=True).start()
    return pipeline

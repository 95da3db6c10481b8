"""``nwatch run``: the worker against the configured Kafka cluster, until SIGINT or SIGTERM."""

from __future__ import annotations

import functools
import logging
import sys

from streams.config import Settings


def run_worker(settings: Settings, *, loglevel: str = "warning") -> int:
    # On the "process" pipeline path the pipeline (and its model preload) lives in the child.
    pipeline = None if settings.pipeline_in_process else _pipeline(settings)
    import faust

    from streams.alerts import OUTCOMES, Deliverer, hooks_from_settings
    from streams.app import Worker
    from streams.metrics import Metrics, start_http_server
    from streams.runtime import freeze_startup_objects

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python and aiokafka log every connection at INFO
    for noisy in ("kafka", "aiokafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))

    metrics = Metrics()
    server = start_http_server(metrics, host=settings.metrics.host, port=settings.metrics.port)
    logging.getLogger("neighbourwatch").warning("metrics on %s", server.url)
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
    try:
        runner.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        worker.close()
        server.stop()
    return 0


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

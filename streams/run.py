"""``nwatch run``: the worker against the configured Kafka cluster, until SIGINT or SIGTERM."""

from __future__ import annotations

import logging

from streams.config import Settings


def run_worker(settings: Settings, *, loglevel: str = "warning") -> int:
    import faust

    from streams.app import Worker
    from streams.pipeline import Pipeline

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = Worker(settings=settings, pipeline=Pipeline(settings=settings))
    app = worker.build()
    runner = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    try:
        runner.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        worker.close()
    return 0

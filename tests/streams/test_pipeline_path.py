"""Where the worker's pipeline runs (``kafka.pipeline_path``): "auto" resolved, refused combinations."""

from __future__ import annotations

import pytest

from streams.app import Worker
from streams.config import Settings
from streams.durable import DurableState
from streams.engine_process import RemoteState
from streams.pipeline import Pipeline


def test_auto_is_the_process_unless_a_source_is_sharded():
    assert Settings().pipeline_in_process
    assert not Settings(defaults={"shards": 2}).pipeline_in_process
    assert not Settings(kafka={"pipeline_path": "thread"}).pipeline_in_process
    assert Settings(kafka={"pipeline_path": "process"}).pipeline_in_process


def test_the_worker_holds_no_pipeline_on_the_process_path():
    worker = Worker(settings=Settings(state={"dir": None}))
    assert worker.pipeline is None and isinstance(worker.durable, RemoteState)
    assert worker._engine is not None and worker._engine.proc is None  # started with the app, not before
    worker.close()


def test_a_pipeline_object_or_a_sharded_source_keeps_it_in_a_thread():
    settings = Settings(state={"dir": None})
    pipeline = Pipeline(settings=settings, merge_shards=False)
    worker = Worker(settings=settings, pipeline=pipeline)
    assert worker.pipeline is pipeline and worker._engine is None and isinstance(worker.durable, DurableState)
    worker = Worker(settings=Settings(state={"dir": None}, defaults={"shards": 2}))
    assert worker._engine is None and worker.pipeline is not None


@pytest.mark.parametrize("extra", [{"defaults": {"shards": 2}}, {}], ids=["sharded", "pipeline object"])
def test_an_explicit_process_path_refuses_what_it_cannot_run(extra):
    settings = Settings(state={"dir": None}, kafka={"pipeline_path": "process"}, **extra)
    with pytest.raises(ValueError, match="pipeline_path"):
        Worker(settings=settings, pipeline=None if extra else Pipeline(settings=settings, merge_shards=False))

import gc

from streams.runtime import GC_THRESHOLDS, StartupError, configure_gc


def test_configure_gc_sets_the_thresholds_and_they_can_be_restored():
    old = gc.get_threshold()
    try:
        configure_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        configure_gc((700, 10, 10))
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*old)


def test_gc_thresholds_from_the_environment_and_a_bad_value_refused(monkeypatch):
    import pytest

    old = gc.get_threshold()
    try:
        monkeypatch.setenv("NWATCH_GC_THRESHOLDS", "700,10,10")
        configure_gc()
        assert gc.get_threshold() == (700, 10, 10)
        monkeypatch.setenv("NWATCH_GC_THRESHOLDS", "700,10")
        with pytest.raises(StartupError, match="three integers"):
            configure_gc()
    finally:
        gc.set_threshold(*old)


def test_repeat_limiter_lets_a_third_party_message_through_once_per_window():
    import logging

    from streams.runtime import RepeatLimiter

    now = [0.0]
    limiter = RepeatLimiter(30.0, clock=lambda: now[0])

    def record(name, msg, *args, level=logging.ERROR):
        return logging.LogRecord(name, level, __file__, 1, msg, args, None)

    connect = "Unable connect to node with id %s: %s"
    assert limiter.filter(record("aiokafka.conn", connect, 1, "refused"))
    for t in range(1, 30):  # ~150 a second in a broker outage; here one a second
        now[0] = float(t)
        assert not limiter.filter(record("aiokafka.conn", connect, 1, f"refused {t}"))
    assert limiter.filter(record("aiokafka", "Unable to update metadata from %s", [1]))  # another message
    assert limiter.filter(record("aiokafka.conn", connect, 1, "x", level=logging.WARNING))  # another level
    assert all(limiter.filter(record("neighbourwatch.worker", "producing failed")) for _ in range(5))  # ours
    now[0] = 30.0
    again = record("aiokafka.conn", connect, 1, "refused")
    assert limiter.filter(again)
    assert again.getMessage() == "Unable connect to node with id 1: refused (and 29 more like it in the last 30 s)"
    now[0] = 61.0
    quiet = record("aiokafka.conn", connect, 1, "refused")
    assert limiter.filter(quiet) and "more like it" not in quiet.getMessage()


def test_repeat_limiter_memory_is_bounded_when_every_message_differs():
    import logging

    from streams.runtime import RepeatLimiter

    now = [0.0]
    limiter = RepeatLimiter(30.0, clock=lambda: now[0], max_keys=100)
    for i in range(10_000):  # a library that formats its own messages: each one a new key
        now[0] = i * 0.01
        assert limiter.filter(logging.LogRecord("faust", logging.WARNING, __file__, 1, f"lag {i}", (), None))
        assert len(limiter._seen) <= 100
    # a repeat still within its window is still held back after the forgetting
    connect = "Unable connect to node with id %s: %s"
    rec = lambda: logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, connect, (1, "refused"), None)  # noqa: E731
    assert limiter.filter(rec())
    for i in range(60):
        now[0] += 0.01
        limiter.filter(logging.LogRecord("faust", logging.WARNING, __file__, 1, f"more {i}", (), None))
    assert not limiter.filter(rec())

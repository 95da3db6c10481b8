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

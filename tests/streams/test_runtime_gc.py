import gc

from streams.runtime import GC_THRESHOLDS, configure_gc


def test_configure_gc_sets_the_thresholds_and_they_can_be_restored():
    old = gc.get_threshold()
    try:
        configure_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        configure_gc((700, 10, 10))
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*old)

"""dicom_node.writers: what every writer shares (the collector pause, the warm-up of highdicom's tables)."""

from __future__ import annotations

import gc
import threading

from highdicom import _standard_utils

from dicom_node.writers import gc_paused, warm_up


def test_gc_paused_while_any_writer_is_inside_and_restored_after() -> None:
    assert gc.isenabled()
    inside, leave = threading.Event(), threading.Event()

    def other_writer() -> None:
        with gc_paused():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other_writer)
    with gc_paused():
        assert not gc.isenabled()
        thread.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other writer is still inside
    leave.set()
    thread.join(10)
    assert gc.isenabled()


def test_gc_paused_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_gc_paused_as_decorator_restores_on_error() -> None:
    @gc_paused()
    def failing() -> None:
        assert not gc.isenabled()
        raise RuntimeError("boom")

    try:
        failing()
    except RuntimeError:
        pass
    assert gc.isenabled()


def test_warm_up_loads_highdicoms_tables() -> None:
    loaders = [_standard_utils.get_sop_class_iod_map, _standard_utils.get_iod_module_map,
               _standard_utils.get_module_attribute_map]
    for loader in loaders:
        loader.cache_clear()
    warm_up()
    assert all(loader.cache_info().currsize == 1 for loader in loaders)

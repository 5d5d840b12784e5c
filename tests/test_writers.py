"""dicom_node.writers: what every writer shares (the collector pause, the warm-up of highdicom's tables)."""

from __future__ import annotations

import gc
import io
import threading

import pydicom
import pytest
from highdicom import _standard_utils

from dicom_node.writers import gc_paused, identity_ready, warm_up
from tests.volumetry_factory import JAPANESE_NAME, JAPANESE_PROCEDURE, JAPANESE_STUDY, as_japanese


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


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_identity_ready_writes_a_japanese_source_in_utf8(implicit_vr: bool) -> None:
    """``\\ISO 2022 IR 87`` (highdicom refuses it): every text element, nested ones too, decoded with the source's
    character set and kept as text for UTF-8. Implicit VR (the common sender default) left its elements without a
    VR, so none was converted and the ISO 2022 bytes went out labelled UTF-8."""
    (source,) = as_japanese([_header()], implicit_vr=implicit_vr)
    ready = identity_ready(source)
    assert ready.SpecificCharacterSet == "ISO_IR 192"
    assert str(ready.PatientName) == JAPANESE_NAME and ready.StudyDescription == JAPANESE_STUDY
    assert ready.ProcedureCodeSequence[0].CodeMeaning == JAPANESE_PROCEDURE
    buffer = io.BytesIO()
    ready.save_as(buffer, enforce_file_format=False, implicit_vr=False, little_endian=True)
    again = pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=True)
    assert str(again.PatientName) == JAPANESE_NAME and again.ProcedureCodeSequence[0].CodeMeaning == JAPANESE_PROCEDURE
    # the source keeps its own encoding
    assert list(source.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    assert str(source.PatientName) == JAPANESE_NAME


def _header() -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.1"
    ds.PatientID, ds.PatientSex = "P1", "F"
    for keyword in ("PatientBirthDate", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                    "AccessionNumber"):
        setattr(ds, keyword, None)
    return ds

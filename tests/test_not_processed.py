"""Tests for dicom_node.writers.not_processed: the "not processed" page is a valid Secondary Capture in the study."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

import dicom_node
from dicom_node.headers import SeriesAttributes
from dicom_node.routing import loop_guard
from dicom_node.writers.not_processed import NOT_PROCESSED_SIZE, write_not_processed
from tests.dicom_factory import make_mr_series, make_study
from tests.volumetry_factory import (
    EXPORT_LACKS,
    JAPANESE_NAME,
    UID_PREFIX,
    as_exported,
    as_japanese,
    dciodvfy_errors,
)

REASON = "inconsistent geometry: gap between slice 3 and 4 (8 mm, expected 4 mm)"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("not_processed")
    paths = make_mr_series(folder / "in", shape=(5, 16, 16), series_number=7, study=make_study(study_id="42"))
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    out = write_not_processed(
        REASON, source=sources[0], source_instances=[(str(s.SOPClassUID), str(s.SOPInstanceUID)) for s in sources],
        out_path=folder / "out" / "not_processed.dcm", series_number=750, series_description="sT12DT1 NOT PROCESSED",
        uid_prefix=UID_PREFIX, what="sT12DT1 (synthetic T1 by model m)", job_id=12,
    )
    return {"written": out, "sources": sources, "ds": pydicom.dcmread(out.path)}


def test_dciodvfy_reports_no_errors(written: dict) -> None:
    assert dciodvfy_errors(written["written"].path) == []


def test_header_is_a_new_series_in_the_source_study(written: dict) -> None:
    ds, source = written["ds"], written["sources"][0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.PatientName == source.PatientName and ds.AccessionNumber == source.AccessionNumber
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SeriesInstanceUID.startswith(UID_PREFIX)
    assert ds.SeriesDescription == "sT12DT1 NOT PROCESSED" and ds.SeriesNumber == 750
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.Manufacturer == dicom_node.MANUFACTURER and ds.ManufacturerModelName == dicom_node.MODEL_NAME
    assert ds.SoftwareVersions == f"dicom-node {dicom_node.__version__}"  # no model made it
    assert ds.BurnedInAnnotation == "YES"
    assert ds.ImageComments == f"NOT PROCESSED: {REASON}"
    referenced = [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in ds.ReferencedImageSequence]
    assert referenced == [(s.SOPClassUID, s.SOPInstanceUID) for s in written["sources"]]
    assert written["written"].files[0].sop_instance_uid == ds.SOPInstanceUID


def test_page_shows_a_red_banner_and_text(written: dict) -> None:
    pixels = written["ds"].pixel_array
    assert pixels.shape == (NOT_PROCESSED_SIZE[1], NOT_PROCESSED_SIZE[0], 3)
    banner = pixels[5:75]
    red = np.all(np.abs(banner.astype(int) - (200, 30, 30)) <= 10, axis=-1).mean()
    white = np.all(banner >= 240, axis=-1).mean()
    assert red > 0.7 and white > 0.02  # red band with the white "NOT PROCESSED"
    body = pixels[100:]
    assert np.any(body > 200, axis=-1).mean() > 0.01  # the lines of text


def test_the_loop_guard_never_processes_it(written: dict) -> None:
    ds = written["ds"]
    assert loop_guard(SeriesAttributes.from_dataset(ds), str(ds.SeriesInstanceUID), uid_root=None)


def test_a_long_reason_is_cut(tmp_path: Path, written: dict) -> None:
    source = written["sources"][0]
    out = write_not_processed("x " * 2000, source=source, source_instances=[], out_path=tmp_path / "n.dcm",
                              series_number=1, series_description="rT1 NOT PROCESSED", uid_prefix=None, what="rT1")
    ds = pydicom.dcmread(out.path)
    assert len(ds.ImageComments) < 700 and ds.ImageComments.endswith("...")
    assert "ReferencedImageSequence" not in ds
    assert dciodvfy_errors(out.path) == []


@pytest.mark.parametrize("charset", [None, "ISO_IR 100"])
def test_a_reason_the_sources_character_set_cannot_hold(tmp_path: Path, written: dict, charset: str | None) -> None:
    """Found in review: a reason with "ä" on a source without SpecificCharacterSet was written as a Latin-1 byte the
    default repertoire does not have (dciodvfy: character invalid), and "≥" on a Latin-1 source as "?". The page
    goes out in UTF-8 then, its patient's name as the source spelt it."""
    source = copy.deepcopy(written["sources"][0])
    source.PatientName = "Muller^Jorg" if charset is None else "Müller^Jörg"
    if charset is None:
        source.pop("SpecificCharacterSet", None)
    else:
        source.SpecificCharacterSet = charset
    reason = "Schädel: 8 mm ≥ 4 mm slices → refused"
    out = write_not_processed(reason, source=source, source_instances=[], out_path=tmp_path / "n.dcm",
                              series_number=1, series_description="rT1 NOT PROCESSED", uid_prefix=None, what="rT1")
    assert dciodvfy_errors(out.path) == []
    ds = pydicom.dcmread(out.path)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.ImageComments == f"NOT PROCESSED: {reason}"
    assert str(ds.PatientName) == str(source.PatientName)


def _page_of(source: pydicom.Dataset, tmp_path: Path) -> pydicom.Dataset:
    """The page written for ``source`` (checked valid by dciodvfy), read back."""
    out = write_not_processed(REASON, source=source, source_instances=[(str(source.SOPClassUID),
                                                                        str(source.SOPInstanceUID))],
                              out_path=tmp_path / "not_processed.dcm", series_number=750,
                              series_description="sT12DT1 NOT PROCESSED", uid_prefix=UID_PREFIX,
                              what="sT12DT1 (synthetic T1 by model m)", job_id=13)
    assert dciodvfy_errors(out.path) == []
    return pydicom.dcmread(out.path)


def test_a_source_without_type2_identity_or_with_a_sex_dicom_forbids(tmp_path: Path, written: dict) -> None:
    """The page must reach the reader whatever the source's identity attributes: none of EXPORT_LACKS, and a
    RIS's PatientSex "U"."""
    ds = _page_of(as_exported(written["sources"][:1])[0], tmp_path)
    assert all(ds[keyword].value in ("", None) for keyword in (*EXPORT_LACKS, "PatientSex"))


def test_a_japanese_source(tmp_path: Path, written: dict) -> None:
    """SpecificCharacterSet \\ISO 2022 IR 87 (highdicom refuses it as it is): the page still reaches the reader."""
    ds = _page_of(as_japanese(written["sources"][:1])[0], tmp_path)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == JAPANESE_NAME

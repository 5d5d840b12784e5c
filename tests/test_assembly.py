"""Tests for dicom_node.assembly: whole, gap and missing slices from filed header geometry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicom_node.assembly import completeness
from dicom_node.headers import InstanceHeader, describe
from dicom_node.journal import InstanceRecord
from tests.dicom_factory import AXIAL_IOP, make_mr_series, oblique_iop


def records(paths: Sequence[Path]) -> list[InstanceRecord]:
    """The journal rows the SCP would file for these files."""
    out = []
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        received = describe(ds)
        out.append(InstanceRecord(received.sop_instance_uid, received.series_uid, received.sop_class_uid,
                                  "1.2.840.10008.1.2.1", str(path), received.header))
    return out


def geometry(k: int, **overrides: Any) -> dict[str, Any]:
    g: dict[str, Any] = {"ipp": [0.0, 0.0, 4.0 * k], "iop": list(AXIAL_IOP), "ps": [1.0, 1.0], "rows": 16,
                         "cols": 16, "frames": 1, "instance": k + 1, "images_in_acquisition": 0, "thickness": [4.0]}
    g.update(overrides)
    return g


def rec(k: int, **overrides: Any) -> InstanceRecord:
    return InstanceRecord(f"1.2.{k}", "1.2", "1.2.840.10008.5.1.4.1.1.4", "", "",
                          InstanceHeader.from_json(geometry(k, **overrides)))


SHAPE = (8, 16, 16)


def test_whole_series(tmp_path: Path) -> None:
    verdict = completeness(records(make_mr_series(tmp_path, shape=SHAPE, spacing=(1.0, 1.0, 4.0))))
    assert verdict.whole and verdict.reason == "8 slices, evenly spaced, no gap"


def test_whole_oblique_series_in_shuffled_order(tmp_path: Path) -> None:
    recs = records(make_mr_series(tmp_path, shape=SHAPE, spacing=(0.9, 0.9, 3.3), iop=oblique_iop()))
    verdict = completeness(recs[::-1][1::2] + recs[::-1][0::2])
    assert verdict.whole, verdict.reason


def test_enhanced_mr_images_of_one_frame_each_are_whole(tmp_path: Path) -> None:
    """Enhanced MR stored one frame per instance holds each plane only in its functional groups: it was "an instance
    has no ImagePositionPatient" for ever (the series waited for its idle timeout, gaps went unchecked)."""
    from pydicom import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    def enhanced(path: Path) -> Dataset:
        ds = dcmread(path, stop_before_pixels=True)
        plane, orientation, measures = Dataset(), Dataset(), Dataset()
        plane.ImagePositionPatient = ds.ImagePositionPatient
        orientation.ImageOrientationPatient = ds.ImageOrientationPatient
        measures.PixelSpacing, measures.SliceThickness = ds.PixelSpacing, ds.SliceThickness
        frame = Dataset()
        frame.PlanePositionSequence = DicomSequence([plane])
        shared = Dataset()
        shared.PlaneOrientationSequence = DicomSequence([orientation])
        shared.PixelMeasuresSequence = DicomSequence([measures])
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
            delattr(ds, keyword)
        ds.NumberOfFrames = 1
        ds.PerFrameFunctionalGroupsSequence = DicomSequence([frame])
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        return ds

    def as_records(paths: Sequence[Path]) -> list[InstanceRecord]:
        return [InstanceRecord(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), "", "",
                               describe(ds).header) for ds in map(enhanced, paths)]

    paths = make_mr_series(tmp_path / "whole", shape=SHAPE, spacing=(1.0, 1.0, 4.0))
    verdict = completeness(as_records(paths))
    assert verdict.whole and verdict.reason == "8 slices, evenly spaced, no gap"
    gap = make_mr_series(tmp_path / "gap", shape=SHAPE, spacing=(1.0, 1.0, 4.0), omit_slices=[4])
    verdict = completeness(as_records(gap))
    assert not verdict.whole and "gap" in verdict.reason


def test_gap_in_the_middle(tmp_path: Path) -> None:
    verdict = completeness(records(make_mr_series(tmp_path, shape=SHAPE, spacing=(1.0, 1.0, 4.0), omit_slices=[4])))
    assert not verdict.whole
    assert "gap" in verdict.reason and "8" in verdict.reason  # 8 mm step where 4 mm is expected


def test_missing_last_slices_found_by_images_in_acquisition(tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path, shape=SHAPE, spacing=(1.0, 1.0, 4.0), omit_slices=[6, 7],
                           header={"ImagesInAcquisition": 8})
    verdict = completeness(records(paths))
    assert not verdict.whole and verdict.reason == "6 of 8 images (ImagesInAcquisition)"


def test_missing_last_slices_without_images_in_acquisition_look_whole(tmp_path: Path) -> None:
    # Nothing in the headers says the stack was longer: the series closes and the idle timeout is moot.
    paths = make_mr_series(tmp_path, shape=SHAPE, spacing=(1.0, 1.0, 4.0), omit_slices=[6, 7])
    assert completeness(records(paths)).whole


def test_all_images_in_acquisition_present(tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path, shape=SHAPE, spacing=(1.0, 1.0, 4.0), header={"ImagesInAcquisition": 8})
    assert completeness(records(paths)).whole


def test_empty() -> None:
    verdict = completeness([])
    assert not verdict.whole and verdict.reason == "no instances"


def test_multi_frame_instance_is_whole_by_itself() -> None:
    verdict = completeness([rec(0, frames=176, ipp=None, iop=None)])
    assert verdict.whole and verdict.reason == "1 multi-frame instance(s), 176 frames"


def test_mixed_multi_and_single_frame() -> None:
    verdict = completeness([rec(0, frames=10), rec(1)])
    assert not verdict.whole and "mixes multi-frame and single-frame" in verdict.reason


def test_instance_without_position() -> None:
    verdict = completeness([rec(0), rec(1, ipp=None), rec(2)])
    assert not verdict.whole and "no ImagePositionPatient" in verdict.reason


@pytest.mark.parametrize("overrides", [
    {"ipp": [0.0, 0.0, 4.0, 1.0]},                 # four values: crashed the idle sweep (found by fuzzing)
    {"ipp": [0.0, 4.0]},
    {"iop": [1.0, 0.0, 0.0, 0.0, 1.0]},           # five, the others six
    {"ipp": [0.0, float("nan"), 4.0]},
    {"iop": [1.0, 0.0, 0.0, 0.0, float("inf"), 0.0]},
])
def test_positions_and_orientations_of_the_wrong_size_are_a_reason_not_an_error(overrides: dict[str, Any]) -> None:
    verdict = completeness([rec(0), rec(1, **overrides), rec(2)])
    assert not verdict.whole and "finite numbers" in verdict.reason


def test_duplicate_positions() -> None:
    verdict = completeness([rec(0), rec(1), rec(1), rec(2)])
    assert not verdict.whole and "duplicate" in verdict.reason


def test_mixed_orientation() -> None:
    verdict = completeness([rec(0), rec(1), rec(2, iop=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0])])
    assert not verdict.whole


def test_mixed_matrix_size() -> None:
    verdict = completeness([rec(0), rec(1), rec(2, rows=32)])
    assert not verdict.whole


@pytest.mark.parametrize("n", [1, 2])
def test_short_stacks_are_whole(n: int) -> None:
    assert completeness([rec(k) for k in range(n)]).whole


def _with_vendor_count(paths: Sequence[Path], manufacturer: str, group: int, creator: str, offset: int, vr: str,
                       count: int) -> list[Path]:
    """The files of ``paths`` as a vendor writes them: no ImagesInAcquisition, the slice count in its private
    element (``vr`` "UN": as a sender that does not know the element forwards it)."""
    for path in paths:
        ds = dcmread(path)
        ds.Manufacturer = manufacturer
        del ds.ImagesInAcquisition
        block = ds.private_block(group, creator, create=True)
        value = count.to_bytes(2 if vr == "SS" else 4, "little", signed=True) if vr == "UN" else count
        block.add_new(offset, vr, value)
        ds.save_as(path)
    return list(paths)


@pytest.mark.parametrize("manufacturer, group, creator, offset, vr", [
    ("GE MEDICAL SYSTEMS", 0x0021, "GEMS_RELA_01", 0x4F, "SS"),
    ("Philips Healthcare", 0x2001, "Philips Imaging DD 001", 0x18, "SL"),
    ("Philips Medical Systems", 0x2001, "Philips Imaging DD 001", 0x18, "UN"),
])
def test_missing_last_slices_found_by_the_vendors_slice_count(tmp_path: Path, manufacturer: str, group: int,
                                                                creator: str, offset: int, vr: str) -> None:
    """GE and Philips leave ImagesInAcquisition out: a contiguous first part of a series sent over two associations
    looked whole and was processed as the whole head when the release grace passed between the parts."""
    paths = _with_vendor_count(make_mr_series(tmp_path, shape=SHAPE, spacing=(1.0, 1.0, 4.0), omit_slices=[6, 7],
                                              header={"ImagesInAcquisition": 8}),
                               manufacturer, group, creator, offset, vr, 8)
    rows = records(paths)
    assert rows[0].header.images_in_acquisition == 0 and rows[0].header.vendor_slices == 8
    verdict = completeness(rows)
    assert not verdict.whole and verdict.reason == "6 of 8 slices (the vendor's private slice count)"
    again = [InstanceRecord(r.sop_instance_uid, r.series_uid, r.sop_class_uid, r.transfer_syntax, r.path,
                            InstanceHeader.from_json(r.header.to_json())) for r in rows]
    assert completeness(again).reason == verdict.reason  # as filed in the journal and read back


@pytest.mark.parametrize("value", ["176\\176", "abc"])
def test_an_unreadable_images_in_acquisition_reads_as_not_said(tmp_path: Path, value: str) -> None:
    """Found in review: ImagesInAcquisition, an optional count, with two values or none readable refused the image
    (0xC000 "cannot read the header"), and its series then failed as incomplete. It reads as not said."""
    (path,) = make_mr_series(tmp_path, shape=(1, 8, 8))
    ds = dcmread(path)
    raw = value.encode().ljust(len(value) + len(value) % 2)
    ds[0x00201002] = RawDataElement(Tag(0x00201002), "IS", len(raw), raw, 0, False, True)  # as received: unread
    header = InstanceHeader.from_dataset(ds)
    assert header.images_in_acquisition == 0 and header.vendor_slices == 0


def test_a_vendor_slice_count_counts_only_for_its_vendor_and_when_all_are_there(tmp_path: Path) -> None:
    whole = _with_vendor_count(make_mr_series(tmp_path / "ge", shape=SHAPE, spacing=(1.0, 1.0, 4.0),
                                              header={"ImagesInAcquisition": 8}),
                               "GE MEDICAL SYSTEMS", 0x0021, "GEMS_RELA_01", 0x4F, "SS", 8)
    assert completeness(records(whole)).whole
    other = _with_vendor_count(make_mr_series(tmp_path / "other", shape=SHAPE, spacing=(1.0, 1.0, 4.0),
                                              omit_slices=[6, 7], header={"ImagesInAcquisition": 8}),
                               "SIEMENS", 0x0021, "GEMS_RELA_01", 0x4F, "SS", 8)
    assert records(other)[0].header.vendor_slices == 0 and completeness(records(other)).whole

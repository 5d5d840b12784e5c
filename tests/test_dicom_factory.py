from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.dicom_factory import (
    AXIAL_IOP,
    MARKER_INTENSITY,
    brightest_point,
    make_mr_series,
    make_mr_volume_image,
    make_study,
    oblique_iop,
)


def test_series_of_one_study_share_study_patient_and_frame_of_reference(tmp_path: Path) -> None:
    study = make_study(patient_id="P42")
    first = make_mr_series(tmp_path, study=study, shape=(4, 8, 8), series_number=2)
    second = make_mr_series(tmp_path, study=study, shape=(5, 8, 8), series_number=3, iop=AXIAL_IOP,
                            series_description="t2_tse_tra", patient_position="FFS", marker_mm=None)
    a, b = pydicom.dcmread(first[0]), pydicom.dcmread(second[0])
    assert (a.StudyInstanceUID, a.FrameOfReferenceUID, a.PatientID) == (
        b.StudyInstanceUID, b.FrameOfReferenceUID, b.PatientID) == (study.study_uid,
                                                                     study.frame_of_reference_uid, "P42")
    assert a.SeriesInstanceUID != b.SeriesInstanceUID and len({*first, *second}) == 9
    assert (b.PatientPosition, b.SeriesDescription, b.SeriesNumber) == ("FFS", "t2_tse_tra", 3)
    assert make_study().study_uid != study.study_uid


def test_slice_gap_and_missing_slices(tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path, shape=(6, 8, 8), spacing=(1.0, 1.0, 4.8), slice_thickness=4.0,
                           omit_slices={2}, marker_mm=None)
    datasets = [pydicom.dcmread(p) for p in paths]
    assert [int(d.InstanceNumber) for d in datasets] == [1, 2, 4, 5, 6]
    assert all(float(d.SliceThickness) == 4.0 and float(d.SpacingBetweenSlices) == 4.8 for d in datasets)
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    np.testing.assert_allclose(steps, [4.8, 9.6, 4.8, 4.8], atol=1e-4)


def test_oblique_geometry_and_marker(tmp_path: Path) -> None:
    iop = oblique_iop()
    row, column = np.array(iop[:3]), np.array(iop[3:])
    assert abs(row @ column) < 1e-12 and abs(np.linalg.norm(row) - 1) < 1e-12
    image = make_mr_volume_image((10, 32, 32), (1.0, 1.0, 2.0), iop=iop, marker_mm=(3.0, -8.0, 21.0))
    assert np.linalg.norm(np.array(brightest_point(image)) - (3.0, -8.0, 21.0)) <= np.sqrt(0.5**2 * 2 + 1.0**2)
    paths = make_mr_series(tmp_path, shape=(10, 32, 32), spacing=(1.0, 1.0, 2.0), iop=iop,
                           marker_mm=(3.0, -8.0, 21.0), header={"MRAcquisitionType": "3D", "AngioFlag": None})
    ds = pydicom.dcmread(paths[0])
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-6)
    assert ds.MRAcquisitionType == "3D" and "AngioFlag" not in ds and ds.Manufacturer == "SIEMENS"
    assert max(int(pydicom.dcmread(p).pixel_array.max()) for p in paths) == MARKER_INTENSITY
    with pytest.raises(ValueError, match="outside"):
        make_mr_volume_image((4, 8, 8), iop=iop, marker_mm=(500.0, 0.0, 0.0))

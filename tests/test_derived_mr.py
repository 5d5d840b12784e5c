from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import Collection, codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

import dicom_node
from dicom_node.writers.derived_mr import Derivation, write_derived_mr
from tests.conftest import SHARED_DATA, requires_shared_data
from tests.dicom_factory import brightest_point, make_mr_series, make_study, oblique_iop
from tests.volumetry_factory import dciodvfy_errors

DCIODVFY = Path("/usr/bin/dciodvfy")
PREFIX = "1.2.826.0.1.3680043.10.999."
MARKER_MM = (10.0, -5.0, 25.0)
DERIVATION = Derivation("synth-t1", "0.1.0", "Synthetic MPRAGE-like T1 from t1_fl2d_sag by model synth-t1 0.1.0")
SCOUT = SHARED_DATA / "dicom" / "phantom_siemens_xa30_aahead_scout" / "01001_AAHead_Scout"


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(Error lines, Warning lines) dciodvfy prints for one file."""
    if not DCIODVFY.exists():
        pytest.skip(f"dciodvfy not installed at {DCIODVFY}")
    result = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, errors="replace",
                            timeout=60, check=False)
    lines = [line.strip() for line in (result.stderr + result.stdout).splitlines()]
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def read_series(folder: Path) -> sitk.Image:
    """A series read by SimpleITK/GDCM (sorted by position): an independent geometry reader."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.Cast(reader.Execute(), sitk.sitkFloat32)


def isotropic(image: sitk.Image, spacing_mm: float = 1.0) -> sitk.Image:
    """Linear resampling to an isotropic grid with the input's direction, covering its field of view."""
    size = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    new_size = np.ceil(size * spacing / spacing_mm).astype(int)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    start = -spacing / 2 + spacing_mm / 2  # first new voxel centre, from the first old voxel centre
    reference = sitk.Image([int(v) for v in new_size], sitk.sitkFloat32)
    reference.SetSpacing((spacing_mm,) * 3)
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(tuple(np.array(image.GetOrigin()) + direction @ start))
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def left_handed(image: sitk.Image) -> sitk.Image:
    """The same voxels in patient space, indexed with the slice axis reversed (direction determinant -1)."""
    array = sitk.GetArrayFromImage(image)[::-1]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    direction[:, 2] *= -1
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(array))
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetDirection(tuple(direction.ravel()))
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint((0, 0, image.GetSize()[2] - 1)))
    return flipped


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("source")
    study = make_study()
    paths = make_mr_series(folder, shape=(20, 64, 64), spacing=(0.9, 0.9, 3.3), iop=oblique_iop(),
                           marker_mm=MARKER_MM, study=study, series_description="t1_fl2d_sag")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    image = read_series(folder)
    return {"folder": folder, "paths": paths, "headers": headers, "image": image, "study": study,
            "iso": isotropic(image)}


@pytest.fixture(scope="module")
def written(source: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out_dir = tmp_path_factory.mktemp("derived") / "series"
    paths = write_derived_mr(source["iso"], source["headers"], out_dir=out_dir, series_description="SYN T1 1mm",
                             series_number=1002, derivation=DERIVATION, uid_prefix=PREFIX,
                             extra_comment="Research use.").paths
    return {"dir": out_dir, "paths": paths, "datasets": [pydicom.dcmread(p) for p in paths]}


def small_image(values: np.ndarray | None = None) -> sitk.Image:
    array = values if values is not None else np.random.default_rng(1).uniform(10, 900, (3, 6, 5))
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetOrigin((-20.0, 10.0, 5.0))
    return image


def write_small(source: dict, out_dir: Path, image: sitk.Image | None = None, **kwargs) -> list[Path]:
    args = {"series_description": "SYN", "series_number": 7, "derivation": DERIVATION, "uid_prefix": PREFIX}
    args.update(kwargs)
    sources = args.pop("sources", source["headers"])
    return write_derived_mr(image if image is not None else small_image(), sources, out_dir=out_dir, **args).paths


def test_one_file_per_slice_named_by_instance_number(source: dict, written: dict) -> None:
    n = source["iso"].GetSize()[2]
    assert [p.name for p in written["paths"]] == [f"{k:04d}.dcm" for k in range(1, n + 1)]
    assert [int(ds.InstanceNumber) for ds in written["datasets"]] == list(range(1, n + 1))


def test_instances_pass_dciodvfy(written: dict) -> None:
    paths = written["paths"]
    for path in (paths[0], paths[len(paths) // 2], paths[-1]):
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
        # only attributes of the MR Image IOD are written (no "Standard Extended SOP Class")
        assert not [w for w in warnings if "not present in standard DICOM IOD" in w], warnings


def test_sop_class_file_meta_and_image_type(written: dict) -> None:
    for ds in written["datasets"]:
        assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR"
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]


def test_new_series_and_instance_uids_under_prefix(source: dict, written: dict) -> None:
    datasets = written["datasets"]
    series_uids = {ds.SeriesInstanceUID for ds in datasets}
    assert len(series_uids) == 1
    series_uid = series_uids.pop()
    assert series_uid.startswith(PREFIX) and series_uid != source["headers"][0].SeriesInstanceUID
    sop_uids = [ds.SOPInstanceUID for ds in datasets]
    assert len(set(sop_uids)) == len(sop_uids) and all(uid.startswith(PREFIX) for uid in sop_uids)
    assert not set(sop_uids) & {h.SOPInstanceUID for h in source["headers"]}
    assert all(ds.SeriesNumber == 1002 and ds.SeriesDescription == "SYN T1 1mm" for ds in datasets)


def test_patient_study_and_frame_of_reference_copied(source: dict, written: dict) -> None:
    study, src = source["study"], source["headers"][0]
    for ds in (written["datasets"][0], written["datasets"][-1]):
        assert str(ds.PatientName) == study.patient_name and ds.PatientID == study.patient_id
        assert ds.PatientBirthDate == study.patient_birth_date and ds.PatientSex == study.patient_sex
        assert ds.PatientAge == study.patient_age and float(ds.PatientWeight) == study.patient_weight
        assert ds.StudyInstanceUID == study.study_uid and ds.StudyDate == study.study_date
        assert ds.StudyTime == study.study_time and ds.AccessionNumber == study.accession_number
        assert ds.StudyID == study.study_id and ds.StudyDescription == study.study_description
        assert str(ds.ReferringPhysicianName) == study.referring_physician
        assert ds.FrameOfReferenceUID == study.frame_of_reference_uid
        assert ds.PatientPosition == src.PatientPosition and ds.BodyPartExamined == "BRAIN"
        assert ds.SpecificCharacterSet == src.SpecificCharacterSet
        assert "Laterality" not in ds


def test_equipment_is_the_node_and_the_scanner_contributed(source: dict, written: dict) -> None:
    ds, src = written["datasets"][0], source["headers"][0]
    assert ds.Manufacturer == dicom_node.MANUFACTURER and ds.ManufacturerModelName == dicom_node.MODEL_NAME
    assert list(ds.SoftwareVersions) == [f"dicom-node {dicom_node.__version__}", "synth-t1 0.1.0"]
    assert ds.InstitutionName == src.InstitutionName
    assert "DeviceSerialNumber" not in ds
    (scanner,) = ds.ContributingEquipmentSequence
    assert scanner.Manufacturer == "SIEMENS" and scanner.DeviceSerialNumber == src.DeviceSerialNumber
    assert scanner.PurposeOfReferenceCodeSequence[0].CodeValue == codes.DCM.AcquisitionEquipment.value


def test_per_slice_geometry_matches_the_image(source: dict, written: dict) -> None:
    image = source["iso"]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing, size = image.GetSpacing(), image.GetSize()
    for k, ds in enumerate(written["datasets"]):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   image.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-4)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient],
                                   [*direction[:, 0], *direction[:, 1]], atol=1e-6)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [spacing[1], spacing[0]], atol=1e-6)
        assert float(ds.SliceThickness) == pytest.approx(spacing[2])
        assert float(ds.SpacingBetweenSlices) == pytest.approx(spacing[2])
        assert (ds.Rows, ds.Columns) == (size[1], size[0])


def test_pixels_are_the_rounded_image(source: dict, written: dict) -> None:
    expected = np.rint(np.clip(sitk.GetArrayFromImage(source["iso"]), 0, 65535)).astype(np.uint16)
    for k in (0, len(written["datasets"]) // 2):
        ds = written["datasets"][k]
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 0)
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
        np.testing.assert_array_equal(ds.pixel_array, expected[k])
    assert "RescaleSlope" not in written["datasets"][0]


def test_oblique_marker_keeps_its_patient_position(source: dict, written: dict) -> None:
    source_marker = np.array(brightest_point(source["image"]))
    assert np.linalg.norm(source_marker - MARKER_MM) < 3.3  # the factory snaps the marker to a voxel
    back = read_series(written["dir"])
    assert np.linalg.norm(np.array(brightest_point(back)) - source_marker) <= 1.0
    assert back.GetSize() == source["iso"].GetSize()


def test_left_handed_direction_keeps_patient_positions(source: dict, tmp_path: Path) -> None:
    flipped = left_handed(source["iso"])
    write_small(source, tmp_path, flipped)
    back = read_series(tmp_path)
    assert np.linalg.norm(np.array(brightest_point(back)) - brightest_point(source["iso"])) < 1e-3
    for corner in [(0, 0, 0), (57, 57, 65), (0, 57, 30)]:
        point = source["iso"].TransformIndexToPhysicalPoint(corner)
        np.testing.assert_allclose(back.TransformPhysicalPointToContinuousIndex(point),
                                   np.round(back.TransformPhysicalPointToContinuousIndex(point)), atol=1e-3)


def test_anisotropic_oblique_grid_round_trip(source: dict, tmp_path: Path) -> None:
    values = np.full((4, 7, 5), 100.0, dtype=np.float32)   # [k, j, i]: 5 columns, 7 rows, 4 slices
    values[2, 5, 1] = 900.0
    image = small_image(values)
    image.SetSpacing((0.7, 1.3, 2.1))
    image.SetDirection(tuple(np.array(source["image"].GetDirection())))
    paths = write_small(source, tmp_path, image)
    ds = pydicom.dcmread(paths[0])
    assert (ds.Rows, ds.Columns) == (7, 5)
    assert [float(v) for v in ds.PixelSpacing] == [1.3, 0.7]
    back = read_series(tmp_path)
    np.testing.assert_allclose(back.GetSpacing(), (0.7, 1.3, 2.1), atol=1e-4)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(brightest_point(back), image.TransformIndexToPhysicalPoint((1, 5, 2)), atol=1e-3)


def test_load_series_round_trip(source: dict, written: dict) -> None:
    volume = pytest.importorskip("inference.volume")
    loaded = volume.load_series(written["paths"])
    iso = source["iso"]
    np.testing.assert_allclose(loaded.image.GetOrigin(), iso.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(loaded.image.GetSpacing(), iso.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(loaded.image.GetDirection(), iso.GetDirection(), atol=1e-5)
    assert np.linalg.norm(np.array(brightest_point(loaded.image)) - brightest_point(source["image"])) <= 1.0


def test_source_image_sequence_references_every_source(source: dict, written: dict) -> None:
    expected = {(h.SOPClassUID, h.SOPInstanceUID) for h in source["headers"]}
    purpose = codes.DCM.SourceImageForImageProcessingOperation
    for ds in (written["datasets"][0], written["datasets"][-1]):
        refs = {(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in ds.SourceImageSequence}
        assert refs == expected and len(ds.SourceImageSequence) == len(expected)
        assert all(i.PurposeOfReferenceCodeSequence[0].CodeValue == purpose.value
                   and i.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "DCM"
                   for i in ds.SourceImageSequence)
        (series,) = ds.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == source["headers"][0].SeriesInstanceUID
        assert {(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
                for i in series.ReferencedInstanceSequence} == expected


def test_derivation_and_comments_say_synthetic(written: dict) -> None:
    ds = written["datasets"][0]
    (code,) = ds.DerivationCodeSequence
    image_derivation = Collection("CID7203")
    assert any(getattr(image_derivation, name).value == code.CodeValue for name in image_derivation.dir())
    assert code.CodingSchemeDesignator == "DCM"
    assert DERIVATION.description in ds.DerivationDescription
    assert "synth-t1 0.1.0" in ds.DerivationDescription and "not acquired" in ds.DerivationDescription
    assert ds.ImageComments.startswith("SYNTHETIC image computed by synth-t1 0.1.0 from series 't1_fl2d_sag'")
    assert "not for lesion detection" in ds.ImageComments and ds.ImageComments.endswith("Research use.")
    assert ds.BurnedInAnnotation == "NO" and ds.LossyImageCompression == "00"


def test_mr_image_module_claims_no_acquisition(written: dict) -> None:
    ds = written["datasets"][0]
    assert ds.ScanningSequence == "RM" and ds.SequenceVariant == "NONE" and ds.MRAcquisitionType == "3D"
    for keyword in ("RepetitionTime", "EchoTime", "EchoTrainLength", "ScanOptions"):
        assert keyword in ds and ds[keyword].value in (None, "")
    for keyword in ("MagneticFieldStrength", "FlipAngle", "SequenceName", "AcquisitionDate"):
        assert keyword not in ds


def test_window_covers_brain_and_saturates_marker(written: dict) -> None:
    ds = written["datasets"][0]
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    assert width >= 1 and centre - width / 2 >= 0
    assert centre - width / 2 < 600 < centre + width / 2   # factory 'brain' intensity
    assert centre + width / 2 < 2000                        # the single bright marker voxel is not the top
    assert ds.WindowCenterWidthExplanation
    assert all(float(d.WindowCenter) == centre for d in written["datasets"])


def test_values_are_clipped_and_rounded(source: dict, tmp_path: Path) -> None:
    values = np.full((2, 3, 4), 100.4, dtype=np.float32)
    values[0, 0, 0], values[0, 0, 1], values[1, 2, 3], values[1, 1, 1] = -50.0, 70000.0, 2.5, 99.6
    (first, second) = write_small(source, tmp_path, small_image(values))
    assert pydicom.dcmread(first).pixel_array[0, :2].tolist() == [0, 65535]
    stored = pydicom.dcmread(second).pixel_array
    assert stored[2, 3] == 2 and stored[1, 1] == 100 and stored[0, 0] == 100


def test_given_series_uid_is_used(source: dict, tmp_path: Path) -> None:
    paths = write_small(source, tmp_path, series_uid="1.2.826.0.1.3680043.10.999.42")
    assert {pydicom.dcmread(p).SeriesInstanceUID for p in paths} == {"1.2.826.0.1.3680043.10.999.42"}


def test_non_ascii_text_is_written_as_utf8(tmp_path: Path) -> None:
    study = make_study(patient_name="Müller^Jürgen")
    src = make_mr_series(tmp_path / "src", shape=(3, 8, 8), study=study, marker_mm=None)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in src]
    (path, *_) = write_derived_mr(small_image(), headers, out_dir=tmp_path / "out", series_description="SYN äöü",
                                  series_number=3, derivation=DERIVATION, uid_prefix=None).paths
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Jürgen" and ds.SeriesDescription == "SYN äöü"
    errors, _ = dciodvfy(path)
    assert errors == []


def test_sparse_source_headers_still_give_valid_objects(tmp_path: Path) -> None:
    sparse = {"Manufacturer": "", "PatientPosition": None, "BodyPartExamined": None, "InstitutionName": None,
              "PatientAge": None, "PatientSex": None, "StudyID": None, "AccessionNumber": None}
    src = make_mr_series(tmp_path / "src", shape=(3, 8, 8), header=sparse)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in src]
    assert "PatientSex" not in headers[0] and "StudyID" not in headers[0]
    (path, *_) = write_derived_mr(small_image(), [*headers, headers[0]], out_dir=tmp_path / "out",
                                  series_description="SYN", series_number=3, derivation=DERIVATION,
                                  uid_prefix=None).paths
    ds = pydicom.dcmread(path)
    assert "ContributingEquipmentSequence" not in ds and len(ds.SourceImageSequence) == 3
    assert ds.PatientPosition in (None, "") and ds.PatientSex in (None, "") and ds.StudyID in (None, "")
    assert "Laterality" in ds and ds.Laterality in (None, "")   # no BodyPartExamined: 2C, present and empty
    errors, _ = dciodvfy(path)
    assert errors == []


def _vector() -> sitk.Image:
    return sitk.Image([4, 4, 2], sitk.sitkVectorFloat32, 2)


def _nan() -> sitk.Image:
    values = np.ones((2, 3, 3), dtype=np.float32)
    values[1, 1, 1] = np.nan
    return small_image(values)


@pytest.mark.parametrize(
    ("make_image", "sources", "message"),
    [
        (lambda: sitk.Image([4, 4], sitk.sitkFloat32) + 1, None, "3D"),
        (_vector, None, "scalar"),
        (_nan, None, "NaN"),
        (lambda: small_image(np.zeros((2, 3, 3))), None, "non-zero"),
        (small_image, [], "no source"),
    ],
)
def test_invalid_input_writes_nothing(source: dict, tmp_path: Path, make_image, sources, message: str) -> None:
    kwargs = {} if sources is None else {"sources": sources}
    with pytest.raises(ValueError, match=message):
        write_small(source, tmp_path / "out", make_image(), **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:The value length")
def test_values_the_vr_forbids_are_refused(source: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SeriesDescription"):
        write_small(source, tmp_path / "a", series_description="x" * 65)   # LO holds 64 characters
    bad = [pydicom.dcmread(p, stop_before_pixels=True) for p in source["paths"]]
    bad[0].StudyID = "STUDY-ID-TOO-LONG-FOR-SH"                               # SH holds 16
    with pytest.raises(ValueError, match="StudyID"):
        write_small(source, tmp_path / "b", sources=bad)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_optional_values_the_vr_forbids_are_left_out_with_a_warning(source: dict, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Vendor and RIS sloppiness in a descriptive attribute (a lowercase CS, an unpadded age) costs that attribute,
    not the series; the identity attributes are copied as they are."""
    sloppy = [pydicom.dcmread(p, stop_before_pixels=True) for p in source["paths"]]
    for ds in sloppy:
        ds.BodyPartExamined, ds.PatientAge, ds.StudyDescription = "Brain", "45Y", "MRI Brain"
    with caplog.at_level("WARNING", logger="dicom_node.writers.derived_mr"):
        paths = write_small(source, tmp_path / "out", sources=sloppy)
    ds = pydicom.dcmread(paths[0])
    assert "BodyPartExamined" not in ds and "PatientAge" not in ds and ds.StudyDescription == "MRI Brain"
    assert ds.PatientID == sloppy[0].PatientID
    assert "BodyPartExamined of the source is not a valid CS" in caplog.text
    assert "PatientAge of the source is not a valid AS" in caplog.text
    own = [r.getMessage() for r in caplog.records if r.name == "dicom_node.writers.derived_mr"]
    assert not any("45Y" in m for m in own)  # the node's own lines quote no patient value
    assert dciodvfy_errors(paths[0]) == []


@pytest.mark.parametrize(("given", "written"), [("m", "M"), (" F", "F"), ("O", "O"), ("U", ""), ("unknown", "")])
def test_patient_sex_is_one_dicom_allows_or_empty(source: dict, tmp_path: Path, given: str, written: str) -> None:
    """PatientSex is M, F or O (PS3.3 C.7.1.1): a RIS's "U" is written empty (unknown), so that the SEG and SR
    built on the sT1 are valid too."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in source["paths"]]
    for ds in headers:
        ds.PatientSex = given
    (path, *_) = write_small(source, tmp_path / "out", sources=headers)
    assert pydicom.dcmread(path).PatientSex == written


def test_sources_from_two_studies_are_refused(source: dict, tmp_path: Path) -> None:
    other = pydicom.dcmread(source["paths"][0], stop_before_pixels=True)
    other.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="more than one study"):
        write_small(source, tmp_path / "out", sources=[*source["headers"], other])


def test_existing_dicom_files_are_not_overwritten(source: dict, tmp_path: Path) -> None:
    write_small(source, tmp_path)
    with pytest.raises(FileExistsError):
        write_small(source, tmp_path)


@requires_shared_data
def test_aahead_scout_sources_give_valid_objects(tmp_path: Path) -> None:
    if not SCOUT.is_dir():
        pytest.skip(f"AAHead scout not found at {SCOUT}")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(SCOUT.glob("*.dcm"))]
    scout = read_series(SCOUT)
    # a small 1 mm grid at the scout's centre, in its orientation, stands in for the model output
    grid = sitk.Image([48, 48, 6], sitk.sitkFloat32)
    grid.SetDirection(scout.GetDirection())
    centre = np.array(scout.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in scout.GetSize()]))
    grid.SetOrigin(tuple(centre - np.array(scout.GetDirection()).reshape(3, 3) @ np.array([23.5, 23.5, 2.5])))
    image = sitk.Resample(scout, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32) + 1.0
    paths = write_derived_mr(image, headers, out_dir=tmp_path, series_description="SYN T1 from AAHead_Scout",
                             series_number=1099, derivation=DERIVATION, uid_prefix=PREFIX).paths
    assert len(paths) == 6
    for path in (paths[0], paths[-1]):
        errors, warnings = dciodvfy(path)
        assert errors == [], errors
        assert not [w for w in warnings if "not present in standard DICOM IOD" in w], warnings
    ds = pydicom.dcmread(paths[0])
    assert ds.StudyInstanceUID == headers[0].StudyInstanceUID
    assert ds.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    assert len(ds.SourceImageSequence) == 128
    assert ds.ContributingEquipmentSequence[0].Manufacturer == headers[0].Manufacturer


def test_write_derived_mr_says_what_it_wrote(tmp_path: Path) -> None:
    """Files, UIDs and headers (without pixel data) in InstanceNumber order, as written."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in make_mr_series(tmp_path / "in", shape=(3, 8, 8))]
    result = write_derived_mr(small_image(), headers, out_dir=tmp_path / "out", series_description="SYN",
                              series_number=3, derivation=DERIVATION, uid_prefix=None)
    assert result.paths == sorted((tmp_path / "out").glob("*.dcm"))
    for file, header in zip(result.files, result.datasets, strict=True):
        stored = pydicom.dcmread(file.path, stop_before_pixels=True)
        assert (file.sop_class_uid, file.sop_instance_uid) == (stored.SOPClassUID, stored.SOPInstanceUID)
        assert header.SOPInstanceUID == stored.SOPInstanceUID and "PixelData" not in header
        assert stored.SeriesInstanceUID == result.series_instance_uid


def test_a_lossy_source_makes_a_lossy_series(source: dict, tmp_path: Path) -> None:
    """Once lossy, always lossy (PS3.3 C.7.6.1.1.5): the sT1 of a JPEG-lossy source said "00", and viewers dropped
    their LOSSY flag."""
    lossy = [pydicom.dcmread(p, stop_before_pixels=True) for p in source["paths"]]
    for ds in lossy:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = [12.5]
        ds.LossyImageCompressionMethod = ["ISO_10918_1"]
    paths = write_small(source, tmp_path / "lossy", sources=lossy)
    ds = pydicom.dcmread(paths[0])
    assert ds.LossyImageCompression == "01"
    assert float(ds.LossyImageCompressionRatio) == 12.5 and ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert dciodvfy_errors(paths[0]) == []
    assert pydicom.dcmread(write_small(source, tmp_path / "lossless")[0]).LossyImageCompression == "00"


def test_a_source_received_in_a_lossy_transfer_syntax_makes_a_lossy_series(source: dict, tmp_path: Path) -> None:
    """Found in review: a JPEG Baseline source that does not say LossyImageCompression itself (many do not) made an
    sT1 that said "00": the transfer syntax it was received in says it."""
    lossy = [pydicom.dcmread(p, stop_before_pixels=True) for p in source["paths"]]
    for ds in lossy:
        ds.pop("LossyImageCompression", None)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG Baseline
    paths = write_small(source, tmp_path / "lossy", sources=lossy)
    ds = pydicom.dcmread(paths[0])
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert dciodvfy_errors(paths[0]) == []
    for ds in lossy:  # JPEG 2000 may be lossless: the data set decides
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.91"
    assert pydicom.dcmread(write_small(source, tmp_path / "j2k", sources=lossy)[0]).LossyImageCompression == "00"

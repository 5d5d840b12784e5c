from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

import dicom_node
from dicom_node.writers.seg import GridMismatchError, segment_codes, write_seg
from inference.labels import LOBE_CORTEX_CODES, STRUCTURES, laterality_code
from inference.volume import load_series
from tests.conftest import SHARED_DATA, requires_shared_data
from tests.volumetry_factory import (
    EXPORT_LACKS,
    JAPANESE_NAME,
    MODEL_ID,
    MODEL_VERSION,
    UID_PREFIX,
    T1Series,
    as_exported,
    as_japanese,
    dciodvfy_errors,
    make_t1_series,
    with_invalid_identity,
)

ENHANCED_MR = SHARED_DATA / "dicom" / "phantom_siemens_xa30_enhanced_mr" / "00005_anat_T1w_acq_tfl"


def _write(series: T1Series, out: Path, labels: sitk.Image | None = None, sources=None) -> Path:
    return write_seg(labels if labels is not None else series.labels,
                     series.t1_headers if sources is None else sources,
                     out_path=out, series_number=1002, series_description="sT1AAH SEG", algorithm_name=MODEL_ID,
                     algorithm_version=MODEL_VERSION, uid_prefix=UID_PREFIX).path


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("seg")
    series = make_t1_series(folder)
    shuffled = [series.t1_headers[i] for i in np.random.default_rng(1).permutation(len(series.t1_headers))]
    path = _write(series, folder / "seg.dcm", sources=shuffled)  # sources in no particular order
    return {"series": series, "path": path, "seg": hd.seg.segread(path)}


def test_dciodvfy_reports_no_errors(written: dict) -> None:
    assert dciodvfy_errors(written["path"]) == []


def test_header_equipment_and_study(written: dict) -> None:
    seg, source = written["seg"], written["series"].t1_headers[0]
    assert seg.SegmentationType == "BINARY"
    assert seg.Manufacturer == dicom_node.MANUFACTURER
    assert seg.ManufacturerModelName == dicom_node.MODEL_NAME
    assert f"dicom-node {dicom_node.__version__}" in list(seg.SoftwareVersions)
    assert seg.SeriesDescription == "sT1AAH SEG" and seg.SeriesNumber == 1002
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.PatientID == source.PatientID
    assert seg.SeriesInstanceUID.startswith(UID_PREFIX) and seg.SOPInstanceUID.startswith(UID_PREFIX)
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID


def test_one_segment_per_structure_with_codes_colour_and_algorithm(written: dict) -> None:
    seg = written["seg"]
    mapping = segment_codes(seg)
    assert set(mapping) == set(STRUCTURES)
    assert sorted(mapping.values()) == list(range(1, len(STRUCTURES) + 1))
    assert [mapping[c] for c in sorted(mapping)] == list(range(1, len(STRUCTURES) + 1))  # code order
    for code, number in mapping.items():
        structure = STRUCTURES[code]
        item = seg.SegmentSequence[number - 1]
        assert item.SegmentNumber == number
        assert item.SegmentLabel == structure.display_name
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        if code in LOBE_CORTEX_CODES:  # cerebral cortex in its lobe, as the SR codes it (typed as the lobe before:
            # a viewer showed a lobe's cortex as the whole lobe)
            assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("40146001", "SCT")
            (region,) = item.AnatomicRegionSequence
            assert (region.CodeValue, region.CodingSchemeDesignator) == (structure.concept.value,
                                                                         structure.concept.scheme_designator)
        else:
            assert (prop.CodeValue, prop.CodingSchemeDesignator) == (structure.concept.value,
                                                                     structure.concept.scheme_designator)
            assert "AnatomicRegionSequence" not in item
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert category.CodeValue == structure.category.value
        side = laterality_code(structure)
        modifiers = prop.get("SegmentedPropertyTypeModifierCodeSequence", [])
        assert [m.CodeValue for m in modifiers] == ([side.value] if side else [])
        rgb = hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue)).to_rgb()
        assert np.allclose(rgb, structure.rgb, atol=2)
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == MODEL_ID and algorithm.AlgorithmVersion == MODEL_VERSION
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == codes.cid7162.ArtificialIntelligence.value


def test_pixel_aligned_with_source_series(written: dict) -> None:
    seg, series = written["seg"], written["series"]
    source = series.t1_headers[0]
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert np.allclose([float(v) for v in measures.PixelSpacing], [float(v) for v in source.PixelSpacing])
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose([float(v) for v in orientation], [float(v) for v in source.ImageOrientationPatient])
    by_uid = {ds.SOPInstanceUID: ds for ds in series.t1_headers}
    labels = sitk.GetArrayFromImage(series.labels)
    code_of = {number: code for code, number in segment_codes(seg).items()}
    pixels = seg.pixel_array
    expected_frames = 0
    for code in code_of.values():
        expected_frames += int(np.count_nonzero((labels == code).any(axis=(1, 2))))
    assert seg.NumberOfFrames == expected_frames  # empty frames omitted
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        derivation = frame.DerivationImageSequence[0].SourceImageSequence[0]
        src = by_uid[derivation.ReferencedSOPInstanceUID]
        assert np.allclose(ipp, [float(v) for v in src.ImagePositionPatient], atol=1e-4)
        k = int(src.InstanceNumber) - 1   # the sT1 writer numbers slices k + 1
        code = code_of[int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        assert np.array_equal(pixels[n].astype(bool), labels[k] == code)


def test_codes_that_are_not_structures_are_not_encoded(tmp_path: Path, written: dict) -> None:
    series = written["series"]
    array = sitk.GetArrayFromImage(series.labels)
    array[array == 24] = 507   # extra-cerebral class instead of CSF
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(series.labels)
    seg = pydicom.dcmread(_write(series, tmp_path / "seg.dcm", labels=labels))
    assert 24 not in segment_codes(seg) and len(seg.SegmentSequence) == len(STRUCTURES) - 1


def test_grid_mismatch_is_refused(tmp_path: Path, written: dict) -> None:
    series = written["series"]
    shifted = sitk.Image(series.labels)
    shifted.SetOrigin(tuple(np.array(series.labels.GetOrigin()) + 0.5))
    with pytest.raises(GridMismatchError, match="not a slice"):
        _write(series, tmp_path / "a.dcm", labels=shifted)
    cropped = series.labels[:, :, 1:]
    with pytest.raises(GridMismatchError):
        _write(series, tmp_path / "b.dcm", labels=cropped)
    with pytest.raises(GridMismatchError, match="cover"):
        _write(series, tmp_path / "c.dcm", sources=series.t1_headers[:-1])
    finer = sitk.Resample(series.labels, [2 * s for s in series.labels.GetSize()], sitk.Transform(),
                          sitk.sitkNearestNeighbor, series.labels.GetOrigin(),
                          [s / 2 for s in series.labels.GetSpacing()], series.labels.GetDirection())
    with pytest.raises(GridMismatchError, match="rows x columns"):
        _write(series, tmp_path / "d.dcm", labels=finer)
    assert not any(tmp_path.glob("*.dcm"))


def test_empty_labels_are_refused(tmp_path: Path, written: dict) -> None:
    series = written["series"]
    empty = sitk.Image(series.labels.GetSize(), sitk.sitkUInt16)
    empty.CopyInformation(series.labels)
    with pytest.raises(ValueError, match="no measured structure"):
        _write(series, tmp_path / "e.dcm", labels=empty)


@requires_shared_data
@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")
def test_enhanced_mr_source_with_per_frame_geometry(tmp_path: Path) -> None:
    """A real Enhanced MR (pixel measures per frame only): frames reference the source frames."""
    files = sorted(ENHANCED_MR.glob("*.dcm"))
    image = load_series(files).image
    array = sitk.GetArrayFromImage(image)
    labels_array = np.where(array > np.percentile(array, 80), 2, 0).astype(np.uint16)
    labels_array[array > np.percentile(array, 97)] = 17
    labels = sitk.GetImageFromArray(labels_array)
    labels.CopyInformation(image)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert "PixelMeasuresSequence" not in sources[0].SharedFunctionalGroupsSequence[0]
    path = write_seg(labels, sources, out_path=tmp_path / "seg.dcm", series_number=5, series_description="SEG",
                     algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION, uid_prefix=UID_PREFIX).path
    assert "PixelMeasuresSequence" not in sources[0].SharedFunctionalGroupsSequence[0]  # caller's data untouched
    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    source_positions = [[float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
                        for frame in sources[0].PerFrameFunctionalGroupsSequence]
    code_of = {number: code for code, number in segment_codes(seg).items()}
    pixels = seg.pixel_array
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        reference = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
        source_frame = int(reference.ReferencedFrameNumber) - 1
        ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(ipp, source_positions[source_frame], atol=1e-4)
        k = int(round(labels.TransformPhysicalPointToContinuousIndex(ipp)[2]))
        code = code_of[int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        assert np.array_equal(pixels[n].astype(bool), labels_array[k] == code)


def test_write_seg_says_what_it_wrote(tmp_path: Path) -> None:
    """The writer returns the file, its UIDs and the segment number of each code (no need to read it back)."""
    series = make_t1_series(tmp_path)
    result = write_seg(series.labels, series.t1_headers, out_path=tmp_path / "seg.dcm", series_number=1002,
                       series_description="SEG", algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION,
                       uid_prefix=UID_PREFIX)
    stored = hd.seg.segread(result.path)
    (file,) = result.files
    assert (file.sop_class_uid, file.sop_instance_uid) == (stored.SOPClassUID, stored.SOPInstanceUID)
    assert result.series_instance_uid == stored.SeriesInstanceUID
    assert dict(result.segment_numbers) == segment_codes(stored)
    assert "PixelData" not in result.dataset


def test_per_frame_items_encoded_once_write_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SEG written with its Per-frame Functional Groups encoded ahead is byte for byte pydicom's own."""
    from pydicom.filebase import DicomBytesIO

    from dicom_node.writers import seg as seg_module

    captured: dict = {}
    real = seg_module.write_single

    def spy(ds, out_path, **kwargs):  # type: ignore[no-untyped-def]
        captured["ds"], captured["encoded"] = ds, kwargs["encoded"]
        return real(ds, out_path, **kwargs)

    monkeypatch.setattr(seg_module, "write_single", spy)
    series = make_t1_series(tmp_path)
    _write(series, tmp_path / "seg.dcm")
    assert captured["encoded"].get_item(seg_module.PER_FRAME_TAG).is_raw
    written = (tmp_path / "seg.dcm").read_bytes()
    plain = DicomBytesIO()
    pydicom.dcmwrite(plain, captured["ds"], enforce_file_format=True)
    assert plain.getvalue() == written


@pytest.mark.parametrize(("vr", "value"), [("US", 3), ("US", [1, 2, 65535]), ("UL", [7, 0, 4294967295]),
                                           ("UL", None), ("US", []), ("UL", 12)])
def test_integer_elements_encoded_as_pydicom_does(vr: str, value: object) -> None:
    from pydicom.dataelem import DataElement
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    from dicom_node.writers.seg import _binary_integers

    element = DataElement(0x00209157, vr, value)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, element)
    assert _binary_integers(element) == fp.getvalue()


def test_integer_elements_pydicom_would_refuse_are_left_to_it() -> None:
    from pydicom.dataelem import DataElement

    from dicom_node.writers.seg import _binary_integers

    with pytest.warns(UserWarning, match="between 0 and 65535"):  # pydicom's own check, as it creates them
        out_of_range = [DataElement(0x0062000B, "US", 70000), DataElement(0x0062000B, "US", -1)]
    assert [_binary_integers(e) for e in out_of_range] == [None, None]  # left to pydicom's error on writing
    assert _binary_integers(DataElement(0x00080018, "UI", "1.2.3")) is None  # not a binary integer VR


def test_multiframe_check_per_sop_class_answers_as_highdicom() -> None:
    import highdicom as hd
    from highdicom._standard_utils import is_multiframe_image
    from pydicom.uid import EnhancedMRImageStorage, MRImageStorage, SegmentationStorage

    from dicom_node.writers import seg as seg_module

    assert hd.utils.is_multiframe_image is seg_module._is_multiframe_image  # the cached one is in use
    for sop_class in (MRImageStorage, EnhancedMRImageStorage, SegmentationStorage):
        ds = pydicom.Dataset()
        ds.SOPClassUID = sop_class
        assert seg_module._is_multiframe_image(ds) == is_multiframe_image(ds)


def test_a_source_without_type2_identity_or_with_a_sex_dicom_forbids(tmp_path: Path, written: dict) -> None:
    """A real T1 from a research export (no AccessionNumber, StudyID, ...) and a RIS's PatientSex "U": the SEG is
    written, valid, with those attributes empty; the sources are left as they were."""
    sources = as_exported(written["series"].t1_headers)
    path = _write(written["series"], tmp_path / "seg.dcm", sources=sources)
    assert dciodvfy_errors(path) == []
    seg = pydicom.dcmread(path)
    assert all(seg[keyword].value in ("", None) for keyword in (*EXPORT_LACKS, "PatientSex"))
    assert seg.PatientID == sources[0].PatientID and seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert all("StudyID" not in ds and ds.PatientSex == "U" for ds in sources)


def test_patient_values_their_vr_does_not_allow_are_left_out(tmp_path: Path, written: dict) -> None:
    """Found in review: a source's PatientAge "45Y" went into the SEG as it was (dciodvfy: value invalid for AS), so
    a strict PACS refused the SEG while it took the sT1 (whose writer leaves such values out)."""
    sources = with_invalid_identity(written["series"].t1_headers)
    path = _write(written["series"], tmp_path / "seg.dcm", sources=sources)
    assert dciodvfy_errors(path) == []
    seg = pydicom.dcmread(path)
    assert "PatientAge" not in seg and "PatientWeight" not in seg
    assert seg.PatientID == sources[0].PatientID
    assert sources[0]["PatientAge"].value == "45Y"  # the sources as they were
    # the identity is never altered (found in review): an accession number longer than SH allows is copied as it is
    for ds in sources:
        ds.AccessionNumber = "A" * 18
    seg = pydicom.dcmread(_write(written["series"], tmp_path / "seg2.dcm", sources=sources))
    assert seg.AccessionNumber == "A" * 18


def test_a_japanese_source(tmp_path: Path, written: dict) -> None:
    """SpecificCharacterSet \\ISO 2022 IR 87 (the first value empty, as Japanese equipment writes it): highdicom
    refuses it, and the SEG failed; the name goes out in UTF-8, the sources keep their own encoding."""
    sources = as_japanese(written["series"].t1_headers)
    path = _write(written["series"], tmp_path / "seg.dcm", sources=sources)
    assert dciodvfy_errors(path) == []
    seg = pydicom.dcmread(path)
    assert seg.SpecificCharacterSet == "ISO_IR 192" and str(seg.PatientName) == JAPANESE_NAME
    assert all(list(ds.SpecificCharacterSet) == ["", "ISO 2022 IR 87"] for ds in sources)

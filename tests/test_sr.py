from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes

import dicom_node
from dicom_node.writers.seg import write_seg
from dicom_node.writers.sr import (
    ASYMMETRY_INDEX,
    FRACTION_OF_ICV,
    GROUP_QC,
    HIPPOCAMPAL_OCCUPANCY,
    LOCAL_SCHEME,
    QC_CHECK_CODES,
    QC_OVERALL,
    device_uid,
    write_sr,
)
from inference.labels import LOBE_CORTEX_CODES, STRUCTURES, by_code
from inference.volumetry import QC_FAILED_SUFFIX, Norm, QCLimits, compute_volumetry, with_qc_flag
from tests.volumetry_factory import (
    EXPORT_LACKS,
    JAPANESE_NAME,
    MODEL_ID,
    MODEL_VERSION,
    UID_PREFIX,
    as_exported,
    as_japanese,
    dciodvfy_errors,
    make_t1_series,
    with_invalid_identity,
)


def _same(concept, code) -> bool:
    return concept.value == code.value and concept.scheme_designator == code.scheme_designator


def _write_sr(volumetry, build: dict, out: Path, **kwargs) -> Path:
    return write_sr(volumetry, seg=build["seg_written"], source_images=build["series"].t1_headers,
                    input_series_datasets=build["series"].input_headers, out_path=out, series_number=1003,
                    # flagged as the job's SeriesNaming flags it (the writer writes the description it is given)
                    series_description=with_qc_flag("sT1AAH volumetry", volumetry), uid_prefix=UID_PREFIX,
                    algorithm_name=MODEL_ID,
                    algorithm_version=MODEL_VERSION, **kwargs).path


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("sr")
    series = make_t1_series(folder)
    seg_written = write_seg(series.labels, series.t1_headers, out_path=folder / "seg.dcm", series_number=1002,
                         series_description="sT1AAH SEG", algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION,
                         uid_prefix=UID_PREFIX)
    seg_path = seg_written.path
    seg = pydicom.dcmread(seg_path)
    hv = float((sitk.GetArrayFromImage(series.labels) == 17).sum() * np.prod(series.labels.GetSpacing()) / 1000)
    volumetry = compute_volumetry(series.labels, series.t1, age="053Y", sex="F",
                                  norms=[Norm(17, 50, 60, "F", mean_ml=hv - 0.1, sd_ml=0.2)])
    build = {"folder": folder, "series": series, "seg": seg, "seg_written": seg_written, "seg_path": seg_path,
             "volumetry": volumetry}
    build["path"] = _write_sr(volumetry, build, folder / "sr.dcm")
    build["sr"] = hd.sr.srread(build["path"])
    return build


def _seg_volumes_ml(seg: pydicom.Dataset) -> dict[int, float]:
    """Segment number -> voxel count x voxel volume, read from the SEG itself."""
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    voxel_mm3 = (float(measures.PixelSpacing[0]) * float(measures.PixelSpacing[1])
                 * float(measures.get("SpacingBetweenSlices") or measures.SliceThickness))
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    counts: dict[int, int] = {}
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[number] = counts.get(number, 0) + int(pixels[n].sum())
    return {number: count * voxel_mm3 / 1000.0 for number, count in counts.items()}


def test_dciodvfy_reports_no_errors(build: dict) -> None:
    assert dciodvfy_errors(build["path"]) == []


def test_header(build: dict) -> None:
    sr, source = build["sr"], build["series"].t1_headers[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.Manufacturer == dicom_node.MANUFACTURER and sr.ManufacturerModelName == dicom_node.MODEL_NAME
    assert f"dicom-node {dicom_node.__version__}" in list(sr.SoftwareVersions)
    assert sr.SeriesDescription == "sT1AAH volumetry"
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.PatientSex == "F" and sr.PatientAge == "053Y"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == LOCAL_SCHEME


def test_evidence_lists_input_series_t1_and_seg(build: dict) -> None:
    sr, series = build["sr"], build["series"]
    referenced = {item.ReferencedSOPInstanceUID
                  for study in sr.CurrentRequestedProcedureEvidenceSequence
                  for s in study.ReferencedSeriesSequence for item in s.ReferencedSOPSequence}
    expected = {ds.SOPInstanceUID for ds in [*series.t1_headers, *series.input_headers, build["seg"]]}
    assert referenced == expected


def test_observer_is_the_node(build: dict) -> None:
    root = build["sr"].ContentSequence
    items = {get.ConceptNameCodeSequence[0].CodeMeaning: get for get in root
             if get.RelationshipType == "HAS OBS CONTEXT"}
    assert items["Observer Type"].ConceptCodeSequence[0].CodeValue == codes.DCM.Device.value
    assert items["Device Observer UID"].UID == device_uid(UID_PREFIX)
    assert items["Device Observer Name"].TextValue == dicom_node.MODEL_NAME
    assert items["Device Observer Manufacturer"].TextValue == dicom_node.MANUFACTURER
    assert items["Device Observer Model Name"].TextValue == f"{MODEL_ID} {MODEL_VERSION}"
    assert device_uid(UID_PREFIX) == device_uid(UID_PREFIX.rstrip("."))  # stable


def test_volumes_equal_seg_voxel_counts(build: dict) -> None:
    report, seg, volumetry = build["sr"].content, build["seg"], build["volumetry"]
    seg_volumes = _seg_volumes_ml(seg)
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(STRUCTURES)
    seen = set()
    for group in groups:
        reference = group.referenced_segment
        segment_number = int(reference[0].ReferencedSOPSequence[0].ReferencedSegmentNumber)
        assert reference[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        segment = seg.SegmentSequence[segment_number - 1]
        assert segment.TrackingID == group.tracking_identifier  # the group measures the segment it references
        # and tracks it under the same UID (each writer drew its own: no viewer could link them)
        assert segment.TrackingUID == group.tracking_uid
        volume = [m for m in group.get_measurements() if _same(m.name, codes.SCT.Volume)]
        assert len(volume) == 1 and volume[0].unit.value == "ml"
        assert float(volume[0].value) == float(f"{seg_volumes[segment_number]:.7g}")  # (written to 7 digits)
        fraction = [m for m in group.get_measurements() if _same(m.name, FRACTION_OF_ICV)][0]
        assert float(fraction.value) == pytest.approx(100 * seg_volumes[segment_number] / volumetry.icv_ml)
        assert fraction.unit.value == "%"
        seen.add(segment_number)
    assert seen == set(seg_volumes)


def _image_groups(report) -> dict[str, object]:
    return {group.tracking_identifier: group for group in report.get_image_measurement_groups()}


def test_icv_asymmetry_hoc_and_subject(build: dict) -> None:
    volumetry = build["volumetry"]
    groups = _image_groups(build["sr"].content)
    icv = groups["Intracranial volume"].get_measurements()[0]
    assert _same(icv.name, codes.SCT.Volume) and float(icv.value) == pytest.approx(volumetry.icv_ml)
    assert _same(icv.finding_sites[0].value, codes.SCT.IntracranialStructure)
    asymmetry = groups["Asymmetry indices"].get_measurements()
    assert all(_same(m.name, ASYMMETRY_INDEX) for m in asymmetry)
    by_site = {m.finding_sites[0].value.value: float(m.value) for m in asymmetry}
    assert by_site[STRUCTURES[2].concept.value] == pytest.approx(
        next(p.index_percent for p in volumetry.asymmetry if p.left_code == 2))
    hoc = groups["Hippocampal occupancy"].get_measurements()
    assert all(_same(m.name, HIPPOCAMPAL_OCCUPANCY) for m in hoc)
    sides = {m.finding_sites[0].laterality.meaning: float(m.value) for m in hoc}
    assert sides == pytest.approx({"Left": volumetry.hoc["L"], "Right": volumetry.hoc["R"]})
    cortex = groups["Cerebral cortex"].get_measurements()
    by_side = {m.finding_sites[0].laterality.meaning: float(m.value) for m in cortex}
    assert by_side == pytest.approx({"Left": volumetry.cortex_ml["L"], "Right": volumetry.cortex_ml["R"]})
    lobes_left = sum(v.volume_ml for c, v in volumetry.structures.items() if 1201 <= c <= 1206)
    assert volumetry.cortex_ml["L"] == pytest.approx(lobes_left + volumetry.structures[3].volume_ml)
    subject = groups["Subject"]
    assert float(subject.get_measurements(name=codes.DCM.SubjectAge)[0].value) == 53.0
    assert subject.get_qualitative_evaluations(name=codes.DCM.SubjectSex)[0].value.value == codes.DCM.Female.value


def test_norm_scores_recorded(build: dict) -> None:
    groups = {g.tracking_identifier: g for g in build["sr"].content.get_volumetric_roi_measurement_groups()}
    z = groups["Left-Hippocampus"].get_measurements(name=codes.DCM.ZScoreOfMeasurement)
    assert len(z) == 1 and float(z[0].value) == pytest.approx(build["volumetry"].structures[17].norm_score.z)
    assert groups["Left-Hippocampus"].get_measurements(name=codes.DCM.PercentileRankingOfMeasurement)
    assert not groups["Right-Hippocampus"].get_measurements(name=codes.DCM.ZScoreOfMeasurement)


def _qc(sr) -> tuple[str, dict[str, tuple[str, str]]]:
    group = _image_groups(sr.content)[GROUP_QC]
    overall = group.get_qualitative_evaluations(name=QC_OVERALL)[0].value.meaning
    checks = {}
    for name, code in QC_CHECK_CODES.items():
        outcome = group.get_qualitative_evaluations(name=code)[0].value.meaning
        text = find_content_items(group[0], name=code, value_type=hd.sr.ValueTypeValues.TEXT)[0].value
        checks[name] = (outcome, text)
    return overall, checks


def test_qc_passed_is_recorded(build: dict) -> None:
    overall, checks = _qc(build["sr"])
    assert overall == "Succeeded"
    assert {name: outcome for name, (outcome, _) in checks.items()} == {
        "icv_range": "Succeeded", "structures_present": "Succeeded", "intensity_ordering": "Succeeded",
        "asymmetry": "Succeeded", "brain_mask": "Not Attempted", "field_of_view": "Succeeded"}
    assert "within" in checks["icv_range"][1]


def test_qc_failure_is_visible(tmp_path: Path, build: dict) -> None:
    series = build["series"]
    failed = compute_volumetry(series.labels, None, age="053Y", sex="F", limits=QCLimits(icv_min_ml=1500.0))
    path = _write_sr(failed, build, tmp_path / "failed.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    assert sr.SeriesDescription == "sT1AAH volumetry" + QC_FAILED_SUFFIX
    overall, checks = _qc(sr)
    assert overall == "Failed"
    assert checks["icv_range"][0] == "Failed" and "outside 1500-2200 ml" in checks["icv_range"][1]
    assert checks["intensity_ordering"][0] == "Not Attempted"


def test_seg_of_other_labels_is_refused(tmp_path: Path, build: dict) -> None:
    series = build["series"]
    array = sitk.GetArrayFromImage(series.labels)
    array[array == 17] = 2
    fewer = sitk.GetImageFromArray(array)
    fewer.CopyInformation(series.labels)
    seg_written = write_seg(fewer, series.t1_headers, out_path=tmp_path / "seg.dcm", series_number=1002,
                            series_description="SEG", algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION,
                            uid_prefix=UID_PREFIX)
    with pytest.raises(ValueError, match="no segment"):
        write_sr(build["volumetry"], seg=seg_written, source_images=series.t1_headers,
                 input_series_datasets=series.input_headers, out_path=tmp_path / "sr.dcm", series_number=1003,
                 series_description="x", uid_prefix=UID_PREFIX, algorithm_name=MODEL_ID,
                 algorithm_version=MODEL_VERSION)
    assert not (tmp_path / "sr.dcm").exists()


def test_a_source_without_type2_identity_or_with_a_sex_dicom_forbids(tmp_path: Path, build: dict) -> None:
    """The volumes of a real T1 from a research export (no AccessionNumber, StudyID, ...; PatientSex "U")."""
    sources = as_exported(build["series"].t1_headers)
    path = write_sr(build["volumetry"], seg=build["seg_written"], source_images=sources,
                    input_series_datasets=as_exported(build["series"].input_headers), out_path=tmp_path / "sr.dcm",
                    series_number=1003, series_description="rT1 volumes", uid_prefix=UID_PREFIX,
                    algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION).path
    assert dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    assert all(sr[keyword].value in ("", None) for keyword in (*EXPORT_LACKS, "PatientSex"))
    assert sr.PatientID == sources[0].PatientID


def test_patient_values_their_vr_does_not_allow_are_left_out(tmp_path: Path, build: dict) -> None:
    """Found in review: a source's PatientAge "45Y" went into the SR as it was (dciodvfy: value invalid for AS)."""
    path = write_sr(build["volumetry"], seg=build["seg_written"],
                    source_images=with_invalid_identity(build["series"].t1_headers),
                    input_series_datasets=with_invalid_identity(build["series"].input_headers),
                    out_path=tmp_path / "sr.dcm", series_number=1003, series_description="rT1 volumes",
                    uid_prefix=UID_PREFIX, algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION).path
    assert dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    assert "PatientAge" not in sr and "PatientWeight" not in sr


def test_numbers_are_written_as_a_reader_should_see_them(build: dict) -> None:
    """Found in review: the SR held values such as "231.829587000000" ml and a z-score "0.50000000000000" (stored
    0.4999999999999999), which PACS viewers show as they are. Seven significant digits (a 1 mm voxel is 0.001 ml)."""
    values = [str(item.MeasuredValueSequence[0].NumericValue) for item in pydicom.dcmread(build["path"]).iterall()
              if item.keyword == "ContentSequence" for item in item.value if "MeasuredValueSequence" in item]
    assert values and all(len(v.lstrip("-").replace(".", "").lstrip("0")) <= 7 for v in values), values
    z = [float(item.MeasuredValueSequence[0].NumericValue) for item in pydicom.dcmread(build["path"]).iterall()
         if item.keyword == "ContentSequence" for item in item.value
         if "MeasuredValueSequence" in item and item.ConceptNameCodeSequence[0].CodeValue == "121416"]
    assert z == [pytest.approx(build["volumetry"].structures[17].norm_score.z, abs=1e-6)]


def test_a_cortex_without_lobes_is_reported_once(tmp_path: Path, build: dict) -> None:
    """Found in review: with labels of the whole cortex only (aseg 3/42, what the shipped synthesis model's own
    labels have), the SR held the left cortex twice: its structure group and a "Cerebral cortex" group of the lobes
    summed (no lobes: the same volume), two tracking UIDs for one number. The summed group is for lobes."""
    array = sitk.GetArrayFromImage(build["series"].labels)
    for side, whole in (("L", 3), ("R", 42)):
        lobes = range(1201, 1207) if side == "L" else range(2201, 2207)
        array[np.isin(array, list(lobes))] = whole
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(build["series"].labels)
    volumetry = compute_volumetry(labels, build["series"].t1, age="053Y", sex="F")
    path = write_sr(volumetry, seg=build["seg_written"], source_images=build["series"].t1_headers,
                    input_series_datasets=build["series"].input_headers, out_path=tmp_path / "sr.dcm",
                    series_number=1003, series_description="rT1 volumes", uid_prefix=UID_PREFIX,
                    algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION).path
    report = hd.sr.srread(path).content
    assert "Cerebral cortex" not in _image_groups(report)
    structures = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    left = structures[by_code(3).freesurfer_name].get_measurements()
    assert float(left[0].value) == pytest.approx(volumetry.structures[3].volume_ml)


def test_a_japanese_source(tmp_path: Path, build: dict) -> None:
    """SpecificCharacterSet \\ISO 2022 IR 87 (highdicom refuses it as it is): the SR goes out, its name in UTF-8."""
    path = write_sr(build["volumetry"], seg=build["seg_written"], source_images=as_japanese(build["series"].t1_headers),
                    input_series_datasets=as_japanese(build["series"].input_headers), out_path=tmp_path / "sr.dcm",
                    series_number=1003, series_description="rT1 volumes", uid_prefix=UID_PREFIX,
                    algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION).path
    assert dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    assert sr.SpecificCharacterSet == "ISO_IR 192" and str(sr.PatientName) == JAPANESE_NAME


def test_the_cortex_of_a_lobe_is_coded_as_cortex_not_as_the_lobe(build: dict) -> None:
    """"Frontal lobe, Left: 41 ml" reads as severe atrophy (a lobe, white matter included, is far larger): the
    group of a lobe's cortex says cerebral cortex, with the lobe as the finding site's topographical modifier."""
    groups = {g.tracking_identifier: g for g in build["sr"].content.get_volumetric_roi_measurement_groups()}
    lobes = [code for code in LOBE_CORTEX_CODES if by_code(code).freesurfer_name in groups]
    assert len(lobes) == 12
    for code in lobes:
        group, lobe = groups[by_code(code).freesurfer_name], by_code(code).concept
        site = group.finding_sites[0]
        assert _same(group.finding_type, codes.SCT.CerebralCortex)
        assert _same(site.value, codes.SCT.CerebralCortex) and _same(site.topographical_modifier, lobe)
        assert site.laterality is not None
    assert dciodvfy_errors(build["path"]) == []

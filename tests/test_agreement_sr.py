from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes

import dicom_node
from dicom_node.writers.agreement_sr import (
    ASPC,
    BRAIN_COVERAGE,
    DICE,
    GROUP_IMAGE,
    GROUP_REGISTRATION,
    PSNR,
    PSNR_INFINITE,
    REGISTRATION,
    ROTATION,
    SSIM,
    TRANSLATION,
    write_agreement_sr,
)
from dicom_node.writers.derived_mr import Derivation, write_derived_mr
from dicom_node.writers.seg import write_seg
from dicom_node.writers.sr import LOCAL_SCHEME, device_uid
from dicom_node.writers.tid1500 import finding_type
from inference.agreement import compare
from inference.labels import LOBE_CORTEX_CODES, by_code
from tests.volumetry_factory import MODEL_ID, MODEL_VERSION, UID_PREFIX, dciodvfy_errors, make_t1_series


def _same(concept, code) -> bool:
    return concept.value == code.value and concept.scheme_designator == code.scheme_designator


def _write(agreement, build: dict, out: Path) -> Path:
    return write_agreement_sr(
        agreement, real_t1_images=build["real_headers"], synthetic_t1_images=build["series"].t1_headers,
        real_seg=build["real_seg"], synthetic_seg=build["synthetic_seg"], out_path=out, series_number=1004,
        series_description="sT1AAH agreement", uid_prefix=UID_PREFIX, algorithm_name=MODEL_ID,
        algorithm_version=MODEL_VERSION).path


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A "real" T1 series and a synthetic sT1 series of the same study (one phantom), each with its SEG;
    the synthetic labels lack one slice of the left hippocampus."""
    folder = tmp_path_factory.mktemp("agreement_sr")
    series = make_t1_series(folder)
    real_paths = write_derived_mr(series.t1, series.input_headers, out_dir=folder / "real", series_description="T1 3D",
                                  series_number=5, uid_prefix=UID_PREFIX,
                                  derivation=Derivation("real-stand-in", "1", "stand-in for a real 3D T1")).paths
    real_headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in real_paths]
    array = sitk.GetArrayFromImage(series.labels)
    k = np.nonzero(np.any(array == 17, axis=(1, 2)))[0][-1]
    array[k][array[k] == 17] = 2
    synthetic_labels = sitk.GetImageFromArray(array)
    synthetic_labels.CopyInformation(series.labels)
    segs = {}
    for side, labels, headers in (("real", series.labels, real_headers),
                                  ("synthetic", synthetic_labels, series.t1_headers)):
        path = write_seg(labels, headers, out_path=folder / f"{side}_seg.dcm", series_number=1002,
                         series_description=f"{side} SEG", algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION,
                         uid_prefix=UID_PREFIX).path
        segs[side] = pydicom.dcmread(path, stop_before_pixels=True)
    agreement = compare(series.t1, series.labels, series.t1, synthetic_labels)
    build = {"folder": folder, "series": series, "real_headers": real_headers, "real_seg": segs["real"],
             "synthetic_seg": segs["synthetic"], "agreement": agreement}
    build["path"] = _write(agreement, build, folder / "agreement.dcm")
    build["sr"] = hd.sr.srread(build["path"])
    return build


def _group(sr: hd.sr.Comprehensive3DSR, identifier: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    matches = [g for g in _groups(sr) if g.tracking_identifier == identifier]
    assert len(matches) == 1, identifier
    return matches[0]


def _groups(sr: hd.sr.Comprehensive3DSR) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    measurements = find_content_items(sr, name=codes.DCM.ImagingMeasurements)[0]
    return [hd.sr.MeasurementsAndQualitativeEvaluations.from_sequence([item])
            for item in measurements.ContentSequence
            if _same(item.ConceptNameCodeSequence[0], codes.DCM.MeasurementGroup)]


def _value(group, name) -> float:
    found = group.get_measurements(name=name)
    assert len(found) == 1, name
    return found[0].value


def _texts(group, name) -> list[str]:
    return [item.TextValue for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and _same(item.ConceptNameCodeSequence[0], name)]


def test_dciodvfy_reports_no_errors(build: dict) -> None:
    assert dciodvfy_errors(build["path"]) == []


def test_header_and_evidence(build: dict) -> None:
    sr, real = build["sr"], build["real_headers"][0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == real.StudyInstanceUID
    assert sr.Manufacturer == dicom_node.MANUFACTURER and sr.ManufacturerModelName == dicom_node.MODEL_NAME
    assert sr.SeriesDescription == "sT1AAH agreement" and sr.SeriesNumber == 1004
    assert sr.PatientAge == "053Y"
    referenced = {item.ReferencedSOPInstanceUID
                  for study in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    expected = {ds.SOPInstanceUID for ds in build["real_headers"] + build["series"].t1_headers}
    expected |= {build["real_seg"].SOPInstanceUID, build["synthetic_seg"].SOPInstanceUID}
    assert referenced == expected
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == [LOCAL_SCHEME]
    observer = find_content_items(sr, name=codes.DCM.DeviceObserverUID)
    assert [item.UID for item in observer] == [device_uid(UID_PREFIX)]


def test_image_agreement_round_trips(build: dict) -> None:
    agreement, group = build["agreement"], _group(build["sr"], GROUP_IMAGE)
    assert agreement.psnr == math.inf  # the T1 images are identical here
    assert group.get_measurements(name=PSNR) == []
    assert _texts(group, PSNR) == [PSNR_INFINITE]
    assert _value(group, SSIM) == pytest.approx(agreement.ssim)
    assert _value(group, BRAIN_COVERAGE) == pytest.approx(100.0)
    assert _value(group, DICE) == pytest.approx(agreement.mean_dice)
    assert _value(group, ASPC) == pytest.approx(agreement.mean_aspc)
    dice = group.get_measurements(name=DICE)[0]
    assert _same(dice.derivation, codes.SCT.Mean)
    assert _same(dice.unit, codes.UCUM.NoUnits)


def test_finite_psnr_round_trips(build: dict) -> None:
    agreement = dataclasses.replace(build["agreement"], psnr=31.25, ssim=0.875)
    path = _write(agreement, build, build["folder"] / "finite.dcm")
    assert dciodvfy_errors(path) == []
    group = _group(hd.sr.srread(path), GROUP_IMAGE)
    assert _value(group, PSNR) == pytest.approx(31.25)
    assert _same(group.get_measurements(name=PSNR)[0].unit, codes.UCUM.Decibel)
    assert _texts(group, PSNR) == []
    assert _value(group, SSIM) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="PSNR"):
        _write(dataclasses.replace(agreement, psnr=math.nan), build, build["folder"] / "nan.dcm")


def test_registration_round_trips(build: dict) -> None:
    agreement = dataclasses.replace(build["agreement"], translation_mm=(1.5, -2.25, 0.5),
                                    rotation_deg=(3.0, -1.0, 0.25))
    path = _write(agreement, build, build["folder"] / "registration.dcm")
    group = _group(hd.sr.srread(path), GROUP_REGISTRATION)
    assert [_value(group, code) for code in TRANSLATION] == pytest.approx([1.5, -2.25, 0.5])
    assert [_value(group, code) for code in ROTATION] == pytest.approx([3.0, -1.0, 0.25])
    assert _same(group.get_measurements(name=TRANSLATION[0])[0].unit, codes.UCUM.Millimeter)
    assert _same(group.get_measurements(name=ROTATION[0])[0].unit, codes.UCUM.Degree)
    text = find_content_items(hd.sr.srread(path), name=REGISTRATION, recursive=True)
    assert len(text) == 1 and "Mattes" in text[0].TextValue


def test_structures_round_trip(build: dict) -> None:
    agreement, groups = build["agreement"], _groups(build["sr"])
    by_identifier = {group.tracking_identifier: group for group in groups}
    assert len(by_identifier) == len(groups) == 2 + agreement.n_structures
    assert agreement.aspc[17] > 0 and agreement.dice[17] < 1
    for code, entry in agreement.structures.items():
        structure = by_code(code)
        group = by_identifier[structure.freesurfer_name]
        assert _same(group.finding_type, finding_type(code))
        site = group.finding_sites[0]
        if code in LOBE_CORTEX_CODES:  # the cortex of a lobe: cerebral cortex, the lobe its topographical modifier
            assert _same(site.value, codes.SCT.CerebralCortex) and _same(site.topographical_modifier,
                                                                        structure.concept)
        else:
            assert _same(site.value, structure.concept)
        assert _value(group, DICE) == pytest.approx(entry.dice)
        assert _value(group, ASPC) == pytest.approx(entry.aspc)


def test_report_reads_the_agreement_sr(build: dict) -> None:
    """``dicom-node report`` prints what the agreement SR holds: the image agreement, the registration and Dice and
    ASPC per structure (the left hippocampus, one slice short in the synthetic labels, below 1)."""
    from dicom_node.report import format_report

    agreement = build["agreement"]
    text = format_report(build["path"])
    assert text.startswith("sT1AAH agreement  (series 1004,")
    assert f"SSIM {agreement.ssim:.3f}" in text
    assert f"mean Dice {agreement.mean_dice:.3f}" in text and f"mean ASPC {agreement.mean_aspc:.1f} %" in text
    assert "Registration: translation " in text and "Mattes mutual information" in text
    rows = {line[:34].strip(): line[34:].split() for line in text.splitlines()[8:] if line[:1].isalpha()}
    left = rows["Left hippocampus"]
    assert float(left[0]) == pytest.approx(agreement.structures[17].dice, abs=1e-3) and float(left[0]) < 1
    assert float(left[1]) > 0
    assert float(rows["Right hippocampus"][0]) == 1.0

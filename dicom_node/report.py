"""Readable text of a volumetry SR (``dicom_node.writers.sr``) or an agreement SR
(``dicom_node.writers.agreement_sr``): ``dicom-node report FILE``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes

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
)
from dicom_node.writers.sr import (
    ASYMMETRY_INDEX,
    FRACTION_OF_ICV,
    GROUP_CORTEX,
    GROUP_QC,
    HIPPOCAMPAL_OCCUPANCY,
    QC_CHECK_CODES,
    QC_OVERALL,
)
from inference.labels import STRUCTURES
from inference.volumetry import format_age

__all__ = ["ReportError", "format_report"]

_BY_FS_NAME = {s.freesurfer_name: s for s in STRUCTURES.values()}
_OUTCOME = {"111222": "PASS", "111224": "FAIL", "111225": "n/a"}


class ReportError(ValueError):
    """The file is not a volumetry measurement report."""


@dataclass
class _Row:
    name: str
    concept: str
    volume_ml: float | None = None
    icv_percent: float | None = None
    z: float | None = None
    percentile: float | None = None


@dataclass
class _Report:
    rows: list[_Row] = field(default_factory=list)
    icv_ml: float | None = None
    asymmetry: dict[str, float] = field(default_factory=dict)     # structure concept value -> AI %
    hoc: dict[str, float] = field(default_factory=dict)           # 'L'/'R' -> ratio
    cortex_ml: dict[str, float] = field(default_factory=dict)     # 'L'/'R' -> the whole cortex (lobes summed)
    age: float | None = None
    sex: str | None = None
    qc_overall: str | None = None
    qc: list[tuple[str, str, str]] = field(default_factory=list)   # (outcome, check, reason)


def _same(concept: object, code: object) -> bool:
    return (getattr(concept, "value", None) == getattr(code, "value", None)
            and getattr(concept, "scheme_designator", None) == getattr(code, "scheme_designator", None))


def _site_key(site: object) -> str:
    """A finding site as the table keys it: its concept, and its topographical modifier (a lobe of the cortex)."""
    modifier = getattr(site, "topographical_modifier", None)
    value = getattr(getattr(site, "value", None), "value", "")
    return f"{value}/{modifier.value}" if modifier is not None else value


def _side(site: object) -> str:
    laterality = getattr(site, "laterality", None)
    return {"7771000": "L", "24028007": "R"}.get(getattr(laterality, "value", ""), "")


def _row(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> _Row:
    identifier = group.tracking_identifier or ""
    structure = _BY_FS_NAME.get(identifier)
    finding = group.finding_type
    if structure is not None:
        name = structure.display_name
    else:
        side = _side(group.finding_sites[0]) if group.finding_sites else ""
        name = f"{side} {finding.meaning if finding else identifier}".strip()
    # keyed by its finding site (a lobe's cortex: cerebral cortex with the lobe as modifier; its finding type is
    # cerebral cortex for every lobe), as its asymmetry is
    row = _Row(name=name, concept=_site_key(group.finding_sites[0]) if group.finding_sites else "")
    for measurement in group.get_measurements():
        if _same(measurement.name, codes.SCT.Volume):
            row.volume_ml = float(measurement.value)
        elif _same(measurement.name, FRACTION_OF_ICV):
            row.icv_percent = float(measurement.value)
        elif _same(measurement.name, codes.DCM.ZScoreOfMeasurement):
            row.z = float(measurement.value)
        elif _same(measurement.name, codes.DCM.PercentileRankingOfMeasurement):
            row.percentile = float(measurement.value)
    return row


def _read_groups(report: hd.sr.MeasurementReport, out: _Report) -> None:
    for group in report.get_image_measurement_groups():
        for measurement in group.get_measurements():
            site = measurement.finding_sites[0] if measurement.finding_sites else None
            if _same(measurement.name, codes.SCT.Volume) and site is not None and _same(
                    site.value, codes.SCT.IntracranialStructure):
                out.icv_ml = float(measurement.value)
            elif _same(measurement.name, ASYMMETRY_INDEX) and site is not None:
                out.asymmetry[_site_key(site)] = float(measurement.value)
            elif group.tracking_identifier == GROUP_CORTEX and _same(measurement.name, codes.SCT.Volume):
                out.cortex_ml[_side(site)] = float(measurement.value)
            elif _same(measurement.name, HIPPOCAMPAL_OCCUPANCY) and site is not None:
                out.hoc[_side(site)] = float(measurement.value)
            elif _same(measurement.name, codes.DCM.SubjectAge):
                out.age = float(measurement.value)
        for evaluation in group.get_qualitative_evaluations():
            if _same(evaluation.name, codes.DCM.SubjectSex):
                out.sex = evaluation.value.meaning
            elif _same(evaluation.name, QC_OVERALL):
                out.qc_overall = _OUTCOME.get(evaluation.value.value, evaluation.value.meaning)
        if group.tracking_identifier == GROUP_QC:
            for check in QC_CHECK_CODES.values():
                outcome = [e for e in group.get_qualitative_evaluations() if _same(e.name, check)]
                if not outcome:
                    continue
                texts = find_content_items(group[0], name=check, value_type=hd.sr.ValueTypeValues.TEXT)
                out.qc.append((_OUTCOME.get(outcome[0].value.value, outcome[0].value.meaning), check.meaning,
                               texts[0].value if texts else ""))


def _number(value: float | None, fmt: str) -> str:
    return "" if value is None or not math.isfinite(value) else format(value, fmt)


def _measured(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: object) -> float | None:
    for measurement in group.get_measurements():
        if _same(measurement.name, name):
            return float(measurement.value)
    return None


def _format_agreement(sr: hd.sr.Comprehensive3DSR, report: hd.sr.MeasurementReport) -> str | None:
    """The text of an agreement SR (None when ``report`` is not one)."""
    groups = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    image = groups.get(GROUP_IMAGE)
    if image is None:
        return None
    psnr = _measured(image, PSNR)
    if psnr is None and find_content_items(image[0], name=PSNR, value_type=hd.sr.ValueTypeValues.TEXT):
        psnr_text = PSNR_INFINITE
    else:
        psnr_text = f"{_number(psnr, '.2f') or '?'} dB"
    lines = [
        f"{sr.get('SeriesDescription', '')}  (series {sr.get('SeriesNumber', '')}, {sr.SOPInstanceUID})",
        f"Patient {sr.get('PatientName', '')}  ID {sr.get('PatientID', '')}  study date {sr.get('StudyDate', '')}",
        "Agreement of the synthetic T1 with the real T1 (within the brain):",
        f"  PSNR {psnr_text}   SSIM {_number(_measured(image, SSIM), '.3f') or '?'}   "
        f"brain inside the synthetic field of view {_number(_measured(image, BRAIN_COVERAGE), '.1f') or '?'} %",
        f"  mean Dice {_number(_measured(image, DICE), '.3f') or 'n/a'}   "
        f"mean ASPC {_number(_measured(image, ASPC), '.1f') or 'n/a'} %",
    ]
    registration = groups.get(GROUP_REGISTRATION)
    if registration is not None:
        moves = [_measured(registration, code) for code in (*TRANSLATION, *ROTATION)]
        lines.append("Registration: translation " + " ".join(_number(v, '+.2f') or '?' for v in moves[:3])
                     + " mm, rotation " + " ".join(_number(v, '+.2f') or '?' for v in moves[3:]) + " degrees")
        texts = find_content_items(registration[0], name=REGISTRATION, value_type=hd.sr.ValueTypeValues.TEXT)
        if texts:
            lines.append(f"  {texts[0].value}")
    structures = [(name, g) for name, g in groups.items() if name in _BY_FS_NAME]
    if structures:
        header = f"{'Structure':<34}{'Dice':>8}{'ASPC %':>9}"
        lines += ["", header, "-" * len(header)]
        for name, group in structures:
            lines.append(f"{_BY_FS_NAME[name].display_name:<34}{_number(_measured(group, DICE), '.3f'):>8}"
                         f"{_number(_measured(group, ASPC), '.1f'):>9}")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def format_report(path: Path) -> str:
    """A text table of the SR at ``path``. A volumetry SR: structures (volume ml, % ICV, asymmetry, normative
    z-score and percentile where present), ICV, hippocampal occupancy, subject and quality control. An agreement
    SR: PSNR, SSIM, coverage, mean Dice and ASPC, the registration, and Dice and ASPC per structure."""
    try:
        sr = hd.sr.srread(path)
    except Exception as exc:  # highdicom raises several types for non-SR input
        raise ReportError(f"{path}: not a structured report ({type(exc).__name__}: {exc})") from exc
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ReportError(f"{path}: not a TID 1500 measurement report")
    agreement = _format_agreement(sr, report)
    if agreement is not None:
        return agreement
    out = _Report(rows=[_row(group) for group in report.get_volumetric_roi_measurement_groups()])
    _read_groups(report, out)
    if not out.rows and out.icv_ml is None:
        raise ReportError(f"{path}: the report holds no volumetry")

    lines = [
        f"{sr.get('SeriesDescription', '')}  (series {sr.get('SeriesNumber', '')}, {sr.SOPInstanceUID})",
        f"Patient {sr.get('PatientName', '')}  ID {sr.get('PatientID', '')}  "
        f"age {format_age(out.age)}  sex {out.sex or '?'}  study date {sr.get('StudyDate', '')}",
        f"Quality control: {out.qc_overall or '?'}",
        f"Intracranial volume: {_number(out.icv_ml, '.1f')} ml",
        "",
    ]
    with_norms = any(row.z is not None for row in out.rows)
    header = f"{'Structure':<34}{'Volume ml':>10}{'% ICV':>8}{'Asym %':>8}"
    if with_norms:
        header += f"{'z':>7}{'pct':>6}"
    lines += [header, "-" * len(header)]
    for row in out.rows:
        paired = row.name.startswith(("Left ", "Right "))  # asymmetry undefined (a side absent): n/a
        asymmetry = _number(out.asymmetry.get(row.concept), '+.1f') or ("n/a" if paired else "")
        line = (f"{row.name:<34}{_number(row.volume_ml, '.2f'):>10}{_number(row.icv_percent, '.2f'):>8}"
                f"{asymmetry:>8}")
        if with_norms:
            line += f"{_number(row.z, '+.2f'):>7}{_number(row.percentile, '.0f'):>6}"
        lines.append(line)
    if out.cortex_ml and not any(row.concept == codes.SCT.CerebralCortex.value for row in out.rows):
        lines += ["", "Cerebral cortex (its lobes summed): " + "  ".join(
            f"{side} {out.cortex_ml[side]:.2f} ml" for side in ("L", "R") if side in out.cortex_ml)]
    if out.hoc or any("hippocampus" in row.name.lower() for row in out.rows):
        lines += ["", "Hippocampal occupancy: " + "  ".join(
            f"{side} {out.hoc[side]:.3f}" if side in out.hoc else f"{side} n/a" for side in ("L", "R"))]
    if out.qc:
        lines += ["", "Quality control checks:"]
        lines += [f"  {outcome:<5}{check}: {reason}" for outcome, check, reason in out.qc]
    return "\n".join(line.rstrip() for line in lines) + "\n"

"""Brain volumetry from a FreeSurfer-coded label volume: volumes, indices, normative scores and QC.

Definitions:

* volume of a structure (ml) = voxel count x voxel volume (product of the spacing, mm^3) / 1000;
* intracranial volume (ICV): given by the segmenter (``inference.segmentation.intracranial_mask``: the brain
  mask closed over sulci, holes filled, grown by the CSF layer); without it, every voxel with a non-zero code
  below 100, i.e. FreeSurfer's aseg range (brain structures, ventricles, CSF 24, vessels, lesions, optic chiasm;
  SynthSeg's extra-cerebral classes 136/137/163/164/5xx are outside);
* cerebral cortex per side = the aseg cortex code plus the lobes' cortex (``inference.labels.CORTEX``);
* fraction of ICV (%) = 100 x volume / ICV;
* asymmetry index of a left/right pair (%) = 200 x (L - R) / (L + R), defined when both sides are present
  (otherwise "n/a": an absent structure is a segmentation failure, not an asymmetry);
* hippocampal occupancy (HOC) per side = HV / (HV + inferior lateral ventricle volume), defined when the
  hippocampus is present (otherwise "n/a");
* normative score: z = (volume - mean) / SD of the matching (structure, age band, sex) entry, percentile =
  100 x Phi(z) under a normal model. No normative table ships with the project.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import SimpleITK as sitk

if TYPE_CHECKING:
    from inference.models import SegmentationOutputSpec

from inference.labels import CORTEX, LR_SWAP, STRUCTURES, Structure, by_code, code_counts, label_codes, region_codes

__all__ = [
    "Asymmetry",
    "ICV_CODE_LIMIT",
    "Norm",
    "NormScore",
    "QCCheck",
    "ASYMMETRY_BOUND_PERCENT",
    "ASYMMETRY_MIN_ML",
    "FOV_EDGE_MAX_CM2",
    "OPTIONAL_STRUCTURES",
    "OUTSIDE_BRAIN_MAX_ML",
    "QCLimits",
    "expected_structures",
    "required_structures",
    "icv_limits",
    "QC_FAILED_SUFFIX",
    "StructureVolume",
    "Volumetry",
    "compute_volumetry",
    "parse_age",
    "format_age",
    "with_qc_flag",
    "without_codes",
]

#: Codes below this (and above 0) are intracranial (FreeSurfer aseg range), and so is every measured structure.
ICV_CODE_LIMIT = 100
#: Appended to the SeriesDescription of every object of a volumetry whose QC failed.
QC_FAILED_SUFFIX = " QC FAILED"

HIPPOCAMPUS = {"L": 17, "R": 53}
INFERIOR_LATERAL_VENTRICLE = {"L": 5, "R": 44}
WHITE_MATTER = (2, 41)
LATERAL_VENTRICLES = (4, 43)

Sex = Literal["M", "F", "O"]


#: Structures that may be empty in a healthy head: the inferior horn of the lateral ventricle (collapsed in the
#: young) and the CSF label (aparc+aseg's small, variable extra-ventricular CSF).
OPTIONAL_STRUCTURES = frozenset({5, 44, 24})
#: QC fails when a paired structure of at least ASYMMETRY_MIN_ML on its larger side differs between sides by more
#: than this
#: (healthy adults: hippocampus, thalamus, caudate, putamen and lobes within about 10 %; FreeSurfer's test-retest
#: asymmetry is below 5 %). Smaller structures are too noisy to judge.
ASYMMETRY_BOUND_PERCENT = 30.0
ASYMMETRY_MIN_ML = 1.0
#: QC fails when the brain labels on one face of the image (its outermost layer of voxels) cover more than this
#: area: the brain reaches the edge of the field of view, and part of it may lie outside (a 2D slab that does not
#: cover the head, a FOV that cuts the vertex or the frontal pole). The brainstem (it runs on into the cord) and the
#: CSF label are not counted. Measured on the shared real heads: 0-0.1 cm² where the head is covered (3D MPRAGE,
#: 2D T1 HFS), 80-108 cm² where the 2D T1's sagittal slab cuts a hemisphere (HFDL).
FOV_EDGE_MAX_CM2 = 20.0
#: QC fails when more labelled volume than this lay apart from the brain (removed by the segmenter)
OUTSIDE_BRAIN_MAX_ML = 10.0

#: (age in years, ICV low ml, ICV high ml): plausible intracranial volume by age, from published growth curves
#: (about 400-500 ml at birth, 75 % of the adult volume at 1 year, 85-90 % at 2-3, adult by adolescence; adult
#: 1,100-1,900 ml), each widened by about 20 %; interpolated linearly between ages
ICV_BY_AGE: tuple[tuple[float, float, float], ...] = (
    (0.0, 250.0, 750.0),
    (1.0, 600.0, 1250.0),
    (2.0, 750.0, 1450.0),
    (3.0, 800.0, 1550.0),
    (6.0, 850.0, 1800.0),
    (12.0, 900.0, 2100.0),
    (18.0, 1000.0, 2200.0),
)


@dataclass(frozen=True)
class QCLimits:
    """Plausibility limits of the quality control."""

    icv_min_ml: float = 1000.0
    icv_max_ml: float = 2200.0
    basis: str = "adult"


def expected_structures(segmenter_codes: Collection[int]) -> set[int]:
    """The structures QC requires from a segmenter whose classes have these (aparc+aseg) codes: every measured
    structure it can label, except those a healthy head may lack (OPTIONAL_STRUCTURES)."""
    return ({int(c) for c in region_codes(np.asarray(list(segmenter_codes))).tolist()} & set(STRUCTURES)) \
        - OPTIONAL_STRUCTURES


def required_structures(segmentation: SegmentationOutputSpec) -> set[int]:
    """:func:`expected_structures` of a model's segmentation output: of the classes it produces, not those its
    manifest says it was measured never to label (``unlabelled``)."""
    return expected_structures(segmentation.produced_labels)


def icv_limits(age_years: float | None) -> QCLimits:
    """ICV range for an age (the adult range when the age is unknown or 18 and over)."""
    if age_years is None or age_years >= ICV_BY_AGE[-1][0]:
        return QCLimits()
    ages = [a for a, _, _ in ICV_BY_AGE]
    low = float(np.interp(age_years, ages, [lo for _, lo, _ in ICV_BY_AGE]))
    high = float(np.interp(age_years, ages, [hi for _, _, hi in ICV_BY_AGE]))
    return QCLimits(icv_min_ml=low, icv_max_ml=high, basis=f"age {age_years:.1f} y")


@dataclass(frozen=True)
class QCCheck:
    """One plausibility check: ``passed`` is None when it could not be evaluated."""

    name: Literal["icv_range", "structures_present", "intensity_ordering", "brain_mask", "asymmetry"]
    passed: bool | None
    reason: str


@dataclass(frozen=True)
class Norm:
    """One row of a normative table: volume (ml) of a structure in an age band [age_min, age_max) years.

    ``sex`` None applies to both sexes.
    """

    code: int
    age_min: float
    age_max: float
    sex: Sex | None
    mean_ml: float
    sd_ml: float

    def matches(self, code: int, age: float | None, sex: str | None) -> bool:
        if self.code != code or age is None or not self.age_min <= age < self.age_max:
            return False
        return self.sex is None or self.sex == sex


@dataclass(frozen=True)
class NormScore:
    z: float
    percentile: float
    norm: Norm


@dataclass(frozen=True)
class StructureVolume:
    code: int
    voxels: int
    volume_ml: float
    icv_percent: float
    norm_score: NormScore | None = None

    @property
    def structure(self) -> Structure:
        return by_code(self.code)


@dataclass(frozen=True)
class Asymmetry:
    """Left/right asymmetry of a paired structure; positive: left larger."""

    left_code: int
    right_code: int
    left_ml: float
    right_ml: float
    index_percent: float

    @property
    def name(self) -> str:
        """Display name without the side, e.g. 'hippocampus'."""
        return by_code(self.left_code).display_name.removeprefix("Left ")


@dataclass(frozen=True)
class Volumetry:
    """Everything measured on one label volume."""

    voxel_volume_mm3: float
    icv_voxels: int
    icv_ml: float
    structures: dict[int, StructureVolume]   # measured structures present in the labels, by code
    asymmetry: tuple[Asymmetry, ...]
    hoc: dict[str, float]                    # 'L'/'R' -> HOC (0..1), sides where the hippocampus is present
    qc: tuple[QCCheck, ...]
    age_years: float | None
    sex: Sex | None
    norms_used: bool = field(default=False)
    cortex_ml: dict[str, float] = field(default_factory=dict)  # 'L'/'R' -> cerebral cortex (aseg code + lobes)
    icv_source: str = "labels"               # "labels" (aseg codes) or the segmenter's intracranial mask

    @property
    def qc_passed(self) -> bool:
        """False if any evaluated check failed."""
        return all(check.passed is not False for check in self.qc)


def parse_age(value: str | float | int | None) -> float | None:
    """Age in years from a number or a DICOM AS string ('053Y', '006M', '012W', '003D'); None if unknown."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) and value >= 0 else None
    match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY])\s*", str(value).upper())
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2)
    return number / {"D": 365.25, "W": 365.25 / 7, "M": 12.0, "Y": 1.0}[unit]


def _parse_sex(value: str | None) -> Sex | None:
    text = (value or "").strip().upper()
    return text if text in ("M", "F", "O") else None  # type: ignore[return-value]


def format_age(years: float | None) -> str:
    """An age as a reader expects it: whole years from 2 years on ("53 y"), months below ("6 mo", "< 1 mo"); "?"
    when unknown. Completed units, as ages are counted (not rounded: 0.5 years read "0 y", 11 months "1 y")."""
    if years is None or not math.isfinite(years):
        return "?"
    if years >= 2.0:
        return f"{math.floor(years)} y"
    months = math.floor(years * 12.0 + 1e-9)
    return f"{months} mo" if months >= 1 else "< 1 mo"


def without_codes(labels: sitk.Image, codes: Collection[int]) -> sitk.Image:
    """``labels`` with ``codes`` made background (same grid and pixel type)."""
    array = sitk.GetArrayFromImage(labels)
    array[np.isin(array, list(codes))] = 0
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(labels)
    return image


def with_qc_flag(series_description: str, volumetry: Volumetry, *, max_length: int = 64) -> str:
    """``series_description`` with ' QC FAILED' appended when QC failed (shortened to fit ``max_length``).

    A description that already ends with the flag is not flagged twice.
    """
    if volumetry.qc_passed or series_description.endswith(QC_FAILED_SUFFIX):
        return series_description[:max_length]
    return series_description[: max_length - len(QC_FAILED_SUFFIX)] + QC_FAILED_SUFFIX


def _voxel_volume_mm3(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing()))


def _same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def _norm_score(code: int, volume_ml: float, age: float | None, sex: str | None,
                norms: Sequence[Norm]) -> NormScore | None:
    """The score against the most specific matching row: one for the patient's sex before one for either sex,
    then the narrower age band (whatever the table's order)."""
    for norm in sorted(norms, key=lambda n: (n.sex is None, n.age_max - n.age_min)):
        if norm.matches(code, age, sex) and norm.sd_ml > 0:
            z = (volume_ml - norm.mean_ml) / norm.sd_ml
            percentile = 50.0 * (1.0 + math.erf(z / math.sqrt(2.0)))
            return NormScore(z=z, percentile=percentile, norm=norm)
    return None


def _check_icv(icv_ml: float, limits: QCLimits) -> QCCheck:
    ok = limits.icv_min_ml <= icv_ml <= limits.icv_max_ml
    relation = "within" if ok else "outside"
    return QCCheck("icv_range", ok, f"ICV {icv_ml:.0f} ml {relation} {limits.icv_min_ml:.0f}-"
                                    f"{limits.icv_max_ml:.0f} ml ({limits.basis})")


def _check_outside(outside_ml: float | None) -> QCCheck:
    if outside_ml is None:
        return QCCheck("brain_mask", None, "not evaluated: no brain mask")
    ok = outside_ml <= OUTSIDE_BRAIN_MAX_ML
    return QCCheck("brain_mask", ok, f"{outside_ml:.1f} ml of labels apart from the brain "
                                     f"({'at most' if ok else 'more than'} {OUTSIDE_BRAIN_MAX_ML:.0f} ml)")


def _check_asymmetry(pairs: Sequence[Asymmetry]) -> QCCheck:
    # the larger side decides whether a pair is big enough to judge: a side that collapsed (the segmenter missed
    # most of it) is the worst asymmetry, not one too small to judge. Not for the structures that may be empty in
    # a healthy head (the inferior horn grows unevenly with atrophy): both sides must have the minimum there.
    judged = [p for p in pairs if (min(p.left_ml, p.right_ml) if p.left_code in OPTIONAL_STRUCTURES
                                   else max(p.left_ml, p.right_ml)) >= ASYMMETRY_MIN_ML]
    if not judged:
        return QCCheck("asymmetry", None, f"not evaluated: no pair of {ASYMMETRY_MIN_ML:g} ml or more on a side")
    worst = max(judged, key=lambda p: abs(p.index_percent))
    beyond = [p for p in judged if abs(p.index_percent) > ASYMMETRY_BOUND_PERCENT]
    if beyond:
        text = ", ".join(f"{p.name} {p.index_percent:+.0f} %" for p in beyond)
        return QCCheck("asymmetry", False, f"beyond +/-{ASYMMETRY_BOUND_PERCENT:.0f} %: {text}")
    return QCCheck("asymmetry", True, f"{len(judged)} pairs within +/-{ASYMMETRY_BOUND_PERCENT:.0f} % "
                                      f"(largest {worst.name} {worst.index_percent:+.1f} %)")


_FACE_NAMES = (("right", "left"), ("anterior", "posterior"), ("inferior", "superior"))  # -/+ along L, P, S


def _check_field_of_view(labels: sitk.Image, array: np.ndarray) -> QCCheck:
    """The brain labels on each face of the image: more than :data:`FOV_EDGE_MAX_CM2` on one is a brain cut by the
    field of view (volumes short, and their fraction of the ICV wrong)."""
    brain = np.isin(array, [code for code in STRUCTURES if code not in (16, 24)])
    spacing = labels.GetSpacing()
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    worst, where = 0.0, ""
    for axis in range(3):  # numpy axis: image index axis 2 - axis
        index_axis = 2 - axis
        face_mm2 = float(np.prod([spacing[i] for i in range(3) if i != index_axis]))
        column = direction[:, index_axis]
        patient_axis = int(np.argmax(np.abs(column)))
        for end, sign in ((0, -1.0), (-1, 1.0)):
            area = float(np.take(brain, end, axis=axis).sum()) * face_mm2 / 100.0
            if area > worst:
                worst = area
                where = _FACE_NAMES[patient_axis][int(sign * column[patient_axis] > 0)]
    if worst > FOV_EDGE_MAX_CM2:
        return QCCheck("field_of_view", False, f"the brain reaches the {where} edge of the image ({worst:.0f} cm2 of "
                                               "brain labels there): part of it may lie outside the field of view")
    return QCCheck("field_of_view", True, f"the brain within the image (at most {worst:.1f} cm2 of brain labels on "
                                          f"an edge; limit {FOV_EDGE_MAX_CM2:.0f})")


def _check_present(counts: dict[int, int], expected: Collection[int]) -> QCCheck:
    missing = [by_code(c).display_name for c in sorted(expected) if counts.get(c, 0) == 0]
    if missing:
        return QCCheck("structures_present", False, f"empty: {', '.join(missing)}")
    return QCCheck("structures_present", True, f"all {len(expected)} expected structures present")


def _check_intensity(labels: np.ndarray, t1: np.ndarray) -> QCCheck:
    """Median T1 of white matter > cortex > lateral ventricles (T1-weighted contrast)."""
    classes = {"WM": WHITE_MATTER, "cortex": CORTEX["L"] + CORTEX["R"], "ventricles": LATERAL_VENTRICLES}
    medians: dict[str, float] = {}
    for name, codes in classes.items():
        values = t1[np.isin(labels, codes)]
        if values.size == 0:
            return QCCheck("intensity_ordering", None, f"not evaluated: no {name} voxels")
        medians[name] = float(np.median(values))
    text = ", ".join(f"{name} {value:.4g}" for name, value in medians.items())
    ok = medians["WM"] > medians["cortex"] > medians["ventricles"]
    verdict = "WM > cortex > ventricles" if ok else "expected WM > cortex > ventricles"
    return QCCheck("intensity_ordering", ok, f"median T1 {text}: {verdict}")


def _t1_on_labels_grid(t1: sitk.Image, labels: sitk.Image) -> np.ndarray:
    if not _same_grid(t1, labels):
        t1 = sitk.Resample(t1, labels, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    # a copy, not a view: the resampled image is a temporary
    return sitk.GetArrayFromImage(t1).astype(np.float32, copy=False)


def compute_volumetry(labels: sitk.Image, t1: sitk.Image | None, *, age: str | float | None, sex: str | None,
                      norms: Sequence[Norm] = (), limits: QCLimits | None = None,
                      expected_codes: Collection[int] | None = None, icv_ml: float | None = None,
                      outside_ml: float | None = None, icv_only: Collection[int] = ()) -> Volumetry:
    """Volumes of every measured structure (``inference.labels.STRUCTURES``) present in ``labels``, ICV,
    asymmetry indices, HOC, normative scores (when ``norms`` has a matching row) and quality control.

    ``t1`` (the image the labels were computed on; resampled onto the labels grid if needed) enables the
    intensity-ordering check. ``expected_codes`` must all be non-empty (default: the structures of the labels'
    family, cortex by lobe or whole, without OPTIONAL_STRUCTURES).
    ``age``: years or DICOM AS; ``sex``: PatientSex ('M', 'F', 'O'). ``limits``: default by age (:func:`icv_limits`).
    ``icv_ml``: the segmenter's intracranial volume (default: from the aseg codes); ``outside_ml``: labelled
    volume the segmenter found apart from the brain (enables the brain-mask check). ``icv_only``: codes counted in
    the ICV but not reported as structures (a model's ``icv_only``).
    """
    array = label_codes(labels)
    voxel_mm3 = _voxel_volume_mm3(labels)
    counts = code_counts(array)
    icv_source = "labels"
    if icv_ml is None:
        icv_voxels = sum(n for code, n in counts.items() if 0 < code < ICV_CODE_LIMIT or code in STRUCTURES)
        icv_ml = icv_voxels * voxel_mm3 / 1000.0
    else:
        icv_voxels = int(round(icv_ml * 1000.0 / voxel_mm3))
        icv_source = "intracranial mask"
    age_years, sex_value = parse_age(age), _parse_sex(sex)
    reported = {code: n for code, n in counts.items() if code not in icv_only}
    structures = _structure_volumes(reported, voxel_mm3, icv_ml, age_years, sex_value, norms)
    asymmetry = _asymmetry(structures)
    checks = [_check_icv(icv_ml, limits or icv_limits(age_years)), _check_present(counts, _expected(counts,
              expected_codes)), _check_outside(outside_ml), _check_asymmetry(asymmetry),
              _check_field_of_view(labels, np.asarray(array))]
    if t1 is None:
        checks.append(QCCheck("intensity_ordering", None, "not evaluated: no T1 image"))
    else:
        checks.append(_check_intensity(np.asarray(array), _t1_on_labels_grid(t1, labels)))
    cortex_ml = {side: sum(structures[c].volume_ml for c in codes_of_side if c in structures)
                 for side, codes_of_side in CORTEX.items()}
    return Volumetry(voxel_volume_mm3=voxel_mm3, icv_voxels=icv_voxels, icv_ml=icv_ml, structures=structures,
                     asymmetry=tuple(asymmetry), hoc=_hoc(structures), qc=tuple(checks), age_years=age_years,
                     sex=sex_value, norms_used=bool(norms), cortex_ml=cortex_ml, icv_source=icv_source)


def _structure_volumes(counts: Mapping[int, int], voxel_mm3: float, icv_ml: float, age_years: float | None,
                       sex: str | None, norms: Sequence[Norm]) -> dict[int, StructureVolume]:
    """Each measured structure present: its volume, fraction of the ICV and normative score."""
    structures: dict[int, StructureVolume] = {}
    for code in STRUCTURES:
        voxels = counts.get(code, 0)
        if voxels == 0:
            continue
        volume = voxels * voxel_mm3 / 1000.0
        structures[code] = StructureVolume(
            code=code, voxels=voxels, volume_ml=volume,
            icv_percent=100.0 * volume / icv_ml if icv_ml > 0 else float("nan"),
            norm_score=_norm_score(code, volume, age_years, sex, norms))
    return structures


def _asymmetry(structures: Mapping[int, StructureVolume]) -> list[Asymmetry]:
    """The asymmetry index of each paired structure present on both sides."""
    asymmetry = []
    for code, structure in STRUCTURES.items():
        if structure.laterality != "L":
            continue
        right = LR_SWAP[code]
        left_ml = structures[code].volume_ml if code in structures else 0.0
        right_ml = structures[right].volume_ml if right in structures else 0.0
        if left_ml > 0 and right_ml > 0:
            index = 200.0 * (left_ml - right_ml) / (left_ml + right_ml)
            asymmetry.append(Asymmetry(code, right, left_ml, right_ml, index))
    return asymmetry


def _hoc(structures: Mapping[int, StructureVolume]) -> dict[str, float]:
    """Hippocampal occupancy per side where the hippocampus is present."""
    hoc = {}
    for side in ("L", "R"):
        hv = structures[HIPPOCAMPUS[side]].volume_ml if HIPPOCAMPUS[side] in structures else 0.0
        ilv = (structures[INFERIOR_LATERAL_VENTRICLE[side]].volume_ml
               if INFERIOR_LATERAL_VENTRICLE[side] in structures else 0.0)
        if hv > 0:  # no inferior horn: HOC 1 (an empty horn is common in young, healthy heads)
            hoc[side] = hv / (hv + ilv)
    return hoc


def _expected(counts: Mapping[int, int], expected_codes: Collection[int] | None) -> set[int]:
    """The structures QC requires: ``expected_codes``, or the family of the labels (cortex by lobe (aparc) or
    whole (aseg)) without the optional ones."""
    if expected_codes is None:
        by_lobe = any(c in counts for side in CORTEX.values() for c in side[1:])
        cortex_codes = {c for side in CORTEX.values() for c in side}
        family = (set(STRUCTURES) - {3, 42}) if by_lobe else (set(STRUCTURES) - (cortex_codes - {3, 42}) - {192})
        return family - OPTIONAL_STRUCTURES
    expected = {int(c) for c in expected_codes}
    unknown = expected - set(STRUCTURES)
    if unknown:
        raise ValueError(f"expected_codes holds codes that are not measured structures: {sorted(unknown)}")
    return expected

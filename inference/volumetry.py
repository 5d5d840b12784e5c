"""Brain volumetry from a FreeSurfer-coded label volume: volumes, indices, normative scores and QC.

Definitions:

* volume of a structure (ml) = voxel count x voxel volume (product of the spacing, mm^3) / 1000;
* intracranial volume (ICV) = every voxel with a non-zero code below 100, i.e. FreeSurfer's aseg range: all
  brain structures, ventricles, cerebrospinal fluid (label 24), vessels, lesions, optic chiasm. Codes of 100
  and above (SynthSeg's extra-cerebral classes 136/137/163/164/5xx: skull, scalp, soft tissue) are outside;
* fraction of ICV (%) = 100 x volume / ICV;
* asymmetry index of a left/right pair (%) = 200 x (L - R) / (L + R);
* hippocampal occupancy (HOC) per side = HV / (HV + inferior lateral ventricle volume);
* normative score: z = (volume - mean) / SD of the matching (structure, age band, sex) entry, percentile =
  100 x Phi(z) under a normal model. No normative table ships with the project.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import SimpleITK as sitk

from inference.labels import LR_SWAP, STRUCTURES, Structure, by_code

__all__ = [
    "Asymmetry",
    "ICV_CODE_LIMIT",
    "Norm",
    "NormScore",
    "QCCheck",
    "QCLimits",
    "QC_FAILED_SUFFIX",
    "StructureVolume",
    "Volumetry",
    "compute_volumetry",
    "parse_age",
    "with_qc_flag",
]

#: Codes below this (and above 0) are intracranial (FreeSurfer aseg range).
ICV_CODE_LIMIT = 100
#: Appended to the SeriesDescription of every object of a volumetry whose QC failed.
QC_FAILED_SUFFIX = " QC FAILED"

HIPPOCAMPUS = {"L": 17, "R": 53}
INFERIOR_LATERAL_VENTRICLE = {"L": 5, "R": 44}
WHITE_MATTER = (2, 41)
CORTEX = (3, 42)
LATERAL_VENTRICLES = (4, 43)

Sex = Literal["M", "F", "O"]


@dataclass(frozen=True)
class QCLimits:
    """Plausibility limits of the quality control."""

    icv_min_ml: float = 1000.0
    icv_max_ml: float = 2200.0


@dataclass(frozen=True)
class QCCheck:
    """One plausibility check: ``passed`` is None when it could not be evaluated."""

    name: Literal["icv_range", "structures_present", "intensity_ordering"]
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
    hoc: dict[str, float]                    # 'L'/'R' -> HOC (0..1), sides where HV + ILV > 0
    qc: tuple[QCCheck, ...]
    age_years: float | None
    sex: Sex | None
    norms_used: bool = field(default=False)

    @property
    def qc_passed(self) -> bool:
        """False if any evaluated check failed."""
        return all(check.passed is not False for check in self.qc)

    def volume_ml(self, code: int) -> float:
        """Volume of a structure; 0.0 when absent from the labels."""
        entry = self.structures.get(code)
        return entry.volume_ml if entry else 0.0


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
    for norm in norms:
        if norm.matches(code, age, sex) and norm.sd_ml > 0:
            z = (volume_ml - norm.mean_ml) / norm.sd_ml
            percentile = 50.0 * (1.0 + math.erf(z / math.sqrt(2.0)))
            return NormScore(z=z, percentile=percentile, norm=norm)
    return None


def _check_icv(icv_ml: float, limits: QCLimits) -> QCCheck:
    ok = limits.icv_min_ml <= icv_ml <= limits.icv_max_ml
    relation = "within" if ok else "outside"
    return QCCheck("icv_range", ok, f"ICV {icv_ml:.0f} ml {relation} {limits.icv_min_ml:.0f}-"
                                    f"{limits.icv_max_ml:.0f} ml")


def _check_present(counts: dict[int, int], expected: Collection[int]) -> QCCheck:
    missing = [by_code(c).display_name for c in sorted(expected) if counts.get(c, 0) == 0]
    if missing:
        return QCCheck("structures_present", False, f"empty: {', '.join(missing)}")
    return QCCheck("structures_present", True, f"all {len(expected)} expected structures present")


def _check_intensity(labels: np.ndarray, t1: np.ndarray) -> QCCheck:
    """Median T1 of white matter > cortex > lateral ventricles (T1-weighted contrast)."""
    classes = {"WM": WHITE_MATTER, "cortex": CORTEX, "ventricles": LATERAL_VENTRICLES}
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
                      norms: Sequence[Norm] = (), limits: QCLimits = QCLimits(),
                      expected_codes: Collection[int] | None = None) -> Volumetry:
    """Volumes of every measured structure (``inference.labels.STRUCTURES``) present in ``labels``, ICV,
    asymmetry indices, HOC, normative scores (when ``norms`` has a matching row) and quality control.

    ``t1`` (the image the labels were computed on; resampled onto the labels grid if needed) enables the
    intensity-ordering check. ``expected_codes`` (default: every measured structure) must all be non-empty.
    ``age``: years or DICOM AS; ``sex``: PatientSex ('M', 'F', 'O').
    """
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("labels must be a scalar 3D image")
    array = sitk.GetArrayViewFromImage(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must have an integer pixel type, got {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError("label codes must be non-negative")
    voxel_mm3 = _voxel_volume_mm3(labels)
    values, counts_array = np.unique(array, return_counts=True)
    counts = {int(v): int(n) for v, n in zip(values, counts_array, strict=True)}
    icv_voxels = sum(n for code, n in counts.items() if 0 < code < ICV_CODE_LIMIT)
    icv_ml = icv_voxels * voxel_mm3 / 1000.0
    age_years, sex_value = parse_age(age), _parse_sex(sex)

    structures: dict[int, StructureVolume] = {}
    for code in STRUCTURES:
        voxels = counts.get(code, 0)
        if voxels == 0:
            continue
        volume = voxels * voxel_mm3 / 1000.0
        structures[code] = StructureVolume(
            code=code, voxels=voxels, volume_ml=volume,
            icv_percent=100.0 * volume / icv_ml if icv_ml > 0 else float("nan"),
            norm_score=_norm_score(code, volume, age_years, sex_value, norms))

    asymmetry = []
    for code, structure in STRUCTURES.items():
        if structure.laterality != "L":
            continue
        right = LR_SWAP[code]
        left_ml = structures[code].volume_ml if code in structures else 0.0
        right_ml = structures[right].volume_ml if right in structures else 0.0
        if left_ml + right_ml > 0:
            index = 200.0 * (left_ml - right_ml) / (left_ml + right_ml)
            asymmetry.append(Asymmetry(code, right, left_ml, right_ml, index))

    hoc = {}
    for side in ("L", "R"):
        hv = structures[HIPPOCAMPUS[side]].volume_ml if HIPPOCAMPUS[side] in structures else 0.0
        ilv = (structures[INFERIOR_LATERAL_VENTRICLE[side]].volume_ml
               if INFERIOR_LATERAL_VENTRICLE[side] in structures else 0.0)
        if hv + ilv > 0:
            hoc[side] = hv / (hv + ilv)

    expected = set(STRUCTURES) if expected_codes is None else {int(c) for c in expected_codes}
    unknown = expected - set(STRUCTURES)
    if unknown:
        raise ValueError(f"expected_codes holds codes that are not measured structures: {sorted(unknown)}")
    checks = [_check_icv(icv_ml, limits), _check_present(counts, expected)]
    if t1 is None:
        checks.append(QCCheck("intensity_ordering", None, "not evaluated: no T1 image"))
    else:
        checks.append(_check_intensity(np.asarray(array), _t1_on_labels_grid(t1, labels)))

    return Volumetry(voxel_volume_mm3=voxel_mm3, icv_voxels=icv_voxels, icv_ml=icv_ml, structures=structures,
                     asymmetry=tuple(asymmetry), hoc=hoc, qc=tuple(checks), age_years=age_years, sex=sex_value,
                     norms_used=bool(norms))

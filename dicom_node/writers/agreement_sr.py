"""Comprehensive 3D SR: a TID 1500 measurement report of the agreement of a synthetic T1 with a real T1.

Content (every group carries the model as algorithm identification; tracking identifiers tell them apart):

* "Image agreement" (finding site Brain): PSNR (dB) and SSIM (no units) within the brain mask, fraction of
  the brain inside the synthetic field of view (%), mean Dice (no units) and mean ASPC (%) over the
  structures (derivation Mean);
* "Registration": translation along and rotation about the patient x, y, z axes (mm, degrees) of the rigid
  transform from the real T1's space to the synthetic T1's (``inference.agreement``), and a TEXT with the
  metric and optimizer outcome;
* one group per structure (finding type and site from ``inference.labels``): Dice (no units) of the real
  against the registered synthetic labels and ASPC (%) of their volumes.

The PSNR of identical images (infinite) cannot be a NUM: a TEXT of the PSNR concept says so instead.
Both T1 series and both SEGs are recorded as evidence. DICOM defines no concepts for PSNR, SSIM, Dice,
ASPC or the registration parameters: they are coded in the local scheme ``99DICOMNODE`` of the volumetry SR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.writers import WrittenSeries, gc_paused, write_single
from dicom_node.writers.tid1500 import (
    LOCAL_SCHEME,
    evidence,
    finding_site,
    finding_type,
    measurement,
    measurement_report_sr,
    tracking,
)
from inference.agreement import Agreement
from inference.labels import by_code

__all__ = [
    "ASPC",
    "BRAIN_COVERAGE",
    "DICE",
    "GROUP_IMAGE",
    "GROUP_REGISTRATION",
    "PSNR",
    "PSNR_INFINITE",
    "REGISTRATION",
    "ROTATION",
    "SSIM",
    "TRANSLATION",
    "write_agreement_sr",
]

PSNR = Code("PSNR", LOCAL_SCHEME, "Peak signal-to-noise ratio")
SSIM = Code("SSIM", LOCAL_SCHEME, "Structural similarity index")
DICE = Code("DSC", LOCAL_SCHEME, "Dice similarity coefficient")
ASPC = Code("ASPC", LOCAL_SCHEME, "Absolute symmetrized percent change of volume")
BRAIN_COVERAGE = Code("FOV-BRAIN", LOCAL_SCHEME, "Brain fraction inside the synthetic field of view")
TRANSLATION = tuple(Code(f"REG-T{axis.upper()}", LOCAL_SCHEME, f"Registration translation along patient {axis}")
                    for axis in "xyz")
ROTATION = tuple(Code(f"REG-R{axis.upper()}", LOCAL_SCHEME, f"Registration rotation about patient {axis}")
                 for axis in "xyz")
REGISTRATION = Code("REG", LOCAL_SCHEME, "Rigid registration of synthetic to real T1")

UNIT_DB = codes.UCUM.Decibel
UNIT_NONE = codes.UCUM.NoUnits
UNIT_PERCENT = codes.UCUM.Percent
UNIT_MM = codes.UCUM.Millimeter
UNIT_DEGREE = codes.UCUM.Degree

GROUP_IMAGE = "Image agreement"
#: The TEXT written instead of the PSNR measurement for identical images.
PSNR_INFINITE = "infinite: the images are identical within the brain mask"
GROUP_REGISTRATION = "Registration"


def _check_psnr(value: float) -> None:
    if not (math.isfinite(value) or value == math.inf):
        raise ValueError(f"PSNR must be finite or +inf, got {value}")


def _image_group(agreement: Agreement, algorithm: hd.sr.AlgorithmIdentification, uid_prefix: str | None,
                 ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    _check_psnr(agreement.psnr)
    measurements = [measurement(name=PSNR, value=agreement.psnr, unit=UNIT_DB, algorithm_id=algorithm)
                    ] if math.isfinite(agreement.psnr) else []
    measurements += [
        measurement(name=SSIM, value=agreement.ssim, unit=UNIT_NONE, algorithm_id=algorithm),
        measurement(name=BRAIN_COVERAGE, value=100.0 * agreement.coverage, unit=UNIT_PERCENT,
                          algorithm_id=algorithm),
    ]
    if agreement.structures:
        measurements += [
            measurement(name=DICE, value=agreement.mean_dice, unit=UNIT_NONE, derivation=codes.SCT.Mean,
                              algorithm_id=algorithm),
            measurement(name=ASPC, value=agreement.mean_aspc, unit=UNIT_PERCENT, derivation=codes.SCT.Mean,
                              algorithm_id=algorithm),
        ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(GROUP_IMAGE, uid_prefix), algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Brain)], measurements=measurements)
    if not math.isfinite(agreement.psnr):  # a NUM needs a finite value
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=PSNR, value=PSNR_INFINITE, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _registration_group(agreement: Agreement, algorithm: hd.sr.AlgorithmIdentification, uid_prefix: str | None,
                        ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = [measurement(name=name, value=float(value), unit=UNIT_MM, algorithm_id=algorithm)
                    for name, value in zip(TRANSLATION, agreement.translation_mm, strict=True)]
    measurements += [measurement(name=name, value=float(value), unit=UNIT_DEGREE, algorithm_id=algorithm)
                     for name, value in zip(ROTATION, agreement.rotation_deg, strict=True)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(GROUP_REGISTRATION, uid_prefix), algorithm_id=algorithm,
        measurements=measurements)
    registration = agreement.registration
    centre = ", ".join(f"{v:.1f}" for v in agreement.center_mm)
    text = (f"Euler3D real T1 -> synthetic T1 (LPS, x' = R(x - c) + c + t, R = Rz Rx Ry) about c = ({centre}) mm; "
            f"Mattes mutual information {registration.metric_initial:.4f} -> {registration.metric_final:.4f} "
            f"after {registration.iterations} iterations ({registration.stop_condition})")
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=REGISTRATION, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _structure_groups(agreement: Agreement, algorithm: hd.sr.AlgorithmIdentification, uid_prefix: str | None,
                      ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    groups = []
    for code, entry in agreement.structures.items():
        structure = by_code(code)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(structure.freesurfer_name, uid_prefix),
            finding_type=finding_type(code), finding_category=structure.category, finding_sites=[finding_site(code)],
            algorithm_id=algorithm,
            measurements=[
                measurement(name=DICE, value=entry.dice, unit=UNIT_NONE, algorithm_id=algorithm),
                measurement(name=ASPC, value=entry.aspc, unit=UNIT_PERCENT, algorithm_id=algorithm),
            ]))
    return groups


@gc_paused()
def write_agreement_sr(agreement: Agreement, *, real_t1_images: Sequence[Dataset],
                       synthetic_t1_images: Sequence[Dataset], real_seg: Dataset, synthetic_seg: Dataset,
                       out_path: Path, series_number: int, series_description: str, uid_prefix: str | None,
                       algorithm_name: str, algorithm_version: str) -> WrittenSeries:
    """Write ``agreement`` as a Comprehensive 3D SR in the study of ``real_t1_images``.

    ``real_t1_images`` / ``synthetic_t1_images``: headers of the two T1 series compared; ``real_seg`` /
    ``synthetic_seg``: the SEGs of their labels. All are recorded as evidence.
    """
    if not real_t1_images or not synthetic_t1_images:
        raise ValueError("both the real and the synthetic T1 images are required")
    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=algorithm_version)
    groups: list = [_image_group(agreement, algorithm, uid_prefix),
                    _registration_group(agreement, algorithm, uid_prefix)]
    groups += _structure_groups(agreement, algorithm, uid_prefix)
    sr = measurement_report_sr(
        groups, evidence_images=evidence(real_t1_images, synthetic_t1_images, [real_seg, synthetic_seg]),
        procedure=codes.LN.BrainMRI, series_number=series_number, series_description=series_description,
        uid_prefix=uid_prefix, algorithm_name=algorithm_name, algorithm_version=algorithm_version)
    return write_single(sr, out_path)

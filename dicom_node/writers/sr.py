"""Comprehensive 3D SR: a TID 1500 measurement report of one volumetry.

Content (every group carries the model as algorithm identification):

* one TID 1411 volumetric ROI group per structure, referencing its SEG segment: Volume (SCT 118565006, ml),
  fraction of intracranial volume (%), and with a normative table Z-score (DCM 121416) and percentile
  (DCM 121415);
* TID 1501 groups, told apart by their tracking identifier: intracranial volume (Volume at the finding site
  "Intracranial structure"), asymmetry indices (%, finding site = the structure), hippocampal occupancy
  (ratio, per side), subject (Subject Age in years, Subject Sex) and quality control (one CODE per check,
  Succeeded / Failed / Not Attempted, with a TEXT of the same concept giving the reason; plus the overall
  outcome).

Concepts that DICOM does not define are coded in the local scheme ``99DICOMNODE``, declared in the
Coding Scheme Identification Sequence.
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
    asymmetry_site,
    device_uid,
    evidence,
    finding_site,
    finding_type,
    measurement,
    measurement_report_sr,
    tracking,
)
from inference.labels import CORTEX, HIPPOCAMPUS, LEFT, RIGHT
from inference.volumetry import Volumetry

__all__ = [
    "ASYMMETRY_INDEX",
    "FRACTION_OF_ICV",
    "GROUP_ASYMMETRY",
    "GROUP_HOC",
    "GROUP_ICV",
    "GROUP_QC",
    "GROUP_SUBJECT",
    "HIPPOCAMPAL_OCCUPANCY",
    "LOCAL_SCHEME",
    "QC_CHECK_CODES",
    "QC_OVERALL",
    "UNIT_ML",
    "device_uid",
    "write_sr",
]

FRACTION_OF_ICV = Code("ICVF", LOCAL_SCHEME, "Fraction of intracranial volume")
ASYMMETRY_INDEX = Code("AI", LOCAL_SCHEME, "Asymmetry index")
HIPPOCAMPAL_OCCUPANCY = Code("HOC", LOCAL_SCHEME, "Hippocampal occupancy")
QC_OVERALL = Code("QC", LOCAL_SCHEME, "Volumetry quality control")
QC_CHECK_CODES = {
    "icv_range": Code("QC-ICV", LOCAL_SCHEME, "Intracranial volume plausibility"),
    "structures_present": Code("QC-PRESENT", LOCAL_SCHEME, "Measured structures present"),
    "intensity_ordering": Code("QC-T1", LOCAL_SCHEME, "T1 intensity ordering"),
    "brain_mask": Code("QC-MASK", LOCAL_SCHEME, "Labels within the brain mask"),
    "asymmetry": Code("QC-AI", LOCAL_SCHEME, "Left-right asymmetry within bounds"),
    "field_of_view": Code("QC-FOV", LOCAL_SCHEME, "Brain within the field of view"),
}
QC_OUTCOME = {True: codes.DCM.Succeeded, False: codes.DCM.Failed, None: codes.DCM.NotAttempted}
SEX_CODES = {"M": codes.DCM.Male, "F": codes.DCM.Female, "O": codes.DCM.Other}

UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_PERCENT = codes.UCUM.Percent
UNIT_RATIO = codes.UCUM.Ratio
UNIT_NONE = codes.UCUM.NoUnits
UNIT_YEAR = codes.UCUM.Year

GROUP_ICV = "Intracranial volume"
GROUP_ASYMMETRY = "Asymmetry indices"
GROUP_HOC = "Hippocampal occupancy"
GROUP_CORTEX = "Cerebral cortex"
GROUP_SUBJECT = "Subject"
GROUP_QC = "Quality control"

_PROCEDURE = codes.LN.BrainMRI  # LOINC 24590-2


def _structure_groups(volumetry: Volumetry, seg: WrittenSeries, source_series_uid: str,
                      algorithm: hd.sr.AlgorithmIdentification, uid_prefix: str | None,
                      ) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    numbers = seg.segment_numbers
    (seg_file,) = seg.files
    # a structure's measurements carry its segment's TrackingUID: one finding, one UID, in the SEG and the SR
    segment_uids = {int(item.SegmentNumber): str(item.TrackingUID)
                    for item in seg.dataset.get("SegmentSequence", []) if item.get("TrackingUID")}
    missing = [code for code in volumetry.structures if code not in numbers]
    if missing:
        raise ValueError(f"the SEG has no segment for structures {missing}: not the SEG of this volumetry")
    groups = []
    for code, entry in volumetry.structures.items():
        structure = entry.structure
        measurements = [
            measurement(name=codes.SCT.Volume, value=entry.volume_ml, unit=UNIT_ML, algorithm_id=algorithm)]
        if math.isfinite(entry.icv_percent):  # no fraction of a zero ICV
            measurements.append(measurement(name=FRACTION_OF_ICV, value=entry.icv_percent, unit=UNIT_PERCENT,
                                                  algorithm_id=algorithm))
        if entry.norm_score is not None:
            measurements += [
                measurement(name=codes.DCM.ZScoreOfMeasurement, value=entry.norm_score.z, unit=UNIT_NONE),
                measurement(name=codes.DCM.PercentileRankingOfMeasurement, value=entry.norm_score.percentile,
                                  unit=UNIT_PERCENT),
            ]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(structure.freesurfer_name, uid_prefix, segment_uids.get(numbers[code])),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg_file.sop_class_uid, sop_instance_uid=seg_file.sop_instance_uid,
                segment_number=numbers[code],
                source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid)),
            finding_type=finding_type(code),
            finding_category=structure.category,
            finding_sites=[finding_site(code)],
            algorithm_id=algorithm,
            measurements=measurements,
        ))
    return groups


def _index_groups(volumetry: Volumetry, algorithm: hd.sr.AlgorithmIdentification, uid_prefix: str | None,
                  ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(GROUP_ICV, uid_prefix),
        finding_type=codes.SCT.IntracranialStructure,
        algorithm_id=algorithm,
        measurements=[measurement(
            name=codes.SCT.Volume, value=volumetry.icv_ml, unit=UNIT_ML,
            finding_sites=[hd.sr.FindingSite(codes.SCT.IntracranialStructure)])],
    )]
    # the whole cortex of a side measured by lobe (SEG segments): its lobes summed (with what the labels left as
    # cortex of no lobe, aseg 3/42). Without lobes (a synthesis model's own labels) 3/42 is the whole cortex and a
    # structure group already: a second group said the same volume under another name
    summed = {side: value for side, value in sorted(volumetry.cortex_ml.items())
              if value > 0 and any(code in volumetry.structures for code in CORTEX[side][1:])}
    if summed:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(GROUP_CORTEX, uid_prefix),
            algorithm_id=algorithm,
            measurements=[measurement(
                name=codes.SCT.Volume, value=value, unit=UNIT_ML,
                finding_sites=[hd.sr.FindingSite(codes.SCT.CerebralCortex,
                                                 laterality=LEFT if side == "L" else RIGHT)])
                for side, value in summed.items()],
        ))
    if volumetry.asymmetry:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(GROUP_ASYMMETRY, uid_prefix),
            algorithm_id=algorithm,
            measurements=[measurement(
                name=ASYMMETRY_INDEX, value=pair.index_percent, unit=UNIT_PERCENT,
                finding_sites=[asymmetry_site(pair.left_code)])
                for pair in volumetry.asymmetry],
        ))
    if volumetry.hoc:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(GROUP_HOC, uid_prefix),
            algorithm_id=algorithm,
            measurements=[measurement(
                name=HIPPOCAMPAL_OCCUPANCY, value=value, unit=UNIT_RATIO,
                finding_sites=[finding_site(HIPPOCAMPUS[side])])
                for side, value in sorted(volumetry.hoc.items())],
        ))
    return groups


def _subject_group(volumetry: Volumetry, uid_prefix: str | None) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    measurements = ([measurement(name=codes.DCM.SubjectAge, value=volumetry.age_years, unit=UNIT_YEAR)]
                    if volumetry.age_years is not None else [])
    evaluations = ([hd.sr.QualitativeEvaluation(codes.DCM.SubjectSex, SEX_CODES[volumetry.sex])]
                   if volumetry.sex in SEX_CODES else [])
    if not measurements and not evaluations:
        return None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(GROUP_SUBJECT, uid_prefix), measurements=measurements or None,
        qualitative_evaluations=evaluations or None)


def _qc_group(volumetry: Volumetry, algorithm: hd.sr.AlgorithmIdentification, uid_prefix: str | None,
              ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluations = [hd.sr.QualitativeEvaluation(QC_OVERALL, QC_OUTCOME[volumetry.qc_passed])]
    evaluations += [hd.sr.QualitativeEvaluation(QC_CHECK_CODES[check.name], QC_OUTCOME[check.passed])
                    for check in volumetry.qc]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(GROUP_QC, uid_prefix), algorithm_id=algorithm,
        qualitative_evaluations=evaluations)
    for check in volumetry.qc:
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=QC_CHECK_CODES[check.name], value=check.reason[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


@gc_paused()
def write_sr(volumetry: Volumetry, *, seg: WrittenSeries | None, source_images: Sequence[Dataset],
             input_series_datasets: Sequence[Dataset], out_path: Path, series_number: int, series_description: str,
             uid_prefix: str | None, algorithm_name: str, algorithm_version: str) -> WrittenSeries:
    """Write the volumetry as a Comprehensive 3D SR in the study of ``source_images``.

    ``seg`` is the SEG written by ``write_seg`` from the same labels (None when the segmenter found no
    structure: the SR then carries ICV, QC and subject only, and QC has failed); ``source_images`` the T1 it was
    computed on; ``input_series_datasets`` the series the T1 was synthesized from (empty for a real T1).
    All three are recorded as evidence. ``series_description`` is written as given (the job's ``SeriesNaming`` flags
    ' QC FAILED').
    """
    if not source_images:
        raise ValueError("no source images")
    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=algorithm_version)
    if seg is None and volumetry.structures:
        raise ValueError("structures measured without their SEG")
    groups: list = [] if seg is None else _structure_groups(
        volumetry, seg, str(source_images[0].SeriesInstanceUID), algorithm, uid_prefix)
    groups += _index_groups(volumetry, algorithm, uid_prefix)
    subject = _subject_group(volumetry, uid_prefix)
    if subject is not None:
        groups.append(subject)
    groups.append(_qc_group(volumetry, algorithm, uid_prefix))
    sr = measurement_report_sr(
        groups, evidence_images=evidence(source_images, input_series_datasets, [] if seg is None else seg.datasets),
        procedure=_PROCEDURE, series_number=series_number,
        series_description=series_description, uid_prefix=uid_prefix,
        algorithm_name=algorithm_name, algorithm_version=algorithm_version)
    return write_single(sr, out_path)

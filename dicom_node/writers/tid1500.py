"""The envelope shared by the node's TID 1500 measurement reports (volumetry SR, agreement SR).

A Comprehensive 3D SR in the study of its first evidence image, observed by this node as a device,
with the local coding scheme ``99DICOMNODE`` declared and the Patient Study module copied from the
source. The content groups are each report's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

import dicom_node
from dicom_node.uids import new_uid
from dicom_node.writers import equipment, identity_ready
from inference.labels import LOBE_CORTEX_CODES, by_code, laterality_code

#: Concepts DICOM does not define are coded in this local scheme.
LOCAL_SCHEME = "99DICOMNODE"


def measurement(*, value: float, **kwargs: Any) -> hd.sr.Measurement:
    """``hd.sr.Measurement`` with ``value`` to 7 significant digits: its DS string as a PACS shows it ("231.8296" ml,
    not "231.829587000000"; a z-score of "0.5", not "0.50000000000000" for 0.4999999999999999): a 1 mm voxel is
    0.001 ml, and nothing measured here is known to more than 7 digits."""
    return hd.sr.Measurement(value=float(f"{value:.7g}"), **kwargs)


def tracking(identifier: str, uid_prefix: str | None, uid: str | None = None) -> hd.sr.TrackingIdentifier:
    """A tracking identifier with ``uid`` (a SEG segment's TrackingUID), else a new UID."""
    return hd.sr.TrackingIdentifier(uid=uid or new_uid(uid_prefix), identifier=identifier)


def finding_type(code: int) -> Code:
    """What was measured for a structure code: its concept, and for the cortex of a lobe the cerebral cortex (the
    lobe's own concept would say the whole lobe, white matter included: a third of its volume read as atrophy)."""
    return codes.SCT.CerebralCortex if code in LOBE_CORTEX_CODES else by_code(code).concept


def finding_site(code: int) -> hd.sr.FindingSite:
    """The finding site (with laterality) of a FreeSurfer structure code; for the cortex of a lobe, the cerebral
    cortex with the lobe as its topographical modifier."""
    structure = by_code(code)
    if code in LOBE_CORTEX_CODES:
        return hd.sr.FindingSite(anatomic_location=codes.SCT.CerebralCortex, laterality=laterality_code(structure),
                                 topographical_modifier=structure.concept)
    return hd.sr.FindingSite(anatomic_location=structure.concept, laterality=laterality_code(structure))


def asymmetry_site(code: int) -> hd.sr.FindingSite:
    """The finding site of the asymmetry index of the pair of ``code`` (either side): the structure without
    laterality; for the cortex of a lobe, the cerebral cortex with the lobe as its topographical modifier, as the
    volumes of its sides are coded (:func:`finding_site`)."""
    site = finding_site(code)
    return hd.sr.FindingSite(anatomic_location=site.value, topographical_modifier=site.topographical_modifier)


def evidence(*groups: Sequence[Dataset]) -> list[Dataset]:
    """Every data set of ``groups`` once (by SOP Instance UID), in order."""
    seen, out = set(), []
    for group in groups:
        for ds in group:
            if ds.SOPInstanceUID not in seen:
                seen.add(ds.SOPInstanceUID)
                out.append(ds)
    return out


def device_uid(uid_prefix: str | None) -> str:
    """A stable UID of this node as observing device (the same for every report under one root)."""
    prefix = PYDICOM_ROOT_UID if not uid_prefix else uid_prefix if uid_prefix.endswith(".") else uid_prefix + "."
    return str(generate_uid(prefix=prefix, entropy_srcs=[dicom_node.MANUFACTURER, dicom_node.MODEL_NAME]))


def measurement_report_sr(groups: Sequence[hd.sr.Template], *, evidence_images: Sequence[Dataset],
                          procedure: Code, series_number: int, series_description: str, uid_prefix: str | None,
                          algorithm_name: str, algorithm_version: str) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report of ``groups`` as a Comprehensive 3D SR in the study of ``evidence_images[0]``."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(uid_prefix), name=dicom_node.MODEL_NAME, manufacturer_name=dicom_node.MANUFACTURER,
            model_name=f"{algorithm_name} {algorithm_version}"[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=list(groups),
    )
    sources = [identity_ready(ds) for ds in evidence_images]  # the patient and study come from the first
    first = sources[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report,
        series_instance_uid=new_uid(uid_prefix),
        series_number=int(series_number),
        sop_instance_uid=new_uid(uid_prefix),
        instance_number=1,
        **equipment(algorithm_name, algorithm_version),
        institution_name=first.get("InstitutionName") or None,
        series_description=series_description,
        is_complete=True,
        is_final=False,
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME, name="dicom-node local codes",
            responsible_organization=dicom_node.MANUFACTURER)],
    )
    for keyword in ("PatientAge", "PatientSize", "PatientWeight"):  # Patient Study module
        if first.get(keyword) not in (None, ""):
            setattr(sr, keyword, first[keyword].value)
    return sr

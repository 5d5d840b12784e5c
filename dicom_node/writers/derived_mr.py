"""Synthetic MR Image Storage series: one single-frame instance per slice of a SimpleITK image.

Patient, study and frame of reference come from the source series; the equipment is this node, the source
scanner is kept in the Contributing Equipment Sequence. Every instance says in ImageType, ImageComments
and DerivationDescription that it was computed, not acquired.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import DSfloat, PersonName

import dicom_node
from dicom_node.uids import new_uid
from dicom_node.writers import (
    WrittenSeries,
    gc_paused,
    header_of,
    patient_sex,
    series_of,
    software_versions,
    value_problem,
    write_file,
)

__all__ = ["Derivation", "write_derived_mr"]

log = logging.getLogger(__name__)

#: Window from these percentiles of the non-zero voxels.
WINDOW_PERCENTILES = (1.0, 99.0)
MAX_STORED = 65535

# Attributes copied from the first source, by module. Type 2 ones are written empty when the source lacks them.
_PATIENT_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_PATIENT_OPTIONAL = (
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientBirthTime", "OtherPatientIDsSequence",
    "EthnicGroup", "PatientComments", "PatientSpeciesDescription", "PatientBreedDescription",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "QualityControlSubject",
    # Clinical Trial Subject module
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
)
_STUDY_TYPE2 = ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_STUDY_OPTIONAL = (
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord", "ProcedureCodeSequence",
    # Patient Study module
    "PatientAge", "PatientSize", "PatientWeight", "AdditionalPatientHistory",
    # Clinical Trial Study module
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
)
#: The optional patient and study attributes a new object of the study carries from its source (the PACS files it by
#: patient ID and issuer; study browsers show the description)
IDENTITY_OPTIONAL = _PATIENT_OPTIONAL + _STUDY_OPTIONAL


def copy_identity_optional(target: Dataset, source: Dataset) -> None:
    """Copy :data:`IDENTITY_OPTIONAL` from ``source``, leaving out values their VR forbids (with a warning)."""
    _copy(target, source, IDENTITY_OPTIONAL, type2=False)


_SCANNER = ("Manufacturer", "InstitutionName", "InstitutionAddress", "StationName", "InstitutionalDepartmentName",
            "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions")


@dataclass(frozen=True)
class Derivation:
    """What computed the image: model id and version, and a one-line human description."""

    model_id: str
    model_version: str
    description: str


def _ds(value: float) -> DSfloat:
    return DSfloat(round(float(value), 6), auto_format=True)


def _code_item(code: object) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _check_image(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Validated (direction 3x3, voxel array [k, j, i] as float32)."""
    if image.GetDimension() != 3:
        raise ValueError(f"image must be 3D, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("image must be scalar (one component per voxel)")
    size = image.GetSize()
    if min(size) < 1:
        raise ValueError(f"image is empty (size {size})")
    if size[0] > MAX_STORED or size[1] > MAX_STORED:
        raise ValueError(f"slice size {size[:2]} exceeds DICOM Rows/Columns")
    spacing = image.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive and finite, got {spacing}")
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    row, column = direction[:, 0], direction[:, 1]
    if (abs(np.linalg.norm(row) - 1) > 1e-4 or abs(np.linalg.norm(column) - 1) > 1e-4
            or abs(float(row @ column)) > 1e-4):
        raise ValueError("the first two direction columns must be orthonormal (ImageOrientationPatient)")
    if not np.all(np.isfinite(image.GetOrigin())):
        raise ValueError("origin must be finite")
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError("image contains NaN or infinite voxels")
    return direction, array


def _check_sources(sources: Sequence[Dataset]) -> Dataset:
    if not sources:
        raise ValueError("no source datasets: a derived series must reference what it was computed from")
    first = sources[0]
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesInstanceUID"):
        if not first.get(keyword):
            raise ValueError(f"source has no {keyword}")
    for ds in sources:
        if not ds.get("SOPClassUID") or not ds.get("SOPInstanceUID") or not ds.get("SeriesInstanceUID"):
            raise ValueError("every source needs SOPClassUID, SOPInstanceUID and SeriesInstanceUID")
        if ds.get("StudyInstanceUID") != first.StudyInstanceUID:
            raise ValueError("sources belong to more than one study")
        if ds.get("FrameOfReferenceUID") != first.FrameOfReferenceUID:
            raise ValueError("sources have more than one frame of reference")
    return first


def _to_stored(array: np.ndarray) -> np.ndarray:
    """Clip to 0..65535 and round to uint16."""
    return np.rint(np.clip(array, 0, MAX_STORED)).astype(np.uint16)


def _window(stored: np.ndarray) -> tuple[float, float, str]:
    """WindowCenter, WindowWidth and explanation from percentiles of the non-zero voxels."""
    nonzero = stored[stored > 0]
    if nonzero.size == 0:
        raise ValueError("image has no non-zero voxels: refusing to write a blank synthetic series")
    low, high = np.percentile(nonzero, WINDOW_PERCENTILES)
    width = max(float(high - low), 1.0)
    centre = float(low) + width / 2.0
    p_low, p_high = WINDOW_PERCENTILES
    return centre, width, f"P{p_low:g}-P{p_high:g} of non-zero voxels"


def _copy(target: Dataset, source: Dataset, keywords: Sequence[str], *, type2: bool) -> None:
    """Copy ``keywords`` from ``source``. Type 2 ones (``type2``) are written empty when ``source`` lacks them, and
    are copied as they are (a value their VR forbids then refuses the whole series: identity is not altered).
    Optional ones whose value their VR forbids (a lowercase BodyPartExamined, a PatientAge "45Y") are left out,
    with a warning: they describe, and the series is worth more than they are."""
    for keyword in keywords:
        if keyword in source:
            element = source[keyword]
            if not type2 and value_problem(element) is not None:
                # (its value is not logged: patient data)
                log.warning("%s of the source is not a valid %s: left out of the object written", keyword, element.VR)
                continue
            value = element.value
            if isinstance(value, PersonName):
                value = str(value)
            elif isinstance(value, (list, tuple)) and any(isinstance(v, PersonName) for v in value):
                value = [str(v) for v in value]
            setattr(target, keyword, value)
        elif type2:
            setattr(target, keyword, None)


def _has_non_ascii(ds: Dataset) -> bool:
    for element in ds.iterall():
        values = element.value if element.VM > 1 else [element.value]
        for value in values:
            if isinstance(value, (str, PersonName)) and not str(value).isascii():
                return True
    return False


def _check_values(ds: Dataset) -> None:
    """Raise ValueError for any value its VR does not allow (too long, bad characters), nested ones too."""
    for element in ds.iterall():
        if element.VR != "SQ" and (problem := value_problem(element)) is not None:
            raise ValueError(f"{element.keyword or element.tag}: {problem}")


def _preencoded(template: Dataset) -> Dataset:
    """``template`` encoded once (Explicit VR Little Endian) and read back as raw elements.

    Every slice copies these raw elements, which pydicom writes byte for byte, so the shared
    attributes (the Source Image and Referenced Series sequences grow with the source series) are
    encoded once per series instead of once per slice.
    """
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, template)
    buffer.seek(0)
    return read_dataset(buffer, is_implicit_VR=False, is_little_endian=True)


def _source_series(sources: Sequence[Dataset]) -> dict[str, list[Dataset]]:
    series: dict[str, list[Dataset]] = {}
    for ds in sources:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return series


def _patient_and_study(ds: Dataset, first: Dataset) -> None:
    """Patient, Clinical Trial Subject, General Study, Patient Study, Clinical Trial Study: the source's."""
    _copy(ds, first, _PATIENT_TYPE2, type2=True)
    ds.PatientSex = patient_sex(ds.PatientSex)  # "U", "m": what DICOM allows (M, F, O) or empty, as the SEG needs
    _copy(ds, first, _PATIENT_OPTIONAL, type2=False)
    ds.StudyInstanceUID = first.StudyInstanceUID
    _copy(ds, first, _STUDY_TYPE2, type2=True)
    _copy(ds, first, _STUDY_OPTIONAL, type2=False)


def _series_and_equipment(ds: Dataset, first: Dataset, *, series_description: str, series_number: int,
                          series_uid: str, derivation: Derivation, date: str, time: str) -> None:
    """General Series, Frame of Reference, General Equipment (this node; the scanner as Contributing Equipment)."""
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = series_description
    ds.PatientPosition = first.get("PatientPosition") or None  # Type 2C for MR: present, empty if unknown
    _copy(ds, first, ("BodyPartExamined",), type2=False)
    if not ds.get("BodyPartExamined"):
        ds.Laterality = None  # Type 2C: a paired body part cannot be ruled out, so present and empty
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator") or None
    ds.Manufacturer = dicom_node.MANUFACTURER
    ds.ManufacturerModelName = dicom_node.MODEL_NAME
    ds.SoftwareVersions = software_versions(derivation.model_id, derivation.model_version)
    _copy(ds, first, ("InstitutionName",), type2=False)
    if first.get("Manufacturer"):  # Type 1 in a Contributing Equipment item
        scanner = Dataset()
        _copy(scanner, first, _SCANNER, type2=False)
        scanner.PurposeOfReferenceCodeSequence = [_code_item(codes.DCM.AcquisitionEquipment)]
        ds.ContributingEquipmentSequence = [scanner]


def _references(sources: Sequence[Dataset], purpose: Dataset | None = None) -> list[Dataset]:
    """One Referenced SOP Class/Instance item per distinct source (with a purpose of reference if given)."""
    items = []
    for sop_class, sop_instance in dict.fromkeys((src.SOPClassUID, src.SOPInstanceUID) for src in sources):
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        if purpose is not None:
            item.PurposeOfReferenceCodeSequence = [purpose]
        items.append(item)
    return items


def _derivation(ds: Dataset, sources: Sequence[Dataset], *, derivation: Derivation, extra_comment: str) -> None:
    """General Image, General Reference and Common Instance Reference: how the image was made, from what."""
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    descriptions = [str(members[0].get("SeriesDescription") or uid)
                    for uid, members in _source_series(sources).items()]
    model = f"{derivation.model_id} {derivation.model_version}"
    comment = (f"SYNTHETIC image computed by {model} from series "
               f"{', '.join(repr(d) for d in descriptions)}; not acquired; not for lesion detection.")
    ds.ImageComments = f"{comment} {extra_comment}".strip()
    ds.DerivationDescription = (f"{derivation.description} (model {model}); synthetic image, not acquired")[:1024]
    ds.DerivationCodeSequence = [_code_item(codes.DCM.SpatialResampling)]
    ds.SourceImageSequence = _references(sources, _code_item(codes.DCM.SourceImageForImageProcessingOperation))
    ds.BurnedInAnnotation = "NO"
    # once lossy, always lossy (PS3.3 C.7.6.1.1.5): a source that was lossy compressed makes the sT1 lossy too,
    # also one received in a lossy transfer syntax that does not say so itself
    lossy = next((src for src in sources if str(src.get("LossyImageCompression") or "").strip() == "01"), None)
    received_lossy = next((src for src in sources if _lossy_syntax(src) is not None), None)
    ds.LossyImageCompression = "00" if lossy is None and received_lossy is None else "01"
    if lossy is not None:
        _copy(ds, lossy, ("LossyImageCompressionRatio", "LossyImageCompressionMethod"), type2=False)
    elif received_lossy is not None:
        ds.LossyImageCompressionMethod = _lossy_syntax(received_lossy)
    # Common Instance Reference (required when instances of this study are referenced)
    referenced_series = []
    for uid, members in _source_series(sources).items():
        series_item = Dataset()
        series_item.SeriesInstanceUID = uid
        series_item.ReferencedInstanceSequence = _references(members)
        referenced_series.append(series_item)
    ds.ReferencedSeriesSequence = referenced_series


#: Transfer syntaxes that are lossy whatever the data set says, and the LossyImageCompressionMethod of each
#: (PS3.3 C.7.6.1.1.5.1): JPEG Baseline and Extended (and the retired lossy processes), JPEG XL recompression of a
#: JPEG, and the video syntaxes (MPEG-2, MPEG-4, HEVC). Those that may be
#: lossless (JPEG-LS near-lossless, JPEG 2000, HTJ2K) leave it to the data set's LossyImageCompression.
LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    # the retired lossy JPEG processes (extended, spectral selection, progressive, hierarchical)
    **{f"1.2.840.10008.1.2.4.{n}": "ISO_10918_1" for n in (*range(52, 57), *range(58, 65))},
    "1.2.840.10008.1.2.4.111": "ISO_18181_1",  # JPEG XL recompression of a JPEG
    **{f"1.2.840.10008.1.2.4.{n}": "ISO_13818_2" for n in (100, 101)},
    **{f"1.2.840.10008.1.2.4.{n}": "ISO_14496_10" for n in (102, 103, 104, 105, 106)},
    **{f"1.2.840.10008.1.2.4.{n}": "ISO_23008_2" for n in (107, 108)},
}


def _lossy_syntax(ds: Dataset) -> str | None:
    """The LossyImageCompressionMethod of the lossy transfer syntax ``ds`` was received in, or None."""
    meta = getattr(ds, "file_meta", None)
    return LOSSY_SYNTAXES.get(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else None


def _pixel_and_mr(ds: Dataset) -> None:
    """Image Pixel (16-bit unsigned grey) and MR Image: nothing was acquired, so no sequence is claimed
    (Research Mode, no variant)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.ScanningSequence = "RM"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = None
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = None
    ds.EchoTime = None
    ds.EchoTrainLength = None


def _series_template(first: Dataset, sources: Sequence[Dataset], *, series_description: str, series_number: int,
                     series_uid: str, derivation: Derivation, extra_comment: str, now: datetime) -> Dataset:
    """Every attribute shared by the instances of the series."""
    ds = Dataset()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    # SOP Common. SyntheticData (0008,001C) is left out: dciodvfy 2022 rejects it as an unknown standard tag.
    ds.SOPClassUID = MRImageStorage
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    _patient_and_study(ds, first)
    _series_and_equipment(ds, first, series_description=series_description, series_number=series_number,
                          series_uid=series_uid, derivation=derivation, date=date, time=time)
    ds.ContentDate, ds.ContentTime = date, time
    _derivation(ds, sources, derivation=derivation, extra_comment=extra_comment)
    _pixel_and_mr(ds)
    if _has_non_ascii(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
    elif first.get("SpecificCharacterSet"):
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    return ds


@gc_paused()
def write_derived_mr(image: sitk.Image, sources: Sequence[Dataset], *, out_dir: Path, series_description: str,
                     series_number: int, derivation: Derivation, uid_prefix: str | None,
                     series_uid: str | None = None, extra_comment: str = "") -> WrittenSeries:
    """Write ``image`` as one MR Image Storage file per slice k (``<InstanceNumber:04d>.dcm``) into ``out_dir``.

    Geometry: IPP of slice k = physical point of index (0, 0, k); IOP = first two direction columns.
    Pixels are clipped to 0..65535 and rounded to uint16. ``out_dir`` must hold no ``*.dcm`` yet.
    Raises ValueError for an image or sources that would give invalid or meaningless objects.
    Returns the written series: files and headers in InstanceNumber order.
    """
    direction, array = _check_image(image)
    first = _check_sources(sources)
    if not 0 <= int(series_number) <= 2**31 - 1:
        raise ValueError(f"series_number {series_number} out of range")
    if not series_description.strip():
        raise ValueError("series_description is empty")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.glob("*.dcm")):
        raise FileExistsError(f"{out_dir} already holds DICOM files")

    stored = _to_stored(array)
    centre, width, explanation = _window(stored)
    template = _series_template(
        first, sources, series_description=series_description, series_number=int(series_number),
        series_uid=series_uid or new_uid(uid_prefix), derivation=derivation, extra_comment=extra_comment,
        now=datetime.now())
    template.WindowCenter = _ds(centre)
    template.WindowWidth = _ds(width)
    template.WindowCenterWidthExplanation = explanation
    _check_values(template)
    shared = _preencoded(template)

    out_dir.mkdir(parents=True, exist_ok=True)
    files, headers = [], []
    for k in range(image.GetSize()[2]):
        ds = _slice(shared, image, direction, k, stored[k], new_uid(uid_prefix))
        files.append(write_file(ds, out_dir / f"{k + 1:04d}.dcm"))
        headers.append(header_of(ds))
    return series_of(files, headers)


def _slice(shared: Dataset, image: sitk.Image, direction: np.ndarray, k: int, pixels: np.ndarray,
           sop_uid: str) -> Dataset:
    """Instance k of the series: the shared attributes, slice k's plane (IPP = physical point of index
    (0, 0, k), IOP = the first two direction columns) and its pixels."""
    size, spacing = image.GetSize(), image.GetSpacing()
    ds = Dataset()
    ds.update(shared)
    # Same encoding as the raw elements were read with: pydicom then writes them as they are
    # instead of decoding every sequence to look for ambiguous VRs (none is left: see _preencoded).
    ds.set_original_encoding(False, True, shared.original_character_set)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    position = image.TransformIndexToPhysicalPoint((0, 0, k))
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    ds.SliceThickness = _ds(spacing[2])
    ds.SpacingBetweenSlices = _ds(spacing[2])
    ds.SliceLocation = _ds(float(np.dot(position, np.cross(direction[:, 0], direction[:, 1]))))
    ds.Rows, ds.Columns = size[1], size[0]
    ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(pixels).astype("<u2").tobytes())  # PixelData
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds

"""Build synthetic single-frame MR series with realistic Siemens-like headers for tests.

Geometry comes from a SimpleITK image in LPS patient space: slice k is written with
IPP = physical point of index (0, 0, k) and IOP = the first two direction columns, so any oblique
orientation, PatientPosition, slice gap or missing slice can be produced. Several series share one study
(and frame of reference) when they are given the same ``StudyInfo``.

Conventions: ``shape`` is numpy order (slices, rows, columns); ``spacing`` is SimpleITK order
(column spacing along the row direction, row spacing along the column direction, slice spacing), in mm.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

SAGITTAL_IOP = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL_IOP = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)

HEAD_INTENSITY = 400.0
BRAIN_INTENSITY = 600.0
MARKER_INTENSITY = 2000.0
MAX_STORED_12BIT = 4095


@dataclass(frozen=True)
class StudyInfo:
    """Patient and study attributes shared by every series of one synthetic study."""

    study_uid: str = field(default_factory=lambda: str(generate_uid()))
    frame_of_reference_uid: str = field(default_factory=lambda: str(generate_uid()))
    patient_name: str = "Doe^Jane"
    patient_id: str = "PAT0001"
    patient_birth_date: str = "19710203"
    patient_sex: str = "F"
    patient_age: str = "053Y"
    patient_size: float = 1.68
    patient_weight: float = 62.0
    study_date: str = "20240315"
    study_time: str = "101500.000000"
    accession_number: str = "ACC0001"
    study_id: str = "1"
    study_description: str = "MRT Schaedel"
    referring_physician: str = "Ref^Doctor"
    institution_name: str = "Test Hospital"
    specific_character_set: str = "ISO_IR 100"


def make_study(**overrides: Any) -> StudyInfo:
    """A new study (fresh Study and Frame of Reference UIDs) with the given attribute overrides."""
    return replace(StudyInfo(), **overrides)


def oblique_iop(base: Sequence[float] = SAGITTAL_IOP, *, rotation_deg: Sequence[float] = (12.0, -8.0, 5.0)
                ) -> tuple[float, ...]:
    """``base`` IOP rotated about the patient L, P and S axes (in that order) by ``rotation_deg``."""
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*(math.radians(a) for a in rotation_deg))
    matrix = np.array(rotation.GetMatrix()).reshape(3, 3)
    row = matrix @ np.asarray(base[:3], dtype=float)
    column = matrix @ np.asarray(base[3:], dtype=float)
    return tuple(float(v) for v in (*row, *column))


def direction_from_iop(iop: Sequence[float]) -> tuple[float, ...]:
    """SimpleITK direction (row-major 3x3) with columns row cosine, column cosine, row x column."""
    row, column = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    matrix = np.column_stack([row, column, np.cross(row, column)])
    return tuple(float(v) for v in matrix.ravel())


def make_mr_volume_image(shape: Sequence[int] = (20, 64, 64), spacing: Sequence[float] = (1.0, 1.0, 3.0), *,
                         iop: Sequence[float] = SAGITTAL_IOP, ipp0: Sequence[float] | None = None,
                         centre_mm: Sequence[float] = (0.0, -10.0, 20.0),
                         marker_mm: Sequence[float] | None = None, seed: int = 0) -> sitk.Image:
    """A float32 head-like volume: an ellipsoid 'head' with a brighter 'brain', noise, and one bright voxel.

    ``ipp0`` is the position of voxel (0, 0, 0); by default the grid is centred on ``centre_mm``.
    ``marker_mm`` (LPS) sets the voxel nearest to it to MARKER_INTENSITY; ValueError if outside the grid.
    """
    slices, rows, columns = (int(v) for v in shape)
    size = (columns, rows, slices)
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(tuple(float(v) for v in spacing))
    direction = direction_from_iop(iop)
    image.SetDirection(direction)
    if ipp0 is None:
        half_extent = (np.array(size) - 1) * np.array(spacing, dtype=float) / 2.0
        ipp0 = np.asarray(centre_mm, dtype=float) - np.array(direction).reshape(3, 3) @ half_extent
    image.SetOrigin(tuple(float(v) for v in ipp0))

    k, j, i = np.meshgrid(*(np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in (slices, rows, columns)),
                          indexing="ij")
    radius = np.sqrt((i / 0.85) ** 2 + (j / 0.85) ** 2 + (k / 0.9) ** 2)
    rng = np.random.default_rng(seed)
    array = np.where(radius < 1.0, HEAD_INTENSITY, 0.0) + np.where(radius < 0.75, BRAIN_INTENSITY - HEAD_INTENSITY, 0)
    array = np.where(radius < 1.0, array + rng.normal(0.0, 15.0, array.shape), 0.0)
    array = np.clip(array, 0, None).astype(np.float32)
    if marker_mm is not None:
        index = image.TransformPhysicalPointToIndex(tuple(float(v) for v in marker_mm))
        if not all(0 <= index[a] < size[a] for a in range(3)):
            raise ValueError(f"marker {tuple(marker_mm)} lies outside the grid")
        array[index[2], index[1], index[0]] = MARKER_INTENSITY
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result


def brightest_point(image: sitk.Image) -> tuple[float, float, float]:
    """LPS physical point of the brightest voxel (the marker of ``make_mr_volume_image``)."""
    array = sitk.GetArrayViewFromImage(image)
    k, j, i = np.unravel_index(int(np.argmax(array)), array.shape)
    return tuple(float(v) for v in image.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))


def _ds(value: float) -> DSfloat:
    return DSfloat(round(float(value), 6), auto_format=True)


def siemens_mr_headers(series_description: str) -> dict[str, Any]:
    """Acquisition and equipment attributes like a Siemens Prisma 2D FLASH T1 (any can be overridden)."""
    return {
        "Manufacturer": "SIEMENS",
        "ManufacturerModelName": "Prisma",
        "SoftwareVersions": "syngo MR E11",
        "DeviceSerialNumber": "166001",
        "StationName": "AWP166001",
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"],
        "ScanningSequence": "GR",
        "SequenceVariant": ["SP", "OSP"],
        "ScanOptions": "",
        "MRAcquisitionType": "2D",
        "SequenceName": "*fl2d1",
        "AngioFlag": "N",
        "RepetitionTime": "250",
        "EchoTime": "2.48",
        "EchoTrainLength": 1,
        "NumberOfAverages": "1",
        "ImagingFrequency": "123.2",
        "ImagedNucleus": "1H",
        "MagneticFieldStrength": "3",
        "FlipAngle": "70",
        "PixelBandwidth": "320",
        "ReceiveCoilName": "Head_32",
        "TransmitCoilName": "Body",
        "InPlanePhaseEncodingDirection": "ROW",
        "ProtocolName": series_description,
        "BodyPartExamined": "BRAIN",
        "AcquisitionNumber": 1,
    }


def write_mr_series(image: sitk.Image, out_dir: Path, *, study: StudyInfo | None = None,
                    series_description: str = "t1_fl2d_sag", series_number: int = 2,
                    patient_position: str = "HFS", slice_thickness: float | None = None,
                    omit_slices: Collection[int] = (), header: Mapping[str, Any] | None = None,
                    series_uid: str | None = None) -> list[Path]:
    """Write ``image`` as single-frame MR Image Storage files (Explicit VR LE), one per slice k.

    Pixels are rounded and clipped to 0..4095 (12 bits stored). ``slice_thickness`` defaults to the slice
    spacing (set it smaller for a gap between slices); ``omit_slices`` (0-based k) leaves slices out, as
    a missing file would. ``header`` overrides or adds attributes by keyword (value None deletes).
    Files are named ``<SeriesNumber>_<InstanceNumber:04d>.dcm``.
    """
    if image.GetDimension() != 3:
        raise ValueError("image must be 3D")
    study = study or StudyInfo()
    series_uid = series_uid or str(generate_uid())
    size, spacing = image.GetSize(), image.GetSpacing()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    normal = np.cross(direction[:, 0], direction[:, 1])
    stored = np.rint(np.clip(sitk.GetArrayFromImage(image), 0, MAX_STORED_12BIT)).astype("<u2")
    nonzero = stored[stored > 0]
    low, high = (np.percentile(nonzero, (1, 99)) if nonzero.size else (0.0, 1.0))
    series_time = "102000.000000"
    attrs = siemens_mr_headers(series_description)
    attrs.update(header or {})

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(size[2]):
        if k in omit_slices:
            continue
        ds = Dataset()
        ds.SpecificCharacterSet = study.specific_character_set
        ds.InstanceCreationDate, ds.InstanceCreationTime = study.study_date, series_time
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
        ds.StudyTime, ds.SeriesTime = study.study_time, series_time
        ds.AcquisitionTime = ds.ContentTime = series_time
        ds.AccessionNumber = study.accession_number
        ds.Modality = "MR"
        ds.InstitutionName = study.institution_name
        ds.ReferringPhysicianName = study.referring_physician
        ds.StudyDescription = study.study_description
        ds.SeriesDescription = series_description
        ds.PatientName = study.patient_name
        ds.PatientID = study.patient_id
        ds.PatientBirthDate = study.patient_birth_date
        ds.PatientSex = study.patient_sex
        ds.PatientAge = study.patient_age
        ds.PatientSize = _ds(study.patient_size)
        ds.PatientWeight = _ds(study.patient_weight)
        ds.SliceThickness = _ds(slice_thickness if slice_thickness is not None else spacing[2])
        ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.PatientPosition = patient_position
        ds.StudyInstanceUID = study.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = study.study_id
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.FrameOfReferenceUID = study.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(np.dot(position, normal)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = size[1], size[0]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
        ds.AcquisitionMatrix = [0, size[0], size[1], 0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter = _ds((low + high) / 2)
        ds.WindowWidth = _ds(max(high - low, 1.0))
        for keyword, value in attrs.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"{series_number}_{k + 1:04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def make_mr_series(out_dir: Path, *, shape: Sequence[int] = (20, 64, 64), spacing: Sequence[float] = (1.0, 1.0, 3.0),
                   iop: Sequence[float] = SAGITTAL_IOP, ipp0: Sequence[float] | None = None,
                   patient_position: str = "HFS", series_description: str = "t1_fl2d_sag",
                   marker_mm: Sequence[float] | None = None, study: StudyInfo | None = None,
                   series_number: int = 2, slice_thickness: float | None = None,
                   omit_slices: Collection[int] = (), header: Mapping[str, Any] | None = None,
                   seed: int = 0) -> list[Path]:
    """A synthetic MR series on disk: ``make_mr_volume_image`` written by ``write_mr_series``."""
    image = make_mr_volume_image(shape, spacing, iop=iop, ipp0=ipp0, marker_mm=marker_mm, seed=seed)
    return write_mr_series(image, out_dir, study=study, series_description=series_description,
                           series_number=series_number, patient_position=patient_position,
                           slice_thickness=slice_thickness, omit_slices=omit_slices, header=header)

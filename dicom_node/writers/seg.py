"""DICOM Segmentation (BINARY) of the measured brain structures, pixel-aligned with its source T1 series.

One segment per structure of ``inference.labels.STRUCTURES`` present in the label volume, numbered in
ascending FreeSurfer code order. Codes that are not measured structures (vessels, extra-cerebral classes)
are not encoded. Each segment carries the structure's CID 7140 concept as SegmentedPropertyType, its side
as SegmentedPropertyTypeModifier (SNOMED CT Left/Right), its FreeSurfer name as TrackingID, its
FreeSurferColorLUT colour, and the model as algorithm (family: Artificial Intelligence).
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.uids import new_uid
from dicom_node.writers import WrittenSeries, equipment, write_single
from inference.labels import STRUCTURES, Structure, by_code, laterality_code
from inference.volume import FrameGeometry, frame_geometries

__all__ = ["GridMismatchError", "segment_codes", "write_seg"]

#: Largest distance (mm) between a source frame's position and the labels grid, and tolerance on cosines.
POSITION_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-4
CONTENT_LABEL = "BRAIN_STRUCTURES"

_FS_NAMES = {structure.freesurfer_name: code for code, structure in STRUCTURES.items()}


class GridMismatchError(ValueError):
    """The label volume is not on the grid of the source images."""


def _frames(sources: Sequence[Dataset]) -> list[FrameGeometry]:
    """Geometry of every source frame in the order highdicom expects pixel frames (sources, then frames)."""
    frames = [frame for n, ds in enumerate(sources) for frame in frame_geometries(ds, n)]
    for frame in frames:
        for keyword, value in (("ImagePositionPatient", frame.position), ("ImageOrientationPatient",
                               frame.orientation), ("PixelSpacing", frame.pixel_spacing)):
            if value is None:
                ds = sources[frame.dataset_index]
                raise GridMismatchError(f"source {ds.get('SOPInstanceUID')} frame {frame.frame_index + 1} "
                                        f"has no {keyword}")
    return frames


def _slice_indices(labels: sitk.Image, frames: Sequence[FrameGeometry]) -> list[int]:
    """Slice index k of the labels grid for each source frame; GridMismatchError unless one frame per slice."""
    size, spacing = labels.GetSize(), labels.GetSpacing()
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    indices = []
    for n, frame in enumerate(frames):
        if (frame.rows, frame.columns) != (size[1], size[0]):
            raise GridMismatchError(f"source frame {n + 1} is {frame.rows}x{frame.columns}, "
                                    f"labels slices are {size[1]}x{size[0]} (rows x columns)")
        if not np.allclose(frame.orientation, [*direction[:, 0], *direction[:, 1]], atol=ORIENTATION_TOLERANCE):
            raise GridMismatchError(f"source frame {n + 1} orientation {list(frame.orientation)} differs "
                                    "from the labels direction")
        if not np.allclose(frame.pixel_spacing, (spacing[1], spacing[0]), atol=POSITION_TOLERANCE_MM):
            raise GridMismatchError(f"source frame {n + 1} pixel spacing {frame.pixel_spacing} differs from the labels "
                                    f"spacing {(spacing[1], spacing[0])}")
        index = np.array(labels.TransformPhysicalPointToContinuousIndex(tuple(frame.position)))
        k = int(round(index[2]))
        offset = np.abs(np.array([index[0], index[1], index[2] - k])) * np.array(spacing)
        if not 0 <= k < size[2] or np.any(offset > POSITION_TOLERANCE_MM):
            raise GridMismatchError(f"source frame {n + 1} at {list(frame.position)} is not a slice of the "
                                    "labels grid")
        indices.append(k)
    if sorted(indices) != list(range(size[2])):
        raise GridMismatchError(f"the {len(frames)} source frames do not cover the {size[2]} label slices once each")
    return indices


def _with_shared_geometry(ds: Dataset) -> Dataset:
    """``ds``, or for an Enhanced source whose pixel measures or orientation are per frame only, a shallow
    copy with the first frame's moved into the shared groups (highdicom reads them only there; the grid
    check has already found them equal for every frame)."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return ds
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    first = ds.PerFrameFunctionalGroupsSequence[0]
    missing = [keyword for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence")
               if keyword not in shared and keyword in first]
    if not missing:
        return ds
    new_shared = copy.deepcopy(shared)
    for keyword in missing:
        setattr(new_shared, keyword, copy.deepcopy(first[keyword].value))
    # a new dataset sharing the other elements; the caller's dataset is left as it is
    patched = Dataset()
    for element in ds:
        if element.keyword != "SharedFunctionalGroupsSequence":
            patched.add(element)
    if hasattr(ds, "file_meta"):
        patched.file_meta = ds.file_meta
    patched.SharedFunctionalGroupsSequence = [new_shared]
    return patched


def _description(number: int, structure: Structure, algorithm: hd.AlgorithmIdentificationSequence,
                 uid_prefix: str | None) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure.display_name,
        segmented_property_category=structure.category,
        segmented_property_type=structure.concept,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=new_uid(uid_prefix),
        tracking_id=structure.freesurfer_name,
        display_color=hd.color.CIELabColor.from_rgb(*structure.rgb),
    )
    side = laterality_code(structure)
    if side is not None:
        # nested in the property type item (Segment Description macro)
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(side)]
    return description


def segment_codes(seg: Dataset) -> dict[int, int]:
    """FreeSurfer code -> segment number of a SEG written by :func:`write_seg` (from each TrackingID)."""
    mapping = {}
    for item in seg.SegmentSequence:
        code = _FS_NAMES.get(str(item.get("TrackingID", "")))
        if code is not None:
            mapping[code] = int(item.SegmentNumber)
    return mapping


def _label_array(labels: sitk.Image) -> np.ndarray:
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("labels must be a scalar 3D image")
    array = sitk.GetArrayFromImage(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must have an integer pixel type, got {array.dtype}")
    return array


def _segment_frames(array: np.ndarray, indices: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """(the segment number of each pixel of each source frame, frames in source order; the codes present,
    segment n being the n-th of them)."""
    values = set(np.unique(array).tolist())
    present = [code for code in STRUCTURES if code in values]
    if not present:
        raise ValueError("labels hold no measured structure: nothing to segment")
    lut = np.zeros(int(array.max()) + 1, dtype=np.uint8 if len(present) < 256 else np.uint16)
    for number, code in enumerate(present, start=1):
        lut[code] = number
    return lut[array][list(indices)], present


def write_seg(labels: sitk.Image, source_images: Sequence[Dataset], *, out_path: Path, series_number: int,
              series_description: str, algorithm_name: str, algorithm_version: str, uid_prefix: str | None,
              source_frames: Sequence[FrameGeometry] | None = None) -> WrittenSeries:
    """Write the measured structures of ``labels`` as a BINARY Segmentation of ``source_images``.

    ``labels`` (integer FreeSurfer codes) must lie on the grid of the source images: one source frame per
    labels slice k with IPP = physical point of (0, 0, k), IOP = the first two direction columns, the same
    rows, columns and pixel spacing; GridMismatchError otherwise. Empty frames are omitted.
    ``source_frames``: the geometry of the source frames in that order when the caller has it already
    (``LoadedSeries.source_frames()``), else it is read from ``source_images``.
    The result names the segment number of each FreeSurfer code (``segment_numbers``).
    """
    if not source_images:
        raise ValueError("no source images")
    array = _label_array(labels)
    frames = _frames(source_images) if source_frames is None else source_frames
    segments, present = _segment_frames(array, _slice_indices(labels, frames))

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version)
    descriptions = [_description(number, by_code(code), algorithm, uid_prefix)
                    for number, code in enumerate(present, start=1)]
    seg = hd.seg.Segmentation(
        source_images=[_with_shared_geometry(ds) for ds in source_images],
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=new_uid(uid_prefix),
        series_number=int(series_number),
        sop_instance_uid=new_uid(uid_prefix),
        instance_number=1,
        **equipment(algorithm_name, algorithm_version),
        device_serial_number=platform.node() or "unknown",
        content_label=CONTENT_LABEL,
        content_description=f"Brain structures by {algorithm_name} {algorithm_version}"[:64],
        omit_empty_frames=True,
        series_description=series_description[:64],
    )
    return write_single(seg, out_path,
                        segment_numbers={code: number for number, code in enumerate(present, start=1)})

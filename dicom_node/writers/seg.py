"""DICOM Segmentation (BINARY) of the measured brain structures, pixel-aligned with its source T1 series.

One segment per structure of ``inference.labels.STRUCTURES`` present in the label volume, numbered in
ascending FreeSurfer code order. Codes that are not measured structures (vessels, extra-cerebral classes)
are not encoded. Each segment carries the structure's CID 7140 concept as SegmentedPropertyType, its side
as SegmentedPropertyTypeModifier (SNOMED CT Left/Right), its FreeSurfer name as TrackingID, its
FreeSurferColorLUT colour, and the model as algorithm (family: Artificial Intelligence).
"""

from __future__ import annotations

import copy
import functools
import platform
import struct
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, correct_ambiguous_vr_element, write_data_element
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.valuerep import AMBIGUOUS_VR

from dicom_node.uids import new_uid
from dicom_node.writers import WrittenSeries, equipment, gc_paused, identity_ready, write_single
from inference.labels import (
    LOBE_CORTEX_CODES,
    STRUCTURES,
    Structure,
    by_code,
    code_counts,
    label_codes,
    laterality_code,
)
from inference.volume import FrameGeometry, frame_geometries, shallow_copy

__all__ = ["GridMismatchError", "segment_codes", "write_seg"]

#: Largest distance (mm) between a source frame's position and the labels grid, and tolerance on cosines.
POSITION_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-4
CONTENT_LABEL = "BRAIN_STRUCTURES"
PER_FRAME_TAG = 0x52009230  # PerFrameFunctionalGroupsSequence

_FS_NAMES = {structure.freesurfer_name: code for code, structure in STRUCTURES.items()}


class GridMismatchError(ValueError):
    """The label volume is not on the grid of the source images."""


_IS_MULTIFRAME_IMAGE = hd.utils.is_multiframe_image


@functools.lru_cache(maxsize=64)
def _multiframe_class(sop_class_uid: str) -> bool:
    probe = Dataset()
    probe.SOPClassUID = sop_class_uid
    return bool(_IS_MULTIFRAME_IMAGE(probe))


def _is_multiframe_image(dataset: Dataset) -> bool:
    """highdicom's ``is_multiframe_image`` (whether the SOP class's IOD has Number of Frames), once per SOP class:
    highdicom asks it of every source image of a SEG (a walk through the IOD's modules, 0.5 ms each)."""
    return _multiframe_class(str(dataset.SOPClassUID))


# the answer depends on the SOP Class UID only; highdicom.utils.get_plane_positions_of_series asks it per image
hd.utils.is_multiframe_image = _is_multiframe_image


class _WrittenSegmentation(hd.seg.Segmentation):
    """highdicom's Segmentation, built to be written: without the look-up tables that highdicom builds at the end
    of its constructor for reading frames back (an in-memory SQLite table of every frame, a tenth of building a
    SEG of 30 structures). Nothing reads this object's frames: it is encoded and written, then dropped."""

    def _build_luts(self) -> None:
        return None


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
    # a new dataset sharing the other elements (setting an element both held would change the caller's too)
    patched = shallow_copy(ds, drop=[Tag("SharedFunctionalGroupsSequence")])
    patched.SharedFunctionalGroupsSequence = [new_shared]
    return patched


def _description(number: int, structure: Structure, algorithm: hd.AlgorithmIdentificationSequence,
                 uid_prefix: str | None) -> hd.seg.SegmentDescription:
    lobe = structure.code in LOBE_CORTEX_CODES
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure.display_name,
        segmented_property_category=structure.category,
        # a lobe's cortex is cerebral cortex in that lobe (as the SR codes it): typed as the lobe, a viewer showed
        # it as the whole lobe, white matter included (88 ml of "Frontal lobe" reads as severe atrophy)
        segmented_property_type=codes.SCT.CerebralCortex if lobe else structure.concept,
        anatomic_regions=[structure.concept] if lobe else None,
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


def _segment_frames(array: np.ndarray, indices: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """(the segment number of each pixel of each source frame, frames in source order; the codes present,
    segment n being the n-th of them)."""
    counts = code_counts(array)
    present = [code for code in STRUCTURES if code in counts]
    if not present:
        raise ValueError("labels hold no measured structure: nothing to segment")
    lut = np.zeros(max(counts) + 1, dtype=np.uint8 if len(present) < 256 else np.uint16)
    for number, code in enumerate(present, start=1):
        lut[code] = number
    return lut[array[list(indices)]], present


@gc_paused()
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
    array = label_codes(labels)
    frames = _frames(source_images) if source_frames is None else source_frames
    segments, present = _segment_frames(array, _slice_indices(labels, frames))

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version)
    descriptions = [_description(number, by_code(code), algorithm, uid_prefix)
                    for number, code in enumerate(present, start=1)]
    seg = _WrittenSegmentation(
        source_images=[identity_ready(_with_shared_geometry(ds)) for ds in source_images],
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
    return write_single(seg, out_path, encoded=per_frame_encoded(seg),
                        segment_numbers={code: number for number, code in enumerate(present, start=1)})


_ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
_ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def per_frame_encoded(ds: Dataset) -> Dataset:
    """A shallow copy of ``ds`` that pydicom writes byte for byte as it writes ``ds`` (Explicit VR Little Endian),
    with its Per-frame Functional Groups Sequence encoded here already.

    That sequence holds an item per frame (a thousand and more for 30 structures) of a few small nested items,
    most of which repeat (highdicom shares the source slice's Plane Position and Source Image items, and the
    derivation code, between the frames of that slice): encoded once each, by pydicom, and joined, instead
    of pydicom encoding every one again and checking each for ambiguous VRs (two thirds of writing the SEG).
    """
    out = Dataset({element.tag: element for element in ds.elements()})
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    element = out.get_item(PER_FRAME_TAG)
    if element is None or element.is_raw:
        return out
    del out[PER_FRAME_TAG]
    correct_ambiguous_vr(out, True)  # what pydicom does on writing; then nothing is left to correct
    encodings = convert_encodings(out.get("SpecificCharacterSet", default_encoding))
    value = _sequence_value(element, encodings, {})
    out[PER_FRAME_TAG] = RawDataElement(PER_FRAME_TAG, "SQ", 0xFFFFFFFF if element.is_undefined_length else len(value),
                                        value, 0, False, True)
    out.set_original_encoding(False, True, out._character_set)
    return out


def _sequence_value(element: DataElement, encodings: list[str], memo: dict[int, bytes]) -> bytes:
    """The items of a sequence element as pydicom's write_sequence writes them (without the element's header)."""
    parts = []
    for item in element.value:
        content = _item_content(item, encodings, memo)
        if getattr(item, "is_undefined_length_sequence_item", False):
            parts += [_ITEM, content, _ITEM_END]
        else:
            parts += [struct.pack("<HHL", 0xFFFE, 0xE000, len(content)), content]
    return b"".join(parts)


def _item_content(item: Dataset, encodings: list[str], memo: dict[int, bytes]) -> bytes:
    """An item's data set as pydicom's write_dataset encodes it; each item object is encoded once."""
    cached = memo.get(id(item))
    if cached is not None:
        return cached
    charset = item.get("SpecificCharacterSet")
    item_encodings = encodings if charset is None else convert_encodings(charset)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    for tag in sorted(item.keys()):
        if tag.element == 0 and tag.group > 6:  # retired group lengths are not written
            continue
        element = item[tag]
        fast = _binary_integers(element)
        if fast is not None:
            fp.write(fast)
        elif element.VR == "SQ":
            _write_sequence(fp, element, item_encodings, memo)
        else:
            if element.VR in AMBIGUOUS_VR:  # as pydicom's write_dataset corrects it
                element = correct_ambiguous_vr_element(element, item, True)
            write_data_element(fp, element, item_encodings)
    memo[id(item)] = fp.getvalue()
    return memo[id(item)]


def _write_sequence(fp: DicomBytesIO, element: DataElement, encodings: list[str], memo: dict[int, bytes]) -> None:
    """A sequence element (Explicit VR Little Endian) as pydicom's write_data_element writes it."""
    value = _sequence_value(element, encodings, memo)
    fp.write_tag(element.tag)
    fp.write(b"SQ\x00\x00")
    fp.write_UL(0xFFFFFFFF if element.is_undefined_length else len(value))
    fp.write(value)
    if element.is_undefined_length:
        fp.write(_SEQUENCE_END)


#: Binary integer VRs encoded here (most of the per-frame items: Dimension Index Values, Referenced Segment
#: Number): struct format and the largest value.
_INTEGER_VRS = {"US": ("H", 0xFFFF), "UL": ("L", 0xFFFFFFFF)}


def _binary_integers(element: DataElement) -> bytes | None:
    """A US or UL element (Explicit VR Little Endian, 2-byte length) as pydicom writes it; None for any other
    element, or one whose value pydicom would refuse or write otherwise (left to pydicom)."""
    spec = _INTEGER_VRS.get(element.VR)
    if spec is None or element.is_raw:
        return None
    value = element.value
    values = [] if value is None else [value] if isinstance(value, int) else list(value)
    if not all(type(v) is int and 0 <= v <= spec[1] for v in values) or len(values) * struct.calcsize(spec[0]) > 0xFFFF:
        return None
    body = struct.pack(f"<{len(values)}{spec[0]}", *values)
    return struct.pack("<HH2sH", element.tag.group, element.tag.element, element.VR.encode(), len(body)) + body

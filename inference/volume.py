"""DICOM series <-> SimpleITK image with patient (LPS) geometry taken from IPP/IOP/PixelSpacing.

The image is assembled from decoded frames with numpy; SimpleITK only carries the geometry.
Single-frame MR (any IOP, any PatientPosition) and Enhanced MR (per-frame functional groups) are supported;
pixel decoding is pydicom's (with the pylibjpeg plugins for compressed transfer syntaxes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.tag import BaseTag

__all__ = [
    "FrameGeometry",
    "GeometryError",
    "LoadedSeries",
    "SliceGeometry",
    "frame_geometries",
    "isotropic_grid",
    "load_series",
    "resample_isotropic",
    "series_geometry",
]

IOP_TOLERANCE = 1e-3          # per direction-cosine component
PIXEL_SPACING_TOLERANCE = 1e-3  # mm
POSITION_TOLERANCE_MM = 0.05  # absolute floor for position checks
SPACING_TOLERANCE_FRACTION = 0.1


class GeometryError(ValueError):
    """Inconsistent orientation, duplicate/missing positions, gaps or mixed sizes in a series."""


@dataclass(frozen=True)
class FrameGeometry:
    """Plane geometry of one frame: file index, frame index (0-based) and its plane attributes."""

    dataset_index: int
    frame_index: int
    position: tuple[float, float, float] | None       # ImagePositionPatient
    orientation: tuple[float, ...] | None             # ImageOrientationPatient (6 values)
    pixel_spacing: tuple[float, float] | None         # (row spacing, column spacing) mm
    slice_thickness: float | None
    rows: int | None
    columns: int | None
    rescale_slope: float
    rescale_intercept: float


@dataclass
class SliceGeometry:
    """Stack geometry of a series, computed from headers only.

    ``frames`` and ``positions`` are in slice order (increasing along ``normal``);
    ``problems`` is empty when the series forms one regular, gap-free stack.
    """

    frames: list[FrameGeometry]
    positions: np.ndarray             # (n, 3) IPP in slice order
    row_cosine: np.ndarray            # (3,) direction of increasing column index
    column_cosine: np.ndarray         # (3,) direction of increasing row index
    normal: np.ndarray                # (3,) row x column; slices increase along it
    spacing: float                    # slice spacing (mm) from positions, SliceThickness for one slice
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    rows: int
    columns: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def direction(self) -> tuple[float, ...]:
        """SimpleITK direction (row-major 3x3) with columns row cosine, column cosine, normal."""
        return tuple(np.column_stack([self.row_cosine, self.column_cosine, self.normal]).ravel().tolist())

    @property
    def sitk_spacing(self) -> tuple[float, float, float]:
        return (self.pixel_spacing[1], self.pixel_spacing[0], self.spacing)


@dataclass
class LoadedSeries:
    image: sitk.Image                      # float32, LPS; rescale applied
    datasets: list[Dataset]                # headers without pixel data, in slice order (one per file)
    source_refs: list[tuple[str, str]]     # (SOPClassUID, SOPInstanceUID) of every source instance
    geometry: SliceGeometry | None = None  # the stack geometry the image was built from

    def source_frames(self) -> list[FrameGeometry] | None:
        """The geometry of every frame of :attr:`datasets`, in their order (data set, then frame), with
        ``dataset_index`` into :attr:`datasets`: what a writer of objects referencing the frames needs,
        without computing it again. None without :attr:`geometry`."""
        if self.geometry is None:
            return None
        file_order = list(dict.fromkeys(f.dataset_index for f in self.geometry.frames))
        position = {index: n for n, index in enumerate(file_order)}
        frames = [replace(f, dataset_index=position[f.dataset_index]) for f in self.geometry.frames]
        return sorted(frames, key=lambda f: (f.dataset_index, f.frame_index))


def _floats(value: object) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None


def _item(ds: Dataset | None, sequence: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(sequence)
    if seq is None or len(seq) == 0:
        return None
    return seq[0]


def _functional(groups: tuple[Dataset | None, Dataset | None], sequence: str) -> Dataset | None:
    """Item of a functional group macro: per-frame first, then shared."""
    for group in groups:
        item = _item(group, sequence)
        if item is not None:
            return item
    return None


def _optional_float(value: object) -> float | None:
    try:
        return None if value is None or value == "" else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def frame_geometries(ds: Dataset, dataset_index: int = 0) -> list[FrameGeometry]:
    """Plane geometry of every frame of one dataset (one entry for a single-frame image)."""
    rows = ds.get("Rows")
    columns = ds.get("Columns")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        spacing = _floats(ds.get("PixelSpacing"))
        return [
            FrameGeometry(
                dataset_index=dataset_index,
                frame_index=0,
                position=_floats(ds.get("ImagePositionPatient")),  # type: ignore[arg-type]
                orientation=_floats(ds.get("ImageOrientationPatient")),
                pixel_spacing=spacing[:2] if spacing and len(spacing) >= 2 else None,  # type: ignore[arg-type]
                slice_thickness=_optional_float(ds.get("SliceThickness")),
                rows=int(rows) if rows is not None else None,
                columns=int(columns) if columns is not None else None,
                rescale_slope=_optional_float(ds.get("RescaleSlope")) or 1.0,
                rescale_intercept=_optional_float(ds.get("RescaleIntercept")) or 0.0,
            )
        ]
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    result = []
    for index, frame_group in enumerate(per_frame):
        groups = (frame_group, shared)
        position = _functional(groups, "PlanePositionSequence")
        orientation = _functional(groups, "PlaneOrientationSequence")
        measures = _functional(groups, "PixelMeasuresSequence")
        transform = _functional(groups, "PixelValueTransformationSequence")
        spacing = _floats(measures.get("PixelSpacing")) if measures is not None else None
        result.append(
            FrameGeometry(
                dataset_index=dataset_index,
                frame_index=index,
                position=_floats(position.get("ImagePositionPatient")) if position else None,  # type: ignore[arg-type]
                orientation=_floats(orientation.get("ImageOrientationPatient")) if orientation else None,
                pixel_spacing=spacing[:2] if spacing and len(spacing) >= 2 else None,  # type: ignore[arg-type]
                slice_thickness=_optional_float(measures.get("SliceThickness")) if measures else None,
                rows=int(rows) if rows is not None else None,
                columns=int(columns) if columns is not None else None,
                rescale_slope=(_optional_float(transform.get("RescaleSlope")) if transform else None)
                or _optional_float(ds.get("RescaleSlope"))
                or 1.0,
                rescale_intercept=(_optional_float(transform.get("RescaleIntercept")) if transform else None)
                or _optional_float(ds.get("RescaleIntercept"))
                or 0.0,
            )
        )
    return result


def _orthonormal_cosines(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:6], dtype=float)
    row = row / np.linalg.norm(row)
    col = col - row * float(row @ col)
    col = col / np.linalg.norm(col)
    return row, col, np.cross(row, col)


def _frame_count_problems(headers: Sequence[Dataset]) -> list[str]:
    problems = []
    for i, ds in enumerate(headers):
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        if n_frames > 1 and "PerFrameFunctionalGroupsSequence" not in ds:
            problems.append(f"file {i + 1} has {n_frames} frames but no PerFrameFunctionalGroupsSequence")
        elif "PerFrameFunctionalGroupsSequence" in ds and len(ds.PerFrameFunctionalGroupsSequence) != n_frames:
            problems.append(f"file {i + 1}: NumberOfFrames {n_frames} differs from the "
                            f"{len(ds.PerFrameFunctionalGroupsSequence)} per-frame functional groups")
    return problems


def _missing_problems(frames: Sequence[FrameGeometry]) -> list[str]:
    problems = []
    for name, attr in (("ImagePositionPatient", "position"), ("ImageOrientationPatient", "orientation"),
                       ("PixelSpacing", "pixel_spacing"), ("Rows", "rows"), ("Columns", "columns")):
        missing = [k + 1 for k, f in enumerate(frames) if getattr(f, attr) is None]
        if missing:
            problems.append(f"{name} missing in {len(missing)} of {len(frames)} frames (first: frame {missing[0]})")
    if problems:
        return problems
    # a header may hold any number of values, and nan or inf: never a geometry, and never an exception
    for name, attr, size in (("ImagePositionPatient", "position", 3), ("ImageOrientationPatient", "orientation", 6),
                             ("PixelSpacing", "pixel_spacing", 2)):
        wrong = [k + 1 for k, f in enumerate(frames)
                 if len(getattr(f, attr)) != size or not all(math.isfinite(v) for v in getattr(f, attr))]
        if wrong:
            problems.append(f"{name} is not {size} finite numbers in {len(wrong)} of {len(frames)} frames "
                            f"(first: frame {wrong[0]})")
    if not problems:
        wrong = [k + 1 for k, f in enumerate(frames) if min(f.pixel_spacing) <= 0]
        if wrong:
            problems.append(f"PixelSpacing is not positive in {len(wrong)} of {len(frames)} frames "
                            f"(first: frame {wrong[0]}: {list(frames[wrong[0] - 1].pixel_spacing)})")
    return problems


def _cosines(frames: Sequence[FrameGeometry], problems: list[str]) -> tuple[np.ndarray, ...] | None:
    """(row, column, normal) of the first frame's orientation; None (with the problem) when it is unusable.
    A mix of orientations is added to ``problems`` too."""
    iops = np.array([f.orientation for f in frames], dtype=float)
    if iops.shape[1] != 6:
        problems.append("ImageOrientationPatient does not have 6 values")
        return None
    if np.any(np.abs(iops - iops[0]) > IOP_TOLERANCE):
        distinct = {tuple(np.round(v, 3)) for v in iops}
        problems.append(f"mixed ImageOrientationPatient ({len(distinct)} different orientations)")
    row_norm, col_norm = np.linalg.norm(iops[0, :3]), np.linalg.norm(iops[0, 3:])
    if abs(row_norm - 1) > 0.01 or abs(col_norm - 1) > 0.01 or abs(iops[0, :3] @ iops[0, 3:]) > 0.01:
        problems.append(f"ImageOrientationPatient is not two orthogonal unit vectors: {list(iops[0])}")
        return None
    return _orthonormal_cosines(iops[0])


def _stack_spacing(distances: np.ndarray, positions: np.ndarray, in_plane_axes: np.ndarray,
                   pixel_spacing: np.ndarray, problems: list[str]) -> float:
    """The median step between slice positions (sorted along the normal); duplicates, gaps, uneven steps and
    slices shifted in-plane are added to ``problems``."""
    steps = np.diff(distances)
    duplicates = np.flatnonzero(steps < POSITION_TOLERANCE_MM)
    for k in duplicates[:5]:
        problems.append(f"duplicate position at slice {k + 1} and {k + 2} ({positions[k].round(3).tolist()})")
    if len(duplicates) > 5:
        problems.append(f"{len(duplicates)} duplicate positions in total")
    distinct_steps = steps[steps >= POSITION_TOLERANCE_MM]
    spacing = float(np.median(distinct_steps)) if distinct_steps.size else 1.0
    tolerance = max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * spacing)
    skip = set(duplicates.tolist())
    irregular = [k for k in range(len(steps)) if k not in skip and abs(steps[k] - spacing) > tolerance]
    for k in irregular[:5]:
        kind = "gap" if steps[k] > spacing else "uneven spacing"
        problems.append(f"{kind} between slice {k + 1} and {k + 2} ({steps[k]:.3g} mm, expected {spacing:.3g} mm)")
    if len(irregular) > 5:
        problems.append(f"{len(irregular)} irregular slice steps in total")
    if not skip and not irregular and len(distances) > 2:
        # the volume puts slice k at first + k * spacing: the spacing that fits every position best (least
        # squares through the first), not the median step, which positions written with few decimals bias
        # enough to add up to a millimetre over 250 slices. Each step within the tolerance, the steps may still
        # add up: a stack of 5.0 mm steps, then 5.4 mm ones, would put its last slice 3 mm off.
        k = np.arange(len(distances), dtype=float)
        spacing = float((k @ (distances - distances[0])) / (k @ k))
        drift = distances - (distances[0] + spacing * k)
        worst = int(np.argmax(np.abs(drift)))
        if abs(drift[worst]) > tolerance:
            problems.append(f"slice positions drift from an even spacing of {spacing:.3g} mm: slice {worst + 1} "
                            f"is {drift[worst]:+.3g} mm off (the spacing changes within the stack)")
    shift = float(np.abs((positions - positions[0]) @ in_plane_axes).max())
    if shift > max(POSITION_TOLERANCE_MM, 0.1 * min(pixel_spacing)):
        problems.append(f"slices are not stacked along the slice normal (in-plane shift up to {shift:.3g} mm)")
    return spacing


def series_geometry(headers: Sequence[Dataset]) -> SliceGeometry:
    """Stack geometry of a series from headers only (pixels not needed); never raises.

    Frames are sorted by the projection of IPP on the slice normal (row cosine x column cosine).
    Inconsistencies are listed in ``problems`` as sentences.
    """
    frames = [f for i, ds in enumerate(headers) for f in frame_geometries(ds, i)]
    problems = _frame_count_problems(headers) + ([] if frames else ["no images in series"])
    problems += [] if problems else _missing_problems(frames)
    cosines = None if problems else _cosines(frames, problems)
    if cosines is None:
        return SliceGeometry(
            frames=frames, positions=np.zeros((0, 3)), row_cosine=np.array([1.0, 0, 0]),
            column_cosine=np.array([0, 1.0, 0]), normal=np.array([0, 0, 1.0]), spacing=1.0,
            pixel_spacing=(1.0, 1.0), rows=0, columns=0, problems=problems,
        )
    row, col, normal = cosines
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) > 1:
        problems.append(f"mixed Rows/Columns: {sorted(sizes)}")
    spacings = np.array([f.pixel_spacing for f in frames], dtype=float)
    if np.any(np.abs(spacings - spacings[0]) > PIXEL_SPACING_TOLERANCE):
        problems.append(f"mixed PixelSpacing: {sorted({tuple(s) for s in spacings.tolist()})}")

    raw_positions = np.array([f.position for f in frames], dtype=float)
    order = np.argsort(raw_positions @ normal, kind="stable")
    frames = [frames[i] for i in order]
    positions = raw_positions[order]
    if len(frames) == 1:
        thickness = frames[0].slice_thickness
        spacing = thickness if thickness and thickness > 0 else 1.0
    else:
        spacing = _stack_spacing(positions @ normal, positions, np.column_stack([row, col]), spacings[0], problems)
    return SliceGeometry(
        frames=frames, positions=positions, row_cosine=row, column_cosine=col, normal=normal,
        spacing=float(spacing), pixel_spacing=(float(spacings[0][0]), float(spacings[0][1])),
        rows=int(frames[0].rows), columns=int(frames[0].columns), problems=problems,  # type: ignore[arg-type]
    )


#: PixelData, FloatPixelData, DoubleFloatPixelData
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def shallow_copy(ds: Dataset, *, drop: Iterable[BaseTag] = ()) -> Dataset:
    """A new data set sharing the elements of ``ds`` but those tagged ``drop`` (and its file meta, if any):
    elements set or replaced in it leave ``ds`` as it is.

    The elements are taken as they are, not converted: a raw (still encoded) element stays raw, so a
    Source Image Sequence of hundreds of items, say, is not parsed just to be copied.
    """
    dropped = set(drop)
    # built from the elements' dict as pydicom's reader does (its item assignment converts private elements)
    copy = Dataset({element.tag: element for element in ds.elements() if element.tag not in dropped})
    if hasattr(ds, "file_meta"):
        copy.file_meta = ds.file_meta
    return copy


def without_pixels(ds: Dataset) -> Dataset:
    """``ds`` without its pixel data: a :func:`shallow_copy` sharing the other elements."""
    return shallow_copy(ds, drop=PIXEL_TAGS)


def _header(ds: Dataset) -> Dataset:
    """A copy of the dataset without its pixel data (file meta kept)."""
    header = without_pixels(ds)
    if not hasattr(header, "file_meta"):
        header.file_meta = pydicom.dataset.FileMetaDataset()
    return header


def load_series(paths: Sequence[Path]) -> LoadedSeries:
    """Read a series (single-frame files or Enhanced MR multi-frame) into a float32 LPS image.

    Raises GeometryError when the frames do not form one regular stack.
    """
    if not paths:
        raise GeometryError("no files given")
    datasets = [pydicom.dcmread(Path(p)) for p in paths]
    geometry = series_geometry(datasets)
    if geometry.problems:
        raise GeometryError("; ".join(geometry.problems))
    _check_one_acquisition(datasets)

    frame_counts = [int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets]
    for ds in datasets:
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise GeometryError(f"SamplesPerPixel {ds.SamplesPerPixel} not supported (grayscale only)")
    volume = np.empty((len(geometry.frames), geometry.rows, geometry.columns), dtype=np.float32)
    by_file: dict[int, list[tuple[int, FrameGeometry]]] = {}
    for k, frame in enumerate(geometry.frames):
        by_file.setdefault(frame.dataset_index, []).append((k, frame))
    for index, frames in by_file.items():  # file by file (multi-frame files may interleave in space)
        pixels = pixel_array(datasets[index])  # not kept on the data set (Dataset.pixel_array keeps it)
        if frame_counts[index] == 1:
            pixels = pixels[np.newaxis]
        for k, frame in frames:
            plane = pixels[frame.frame_index].astype(np.float32)
            volume[k] = plane * np.float32(frame.rescale_slope) + np.float32(frame.rescale_intercept)
        del pixels  # one decoded file in memory at a time

    image = sitk.GetImageFromArray(volume, isVector=False)
    image.SetOrigin(tuple(float(v) for v in geometry.positions[0]))
    image.SetSpacing(geometry.sitk_spacing)
    image.SetDirection(geometry.direction)

    file_order = list(dict.fromkeys(f.dataset_index for f in geometry.frames))
    headers = [_header(datasets[i]) for i in file_order]
    refs = [(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in headers]
    return LoadedSeries(image=image, datasets=headers, source_refs=refs, geometry=geometry)


#: What every image of one series shares: a series mixing them (a SeriesInstanceUID reused by a faulty anonymiser or
#: tool) would make one volume of two patients or two scans, labelled as the first image's.
ONE_ACQUISITION = ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID")


def _check_one_acquisition(datasets: Sequence[Dataset]) -> None:
    """GeometryError when the images of a series name more than one patient, study or frame of reference."""
    for keyword in ONE_ACQUISITION:
        values = {str(ds.get(keyword, "") or "").strip() for ds in datasets}
        if len(values) > 1:
            shown = ", ".join(repr(v) for v in sorted(values)[:3])
            raise GeometryError(f"the series mixes {len(values)} different {keyword} ({shown}): one volume "
                                "cannot be made of two patients, studies or scans")


def isotropic_grid(image: sitk.Image, spacing_mm: float = 1.0) -> sitk.Image:
    """Empty float32 image with isotropic spacing, the input's direction, covering the input's field of view.

    The field of view is the voxel-edge extent (size x spacing per axis); the new grid is centred on it.
    """
    size, spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
    extent = size * spacing
    new_size = np.maximum(1, np.ceil(extent / spacing_mm - 1e-3)).astype(int)
    # continuous index of the new grid's first voxel centre, in input voxel units
    offset_mm = (size - 1) * spacing / 2.0 - (new_size - 1) * spacing_mm / 2.0
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ offset_mm
    grid = sitk.Image([int(v) for v in new_size], sitk.sitkFloat32)
    grid.SetSpacing((float(spacing_mm),) * 3)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin(tuple(float(v) for v in origin))
    return grid


def resample_isotropic(image: sitk.Image, spacing_mm: float = 1.0, *,
                       interpolator: int = sitk.sitkLinear) -> sitk.Image:
    """Resample to isotropic ``spacing_mm`` keeping direction cosines and field of view (linear by default)."""
    if spacing_mm <= 0 or not math.isfinite(spacing_mm):
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    reference = isotropic_grid(image, spacing_mm)
    output_type = image.GetPixelID() if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, output_type)


def mirror_left_right(image: sitk.Image) -> sitk.Image:
    """The same voxels mirrored left-right in patient space (x -> -x in LPS): origin and direction change, the
    voxel array does not. Mirroring twice gives the image back exactly."""
    out = sitk.Image(image)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    direction[0, :] *= -1
    origin = np.array(image.GetOrigin())
    origin[0] *= -1
    out.SetDirection(tuple(direction.ravel()))
    out.SetOrigin(tuple(origin))
    return out

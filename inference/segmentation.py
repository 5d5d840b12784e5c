"""One T1 volume through the brain segmenter: conform, crop to the head, ONNX, labels back on a target grid.

The segmenter (a ``task = "segmentation"`` manifest, e.g. the converted brainchop MeshNet) runs the same way on a
real T1 and on a synthetic sT1, so that their labels can be compared (the seeds' protocol):

1. conform: resample to the manifest's grid (``grid = "conform"``: FreeSurfer's 256³ 1 mm axis-aligned grid in the
   manifest orientation, centred on the input's field of view) and normalise (``conform_uint8``: FreeSurfer's
   uchar scaling, then min-max to 0..1);
2. crop to the head (largest Otsu component, ``foreground_margin`` voxels around it), at most ``head_box_mm`` below
   its top, so that the network does not spend time on the neck;
3. run the graph once on the box (``class_index`` graphs return the label per voxel; logits graphs are reduced
   with an argmax), map channels to FreeSurfer codes and those to measured codes (``inference.labels``);
4. keep the largest 26-connected component of labelled voxels (what lies apart from it is not brain: it is
   removed and its volume reported), and resample the labels (nearest neighbour) onto the target grid;
5. the intracranial mask: the brain mask closed over sulci and ventricles, holes filled, grown by the CSF layer
   (2 mm grid; see :func:`intracranial_mask`).

Every step maps a head mirrored left-right in patient space to the mirrored result (the conformed grid of a
mirrored head is the mirrored grid, the box is found on block means of a size that divides the grid), so a
mirror-averaged graph (``inference.training.tfjs_convert``) gives mirrored labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from inference.labels import region_codes
from inference.models import InputSpec, LoadedModel, ModelError
from inference.pipeline import argmax_channels, foreground_box, normalize, stage_timer

__all__ = [
    "ICV_CLOSING_MM",
    "ICV_CSF_MM",
    "BrainSegmentation",
    "conform_grid",
    "conform_intensities",
    "intracranial_mask",
    "largest_component",
    "segment",
]

log = logging.getLogger(__name__)

#: the intracranial mask closes the brain mask with a ball of this radius (sulci, cisterns) ...
ICV_CLOSING_MM = 8.0
#: ... and grows it by this much (the CSF between brain and skull); calibrated on the SynthSeg label maps, whose
#: intracranial volume is known (docs/volumetry.md)
ICV_CSF_MM = 2.0
_ICV_GRID_MM = 2.0
#: slabs the class-index graphs of inference.training.import_meshnet split the last tensor axis into
SLABS = 8


@dataclass
class BrainSegmentation:
    labels: sitk.Image                 # uint16 measured codes (inference.labels), on the target grid
    brain_mask: sitk.Image             # uint8 0/1 on the target grid: the labelled voxels
    icv_ml: float                      # intracranial volume (intracranial_mask of the brain mask)
    outside_ml: float                  # labelled volume apart from the brain, removed
    timings: dict[str, float] = field(default_factory=dict)


def _orientation_direction(orientation: str) -> tuple[float, ...]:
    """Direction matrix (columns = axes, LPS physical space) of an axis-aligned image in ``orientation``."""
    vectors = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
    columns = np.array([vectors[c] for c in orientation], dtype=float).T
    return tuple(columns.ravel())


def conform_grid(image: sitk.Image, spec: InputSpec) -> sitk.Image:
    """The empty conformed grid: ``conform_size`` voxels of ``spacing_mm`` per axis, axis-aligned in the manifest
    orientation, centred on the centre of ``image``'s field of view."""
    size = [spec.conform_size] * 3
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    direction = _orientation_direction(spec.orientation)
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([spec.spacing_mm] * 3)
    grid.SetDirection(direction)
    half = (np.array(size) - 1) / 2 * spec.spacing_mm
    grid.SetOrigin(tuple(centre - np.array(direction).reshape(3, 3) @ half))
    return grid


def conform_intensities(array: np.ndarray) -> np.ndarray:
    """FreeSurfer's conform to uchar (FastSurfer ``getscale`` with f_low 0, f_high 0.999: the global minimum to
    0, the 99.9th percentile of the non-zero voxels from a 1000-bin histogram to 255, clipped and truncated),
    then min-max to 0..1, as the segmenter saw its training volumes."""
    array = np.asarray(array, dtype=np.float32)
    low = float(array.min())
    nonzero = array[array != 0]
    if nonzero.size == 0:
        return np.zeros_like(array)
    hist, edges = np.histogram(nonzero, bins=1000)
    cumulative = np.cumsum(hist) / nonzero.size
    high = float(edges[min(int(np.searchsorted(cumulative, 0.999)) + 1, len(edges) - 1)])
    if high <= low:
        return np.zeros_like(array)
    uchar = np.floor(np.clip((array - low) * np.float32(255.0 / (high - low)), 0, 255))
    top, bottom = float(uchar.max()), float(uchar.min())
    if top <= bottom:
        return np.zeros_like(array)
    return ((uchar - bottom) / np.float32(top - bottom)).astype(np.float32)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean array (all False if it is empty)."""
    if not mask.any():
        return mask.copy()
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    components = sitk.RelabelComponent(components, sortByObjectSize=True)
    return sitk.GetArrayViewFromImage(components) == 1


def intracranial_mask(brain: sitk.Image) -> sitk.Image:
    """The intracranial space around a brain mask, on a 2 mm grid: closed with a ball of ICV_CLOSING_MM (sulci
    and cisterns), holes filled (ventricles), grown by ICV_CSF_MM (the CSF layer under the skull)."""
    factor = [max(1, round(_ICV_GRID_MM / s)) for s in brain.GetSpacing()]
    small = sitk.BinShrink(sitk.Cast(brain > 0, sitk.sitkFloat32), factor) > 0.5
    radius = [max(1, round(ICV_CLOSING_MM / s)) for s in small.GetSpacing()]
    pad = [r + 2 for r in radius]
    padded = sitk.ConstantPad(small, pad, pad, 0)
    closed = sitk.BinaryMorphologicalClosing(padded, radius, sitk.sitkBall)
    filled = sitk.BinaryFillhole(closed)
    grown = sitk.BinaryDilate(filled, [max(1, round(ICV_CSF_MM / s)) for s in small.GetSpacing()], sitk.sitkBall)
    return sitk.Crop(grown, pad, pad)


def _head_box(volume: np.ndarray, spec: InputSpec) -> tuple[slice, ...]:
    """foreground_box of the manifest, cut to head_box_mm below the top of the head ([k, j, i] array axes)."""
    margin = spec.foreground_margin or 0
    box = list(foreground_box(volume, margin))
    if spec.head_box_mm is not None:
        letter_axis = next(n for n, c in enumerate(spec.orientation) if c in "SI")
        axis = 2 - letter_axis  # numpy axis of that image axis
        keep = int(round(spec.head_box_mm / spec.spacing_mm))
        start, stop = box[axis].start, box[axis].stop
        if stop - start > keep:
            if spec.orientation[letter_axis] == "I":  # index grows downwards: the top is the start
                box[axis] = slice(start, start + keep)
            else:
                box[axis] = slice(stop - keep, stop)
    return tuple(box)


def _run(model: LoadedModel, volume: np.ndarray) -> np.ndarray:
    """Channel index per voxel of a [k, j, i] volume (uint8/uint16), the graph fed in the manifest's axes."""
    spec = model.manifest.input
    seg_spec = model.manifest.output.segmentation
    assert seg_spec is not None
    tensor = volume.transpose(2, 1, 0) if spec.axes == "ijk" else volume
    width = tensor.shape[2]
    if seg_spec.encoding == "class_index":  # the graph splits the last axis into SLABS equal slabs: pad it
        tensor = np.pad(tensor, ((0, 0), (0, 0), (0, -width % SLABS)))
    batch = np.ascontiguousarray(tensor, dtype=np.float32)[np.newaxis, np.newaxis]
    out = model.session.run([seg_spec.name], {spec.name: batch})[0]
    n = len(seg_spec.labels)
    if seg_spec.encoding == "class_index":
        if out.shape != (1, 1, *batch.shape[2:]):
            raise ModelError(f"model {model.manifest.id}: output has shape {out.shape}, expected "
                             f"{(1, 1, *batch.shape[2:])}")
        index = out[0, 0, :, :, :width]
        if index.size and int(index.max()) >= n:
            raise ModelError(f"model {model.manifest.id}: class index {int(index.max())} beyond its {n} labels")
    else:
        if out.shape != (1, n, *batch.shape[2:]):
            raise ModelError(f"model {model.manifest.id}: output has shape {out.shape}, expected "
                             f"{(1, n, *batch.shape[2:])}")
        index = np.zeros(batch.shape[2:], dtype=np.uint8 if n <= 256 else np.uint16)
        argmax_channels(out[0], index)
        index = index[:, :, :width]
    return index.transpose(2, 1, 0) if spec.axes == "ijk" else index


def segment(model: LoadedModel, image: sitk.Image, reference: sitk.Image | None = None) -> BrainSegmentation:
    """Segment ``image`` (LPS patient space) with a segmentation model; labels on ``reference``'s grid (default:
    ``image``'s own grid)."""
    manifest = model.manifest
    if manifest.task != "segmentation" or manifest.output.segmentation is None:
        raise ModelError(f"model {manifest.id} is not a segmentation model")
    spec = manifest.input
    timings: dict[str, float] = {}
    lap = stage_timer(timings)

    image = sitk.Cast(image, sitk.sitkFloat32)
    if spec.grid == "conform":
        grid = conform_grid(image, spec)
    else:
        from inference.volume import isotropic_grid
        grid = isotropic_grid(sitk.DICOMOrient(image, spec.orientation), spec.spacing_mm)
    conformed = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(conformed)
    volume = conform_intensities(array) if spec.normalization == "conform_uint8" else normalize(array, spec)
    lap("conform")
    box = _head_box(volume, spec) if spec.foreground_margin is not None else tuple(slice(0, n) for n in volume.shape)
    lap("box")
    index = _run(model, volume[box])
    lap("inference")
    lut = np.asarray(manifest.output.segmentation.labels, dtype=np.uint16)
    codes = np.zeros(volume.shape, dtype=np.uint16)
    codes[box] = region_codes(lut[index])
    labelled = codes > 0
    brain = largest_component(labelled)
    outside = int(labelled.sum() - brain.sum())
    codes[~brain] = 0
    voxel_ml = float(np.prod(conformed.GetSpacing())) / 1000.0
    labels_conformed = sitk.GetImageFromArray(codes)
    labels_conformed.CopyInformation(conformed)
    lap("components")
    target = image if reference is None else reference
    labels = sitk.Resample(labels_conformed, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    brain_mask = sitk.Cast(labels > 0, sitk.sitkUInt8)
    lap("back")
    icv = intracranial_mask(sitk.Cast(labels_conformed > 0, sitk.sitkUInt8))
    icv_ml = float(sitk.GetArrayViewFromImage(icv).sum()) * float(np.prod(icv.GetSpacing())) / 1000.0
    lap("icv")
    if outside:
        log.info("segmenter %s: %.1f ml of labels apart from the brain removed", manifest.id, outside * voxel_ml)
    log.info("segmenter %s: %s", manifest.id, ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return BrainSegmentation(labels=labels, brain_mask=brain_mask, icv_ml=icv_ml, outside_ml=outside * voxel_ml,
                             timings=timings)

"""One volume through one model: reorient, resample, normalize, tiled ONNX inference, back to patient space."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from inference.models import InputSpec, LoadedModel, ModelError
from inference.volume import isotropic_grid, resample_isotropic

__all__ = [
    "OUTPUT_SPACING_MM",
    "PipelineResult",
    "blend_window",
    "normalize",
    "pad_to_multiple",
    "run_model",
    "sliding_window",
    "tile_starts",
]

log = logging.getLogger(__name__)

OUTPUT_SPACING_MM = 1.0


@dataclass
class PipelineResult:
    t1: sitk.Image | None            # float32 x output.image.scale, 1 mm isotropic, input's direction and FOV
    labels: sitk.Image | None        # uint16 FreeSurfer codes on the same grid as t1
    timings: dict[str, float] = field(default_factory=dict)  # seconds: reorient/resample/normalize/inference/back


def normalize(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Intensity normalization of the manifest, as float32, clipped to [0, clip_max].

    ``percentile``: (x - p_low) / (p_high - p_low) with percentiles over nonzero (foreground) voxels;
    ``minmax``: (x - min) / (max - min) over all voxels.
    """
    array = np.asarray(array, dtype=np.float32)
    if spec.normalization == "percentile":
        foreground = array[array != 0]
        if foreground.size == 0:
            return np.zeros_like(array)
        low, high = np.percentile(foreground, [spec.p_low, spec.p_high])
    else:
        low, high = float(array.min()), float(array.max())
    scale = float(high - low)
    if scale <= 0:
        scale = 1.0
    out = (array - np.float32(low)) / np.float32(scale)
    np.clip(out, 0.0, spec.clip_max, out=out)
    return out


def pad_to_multiple(array: np.ndarray, multiple: int,
                    minimum: tuple[int, ...] | None = None) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad each axis (evenly on both sides) to a multiple of ``multiple`` and at least ``minimum``.

    Returns the padded array and the slices that crop it back.
    """
    pads, crop = [], []
    for axis, size in enumerate(array.shape):
        target = max(size, minimum[axis] if minimum else 0)
        target = -(-target // multiple) * multiple
        before = (target - size) // 2
        pads.append((before, target - size - before))
        crop.append(slice(before, before + size))
    if any(p != (0, 0) for p in pads):
        array = np.pad(array, pads)
    return array, tuple(crop)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start indices of tiles of length ``tile`` covering ``size`` with at least ``overlap`` shared voxels."""
    if tile >= size:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def blend_window(tile: tuple[int, int, int], overlap: int) -> np.ndarray:
    """Separable raised-cosine window: 1 inside, ramping over ``overlap`` voxels at each face, always > 0."""
    axes = []
    for n in tile:
        w = np.ones(n, dtype=np.float32)
        ramp = min(overlap, n // 2)
        if ramp > 0:
            r = 0.5 - 0.5 * np.cos(np.pi * np.arange(1, ramp + 1) / (ramp + 1))
            w[:ramp] = r
            w[n - ramp:] = r[::-1]
        axes.append(w)
    return (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]).astype(np.float32)


def _tiles(shape: tuple[int, ...], tile: tuple[int, int, int], overlap: int) -> Iterator[tuple[slice, ...]]:
    for z in tile_starts(shape[0], tile[0], overlap):
        for y in tile_starts(shape[1], tile[1], overlap):
            for x in tile_starts(shape[2], tile[2], overlap):
                yield (slice(z, z + tile[0]), slice(y, y + tile[1]), slice(x, x + tile[2]))


def sliding_window(model: LoadedModel, volume: np.ndarray,
                   tile: tuple[int, int, int]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Tiled inference on a normalized, padded [D, H, W] float32 volume.

    Returns the blended image output [D, H, W] (or None) and the argmax channel index [D, H, W] (or None).
    Tiles are blended with ``blend_window``; accumulators are preallocated float32.
    """
    manifest = model.manifest
    overlap = manifest.tiling.overlap
    names, image_name, seg_name = [], None, None
    if manifest.output.image is not None:
        image_name = manifest.output.image.name
        names.append(image_name)
    if manifest.output.segmentation is not None:
        seg_name = manifest.output.segmentation.name
        names.append(seg_name)
    n_channels = len(manifest.output.segmentation.labels) if manifest.output.segmentation else 0

    weight = blend_window(tile, overlap)
    weight_sum = np.zeros(volume.shape, dtype=np.float32)
    image_sum = np.zeros(volume.shape, dtype=np.float32) if image_name else None
    logit_sum = np.zeros((n_channels, *volume.shape), dtype=np.float32) if seg_name else None
    count = 0
    for region in _tiles(volume.shape, tile, overlap):
        batch = np.ascontiguousarray(volume[region], dtype=np.float32)[np.newaxis, np.newaxis]
        results = dict(zip(names, model.session.run(names, {manifest.input.name: batch}), strict=True))
        if image_name:
            out = np.asarray(results[image_name], dtype=np.float32)
            if out.shape != (1, 1, *tile):
                raise ModelError(f"model {manifest.id}: output {image_name!r} has shape {out.shape}, "
                                 f"expected {(1, 1, *tile)}")
            image_sum[region] += out[0, 0] * weight  # type: ignore[index]
        if seg_name:
            out = np.asarray(results[seg_name], dtype=np.float32)
            if out.shape != (1, n_channels, *tile):
                raise ModelError(f"model {manifest.id}: output {seg_name!r} has shape {out.shape}, "
                                 f"expected {(1, n_channels, *tile)}")
            logit_sum[(slice(None), *region)] += out[0] * weight  # type: ignore[index]
        weight_sum[region] += weight
        count += 1
    log.debug("model %s: %d tiles of %s over %s", manifest.id, count, tile, volume.shape)
    image = None
    if image_sum is not None:
        image = image_sum / weight_sum
    seg = np.argmax(logit_sum, axis=0) if logit_sum is not None else None  # weights are >0: argmax unchanged
    return image, seg


def run_model(model: LoadedModel, image: sitk.Image) -> PipelineResult:
    """Run one model on one volume (LPS patient space); outputs on a 1 mm grid with the input's direction and FOV."""
    manifest = model.manifest
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        now = time.perf_counter()
        timings[name] = now - start
        start = now

    oriented = sitk.DICOMOrient(sitk.Cast(image, sitk.sitkFloat32), manifest.input.orientation)
    lap("reorient")
    model_space = resample_isotropic(oriented, manifest.input.spacing_mm)
    lap("resample")
    volume = normalize(sitk.GetArrayViewFromImage(model_space), manifest.input)
    lap("normalize")

    fixed = model.fixed_spatial_shape
    padded, crop = pad_to_multiple(volume, manifest.input.divisible_by, minimum=fixed)
    del volume
    if fixed is not None:
        tile = fixed
    else:
        tile = tuple(min(t, s) for t, s in zip(manifest.tiling.tile, padded.shape, strict=True))
    image_out, seg_out = sliding_window(model, padded, tile)  # type: ignore[arg-type]
    del padded
    lap("inference")

    reference = isotropic_grid(image, OUTPUT_SPACING_MM)
    t1 = labels = None
    if image_out is not None and manifest.output.image is not None:
        array = image_out[crop] * np.float32(manifest.output.image.scale)
        t1_model = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
        t1_model.CopyInformation(model_space)
        t1 = sitk.Resample(t1_model, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    if seg_out is not None and manifest.output.segmentation is not None:
        lut = np.asarray(manifest.output.segmentation.labels, dtype=np.uint16)
        codes = lut[seg_out[crop]]
        seg_model = sitk.GetImageFromArray(np.ascontiguousarray(codes))
        seg_model.CopyInformation(model_space)
        labels = sitk.Resample(seg_model, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                               sitk.sitkUInt16)
    lap("back")
    log.info("model %s: %s", manifest.id, ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return PipelineResult(t1=t1, labels=labels, timings=timings)

"""One volume through one model: reorient, resample, normalize, tiled ONNX inference, back to patient space."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from inference.hemispheres import combine_mirrored_labels, lateralize
from inference.labels import swap_left_right
from inference.models import InputSpec, LoadedModel, ModelError, ModelManifest
from inference.volume import isotropic_grid, mirror_left_right, resample_isotropic

__all__ = [
    "OUTPUT_SPACING_MM",
    "PipelineResult",
    "argmax_channels",
    "balanced_tile",
    "blend_window",
    "foreground_box",
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
    # seconds: reorient/resample/normalize/[foreground]/inference/back
    timings: dict[str, float] = field(default_factory=dict)


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


FOREGROUND_SHRINK = 4  # foreground_box works on 4 x 4 x 4 block means: the same box to within a block, ~64x less work


def foreground_box(volume: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Box (numpy slices) of the largest connected component of the Otsu foreground of a normalised volume, grown
    by `margin` voxels and kept inside the volume: the head, without noise specks or a second object in the field
    of view. Computed on block means of FOREGROUND_SHRINK voxels, so the box is exact to within a block (a block
    that the head fills only in part may be left out: the margin covers it).
    The whole volume where nothing is foreground."""
    whole = tuple(slice(0, n) for n in volume.shape)
    if not np.any(volume > 0):
        return whole
    shrink = [min(FOREGROUND_SHRINK, n) for n in reversed(volume.shape)]  # sitk index order i, j, k
    small = sitk.BinShrink(sitk.GetImageFromArray(volume), shrink)
    mask = sitk.OtsuThreshold(small, 0, 1)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    if not stats.HasLabel(1):
        return whole
    x, y, z, sx, sy, sz = stats.GetBoundingBox(1)  # index order i, j, k, in blocks
    block = tuple(reversed(shrink))
    starts = (z * block[0], y * block[1], x * block[2])
    stops = [(z + sz) * block[0], (y + sy) * block[1], (x + sx) * block[2]]
    for axis, (stop, n_small) in enumerate(zip(stops, reversed(small.GetSize()), strict=True)):
        if stop // block[axis] == n_small:  # the last whole block: the voxels after it belong to it too
            stops[axis] = volume.shape[axis]
    return tuple(slice(max(0, a - margin), min(n, b + margin))
                 for a, b, n in zip(starts, stops, volume.shape, strict=True))


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


def balanced_tile(size: int, tile: int, overlap: int, multiple: int) -> int:
    """The tile extent to use along an axis of ``size`` voxels (a multiple of ``multiple``, at most ``tile``).

    The manifest's tile is the largest the model allows, not a must: of the tilings that cover ``size``
    with equal tiles of a multiple of ``multiple``, this takes the one that computes the fewest voxels
    (tiles × extent), and of those the smallest tiles (less memory). E.g. 208 voxels with tile 192 and
    overlap 16: 2 tiles of 112 instead of 2 of 192; 256 voxels: 3 tiles of 96 (288 voxels, like 2 of 144).
    """
    if tile >= size:
        return size
    fewest = -(-(size - overlap) // (tile - overlap))
    best: tuple[int, int] | None = None
    for n in range(fewest, fewest + 4):
        extent = -(-(size + (n - 1) * overlap) // n)
        extent = max(-(-extent // multiple) * multiple, min(tile, overlap + multiple))
        if extent > tile:
            continue
        computed = len(tile_starts(size, extent, overlap)) * extent
        if best is None or (computed, extent) < best:
            best = (computed, extent)
    return tile if best is None else best[1]


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


def argmax_channels(logits: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = np.argmax(logits, axis=0)`` for finite logits (first maximum wins), in place.

    One pass per channel over contiguous planes, with no channels-last copy of the logits (numpy's
    argmax over axis 0 makes one) and no masked writes: ``out`` (an unsigned integer array) is
    updated as ``out += higher * (c - out)``, exact in modular integer arithmetic.
    """
    best = logits[0].copy()
    out[...] = 0
    higher = np.empty(best.shape, dtype=bool)
    step = np.empty(out.shape, dtype=out.dtype)
    for c in range(1, logits.shape[0]):
        np.greater(logits[c], best, out=higher)
        np.maximum(best, logits[c], out=best)
        np.subtract(out.dtype.type(c), out, out=step)
        np.multiply(step, higher, out=step)
        np.add(out, step, out=out)


def _run_tile(model: LoadedModel, tile_volume: np.ndarray,
              n_channels: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One tile through the network: (its image output [tile] or None, its logits [C, tile] or None);
    ModelError when an output does not have the tile's shape."""
    manifest = model.manifest
    tile = tile_volume.shape
    names = [spec.name for spec in (manifest.output.image, manifest.output.segmentation) if spec is not None]
    batch = np.ascontiguousarray(tile_volume, dtype=np.float32)[np.newaxis, np.newaxis]
    results = dict(zip(names, model.session.run(names, {manifest.input.name: batch}), strict=True))
    image = logits = None
    for spec, channels in ((manifest.output.image, 1), (manifest.output.segmentation, n_channels)):
        if spec is None:
            continue
        out = np.asarray(results[spec.name], dtype=np.float32)
        if out.shape != (1, channels, *tile):
            raise ModelError(f"model {manifest.id}: output {spec.name!r} has shape {out.shape}, "
                             f"expected {(1, channels, *tile)}")
        if spec is manifest.output.image:
            image = out[0, 0]
        else:
            logits = out[0]
    return image, logits


def _accumulators(model: LoadedModel, shape: tuple[int, ...], tile: tuple[int, int, int], zs: Sequence[int],
                  ) -> tuple[np.ndarray | None, ...]:
    """(image sum, weight sum, argmax, logits window, carry) for :func:`sliding_window`, each None when the
    model has no such output: the window holds planes [z, z+tz) and rows [y, y+ty) of the logits; the carry
    the partial sums of the planes the next D-row shares with this one, all rows."""
    manifest = model.manifest
    image_sum = weight_sum = seg = window = carry = None
    if manifest.output.image is not None:
        weight_sum = np.zeros(shape, dtype=np.float32)
        image_sum = np.zeros(shape, dtype=np.float32)
    if manifest.output.segmentation is not None:
        n_channels = len(manifest.output.segmentation.labels)
        tz, ty, _ = tile
        seg = np.zeros(shape, dtype=np.uint8 if n_channels <= 256 else np.uint16)
        window = np.zeros((n_channels, tz, ty, shape[2]), dtype=np.float32)
        shared = max([z + tz - zn for z, zn in zip(zs, zs[1:], strict=False)], default=0)
        if shared:
            carry = np.zeros((n_channels, shared, shape[1], shape[2]), dtype=np.float32)
    return image_sum, weight_sum, seg, window, carry


def _open_h_row(window: np.ndarray, carry: np.ndarray | None, carried: int, y: int, shift: int, filled: int) -> None:
    """Make the window ready for the H-row at ``y``: keep the rows shared with the previous H-row (moved up by
    ``shift``), zero the new ones, and put back the previous D-row's partial sums of the ``carried`` top planes."""
    ty = window.shape[2]
    if shift:
        for channel in window:  # small temporaries
            channel[:, :ty - shift] = channel[:, shift:]
    first_new = max(y, filled) - y
    window[:, :, first_new:] = 0
    if carried:
        window[:, :carried, first_new:] = carry[:, :carried, y + first_new:y + ty]  # type: ignore[index]


def sliding_window(model: LoadedModel, volume: np.ndarray,
                   tile: tuple[int, int, int]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Tiled inference on a normalized, padded [D, H, W] float32 volume.

    Returns the blended image output [D, H, W] (or None) and the argmax channel index [D, H, W] (or None).
    Tiles are blended with ``blend_window``; accumulators are preallocated float32.

    The segmentation logits never take C × D × H × W floats (33 channels of a 256³ volume would be 2.2 GB):
    tiles run in rows along D, and within a row in rows along H; the logits are kept for the current
    (D-row, H-row) window (C × tile_D × tile_H × W) plus the planes the next D-row shares with this one
    (C × overlap_D × H × W). A region is reduced to its argmax as soon as no later tile reaches it. The
    sums are added in the same order as over a whole-volume accumulator, so the result is the same bit for bit.
    """
    manifest = model.manifest
    n_channels = len(manifest.output.segmentation.labels) if manifest.output.segmentation else 0
    (depth, height, _), (tz, ty, tx) = volume.shape, tile
    zs, ys, xs = (tile_starts(n, t, manifest.tiling.overlap) for n, t in zip(volume.shape, tile, strict=True))
    weight = blend_window(tile, manifest.tiling.overlap)
    image_sum, weight_sum, seg, window, carry = _accumulators(model, volume.shape, tile, zs)
    carried = 0  # planes at the top of the current D-row that hold the previous D-row's partial sums
    count = 0
    for zi, z in enumerate(zs):
        z_final = zs[zi + 1] if zi + 1 < len(zs) else depth  # planes [z, z_final) are final after this D-row
        to_carry = z + tz - z_final
        filled = 0  # rows [y, filled) of the window hold sums of this D-row
        for yi, y in enumerate(ys):
            y_final = ys[yi + 1] if yi + 1 < len(ys) else height  # rows [y, y_final) final after this H-row
            if window is not None:
                _open_h_row(window, carry, carried, y, y - ys[yi - 1] if yi else 0, filled)
                filled = y + ty
            for x in xs:
                region = (slice(z, z + tz), slice(y, y + ty), slice(x, x + tx))
                image_tile, logits = _run_tile(model, volume[region], n_channels)
                if image_tile is not None:
                    image_sum[region] += image_tile * weight  # type: ignore[index]
                    weight_sum[region] += weight  # type: ignore[index]
                if logits is not None:
                    if logits.flags.writeable:
                        np.multiply(logits, weight, out=logits)  # no C × tile temporary
                    else:
                        logits = logits * weight
                    window[:, :, :, x:x + tx] += logits  # type: ignore[index]
                count += 1
            if window is not None:  # planes [z, z_final) and rows [y, y_final) are final: argmax; carry the rest
                argmax_channels(window[:, :z_final - z, :y_final - y], seg[z:z_final, y:y_final])  # type: ignore[index]
                if to_carry:
                    carry[:, :to_carry, y:y_final] = window[:, z_final - z:, :y_final - y]  # type: ignore[index]
        carried = to_carry
    log.debug("model %s: %d tiles of %s over %s", manifest.id, count, tile, volume.shape)
    return (None if image_sum is None else image_sum / weight_sum), seg


def stage_timer(timings: dict[str, float]) -> Callable[[str], None]:
    """``lap(name)`` records in ``timings`` the seconds since the previous lap (or since this call)."""
    start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        now = time.perf_counter()
        timings[name] = now - start
        start = now

    return lap


def _set_geometry(image: sitk.Image, grid: tuple[tuple[float, ...], ...]) -> None:
    origin, spacing, direction = grid
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)


def _embed(array: np.ndarray, shape: tuple[int, ...], box: tuple[slice, ...]) -> np.ndarray:
    """`array` placed at `box` of a zero (background) array of `shape`; `array` itself if the box is everything."""
    if array.shape == tuple(shape):
        return array
    out = np.zeros(shape, dtype=array.dtype)
    out[box] = array
    return out


def run_model(model: LoadedModel, image: sitk.Image, *, mirror_average: bool | None = None) -> PipelineResult:
    """Run one model on one volume (LPS patient space); outputs on a 1 mm grid with the input's direction and FOV.

    ``mirror_average`` (default: the manifest's ``input.mirror_average``): also run the model on the head mirrored
    left-right in patient space, mirror that image back and average the two. The result is then exactly
    equivariant: the head mirrored gets the mirrored image, whatever the network, its tiles or its box do (both
    inputs run the same two computations). Doubles the time. A model's own labels are made one from both runs by
    a rule symmetric in the two and in left and right (``combine_mirrored_labels``): exactly mirrored too.
    """
    if mirror_average is None:
        mirror_average = model.manifest.input.mirror_average
    if not mirror_average:
        return _run_once(model, image)
    direct = _run_once(model, image)
    other = _run_once(model, mirror_left_right(image))
    timings = {k: direct.timings.get(k, 0.0) + other.timings.get(k, 0.0) for k in direct.timings}
    start = time.perf_counter()
    t1 = direct.t1
    if t1 is not None and other.t1 is not None:
        back = sitk.Resample(mirror_left_right(other.t1), t1, sitk.Transform(), sitk.sitkLinear, 0.0,
                             sitk.sitkFloat32)
        t1 = (t1 + back) * 0.5
    labels = direct.labels
    if labels is not None and other.labels is not None and t1 is not None:
        labels = _mirror_averaged_labels(labels, other.labels, t1)
    timings["mirror"] = time.perf_counter() - start  # the two runs made one
    return PipelineResult(t1=t1, labels=labels, timings=timings)


def _mirror_averaged_labels(direct: sitk.Image, mirrored: sitk.Image, t1: sitk.Image) -> sitk.Image:
    """The labels of the direct run and of the mirrored head's run (mirrored back, sides exchanged) made one,
    symmetrically (inference.hemispheres.combine_mirrored_labels), on the direct labels' grid, which is the
    averaged t1's (both are made on the input's 1 mm output grid)."""
    if t1.GetSize() != direct.GetSize() or t1.GetOrigin() != direct.GetOrigin():
        raise ModelError("labels and image of a model run are on different grids")
    back = sitk.Resample(mirror_left_right(mirrored), direct, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         direct.GetPixelID())
    a = sitk.GetArrayFromImage(direct)
    b = swap_left_right(sitk.GetArrayFromImage(back))
    axis = np.array(direct.GetDirection()).reshape(3, 3)[0] * np.array(direct.GetSpacing())  # x per index step
    size = direct.GetSize()
    x_mm = (direct.GetOrigin()[0] + axis[0] * np.arange(size[0])[None, None, :]
            + axis[1] * np.arange(size[1])[None, :, None] + axis[2] * np.arange(size[2])[:, None, None])
    combined = sitk.GetImageFromArray(combine_mirrored_labels(a, b, sitk.GetArrayViewFromImage(t1), x_mm))
    combined.CopyInformation(direct)
    return combined


def _back_to_patient(manifest: ModelManifest, image_out: np.ndarray | None, seg_out: np.ndarray | None,
                     grid: tuple[tuple[float, ...], ...], reference: sitk.Image,
                     ) -> tuple[sitk.Image | None, sitk.Image | None]:
    """The network's outputs on the model grid, back onto ``reference`` (1 mm, the input's direction):
    the T1 scaled by the manifest (linear), the class indices as label codes (nearest neighbour)."""
    t1 = labels = None
    if image_out is not None and manifest.output.image is not None:
        array = image_out * np.float32(manifest.output.image.scale)
        t1_model = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
        _set_geometry(t1_model, grid)
        t1 = sitk.Resample(t1_model, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    if seg_out is not None and manifest.output.segmentation is not None:
        lut = np.asarray(manifest.output.segmentation.labels, dtype=np.uint16)
        codes = lut[seg_out]
        if manifest.output.segmentation.lateralize:
            codes = lateralize(codes, manifest.input.orientation)
        seg_model = sitk.GetImageFromArray(np.ascontiguousarray(codes))
        _set_geometry(seg_model, grid)
        labels = sitk.Resample(seg_model, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                               sitk.sitkUInt16)
    return t1, labels


def _run_once(model: LoadedModel, image: sitk.Image) -> PipelineResult:
    manifest = model.manifest
    seg = manifest.output.segmentation
    if manifest.input.grid != "image" or manifest.input.axes != "kji" or \
            manifest.input.normalization == "conform_uint8" or (seg is not None and seg.encoding != "logits"):
        raise ModelError(f"model {manifest.id} is made for inference.segmentation.segment (conformed grid, class "
                         "index output), not for run_model")
    timings: dict[str, float] = {}
    lap = stage_timer(timings)

    oriented = sitk.DICOMOrient(sitk.Cast(image, sitk.sitkFloat32), manifest.input.orientation)
    lap("reorient")
    model_space = resample_isotropic(oriented, manifest.input.spacing_mm)
    del oriented
    lap("resample")
    volume = normalize(sitk.GetArrayViewFromImage(model_space), manifest.input)
    # keep only the model grid's geometry: the voxels are not needed any more (less peak memory)
    grid = (model_space.GetOrigin(), model_space.GetSpacing(), model_space.GetDirection())
    del model_space
    lap("normalize")

    full_shape = volume.shape
    box = tuple(slice(0, n) for n in full_shape)
    if manifest.input.foreground_margin is not None:
        box = foreground_box(volume, manifest.input.foreground_margin)
        volume = volume[box]
        lap("foreground")
    fixed = model.fixed_spatial_shape
    padded, crop = pad_to_multiple(volume, manifest.input.divisible_by, minimum=fixed)
    del volume
    if fixed is not None:
        tile = fixed
    else:
        tile = tuple(balanced_tile(s, t, manifest.tiling.overlap, manifest.input.divisible_by)
                     for t, s in zip(manifest.tiling.tile, padded.shape, strict=True))
    image_out, seg_out = sliding_window(model, padded, tile)  # type: ignore[arg-type]
    del padded
    lap("inference")
    image_out, seg_out = (_embed(out[crop], full_shape, box) if out is not None else None
                          for out in (image_out, seg_out))

    t1, labels = _back_to_patient(manifest, image_out, seg_out, grid, isotropic_grid(image, OUTPUT_SPACING_MM))
    lap("back")
    log.info("model %s: %s", manifest.id, ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return PipelineResult(t1=t1, labels=labels, timings=timings)

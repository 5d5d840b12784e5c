"""Left/right assignment of a segmentation by the mid-sagittal plane.

A network trained with left-right flips has to tell left from right by where a voxel lies relative to the
interhemispheric fissure, a global feature that a small, briefly trained network learns last: it finds "white
matter" long before it is sure of which hemisphere's. Here the side comes from geometry instead: the plane that best
separates the voxels the network called left from those it called right (least squares on ±1, i.e. the linear
discriminant) is the mid-sagittal plane, tilted as the head is; which side of it is the patient's left comes from the
image orientation (DICOM patient space), not from the network. Every lateralised label is then given the side of
the plane it lies on. Unpaired labels (3rd/4th ventricle, brainstem, CSF) are kept.

The plane is only used when the network's own sides support it: most sided voxels agree with it and it is close to
sagittal. Otherwise the labels are returned unchanged (and the reason logged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from inference.labels import LR_SWAP, swap_left_right

__all__ = ["MidsagittalPlane", "fit_midsagittal_plane", "lateralize", "left_axis"]

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.6  # fraction of the network's sided voxels that the plane separates as the network did
MAX_TILT_DEG = 30.0  # the plane's normal may differ this much from the left-right axis
MAX_POINTS = 400_000  # voxels used for the fit (an even subsample)


@dataclass(frozen=True)
class MidsagittalPlane:
    normal: np.ndarray  # unit vector in array index space (axis 0, 1, 2), pointing to the patient's left
    offset: float  # plane: normal . x = offset (x in voxel indices)
    agreement: float  # fraction of the network's sided voxels the plane separates as the network did (either way)
    tilt_deg: float  # angle between the normal and the left-right array axis

    def is_left(self, points: np.ndarray) -> np.ndarray:
        """Boolean per point [N, 3] (voxel indices): on the patient's left of the plane."""
        return points @ self.normal > self.offset


def left_axis(orientation: str) -> tuple[int, int]:
    """(numpy axis, sign) of the patient's left for an array of a volume in `orientation` (e.g. "LPS": the
    first letter is the direction of the image's i axis, which is numpy's last axis)."""
    orientation = orientation.upper()
    for index, letter in enumerate(orientation):
        if letter in "LR":
            return 2 - index, 1 if letter == "L" else -1
    raise ValueError(f"orientation {orientation!r} has no left-right axis")


def fit_midsagittal_plane(codes: np.ndarray, orientation: str = "LPS",
                          swap: Mapping[int, int] = LR_SWAP) -> MidsagittalPlane | None:
    """The plane separating the left-coded from the right-coded voxels of a label volume (None: too few)."""
    left_codes = np.array(sorted(k for k, v in swap.items() if k < v))  # FreeSurfer's left codes are the smaller
    right_codes = np.array(sorted(swap[int(k)] for k in left_codes))
    is_left = np.isin(codes, left_codes)
    is_right = np.isin(codes, right_codes)
    n_left, n_right = int(is_left.sum()), int(is_right.sum())
    if min(n_left, n_right) < 100:
        return None
    sided = np.flatnonzero(is_left | is_right)
    if sided.size > MAX_POINTS:
        sided = sided[:: math.ceil(sided.size / MAX_POINTS)]
    points = np.stack(np.unravel_index(sided, codes.shape), axis=1).astype(np.float64)
    target = np.where(is_left.reshape(-1)[sided], 1.0, -1.0)
    # class-balanced least squares (each side weighs the same, whatever its volume)
    weight = np.where(target > 0, 0.5 / max(1, (target > 0).sum()), 0.5 / max(1, (target < 0).sum()))
    centre = points.mean(axis=0)
    design = np.column_stack([points - centre, np.ones(len(points))])
    sw = np.sqrt(weight)[:, None]
    coef, *_ = np.linalg.lstsq(design * sw, target * sw[:, 0], rcond=None)
    w, b = coef[:3], coef[3]
    norm = float(np.linalg.norm(w))
    if norm == 0.0:
        return None
    normal = w / norm
    offset = float(normal @ centre - b / norm)
    agreement = float(np.mean((points @ normal > offset) == (target > 0)))
    axis, sign = left_axis(orientation)
    # the patient's left is known from the orientation: if the network put its "left" labels on the patient's
    # right, the plane is still the plane, and the sides follow the geometry
    if normal[axis] * sign < 0:
        normal, offset = -normal, -offset
        log.warning("lateralize: the network's left labels lie on the patient's right of the plane; sides follow "
                    "the image orientation (check the series' orientation if this repeats)")
    tilt = math.degrees(math.acos(min(1.0, abs(float(normal[axis])))))
    return MidsagittalPlane(normal=normal, offset=offset, agreement=agreement, tilt_deg=tilt)


def lateralize(codes: np.ndarray, orientation: str = "LPS", swap: Mapping[int, int] = LR_SWAP) -> np.ndarray:
    """`codes` with every lateralised label on the side of the mid-sagittal plane it lies on (a new array), or
    `codes` itself where the network's sides do not support a plane."""
    plane = fit_midsagittal_plane(codes, orientation, swap)
    if plane is None:
        log.info("lateralize: too few left or right labels for a mid-sagittal plane; sides kept as predicted")
        return codes
    if plane.agreement < MIN_AGREEMENT or plane.tilt_deg > MAX_TILT_DEG:
        log.warning("lateralize: mid-sagittal plane not supported (%.0f %% of sided voxels agree, tilt %.0f°); "
                    "sides kept as predicted", 100 * plane.agreement, plane.tilt_deg)
        return codes
    sided = np.flatnonzero(np.isin(codes, list(swap)))
    points = np.stack(np.unravel_index(sided, codes.shape), axis=1).astype(np.float64)
    values = codes.reshape(-1)[sided]
    # FreeSurfer's left codes are the smaller of each pair: a voxel is on the wrong side when its code's side
    # differs from the plane's
    coded_left = values < swap_left_right(values, swap)
    wrong = sided[coded_left != plane.is_left(points)]
    out = codes.copy()
    flat = out.reshape(-1)
    flat[wrong] = swap_left_right(flat[wrong], swap)
    log.info("lateralize: mid-sagittal plane tilt %.1f°, %.0f %% of sided voxels agreed, %d voxels changed side",
             plane.tilt_deg, 100 * plane.agreement, wrong.size)
    return out


def combine_mirrored_labels(direct: np.ndarray, mirrored_back: np.ndarray, intensity: np.ndarray,
                            x_mm: np.ndarray, swap: Mapping[int, int] = LR_SWAP) -> np.ndarray:
    """One label map from a model's labels on a head (`direct`) and on the head mirrored in patient space, mirrored
    back with left and right codes exchanged (`mirrored_back`), both [k, j, i] on one grid; `intensity` is the
    mirror-averaged image on that grid and `x_mm` the patient x (LPS: + is left) of each voxel's column i.

    Where the two agree, their label. Where they differ, the label whose structure's mean intensity (over the
    voxels where both agree, left and right together) is closer to the voxel's; where both are equally close (the
    same structure on other sides, or an exact tie), the structure of the smaller code, on the side of the brain's
    centroid (of the agreed labels) the voxel lies on. Every rule is symmetric in the two inputs and in left and
    right, so the head mirrored gets exactly the mirrored labels: with the mirror-averaged image, this is the
    labels' mirror average (issue 11: no side bias, as a tested property).
    """
    out = direct.copy()
    differ = direct != mirrored_back
    if not differ.any():
        return out
    merged_lut = np.arange(max(int(direct.max()), int(mirrored_back.max()), max(swap)) + 1)
    for a, b in swap.items():
        merged_lut[a] = min(a, b)
    agree = ~differ
    merged = merged_lut[direct[agree]]
    sums = np.bincount(merged, weights=intensity[agree].astype(np.float64), minlength=len(merged_lut))
    counts = np.bincount(merged, minlength=len(merged_lut))
    means = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    a_code, b_code = direct[differ], mirrored_back[differ]
    a_merged, b_merged = merged_lut[a_code], merged_lut[b_code]
    value = intensity[differ].astype(np.float64)
    da, db = np.abs(value - means[a_merged]), np.abs(value - means[b_merged])
    pick = np.where(da < db, a_code, b_code)
    tie = da == db
    if tie.any():
        brain = agree & (direct > 0)
        centre = float(np.broadcast_to(x_mm, direct.shape)[brain].mean()) if brain.any() else 0.0
        x = np.broadcast_to(x_mm, direct.shape)[differ][tie]
        structure = np.minimum(a_merged[tie], b_merged[tie])  # the left code of a pair, or an unsided code
        sided = np.isin(structure, list(swap))
        right = swap_left_right(structure, swap)
        # exactly on the centre (a mean of positions: practically never) the left code
        on_left = x > centre
        chosen = np.where(sided & ~on_left & (x != centre), right, structure)
        pick[tie] = chosen
    out[differ] = pick
    return out

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

"""Image and segmentation metrics: PSNR, 3D SSIM, Dice, ASPC, structure volumes (numpy only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = ["aspc", "dice", "gaussian_filter", "psnr", "ssim", "volumes_ml"]


def _mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {shape}")
    if not mask.any():
        raise ValueError("mask is empty")
    return mask


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return a, b


def _data_range(reference: np.ndarray, mask: np.ndarray, data_range: float | None) -> float:
    if data_range is not None:
        if data_range <= 0:
            raise ValueError(f"data_range must be positive, got {data_range}")
        return float(data_range)
    values = reference[mask]
    span = float(values.max() - values.min())
    return span if span > 0 else 1.0


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio (dB) of ``b`` against reference ``a`` within ``mask``.

    ``data_range`` defaults to max - min of ``a`` within the mask; identical inputs give inf.
    """
    a, b = _pair(a, b)
    m = _mask(mask, a.shape)
    mse = float(np.mean((a[m] - b[m]) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(_data_range(a, m, data_range) ** 2 / mse)


def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_filter(array: np.ndarray, sigma: float, truncate: float = 3.5) -> np.ndarray:
    """Separable Gaussian smoothing along every axis, mirror boundary (as scipy.ndimage's 'reflect')."""
    kernel = _gaussian_kernel(sigma, truncate)
    radius = len(kernel) // 2
    out = np.asarray(array, dtype=np.float64)
    for axis in range(out.ndim):
        if out.shape[axis] == 1:
            continue
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        result = np.zeros_like(out)
        window = [slice(None)] * out.ndim
        for offset, weight in enumerate(kernel):
            window[axis] = slice(offset, offset + n)
            result += weight * padded[tuple(window)]
        out = result
    return out


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, data_range: float | None = None,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Structural similarity (Wang et al. 2004) with a 3D Gaussian window, averaged over ``mask`` voxels.

    Local statistics use the whole image; only the averaging is restricted to the mask.
    ``data_range`` defaults to max - min of ``a`` within the mask.
    """
    a, b = _pair(a, b)
    m = _mask(mask, a.shape)
    span = _data_range(a, m, data_range)
    c1, c2 = (k1 * span) ** 2, (k2 * span) ** 2
    mu_a, mu_b = gaussian_filter(a, sigma), gaussian_filter(b, sigma)
    var_a = gaussian_filter(a * a, sigma) - mu_a * mu_a
    var_b = gaussian_filter(b * b, sigma) - mu_b * mu_b
    cov = gaussian_filter(a * b, sigma) - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float(np.mean((numerator / denominator)[m]))


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    """Dice overlap of ``label`` in two label maps; nan when the label is in neither."""
    a, b = np.asarray(a) == label, np.asarray(b) == label
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def aspc(x: float, y: float) -> float:
    """Absolute symmetric percent change 200 |x - y| / (|x| + |y|); 0 when both are 0."""
    denominator = abs(x) + abs(y)
    if denominator == 0:
        return 0.0
    return 200.0 * abs(x - y) / denominator


def volumes_ml(labels: np.ndarray | sitk.Image, spacing: Sequence[float] | None = None) -> dict[int, float]:
    """Volume in millilitres of every nonzero label; ``spacing`` (mm) is taken from the image when omitted."""
    if isinstance(labels, sitk.Image):
        spacing = labels.GetSpacing() if spacing is None else spacing
        labels = sitk.GetArrayViewFromImage(labels)
    if spacing is None:
        raise ValueError("spacing is required for a numpy label map")
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return {int(v): float(c) * voxel_ml for v, c in zip(values, counts, strict=True) if v != 0}

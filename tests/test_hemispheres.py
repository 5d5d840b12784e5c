"""Tests of inference.hemispheres: sides from the mid-sagittal plane and the image orientation."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from inference.hemispheres import fit_midsagittal_plane, lateralize, left_axis


def _hemispheres(tilt_deg: float = 10.0, shape: tuple[int, int, int] = (40, 48, 56)) -> tuple[np.ndarray, np.ndarray]:
    """(labels, truth): an ellipsoid 'brain' in an LPS array (axis 2 = i, towards the patient's left) split by a
    plane tilted by `tilt_deg` about axis 0; white matter 2/41 inside cortex 3/42, a midline 3rd ventricle (14)."""
    k, j, i = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2
    r = np.sqrt(((k - c[0]) / 17) ** 2 + ((j - c[1]) / 21) ** 2 + ((i - c[2]) / 25) ** 2)
    t = math.radians(tilt_deg)
    left = (i - c[2]) * math.cos(t) + (j - c[1]) * math.sin(t) > 0
    truth = np.zeros(shape, np.uint16)
    truth[(r < 1.0) & left], truth[(r < 1.0) & ~left] = 3, 42
    truth[(r < 0.7) & left], truth[(r < 0.7) & ~left] = 2, 41
    truth[(r < 0.2)] = 14
    return truth.copy(), truth


def _swap_sides(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    swap = {2: 41, 41: 2, 3: 42, 42: 3}
    out = labels.copy()
    for a, b in swap.items():
        out[mask & (labels == a)] = b
    return out


def test_left_axis_follows_the_orientation() -> None:
    assert left_axis("LPS") == (2, 1)
    assert left_axis("RAS") == (2, -1)
    assert left_axis("PLS") == (1, 1)
    assert left_axis("ASR") == (0, -1)
    with pytest.raises(ValueError, match="no left-right axis"):
        left_axis("PSI")


def test_noisy_sides_are_put_right_by_the_tilted_plane() -> None:
    labels, truth = _hemispheres(tilt_deg=10.0)
    noisy = _swap_sides(labels, np.random.default_rng(0).random(labels.shape) < 0.3)  # 30 % wrong side
    plane = fit_midsagittal_plane(noisy)
    assert plane is not None and 0.6 < plane.agreement < 0.8
    assert plane.tilt_deg == pytest.approx(10.0, abs=2.0)
    fixed = lateralize(noisy)
    sided = np.isin(truth, [2, 3, 41, 42])
    assert (fixed[sided] == truth[sided]).mean() > 0.99  # only voxels next to the plane may differ
    assert (noisy[sided] == truth[sided]).mean() < 0.75
    assert (fixed[truth == 14] == 14).all()  # unpaired labels are kept
    assert (fixed[truth == 0] == 0).all()


def test_the_patients_left_comes_from_the_orientation_not_the_network() -> None:
    labels, truth = _hemispheres(tilt_deg=0.0)
    inverted = _swap_sides(labels, np.ones(labels.shape, bool))  # the network mirrored every side
    fixed = lateralize(inverted, "LPS")
    sided = np.isin(truth, [2, 3, 41, 42])
    assert (fixed[sided] == truth[sided]).mean() > 0.99
    # the same array read as RAS (axis 2 towards the patient's right): the sides are the other way round
    as_ras = lateralize(labels, "RAS")
    assert (as_ras[sided] == inverted[sided]).mean() > 0.99


def test_sides_without_a_plane_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    labels, _ = _hemispheres()
    coin = _swap_sides(labels, np.random.default_rng(1).random(labels.shape) < 0.5)  # no side information
    with caplog.at_level(logging.WARNING, logger="inference.hemispheres"):
        out = lateralize(coin)
    assert out is coin
    assert "not supported" in caplog.text
    only_left = np.where(np.isin(labels, [41, 42]), 0, labels).astype(np.uint16)  # one side only: no plane
    assert fit_midsagittal_plane(only_left) is None and lateralize(only_left) is only_left

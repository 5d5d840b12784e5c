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


def test_combined_mirror_labels_are_exactly_equivariant() -> None:
    """The head mirrored (direct and mirrored runs exchanged, sides swapped, x negated) gets exactly the mirrored
    combination, on random label maps that disagree in a third of the voxels, ties included."""
    from inference.hemispheres import combine_mirrored_labels
    from inference.labels import swap_left_right

    rng = np.random.default_rng(3)
    codes = np.array([0, 2, 41, 3, 42, 17, 53, 14, 16, 24], dtype=np.uint16)
    shape = (6, 7, 20)
    a = codes[rng.integers(0, len(codes), shape)]
    b = np.where(rng.random(shape) < 0.35, codes[rng.integers(0, len(codes), shape)], a)
    intensity = rng.integers(0, 5, shape).astype(np.float32)  # few values: many exact ties
    x_mm = (np.arange(shape[2]) - 8.3)[None, None, :] * 1.0
    combined = combine_mirrored_labels(a, b, intensity, x_mm)
    mirrored = combine_mirrored_labels(swap_left_right(b), swap_left_right(a), intensity, -x_mm)
    np.testing.assert_array_equal(mirrored, swap_left_right(combined))
    assert ((combined == a) | (combined == b) | (swap_left_right(combined) == a) |
            (swap_left_right(combined) == b)).all()  # a label of one of the runs, up to its side
    np.testing.assert_array_equal(combined[a == b], a[a == b])


def test_combined_mirror_labels_follow_the_intensity_where_the_runs_differ() -> None:
    from inference.hemispheres import combine_mirrored_labels

    a = np.array([[[2, 2, 3, 3, 2]]], dtype=np.uint16)  # white matter 2 (bright), cortex 3 (darker)
    b = np.array([[[2, 2, 3, 3, 3]]], dtype=np.uint16)
    bright = np.array([[[100, 100, 60, 60, 95]]], dtype=np.float32)
    dark = bright.copy()
    dark[0, 0, 4] = 62
    x_mm = np.arange(5, dtype=float)[None, None, :] + 10  # all on the left of the patient
    assert combine_mirrored_labels(a, b, bright, x_mm)[0, 0, 4] == 2
    assert combine_mirrored_labels(a, b, dark, x_mm)[0, 0, 4] == 3

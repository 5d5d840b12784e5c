"""inference.metrics: known values for PSNR, SSIM, Dice, ASPC and volumes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from inference.metrics import aspc, dice, gaussian_filter, psnr, ssim, volumes_ml

RNG = np.random.default_rng(3)


def test_psnr_identical_is_inf() -> None:
    a = RNG.random((6, 7, 8))
    assert psnr(a, a) == math.inf


def test_psnr_hand_computed() -> None:
    a = np.array([0.0, 10.0, 20.0, 30.0])
    b = a + np.array([1.0, -1.0, 1.0, -1.0])       # mse 1, range 30
    assert psnr(a, b) == pytest.approx(10 * math.log10(30.0**2))
    assert psnr(a, b, data_range=100.0) == pytest.approx(40.0)
    mask = np.array([True, True, False, False])     # range within mask 10
    assert psnr(a, b, mask=mask) == pytest.approx(20.0)


def test_psnr_rejects_bad_mask() -> None:
    with pytest.raises(ValueError, match="empty"):
        psnr(np.ones(3), np.ones(3), mask=np.zeros(3, bool))
    with pytest.raises(ValueError, match="shape"):
        psnr(np.ones(3), np.ones(4))


def test_ssim_identical_is_one() -> None:
    a = RNG.random((12, 13, 14)) * 100
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, a, mask=a > 50) == pytest.approx(1.0)


def test_ssim_decreases_with_noise_and_is_symmetric_in_structure() -> None:
    a = gaussian_filter(RNG.random((16, 16, 16)), 2.0)
    noisy = a + 0.01 * RNG.standard_normal(a.shape)
    noisier = a + 0.05 * RNG.standard_normal(a.shape)
    assert 1.0 > ssim(a, noisy, data_range=1.0) > ssim(a, noisier, data_range=1.0)
    assert ssim(a, -a + 2 * a.mean(), data_range=1.0) < 0.5   # inverted contrast


def test_ssim_of_constant_shift_hand_computed() -> None:
    # constant images: variances and covariance are 0, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a, b = np.full((5, 5, 5), 10.0), np.full((5, 5, 5), 12.0)
    c1 = (0.01 * 20.0) ** 2
    expected = (2 * 10 * 12 + c1) / (10**2 + 12**2 + c1)
    assert ssim(a, b, data_range=20.0) == pytest.approx(expected)


def test_gaussian_filter_matches_scipy() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    x = RNG.random((9, 11, 13))
    np.testing.assert_allclose(gaussian_filter(x, 1.5), ndimage.gaussian_filter(x, 1.5, truncate=3.5), atol=1e-12)


def test_gaussian_filter_preserves_constant_and_mass() -> None:
    np.testing.assert_allclose(gaussian_filter(np.full((6, 6, 6), 3.0), 1.5), 3.0)
    x = np.zeros((21, 21, 21))
    x[10, 10, 10] = 1.0
    assert gaussian_filter(x, 1.5).sum() == pytest.approx(1.0)


def test_dice_hand_computed() -> None:
    a = np.array([0, 1, 1, 1, 2, 2])
    b = np.array([0, 1, 1, 2, 2, 2])
    assert dice(a, b, 1) == pytest.approx(2 * 2 / (3 + 2))
    assert dice(a, b, 2) == pytest.approx(2 * 2 / (2 + 3))
    assert dice(a, a, 1) == 1.0
    assert dice(a, np.zeros_like(a), 1) == 0.0
    assert math.isnan(dice(a, b, 7))


def test_aspc() -> None:
    assert aspc(10.0, 10.0) == 0.0
    assert aspc(90.0, 110.0) == pytest.approx(20.0)  # 200 * 20 / 200
    assert aspc(0.0, 5.0) == pytest.approx(200.0)
    assert aspc(0.0, 0.0) == 0.0
    assert aspc(3.0, 4.0) == aspc(4.0, 3.0)


def test_volumes_ml() -> None:
    labels = np.zeros((10, 10, 10), np.uint16)
    labels[:2] = 17            # 200 voxels
    labels[5, 5, 5] = 53       # 1 voxel
    volumes = volumes_ml(labels, (1.0, 1.0, 2.0))
    assert volumes == {17: pytest.approx(0.4), 53: pytest.approx(0.002)}
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((0.5, 0.5, 0.5))
    assert volumes_ml(image) == {17: pytest.approx(0.025), 53: pytest.approx(0.000125)}
    with pytest.raises(ValueError, match="spacing"):
        volumes_ml(labels)

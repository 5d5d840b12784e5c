from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from inference.agreement import Agreement, compare
from inference.labels import LOBE_CORTEX_CODES, STRUCTURES, aseg_view
from tests.volumetry_factory import make_phantom

# Not cubic, so that the head outline constrains every rotation; 3 mm voxels keep the test fast.
SHAPE, SPACING = (40, 60, 48), (3.0, 3.0, 3.0)


@pytest.fixture(scope="module")
def phantom() -> tuple[sitk.Image, sitk.Image]:
    return make_phantom(shape=SHAPE, spacing=SPACING)


def _moved(image: sitk.Image, transform: sitk.Euler3DTransform) -> sitk.Image:
    """The same voxels placed at x' = transform(x) in patient space (exact: no resampling)."""
    out = sitk.Image(image)
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)
    out.SetDirection(tuple((matrix @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    out.SetOrigin(transform.TransformPoint(image.GetOrigin()))
    return out


def _centre(image: sitk.Image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))


def test_identical_images_agree_perfectly(phantom) -> None:
    labels, t1 = phantom
    result = compare(t1, labels, t1, labels)
    assert isinstance(result, Agreement)
    assert result.psnr == math.inf
    assert result.ssim == pytest.approx(1.0)
    assert result.n_structures == len(STRUCTURES)
    assert set(result.dice) == set(STRUCTURES)
    assert all(value == 1.0 for value in result.dice.values())
    assert all(value == 0.0 for value in result.aspc.values())
    assert result.translation_mm == (0.0, 0.0, 0.0) and result.rotation_deg == (0.0, 0.0, 0.0)
    assert result.coverage == 1.0
    brain = sitk.GetArrayViewFromImage(labels)
    # the brain mask: aseg codes 1..99 and every measured structure (the cortex by lobe, the corpus callosum)
    assert result.mask_voxels == int((((brain > 0) & (brain < 100)) | np.isin(brain, list(STRUCTURES))).sum())
    assert result.mask_voxels > int(((brain > 0) & (brain < 100)).sum())


def test_intensity_scale_does_not_matter(phantom) -> None:
    labels, t1 = phantom
    result = compare(t1, labels, t1 * 3.7 + 0.0, labels)
    assert result.psnr > 100
    assert result.ssim == pytest.approx(1.0, abs=1e-9)


def test_rigid_motion_is_recovered(phantom) -> None:
    labels, t1 = phantom
    centre = _centre(t1)
    truth = sitk.Euler3DTransform(tuple(centre), *(math.radians(a) for a in (4.0, -3.0, 5.0)), (3.0, -2.0, 4.0))
    result = compare(t1, labels, _moved(t1, truth), _moved(labels, truth))
    found = result.registration.transform
    for offset in ((0, 0, 0), (40, 0, 0), (0, 40, 0), (0, 0, 40)):
        point = tuple(centre + offset)
        error = np.linalg.norm(np.subtract(found.TransformPoint(point), truth.TransformPoint(point)))
        assert error < (1.0 if offset == (0, 0, 0) else 1.5), (offset, error)
    assert np.allclose(result.rotation_deg, (4.0, -3.0, 5.0), atol=1.0)
    # translation about the brain centre ~ the truth's about the image centre (the centres nearly coincide)
    assert np.allclose(result.translation_mm, (3.0, -2.0, 4.0), atol=1.0)
    assert result.psnr > 30 and result.ssim > 0.95
    assert min(result.dice.values()) > 0.9
    assert max(result.aspc.values()) == 0.0  # volumes come from each native label map
    assert result.registration.metric_final < result.registration.metric_initial


def test_without_registration_the_motion_would_show(phantom) -> None:
    """Control: the moved pair differs strongly before registration, so the test above can fail."""
    labels, t1 = phantom
    truth = sitk.Euler3DTransform(tuple(_centre(t1)), *(math.radians(a) for a in (4.0, -3.0, 5.0)),
                                  (3.0, -2.0, 4.0))
    moved = sitk.Resample(_moved(labels, truth), labels, sitk.Transform(), sitk.sitkNearestNeighbor)
    a, b = sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(moved)
    hippocampus = 2 * np.sum((a == 17) & (b == 17)) / (np.sum(a == 17) + np.sum(b == 17))
    assert hippocampus < 0.7


def test_shrunken_hippocampus_gives_expected_aspc_and_dice(phantom) -> None:
    labels, t1 = phantom
    array = sitk.GetArrayFromImage(labels)
    k = np.nonzero(np.any(array == 17, axis=(1, 2)))[0]
    shrunk = array.copy()
    layer = shrunk[k[-1]]
    layer[layer == 17] = 2  # one slice of the left hippocampus becomes white matter
    synthetic = sitk.GetImageFromArray(shrunk)
    synthetic.CopyInformation(labels)
    real_voxels, synth_voxels = int((array == 17).sum()), int((shrunk == 17).sum())
    assert 0 < synth_voxels < real_voxels

    result = compare(t1, labels, t1, synthetic)
    expected = 200.0 * (real_voxels - synth_voxels) / (real_voxels + synth_voxels)
    assert result.aspc[17] == pytest.approx(expected)
    assert result.dice[17] == pytest.approx(2 * synth_voxels / (real_voxels + synth_voxels))
    voxel_ml = float(np.prod(SPACING)) / 1000
    assert result.structures[17].real_ml == pytest.approx(real_voxels * voxel_ml)
    assert result.structures[17].synthetic_ml == pytest.approx(synth_voxels * voxel_ml)
    assert result.aspc[53] == 0.0 and result.dice[53] == 1.0
    assert 0 < result.aspc[2] < 1.0


def test_smaller_synthetic_field_of_view(phantom) -> None:
    labels, t1 = phantom
    size = list(t1.GetSize())
    upper = size[2] // 2
    crop_t1 = sitk.RegionOfInterest(t1, size[:2] + [size[2] - upper], [0, 0, upper])
    crop_labels = sitk.RegionOfInterest(labels, size[:2] + [size[2] - upper], [0, 0, upper])
    result = compare(t1, labels, crop_t1, crop_labels)
    assert 0.3 < result.coverage < 0.7
    assert np.linalg.norm(result.translation_mm) < 1.0  # the shared Frame of Reference is kept
    assert result.psnr > 40
    # the hippocampi lie in the lower half: missing from the synthetic labels altogether
    assert result.structures[17].synthetic_ml == 0.0 and result.structures[17].real_ml > 0
    assert result.aspc[17] == pytest.approx(200.0) and result.dice[17] == 0.0
    assert result.dice[2] > 0.3  # the upper white matter still overlaps


def test_rejects_labels_off_grid_and_empty_brain(phantom) -> None:
    labels, t1 = phantom
    shifted = sitk.Image(labels)
    shifted.SetOrigin(tuple(np.add(labels.GetOrigin(), (5.0, 0.0, 0.0))))
    with pytest.raises(ValueError, match="grid"):
        compare(t1, shifted, t1, labels)
    empty = sitk.Image(labels.GetSize(), labels.GetPixelID())
    empty.CopyInformation(labels)
    with pytest.raises(ValueError, match="no brain"):
        compare(t1, empty, t1, labels)


def test_a_segmenter_label_set_against_a_synthesis_models_own(phantom) -> None:
    """The real T1 measured by the segmenter (cortex by lobe, corpus callosum), the sT1 by its synthesis model's own
    labels (whole cortex 3/42, the callosum in the white matter, no accumbens): the same head must agree
    perfectly where both can label, not score each lobe, the callosum and the whole cortex Dice 0, nor the white
    matter short of the callosum."""
    labels, t1 = phantom
    real = sitk.GetArrayFromImage(labels)
    assert (real == 192).any() and (real == 26).any() and np.isin(real, [1201, 2201]).any()
    own = aseg_view(real)
    # the callosum in the white matter of its side: of the plane halfway between the two white matters' centres
    left, right = np.argwhere(real == 2).mean(axis=0), np.argwhere(real == 41).mean(axis=0)
    callosum = np.argwhere(real == 192)
    nearer_left = (callosum - (left + right) / 2) @ (left - right) >= 0
    own[tuple(callosum.T)] = np.where(nearer_left, 2, 41)
    own[np.isin(own, [26, 58])] = 0  # never labelled by the model
    # SynthSeg's 24 is all the CSF around the brain, aparc+aseg's a small extra-ventricular label: compared, it
    # scored Dice 0 / ASPC 200 in every agreement SR (review finding)
    outside = np.argwhere(own == 0)
    own[tuple(outside[: len(outside) // 4].T)] = 24
    synthetic = sitk.GetImageFromArray(own.astype(np.uint16))
    synthetic.CopyInformation(labels)

    result = compare(t1, labels, t1, synthetic, synthetic_unlabelled=[26, 58])
    assert 3 in result.dice and 42 in result.dice and result.dice[3] == 1.0 and result.dice[42] == 1.0
    assert not set(result.dice) & {*LOBE_CORTEX_CODES, 192, 26, 58, 24}
    assert all(value == 1.0 for value in result.dice.values()), result.dice  # the white matter too
    assert result.mean_dice > 0.99
    # as before: the same label set on both sides is compared as it is
    assert set(compare(t1, labels, t1, labels).dice) == set(STRUCTURES)

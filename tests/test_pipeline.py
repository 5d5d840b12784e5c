"""inference.pipeline: geometry round trip, tiling, normalization, label mapping with the fixture model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.models import InputSpec, ModelRegistry
from inference.pipeline import (
    blend_window,
    foreground_box,
    normalize,
    pad_to_multiple,
    run_model,
    tile_starts,
)
from inference.volume import isotropic_grid
from tests.onnx_fixtures import make_synthesis_model


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


DIRECTION = _rotation(1, 20.0) @ _rotation(2, 15.0) @ np.column_stack([[0, 1, 0], [0, 0, -1], [-1, 0, 0]])
ORIGIN = np.array([30.0, -40.0, 25.0])
SPACING = np.array([1.3, 0.9, 2.5])
SIZE = (40, 44, 18)  # i, j, k


def _physical_points(image: sitk.Image) -> np.ndarray:
    k, j, i = np.indices(sitk.GetArrayViewFromImage(image).shape)
    matrix = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    index = np.stack([i, j, k], axis=-1).reshape(-1, 3).T
    return (np.array(image.GetOrigin())[:, None] + matrix @ index).T.reshape((*k.shape, 3))


def oblique_blob(center: np.ndarray, sigma_mm: float = 5.0) -> sitk.Image:
    """Oblique, anisotropic volume holding a Gaussian blob centred at patient point ``center``."""
    image = sitk.Image(list(SIZE), sitk.sitkFloat32)
    image.SetSpacing(tuple(SPACING))
    image.SetDirection(tuple(DIRECTION.ravel()))
    image.SetOrigin(tuple(ORIGIN))
    d2 = np.sum((_physical_points(image) - center) ** 2, axis=-1)
    out = sitk.GetImageFromArray((1000.0 * np.exp(-d2 / (2 * sigma_mm**2))).astype(np.float32))
    out.CopyInformation(image)
    return out


FOV_CENTER = ORIGIN + DIRECTION @ (SPACING * (np.array(SIZE) - 1) / 2)


def _center_of(image: sitk.Image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))


def centroid(image: sitk.Image, fraction: float = 0.3) -> np.ndarray:
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    array[array < fraction * array.max()] = 0
    points = _physical_points(image)
    return (points * array[..., None]).sum(axis=(0, 1, 2)) / array.sum()


def _model(tmp_path: Path, **kwargs):  # noqa: ANN202
    kwargs.setdefault("p_high", 100.0)
    model_id = kwargs.setdefault("model_id", "test-synth")
    make_synthesis_model(tmp_path, **kwargs)
    return ModelRegistry(tmp_path, providers="cpu", threads=1).session(model_id)


@pytest.mark.parametrize("orientation", ["LPS", "LIA", "RAS"])
def test_identity_model_keeps_patient_geometry(tmp_path: Path, orientation: str) -> None:
    center = FOV_CENTER + DIRECTION @ np.array([6.0, -5.0, 7.5])
    image = oblique_blob(center)
    model = _model(tmp_path, orientation=orientation)
    result = run_model(model, image)
    assert result.t1 is not None and result.labels is not None
    t1 = result.t1
    assert t1.GetSpacing() == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(t1.GetDirection(), image.GetDirection(), atol=1e-9)
    reference = isotropic_grid(image, 1.0)
    assert t1.GetSize() == reference.GetSize() == (52, 40, 45)
    np.testing.assert_allclose(t1.GetOrigin(), reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(_center_of(t1), _center_of(image), atol=1e-6)  # same field of view
    assert t1.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(centroid(t1), center, atol=1.0)
    # identity model: t1 = normalized input x scale; the blob peak is the top percentile -> ~1000
    assert 900 < sitk.GetArrayViewFromImage(t1).max() <= 1000.0 + 1e-3
    assert result.labels.GetPixelID() == sitk.sitkUInt16
    assert result.labels.GetSize() == t1.GetSize()
    np.testing.assert_allclose(result.labels.GetDirection(), t1.GetDirection())
    np.testing.assert_allclose(result.labels.GetOrigin(), t1.GetOrigin())
    assert set(result.timings) == {"reorient", "resample", "normalize", "inference", "back"}
    assert all(v >= 0 for v in result.timings.values())


def test_labels_follow_intensity_and_declared_codes(tmp_path: Path) -> None:
    image = oblique_blob(FOV_CENTER)
    labels = [0, 17, 53, 4]
    result = run_model(_model(tmp_path, labels=labels), image)
    t1 = sitk.GetArrayFromImage(result.t1) / 1000.0
    seg = sitk.GetArrayFromImage(result.labels)
    assert set(np.unique(seg)) <= set(labels)
    assert set(np.unique(seg)) == set(labels)  # the blob spans all intensity bands
    # fixture: channel c wins for c/4 <= x < (c+1)/4; compare away from band edges (interpolation differs)
    lut = np.array(labels)
    expected = lut[np.clip(np.floor(t1 * 4), 0, 3).astype(int)]
    away = np.abs(t1 * 4 - np.round(t1 * 4)) > 0.05
    assert np.mean(seg[away] == expected[away]) > 0.98
    peak = np.unravel_index(np.argmax(t1), t1.shape)
    assert seg[peak] == 4 and seg[0, 0, 0] == 0


def test_tiling_matches_single_tile(tmp_path: Path) -> None:
    image = oblique_blob(FOV_CENTER + DIRECTION @ np.array([8.0, 0, 0]))
    tiled = run_model(_model(tmp_path / "a", tile=(16, 16, 16), overlap=8, divisible_by=8), image)
    whole = run_model(_model(tmp_path / "b", tile=(128, 128, 128), overlap=0, divisible_by=8), image)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(tiled.t1), sitk.GetArrayViewFromImage(whole.t1),
                               atol=1e-4 * 1000.0, rtol=0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(tiled.labels), sitk.GetArrayViewFromImage(whole.labels))


def test_fixed_shape_model_gets_its_shape(tmp_path: Path) -> None:
    image = oblique_blob(FOV_CENTER)
    fixed = _model(tmp_path / "a", fixed_shape=(48, 64, 48), tile=(16, 16, 16), overlap=4)
    assert fixed.fixed_spatial_shape == (48, 64, 48)
    dynamic = _model(tmp_path / "b")
    a, b = run_model(fixed, image), run_model(dynamic, image)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(a.t1), sitk.GetArrayViewFromImage(b.t1), atol=0.1)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a.labels), sitk.GetArrayViewFromImage(b.labels))


def test_segmentation_only_model(tmp_path: Path) -> None:
    result = run_model(_model(tmp_path, task="segmentation"), oblique_blob(FOV_CENTER))
    assert result.t1 is None
    assert result.labels is not None and result.labels.GetSpacing() == (1.0, 1.0, 1.0)


def test_coarser_model_spacing_still_returns_1mm(tmp_path: Path) -> None:
    center = FOV_CENTER + DIRECTION @ np.array([0, 4.0, -5.0])
    image = oblique_blob(center)
    result = run_model(_model(tmp_path, spacing_mm=2.0), image)
    assert result.t1.GetSpacing() == (1.0, 1.0, 1.0)
    assert result.t1.GetSize() == isotropic_grid(image, 1.0).GetSize()
    np.testing.assert_allclose(centroid(result.t1), center, atol=1.0)


def test_tile_starts_cover_with_overlap() -> None:
    assert tile_starts(10, 16, 4) == [0]
    assert tile_starts(64, 32, 8) == [0, 24, 32]
    for size, tile, overlap in [(96, 32, 8), (100, 48, 16), (33, 16, 0)]:
        starts = tile_starts(size, tile, overlap)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s:s + tile] = True
            assert s + tile <= size
        assert covered.all()
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_blend_window_is_positive_and_smooth() -> None:
    window = blend_window((16, 16, 16), 4)
    assert window.shape == (16, 16, 16) and window.dtype == np.float32
    assert window.min() > 0 and window.max() == pytest.approx(1.0)
    assert window[8, 8, 8] == 1.0
    line = window[8, 8]
    np.testing.assert_allclose(line, line[::-1])
    assert np.all(np.diff(line[:5]) > 0)
    assert np.all(blend_window((8, 8, 8), 0) == 1.0)


def test_pad_to_multiple_and_crop() -> None:
    array = np.arange(5 * 7 * 9, dtype=np.float32).reshape(5, 7, 9)
    padded, crop = pad_to_multiple(array, 8)
    assert padded.shape == (8, 8, 16)
    np.testing.assert_array_equal(padded[crop], array)
    padded, crop = pad_to_multiple(array, 4, minimum=(12, 4, 4))
    assert padded.shape == (12, 8, 12)
    np.testing.assert_array_equal(padded[crop], array)


def test_normalize_percentile_over_foreground() -> None:
    spec = InputSpec(name="image", p_low=0.0, p_high=100.0, clip_max=1.5)
    array = np.zeros((4, 4, 4), np.float32)
    array[1:3, 1:3, 1:3] = np.arange(8, dtype=np.float32).reshape(2, 2, 2) * 10 + 100  # 100..170
    out = normalize(array, spec)
    assert out.dtype == np.float32
    assert out[0, 0, 0] == 0.0  # background below p_low clips to 0
    np.testing.assert_allclose(out[1:3, 1:3, 1:3].ravel(), np.arange(8) / 7, atol=1e-6)
    clipped = normalize(array, InputSpec(name="image", p_low=0.0, p_high=50.0, clip_max=1.2))
    assert clipped.max() == pytest.approx(1.2)
    minmax = normalize(array, InputSpec(name="image", normalization="minmax"))
    assert minmax.min() == 0.0 and minmax.max() == pytest.approx(1.0)
    assert not normalize(np.zeros((3, 3, 3), np.float32), spec).any()


def test_argmax_channels_matches_numpy_with_ties() -> None:
    from inference.pipeline import argmax_channels

    rng = np.random.default_rng(1)
    logits = np.round(rng.normal(size=(33, 5, 6, 7)) * 2).astype(np.float32)  # many ties: first one wins
    for dtype in (np.uint8, np.uint16):
        out = np.full(logits.shape[1:], 99, dtype=dtype)
        argmax_channels(logits, out)
        np.testing.assert_array_equal(out, np.argmax(logits, axis=0))


def test_balanced_tile_computes_fewest_voxels() -> None:
    from inference.pipeline import balanced_tile

    assert balanced_tile(208, 192, 16, 16) == 112  # 2 tiles either way: 2 × 112 instead of 2 × 192
    assert balanced_tile(256, 192, 16, 16) == 96   # 3 × 96 computes what 2 × 144 does, in less memory
    assert balanced_tile(64, 128, 8, 8) == 64      # one tile holds it all
    for size, tile, overlap, multiple in [(272, 192, 16, 16), (208, 96, 16, 16), (64, 32, 8, 8), (40, 16, 4, 4)]:
        extent = balanced_tile(size, tile, overlap, multiple)
        assert extent <= tile and extent % multiple == 0 and extent > overlap
        starts = tile_starts(size, extent, overlap)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s:s + extent] = True
        assert covered.all()
        assert len(starts) * extent <= len(tile_starts(size, tile, overlap)) * tile


def test_sliding_window_equals_whole_volume_blend(tmp_path: Path) -> None:
    """Streaming the logits row by row gives exactly the argmax of the whole volume's blended logits."""
    from inference.pipeline import sliding_window

    labels = tuple(range(0, 66, 2))  # 33 channels
    folder = make_synthesis_model(tmp_path, model_id="m", labels=labels, tile=(16, 16, 16), overlap=4,
                                  divisible_by=4)
    model = ModelRegistry(folder.parent).session("m")
    volume = np.random.default_rng(2).random((40, 28, 36), dtype=np.float32) * 1.2
    tile = (16, 16, 16)
    image, seg = sliding_window(model, volume, tile)
    # reference: accumulate every tile into whole-volume sums, then one argmax
    weight = blend_window(tile, 4)
    logit_sum = np.zeros((len(labels), *volume.shape), np.float32)
    image_sum = np.zeros(volume.shape, np.float32)
    weight_sum = np.zeros(volume.shape, np.float32)
    for z in tile_starts(40, 16, 4):
        for y in tile_starts(28, 16, 4):
            for x in tile_starts(36, 16, 4):
                region = (slice(z, z + 16), slice(y, y + 16), slice(x, x + 16))
                t1, logits = model.session.run(["t1", "seg"], {"image": volume[region][None, None]})
                image_sum[region] += t1[0, 0] * weight
                weight_sum[region] += weight
                logit_sum[(slice(None), *region)] += logits[0] * weight
    np.testing.assert_array_equal(seg, np.argmax(logit_sum, axis=0))
    np.testing.assert_array_equal(image, image_sum / weight_sum)
    assert len(np.unique(seg)) > 10


def test_foreground_box_is_the_largest_component_plus_margin() -> None:
    volume = np.zeros((40, 50, 60), np.float32)
    volume[10:20, 12:30, 5:45] = 1.0  # the head
    volume[35, 45, 58] = 1.0  # a bright speck far away: not part of the box
    volume += np.random.default_rng(0).uniform(0, 0.02, volume.shape).astype(np.float32)  # air noise
    # the head's box grown by the margin, to within a block of FOREGROUND_SHRINK voxels (the block 44..47 holds
    # one head voxel of four: its mean is below Otsu's threshold)
    assert foreground_box(volume, 3) == (slice(5, 23), slice(9, 35), slice(1, 47))
    edge = np.zeros((41, 50, 60), np.float32)
    edge[30:41, 12:30, 5:45] = 1.0  # the head reaches the last, partial block
    assert foreground_box(edge, 0)[0] == slice(28, 41)
    assert foreground_box(volume, 100) == (slice(0, 40), slice(0, 50), slice(0, 60))  # kept inside
    assert foreground_box(np.zeros((4, 5, 6), np.float32), 3) == (slice(0, 4), slice(0, 5), slice(0, 6))


def test_foreground_margin_runs_the_network_on_the_head_only(tmp_path: Path) -> None:
    image = oblique_blob(FOV_CENTER, sigma_mm=3.0)
    whole = run_model(_model(tmp_path / "a"), image)
    boxed = run_model(_model(tmp_path / "b", foreground_margin=2), image)
    assert "foreground" in boxed.timings and "foreground" not in whole.timings
    t_whole, t_boxed = (sitk.GetArrayFromImage(r.t1) for r in (whole, boxed))
    l_whole, l_boxed = (sitk.GetArrayFromImage(r.labels) for r in (whole, boxed))
    inside = t_boxed > 0
    assert 0 < inside.mean() < 0.5  # the box is a part of the field of view
    # the identity fixture: the same values inside the box (away from its edge, where the resampling back to the
    # input grid mixes in the zeros outside), background outside
    core = t_whole > 0.5 * t_whole.max()
    np.testing.assert_allclose(t_boxed[core], t_whole[core], rtol=1e-5)
    assert (l_boxed[core] == l_whole[core]).all() and l_whole[core].any()
    assert not l_boxed[t_boxed == 0].any()


def test_lateralize_gives_sides_by_the_midsagittal_plane(tmp_path: Path) -> None:
    """An LPS 1 mm volume whose fixture labels are mostly on the wrong side (intensity 0.8 -> 41 'right' on the
    patient's left, 0.5 -> 2 'left' on the right, 20 % the other way): lateralize puts every side right."""
    rng = np.random.default_rng(0)
    array = np.zeros((32, 32, 40), np.float32)
    left = np.zeros(array.shape, bool)
    left[..., 20:] = True  # axis 2 = i, towards the patient's left in LPS
    brain = np.zeros(array.shape, bool)
    brain[4:28, 4:28, 4:36] = True
    wrong = rng.random(array.shape) < 0.8
    array[brain & left] = np.where(wrong, 80.0, 50.0)[brain & left]
    array[brain & ~left] = np.where(wrong, 50.0, 80.0)[brain & ~left]
    array[0, 0, 0] = 1.0  # the lowest foreground value (p_low 0): 50 and 80 normalise to 0.62 and 1.0
    image = sitk.GetImageFromArray(array)
    plain = sitk.GetArrayFromImage(run_model(_model(tmp_path / "a", p_low=0.0, labels=[0, 2, 41]), image).labels)
    sided = sitk.GetArrayFromImage(
        run_model(_model(tmp_path / "b", p_low=0.0, labels=[0, 2, 41], lateralize=True), image).labels)
    assert (plain[brain & left] == 41).mean() > 0.75  # the fixture's own sides: mostly wrong
    assert (sided[brain & left] == 2).all() and (sided[brain & ~left] == 41).all()
    assert not sided[~brain].any()
    assert (plain[brain] > 0).all()


def test_mirror_average_gives_exactly_mirrored_image_and_labels(tmp_path: Path) -> None:
    """``mirror_average``: an off-centre, oblique head mirrored in patient space gets the mirrored sT1 and the
    mirrored own labels (sides exchanged), voxel for voxel, although the model's tiles, box and lateralisation see
    other voxels for the two heads."""
    from inference.labels import swap_left_right
    from inference.volume import mirror_left_right

    rng = np.random.default_rng(0)
    centre = FOV_CENTER + DIRECTION @ np.array([4.0, -3.0, 2.5])
    image = oblique_blob(centre, sigma_mm=9.0)
    noisy = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) + rng.random(SIZE[::-1]).astype(np.float32) * 80)
    noisy.CopyInformation(image)
    model = _model(tmp_path, labels=[0, 2, 41, 17, 53, 4, 43], lateralize=True, tile=(16, 16, 16), overlap=4,
                   divisible_by=8, foreground_margin=2)
    direct = run_model(model, noisy, mirror_average=True)
    mirrored = run_model(model, mirror_left_right(noisy), mirror_average=True)
    assert direct.labels is not None and mirrored.labels is not None
    np.testing.assert_allclose(sitk.GetArrayFromImage(mirrored.t1), sitk.GetArrayFromImage(direct.t1), atol=1e-4)
    labels = sitk.GetArrayFromImage(direct.labels)
    assert len(np.unique(labels)) >= 4
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mirrored.labels), swap_left_right(labels))
    # the two runs' stages summed, and making them one timed too (the job's breakdown leaves nothing out)
    assert {"reorient", "inference", "back", "mirror"} <= set(direct.timings)

"""inference.segmentation: the bundled segmenter on real scans (no side bias, QC), and its building blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_node.config import DEFAULT_SEGMENTER
from inference.labels import LR_SWAP, STRUCTURES, by_code
from inference.models import ModelRegistry
from inference.segmentation import conform_grid, conform_intensities, intracranial_mask, largest_component, segment
from inference.volume import load_series, mirror_left_right
from inference.volumetry import OPTIONAL_STRUCTURES, compute_volumetry, expected_structures
from tests.conftest import SHARED_DATA, requires_shared_data

MODELS_DIR = Path(__file__).resolve().parents[1] / "onnx_models"
MPRAGE = SHARED_DATA / "dicom" / "human_siemens_skyra_mprage"
SCOUT = SHARED_DATA / "dicom" / "phantom_siemens_xa30_aahead_scout" / "01001_AAHead_Scout"


def _series(folder: Path):  # noqa: ANN202
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (../shared/data)")
    return load_series(sorted(p for p in folder.rglob("*") if p.is_file() and "LICENSE" not in p.name.upper()))


@pytest.fixture(scope="module")
def segmenter():  # noqa: ANN201
    return ModelRegistry(MODELS_DIR, providers="cpu", threads=2).session(DEFAULT_SEGMENTER)


@pytest.fixture(scope="module")
def mprage(segmenter):  # noqa: ANN001, ANN201
    series = _series(MPRAGE)
    return series, segment(segmenter, series.image), segment(segmenter, mirror_left_right(series.image))


def _volumes(labels: sitk.Image) -> dict[int, int]:
    values, counts = np.unique(sitk.GetArrayFromImage(labels), return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts, strict=True) if v}


# -- building blocks ---------------------------------------------------------------------------------------------

def test_conform_grid_is_freesurfers(segmenter) -> None:  # noqa: ANN001
    image = sitk.Image([40, 50, 30], sitk.sitkFloat32)
    image.SetSpacing((0.9, 0.8, 2.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    grid = conform_grid(image, segmenter.manifest.input)
    assert grid.GetSize() == (256, 256, 256) and grid.GetSpacing() == (1.0, 1.0, 1.0)
    # LIA: i towards the patient's left (+x in LPS), j inferior (-z), k anterior (-y)
    np.testing.assert_allclose(np.array(grid.GetDirection()).reshape(3, 3), [[1, 0, 0], [0, 0, -1], [0, -1, 0]])
    centre = image.TransformContinuousIndexToPhysicalPoint([19.5, 24.5, 14.5])
    np.testing.assert_allclose(grid.TransformContinuousIndexToPhysicalPoint([127.5] * 3), centre, atol=1e-9)


def test_conform_intensities_saturate_the_brightest_thousandth() -> None:
    rng = np.random.default_rng(0)
    volume = rng.uniform(100, 200, size=(40, 40, 40)).astype(np.float32)
    volume[:2, :2, :2] = 5000.0  # a few bright voxels (vessels, fat) must not compress the rest
    volume[0, 0, 0] = 0.0
    out = conform_intensities(volume)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.median(out) > 0.4  # without the percentile the bulk would sit near 0.03
    assert np.array_equal(out, np.floor(out * 255 + 1e-3) / 255)  # uchar steps


def test_largest_component_and_intracranial_mask() -> None:
    mask = np.zeros((40, 40, 40), bool)
    mask[5:30, 5:30, 5:30] = True
    mask[35:38, 35:38, 35:38] = True  # an island
    kept = largest_component(mask)
    assert kept.sum() == 25 ** 3 and not kept[36, 36, 36]
    z, y, x = np.mgrid[:80, :80, :80]
    ball = ((z - 40) ** 2 + (y - 40) ** 2 + (x - 40) ** 2) < 30 ** 2
    shell = ball & ~(((z - 40) ** 2 + (y - 40) ** 2 + (x - 40) ** 2) < 10 ** 2)  # a "ventricle" inside
    brain = sitk.GetImageFromArray(shell.astype(np.uint8))
    icv = intracranial_mask(brain)
    volume = sitk.GetArrayViewFromImage(icv).sum() * np.prod(icv.GetSpacing())
    assert ball.sum() < volume < 1.35 * ball.sum()  # the hole filled, about 2 mm grown


# -- the real MPRAGE ---------------------------------------------------------------------------------------------

@requires_shared_data
def test_mirrored_head_gets_mirrored_labels(mprage) -> None:  # noqa: ANN001
    """No side bias: each structure's volume on the real T1 equals (within 3 %) its counterpart's on the head
    mirrored in patient space; and the labels themselves are the mirrored labels."""
    _, original, flipped = mprage
    a, b = _volumes(original.labels), _volumes(flipped.labels)
    assert len(a) >= 40
    for code, n in a.items():
        partner = LR_SWAP.get(code, code)
        assert abs(b.get(partner, 0) - n) <= 0.03 * n, f"{by_code(code).display_name}: {n} vs {b.get(partner)}"
    assert original.icv_ml == pytest.approx(flipped.icv_ml, rel=0.01)
    # voxel for voxel: the mirrored image has the same voxel array on mirrored positions, so its label array is
    # the original's with left and right exchanged
    lut = np.arange(2300, dtype=np.uint16)
    for left, right in LR_SWAP.items():
        lut[left] = right
    agree = np.mean(lut[sitk.GetArrayFromImage(flipped.labels)] == sitk.GetArrayFromImage(original.labels))
    assert agree > 0.999, agree


@requires_shared_data
def test_mprage_volumetry_passes_qc_with_every_structure(mprage, segmenter) -> None:  # noqa: ANN001
    series, result, _ = mprage
    first = series.datasets[0]
    expected = expected_structures(segmenter.manifest.output.segmentation.labels)
    assert {17, 53, 18, 54, 1203, 2203, 192} <= expected and not expected & {5, 44, 24, 3, 42}
    volumetry = compute_volumetry(result.labels, series.image, age=first.get("PatientAge"),
                                  sex=first.get("PatientSex"), expected_codes=expected, icv_ml=result.icv_ml,
                                  outside_ml=result.outside_ml)
    assert volumetry.age_years is not None and 2 <= volumetry.age_years <= 4  # a 3-year-old
    failed = [c.reason for c in volumetry.qc if c.passed is False]
    assert volumetry.qc_passed, failed
    assert {c.name: c.passed for c in volumetry.qc} == {
        "icv_range": True, "structures_present": True, "brain_mask": True, "asymmetry": True,
        "intensity_ordering": True, "field_of_view": True}  # (the real head is within its image)
    assert "age 3" in next(c.reason for c in volumetry.qc if c.name == "icv_range")
    # every structure non-empty; the big ones within ranges published for young children (ml, one side)
    assert expected <= set(volumetry.structures)
    ranges = {2: (120, 300), 41: (120, 300), 8: (35, 80), 47: (35, 80), 10: (4, 10), 49: (4, 10), 16: (10, 30),
              4: (1, 20), 43: (1, 20)}
    for code, (low, high) in ranges.items():
        assert low <= volumetry.structures[code].volume_ml <= high, by_code(code).display_name
    cortex = volumetry.cortex_ml
    assert 180 <= cortex["L"] <= 350 and 180 <= cortex["R"] <= 350
    assert 900 <= volumetry.icv_ml <= 1550
    assert result.outside_ml < 5.0


@requires_shared_data
def test_phantom_scout_fails_qc(segmenter) -> None:  # noqa: ANN001
    """A bottle is not a brain: whatever the segmenter draws on it, QC says so."""
    series = _series(SCOUT)
    result = segment(segmenter, series.image)
    volumetry = compute_volumetry(result.labels, series.image, age=None, sex=None, icv_ml=result.icv_ml,
                                  outside_ml=result.outside_ml,
                                  expected_codes=set(STRUCTURES) - OPTIONAL_STRUCTURES - {3, 42})
    assert not volumetry.qc_passed
    assert any(c.passed is False and c.name in ("icv_range", "structures_present") for c in volumetry.qc)


def _sT1_mirror_differences(segmenter, kind: str) -> dict[str, float]:  # noqa: ANN001
    """The real MPRAGE simulated as ``kind`` (the training generator's acquisition), synthesized by the kind's
    default model with the node's mirror averaging and segmented; the same for the head mirrored in patient
    space. Per structure: |counterpart on the mirrored head - structure| / structure, in %."""
    torch = pytest.importorskip("torch")
    from dicom_node.config import default_rules
    from inference.pipeline import run_model
    from inference.training.generator import INPUT_KINDS, acquire
    from inference.volume import resample_isotropic

    rule = {"aahead_scout": "aahead-scout", "flair": "flair-2d", "cor_t2": "coronal-t2", "t1_2d": "t1-2d",
            "any": "flair-3d"}[kind]
    model_id = next(r.model for r in default_rules() if r.name == rule)
    model = ModelRegistry(MODELS_DIR, providers="cpu", threads=2).session(model_id)
    iso = resample_isotropic(sitk.DICOMOrient(_series(MPRAGE).image, "LPS"), 1.0)
    array = sitk.GetArrayFromImage(iso)
    raw = torch.from_numpy(np.clip(array / np.percentile(array[array > 0], 99.5) * 200.0, 0, None))
    simulated = sitk.GetImageFromArray(acquire(raw, kind, torch.Generator().manual_seed(INPUT_KINDS.index(kind)))
                                       .numpy().astype(np.float32))
    simulated.CopyInformation(iso)

    def volumes(image: sitk.Image) -> dict[int, int]:
        synthetic = run_model(model, image, mirror_average=True).t1
        assert synthetic is not None
        return _volumes(segment(segmenter, synthetic).labels)

    original, flipped = volumes(simulated), volumes(mirror_left_right(simulated))
    return {by_code(code).display_name: 100.0 * abs(flipped.get(LR_SWAP.get(code, code), 0) - n) / n
            for code, n in original.items() if code in STRUCTURES and n >= 100}


@requires_shared_data
def test_sT1_of_a_mirrored_scout_gives_mirrored_volumes(segmenter) -> None:  # noqa: ANN001
    """No side bias through synthesis too (the scout here; every input kind in the heavy suite)."""
    differences = _sT1_mirror_differences(segmenter, "aahead_scout")
    assert len(differences) >= 30
    worst = max(differences, key=differences.get)
    assert differences[worst] <= 3.0, f"{worst}: {differences[worst]:.2f} %"


@pytest.mark.heavy
@requires_shared_data
@pytest.mark.parametrize("kind", ["flair", "cor_t2", "t1_2d", "any"])
def test_sT1_of_every_input_kind_gives_mirrored_volumes(segmenter, kind: str) -> None:  # noqa: ANN001
    differences = _sT1_mirror_differences(segmenter, kind)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= 3.0, f"{kind}, {worst}: {differences[worst]:.2f} %"


@pytest.mark.heavy
@requires_shared_data
def test_real_t1_mode_scores_sT1_and_the_upsampling_baseline(tmp_path: Path) -> None:
    """The real-T1 evaluation (README table) runs for a kind and scores both arms against the reference."""
    pytest.importorskip("torch")
    from inference.training import evaluate_real_t1

    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{evaluate_real_t1.README_START}\n{evaluate_real_t1.README_END}\n")
    evaluate_real_t1.main(["--kinds", "aahead_scout", "--readme", str(readme), "--out", str(tmp_path / "r.json")])
    text = readme.read_text()
    for contrast in ("T1", "kind"):
        row = f"| aahead_scout ({contrast} contrast) |"
        assert f"{row} segmenter on the input, upsampled (baseline) |" in text
        assert f"{row} segmenter on the sT1 by `synth-t1-aahead-scout` |" in text
        assert f"{row} own head of `synth-t1-aahead-scout` |" in text
    import json

    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert 0.3 < results["aahead_scout (T1 contrast)"]["upsampled"]["dice_mean"] <= 1.0
    assert "psnr_db" not in results["aahead_scout (kind contrast)"]["upsampled"]  # not a T1: no PSNR against one


def test_a_narrow_head_box_runs(segmenter) -> None:  # noqa: ANN001
    """The graph splits the last tensor axis into equal slabs: a box of any width must run (padded)."""
    z, y, x = np.mgrid[:40, :60, :50].astype(np.float32)
    blob = (((z - 20) / 8) ** 2 + ((y - 30) / 5) ** 2 + ((x - 25) / 12) ** 2) < 1  # thin along A-P (y)
    image = sitk.GetImageFromArray((blob * 100.0 + 1.0).astype(np.float32))
    result = segment(segmenter, image)
    assert sitk.GetArrayViewFromImage(result.labels).shape == (40, 60, 50)

"""Every model shipped in onnx_models/ loads from its manifest and runs through the node's pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.models import MANIFEST_FILE, MODEL_FILE, ModelRegistry, load_manifest
from inference.pipeline import run_model

MODELS_DIR = Path(__file__).resolve().parents[1] / "onnx_models"
SHIPPED = sorted(p.parent.name for p in MODELS_DIR.glob(f"*/{MANIFEST_FILE}")) if MODELS_DIR.is_dir() else []



def _head_phantom(size: int = 64) -> sitk.Image:
    """A 64^3 1 mm LPS volume: bright ellipsoid 'white matter' in a darker shell in noise, non-zero background."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:size, :size, :size].astype(np.float32) - size / 2
    r = np.sqrt((z / 26) ** 2 + (y / 29) ** 2 + (x / 24) ** 2)
    vol = np.where(r < 0.6, 160.0, np.where(r < 0.85, 95.0, np.where(r < 1.0, 40.0, 5.0)))
    vol = (vol + rng.normal(0, 4, vol.shape)).clip(0).astype(np.float32)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((1.0, 1.0, 1.0))
    return img


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(MODELS_DIR, providers="cpu", threads=1)


@pytest.mark.parametrize("model_id", SHIPPED)
def test_shipped_model_runs(registry: ModelRegistry, model_id: str) -> None:
    folder = MODELS_DIR / model_id
    manifest = load_manifest(folder / MANIFEST_FILE)
    assert manifest.id == model_id
    assert (folder / MODEL_FILE).stat().st_size < 50 * 2**20, "model file should stay small"
    assert (folder / "MODEL_CARD.md").is_file(), "every shipped model needs a model card"
    model = registry.session(model_id)
    image = _head_phantom()
    if manifest.task == "segmentation":
        from inference.labels import region_codes
        from inference.segmentation import segment

        seg = segment(model, image)
        labels = sitk.GetArrayFromImage(seg.labels)
        assert labels.shape == (64, 64, 64)
        assert set(np.unique(labels).tolist()) <= {0, *region_codes(np.array(manifest.output.segmentation.labels))}
        assert np.isfinite(seg.icv_ml) and seg.icv_ml >= 0
        assert (MODELS_DIR / model_id / "LICENSE").is_file(), "a converted model carries its licence"
        return
    result = run_model(model, image)
    if manifest.output.image is not None:
        assert result.t1 is not None
        t1 = sitk.GetArrayFromImage(result.t1)
        assert t1.shape == (64, 64, 64)
        assert np.isfinite(t1).all()
        assert t1.min() >= 0.0 and t1.max() <= manifest.output.image.scale * 1.0001
        assert t1.std() > 0, "synthetic T1 is constant"
    if manifest.output.segmentation is not None:
        assert result.labels is not None
        labels = sitk.GetArrayFromImage(result.labels)
        assert labels.shape == (64, 64, 64)
        assert set(np.unique(labels).tolist()) <= set(manifest.output.segmentation.labels)


def _metrics(model_id: str) -> dict:
    import json

    path = MODELS_DIR / model_id / "metrics.json"
    if not path.is_file():
        pytest.skip(f"{model_id} has no metrics.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("model_id", SHIPPED)
def test_card_and_manifest_carry_the_measured_metrics(model_id: str) -> None:
    manifest_text = (MODELS_DIR / model_id / MANIFEST_FILE).read_text()
    card = (MODELS_DIR / model_id / "MODEL_CARD.md").read_text()
    recorded = _metrics(model_id)
    summary = recorded["summary"]
    assert summary, f"{model_id} was exported but not evaluated"
    manifest = load_manifest(MODELS_DIR / model_id / MANIFEST_FILE)
    assert manifest.metrics["info"].get("train_step") == recorded["info"].get("train_step")
    assert manifest.metrics["info"].get("evaluated") == recorded["info"].get("evaluated")
    assert "PLACEHOLDER" not in card
    for key, row in summary.items():
        assert f"[metrics.{key}]" in manifest_text
        if key.startswith("held_out_") and row.get("dice_major") is not None:
            assert f"| held-out maps: {key[9:]} |" in card and f"{row['dice_major']:.3f}" in card


SYNTHESIS = [m for m in SHIPPED if load_manifest(MODELS_DIR / m / MANIFEST_FILE).task == "synthesis"]
SEGMENTERS = [m for m in SHIPPED if m not in SYNTHESIS]


@pytest.mark.parametrize("model_id", SYNTHESIS)
def test_evaluation_reproduces_the_card(registry: ModelRegistry, model_id: str) -> None:
    """One held-out map, one input kind, through the evaluation command's own code: the numbers in
    metrics.json (which the card and manifest are written from) come back within noise."""
    from tests.conftest import SHARED_DATA

    pytest.importorskip("torch")
    root = SHARED_DATA / "labels" / "synthseg"
    if not root.is_dir():
        pytest.skip(f"SynthSeg label maps not found at {root} (../shared/data)")
    from inference.training import evaluate

    recorded = _metrics(model_id)
    kinds = recorded["info"]["kinds"]
    kind = "aahead_scout" if "aahead_scout" in kinds else kinds[0]  # a per-kind model: its own kind
    first_map = recorded["info"]["held_out_maps"][0]
    expected = recorded["results"]["held_out"][first_map][kind]
    got = evaluate.evaluate_held_out(registry.session(model_id), root, [kind], recorded["info"]["seed"], 1)
    got = got[first_map][kind]
    assert got["psnr_db"] == pytest.approx(expected["psnr_db"], abs=0.3)
    assert got["ssim"] == pytest.approx(expected["ssim"], abs=0.01)
    assert got["dice_major"] == pytest.approx(expected["dice_major"], abs=0.01)
    for code, dice in expected["dice"].items():
        if dice is not None and got["dice"][code] is not None:
            assert got["dice"][code] == pytest.approx(dice, abs=0.03), f"label {code}"


def test_default_rules_use_the_bundled_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A fresh install: the embedded defaults point at onnx_models/, and every default rule's model is there.
    Never skipped: a bundle without the default models fails here (the per-model tests would have nothing to run)."""
    from dicom_node.cli import main
    from dicom_node.config import BUNDLED_MODELS_DIR, load_config

    config = load_config(None)
    assert config.inference.models_dir == MODELS_DIR == BUNDLED_MODELS_DIR
    wanted = {m for r in config.rules for m in config.models_for(r)}
    assert wanted and wanted <= set(SHIPPED)
    assert config.inference.segmenter in SEGMENTERS
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\n'
                    'host = "127.0.0.1"\nport = 104\n', encoding="utf-8")
    assert main(["config", "check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "DISABLED" not in out and out.rstrip().endswith("configuration is valid")


def test_without_bundled_models_the_default_rules_are_disabled(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Whenever a rule's model is missing the node starts, says so, and disables the rules rather than failing;
    ``config check`` exits 1 (not ready for service) unless told ``--allow-missing``."""
    from dicom_node.cli import main
    from dicom_node.config import load_config

    config = load_config(None)
    empty = tmp_path / "no-models"
    empty.mkdir()
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[inference]\nmodels_dir = "{empty}"\n',
                    encoding="utf-8")
    assert main(["config", "check", "--config", str(path)]) == 1
    capsys.readouterr()
    assert main(["config", "check", "--config", str(path), "--allow-missing"]) == 0
    out = capsys.readouterr().out
    for rule in config.rules:
        missing = config.models_for(rule)[0]
        assert f"rule {rule.name}: " in out and f"[DISABLED: model '{missing}' not installed]" in out
    assert "segmenter: brainchop-aparc-aseg [NOT INSTALLED: rules with volumetry disabled]" in out
    assert f"configuration is valid; {len(config.rules)} rule(s) disabled" in out


@pytest.mark.parametrize("model_id", SEGMENTERS)
def test_segmenter_evaluation_reproduces_the_card(registry: ModelRegistry, model_id: str) -> None:
    """The first label map through the segmenter evaluation's own code gives back the numbers of metrics.json."""
    from tests.conftest import SHARED_DATA

    pytest.importorskip("torch")
    root = SHARED_DATA / "labels" / "synthseg"
    if not root.is_dir():
        pytest.skip(f"SynthSeg label maps not found at {root} (../shared/data)")
    from inference.training import evaluate_segmenter

    recorded = _metrics(model_id)
    first = recorded["info"]["label_maps"][0]
    expected = recorded["results"]["label_maps"][first]
    got = evaluate_segmenter.evaluate_label_maps(registry.session(model_id), root, 1)[first]
    assert got["dice_major"] == pytest.approx(expected["dice_major"], abs=0.005)
    assert got["icv_ml"] == pytest.approx(expected["icv_ml"], rel=0.005)
    for code, dice in expected["dice"].items():
        if dice is not None:
            assert got["dice"][code] == pytest.approx(dice, abs=0.01), f"label {code}"


def test_own_labels_measure_an_sT1_only_where_the_real_t1_evaluation_says_so() -> None:
    """``measures_synthetic`` (a synthesis model's labels measure its sT1 instead of the segmenter) is a claim
    about measured agreement: every row of docs/real-t1-evaluation.json that scores the model's own head must show
    it above the segmenter on the model's sT1, and at least one row must exist."""
    import json

    results = json.loads((MODELS_DIR.parent / "docs" / "real-t1-evaluation.json").read_text())["results"]
    claimed = [m for m in SHIPPED if (seg := load_manifest(MODELS_DIR / m / MANIFEST_FILE).output.segmentation)
               is not None and seg.measures_synthetic]
    for model_id in claimed:
        rows = {key: entry for key, entry in results.items() if f"{model_id} (own head)" in entry and model_id in entry}
        assert rows, f"{model_id}: measures_synthetic without a real-T1 evaluation of its own head"
        for key, entry in rows.items():
            own, segmented = entry[f"{model_id} (own head)"]["dice_mean"], entry[model_id]["dice_mean"]
            assert own > segmented, f"{model_id}, {key}: own head {own:.3f} <= segmenter on the sT1 {segmented:.3f}"


@pytest.mark.parametrize("model_id", SYNTHESIS)
def test_unlabelled_classes_are_the_ones_never_produced(model_id: str) -> None:
    """A class QC excuses (``unlabelled``) is one the model was measured never to produce (Dice 0 on every held-out
    map and input kind), and every such class is excused: QC required the accumbens, which no shipped synthesis
    model labels, and so failed every sT1 measured by its model's own labels."""
    seg = load_manifest(MODELS_DIR / model_id / MANIFEST_FILE).output.segmentation
    assert seg is not None
    best: dict[int, float] = {}
    for kinds in _metrics(model_id)["results"]["held_out"].values():
        for result in kinds.values():
            for code, dice in result["dice"].items():
                best[int(code)] = max(best.get(int(code), 0.0), dice or 0.0)
    never = sorted(code for code, dice in best.items() if dice == 0.0)
    assert sorted(seg.unlabelled) == never


def test_an_sT1_measured_by_its_own_labels_has_every_structure_qc_requires(registry: ModelRegistry) -> None:
    """The real 4 mm 2D T1 (HFS) through the 2D T1 model, measured by its own labels as the node measures it
    (``measures_synthetic``): QC's structures_present passes."""
    from inference.volume import load_series
    from inference.volumetry import compute_volumetry, required_structures
    from tests.conftest import SHARED_DATA

    folder = SHARED_DATA / "dicom" / "human_siemens_prisma_t1_2d_4mm" / "HFS" / "00003_t1_fl2d_sag"
    if not folder.is_dir():
        pytest.skip(f"real 2D T1 not found at {folder} (../shared/data)")
    model = registry.session("synth-t1-t1-2d")
    seg = model.manifest.output.segmentation
    assert seg is not None and seg.measures_synthetic
    result = run_model(model, load_series(sorted(p for p in folder.iterdir() if p.is_file())).image)
    assert result.labels is not None and result.t1 is not None
    volumetry = compute_volumetry(result.labels, result.t1, age=None, sex=None,
                                  expected_codes=required_structures(seg))
    present = next(check for check in volumetry.qc if check.name == "structures_present")
    assert present.passed, present.reason
    # SynthSeg's 24 (all the CSF around the brain) is counted in the ICV, never reported as the segmenter's small
    # "CSF" structure: hundreds of ml under the same concept as the real T1's one
    assert seg.icv_only == [24]
    assert 24 in {int(c) for c in np.unique(sitk.GetArrayViewFromImage(result.labels))}
    measured = compute_volumetry(result.labels, result.t1, age=None, sex=None,
                                 expected_codes=required_structures(seg), icv_only=seg.icv_only)
    assert 24 in volumetry.structures and volumetry.structures[24].volume_ml > 50
    assert 24 not in measured.structures and measured.icv_ml == pytest.approx(volumetry.icv_ml)

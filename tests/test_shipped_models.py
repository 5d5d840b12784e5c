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

pytestmark = pytest.mark.skipif(not SHIPPED, reason=f"no models shipped in {MODELS_DIR}")


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

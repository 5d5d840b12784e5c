"""Which model the processing benchmarks run: the shipped one when installed, else a test fixture.

P3 runs `synth-t1`; P2 sends the scout through the built-in rules, so it runs `synth-t1-aahead-scout`, the same
network fine-tuned on scouts (the report describes `synth-t1`)."""

from __future__ import annotations

from pathlib import Path

from dicom_node.config import BUNDLED_MODELS_DIR
from inference.models import ModelRegistry

MODEL_ID = "synth-t1"


def _describe(models_dir: Path, what: str) -> str | None:
    manifest = ModelRegistry(models_dir).available().get(MODEL_ID)
    graph = models_dir / MODEL_ID / "model.onnx"
    if manifest is None or not graph.is_file():
        return None
    tile = "×".join(str(t) for t in manifest.tiling.tile)
    n_labels = len(manifest.output.segmentation.labels) if manifest.output.segmentation else 0
    return (f"{what} `{MODEL_ID}` {manifest.version} ({graph.stat().st_size / 1e6:.1f} MB graph, "
            f"{n_labels} segmentation channels, tiles up to {tile}, overlap {manifest.tiling.overlap})")


def choose_models_dir(scratch: Path, models_dir: Path | None = None) -> tuple[Path, str]:
    """(models_dir holding ``synth-t1``, a description of the model for the report)."""
    if models_dir is not None:
        described = _describe(models_dir, f"model from {models_dir}")
        if described is None:
            raise SystemExit(f"{models_dir} holds no valid {MODEL_ID} model (manifest.toml + model.onnx)")
        return models_dir, described
    described = _describe(BUNDLED_MODELS_DIR, "shipped model from onnx_models/")
    if described is not None:
        return BUNDLED_MODELS_DIR, described
    from inference.labels import STRUCTURES
    from tests.onnx_fixtures import make_synthesis_model

    # shaped like the shipped model's manifest: 33 segmentation channels (background + 32 structures),
    # tiles up to 192³ (the export's default), overlap 16
    labels = (0, *sorted(STRUCTURES))
    from dicom_node.config import default_rules

    # P2 routes by the built-in rules
    for model_id in sorted({MODEL_ID} | {r.model for r in default_rules() if r.model}):
        make_synthesis_model(scratch, model_id=model_id, labels=labels, tile=(192, 192, 192), overlap=16,
                             divisible_by=16)
    return scratch, (f"test fixture `{MODEL_ID}` from tests/onnx_fixtures.py (1×1×1 convolutions with "
                     f"{len(labels)} segmentation channels, tiles up to 192³, overlap 16): onnx_models/ holds no "
                     "installed model yet, so model.inference is a lower bound (the network is trivial) while "
                     "everything around it (tiling, blending, argmax, writers, sending) is real")

"""inference.models: manifest schema, registry scan, warm sessions, graph checks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from inference.models import (
    LoadedModel,
    ManifestError,
    ModelError,
    ModelRegistry,
    load_manifest,
)
from tests.onnx_fixtures import make_synthesis_model, seg_channel_for


def test_manifest_parses(tmp_path: Path) -> None:
    folder = make_synthesis_model(tmp_path, labels=[0, 2, 3, 41], tile=(32, 48, 64), overlap=8)
    manifest = load_manifest(folder / "manifest.toml")
    assert manifest.id == "test-synth"
    assert manifest.task == "synthesis"
    assert manifest.input.orientation == "LPS"
    assert manifest.tiling.tile == (32, 48, 64)
    assert manifest.output.image is not None and manifest.output.image.scale == 1000.0
    assert manifest.output.segmentation is not None and manifest.output.segmentation.labels == [0, 2, 3, 41]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"task": 'task = "denoise"'}, "task"),
        ({"orientation": 'orientation = "LPL"'}, "input.orientation"),
        ({"spacing_mm": "spacing_mm = 0"}, "input.spacing_mm"),
        ({"tile": "tile = [30, 32, 32]"}, "divisible_by"),
        ({"overlap": "overlap = 40"}, "tiling.overlap"),
        ({"labels": "labels = [0, 2, 2]"}, "output.segmentation.labels"),
        ({"licence": 'licnce = "MIT"'}, "licence"),
    ],
)
def test_manifest_errors_name_the_field(tmp_path: Path, overrides: dict[str, str], field: str) -> None:
    folder = make_synthesis_model(tmp_path, manifest_overrides=overrides)
    with pytest.raises(ManifestError, match=field.replace(".", r"\.")) as info:
        load_manifest(folder / "manifest.toml")
    assert str(folder / "manifest.toml") in str(info.value)


def test_synthesis_needs_image_head(tmp_path: Path) -> None:
    folder = make_synthesis_model(tmp_path)
    text = (folder / "manifest.toml").read_text()
    (folder / "manifest.toml").write_text(text.replace("[output.image]", "[output.unused]"))
    with pytest.raises(ManifestError, match="output"):
        load_manifest(folder / "manifest.toml")


def test_available_skips_invalid_models(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_synthesis_model(tmp_path, model_id="good")
    make_synthesis_model(tmp_path, model_id="bad", manifest_overrides={"version": 'version = ""'})
    renamed = make_synthesis_model(tmp_path, model_id="other")
    renamed.rename(tmp_path / "moved")
    (tmp_path / "no-onnx").mkdir()
    (tmp_path / "no-onnx" / "manifest.toml").write_text((tmp_path / "good" / "manifest.toml").read_text()
                                                        .replace('id = "good"', 'id = "no-onnx"'))
    with caplog.at_level(logging.WARNING, logger="inference.models"):
        found = ModelRegistry(tmp_path).available()
    assert list(found) == ["good"]
    assert "bad" in caplog.text and "version" in caplog.text
    assert "moved" in caplog.text and "no-onnx" in caplog.text


def test_session_is_warm_and_runs(tmp_path: Path) -> None:
    make_synthesis_model(tmp_path, labels=[0, 2, 41])
    registry = ModelRegistry(tmp_path, providers="cpu", threads=1)
    loaded = registry.session("test-synth")
    assert isinstance(loaded, LoadedModel)
    assert registry.session("test-synth") is loaded
    assert loaded.provider == "CPUExecutionProvider"
    assert loaded.input_shape == (None, None, None) and loaded.fixed_spatial_shape is None
    x = np.linspace(0, 1, 8 * 8 * 8, dtype=np.float32).reshape(1, 1, 8, 8, 8)
    t1, seg = loaded.session.run(["t1", "seg"], {"image": x})
    np.testing.assert_allclose(t1, x, atol=1e-6)
    np.testing.assert_array_equal(np.argmax(seg[0], axis=0), seg_channel_for(x[0, 0], 3))
    assert set(np.unique(np.argmax(seg[0], axis=0))) == {0, 1, 2}


def test_session_options() -> None:
    options = ModelRegistry(Path("."), threads=3).session_options()
    assert options.enable_cpu_mem_arena is False
    assert options.intra_op_num_threads == 3
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_providers() -> None:
    assert ModelRegistry(Path("."), providers="cpu").execution_providers() == ["CPUExecutionProvider"]
    auto = ModelRegistry(Path("."), providers="auto").execution_providers()
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert auto[0] == ("CUDAExecutionProvider" if cuda else "CPUExecutionProvider")
    if not cuda:
        with pytest.raises(ModelError, match="cuda"):
            ModelRegistry(Path("."), providers="cuda").execution_providers()


def test_cuda_means_a_gpu_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """onnxruntime-gpu offers CUDA on a host without a GPU and makes a CPU session: ``providers = "cuda"`` must not
    start on the CPU (nor a worker advertise itself to the GPU queue), ``auto`` takes the CPU with a warning."""
    make_synthesis_model(tmp_path)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ModelError, match="providers='cuda' but the session runs on CPUExecutionProvider"):
        ModelRegistry(tmp_path, providers="cuda").session("test-synth")
    with caplog.at_level(logging.WARNING, logger="inference.models"):
        loaded = ModelRegistry(tmp_path, providers="auto").session("test-synth")
    assert loaded.provider == "CPUExecutionProvider"
    assert "requested CUDAExecutionProvider, session runs on CPUExecutionProvider" in caplog.text


def test_warm_up_loads_all(tmp_path: Path) -> None:
    make_synthesis_model(tmp_path, model_id="a")
    make_synthesis_model(tmp_path, model_id="b", task="segmentation")
    registry = ModelRegistry(tmp_path)
    assert sorted(registry.warm_up()) == ["a", "b"]
    assert registry.session("b").manifest.output.image is None


def test_unknown_model_is_key_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="nope"):
        ModelRegistry(tmp_path).session("nope")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_name": "input"}, "input.name 'image'"),
        ({"image_name": "synth"}, "output.image.name 't1'"),
        ({"seg_name": "logits"}, "output.segmentation.name 'seg'"),
    ],
)
def test_graph_names_are_checked(tmp_path: Path, kwargs: dict[str, str], message: str) -> None:
    folder = make_synthesis_model(tmp_path, **kwargs)
    manifest = folder / "manifest.toml"
    text = manifest.read_text()
    for value in kwargs.values():
        text = text.replace(f'name = "{value}"', "name = " + {"input": '"image"', "synth": '"t1"',
                                                             "logits": '"seg"'}[value])
    manifest.write_text(text)
    with pytest.raises(ModelError, match=message):
        ModelRegistry(tmp_path).session("test-synth")


def test_label_count_must_match_channels(tmp_path: Path) -> None:
    folder = make_synthesis_model(tmp_path, labels=[0, 2, 41])
    manifest = folder / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("labels = [0, 2, 41]", "labels = [0, 2, 41, 3]"))
    with pytest.raises(ModelError, match="4 codes but the graph output has 3 channels"):
        ModelRegistry(tmp_path).session("test-synth")

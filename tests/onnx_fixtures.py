"""Tiny deterministic ONNX models for tests (built with the ``onnx`` helper API; never shipped).

``make_synthesis_model`` writes ``<parent>/<model_id>/model.onnx`` and ``manifest.toml``:

* ``t1`` output = input (a 1x1x1 Conv with weight 1, bias 0), so the synthetic T1 equals the normalized input;
* ``seg`` output = C logit channels, ``logit_c = c * x - step * c * (c + 1) / 2`` (1x1x1 Conv), so the argmax is
  channel ``c`` where ``c * step <= x < (c + 1) * step`` on the normalized input ``x``: the label depends on the
  intensity only (a 1x1x1 graph cannot see left/right; build L/R tests from intensities instead). By default
  ``step = 1 / C`` so normalized intensities 0..1 cover all labels.

Spatial input dims are symbolic (any tile size runs) unless ``fixed_shape`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9


def seg_channel_for(x: np.ndarray | float, n_channels: int, step: float | None = None) -> np.ndarray:
    """The channel the fixture's ``seg`` argmax picks for normalized intensity ``x`` (reference for tests)."""
    step = 1.0 / n_channels if step is None else step
    return np.clip(np.floor(np.asarray(x, dtype=np.float64) / step), 0, n_channels - 1).astype(int)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _build_graph(n_channels: int, step: float, *, with_image: bool, with_seg: bool,
                 input_name: str, image_name: str, seg_name: str,
                 fixed_shape: Sequence[int] | None = None) -> onnx.ModelProto:
    spatial: list[str | int] = list(fixed_shape) if fixed_shape is not None else ["D", "H", "W"]
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 1, *spatial])
    nodes, outputs, initializers = [], [], []
    if with_image:
        initializers += [
            numpy_helper.from_array(np.ones((1, 1, 1, 1, 1), np.float32), "t1_w"),
            numpy_helper.from_array(np.zeros((1,), np.float32), "t1_b"),
        ]
        nodes.append(helper.make_node("Conv", [input_name, "t1_w", "t1_b"], [image_name], kernel_shape=[1, 1, 1]))
        outputs.append(helper.make_tensor_value_info(image_name, TensorProto.FLOAT, [1, 1, *spatial]))
    if with_seg:
        c = np.arange(n_channels, dtype=np.float32)
        initializers += [
            numpy_helper.from_array(c.reshape(n_channels, 1, 1, 1, 1), "seg_w"),
            numpy_helper.from_array((-step * c * (c + 1) / 2).astype(np.float32), "seg_b"),
        ]
        nodes.append(helper.make_node("Conv", [input_name, "seg_w", "seg_b"], [seg_name], kernel_shape=[1, 1, 1]))
        outputs.append(helper.make_tensor_value_info(seg_name, TensorProto.FLOAT, [1, n_channels, *spatial]))
    graph = helper.make_graph(nodes, "test_synthesis", [x], outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dicom-node-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def make_synthesis_model(
    parent: Path,
    *,
    model_id: str = "test-synth",
    labels: Sequence[int] = (0, 2, 41),
    scale: float = 1000.0,
    tile: Sequence[int] = (32, 32, 32),
    overlap: int = 8,
    divisible_by: int = 8,
    orientation: str = "LPS",
    spacing_mm: float = 1.0,
    normalization: str = "percentile",
    p_low: float = 0.5,
    p_high: float = 99.5,
    clip_max: float = 1.5,
    step: float | None = None,
    task: str = "synthesis",
    with_seg: bool = True,
    input_kinds: Sequence[str] = ("aahead_scout",),
    version: str = "0.0.1",
    input_name: str = "image",
    image_name: str = "t1",
    seg_name: str = "seg",
    manifest_overrides: dict[str, str] | None = None,
    fixed_shape: Sequence[int] | None = None,
    foreground_margin: int | None = None,
    lateralize: bool = False,
    measures_synthetic: bool = False,
) -> Path:
    """Write a test model folder ``parent/model_id`` (model.onnx + manifest.toml) and return the folder.

    ``task="segmentation"`` drops the t1 head. ``fixed_shape`` fixes the graph's spatial dims (D, H, W), like
    models exported for one input size. ``manifest_overrides`` maps a key (every line with that key)
    (e.g. ``"version"``) to a replacement TOML line, to build invalid manifests on purpose.
    """
    with_image = task == "synthesis"
    n_channels = len(labels)
    step = 1.0 / n_channels if step is None else step
    folder = Path(parent) / model_id
    folder.mkdir(parents=True, exist_ok=True)
    model = _build_graph(n_channels, step, with_image=with_image, with_seg=with_seg,
                         input_name=input_name, image_name=image_name, seg_name=seg_name,
                         fixed_shape=fixed_shape)
    onnx.save(model, str(folder / "model.onnx"))

    lines = [
        f"id = {_toml_value(model_id)}",
        f"version = {_toml_value(version)}",
        f"task = {_toml_value(task)}",
        f"input_kinds = {_toml_value(list(input_kinds))}",
        'licence = "Apache-2.0"',
        'description = "test fixture: identity t1, intensity-threshold seg"',
        "",
        "[input]",
        f"name = {_toml_value(input_name)}",
        f"orientation = {_toml_value(orientation)}",
        f"spacing_mm = {float(spacing_mm)!r}",
        f"normalization = {_toml_value(normalization)}",
        f"p_low = {float(p_low)!r}",
        f"p_high = {float(p_high)!r}",
        f"clip_max = {float(clip_max)!r}",
        f"divisible_by = {int(divisible_by)}",
        *([f"foreground_margin = {int(foreground_margin)}"] if foreground_margin is not None else []),
        "",
        "[tiling]",
        f"tile = {_toml_value([int(t) for t in tile])}",
        f"overlap = {int(overlap)}",
    ]
    if with_image:
        lines += ["", "[output.image]", f"name = {_toml_value(image_name)}", f"scale = {float(scale)!r}"]
    if with_seg:
        lines += ["", "[output.segmentation]", f"name = {_toml_value(seg_name)}",
                  f"labels = {_toml_value([int(v) for v in labels])}", f"lateralize = {_toml_value(lateralize)}",
                  f"measures_synthetic = {_toml_value(measures_synthetic)}"]
    lines += ["", "[metrics]", ""]
    for prefix, replacement in (manifest_overrides or {}).items():
        lines = [replacement if line.split("=")[0].strip() == prefix else line for line in lines]
    (folder / "manifest.toml").write_text("\n".join(lines), encoding="utf-8")
    return folder


BUNDLED_MODELS = Path(__file__).resolve().parents[1] / "onnx_models"


def link_bundled_segmenter(folder: Path) -> str:
    """Link the bundled segmenter (the converted brainchop MeshNet, a real model) into a fixture models folder;
    returns its id. Fixture synthesis models are tiny graphs; the segmenter is what measures their output."""
    from dicom_node.config import DEFAULT_SEGMENTER

    target = folder / DEFAULT_SEGMENTER
    if not target.exists():
        target.symlink_to(BUNDLED_MODELS / DEFAULT_SEGMENTER, target_is_directory=True)
    return DEFAULT_SEGMENTER

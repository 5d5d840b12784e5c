"""TF.js layers → ONNX converter: the ONNX graph equals an independent implementation of the layer stack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from inference.training.tfjs_convert import ConvLayer, TfjsModel, UnsupportedLayer, load_tfjs_model, to_onnx
from tests.conftest import SHARED_DATA, requires_shared_data

MESHNETS = SHARED_DATA / "models" / "brainchop_meshnet"


def _reference(model: TfjsModel, x_channels_last: np.ndarray) -> np.ndarray:
    """Keras semantics written directly in torch: channels last in, 'same' padding as TensorFlow pads it
    (the odd voxel after), activations by name. Returns channels first [N, C, D, H, W]."""
    t = torch.from_numpy(x_channels_last).permute(0, 4, 1, 2, 3).double()
    act = {"relu": F.relu, "elu": F.elu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
           "softmax": lambda v: torch.softmax(v, dim=1), "linear": lambda v: v}
    for layer in model.layers:
        if isinstance(layer, str):
            t = act[layer](t)
            continue
        weight = torch.from_numpy(layer.kernel).double().permute(4, 3, 0, 1, 2)
        pads: list[int] = []
        if layer.padding == "same":
            for k, d in reversed(list(zip(layer.kernel.shape[:3], layer.dilation, strict=True))):
                total = (k - 1) * d
                pads += [total // 2, total - total // 2]
            t = F.pad(t, pads)
        bias = None if layer.bias is None else torch.from_numpy(layer.bias).double()
        t = F.conv3d(t, weight, bias, dilation=layer.dilation)
        if layer.instance_norm:  # brainchop's GroupNorm(C, C): per channel over space, biased variance
            mean = t.mean(dim=(2, 3, 4), keepdim=True)
            var = t.var(dim=(2, 3, 4), keepdim=True, unbiased=False)
            t = (t - mean) / torch.sqrt(var + 1e-5)
        t = act[layer.activation](t)
    return t.numpy()


def _run_onnx(model: TfjsModel, x_channels_last: np.ndarray) -> np.ndarray:
    proto = to_onnx(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": np.ascontiguousarray(x_channels_last.transpose(0, 4, 1, 2, 3))})[0]


def _write_tfjs(folder: Path, layers: list[dict], weights: list[tuple[str, np.ndarray]], shards: int = 2) -> None:
    """A TF.js layers model on disk: topology JSON and the weights split over ``shards`` files."""
    blob = b"".join(w.astype("<f4").tobytes() for _, w in weights)
    cut = len(blob) // shards
    paths = []
    for i in range(shards):
        part = blob[i * cut:(i + 1) * cut if i < shards - 1 else len(blob)]
        (folder / f"group1-shard{i + 1}of{shards}.bin").write_bytes(part)
        paths.append(f"group1-shard{i + 1}of{shards}.bin")
    topology = {"class_name": "Functional", "config": {"layers": [
        {"class_name": "InputLayer", "name": "input", "config": {"batch_input_shape": [None, 8, 8, 8, 1],
                                                                 "name": "input"}},
        *layers]}}
    document = {"format": "layers-model", "modelTopology": {"model_config": topology},
                "weightsManifest": [{"paths": paths, "weights": [
                    {"name": n, "shape": list(w.shape), "dtype": "float32"} for n, w in weights]}]}
    (folder / "model.json").write_text(json.dumps(document))


def _conv(name: str, filters: int, kernel: int, dilation: int, activation: str = "linear",
          use_bias: bool = True, padding: str = "same") -> dict:
    return {"class_name": "Conv3D", "name": name, "config": {
        "name": name, "filters": filters, "kernel_size": [kernel] * 3, "dilation_rate": [dilation] * 3,
        "padding": padding, "activation": activation, "data_format": "channels_last", "strides": [1, 1, 1],
        "use_bias": use_bias}}


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    """Every supported construct: dilations, even kernels ('same' pads the odd voxel after), no bias,
    fused and separate activations, a 'valid' layer, weights across shards."""
    rng = np.random.default_rng(3)
    layers = [
        _conv("c0", 4, 3, 1),
        {"class_name": "Activation", "name": "a0", "config": {"name": "a0", "activation": "relu"}},
        _conv("c1", 5, 3, 2, activation="elu"),
        _conv("c2_gn", 3, 2, 3, use_bias=False),
        {"class_name": "Activation", "name": "a2", "config": {"name": "a2", "activation": "gelu"}},
        _conv("c3", 4, 3, 1, padding="valid", activation="tanh"),
        _conv("out", 6, 1, 1),
    ]
    shapes = {"c0": (3, 3, 3, 1, 4), "c1": (3, 3, 3, 4, 5), "c2_gn": (2, 2, 2, 5, 3), "c3": (3, 3, 3, 3, 4),
              "out": (1, 1, 1, 4, 6)}
    weights = []
    for name, shape in shapes.items():
        weights.append((f"{name}/kernel", rng.normal(0, 0.5, shape)))
        if name != "c2_gn":
            weights.append((f"{name}/bias", rng.normal(0, 0.2, shape[-1])))
    _write_tfjs(tmp_path, layers, weights, shards=3)
    return tmp_path


def test_small_model_equals_reference(small_model: Path) -> None:
    model = load_tfjs_model(small_model)
    assert model.in_channels == 1 and model.out_channels == 6
    assert [getattr(layer, "instance_norm", None) for layer in model.layers] == [
        False, None, False, True, None, False, False]
    assert [type(layer).__name__ for layer in model.layers] == ["ConvLayer", "str", "ConvLayer", "ConvLayer",
                                                                  "str", "ConvLayer", "ConvLayer"]
    x = np.random.default_rng(0).normal(size=(2, 11, 9, 10, 1)).astype(np.float32)
    expected = _reference(model, x)
    got = _run_onnx(model, x)
    assert got.shape == expected.shape == (2, 6, 9, 7, 8)  # the 'valid' layer takes 2 voxels per axis
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_kernel_layout_is_not_symmetric(small_model: Path) -> None:
    """The reference would not notice a kernel transposed the wrong way on symmetric weights: check that
    a wrong spatial order gives a different answer, so the equality above means something."""
    model = load_tfjs_model(small_model)
    broken = TfjsModel(model.name, model.in_channels, [
        ConvLayer(layer.name, np.ascontiguousarray(layer.kernel.transpose(2, 1, 0, 3, 4)), layer.bias,
                  layer.dilation, layer.padding, layer.activation) if isinstance(layer, ConvLayer) else layer
        for layer in model.layers])
    x = np.random.default_rng(1).normal(size=(1, 10, 10, 10, 1)).astype(np.float32)
    assert not np.allclose(_run_onnx(broken, x), _reference(model, x), atol=1e-3)


def test_unsupported_layers_are_refused(tmp_path: Path) -> None:
    pool = {"class_name": "MaxPooling3D", "name": "p", "config": {"name": "p"}}
    _write_tfjs(tmp_path, [pool], [], shards=1)
    with pytest.raises(UnsupportedLayer, match="MaxPooling3D"):
        load_tfjs_model(tmp_path)


def test_short_shards_are_refused(small_model: Path) -> None:
    shard = small_model / "group1-shard3of3.bin"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(UnsupportedLayer, match="shards hold"):
        load_tfjs_model(small_model)


@requires_shared_data
@pytest.mark.parametrize("name", ["model21_104class", "mindgrab"])
def test_brainchop_meshnet_equals_reference(name: str) -> None:
    """The real MeshNets (ReLU and GELU stacks) on random input: ONNX == the independent torch stack."""
    folder = MESHNETS / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    model = load_tfjs_model(folder)
    x = np.random.default_rng(0).random((1, 36, 40, 34, 1), dtype=np.float32) * 0.2
    expected = _reference(model, x)
    got = _run_onnx(model, x)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * scale)


def _serving(model: TfjsModel, x: np.ndarray, mirror: list[int] | None, chunks: int = 3) -> np.ndarray:
    proto = to_onnx(model, class_index=True, mirror=mirror, chunks=chunks)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))})[0]
    assert out.dtype == np.uint8 and out.shape[1] == 1
    return out[:, 0]


def test_serving_graph_is_argmax_of_the_mirror_average(small_model: Path) -> None:
    """class_index + mirror: argmax over classes of logits(x) + swap(flip(logits(flip(x)))), in slabs."""
    model = load_tfjs_model(small_model)
    mirror = [1, 0, 3, 2, 4, 5]  # classes 0/1 and 2/3 are left/right pairs
    x = np.random.default_rng(5).normal(size=(1, 12, 9, 11, 1)).astype(np.float32)
    direct = _reference(model, x)
    flipped = _reference(model, np.ascontiguousarray(x[:, ::-1]))[:, :, ::-1]
    expected = np.argmax(direct + flipped[:, mirror], axis=1)
    np.testing.assert_array_equal(_serving(model, x, mirror), expected)
    np.testing.assert_array_equal(_serving(model, x, None, chunks=1), np.argmax(direct, axis=1))


def test_serving_graph_has_no_side_bias(small_model: Path) -> None:
    """The labels of the mirrored input are the mirrored labels with left and right swapped, voxel for voxel."""
    model = load_tfjs_model(small_model)
    mirror = [1, 0, 3, 2, 4, 5]
    x = np.random.default_rng(6).normal(size=(1, 14, 8, 10, 1)).astype(np.float32)
    labels = _serving(model, x, mirror)
    labels_of_mirror = _serving(model, np.ascontiguousarray(x[:, ::-1]), mirror)
    np.testing.assert_array_equal(labels_of_mirror, np.asarray(mirror)[labels][:, ::-1])
    plain = _serving(model, x, None)
    plain_of_mirror = _serving(model, np.ascontiguousarray(x[:, ::-1]), None)
    assert not np.array_equal(plain_of_mirror, np.asarray(mirror)[plain][:, ::-1])  # the network alone is biased


def test_brainchop_class_names_map_to_freesurfer_codes_and_mirror() -> None:
    from inference.training.import_meshnet import class_codes, mirror_permutation

    names = ["BG", "ctx-lh-bankssts", "ctx-rh-bankssts", "Left-Thalamus-Proper*", "Right-Thalamus-Proper*",
             "Brain-Stem", "CC_Central", "Left-Hippocampus", "Right-Hippocampus"]
    assert class_codes(names) == [0, 1001, 2001, 10, 49, 16, 253, 17, 53]
    assert mirror_permutation(names) == [0, 2, 1, 4, 3, 5, 6, 8, 7]
    with pytest.raises(ValueError, match="no counterpart"):
        mirror_permutation(["BG", "Left-Hippocampus"])
    with pytest.raises(ValueError, match="no FreeSurfer"):
        class_codes(["BG", "Left-Nowhere"])

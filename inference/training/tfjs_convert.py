"""TensorFlow.js layers models (Keras topology JSON + float32 weight shards) → ONNX.

Covers the layer stack of the brainchop MeshNets: an ``InputLayer`` of shape [N, D, H, W, 1] (channels last),
``Conv3D`` layers (any kernel, dilation and stride 1, ``same`` or ``valid`` padding, with or without bias,
optionally with a fused activation) and ``Activation`` layers (relu, elu, gelu, sigmoid, tanh, softmax over
channels, linear). Anything else is refused with the layer's name, so a model that does not fit is never
converted silently into a different network.

The ONNX graph is channels first: input ``[N, 1, D, H, W]``, output ``[N, C, D, H, W]``; the spatial axes keep
the Keras order (axis 1 of the Keras tensor is D of the ONNX tensor). Keras kernels ``[kd, kh, kw, in, out]``
become ONNX weights ``[out, in, kd, kh, kw]``.

Only ``numpy`` and ``onnx`` are needed (the ``train`` extra); the runtime only loads the result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ConvLayer",
    "TfjsModel",
    "UnsupportedLayer",
    "load_tfjs_model",
    "to_onnx",
]

ACTIVATIONS = ("linear", "relu", "elu", "gelu", "sigmoid", "tanh", "softmax")


class UnsupportedLayer(ValueError):
    """A layer or weight encoding the converter does not implement (the message names it)."""


@dataclass(frozen=True)
class ConvLayer:
    name: str
    kernel: np.ndarray                 # Keras layout [kd, kh, kw, in, out], float32
    bias: np.ndarray | None            # [out]
    dilation: tuple[int, int, int]
    padding: str                       # "same" | "valid"
    activation: str = "linear"         # fused activation of the Conv3D layer itself

    @property
    def out_channels(self) -> int:
        return int(self.kernel.shape[-1])


@dataclass
class TfjsModel:
    """The layers of a TF.js layers model in execution order: ConvLayer or an activation name (str)."""

    name: str
    in_channels: int
    layers: list[ConvLayer | str] = field(default_factory=list)

    @property
    def out_channels(self) -> int:
        convs = [layer for layer in self.layers if isinstance(layer, ConvLayer)]
        return convs[-1].out_channels if convs else self.in_channels

    @property
    def parameters(self) -> int:
        return sum(layer.kernel.size + (layer.bias.size if layer.bias is not None else 0)
                   for layer in self.layers if isinstance(layer, ConvLayer))


def _read_weights(folder: Path, manifest: Sequence[dict]) -> dict[str, np.ndarray]:
    """Weights by name from the manifest's groups: each group's shards concatenated, weights in listed order."""
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        blob = b"".join((folder / p).read_bytes() for p in group["paths"])
        offset = 0
        for entry in group["weights"]:
            if entry.get("dtype", "float32") != "float32" or "quantization" in entry:
                raise UnsupportedLayer(f"weight {entry['name']!r}: only unquantised float32 weights are supported")
            count = math.prod(entry["shape"])
            end = offset + 4 * count
            if end > len(blob):
                raise UnsupportedLayer(f"weight {entry['name']!r}: shards hold {len(blob)} bytes, need {end}")
            weights[entry["name"]] = np.frombuffer(blob, dtype="<f4", count=count, offset=offset).reshape(
                entry["shape"]).astype(np.float32)
            offset = end
        if offset != len(blob):
            raise UnsupportedLayer(f"weight group {group['paths']}: {len(blob) - offset} bytes left unread")
    return weights


def _topology_layers(topology: dict) -> list[dict]:
    config = topology.get("model_config", topology)
    inner = config["config"]
    return inner["layers"] if isinstance(inner, dict) else inner


def _check_chain(layers: Sequence[dict]) -> None:
    """The converter handles a plain chain: every layer takes the previous one's output."""
    previous = None
    for layer in layers:
        inbound = layer.get("inbound_nodes") or []
        if previous is not None and inbound:
            sources = [node[0] for node in inbound[0]] if isinstance(inbound[0], list) else []
            if sources and sources != [previous]:
                raise UnsupportedLayer(f"layer {layer['config'].get('name')!r} is not fed by the previous layer "
                                       f"{previous!r}: only sequential stacks are supported")
        previous = layer.get("name", layer["config"].get("name"))


def load_tfjs_model(folder: Path, topology_file: str = "model.json") -> TfjsModel:
    """Parse ``folder/model.json`` and its weight shards."""
    folder = Path(folder)
    document = json.loads((folder / topology_file).read_text())
    if document.get("format") not in (None, "layers-model"):
        raise UnsupportedLayer(f"{folder / topology_file}: format {document.get('format')!r} is not a layers model")
    weights = _read_weights(folder, document["weightsManifest"])
    layers = _topology_layers(document["modelTopology"])
    _check_chain(layers)
    model: TfjsModel | None = None
    used: set[str] = set()
    for layer in layers:
        kind, config = layer["class_name"], layer["config"]
        name = config.get("name", kind)
        if kind == "InputLayer":
            shape = config.get("batch_input_shape") or config.get("batch_shape")
            if not shape or len(shape) != 5:
                raise UnsupportedLayer(f"input {name!r}: expected a 5-D channels-last input, got {shape}")
            model = TfjsModel(name=folder.name, in_channels=int(shape[-1]))
        elif model is None:
            raise UnsupportedLayer(f"layer {name!r} comes before the InputLayer")
        elif kind == "Conv3D":
            model.layers.append(_conv(name, config, weights, used))
        elif kind == "Activation":
            model.layers.append(_activation(name, config["activation"]))
        else:
            raise UnsupportedLayer(f"layer {name!r}: {kind} is not supported")
    if model is None:
        raise UnsupportedLayer(f"{folder / topology_file}: no InputLayer")
    unused = set(weights) - used
    if unused:
        raise UnsupportedLayer(f"weights not used by any layer: {sorted(unused)}")
    return model


def _activation(name: str, activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise UnsupportedLayer(f"layer {name!r}: activation {activation!r} is not supported")
    return activation


def _conv(name: str, config: dict, weights: dict[str, np.ndarray], used: set[str]) -> ConvLayer:
    if config.get("data_format", "channels_last") != "channels_last":
        raise UnsupportedLayer(f"layer {name!r}: data_format {config.get('data_format')!r}")
    if tuple(config.get("strides", (1, 1, 1))) != (1, 1, 1):
        raise UnsupportedLayer(f"layer {name!r}: strides {config.get('strides')} (only 1 is supported)")
    if config.get("groups", 1) != 1:
        raise UnsupportedLayer(f"layer {name!r}: grouped convolution")
    padding = config.get("padding", "valid")
    if padding not in ("same", "valid"):
        raise UnsupportedLayer(f"layer {name!r}: padding {padding!r}")
    kernel_name = f"{name}/kernel"
    if kernel_name not in weights:
        raise UnsupportedLayer(f"layer {name!r}: no weight {kernel_name!r}")
    kernel = weights[kernel_name]
    if kernel.ndim != 5 or list(kernel.shape[:3]) != list(config["kernel_size"]) or \
            kernel.shape[4] != config["filters"]:
        raise UnsupportedLayer(f"layer {name!r}: kernel shape {kernel.shape} does not match its config")
    used.add(kernel_name)
    bias = None
    if config.get("use_bias", True):
        bias = weights.get(f"{name}/bias")
        if bias is None or bias.shape != (kernel.shape[4],):
            raise UnsupportedLayer(f"layer {name!r}: bias missing or of the wrong shape")
        used.add(f"{name}/bias")
    dilation = tuple(int(d) for d in config.get("dilation_rate", (1, 1, 1)))
    return ConvLayer(name=name, kernel=kernel, bias=bias, dilation=dilation, padding=padding,  # type: ignore[arg-type]
                     activation=_activation(name, config.get("activation", "linear")))


def _same_pads(kernel: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """Keras 'same' (stride 1): total padding (k - 1) x d per axis, the odd voxel after (TensorFlow's rule)."""
    total = [(k - 1) * d for k, d in zip(kernel, dilation, strict=True)]
    before = [t // 2 for t in total]
    return before + [t - b for t, b in zip(total, before, strict=True)]


def to_onnx(model: TfjsModel, *, input_name: str = "image", output_name: str = "seg", opset: int = 17,
            doc: str = ""):
    """The ONNX graph (an ``onnx.ModelProto``) of a loaded TF.js model, channels first, dynamic batch and size."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers = [], []
    current = input_name
    counter = 0

    def fresh(prefix: str) -> str:
        nonlocal counter
        counter += 1
        return f"{prefix}_{counter}"

    def activation(kind: str, source: str) -> str:
        if kind == "linear":
            return source
        out = fresh(kind)
        if kind == "relu":
            nodes.append(helper.make_node("Relu", [source], [out]))
        elif kind == "elu":
            nodes.append(helper.make_node("Elu", [source], [out], alpha=1.0))
        elif kind == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", [source], [out]))
        elif kind == "tanh":
            nodes.append(helper.make_node("Tanh", [source], [out]))
        elif kind == "softmax":
            nodes.append(helper.make_node("Softmax", [source], [out], axis=1))
        elif kind == "gelu":  # exact GELU, 0.5 x (1 + erf(x / sqrt 2)), as TF.js's 'gelu'
            names = [fresh("gelu") for _ in range(4)]
            consts = {"half": 0.5, "one": 1.0, "rsqrt2": 1.0 / math.sqrt(2.0)}
            for key, value in consts.items():
                const_name = f"gelu_const_{key}"
                if not any(i.name == const_name for i in initializers):
                    initializers.append(numpy_helper.from_array(np.array(value, dtype=np.float32), const_name))
            nodes.extend([
                helper.make_node("Mul", [source, "gelu_const_rsqrt2"], [names[0]]),
                helper.make_node("Erf", [names[0]], [names[1]]),
                helper.make_node("Add", [names[1], "gelu_const_one"], [names[2]]),
                helper.make_node("Mul", [source, "gelu_const_half"], [names[3]]),
                helper.make_node("Mul", [names[3], names[2]], [out]),
            ])
        else:  # pragma: no cover - load_tfjs_model refuses other names
            raise UnsupportedLayer(kind)
        return out

    for layer in model.layers:
        if isinstance(layer, str):
            current = activation(layer, current)
            continue
        weight = np.ascontiguousarray(layer.kernel.transpose(4, 3, 0, 1, 2))
        w_name = f"{layer.name}.weight"
        initializers.append(numpy_helper.from_array(weight, w_name))
        inputs = [current, w_name]
        if layer.bias is not None:
            initializers.append(numpy_helper.from_array(layer.bias.astype(np.float32), f"{layer.name}.bias"))
            inputs.append(f"{layer.name}.bias")
        kernel = list(layer.kernel.shape[:3])
        pads = _same_pads(kernel, layer.dilation) if layer.padding == "same" else [0] * 6
        out = fresh("conv")
        nodes.append(helper.make_node("Conv", inputs, [out], name=layer.name, kernel_shape=kernel,
                                      dilations=list(layer.dilation), pads=pads, strides=[1, 1, 1]))
        current = activation(layer.activation, out)
    nodes.append(helper.make_node("Identity", [current], [output_name]))
    graph = helper.make_graph(
        nodes, f"{model.name}",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", model.in_channels, "D", "H", "W"])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", model.out_channels, "D", "H", "W"])],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="dicom-node inference.training.tfjs_convert", doc_string=doc)
    proto.ir_version = min(proto.ir_version, 8)
    onnx.checker.check_model(proto)
    return proto

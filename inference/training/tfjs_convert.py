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
    instance_norm: bool = False        # per-channel normalisation after the convolution (no affine, eps 1e-5)

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


#: brainchop's convention: a Conv3D whose name ends with this is followed by a group norm with one group per channel
#: (PyTorch ``GroupNorm(C, C, affine=False)``), applied by brainchop's code, not written in the topology.
BRAINCHOP_NORM_SUFFIX = "_gn"


def load_tfjs_model(folder: Path, topology_file: str = "model.json", *,
                    instance_norm_suffix: str | None = BRAINCHOP_NORM_SUFFIX) -> TfjsModel:
    """Parse ``folder/model.json`` and its weight shards.

    ``instance_norm_suffix``: Conv3D layers whose name ends with it get an instance normalisation (no affine,
    eps 1e-5) after the convolution; None: never."""
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
            norm = bool(instance_norm_suffix) and name.endswith(instance_norm_suffix)  # type: ignore[arg-type]
            model.layers.append(_conv(name, config, weights, used, norm))
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


def _conv(name: str, config: dict, weights: dict[str, np.ndarray], used: set[str], norm: bool) -> ConvLayer:
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
                     activation=_activation(name, config.get("activation", "linear")), instance_norm=norm)


def _same_pads(kernel: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """Keras 'same' (stride 1): total padding (k - 1) x d per axis, the odd voxel after (TensorFlow's rule)."""
    total = [(k - 1) * d for k, d in zip(kernel, dilation, strict=True)]
    before = [t // 2 for t in total]
    return before + [t - b for t, b in zip(total, before, strict=True)]


class _Graph:
    """Nodes and initializers of an ONNX graph under construction, with fresh tensor names."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self._names: set[str] = set()
        self._counter = 0

    def fresh(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._counter}"

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self._names:
            self._names.add(name)
            self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str | None = None, **attributes) -> str:
        out = self.fresh(prefix or op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], **attributes))
        return out

    def activation(self, kind: str, source: str) -> str:
        simple = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}
        if kind == "linear":
            return source
        if kind in simple:
            return self.node(simple[kind], [source])
        if kind == "elu":
            return self.node("Elu", [source], alpha=1.0)
        if kind == "softmax":
            return self.node("Softmax", [source], axis=1)
        if kind == "gelu":  # exact GELU, 0.5 x (1 + erf(x / sqrt 2)), as TF.js's 'gelu'
            scaled = self.node("Mul", [source, self.const("gelu_rsqrt2", np.float32(1.0 / math.sqrt(2.0)))])
            erf1 = self.node("Add", [self.node("Erf", [scaled]), self.const("gelu_one", np.float32(1.0))])
            half = self.node("Mul", [source, self.const("gelu_half", np.float32(0.5))])
            return self.node("Mul", [half, erf1])
        raise UnsupportedLayer(kind)  # pragma: no cover - load_tfjs_model refuses other names

    def conv(self, layer: ConvLayer, source: str, weight: np.ndarray | None = None,
             bias: np.ndarray | None = None, tag: str = "") -> str:
        """One Conv3D layer (convolution, optional instance norm, fused activation) on ``source``."""
        weight = layer.kernel.transpose(4, 3, 0, 1, 2) if weight is None else weight
        bias = layer.bias if bias is None else bias
        inputs = [source, self.const(f"{layer.name}{tag}.weight", np.ascontiguousarray(weight, dtype=np.float32))]
        if bias is not None:
            inputs.append(self.const(f"{layer.name}{tag}.bias", bias.astype(np.float32)))
        kernel = list(layer.kernel.shape[:3])
        pads = _same_pads(kernel, layer.dilation) if layer.padding == "same" else [0] * 6
        out = self.node("Conv", inputs, "conv", kernel_shape=kernel, dilations=list(layer.dilation), pads=pads,
                        strides=[1, 1, 1])
        if layer.instance_norm:
            channels = layer.out_channels
            out = self.node("InstanceNormalization", [
                out, self.const(f"{layer.name}.norm_scale", np.ones(channels, np.float32)),
                self.const(f"{layer.name}.norm_bias", np.zeros(channels, np.float32))], epsilon=1e-5)
        return self.activation(layer.activation, out)

    def flip(self, source: str, axis: int) -> str:
        """``source`` reversed along ``axis``."""
        return self.node("Slice", [source, self.const("flip_start", np.array([-1], np.int64)),
                                   self.const("flip_end", np.array([-(2 ** 62)], np.int64)),
                                   self.const(f"flip_axis{axis}", np.array([axis], np.int64)),
                                   self.const("flip_step", np.array([-1], np.int64))])


def _body(graph: _Graph, layers: Sequence[ConvLayer | str], source: str) -> str:
    for layer in layers:
        source = graph.activation(layer, source) if isinstance(layer, str) else graph.conv(layer, source)
    return source


def _split_head(model: TfjsModel) -> tuple[list[ConvLayer | str], ConvLayer]:
    """The layers before the classifier, and the classifier: a final 1x1x1 linear convolution."""
    head = model.layers[-1] if model.layers else None
    if not isinstance(head, ConvLayer) or head.kernel.shape[:3] != (1, 1, 1) or head.activation != "linear" \
            or head.instance_norm:
        raise UnsupportedLayer("a serving graph needs a final linear 1x1x1 Conv3D (the classifier)")
    return model.layers[:-1], head


def _serving_head(graph: _Graph, head: ConvLayer, features: str, mirrored: str | None,
                  mirror: Sequence[int] | None, chunks: int) -> str:
    """Class index per voxel from the classifier, computed in ``chunks`` slabs along the last axis so that the
    C-channel logits never exist for the whole volume at once. With ``mirror``, the logits of the mirrored pass
    (channel c read from channel mirror[c]) are added to those of the direct pass before the argmax."""
    weight = head.kernel.transpose(4, 3, 0, 1, 2)
    bias = head.bias if head.bias is not None else np.zeros(head.out_channels, np.float32)
    split_ins = [features] if mirrored is None else [features, mirrored]
    parts = []
    for source in split_ins:
        names = [graph.fresh("chunk") for _ in range(chunks)]
        graph.nodes.append(graph.helper.make_node("Split", [source], names, axis=4, num_outputs=chunks))
        parts.append(names)
    labels = []
    for i in range(chunks):
        logits = graph.conv(head, parts[0][i], weight, bias if mirror is None else bias + bias[list(mirror)])
        if mirror is not None:
            index = list(mirror)
            other = graph.conv(head, parts[1][i], weight[index], np.zeros_like(bias), tag=".mirror")
            logits = graph.node("Add", [logits, other])
        labels.append(graph.node("ArgMax", [logits], axis=1, keepdims=1, select_last_index=0))
    joined = labels[0] if chunks == 1 else graph.node("Concat", labels, axis=4)
    return graph.node("Cast", [joined], to=2)  # uint8 (TensorProto.UINT8)


def to_onnx(model: TfjsModel, *, input_name: str = "image", output_name: str = "seg", opset: int = 18,
            class_index: bool = False, mirror: Sequence[int] | None = None, mirror_axis: int = 2,
            chunks: int = 8, doc: str = ""):
    """The ONNX graph (an ``onnx.ModelProto``) of a loaded TF.js model, channels first, dynamic batch and size.

    Plain (default): ``output_name`` is the network's output [N, C, D, H, W], exactly the TF.js model.
    ``class_index``: ``output_name`` is the argmax class [N, 1, D, H, W] as uint8, the classifier run in
    ``chunks`` slabs (less memory). ``mirror`` (with ``class_index``): a permutation of the classes (left <->
    right); the network also runs on the input reversed along ``mirror_axis`` and its logits, reversed back
    and with channel c taken from mirror[c], are added before the argmax: the labels of a mirrored input are
    then exactly the mirrored, side-swapped labels of the input (no side bias by construction).
    """
    import onnx
    from onnx import TensorProto

    graph = _Graph()
    if not class_index:
        if mirror is not None:
            raise ValueError("mirror needs class_index=True")
        out = _body(graph, model.layers, input_name)
        out_shape = ["N", model.out_channels, "D", "H", "W"]
        out_type = TensorProto.FLOAT
    else:
        body, head = _split_head(model)
        if mirror is not None and sorted(mirror) != list(range(head.out_channels)):
            raise ValueError(f"mirror must be a permutation of the {head.out_channels} classes")
        if model.out_channels > 255:
            raise ValueError("class_index output is uint8: at most 255 classes")
        features = _body(graph, body, input_name)
        mirrored = None
        if mirror is not None:
            mirrored = graph.flip(_body(graph, body, graph.flip(input_name, mirror_axis)), mirror_axis)
        out = _serving_head(graph, head, features, mirrored, mirror, chunks)
        out_shape, out_type = ["N", 1, "D", "H", "W"], TensorProto.UINT8
    graph.nodes.append(graph.helper.make_node("Identity", [out], [output_name]))
    helper = graph.helper
    onnx_graph = helper.make_graph(
        graph.nodes, f"{model.name}",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", model.in_channels, "D", "H", "W"])],
        [helper.make_tensor_value_info(output_name, out_type, out_shape)],
        graph.initializers,
    )
    proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="dicom-node inference.training.tfjs_convert", doc_string=doc)
    proto.ir_version = min(proto.ir_version, 9)
    onnx.checker.check_model(proto)
    return proto

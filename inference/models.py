"""Model registry: ``onnx_models/<id>/manifest.toml`` + ``model.onnx``, warm onnxruntime sessions, providers."""

from __future__ import annotations

import logging
import threading
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inference.normalization import SYNTHESIS_INPUT

__all__ = [
    "MANIFEST_FILE",
    "MODEL_FILE",
    "ImageOutputSpec",
    "InputSpec",
    "LoadedModel",
    "ManifestError",
    "ModelError",
    "ModelManifest",
    "ModelRegistry",
    "OutputSpec",
    "SegmentationOutputSpec",
    "TilingSpec",
    "load_manifest",
]

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.toml"
MODEL_FILE = "model.onnx"

_AXIS_OF_LETTER = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}


class ManifestError(ValueError):
    """A manifest.toml that cannot be read or does not match the schema (message names the field)."""


class ModelError(RuntimeError):
    """An ONNX model that does not match its manifest, or cannot be loaded."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    name: str = Field(min_length=1)
    orientation: str = "LPS"
    spacing_mm: float = Field(default=1.0, gt=0)
    normalization: Literal["percentile", "minmax", "conform_uint8"] = "percentile"
    p_low: float = Field(default=SYNTHESIS_INPUT.p_low, ge=0, le=100)
    p_high: float = Field(default=SYNTHESIS_INPUT.p_high, ge=0, le=100)
    clip_max: float = Field(default=SYNTHESIS_INPUT.clip_max, gt=0)
    divisible_by: int = Field(default=16, ge=1)
    # run the network only on the box of the head (largest Otsu foreground component) plus this margin in
    # voxels of the model grid, background elsewhere; None: the whole field of view. For networks whose
    # output depends on the input's extent (instance normalisation): the box is what they were trained on.
    foreground_margin: int | None = Field(default=None, ge=0)
    # "image": an isotropic grid with the input's own direction (inference.volume.isotropic_grid);
    # "conform": FreeSurfer's conformed grid, conform_size voxels per axis, axis-aligned in `orientation`,
    # centred on the input's field of view (segmentation models trained on FreeSurfer-conformed T1s)
    grid: Literal["image", "conform"] = "image"
    conform_size: int = Field(default=256, ge=16)
    # tensor axes: "kji" = the numpy array of the oriented image (SimpleITK order); "ijk" = its transpose
    # (nibabel's order, e.g. networks trained on FreeSurfer volumes read with nibabel)
    axes: Literal["kji", "ijk"] = "kji"
    # with foreground_margin: keep at most this many mm of the head box below its top (the brain, not the neck)
    head_box_mm: float | None = Field(default=None, gt=0)
    # also run the model on the head mirrored left-right in patient space and average the image outputs (the
    # mirrored one mirrored back): a mirrored head then gets exactly the mirrored image (no side bias)
    mirror_average: bool = False

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, value: str) -> str:
        value = value.upper()
        if len(value) != 3 or any(c not in _AXIS_OF_LETTER for c in value) or \
                len({_AXIS_OF_LETTER[c] for c in value}) != 3:
            raise ValueError(f"{value!r} is not a 3-letter orientation with one of L/R, P/A, S/I each (e.g. 'LPS')")
        return value

    @model_validator(mode="after")
    def _percentiles(self) -> InputSpec:
        if self.p_low >= self.p_high:
            raise ValueError(f"p_low ({self.p_low}) must be below p_high ({self.p_high})")
        return self


class TilingSpec(_Strict):
    tile: tuple[int, int, int]
    overlap: int = Field(default=0, ge=0)

    @field_validator("tile")
    @classmethod
    def _positive(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(v <= 0 for v in value):
            raise ValueError(f"tile sizes must be positive, got {list(value)}")
        return value


class ImageOutputSpec(_Strict):
    name: str = Field(min_length=1)
    scale: float = Field(default=1000.0, gt=0)


class SegmentationOutputSpec(_Strict):
    name: str = Field(min_length=1)
    labels: list[int] = Field(min_length=2)
    # "logits": [1, C, D, H, W] scores; "class_index": [1, 1, D, H, W] integer channel index (argmax in the graph)
    encoding: Literal["logits", "class_index"] = "logits"
    # give left/right labels the side of the mid-sagittal plane fitted to the prediction (inference.hemispheres)
    lateralize: bool = False
    # a synthesis model's labels measure its own sT1 even where [inference] segmenter is set: only where the real-T1
    # evaluation (inference.training.evaluate_real_t1, docs/real-t1-evaluation.json) shows that they agree better
    # with the segmenter on the real T1 than the segmenter on the sT1 does (tests/test_shipped_models.py holds it)
    measures_synthetic: bool = False
    # classes of ``labels`` the model was measured never to produce (held-out Dice 0 on every map and input kind,
    # metrics.json; tests/test_shipped_models.py holds it): quality control does not require them
    unlabelled: list[int] = Field(default_factory=list)
    # classes of ``labels`` counted in the intracranial volume but not reported as structures: SynthSeg's 24 is all
    # the CSF around the brain (hundreds of ml), the segmenter's (aparc+aseg) 24 a small extra-ventricular label
    # (about 1 ml); both under one concept, an sT1's "CSF" and its real T1's differed several hundred-fold
    icv_only: list[int] = Field(default_factory=list)

    @field_validator("labels")
    @classmethod
    def _codes(cls, value: list[int]) -> list[int]:
        if any(v < 0 or v > 65535 for v in value):
            raise ValueError("label codes must be in 0..65535")
        if len(set(value)) != len(value):
            raise ValueError(f"label codes must be unique, got {value}")
        return value

    @model_validator(mode="after")
    def _unlabelled_are_labels(self) -> SegmentationOutputSpec:
        for name, codes in (("unlabelled", self.unlabelled), ("icv_only", self.icv_only)):
            stray = sorted(set(codes) - set(self.labels))
            if stray:
                raise ValueError(f"{name} codes {stray} are not among the labels")
        return self

    @property
    def produced_labels(self) -> list[int]:
        """The label codes the model produces (``labels`` but ``unlabelled``)."""
        return [code for code in self.labels if code not in self.unlabelled]


class OutputSpec(_Strict):
    image: ImageOutputSpec | None = None
    segmentation: SegmentationOutputSpec | None = None


class ModelManifest(_Strict):
    """The schema of ``manifest.toml`` (docs/architecture.md)."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1)
    task: Literal["synthesis", "segmentation"]
    input_kinds: list[str] = Field(default_factory=list)
    licence: str = Field(min_length=1)
    description: str = ""
    input: InputSpec
    tiling: TilingSpec
    output: OutputSpec
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ModelManifest:
        if self.task == "synthesis" and self.output.image is None:
            raise ValueError("task 'synthesis' needs an [output.image] table")
        if self.task == "segmentation":
            if self.output.segmentation is None:
                raise ValueError("task 'segmentation' needs an [output.segmentation] table")
            if self.output.image is not None:
                raise ValueError("task 'segmentation' must not have an [output.image] table")
        bad = [t for t in self.tiling.tile if t % self.input.divisible_by]
        if bad:
            raise ValueError(
                f"tiling.tile {list(self.tiling.tile)} must be multiples of "
                f"input.divisible_by ({self.input.divisible_by})"
            )
        if self.tiling.overlap >= min(self.tiling.tile):
            raise ValueError(f"tiling.overlap ({self.tiling.overlap}) must be smaller than every tile size")
        return self


def load_manifest(path: Path) -> ModelManifest:
    """Parse and validate one manifest.toml; ManifestError names the file and the bad field."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read TOML: {exc}") from exc
    try:
        return ModelManifest.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(manifest)'}: {err['msg']}" for err in exc.errors()
        )
        raise ManifestError(f"{path}: {details}") from exc


@dataclass
class LoadedModel:
    """A manifest with its warm onnxruntime session."""

    manifest: ModelManifest
    session: ort.InferenceSession
    path: Path                              # the model.onnx file
    provider: str                           # execution provider the session really uses first
    input_shape: tuple[int | None, ...]     # spatial dims of the ONNX input; int where the graph fixes it

    @property
    def fixed_spatial_shape(self) -> tuple[int, int, int] | None:
        """The D, H, W the graph requires, when all three are fixed."""
        if len(self.input_shape) == 3 and all(isinstance(v, int) for v in self.input_shape):
            return tuple(self.input_shape)  # type: ignore[return-value]
        return None


def _dims(shape: Iterable[Any]) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


class ModelRegistry:
    """Installed models under ``models_dir``; sessions are created once and reused (thread-safe)."""

    def __init__(self, models_dir: Path, *, providers: Literal["auto", "cpu", "cuda"] = "auto",
                 threads: int = 0) -> None:
        if providers not in ("auto", "cpu", "cuda"):
            raise ValueError(f"providers must be 'auto', 'cpu' or 'cuda', got {providers!r}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.models_dir = Path(models_dir)
        self.providers = providers
        self.threads = threads
        self._sessions: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def available(self) -> dict[str, ModelManifest]:
        """Valid manifests found under models_dir/*/manifest.toml; invalid ones are logged and skipped."""
        found: dict[str, ModelManifest] = {}
        if not self.models_dir.is_dir():
            log.warning("models directory %s does not exist", self.models_dir)
            return found
        for manifest_path in sorted(self.models_dir.glob(f"*/{MANIFEST_FILE}")):
            folder = manifest_path.parent
            try:
                manifest = load_manifest(manifest_path)
            except ManifestError as exc:
                log.warning("skipping model %s: %s", folder.name, exc)
                continue
            if manifest.id != folder.name:
                log.warning("skipping model %s: manifest id %r differs from its folder name", folder.name, manifest.id)
                continue
            if not (folder / MODEL_FILE).is_file():
                log.warning("skipping model %s: %s missing", folder.name, MODEL_FILE)
                continue
            found[manifest.id] = manifest
        return found

    def execution_providers(self) -> list[str]:
        """onnxruntime provider list for the configured choice."""
        available = ort.get_available_providers()
        if self.providers == "cpu":
            return ["CPUExecutionProvider"]
        if self.providers == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise ModelError(f"providers='cuda' but onnxruntime offers only {available}")
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False  # the arena multiplies peak memory on 3D U-Nets
        options.intra_op_num_threads = self.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return options

    def session(self, model_id: str) -> LoadedModel:
        """The warm session of an installed model; KeyError if it is not installed (or invalid)."""
        with self._lock:
            loaded = self._sessions.get(model_id)
            if loaded is not None:
                return loaded
            manifests = self.available()
            if model_id not in manifests:
                raise KeyError(f"model {model_id!r} is not installed in {self.models_dir} "
                               f"(available: {sorted(manifests)})")
            loaded = self._load(manifests[model_id], self.models_dir / model_id / MODEL_FILE)
            self._sessions[model_id] = loaded
            return loaded

    def providers_in_use(self) -> set[str]:
        """The execution providers the sessions loaded so far run on (their first choice, as onnxruntime made them)."""
        with self._lock:
            return {loaded.provider for loaded in self._sessions.values()}

    def warm_up(self, model_ids: Iterable[str] | None = None) -> list[str]:
        """Create the sessions now (all available models by default); returns the ids loaded."""
        ids = list(model_ids) if model_ids is not None else list(self.available())
        for model_id in ids:
            self.session(model_id)
        return ids

    def _load(self, manifest: ModelManifest, path: Path) -> LoadedModel:
        requested = self.execution_providers()
        try:
            session = ort.InferenceSession(str(path), sess_options=self.session_options(), providers=requested)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"model {manifest.id}: cannot load {path}: {exc}") from exc
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if manifest.input.name not in inputs:
            raise ModelError(f"model {manifest.id}: input.name {manifest.input.name!r} not in the ONNX graph "
                             f"inputs {sorted(inputs)}")
        shape = inputs[manifest.input.name].shape
        if len(shape) != 5:
            raise ModelError(f"model {manifest.id}: input {manifest.input.name!r} must be 5-D [N, 1, D, H, W], "
                             f"graph says {shape}")
        expected = []
        if manifest.output.image is not None:
            expected.append(("output.image.name", manifest.output.image.name))
        if manifest.output.segmentation is not None:
            expected.append(("output.segmentation.name", manifest.output.segmentation.name))
        for field_name, name in expected:
            if name not in outputs:
                raise ModelError(f"model {manifest.id}: {field_name} {name!r} not in the ONNX graph outputs "
                                 f"{sorted(outputs)}")
        if manifest.output.segmentation is not None:
            channels = outputs[manifest.output.segmentation.name].shape[1]
            n_labels = len(manifest.output.segmentation.labels)
            if manifest.output.segmentation.encoding == "class_index":
                n_labels = 1
            if isinstance(channels, int) and channels != n_labels:
                raise ModelError(f"model {manifest.id}: output.segmentation.labels has {n_labels} codes but the "
                                 f"graph output has {channels} channels")
        provider = session.get_providers()[0]
        if provider != requested[0]:
            # onnxruntime-gpu offers CUDA whether or not this host has a GPU (and its libraries), and falls back
            # to the CPU when the session is made: "cuda" means a GPU or nothing, "auto" takes what it gets
            if self.providers == "cuda":
                raise ModelError(f"model {manifest.id}: providers='cuda' but the session runs on {provider} (no "
                                 "usable GPU, or CUDA/cuDNN libraries missing)")
            log.warning("model %s: requested %s, session runs on %s", manifest.id, requested[0], provider)
        log.info("model %s %s loaded from %s on %s", manifest.id, manifest.version, path, provider)
        return LoadedModel(manifest=manifest, session=session, path=path, provider=provider,
                           input_shape=_dims(shape[2:]))


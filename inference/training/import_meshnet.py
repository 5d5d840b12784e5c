"""Bundle a brainchop MeshNet (TF.js layers model, MIT) as a node segmentation model.

    python -m inference.training.import_meshnet --source ../shared/data/models/brainchop_meshnet/model21_104class \\
        --model-id brainchop-aparc-aseg --version 1.0.0

writes ``onnx_models/<model-id>/``: ``model.onnx`` (the serving graph: the converted network run on the input and on
its left-right mirror, logits of the mirror side-swapped and added, argmax in slabs; uint8 class per voxel),
``manifest.toml`` (brainchop's preprocessing for the model: FreeSurfer-conformed 256³ 1 mm LIA, uchar scaling then
min-max, tensor axes [i, j, k]; classes as FreeSurfer aparc+aseg codes), ``LICENSE`` (upstream's) and
``source.json`` (what was converted, with checksums). The model card is written by ``evaluate_segmenter``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from inference.labels import APARC_ASEG_CODES
from inference.segmentation import SLABS
from inference.training.tfjs_convert import load_tfjs_model, to_onnx

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "onnx_models"

#: brainchop's preprocessing for its MeshNets (brainchop-parameters.js, tensor-utils.js): the conformed volume is
#: read [k, j, i] and transposed to [i, j, k]; min-max normalised (quantile normalisation off for the 104-class
#: model); crop to the non-zero box (here: the head box, see inference.segmentation)
MANIFEST_INPUT = """[input]
name = "image"
orientation = "LIA"
spacing_mm = 1.0
normalization = "conform_uint8"
grid = "conform"
conform_size = 256
axes = "ijk"
divisible_by = 1
foreground_margin = 4
head_box_mm = 180.0
"""


def class_codes(names: list[str]) -> list[int]:
    """FreeSurfer aparc+aseg code of each class name of a brainchop colormap.json ('Left-Thalamus-Proper*' too)."""
    codes = []
    for name in names:
        key = name.rstrip("*")
        if key not in APARC_ASEG_CODES:
            raise ValueError(f"class {name!r} has no FreeSurfer aparc+aseg code in inference.labels")
        codes.append(APARC_ASEG_CODES[key])
    return codes


def mirror_permutation(names: list[str]) -> list[int]:
    """For each class, the index of its left-right counterpart (itself when it has no side)."""
    index = {name: i for i, name in enumerate(names)}
    pairs = (("ctx-lh-", "ctx-rh-"), ("Left-", "Right-"))
    mirror = []
    for name in names:
        partner = name
        for left, right in pairs:
            if name.startswith(left):
                partner = right + name[len(left):]
            elif name.startswith(right):
                partner = left + name[len(right):]
        if partner not in index:
            raise ValueError(f"class {name!r} has no counterpart {partner!r}")
        mirror.append(index[partner])
    return mirror


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_meshnet(source: Path, model_id: str, version: str, out_root: Path = MODELS_DIR,
                   description: str = "") -> Path:
    source = Path(source)
    model = load_tfjs_model(source)
    names = json.loads((source / "colormap.json").read_text())["labels"]
    if len(names) != model.out_channels:
        raise ValueError(f"{source}: colormap has {len(names)} classes, the network {model.out_channels}")
    codes = class_codes(names)
    mirror = mirror_permutation(names)
    out = Path(out_root) / model_id
    out.mkdir(parents=True, exist_ok=True)
    proto = to_onnx(model, output_name="labels", class_index=True, mirror=mirror, mirror_axis=2, chunks=SLABS,
                    doc=f"{source.name} (brainchop MeshNet, MIT) converted by inference.training.tfjs_convert")
    (out / "model.onnx").write_bytes(proto.SerializeToString())
    licence = source / "LICENSE" if (source / "LICENSE").is_file() else source.parent / "LICENSE"
    shutil.copyfile(licence, out / "LICENSE")
    description = description or (
        f"brainchop MeshNet {source.name} ({model.parameters:,} parameters, trained by the brainchop project on "
        "real T1s with FreeSurfer aparc+aseg labels), converted to ONNX by this project; run on the input and its "
        "left-right mirror (side-swapped logits added). See MODEL_CARD.md.")
    manifest = "\n".join([
        f'id = "{model_id}"',
        f'version = "{version}"',
        'task = "segmentation"',
        'input_kinds = ["t1"]',
        'licence = "MIT"',
        f"description = {json.dumps(description)}",
        "",
        MANIFEST_INPUT,
        "[tiling]  # one pass over the head box",
        "tile = [256, 256, 256]",
        "overlap = 0",
        "",
        "[output.segmentation]",
        'name = "labels"',
        'encoding = "class_index"',
        f"labels = {codes}",
        "",
    ])
    (out / "manifest.toml").write_text(manifest)
    files = sorted(p for p in source.iterdir() if p.is_file())
    (out / "source.json").write_text(json.dumps({
        "upstream": "neuroneural/brainchop public/models/ @4c87885f3a2a",
        "folder": source.name,
        "files": {p.name: _sha256(p) for p in files},
        "classes": names,
        "converter": "inference.training.tfjs_convert (class_index, mirror average along i, 8 slabs)",
    }, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="brainchop model folder (model.json, colormap.json)")
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--out", type=Path, default=MODELS_DIR)
    args = parser.parse_args(argv)
    out = import_meshnet(args.source, args.model_id, args.version, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a trained checkpoint to ONNX (opset 17, dynamic spatial axes) plus manifest.toml.

python -m inference.training.export --model-id synth-t1 [--checkpoint PATH] [--out onnx_models]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference.normalization import SYNTHESIS_INPUT
from inference.training.generator import INPUT_KINDS, SEG_LABELS
from inference.training.networks import build_network, count_parameters
from inference.training.train import train_dir

OPSET = 17
INPUT_NAME = "image"
IMAGE_OUTPUT = "t1"
SEG_OUTPUT = "seg"
REPO_ROOT = Path(__file__).resolve().parents[2]
CARD_TEMPLATE = Path(__file__).with_name("MODEL_CARD.template.md")


def load_network(checkpoint: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The network with the weights of a training checkpoint or weight snapshot, in eval mode (batch norm on its
    running statistics); returns (model, checkpoint dict)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = build_network(state["config"])
    model.load_state_dict(state["model"])
    model.eval()
    return model, state


def export_onnx(model: nn.Module, path: Path, *, example_size: int = 32) -> None:
    """Write `model` as ONNX: input `image` [1,1,D,H,W], outputs `t1` [1,1,D,H,W] and `seg` [1,C,D,H,W]."""
    x = torch.zeros(1, 1, example_size, example_size, example_size)
    axes = {2: "D", 3: "H", 4: "W"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model, (x,), str(path), opset_version=OPSET, input_names=[INPUT_NAME],
            output_names=[IMAGE_OUTPUT, SEG_OUTPUT],
            dynamic_axes={INPUT_NAME: axes, IMAGE_OUTPUT: axes, SEG_OUTPUT: axes}, dynamo=False,
        )


def toml_value(value: Any) -> str:
    """A TOML literal for str, bool, int, float or a list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(round(value, 6))
    return repr(value)


def dump_toml(data: dict[str, Any]) -> str:
    """Serialise nested dicts of scalars/lists to TOML (tables after scalars, dotted table names)."""
    lines: list[str] = []

    def emit(table: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{_key(k)} = {toml_value(v)}")
        for k, v in tables.items():
            emit(v, f"{prefix}.{_key(k)}" if prefix else _key(k))

    emit(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else toml_value(key)


FOREGROUND_MARGIN = 8  # voxels around the head box (instance-normalised networks: inference.pipeline)
INIT_LOG = "training_log_init.csv"  # a fine-tune's bundle: the log of the run it started from
INSTANCE_OVERLAP = 32  # voxels shared by neighbouring tiles of an instance-normalised network


def manifest_dict(model_id: str, *, version: str, tile: int, divisible_by: int, overlap: int = 16,
                  metrics: dict[str, Any] | None = None, foreground_margin: int | None = None,
                  lateralize: bool = False, input_kinds: list[str] | None = None) -> dict[str, Any]:
    """The manifest.toml content (docs/architecture.md schema) of an exported synthesis model."""
    spec: dict[str, Any] = {"name": INPUT_NAME, "orientation": "LPS", "spacing_mm": 1.0,
                            **SYNTHESIS_INPUT.manifest_fields(), "divisible_by": divisible_by}
    if foreground_margin is not None:
        spec["foreground_margin"] = foreground_margin
    return {
        "id": model_id,
        "version": version,
        "task": "synthesis",
        "input_kinds": list(input_kinds or INPUT_KINDS),
        "licence": "Apache-2.0",
        "description": "SynthSR-style 3D U-Net trained on synthetic scans generated from the SynthSeg label maps: "
                       "any brain MRI (AutoAlign scout, 2D FLASH/TSE, FLAIR, T2, any contrast/resolution) "
                       "resampled to 1 mm -> MPRAGE-like T1 + 33-label segmentation (the network works at 2 mm "
                       "inside the 1 mm graph). Trained on CPU; see MODEL_CARD.md.",
        "input": spec,
        "tiling": {"tile": [tile, tile, tile], "overlap": overlap},
        "output": {"image": {"name": IMAGE_OUTPUT, "scale": 1000.0},
                   "segmentation": {"name": SEG_OUTPUT, "labels": list(SEG_LABELS), "lateralize": lateralize}},
        "metrics": metrics or {},
    }


TRAINING_START = "<!-- training:start (written by inference.training.export) -->"
TRAINING_END = "<!-- training:end -->"


def training_summary(state: dict[str, Any], log: Path | None, n_parameters: int) -> str:
    """Markdown block with the facts of a training run: steps, wall time, final losses (mean of last 100 steps)."""
    lines = [TRAINING_START, ""]
    rows: list[dict[str, str]] = []
    if log is not None and log.exists():
        with open(log, newline="") as fh:
            rows = list(csv.DictReader(fh))
    lines.append(f"- checkpoint step {state['step']} of {state.get('steps_planned', '?')} planned; "
                 f"{float(state.get('seconds', 0)) / 3600:.2f} h of training wall time; "
                 f"crop {state.get('crop')}³; seed {state.get('seed')}; network {state['config']}, "
                 f"{n_parameters} parameters")
    if state.get("init_from"):
        init = state["init_from"]
        where = str(init["path"]).replace(str(Path.home()), "~", 1)
        lines.append(f"- fine-tuned from `{where}` (step {init['step']} of that run): the steps above and the "
                     f"losses below are the fine-tuning's own; the run it started from is in `{INIT_LOG}`")
    if state.get("kinds"):
        lines.append(f"- trained on the input kinds {', '.join(state['kinds'])} only")
    if rows:
        last = rows[-100:]
        mean = {k: sum(float(r[k]) for r in last) / len(last) for k in ("loss", "l1", "ce", "dice")}
        first = rows[:100]
        mean0 = {k: sum(float(r[k]) for r in first) / len(first) for k in ("loss", "l1", "ce", "dice")}
        dice_weight = state.get("dice_weight", 1.0)
        lines.append(f"- training loss (5·L1 + CE + {dice_weight:g}·soft-Dice), mean of the first / last {len(last)} "
                     f"logged steps: "
                     + "; ".join(f"{k} {mean0[k]:.4f} → {mean[k]:.4f}" for k in mean))
    lines += ["- full curve: `training_log.csv` (step, loss, l1, ce, dice, lr, seconds, kind)", "", TRAINING_END]
    return "\n".join(lines)


def replace_block(text: str, start: str, end: str, block: str) -> str:
    """Replace the marked block in `text`, or append it."""
    if start in text and end in text:
        return text[: text.index(start)] + block + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def copy_training_log(src: Path, dest: Path, last_step: int | None = None) -> None:
    """Copy the CSV log keeping, for a step logged twice (redone after resuming from an older checkpoint),
    the later row; with `last_step`, only the rows up to that step (the weights exported)."""
    with open(src, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        rows = {int(r["step"]): r for r in reader if last_step is None or int(r["step"]) <= last_step}
    with open(dest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows[k] for k in sorted(rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-id", required=True)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: <train dir>/checkpoint.pt")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "onnx_models")
    ap.add_argument("--version", default="0.2.0")
    ap.add_argument("--tile", type=int, default=None,
                    help="largest inference tile (default: the training crop for an instance-normalised network, "
                         "else 192)")
    ap.add_argument("--overlap", type=int, default=None,
                    help="tile overlap in voxels (default: 32 for an instance-normalised network, else 16)")
    ap.add_argument("--no-lateralize", action="store_true",
                    help="keep the network's own left/right labels (default: sides from the mid-sagittal plane, "
                         "inference.hemispheres)")
    args = ap.parse_args(argv)

    src = train_dir(args.model_id)
    checkpoint = args.checkpoint or src / "checkpoint.pt"
    model, state = load_network(checkpoint)
    dest = args.out / args.model_id
    export_onnx(model, dest / "model.onnx")
    # metrics belong to the weights they were measured on: a new export starts without any (evaluate writes
    # them), and says which training step it is so that evaluate records it
    stale = dest / "metrics.json"
    if stale.exists():
        stale.unlink()
    # an instance-normalised network's output depends on what the input contains: run it on the head's box,
    # as it was trained on crops of the head, not on a field of view of mostly air
    instance = state["config"].get("norm", "batch") == "instance"
    margin = FOREGROUND_MARGIN if instance else None
    # and on tiles of the size of its training crops: its statistics are then those of the context it learnt
    # in (docs/training.md: on held-out maps, tiles of 128 instead of one pass over the head raised the Dice of
    # the major structures by 0.01-0.13); the overlap blends the tiles' seams
    tile = args.tile or (int(state["crop"]) if instance and state.get("crop") else 192)
    overlap = args.overlap if args.overlap is not None else (min(INSTANCE_OVERLAP, tile // 4) if instance else 16)
    manifest = manifest_dict(args.model_id, version=args.version, tile=tile, overlap=overlap,
                             divisible_by=model.divisible_by, metrics={"info": {"train_step": int(state["step"])}},
                             foreground_margin=margin, lateralize=not args.no_lateralize,
                             input_kinds=state.get("kinds") or None)
    (dest / "manifest.toml").write_text(dump_toml(manifest), encoding="utf-8")
    # the log of the run the checkpoint belongs to (its folder; else the model's train folder), up to its step
    log = next((p for p in (checkpoint.parent / "training_log.csv", src / "training_log.csv") if p.exists()), None)
    if log is not None:
        copy_training_log(log, dest / "training_log.csv", int(state["step"]))
    init_log = dest / INIT_LOG
    if init_log.exists():
        init_log.unlink()
    if state.get("init_from"):  # a fine-tune: the curve of the run it started from, up to the step it took
        source = Path(state["init_from"]["path"]).parent / "training_log.csv"
        if source.exists():
            copy_training_log(source, init_log, int(state["init_from"]["step"]))
    card = dest / "MODEL_CARD.md"
    # a first export starts from the recipe's card, to be completed by evaluate (and by hand)
    text = (card.read_text(encoding="utf-8") if card.exists()
            else CARD_TEMPLATE.read_text(encoding="utf-8").replace("# synth-t1", f"# {args.model_id}", 1))
    block = training_summary(state, dest / "training_log.csv", count_parameters(model))
    card.write_text(replace_block(text, TRAINING_START, TRAINING_END, block), encoding="utf-8")
    print(f"exported {checkpoint} (step {state['step']}) to {dest}")


if __name__ == "__main__":
    main()

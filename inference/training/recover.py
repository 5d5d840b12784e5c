"""Recover a resumable training state from an exported model, when the run's own checkpoint is gone.

python -m inference.training.recover --model onnx_models/synth-t1 --run inference/training/runs/synth-t1 \
    --step 4400 --lr 4e-4 --seed 1 --log onnx_models/synth-t1/training_log_init.csv \
    --log onnx_models/synth-t1/training_log.csv:3400

The ONNX export keeps every weight under its torch name, so the network is rebuilt (its configuration read from
the weights' shapes), loaded and checked against the ONNX graph on random input before anything is written. What
an export does not keep is stated in the state: the optimizer's moments (the resumed run starts Adam afresh) and
the random generators (the data stream is seeded by (seed, step) and stays reproducible).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from inference.training.networks import build_network
from inference.training.train import LOG_FIELDS, save_checkpoint

_DOWN = re.compile(r"^(core\.)?down\.(\d+)\.0\.weight$")


def network_config(weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """The `build_network` configuration of exported weights, read from their names and shapes."""
    coarse = any(name.startswith("core.") for name in weights)
    prefix = "core." if coarse else ""
    down = sorted((int(m.group(2)), weights[name].shape[0]) for name in weights if (m := _DOWN.match(name)))
    if not down:
        raise ValueError("no U-Net encoder weights (down.N.0.weight) in the model: not a networks.SynthUNet export")
    if any(name.endswith("running_mean") for name in weights):
        raise ValueError("batch-normalised network: its running statistics cannot be told from folded weights")
    return {"arch": "coarse" if coarse else "unet", "n_labels": int(weights[f"{prefix}seg_head.weight"].shape[0]),
            "base": int(down[0][1]), "levels": len(down), "max_channels": int(max(c for _, c in down)),
            "norm": "instance"}


def network_from_onnx(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(network with the ONNX file's weights in eval mode, its configuration)."""
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    config = network_config(weights)
    model = build_network(config)
    model.load_state_dict({name: torch.from_numpy(np.array(weights[name])) for name in model.state_dict()},
                          strict=True)
    return model.eval(), config


def check_equivalence(model: torch.nn.Module, path: Path, size: int = 32, rtol: float = 1e-5) -> float:
    """Largest difference between the network and the ONNX graph on random input, relative to the largest output
    value (float32 rounding of two runtimes: ~1e-6); raises beyond `rtol`."""
    x = torch.rand(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        got = [t.numpy() for t in model(x)]
    worst = max(float(np.abs(a - b).max() / max(1.0, np.abs(b).max())) for a, b in zip(got, expected, strict=True))
    if worst > rtol:
        raise ValueError(f"{path}: the rebuilt network differs from the ONNX graph by {worst:.2e} of its largest "
                         f"output (> {rtol})")
    return worst


def merge_logs(sources: list[tuple[Path, int]], dest: Path) -> int:
    """Write the rows of each (CSV log, step offset) into one training log; returns the number of rows."""
    rows: list[dict[str, str]] = []
    for path, offset in sources:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append({**{k: row.get(k, "") for k in LOG_FIELDS}, "step": str(int(row["step"]) + offset)})
    with open(dest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def recovered_state(model: torch.nn.Module, config: dict[str, Any], source: Path, *, step: int, lr: float,
                    seed: int, crop: int) -> dict[str, Any]:
    """A train.py state at `step` with the network's weights, no optimizer moments and no generator state."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    return {
        "model": model.state_dict(), "optimizer": None, "step": step, "seconds": 0.0, "steps_planned": step,
        "config": config, "crop": crop, "seed": seed, "lr": lr, "freeze_norm_at": 0.6, "head_lr_scale": 10.0,
        "dice_weight": 2.0, "warmup_steps": 0, "warmup_kinds": [], "kinds": [], "init_from": None,
        "history": [{"recovered_from": str(source), "sha256": digest, "step": step,
                     "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                     "note": "weights from the export; optimizer moments and generator state were not exported"}],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="an exported model folder (model.onnx)")
    ap.add_argument("--run", type=Path, required=True, help="run folder to write (checkpoint.pt, training_log.csv)")
    ap.add_argument("--step", type=int, required=True, help="training steps the weights have had")
    ap.add_argument("--lr", type=float, required=True, help="base learning rate to continue with")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop", type=int, default=128, help="the training crop of the run")
    ap.add_argument("--log", action="append", default=[], metavar="CSV[:OFFSET]",
                    help="training logs of the run, in order, each with the step it started after")
    args = ap.parse_args(argv)
    source = args.model / "model.onnx"
    model, config = network_from_onnx(source)
    worst = check_equivalence(model, source)
    args.run.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.run / "checkpoint.pt",
                    recovered_state(model, config, source, step=args.step, lr=args.lr, seed=args.seed, crop=args.crop))
    logs = [(Path(p), int(o) if o else 0) for p, _, o in (item.partition(":") for item in args.log)]
    rows = merge_logs(logs, args.run / "training_log.csv") if logs else 0
    print(f"recovered {source} ({config}) at step {args.step} into {args.run} (torch vs onnx: {worst:.1e} of the "
          f"largest output, {rows} log rows)")


if __name__ == "__main__":
    main()

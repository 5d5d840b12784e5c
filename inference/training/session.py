"""One prepared training session: continue the committed run for a fixed time, then export it.

python -m inference.training.session --run inference/training/runs/synth-t1 --device cuda --minutes 9 \
    --data synthseg-pack.npz --export-to "$OUT/onnx_models" --copy-to "$OUT/runs"

For the day a GPU is lent for a few minutes (docs/training.md says how to carry the training set there): the run
resumes from its committed state (weights, optimizer, step, random generators), trains until the time left is
what the export needs, saves its state, exports ONNX + manifest + card, and copies the run folder (the state to
commit) and the export where they come back. The same command with `--device cpu --session-steps 2` is what the
tests run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import time
from pathlib import Path

import torch

from inference.training import export, train

EXPORT_RESERVE_S = 60.0  # what saving, exporting and copying take after the deadline, with margin


def plan(run: Path, add_steps: int) -> tuple[str, int, int]:
    """(model id, current step, planned steps) of the run folder's state: the run's own plan, extended by
    `add_steps` once it is reached (so that the learning-rate schedule of a run stays put across sessions)."""
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    step, planned = int(state["step"]), int(state.get("steps_planned", state["step"]))
    return run.name, step, planned if planned > step else step + add_steps


def train_args(args: argparse.Namespace, model_id: str, first: int, steps: int, deadline: dt.datetime) -> list[str]:
    """The train.py command line of the session: data processes on every spare core of a GPU host."""
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    workers = args.workers if args.workers is not None else (max(1, (os.cpu_count() or 2) - 2) if cuda else 1)
    return ["--model-id", model_id, "--resume", str(args.run), "--steps", str(steps), "--device", args.device,
            "--workers", str(workers), "--threads", str(args.threads), "--deadline", deadline.isoformat(),
            "--checkpoint-minutes", "2", "--snapshot-every", str(10**9), "--data", str(args.data)] + (
        ["--stop-at", str(first + args.session_steps)] if args.session_steps is not None else [])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path(__file__).with_name("runs") / "synth-t1",
                    help="the committed run folder (checkpoint.pt, training_log.csv); its name is the model id")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto")
    ap.add_argument("--minutes", type=float, default=9.0, help="the whole session, export included")
    ap.add_argument("--add-steps", type=int, default=20_000,
                    help="once the run has reached its planned steps, plan this many more (the learning-rate "
                         "decay follows the planned number; the deadline usually stops a session first)")
    ap.add_argument("--session-steps", type=int, default=None, help="stop after this many steps of this session")
    ap.add_argument("--data", type=Path, default=train.DEFAULT_SHARED_DATA,
                    help="the shared data folder or a pack of its label maps")
    ap.add_argument("--workers", type=int, default=None, help="data processes (default: spare cores on CUDA)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--version", default="0.5.0.dev0", help="version written into the exported manifest")
    ap.add_argument("--export-to", type=Path, required=True, help="folder the model is exported into")
    ap.add_argument("--copy-to", type=Path, default=None, help="also copy the run folder here")
    args = ap.parse_args(argv)
    t0 = time.time()
    model_id, first, steps = plan(args.run, args.add_steps)
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=max(0.0, 60 * args.minutes - EXPORT_RESERVE_S))
    train.main(train_args(args, model_id, first, steps, deadline))
    _, last, _ = plan(args.run, 0)
    export.main(["--model-id", model_id, "--checkpoint", str(args.run / "checkpoint.pt"), "--out",
                 str(args.export_to), "--version", args.version])
    if args.copy_to is not None:
        shutil.copytree(args.run, args.copy_to / model_id, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("weights_step*.pt", "*.tmp"))
    seconds = time.time() - t0
    print(f"session: {model_id} steps {first} -> {last} ({last - first} steps, planned {steps}) in {seconds:.0f} s "
          f"on {args.device}; exported to {args.export_to / model_id}", flush=True)


if __name__ == "__main__":
    main()

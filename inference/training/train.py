"""Train a synthesis model (synthetic T1 + segmentation) on generated data; CPU, resumable.

python -m inference.training.train --model-id synth-t1 --steps N --seed 0
Checkpoints, the CSV log and train.log live in ~/.cache/dicom-node-train/<model-id>/ (or --out); a run committed to
the repository (inference/training/runs/<model-id>/) continues with --resume, on any machine (--device cuda).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import platform
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from inference.training.generator import (
    INPUT_KINDS,
    KIND_WEIGHTS,
    SEG_LABELS,
    SyntheticDataset,
    label_map_names,
    pool_sample,
    synthseg_dir,
)
from inference.training.networks import NORMS, build_network, count_parameters

DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LOG_FIELDS = ["step", "loss", "l1", "ce", "dice", "lr", "seconds", "kind"]


def train_dir(model_id: str) -> Path:
    """Cache folder holding checkpoints and logs of one model."""
    return Path.home() / ".cache" / "dicom-node-train" / model_id


def losses(
    t1_pred: torch.Tensor, logits: torch.Tensor, t1: torch.Tensor, seg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L1 on the image, 5x weight inside the brain; cross-entropy; soft Dice loss over all labels)."""
    weight = 1.0 + 4.0 * (seg > 0).float()
    l1 = (weight * (t1_pred[:, 0] - t1).abs()).sum() / weight.sum()
    ce = F.cross_entropy(logits, seg)
    prob = torch.softmax(logits, dim=1)
    onehot = F.one_hot(seg, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()
    return l1, ce, dice


def soft_losses(
    t1_pred: torch.Tensor, logits: torch.Tensor, t1: torch.Tensor, fractions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`losses` with soft segmentation targets (per-channel fractions [N, C, ...], e.g. of a 2 mm voxel)."""
    weight = 1.0 + 4.0 * (1.0 - fractions[:, 0])
    l1 = (weight * (t1_pred[:, 0] - t1).abs()).sum() / weight.sum()
    log_prob = F.log_softmax(logits, dim=1)
    ce = -(fractions * log_prob).sum(1).mean()
    prob = log_prob.exp()
    dims = (0, 2, 3, 4)
    inter = (prob * fractions).sum(dims)
    denom = prob.sum(dims) + fractions.sum(dims)
    dice = 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()
    return l1, ce, dice


class SampleStream(torch.utils.data.IterableDataset):
    """Endless generated samples (pooled to 2 mm for the coarse network), made in a worker process so that
    generation and training overlap. Seeded by (seed, first step): a resumed run draws a fresh, reproducible
    stream."""

    def __init__(self, root: Path, crop: int, seed: int, first_step: int, coarse: bool,
                 warmup_kinds: tuple[str, ...] = (), warmup_steps: int = 0, kinds: tuple[str, ...] = ()) -> None:
        self.root, self.crop, self.seed, self.first_step, self.coarse = root, crop, seed, first_step, coarse
        self.warmup_kinds, self.warmup_steps, self.kinds = warmup_kinds, warmup_steps, kinds

    def kind_for(self, step: int, gen: torch.Generator) -> str | None:
        """The input kind of a step's sample: during warm-up one of `warmup_kinds`, afterwards one of `kinds`
        (weights as in training), or None (the generator's own mix) when `kinds` is empty."""
        choice = self.warmup_kinds if step < self.warmup_steps and self.warmup_kinds else self.kinds
        if not choice:
            return None
        weights = torch.tensor([KIND_WEIGHTS[INPUT_KINDS.index(k)] for k in choice])
        return choice[int(torch.multinomial(weights, 1, generator=gen))]

    def __iter__(self):  # noqa: ANN204
        worker = torch.utils.data.get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        if worker is not None:
            torch.set_num_threads(1)  # a data process; the training process keeps its --threads
            # `pkill -f` or a stop of the process group reaches the data processes too: leave the stop to the
            # training process, which saves a checkpoint and then shuts its workers down
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        data = SyntheticDataset(self.root, crop=self.crop)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.first_step) * 64 + worker_id)
        # the DataLoader takes samples from its workers in turn, so worker w makes the samples of steps
        # first_step + w, first_step + w + n_workers, ...
        step = self.first_step + worker_id
        while True:
            sample = data.sample(gen, kind=self.kind_for(step, gen))
            step += n_workers
            yield pool_sample(sample) if self.coarse else sample


def learning_rate(step: int, steps: int, base_lr: float) -> float:
    """Constant for the first 60 % of the steps, then linear decay to 10 %."""
    frac = step / max(1, steps)
    if frac < 0.6:
        return base_lr
    return base_lr * (1.0 - 0.9 * min(1.0, (frac - 0.6) / 0.4))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sample: Any, coarse: bool, dice_weight: float,
               device: torch.device) -> tuple[float, float, float, float]:
    """One optimisation step on one generated sample (2 mm CoarseSample for the coarse network, else a 1 mm
    Sample); returns (loss, l1, ce, dice)."""
    if coarse:
        x = sample.image[None].to(device).contiguous(memory_format=torch.channels_last_3d)
        t1_pred, logits = model.forward_coarse(x)
        l1, ce, dice = soft_losses(t1_pred, logits, sample.t1[None].to(device), sample.seg[None].to(device))
    else:
        t1_pred, logits = model(sample.image[None, None].to(device))
        l1, ce, dice = losses(t1_pred, logits, sample.t1[None].to(device), sample.seg[None].to(device))
    loss = 5.0 * l1 + ce + dice_weight * dice
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item(), l1.item(), ce.item(), dice.item()


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic torch.save (write to a temporary file, then rename)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """The random generators a run draws from (Python, numpy, torch; CUDA's when there is one)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()` (CUDA's only where this machine has CUDA)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def to_cpu(value: Any) -> Any:
    """`value` with every tensor in it moved to the CPU: a state saved on a GPU loads anywhere."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(v) for v in value)
    return value


def training_source(data: Path) -> Path:
    """Where the training label maps come from: a pack file (generator.pack_label_maps) or the shared data
    folder's SynthSeg maps."""
    return data if data.is_file() else synthseg_dir(data)


def resolve_device(name: str) -> torch.device:
    """The torch device of `--device` ("cpu", "cuda", "cuda:N" or "auto": CUDA where torch sees one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device here")
    if device.type == "cuda":  # TF32 matrix units for the convolutions; fp32 accumulation
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-id", required=True)
    ap.add_argument("--steps", type=int, required=True,
                    help="steps of the whole run (a resumed run continues up to this number)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--arch", choices=["coarse", "unet"], default="coarse",
                    help="coarse: U-Net at 2 mm inside a 1 mm graph (CPU-friendly); unet: U-Net at 1 mm")
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--max-channels", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None,
                    help="base learning rate (default 2e-3; a resumed run keeps its own unless this is given)")
    ap.add_argument("--head-lr-scale", type=float, default=10.0,
                    help="learning-rate factor of the 1x1x1 output heads: with 8 feature channels and Adam, the class "
                         "logits otherwise move too slowly to learn the class priors in a CPU budget of steps")
    ap.add_argument("--norm", choices=list(NORMS), default="instance",
                    help="instance: per-input statistics, the same in training and inference; batch: running "
                         "statistics at inference (frozen for the last part of training, --freeze-norm-at)")
    ap.add_argument("--freeze-norm-at", type=float, default=0.6,
                    help="fraction of the steps after which batch-norm statistics are frozen (inference's)")
    ap.add_argument("--dice-weight", type=float, default=2.0,
                    help="weight of the soft Dice loss (mean over labels, so small structures count as much as "
                         "background) against the cross-entropy")
    ap.add_argument("--warmup", type=float, default=0.2,
                    help="fraction of the steps that see only --warmup-kinds (a curriculum: anatomy first, on T1 "
                         "contrast, then every contrast)")
    ap.add_argument("--warmup-kinds", default="aahead_scout,t1_2d")
    ap.add_argument("--kinds", default="",
                    help="comma-separated input kinds the samples are drawn from after the warm-up (default: all, "
                         "as the generator mixes them); one kind trains a per-kind model")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start a new run from the weights of another run (a checkpoint.pt or weights_step*.pt; "
                         "its network and crop are kept, the optimizer and the schedule start afresh): "
                         "fine-tuning, e.g. per input kind")
    ap.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                    help="continue the run whose state is RUN_DIR/checkpoint.pt (weights, optimizer, step, random "
                         "generators), e.g. the committed inference/training/runs/<model-id>, and keep writing it "
                         "there (instead of --out)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    ap.add_argument("--workers", type=int, default=1, help="data generation processes (0: in-process)")
    ap.add_argument("--checkpoint-minutes", type=float, default=3.0)
    ap.add_argument("--snapshot-every", type=int, default=500, help="keep a copy of the weights every N steps")
    ap.add_argument("--deadline", default=None, help="UTC ISO time; save and stop when reached")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="save and stop at this step (the schedule still follows --steps)")
    ap.add_argument("--data", type=Path, default=DEFAULT_SHARED_DATA,
                    help="the shared data folder, or a pack of its label maps (python -m inference.training.generator)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.resume is not None and not (args.resume / "checkpoint.pt").is_file():
        ap.error(f"--resume {args.resume}: no checkpoint.pt there")
    return ap, args


def new_run(args: argparse.Namespace, ap: argparse.ArgumentParser) -> dict[str, Any]:
    """The schedule of a run that starts now (from scratch, or from another run's weights with --init-from)."""
    run: dict[str, Any] = {
        "config": {"arch": args.arch, "n_labels": len(SEG_LABELS), "base": args.base, "levels": args.levels,
                   "max_channels": args.max_channels, "norm": args.norm},
        "crop": args.crop, "seed": args.seed, "lr": args.lr or 2e-3, "freeze_norm_at": args.freeze_norm_at,
        "head_lr_scale": args.head_lr_scale, "dice_weight": args.dice_weight,
        "warmup_steps": int(args.warmup * args.steps),
        "warmup_kinds": [k for k in args.warmup_kinds.split(",") if k],
        "kinds": [k for k in args.kinds.split(",") if k], "init_from": None, "history": [],
    }
    if args.init_from is not None:
        if not args.init_from.is_file():
            ap.error(f"--init-from {args.init_from}: no such file")
        init = torch.load(args.init_from, map_location="cpu", weights_only=False)
        run.update(config=init["config"], crop=init.get("crop", args.crop),
                   init_from={"path": str(args.init_from), "step": int(init["step"])}, init_weights=init["model"])
        print(f"initialised from {args.init_from} (step {init['step']}): network {run['config']}, crop "
              f"{run['crop']}", flush=True)
    return run


def resumed_run(state: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The schedule a resumed run keeps: its network, crop, seed and curriculum. The command line may extend
    --steps (which moves the learning-rate decay and the batch-norm freeze: said in the log) and set --lr."""
    run = {key: state.get(key, default) for key, default in (
        ("config", None), ("crop", None), ("seed", args.seed), ("lr", 2e-3),
        ("freeze_norm_at", args.freeze_norm_at), ("head_lr_scale", args.head_lr_scale), ("dice_weight", 1.0),
        ("warmup_steps", int(args.warmup * args.steps)), ("warmup_kinds", []), ("kinds", []),
        ("init_from", None), ("history", []))}
    if args.lr is not None and args.lr != run["lr"]:
        print(f"note: --lr {args.lr} replaces the run's {run['lr']}", flush=True)
        run["lr"] = args.lr
    if args.steps != state.get("steps_planned", args.steps):
        print(f"note: --steps {args.steps} differs from the {state['steps_planned']} planned before: the "
              f"learning-rate decay and the batch-norm freeze follow the new number", flush=True)
    return run


def trim_log(log_path: Path, step: int) -> None:
    """Drop the rows logged after `step` (a resumed run redoes them)."""
    if not (step and log_path.exists()):
        return
    with open(log_path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]
    with open(log_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    ap, args = parse_args(argv)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    out = args.resume or args.out or train_dir(args.model_id)
    out.mkdir(parents=True, exist_ok=True)
    deadline = dt.datetime.fromisoformat(args.deadline).timestamp() if args.deadline else math.inf
    steps = args.steps
    ckpt = out / "checkpoint.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False) if ckpt.exists() else None
    run = resumed_run(state, args) if state is not None else new_run(args, ap)
    init_weights = run.pop("init_weights", None)
    config, crop = run["config"], run["crop"]
    for option, names in (("--warmup-kinds", run["warmup_kinds"]), ("--kinds", run["kinds"])):
        unknown = set(names) - set(INPUT_KINDS)
        if unknown:
            ap.error(f"{option}: unknown input kinds {sorted(unknown)} (known: {', '.join(INPUT_KINDS)})")
    random.seed(run["seed"])
    np.random.seed(run["seed"])
    torch.manual_seed(run["seed"])
    model = build_network(config)
    head_ids = {id(p) for p in model.heads()}
    opt_groups = [{"params": [p for p in model.parameters() if id(p) not in head_ids], "lr_scale": 1.0},
                  {"params": model.heads(), "lr_scale": run["head_lr_scale"]}]
    step, elapsed = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        step, elapsed = state["step"], state["seconds"]
    elif init_weights is not None:
        model.load_state_dict(init_weights)
    model = model.to(device=device, memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(opt_groups, lr=run["lr"])
    if state is not None:
        if state.get("optimizer") is not None:  # None: a state recovered from exported weights (fresh moments)
            opt.load_state_dict(state["optimizer"])
        opt.param_groups[1]["lr_scale"] = run["head_lr_scale"]  # the schedule kept above
        if "rng" in state:
            set_rng_state(state["rng"])
        print(f"resumed from step {step} ({ckpt})", flush=True)
    coarse = config.get("arch") == "coarse"
    if crop % (2 * model.divisible_by if coarse else model.divisible_by):
        ap.error(f"--crop {crop} must be a multiple of {2 * model.divisible_by if coarse else model.divisible_by}"
                 f" for this network")
    source = training_source(args.data)
    train_maps = label_map_names(source, held_out=False)
    print(f"model {args.model_id}: {count_parameters(model)} parameters, config {config}, crop {crop}, "
          f"device {device}, train maps {train_maps}", flush=True)
    stream = SampleStream(source, crop, run["seed"], step, coarse, tuple(run["warmup_kinds"]), run["warmup_steps"],
                          tuple(run["kinds"]))
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers,
                                              prefetch_factor=2 if args.workers else None))

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    session = {"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": platform.node(),
               "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
               "from_step": step, "to_step": step, "seconds": 0.0}
    history = [*run["history"], session]
    t_session = time.time()

    def state_dict() -> dict:
        session.update(to_step=step, seconds=round(time.time() - t_session, 1))
        return to_cpu({**run, "history": history, "model": model.state_dict(), "optimizer": opt.state_dict(),
                       "step": step, "seconds": elapsed, "steps_planned": steps, "train_maps": train_maps,
                       "rng": rng_state()})

    log_path = out / "training_log.csv"
    trim_log(log_path, step)
    new_log = not log_path.exists()
    with open(log_path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        if new_log:
            writer.writeheader()
        t_last_ckpt = time.time()
        t_start = time.time() - elapsed
        model.train()
        last = min(steps, args.stop_at) if args.stop_at is not None else steps
        while step < last and not stop["now"] and time.time() < deadline:
            if step >= run["freeze_norm_at"] * steps:
                model.freeze_normalization()  # from here on the weights learn what inference computes
            lr = learning_rate(step, steps, run["lr"])
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            sample = next(loader)
            loss, l1, ce, dice = train_step(model, opt, sample, coarse, run["dice_weight"], device)
            step += 1
            elapsed = time.time() - t_start
            writer.writerow({"step": step, "loss": f"{loss:.5f}", "l1": f"{l1:.5f}", "ce": f"{ce:.5f}",
                             "dice": f"{dice:.5f}", "lr": f"{lr:.2e}", "seconds": f"{elapsed:.1f}",
                             "kind": sample.kind})
            if step % 20 == 0:
                fh.flush()
                print(f"step {step} loss {loss:.4f} l1 {l1:.4f} ce {ce:.4f} dice {dice:.4f} lr {lr:.1e} "
                      f"{elapsed:.0f}s", flush=True)
            if step % args.snapshot_every == 0:
                torch.save(to_cpu({"model": model.state_dict(), "step": step, "config": config, "crop": crop}),
                           out / f"weights_step{step:06d}.pt")
            if time.time() - t_last_ckpt > 60 * args.checkpoint_minutes:
                fh.flush()
                save_checkpoint(ckpt, state_dict())
                t_last_ckpt = time.time()
        fh.flush()
    save_checkpoint(ckpt, state_dict())
    print(f"stopped at step {step} after {elapsed:.0f}s", flush=True)


if __name__ == "__main__":
    main()

"""Real-T1 mode of the evaluation (issue 11, point 7): does synthesis beat upsampling?

    python -m inference.training.evaluate_real_t1            # writes the README table between its markers

For a real 1 mm T1 (the shared MPRAGE), the segmenter's labels on the real T1 are the reference. For each input
kind, the T1 is acquired at that kind's slice geometry by the training generator (``acquire``: thick slices,
partial Fourier, noise; back on the 1 mm grid by linear interpolation, i.e. upsampled), then

* **upsampled**: the acquired image itself is segmented (the trivial baseline);
* **sT1**: the kind's default synthesis model (and the general ``synth-t1``) makes an sT1 from it, with the node's
  mirror averaging, and the sT1 is segmented.

Both are scored against the reference like the AutoAlign paper: mean Dice over its structures (the aseg
structures of ``inference.training.evaluate.SUMMARY_STRUCTURES``, lobes counted as cortex), hippocampus Dice and
volume error, and PSNR/SSIM of the image against the real T1 inside the reference brain. The acquisition keeps
the T1 contrast: for the FLAIR and coronal T2 kinds it measures resolution only, and their per-kind models see
a contrast they were not made for (the general model is listed too).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from dicom_node.config import DEFAULT_SEGMENTER, GENERAL_MODEL, default_rules
from inference import metrics
from inference.models import LoadedModel, ModelRegistry
from inference.pipeline import run_model
from inference.segmentation import segment
from inference.training.evaluate import HIPPOCAMPUS, SUMMARY_STRUCTURES, _num
from inference.training.evaluate_segmenter import aseg_view
from inference.training.export import REPO_ROOT
from inference.training.generator import INPUT_KINDS, acquire
from inference.training.train import DEFAULT_SHARED_DATA
from inference.volume import load_series, resample_isotropic

README_START = "<!-- real-t1-metrics:start (written by inference.training.evaluate_real_t1) -->"
README_END = "<!-- real-t1-metrics:end -->"
KIND_RULE = {"aahead_scout": "aahead-scout", "flair": "flair-2d", "cor_t2": "coronal-t2", "t1_2d": "t1-2d",
             "any": "flair-3d"}
PAPER = "AutoAlign paper (sT1 from the scout vs real MPRAGE, FreeSurfer): Dice 0.79–0.93, PSNR 35.4, SSIM 0.871"


def score(labels: np.ndarray, reference: np.ndarray, image: np.ndarray | None, real: np.ndarray) -> dict[str, Any]:
    """Paper-style scores of labels (and an image, 0..1) against the reference labels (and the real T1, 0..1)."""
    pred, ref = aseg_view(labels), aseg_view(reference)
    dice = {c: metrics.dice(ref, pred, c) for c in SUMMARY_STRUCTURES if (ref == c).any() or (pred == c).any()}
    hv_ref = sum(int((ref == c).sum()) for c in HIPPOCAMPUS)
    hv_pred = sum(int((pred == c).sum()) for c in HIPPOCAMPUS)
    out: dict[str, Any] = {
        "dice_mean": float(np.mean(list(dice.values()))),
        "hippocampus_dice": float(np.mean([dice.get(c, 0.0) for c in HIPPOCAMPUS])),
        "hippocampus_volume_error_pct": 100.0 * abs(hv_pred - hv_ref) / hv_ref if hv_ref else None,
        "dice": {str(c): v for c, v in dice.items()},
    }
    if image is not None:
        brain = ref > 0
        out["psnr_db"] = metrics.psnr(real, image, brain, data_range=1.0)
        out["ssim"] = metrics.ssim(real, image, brain, data_range=1.0)
    return out


def _unit(array: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """An image scaled by its 99th percentile inside the brain (scale only), for PSNR/SSIM."""
    return np.clip(array / max(float(np.percentile(array[brain], 99)), 1e-6), 0, 1.5).astype(np.float32)


def evaluate(registry: ModelRegistry, shared_data: Path, kinds: list[str], seed: int) -> dict[str, Any]:
    folder = shared_data / "dicom" / "human_siemens_skyra_mprage"
    series = load_series(sorted(p for p in folder.rglob("*") if p.is_file() and "LICENSE" not in p.name.upper()))
    iso = resample_isotropic(sitk.DICOMOrient(series.image, "LPS"), 1.0)
    segmenter = registry.session(DEFAULT_SEGMENTER)
    reference = sitk.GetArrayFromImage(segment(segmenter, iso).labels)
    array = sitk.GetArrayFromImage(iso)
    brain = reference > 0
    real = _unit(array, brain)
    raw = torch.from_numpy(np.clip(array / np.percentile(array[array > 0], 99.5) * 200.0, 0, None))
    rules = {r.name: r for r in default_rules()}
    results: dict[str, Any] = {}
    for kind in kinds:
        gen = torch.Generator().manual_seed(seed * 1000 + 700 + INPUT_KINDS.index(kind))
        acquired = sitk.GetImageFromArray(acquire(raw, kind, gen).numpy().astype(np.float32))
        acquired.CopyInformation(iso)
        acquired_array = sitk.GetArrayFromImage(acquired)
        entry: dict[str, Any] = {"upsampled": score(sitk.GetArrayFromImage(segment(segmenter, acquired).labels),
                                                    reference, _unit(acquired_array, brain), real)}
        for model_id in dict.fromkeys([rules[KIND_RULE[kind]].model or GENERAL_MODEL, GENERAL_MODEL]):
            model: LoadedModel = registry.session(model_id)
            synthetic = run_model(model, acquired, mirror_average=True).t1
            assert synthetic is not None
            synthetic = sitk.Resample(synthetic, iso, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            labels = sitk.GetArrayFromImage(segment(segmenter, synthetic).labels)
            entry[model_id] = score(labels, reference, _unit(sitk.GetArrayFromImage(synthetic), brain), real)
        results[kind] = entry
        print(kind, json.dumps({k: {m: _num(v.get(m)) for m in ("dice_mean", "hippocampus_dice")}
                                for k, v in entry.items()}), flush=True)
    return results


def table(results: dict[str, Any], info: dict[str, Any]) -> str:
    lines = [README_START, "",
             f"Measured {info['evaluated']} by `{info['command']}` on the shared MPRAGE (a 3-year-old; the only real "
             "1 mm T1 here), each kind's slice geometry with T1 contrast; reference: the segmenter "
             f"(`{DEFAULT_SEGMENTER}`) on the real T1.", "",
             "| input kind | image segmented | mean Dice (paper's structures) | hippocampus Dice | "
             "hippocampal volume error % | PSNR dB | SSIM |",
             "|---|---|---|---|---|---|---|"]
    for kind, entry in results.items():
        for name, row in entry.items():
            what = "real T1 at the kind's slices, upsampled" if name == "upsampled" else f"sT1 by `{name}`"
            lines.append(f"| {kind} | {what} | {_num(row['dice_mean'])} | {_num(row['hippocampus_dice'])} | "
                         f"{_num(row['hippocampus_volume_error_pct'], 1)} | {_num(row.get('psnr_db'), 1)} | "
                         f"{_num(row.get('ssim'))} |")
    lines += [f"| – | {PAPER} | 0.79–0.93 | – | – | 35.4 | 0.871 |", "", README_END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "onnx_models")
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA)
    parser.add_argument("--kinds", default=",".join(INPUT_KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "real-t1-evaluation.json")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    registry = ModelRegistry(args.models, providers="cpu", threads=args.threads)
    results = evaluate(registry, args.shared_data, kinds, args.seed)
    info = {"evaluated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "seed": args.seed,
            "command": "python -m inference.training.evaluate_real_t1"
            + (f" --kinds {args.kinds}" if kinds != list(INPUT_KINDS) else "")}
    args.out.write_text(json.dumps({"info": info, "results": results}, indent=1, default=float) + "\n")
    text = args.readme.read_text(encoding="utf-8")
    if README_START in text and README_END in text:
        start, end = text.index(README_START), text.index(README_END) + len(README_END)
        args.readme.write_text(text[:start] + table(results, info) + text[end:], encoding="utf-8")
    print(table(results, info))


if __name__ == "__main__":
    main()

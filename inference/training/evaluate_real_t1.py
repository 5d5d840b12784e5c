"""Real-T1 mode of the evaluation (issue 11, points 5 and 7): does synthesis beat upsampling?

    python -m inference.training.evaluate_real_t1            # writes the README table between its markers

For a real 1 mm T1 (the shared MPRAGE), the segmenter's labels on the real T1 are the reference. Each input kind
is simulated from it in two contrasts:

* **T1**: the real T1 itself, acquired at the kind's slice geometry by the training generator (``acquire``: thick
  slices, partial Fourier, noise; back on the 1 mm grid by linear interpolation, i.e. upsampled);
* **kind**: the reference label map driven through the generator at the kind's contrast (``kind_contrast``: the
  kind's random per-label intensities inside the brain; outside it, where the segmenter has no labels, the real
  T1 scaled to the kind's white-matter level), bias field, then the same acquisition.

For each, three things are scored:

* **upsampled**: the acquired image itself is segmented (the trivial baseline);
* **sT1**: the kind's default synthesis model (and the general ``synth-t1``) makes an sT1 from it, with the node's
  mirror averaging, and the sT1 is segmented by the segmenter;
* **own head**: the synthesis model's own segmentation output (its 33 aseg labels), which the node measures
  instead when ``[inference] segmenter`` is empty.

All are scored against the reference like the AutoAlign paper: mean Dice over its structures (the aseg
structures of ``inference.training.evaluate.SUMMARY_STRUCTURES``, lobes counted as cortex), hippocampus Dice and
volume error, and PSNR/SSIM of the image against the real T1 inside the reference brain (T1 contrast only: an
image of another contrast has no PSNR against a T1).
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
from inference.labels import aseg_view
from inference.models import LoadedModel, ModelRegistry
from inference.pipeline import run_model
from inference.segmentation import segment
from inference.training.evaluate import HIPPOCAMPUS, SUMMARY_STRUCTURES, _num
from inference.training.export import REPO_ROOT
from inference.training.generator import (
    INPUT_KINDS,
    Priors,
    acquire,
    bias_field,
    load_priors,
    sample_contrast,
    synthseg_dir,
)
from inference.training.train import DEFAULT_SHARED_DATA
from inference.volume import load_series, resample_isotropic

README_START = "<!-- real-t1-metrics:start (written by inference.training.evaluate_real_t1) -->"
README_END = "<!-- real-t1-metrics:end -->"
KIND_RULE = {"aahead_scout": "aahead-scout", "flair": "flair-2d", "cor_t2": "coronal-t2", "t1_2d": "t1-2d",
             "any": "flair-3d"}
PAPER = "AutoAlign paper (sT1 from the scout vs real MPRAGE, FreeSurfer): Dice 0.79–0.93, PSNR 35.4, SSIM 0.871"


def score(labels: np.ndarray, reference: np.ndarray, image: np.ndarray | None = None,
          real: np.ndarray | None = None) -> dict[str, Any]:
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
    if image is not None and real is not None:
        brain = ref > 0
        out["psnr_db"] = metrics.psnr(real, image, brain, data_range=1.0)
        out["ssim"] = metrics.ssim(real, image, brain, data_range=1.0)
    return out


CONTRASTS = ("T1", "kind")


def generation_index(reference_aseg: np.ndarray, priors: Priors) -> np.ndarray:
    """The generator's label indices of an aseg-coded label map (codes the generator does not know, and the
    background, index 0)."""
    lut = np.zeros(int(max(priors.generation_labels.max(), reference_aseg.max())) + 1, dtype=np.int64)
    lut[priors.generation_labels] = np.arange(len(priors.generation_labels))
    return lut[reference_aseg]


def kind_contrast(real255: torch.Tensor, index: np.ndarray, kind: str, priors: Priors,
                  gen: torch.Generator) -> torch.Tensor:
    """A 1 mm image (0..255 scale) of the head at `kind`'s contrast, before acquisition: inside the brain the
    generator's random per-label intensities; outside it the real T1 scaled to the kind's white-matter level."""
    means, stds = sample_contrast(kind, priors, gen)
    idx = torch.from_numpy(index)
    brain = idx > 0
    wm = int(np.nonzero(priors.generation_labels == 2)[0][0])
    real_wm = float(real255[idx == wm].median()) if bool((idx == wm).any()) else 1.0
    outside = real255 * (float(means[wm]) / max(real_wm, 1e-6))
    img = torch.where(brain, means[idx] + stds[idx] * torch.randn(idx.shape, generator=gen), outside)
    return img.clamp(min=0) * bias_field(tuple(idx.shape), gen, 0.2)


def _unit(array: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """An image scaled by its 99th percentile inside the brain (scale only), for PSNR/SSIM."""
    return np.clip(array / max(float(np.percentile(array[brain], 99)), 1e-6), 0, 1.5).astype(np.float32)


def _score_models(entry: dict[str, Any], registry: ModelRegistry, segmenter: LoadedModel, model_ids: list[str],
                  acquired: sitk.Image, iso: sitk.Image, reference: np.ndarray, brain: np.ndarray,
                  real: np.ndarray | None) -> None:
    """Add the sT1 and own-head scores of each synthesis model to `entry`."""
    for model_id in model_ids:
        model: LoadedModel = registry.session(model_id)
        result = run_model(model, acquired, mirror_average=True)
        assert result.t1 is not None
        synthetic = sitk.Resample(result.t1, iso, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        labels = sitk.GetArrayFromImage(segment(segmenter, synthetic).labels)
        image = None if real is None else _unit(sitk.GetArrayFromImage(synthetic), brain)
        entry[model_id] = score(labels, reference, image, real)
        if result.labels is not None:
            own = sitk.Resample(result.labels, iso, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
            entry[f"{model_id} (own head)"] = score(sitk.GetArrayFromImage(own), reference)


def evaluate(registry: ModelRegistry, shared_data: Path, kinds: list[str], seed: int,
             contrasts: tuple[str, ...] = CONTRASTS, with_general: bool = True) -> dict[str, Any]:
    folder = shared_data / "dicom" / "human_siemens_skyra_mprage"
    series = load_series(sorted(p for p in folder.rglob("*") if p.is_file() and "LICENSE" not in p.name.upper()))
    iso = resample_isotropic(sitk.DICOMOrient(series.image, "LPS"), 1.0)
    segmenter = registry.session(DEFAULT_SEGMENTER)
    reference = sitk.GetArrayFromImage(segment(segmenter, iso).labels)
    array = sitk.GetArrayFromImage(iso)
    brain = reference > 0
    real = _unit(array, brain)
    raw = torch.from_numpy(np.clip(array / np.percentile(array[array > 0], 99.5) * 200.0, 0, None))
    priors = load_priors(synthseg_dir(shared_data))
    # the callosum (192) is white matter to the generator; the side does not change its intensity
    index = generation_index(aseg_view(np.where(reference == 192, 2, reference)), priors)
    rules = {r.name: r for r in default_rules()}
    results: dict[str, Any] = {}
    for contrast in contrasts:
        for kind in kinds:
            gen = torch.Generator().manual_seed(seed * 1000 + 700 + INPUT_KINDS.index(kind))
            head = raw if contrast == "T1" else kind_contrast(raw, index, kind, priors, gen)
            acquired = sitk.GetImageFromArray(acquire(head, kind, gen).numpy().astype(np.float32))
            acquired.CopyInformation(iso)
            t1_real = real if contrast == "T1" else None
            labels = sitk.GetArrayFromImage(segment(segmenter, acquired).labels)
            image = None if t1_real is None else _unit(sitk.GetArrayFromImage(acquired), brain)
            entry: dict[str, Any] = {"upsampled": score(labels, reference, image, t1_real)}
            model_ids = list(dict.fromkeys([rules[KIND_RULE[kind]].model or GENERAL_MODEL]
                                           + ([GENERAL_MODEL] if with_general else [])))
            _score_models(entry, registry, segmenter, model_ids, acquired, iso, reference, brain, t1_real)
            results[f"{kind} ({contrast} contrast)"] = entry
            print(kind, contrast, json.dumps({k: {m: _num(v.get(m)) for m in ("dice_mean", "hippocampus_dice")}
                                              for k, v in entry.items()}), flush=True)
    return results


def merged_rows(previous: dict[str, Any]) -> dict[str, Any]:
    """The results of an earlier evaluation file, with their date on each row (files before the two contrasts
    named a kind's T1-contrast rows by the kind alone)."""
    date = previous.get("info", {}).get("evaluated")
    out: dict[str, Any] = {}
    for key, entry in previous.get("results", {}).items():
        name = key if key.endswith(" contrast)") else f"{key} (T1 contrast)"
        out[name] = {model: {**row, "evaluated": row.get("evaluated", date)} for model, row in entry.items()}
    return out


def table(results: dict[str, Any], info: dict[str, Any]) -> str:
    lines = [README_START, "",
             f"Last run {info['evaluated']}: `{info['command']}`, on the shared MPRAGE (a 3-year-old; the only real "
             "1 mm T1 here), each kind's slice geometry in T1 contrast (the real T1) and in the kind's contrast (the "
             f"reference labels through the generator); reference: the segmenter (`{DEFAULT_SEGMENTER}`) on the real "
             "T1. \"own head\": the synthesis model's own labels instead of the segmenter on its sT1.", "",
             "| input kind (contrast) | labels from | mean Dice (paper's structures) | hippocampus Dice | "
             "hippocampal volume error % | PSNR dB | SSIM | measured |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, entry in results.items():
        for name, row in entry.items():
            if name == "upsampled":
                what = "segmenter on the input, upsampled (baseline)"
            elif name.endswith(" (own head)"):
                what = f"own head of `{name.removesuffix(' (own head)')}`"
            else:
                what = f"segmenter on the sT1 by `{name}`"
            lines.append(f"| {kind} | {what} | {_num(row['dice_mean'])} | {_num(row['hippocampus_dice'])} | "
                         f"{_num(row['hippocampus_volume_error_pct'], 1)} | {_num(row.get('psnr_db'), 1)} | "
                         f"{_num(row.get('ssim'))} | {row.get('evaluated', info['evaluated'])} |")
    lines += [f"| – | {PAPER} | 0.79–0.93 | – | – | 35.4 | 0.871 | – |", "", README_END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "onnx_models")
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA)
    parser.add_argument("--kinds", default=",".join(INPUT_KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contrasts", default=",".join(CONTRASTS), help="T1, kind or both")
    parser.add_argument("--no-general", action="store_true",
                        help="only each kind's default model (without the general synth-t1 beside it)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of --out that this run does not measure (each row says when it was)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "real-t1-evaluation.json")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    registry = ModelRegistry(args.models, providers="cpu", threads=args.threads)
    contrasts = tuple(c for c in args.contrasts.split(",") if c)
    if set(contrasts) - set(CONTRASTS):
        parser.error(f"--contrasts: one or more of {', '.join(CONTRASTS)}")
    results = evaluate(registry, args.shared_data, kinds, args.seed, contrasts, not args.no_general)
    info = {"evaluated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "seed": args.seed,
            "command": "python -m inference.training.evaluate_real_t1"
            + (f" --kinds {args.kinds}" if kinds != list(INPUT_KINDS) else "")
            + (f" --contrasts {args.contrasts}" if contrasts != CONTRASTS else "")
            + (" --no-general" if args.no_general else "") + (" --merge" if args.merge else "")}
    for entry in results.values():
        for row in entry.values():
            row["evaluated"] = info["evaluated"]
    if args.merge and args.out.exists():
        results = {**merged_rows(json.loads(args.out.read_text())), **results}
    args.out.write_text(json.dumps({"info": info, "results": results}, indent=1, default=float) + "\n")
    text = args.readme.read_text(encoding="utf-8")
    if README_START in text and README_END in text:
        start, end = text.index(README_START), text.index(README_END) + len(README_END)
        args.readme.write_text(text[:start] + table(results, info) + text[end:], encoding="utf-8")
    print(table(results, info))


if __name__ == "__main__":
    main()

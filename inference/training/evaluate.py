"""Evaluate an exported model through the node's own pipeline (inference.pipeline.run_model, onnxruntime).

python -m inference.training.evaluate --model onnx_models/synth-t1

1. Held-out label maps (generator.HELD_OUT, never trained on): each input kind is simulated with a fixed seed;
   PSNR and SSIM of the synthetic T1 inside the brain against the generator's T1 target, Dice and volume ASPC
   per structure against the ground-truth labels.
2. The shared real MPRAGE (a 3-year-old child): reference = the model's segmentation of the real 1 mm MPRAGE;
   each input kind's resolution/noise (not its contrast) is simulated from it, synthesized, and the synthetic T1
   is segmented again by the same model; Dice and ASPC against the reference.
Writes metrics.json next to the model, the manifest's [metrics] and the metrics table of MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from inference import labels, metrics
from inference.labels import LR_SWAP, by_code
from inference.models import LoadedModel, ModelRegistry, load_manifest
from inference.pipeline import run_model
from inference.training.export import REPO_ROOT, dump_toml
from inference.training.generator import (
    HELD_OUT,
    INPUT_KINDS,
    SEG_LABELS,
    acquire,
    label_map_paths,
    load_label_map,
    load_priors,
    simulate_input,
    synthseg_dir,
    target_t1,
)
from inference.training.train import DEFAULT_SHARED_DATA
from inference.volume import load_series, resample_isotropic

MPRAGE_DIR = ("dicom", "human_siemens_skyra_mprage")
CARD_START = "<!-- metrics:start (written by inference.training.evaluate) -->"
CARD_END = "<!-- metrics:end -->"
HIPPOCAMPUS = tuple(labels.HIPPOCAMPUS.values())  # (left, right)
HEAD_MARGIN = 8  # voxels of background added around the held-out head
# The "major structures" of the AutoAlign paper's Table 2 (thalamus, caudate, putamen, pallidum, hippocampus,
# amygdala, cerebral WM, cortex, lateral ventricle L/R; 3rd and 4th ventricle): the summary Dice.
SUMMARY_STRUCTURES = (10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 2, 41, 3, 42, 4, 43, 14, 15)


# ---------------------------------------------------------------------------------------------- metrics


def _brain_box(mask: np.ndarray, margin: int = 6) -> tuple[slice, ...]:
    nz = np.nonzero(mask)
    return tuple(slice(max(0, int(a.min()) - margin), int(a.max()) + 1 + margin) for a in nz)


def image_metrics(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float | None]:
    """PSNR and SSIM (inference.metrics, data range 1) of a 0..1 synthetic T1 inside `mask`; computed on the
    mask's bounding box plus a margin wider than the SSIM window, which gives the same values faster."""
    if not mask.any():
        return {"psnr_db": None, "ssim": None}
    box = _brain_box(mask)
    p, t, m = pred[box], target[box], mask[box]
    return {"psnr_db": metrics.psnr(t, p, m, data_range=1.0), "ssim": metrics.ssim(t, p, m, data_range=1.0)}


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def label_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Dice and ASPC per structure (codes of SEG_LABELS except 0) plus summaries."""
    per_dice = {str(c): _finite(metrics.dice(truth, pred, c)) for c in SEG_LABELS[1:]}
    per_aspc = {}
    for c in SEG_LABELS[1:]:
        vt, vp = int((truth == c).sum()), int((pred == c).sum())
        per_aspc[str(c)] = metrics.aspc(vt, vp) if vt + vp else None
    summary = [per_dice[str(c)] for c in SUMMARY_STRUCTURES if per_dice[str(c)] is not None]
    all_present = [v for v in per_dice.values() if v is not None]
    hippo = [per_aspc[str(c)] for c in HIPPOCAMPUS if per_aspc[str(c)] is not None]
    return {
        "dice": per_dice,
        "aspc_pct": per_aspc,
        "dice_mean_all": float(np.mean(all_present)) if all_present else None,
        "dice_major": float(np.mean(summary)) if summary else None,
        "hippocampus_dice": float(np.mean([per_dice[str(c)] or 0.0 for c in HIPPOCAMPUS])),
        "hippocampus_aspc_pct": float(np.mean(hippo)) if hippo else None,
    }


# ---------------------------------------------------------------------------------------------- running


def lps_image(array: np.ndarray, reference: sitk.Image | None = None) -> sitk.Image:
    """A float32 sitk image of an LPS [k, j, i] array: 1 mm, identity direction, or the reference's geometry."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    if reference is not None:
        img.CopyInformation(reference)
    return img


def predict(model: LoadedModel, image: sitk.Image) -> tuple[np.ndarray, np.ndarray, float]:
    """(synthetic T1 in 0..1, FreeSurfer label codes, seconds) on the grid of a 1 mm LPS `image`."""
    t0 = time.perf_counter()
    res = run_model(model, image)
    seconds = time.perf_counter() - t0
    assert res.t1 is not None and res.labels is not None and model.manifest.output.image is not None
    t1 = sitk.Resample(res.t1, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    labels = sitk.Resample(res.labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    scale = model.manifest.output.image.scale
    return sitk.GetArrayFromImage(t1) / scale, sitk.GetArrayFromImage(labels).astype(np.int64), seconds


def evaluate_held_out(model: LoadedModel, root: Path, kinds: list[str], seed: int,
                      n_maps: int | None = None) -> dict[str, Any]:
    """Metrics per held-out label map and input kind (synthetic inputs, generator seed fixed)."""
    priors = load_priors(root)
    seg_codes = np.asarray(SEG_LABELS)
    out: dict[str, Any] = {}
    for m, path in enumerate(label_map_paths(root, held_out=True)[:n_maps]):
        name = path.name.removesuffix(".nii.gz")
        # the map is cropped to the head: give it a rim of air, as a real field of view has
        index = torch.from_numpy(np.pad(load_label_map(path, priors).astype(np.int64), HEAD_MARGIN))
        truth = seg_codes[priors.seg_index[index.numpy()]]
        target = target_t1(index, priors).numpy()
        brain = truth > 0
        out[name] = {}
        for _k, kind in enumerate(kinds):
            gen = torch.Generator().manual_seed(seed * 1000 + 10 * m + INPUT_KINDS.index(kind))
            raw = simulate_input(index, kind, priors, gen).numpy()
            t1, labels, seconds = predict(model, lps_image(raw))
            entry: dict[str, Any] = {**image_metrics(t1, target, brain), "seconds": seconds}
            entry.update(label_metrics(labels, truth))
            out[name][kind] = entry
            print(f"held-out {name} {kind}: PSNR {_num(entry['psnr_db'])} SSIM {_num(entry['ssim'])} "
                  f"Dice(major) {_num(entry['dice_major'])} "
                  f"hippocampus ASPC {_num(entry['hippocampus_aspc_pct'])}% ({seconds:.1f} s)", flush=True)
    return out


def evaluate_mprage(model: LoadedModel, shared_data: Path, kinds: list[str], seed: int,
                    segmenter: LoadedModel | None = None) -> dict[str, Any]:
    """Consistency on the real MPRAGE: segmentation of the synthetic T1 from each simulated kind vs. the
    segmentation of the real MPRAGE, both by the same segmenter (`segmenter`, default the model itself: a
    per-kind model is not made for T1 input, so its own segmentation of a T1 is no reference)."""
    segmenter = segmenter or model
    folder = shared_data.joinpath(*MPRAGE_DIR)
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in ("", ".dcm")
                   and "LICENSE" not in p.name.upper())
    series = load_series(paths)
    iso = resample_isotropic(sitk.DICOMOrient(series.image, "LPS"), 1.0)
    ref_t1, ref_labels, seconds = predict(segmenter, iso)
    brain = ref_labels > 0
    arr = sitk.GetArrayFromImage(iso).astype(np.float32)
    nonzero = arr[arr > 0]
    raw = torch.from_numpy(np.clip(arr / np.percentile(nonzero, 99.5) * 200.0, 0, None))
    out: dict[str, Any] = {"reference": {"segmenter": segmenter.manifest.id, "seconds": seconds,
                                         "size": list(iso.GetSize()),
                                         "structures_found": int(len(np.unique(ref_labels)) - 1)}}
    print(f"MPRAGE reference segmentation: {out['reference']}", flush=True)
    for kind in kinds:
        gen = torch.Generator().manual_seed(seed * 1000 + 500 + INPUT_KINDS.index(kind))
        sim = acquire(raw, kind, gen).numpy()
        t1, direct_labels, _ = predict(model, lps_image(sim, iso))
        _, resynth_labels, _ = predict(segmenter, lps_image(t1, iso))
        consistency = image_metrics(t1, ref_t1, brain)
        entry = {"psnr_db_vs_reference_t1": consistency["psnr_db"], "ssim_vs_reference_t1": consistency["ssim"],
                 "synthetic_t1_segmented": label_metrics(resynth_labels, ref_labels),
                 "direct_segmentation": label_metrics(direct_labels, ref_labels)}
        out[kind] = entry
        s = entry["synthetic_t1_segmented"]
        print(f"MPRAGE {kind}: Dice(major) {_num(s['dice_major'])} "
              f"hippocampus ASPC {_num(s['hippocampus_aspc_pct'])}%", flush=True)
    return out


def timing_192(model: LoadedModel) -> float:
    """Seconds of run_model on a 192^3 1 mm volume (whole pipeline, the registry's thread setting)."""
    rng = np.random.default_rng(0)
    img = lps_image(rng.random((192, 192, 192), dtype=np.float32))
    run_model(model, lps_image(np.ones((32, 32, 32), np.float32)))  # warm-up
    t0 = time.perf_counter()
    run_model(model, img)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- reporting


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return round(float(np.mean(vals)), 4) if vals else None


def summarise(results: dict[str, Any], kinds: list[str]) -> dict[str, Any]:
    """Per-kind means over held-out maps, and MPRAGE consistency, as flat tables for the manifest."""
    summary: dict[str, Any] = {}
    held = results.get("held_out", {})
    for kind in kinds:
        rows = [held[m][kind] for m in held if kind in held[m]]
        if rows:
            summary[f"held_out_{kind}"] = {
                "psnr_db": _mean([r["psnr_db"] for r in rows]),
                "ssim": _mean([r["ssim"] for r in rows]),
                "dice_major": _mean([r["dice_major"] for r in rows]),
                "dice_all_structures": _mean([r["dice_mean_all"] for r in rows]),
                "hippocampus_dice": _mean([r["hippocampus_dice"] for r in rows]),
                "hippocampus_aspc_pct": _mean([r["hippocampus_aspc_pct"] for r in rows]),
            }
        mp = results.get("mprage", {}).get(kind)
        if mp:
            s = mp["synthetic_t1_segmented"]
            summary[f"mprage_{kind}"] = {
                "dice_major": _mean([s["dice_major"]]),
                "dice_all_structures": _mean([s["dice_mean_all"]]),
                "hippocampus_dice": _mean([s["hippocampus_dice"]]),
                "hippocampus_aspc_pct": _mean([s["hippocampus_aspc_pct"]]),
                "direct_dice_major": _mean([mp["direct_segmentation"]["dice_major"]]),
            }
    return summary


def _num(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_rows(summary: dict[str, Any], *, held_out_label: str, mprage_label: str,
                 all_structures: bool) -> list[str]:
    """Markdown rows of the summary: held-out kinds first, then the real-MPRAGE kinds ({kind} in the labels)."""
    rows = []
    for prefix, label in (("held_out_", held_out_label), ("mprage_", mprage_label)):
        for key, row in summary.items():
            if not key.startswith(prefix):
                continue
            image = [_num(row["psnr_db"], 2), _num(row["ssim"])] if prefix == "held_out_" else ["–", "–"]
            dice = [_num(row["dice_major"])] + ([_num(row["dice_all_structures"])] if all_structures else [])
            cells = [label.format(kind=key[len(prefix):]), *image, *dice, _num(row["hippocampus_dice"]),
                     _num(row["hippocampus_aspc_pct"], 1)]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def card_table(summary: dict[str, Any], info: dict[str, Any], results: dict[str, Any] | None = None) -> str:
    """Markdown table of the summary (the generated part of MODEL_CARD.md)."""
    lines = [CARD_START, "",
             f"Evaluated {info['evaluated']} on checkpoint step {info.get('train_step', '?')}; "
             f"held-out maps {', '.join(info['held_out_maps'])}; seed {info['seed']}. "
             f"192³ volume through the node pipeline: {_num(info.get('seconds_192'), 1)} s "
             f"({info.get('threads')} onnxruntime threads, shared 2-core machine).", "",
             "| input (simulated) | PSNR dB (brain) | SSIM (brain) | Dice major structures | Dice all 32 | "
             "hippocampus Dice | hippocampus ASPC % |",
             "|---|---|---|---|---|---|---|",
             *summary_rows(summary, held_out_label="held-out maps: {kind}", all_structures=True,
                           mprage_label="real MPRAGE → {kind} → synthetic T1 → seg, vs seg of real MPRAGE")]
    if info.get("mprage_segmenter"):
        lines += ["", f"Real MPRAGE rows: both segmentations by `{info['mprage_segmenter']}` (this model is made for "
                      f"its input kind, not for the T1 it is checked on)."]
    kinds = info.get("kinds") or ["aahead_scout"]
    lines += ["", *structure_table(results or {}, "aahead_scout" if "aahead_scout" in kinds else kinds[0]), "",
              CARD_END]
    return "\n".join(lines)


def structure_table(results: dict[str, Any], kind: str) -> list[str]:
    """Per-structure Dice and ASPC for one input kind, laid out like Table 2 of the AutoAlign paper: held-out maps
    (mean over maps, against the true labels) and the real MPRAGE (synthetic T1 segmented vs. the real MPRAGE
    segmented by the same model)."""
    held = [results["held_out"][m][kind] for m in results.get("held_out", {}) if kind in results["held_out"][m]]
    mp = results.get("mprage", {}).get(kind, {}).get("synthetic_t1_segmented")
    if not held and not mp:
        return []

    def cell(rows: list[dict[str, Any]], field: str, code: int, nd: int) -> str:
        vals = [r[field][str(code)] for r in rows if r[field].get(str(code)) is not None]
        return f"{np.mean(vals):.{nd}f}" if vals else "–"

    lines = [f"Per structure, input `{kind}` (Dice / volume ASPC %; left, right):", "",
             "| structure | held-out Dice L | R | held-out ASPC % L | R | MPRAGE Dice L | R | MPRAGE ASPC % L | R |",
             "|---|---|---|---|---|---|---|---|---|"]
    seen: set[int] = set()
    for code in SEG_LABELS[1:]:
        if code in seen:
            continue
        st = by_code(code)
        partner = LR_SWAP.get(code, code)
        seen |= {code, partner}
        left, right = (code, partner) if st.laterality != "R" else (partner, code)
        name = st.display_name.removeprefix("Left ").removeprefix("Right ")
        mps = [mp] if mp else []
        row = [cell(held, "dice", left, 2), cell(held, "dice", right, 2) if right != left else "",
               cell(held, "aspc_pct", left, 1), cell(held, "aspc_pct", right, 1) if right != left else "",
               cell(mps, "dice", left, 2), cell(mps, "dice", right, 2) if right != left else "",
               cell(mps, "aspc_pct", left, 1), cell(mps, "aspc_pct", right, 1) if right != left else ""]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def update_outputs(model_dir: Path, results: dict[str, Any], summary: dict[str, Any], info: dict[str, Any]) -> None:
    """Write metrics.json, the manifest's [metrics] and the card's metrics section."""
    (model_dir / "metrics.json").write_text(json.dumps({"info": info, "summary": summary, "results": results},
                                                       indent=1, default=float), encoding="utf-8")
    manifest_path = model_dir / "manifest.toml"
    data = tomllib.loads(manifest_path.read_text(encoding="utf-8"))
    flat_info = {k: v for k, v in info.items() if isinstance(v, (str, int, float, list)) and v is not None}
    data["metrics"] = {"info": flat_info,
                       **{k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in summary.items()}}
    manifest_path.write_text(dump_toml(data), encoding="utf-8")
    load_manifest(manifest_path)  # still valid
    replace_card_metrics(model_dir, card_table(summary, info, results))
    readme = REPO_ROOT / "README.md"
    if model_dir.parent == REPO_ROOT / "onnx_models" and readme.is_file():
        update_readme(readme, model_dir.parent)


def replace_card_metrics(model_dir: Path, section: str) -> None:
    """Put ``section`` between the metrics markers of the model's MODEL_CARD.md (appended when it has none)."""
    card = model_dir / "MODEL_CARD.md"
    text = card.read_text(encoding="utf-8") if card.exists() else f"# {model_dir.name}\n\n## Metrics\n\n"
    if CARD_START in text and CARD_END in text:
        text = text[: text.index(CARD_START)] + section + text[text.index(CARD_END) + len(CARD_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    card.write_text(text, encoding="utf-8")


README_START = "<!-- model-metrics:start (written by inference.training.evaluate) -->"
README_END = "<!-- model-metrics:end -->"
PAPER = "AutoAlign paper (real patients, FreeSurfer): PSNR 35.4, SSIM 0.871, Dice 0.79–0.93, hippocampal ASPC 5.5–6.2 %"


def update_readme(readme: Path, models_dir: Path) -> None:
    """The README's table of every bundled model's measured quality (from each bundle's metrics.json, the general
    `synth-t1` first), next to the AutoAlign paper's numbers."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return
    bundles = sorted((p.parent for p in models_dir.glob("*/metrics.json")  # synthesis models (a segmenter's
                      if "kinds" in json.loads(p.read_text(encoding="utf-8"))["info"]),  # metrics have no kinds)
                     key=lambda d: (d.name != "synth-t1", d.name))
    lines = [README_START, ""]
    rows: list[str] = []
    for bundle in bundles:
        recorded = json.loads((bundle / "metrics.json").read_text(encoding="utf-8"))
        info, model_id = recorded["info"], bundle.name
        command = f"python -m inference.training.evaluate --model onnx_models/{model_id}"
        if len(info["kinds"]) == 1:
            command += f" --kinds {info['kinds'][0]}"
        if info.get("mprage_segmenter"):
            command += f" --segmenter onnx_models/{info['mprage_segmenter']}"
        lines.append(f"- `{model_id}`: evaluated {info['evaluated']} (checkpoint step {info.get('train_step', '?')}) "
                     f"by `{command}`")
        rows += summary_rows(recorded["summary"], held_out_label=f"`{model_id}` | held-out label maps, {{kind}}",
                             all_structures=False, mprage_label=f"`{model_id}` | real MPRAGE (child) → {{kind}}, "
                                                                "consistency")
    lines += ["", "| model | input (simulated) | PSNR dB | SSIM | Dice major structures | hippocampus Dice | "
                  "hippocampus ASPC % |",
              "|---|---|---|---|---|---|---|", *rows,
              f"| – | {PAPER} | 35.4 | 0.871 | 0.79–0.93 | – | 5.5–6.2 |", "", README_END]
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + "\n".join(lines) + text[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=None, help="onnx_models/<id>")
    ap.add_argument("--readme-only", action="store_true",
                    help="evaluate nothing: rewrite the README's table from the bundled models' metrics.json")
    ap.add_argument("--data", type=Path, default=DEFAULT_SHARED_DATA, help="the shared data folder")
    ap.add_argument("--kinds", default=",".join(INPUT_KINDS))
    ap.add_argument("--maps", type=int, default=None, help="only the first N held-out maps (quick check)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-mprage", action="store_true")
    ap.add_argument("--segmenter", type=Path, default=None,
                    help="the model (onnx_models/<id>) that segments the real MPRAGE and the synthetic T1s for the "
                         "consistency check (default: the evaluated model; give the general model for a per-kind one)")
    ap.add_argument("--train-step", type=int, default=None,
                    help="recorded in the metrics (default: the step the export wrote into the manifest)")
    args = ap.parse_args(argv)
    if args.readme_only:
        update_readme(REPO_ROOT / "README.md", REPO_ROOT / "onnx_models")
        return
    if args.model is None:
        ap.error("--model is required (or --readme-only)")

    kinds = [k for k in args.kinds.split(",") if k]
    model_dir = args.model.resolve()
    registry = ModelRegistry(model_dir.parent, providers="cpu", threads=args.threads)
    model = registry.session(model_dir.name)
    info: dict[str, Any] = {
        "evaluated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "held_out_maps": list(HELD_OUT[: args.maps] if args.maps else HELD_OUT), "seed": args.seed,
        "kinds": kinds, "threads": args.threads, "pipeline": "inference.pipeline.run_model",
    }
    exported = load_manifest(model_dir / "manifest.toml").metrics.get("info", {}).get("train_step")
    train_step = args.train_step if args.train_step is not None else exported
    if train_step is not None:
        info["train_step"] = train_step
    info["seconds_192"] = round(timing_192(model), 2)
    print(f"192^3 through the pipeline: {info['seconds_192']} s", flush=True)
    results: dict[str, Any] = {"held_out": evaluate_held_out(model, synthseg_dir(args.data), kinds, args.seed,
                                                             args.maps)}
    if not args.no_mprage and args.data.joinpath(*MPRAGE_DIR).is_dir():
        segmenter = None
        if args.segmenter is not None:
            seg_dir = args.segmenter.resolve()
            seg_registry = (registry if seg_dir.parent == model_dir.parent
                            else ModelRegistry(seg_dir.parent, providers="cpu", threads=args.threads))
            segmenter = seg_registry.session(seg_dir.name)
            info["mprage_segmenter"] = segmenter.manifest.id
        results["mprage"] = evaluate_mprage(model, args.data, kinds, args.seed, segmenter)
    summary = summarise(results, kinds)
    update_outputs(model_dir, results, summary, info)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

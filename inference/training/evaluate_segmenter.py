"""Measure a bundled segmenter and write its metrics.json, manifest [metrics] and the card's metrics section.

    python -m inference.training.evaluate_segmenter --model onnx_models/brainchop-aparc-aseg

* **Label maps**: the 20 SynthSeg whole-head label maps (none of them seen by the segmenter, which was trained by the
  brainchop project on real T1s) rendered as MPRAGE-like T1s (the generator's T1 target: fixed T1 class means,
  light partial-volume blur) and segmented through the node's own code (``inference.segmentation.segment``);
  Dice and volume ASPC per aseg structure against the map (lobes counted as cortex; the corpus callosum, which
  SynthSeg codes as white matter, left out of both), intracranial volume against the map's (every code 1..99).
* **Real MPRAGE** (the shared child scan): every measured structure's volume, QC, ICV, and the left-right mirror
  check (each structure's volume on the head mirrored in patient space against its counterpart's).
* Seconds of one segmentation on 2 onnxruntime threads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from inference.labels import LR_SWAP, STRUCTURES, aseg_view, by_code
from inference.models import LoadedModel, ModelRegistry
from inference.segmentation import segment
from inference.training.evaluate import (
    CARD_END,
    CARD_START,
    HEAD_MARGIN,
    _num,
    label_metrics,
    replace_card_metrics,
)
from inference.training.export import dump_toml
from inference.training.generator import SEG_LABELS, label_map_paths, load_label_map, load_priors, target_t1
from inference.training.train import DEFAULT_SHARED_DATA
from inference.volume import load_series, mirror_left_right
from inference.volumetry import compute_volumetry, required_structures

MPRAGE_DIR = ("dicom", "human_siemens_skyra_mprage")


def mirror_differences(model: LoadedModel, image: sitk.Image) -> dict[str, float]:
    """Per structure: |volume on the mirrored head of its counterpart - its volume| / its volume, in %."""
    def volumes(img: sitk.Image) -> dict[int, int]:
        labels = segment(model, img).labels  # keep the image alive while its array is read
        values, counts = np.unique(sitk.GetArrayFromImage(labels), return_counts=True)
        return {int(v): int(n) for v, n in zip(values, counts, strict=True) if v}

    original, flipped = volumes(image), volumes(mirror_left_right(image))
    return {str(code): 100.0 * abs(flipped.get(LR_SWAP.get(code, code), 0) - n) / n
            for code, n in original.items()}


def evaluate_label_maps(model: LoadedModel, root: Path, n_maps: int | None = None) -> dict[str, Any]:
    """Per label map: the segmenter on its MPRAGE-like rendering, against the map."""
    priors = load_priors(root)
    seg_codes = np.asarray(SEG_LABELS)
    paths = label_map_paths(root, held_out=False) + label_map_paths(root, held_out=True)
    out: dict[str, Any] = {}
    for path in sorted(paths)[:n_maps]:
        name = path.name.removesuffix(".nii.gz")
        index = torch.from_numpy(np.pad(load_label_map(path, priors).astype(np.int64), HEAD_MARGIN))
        truth = seg_codes[priors.seg_index[index.numpy()]]
        image = sitk.GetImageFromArray(np.ascontiguousarray(target_t1(index, priors).numpy() * 200.0,
                                                            dtype=np.float32))
        t0 = time.perf_counter()
        result = segment(model, image)
        seconds = time.perf_counter() - t0
        raw = sitk.GetArrayFromImage(result.labels)
        true_icv = float(((truth > 0) & (truth < 100)).sum()) / 1000.0
        pred = aseg_view(raw)
        truth = np.where(raw == 192, 0, truth)  # the callosum is white matter in SynthSeg: not compared
        entry = {**label_metrics(pred, truth), "seconds": seconds, "icv_ml": result.icv_ml,
                 "true_icv_ml": true_icv, "icv_error_pct": 100.0 * (result.icv_ml - true_icv) / true_icv,
                 "outside_ml": result.outside_ml}
        out[name] = entry
        print(f"{name}: Dice(major) {_num(entry['dice_major'])} hippocampus Dice {_num(entry['hippocampus_dice'])} "
              f"ASPC {_num(entry['hippocampus_aspc_pct'])}% ICV {result.icv_ml:.0f}/{true_icv:.0f} ml "
              f"({seconds:.1f} s)", flush=True)
    return out


def evaluate_mprage(model: LoadedModel, shared_data: Path) -> dict[str, Any]:
    folder = shared_data.joinpath(*MPRAGE_DIR)
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and "LICENSE" not in p.name.upper())
    series = load_series(paths)
    t0 = time.perf_counter()
    result = segment(model, series.image)
    seconds = time.perf_counter() - t0
    first = series.datasets[0]
    assert model.manifest.output.segmentation is not None
    volumetry = compute_volumetry(result.labels, series.image, age=first.get("PatientAge"),
                                  sex=first.get("PatientSex"), icv_ml=result.icv_ml, outside_ml=result.outside_ml,
                                  expected_codes=required_structures(model.manifest.output.segmentation))
    mirror = mirror_differences(model, series.image)
    volumes = {str(c): v.volume_ml for c, v in volumetry.structures.items()}
    volumes.update({"3": volumetry.cortex_ml["L"], "42": volumetry.cortex_ml["R"]})  # the whole cortex: its lobes
    return {"seconds": seconds, "age": volumetry.age_years, "icv_ml": volumetry.icv_ml, "volumes_ml": volumes,
            "qc": {c.name: [c.passed, c.reason] for c in volumetry.qc},
            "mirror_max_difference_pct": max(mirror.values()), "mirror_difference_pct": mirror}


def summarise(maps: dict[str, Any], mprage: dict[str, Any]) -> dict[str, Any]:
    def mean(field: str) -> float | None:
        values = [m[field] for m in maps.values() if m.get(field) is not None]
        return float(np.mean(values)) if values else None

    return {
        "held_out_t1": {"dice_major": mean("dice_major"), "hippocampus_dice": mean("hippocampus_dice"),
                        "hippocampus_aspc_pct": mean("hippocampus_aspc_pct"), "icv_error_pct": mean("icv_error_pct"),
                        "icv_abs_error_pct": float(np.mean([abs(m["icv_error_pct"]) for m in maps.values()])),
                        "seconds": mean("seconds"), "maps": len(maps)},
        "mprage": {"icv_ml": mprage["icv_ml"], "mirror_max_difference_pct": mprage["mirror_max_difference_pct"],
                   "qc_passed": all(v[0] is not False for v in mprage["qc"].values()), "seconds": mprage["seconds"]},
    }


def card_section(summary: dict[str, Any], info: dict[str, Any], maps: dict[str, Any],
                 mprage: dict[str, Any]) -> str:
    held, mp = summary["held_out_t1"], summary["mprage"]
    lines = [CARD_START, "",
             f"Evaluated {info['evaluated']} by `{info['command']}` ({info['threads']} onnxruntime threads, shared "
             "2-core machine).", "",
             f"Held-out maps: the first {held['maps']} SynthSeg label maps (none seen by this network) rendered as "
             "MPRAGE-like T1s (flat class intensities, cut-off neck), against the maps.", "",
             "| input | Dice major structures | hippocampus Dice | hippocampus ASPC % | ICV error % (mean, mean abs) | "
             "seconds |",
             "|---|---|---|---|---|---|",
             f"| held-out maps: t1 | "
             f"{_num(held['dice_major'])} | {_num(held['hippocampus_dice'])} | "
             f"{_num(held['hippocampus_aspc_pct'], 1)} | {_num(held['icv_error_pct'], 1)}, "
             f"{_num(held['icv_abs_error_pct'], 1)} | {_num(held['seconds'], 1)} |", "",
             f"Real MPRAGE (child, {mprage['age']:.0f} years): ICV {mp['icv_ml']:.0f} ml; QC "
             f"{'passed' if mp['qc_passed'] else 'FAILED'}; mirrored in patient space, the largest difference of a "
             f"structure's volume from its counterpart's is {mp['mirror_max_difference_pct']:.2f} %; "
             f"{mp['seconds']:.1f} s.", "",
             "| structure | label maps Dice L | R | ASPC % L | R | MPRAGE volume ml L | R |",
             "|---|---|---|---|---|---|---|"]
    seen: set[int] = set()
    rows = list(maps.values())

    def cell(field: str, code: int, digits: int) -> str:
        values = [r[field][str(code)] for r in rows if r[field].get(str(code)) is not None]
        return f"{np.mean(values):.{digits}f}" if values else "–"

    for code in sorted(STRUCTURES):
        if code in seen or by_code(code).laterality == "R":
            continue
        partner = LR_SWAP.get(code, code)
        seen |= {code, partner}
        name = by_code(code).display_name.removeprefix("Left ")
        vol = mprage["volumes_ml"]
        both = partner != code
        in_maps = str(code) in rows[0]["dice"] if rows else False
        lines.append(f"| {name} | " + " | ".join([
            cell("dice", code, 2) if in_maps else "–", (cell("dice", partner, 2) if in_maps else "–") if both else "",
            cell("aspc_pct", code, 1) if in_maps else "–",
            (cell("aspc_pct", partner, 1) if in_maps else "–") if both else "",
            _num(vol.get(str(code)), 2), _num(vol.get(str(partner)), 2) if both else ""]) + " |")
    lines += ["", CARD_END]
    return "\n".join(lines)


def write_outputs(model_dir: Path, maps: dict[str, Any], mprage: dict[str, Any], info: dict[str, Any]) -> None:
    import tomllib

    summary = summarise(maps, mprage)
    (model_dir / "metrics.json").write_text(json.dumps(
        {"info": info, "summary": summary, "results": {"label_maps": maps, "mprage": mprage}}, indent=1,
        default=float), encoding="utf-8")
    manifest_path = model_dir / "manifest.toml"
    data = tomllib.loads(manifest_path.read_text(encoding="utf-8"))
    data["metrics"] = {"info": {k: v for k, v in info.items() if v is not None},
                       **{k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in summary.items()}}
    manifest_path.write_text(dump_toml(data), encoding="utf-8")
    replace_card_metrics(model_dir, card_section(summary, info, maps, mprage))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model folder (onnx_models/<id>)")
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA)
    parser.add_argument("--maps", type=int, default=None, help="first N label maps only (default: all 20)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    model_dir = args.model.resolve()
    registry = ModelRegistry(model_dir.parent, providers="cpu", threads=args.threads)
    model = registry.session(model_dir.name)
    maps = evaluate_label_maps(model, args.shared_data / "labels" / "synthseg", args.maps)
    mprage = evaluate_mprage(model, args.shared_data)
    info = {"evaluated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "threads": args.threads,
            "command": "python -m inference.training.evaluate_segmenter --model onnx_models/" + model_dir.name
            + (f" --maps {args.maps}" if args.maps else ""), "label_maps": sorted(maps), "model": model_dir.name,
            "version": model.manifest.version}
    write_outputs(model_dir, maps, mprage, info)
    print(json.dumps(summarise(maps, mprage), indent=1, default=float))


if __name__ == "__main__":
    main()

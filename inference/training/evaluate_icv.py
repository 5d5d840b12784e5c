"""The intracranial-volume estimate (``inference.segmentation.intracranial_mask``) against label maps whose ICV is
known.

``python -m inference.training.evaluate_icv [--synthseg DIR] [--out docs/icv-evaluation.json]``

For each SynthSeg training label map (``../shared/data/labels/synthseg``, Apache-2.0): the true ICV is every
voxel with a code in 1..99 (brain, ventricles and the CSF around the brain; codes of 100 and more are outside the
skull); the brain mask given to the estimate is the same but the extra-cerebral CSF (code 24), as a segmenter's
labels are. The estimate's error in % of the true ICV, per map, and their mean, SD, mean absolute and largest,
are written as JSON (the figures docs/volumetry.md and the segmenter's model card quote).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from inference.segmentation import intracranial_mask

#: codes below this are inside the skull (SynthSeg's label maps: 100 and more are skull, scalp and the rest)
INTRACRANIAL_LIMIT = 100
#: SynthSeg's CSF label: the CSF around the brain, which a segmenter's brain labels do not hold
EXTRA_CEREBRAL_CSF = 24
DEFAULT_SYNTHSEG = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "labels" / "synthseg"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "icv-evaluation.json"


def evaluate_map(path: Path) -> dict[str, float]:
    """True ICV, estimated ICV (ml) and the error (% of the true ICV) of one label map."""
    labels = sitk.ReadImage(str(path))
    codes = sitk.GetArrayViewFromImage(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    inside = (codes > 0) & (codes < INTRACRANIAL_LIMIT)
    brain = sitk.GetImageFromArray((inside & (codes != EXTRA_CEREBRAL_CSF)).astype(np.uint8))
    brain.CopyInformation(labels)
    mask = intracranial_mask(brain)
    estimated = float(sitk.GetArrayViewFromImage(mask).astype(bool).sum()) * float(np.prod(mask.GetSpacing())) / 1000
    true = float(inside.sum()) * voxel_ml
    csf = float((codes == EXTRA_CEREBRAL_CSF).sum()) * voxel_ml
    return {"true_icv_ml": round(true, 1), "estimated_icv_ml": round(estimated, 1),
            "error_pct": round(100.0 * (estimated - true) / true, 2),
            "extra_cerebral_csf_pct": round(100.0 * csf / true, 1)}


def evaluate(root: Path) -> dict[str, Any]:
    paths = sorted((root / "training_label_maps").glob("*.nii.gz"))
    if not paths:
        raise SystemExit(f"no label maps in {root / 'training_label_maps'}")
    maps = {p.name.removesuffix(".nii.gz"): evaluate_map(p) for p in paths}
    errors = [m["error_pct"] for m in maps.values()]
    worst = sorted(maps, key=lambda name: abs(maps[name]["error_pct"]), reverse=True)[:2]
    return {
        "info": {"evaluated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "command": "python -m inference.training.evaluate_icv", "maps": len(maps),
                 "estimate": "inference.segmentation.intracranial_mask",
                 "truth": f"codes 1..{INTRACRANIAL_LIMIT - 1}",
                 "brain_mask": f"codes 1..{INTRACRANIAL_LIMIT - 1} but {EXTRA_CEREBRAL_CSF} (extra-cerebral CSF)"},
        "summary": {"mean_error_pct": round(statistics.fmean(errors), 2),
                    "sd_error_pct": round(statistics.stdev(errors), 2),
                    "mean_abs_error_pct": round(statistics.fmean(abs(e) for e in errors), 2),
                    "largest_errors": {name: maps[name]["error_pct"] for name in worst}},
        "maps": maps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthseg", type=Path, default=DEFAULT_SYNTHSEG)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    result = evaluate(args.synthseg)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compare evaluated models kind by kind, paired on the same held-out maps and simulated inputs.

python -m inference.training.compare REFERENCE CANDIDATE [CANDIDATE ...]

Each argument is a model bundle (or any folder) holding the metrics.json that `inference.training.evaluate`
wrote. For every input kind that the reference and a candidate were both evaluated on, the table gives both
means and the paired difference (candidate - reference) per held-out map: its mean and its range over the
maps. evaluate simulates the same input for a given (seed, map, kind), so the difference is the models' own
and not the draw's; with 4 held-out maps a mean difference inside the range of the per-map differences is not
a difference that matters. Per-kind models (one candidate per kind) are compared with one model for all kinds
this way: docs/training.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the metrics compared, as (key in the per-map results, label)
HELD_OUT_METRICS: tuple[tuple[str, str], ...] = (
    ("dice_major", "Dice major"),
    ("hippocampus_dice", "hippocampus Dice"),
    ("hippocampus_aspc_pct", "hippocampus ASPC %"),
    ("psnr_db", "PSNR dB"),
)


@dataclass(frozen=True)
class Paired:
    """One metric of one kind: reference and candidate means and the per-map paired differences."""

    kind: str
    metric: str
    candidate: str
    reference_mean: float
    candidate_mean: float
    differences: tuple[float, ...]

    @property
    def mean_difference(self) -> float:
        return sum(self.differences) / len(self.differences)


def load_metrics(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json (run python -m inference.training.evaluate --model "
                                f"{folder} first)")
    return json.loads(path.read_text(encoding="utf-8"))


def paired(reference: dict[str, Any], candidates: dict[str, dict[str, Any]]) -> list[Paired]:
    """Paired differences on the held-out maps, for every kind evaluated by the reference and a candidate
    (the first candidate that has the kind; candidates are named by the keys of `candidates`)."""
    ref_held = reference["results"]["held_out"]
    out: list[Paired] = []
    for kind in reference["info"]["kinds"]:
        name = next((n for n, c in candidates.items() if kind in c["info"]["kinds"]), None)
        if name is None:
            continue
        cand_held = candidates[name]["results"]["held_out"]
        maps = [m for m in ref_held if kind in ref_held[m] and kind in cand_held.get(m, {})]
        if not maps:
            continue
        for key, label in HELD_OUT_METRICS:
            ref_values = [float(ref_held[m][kind][key]) for m in maps]
            cand_values = [float(cand_held[m][kind][key]) for m in maps]
            out.append(Paired(kind, label, name, sum(ref_values) / len(maps), sum(cand_values) / len(maps),
                              tuple(c - r for c, r in zip(cand_values, ref_values, strict=True))))
    return out


def mprage_differences(reference: dict[str, Any], candidates: dict[str, dict[str, Any]]) -> list[Paired]:
    """The real-MPRAGE consistency (Dice of the major structures, synthetic vs real), per kind."""
    out: list[Paired] = []
    ref_mp = reference["results"].get("mprage", {})
    for kind in reference["info"]["kinds"]:
        name = next((n for n, c in candidates.items() if kind in c["results"].get("mprage", {})), None)
        if name is None or kind not in ref_mp:
            continue
        r = float(ref_mp[kind]["synthetic_t1_segmented"]["dice_major"])
        c = float(candidates[name]["results"]["mprage"][kind]["synthetic_t1_segmented"]["dice_major"])
        out.append(Paired(kind, "MPRAGE consistency Dice major", name, r, c, (c - r,)))
    return out


def table(rows: list[Paired], reference_name: str) -> str:
    lines = [f"| input kind | metric | {reference_name} | candidate | candidate value | difference (mean; per map) |",
             "|---|---|---|---|---|---|"]
    for p in rows:
        spread = (f"{min(p.differences):+.3f} … {max(p.differences):+.3f}" if len(p.differences) > 1
                  else "one volume")
        lines.append(f"| {p.kind} | {p.metric} | {p.reference_mean:.3f} | {p.candidate} | {p.candidate_mean:.3f} | "
                     f"{p.mean_difference:+.3f}; {spread} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", type=Path)
    ap.add_argument("candidates", type=Path, nargs="+")
    args = ap.parse_args(argv)
    try:
        reference = load_metrics(args.reference)
        # a candidate is named by its folder, or by parent/folder where that name is taken (e.g. two exports of
        # one model id)
        names = [c.name if [d.name for d in (args.reference, *args.candidates)].count(c.name) == 1
                 else f"{c.parent.name}/{c.name}" for c in args.candidates]
        candidates = {n: load_metrics(c) for n, c in zip(names, args.candidates, strict=True)}
    except FileNotFoundError as exc:
        ap.error(str(exc))
    rows = paired(reference, candidates) + mprage_differences(reference, candidates)
    if not rows:
        ap.error("no input kind was evaluated by both the reference and a candidate")
    print(table(rows, args.reference.name))


if __name__ == "__main__":
    main()

"""inference.training.compare: paired per-kind differences between evaluated models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.training import compare

MAPS = ("m17", "m18")


def metrics(kinds: list[str], dice: dict[str, tuple[float, float]], mprage: dict[str, float] | None = None) -> dict:
    held = {m: {k: {"dice_major": dice[k][i], "hippocampus_dice": 0.5, "hippocampus_aspc_pct": 10.0,
                    "psnr_db": 20.0} for k in kinds} for i, m in enumerate(MAPS)}
    results: dict = {"held_out": held}
    if mprage:
        results["mprage"] = {k: {"synthetic_t1_segmented": {"dice_major": v}} for k, v in mprage.items()}
    return {"info": {"kinds": kinds}, "results": results}


def write(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(data))
    return folder


def test_paired_differences_per_map_and_kind() -> None:
    ref = metrics(["flair", "cor_t2"], {"flair": (0.5, 0.6), "cor_t2": (0.4, 0.4)})
    per_kind = {"ft-flair": metrics(["flair"], {"flair": (0.55, 0.58)}),
                "ft-cor_t2": metrics(["cor_t2"], {"cor_t2": (0.5, 0.6)})}
    rows = {(p.kind, p.metric): p for p in compare.paired(ref, per_kind)}
    flair = rows[("flair", "Dice major")]
    assert flair.candidate == "ft-flair" and flair.differences == pytest.approx((0.05, -0.02))
    assert flair.mean_difference == pytest.approx(0.015)
    assert flair.reference_mean == pytest.approx(0.55) and flair.candidate_mean == pytest.approx(0.565)
    assert rows[("cor_t2", "Dice major")].mean_difference == pytest.approx(0.15)
    assert rows[("cor_t2", "hippocampus Dice")].mean_difference == pytest.approx(0.0)


def test_kinds_without_a_candidate_are_left_out() -> None:
    ref = metrics(["flair", "any"], {"flair": (0.5, 0.6), "any": (0.3, 0.3)})
    rows = compare.paired(ref, {"ft-flair": metrics(["flair"], {"flair": (0.5, 0.6)})})
    assert {p.kind for p in rows} == {"flair"}


def test_main_prints_the_table_with_mprage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = write(tmp_path / "synth-t1", metrics(["t1_2d"], {"t1_2d": (0.5, 0.7)}, {"t1_2d": 0.6}))
    cand = write(tmp_path / "ft-t1_2d", metrics(["t1_2d"], {"t1_2d": (0.6, 0.6)}, {"t1_2d": 0.65}))
    compare.main([str(ref), str(cand)])
    out = capsys.readouterr().out
    assert "| t1_2d | Dice major | 0.600 | ft-t1_2d | 0.600 | +0.000; -0.100 … +0.100 |" in out
    assert "| t1_2d | MPRAGE consistency Dice major | 0.600 | ft-t1_2d | 0.650 | +0.050; one volume |" in out


def test_missing_metrics_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = write(tmp_path / "ref", metrics(["flair"], {"flair": (0.5, 0.6)}))
    with pytest.raises(SystemExit):
        compare.main([str(ref), str(tmp_path / "not-evaluated")])
    assert "no metrics.json" in capsys.readouterr().err


def test_candidates_of_the_same_model_id_are_told_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = write(tmp_path / "shipped" / "synth-t1", metrics(["flair"], {"flair": (0.5, 0.6)}))
    cand = write(tmp_path / "retiled" / "synth-t1", metrics(["flair"], {"flair": (0.6, 0.7)}))
    compare.main([str(ref), str(cand)])
    assert "| flair | Dice major | 0.550 | retiled/synth-t1 | 0.650 | +0.100;" in capsys.readouterr().out

"""inference.training.evaluate_icv: the ICV figures docs/volumetry.md quotes come back from the label maps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.training.evaluate_icv import evaluate_map
from tests.conftest import SYNTHSEG

RECORDED = Path(__file__).resolve().parents[1] / "docs" / "icv-evaluation.json"


@pytest.mark.parametrize("name", ["training_seg_05", "training_seg_01"])  # the largest error, and a typical one
def test_the_recorded_icv_errors_come_back(name: str) -> None:
    path = SYNTHSEG / "training_label_maps" / f"{name}.nii.gz"
    if not path.is_file():
        pytest.skip(f"SynthSeg label maps not found at {SYNTHSEG} (../shared/data)")
    recorded = json.loads(RECORDED.read_text())["maps"][name]
    got = evaluate_map(path)
    assert got["true_icv_ml"] == pytest.approx(recorded["true_icv_ml"], abs=0.2)
    assert got["estimated_icv_ml"] == pytest.approx(recorded["estimated_icv_ml"], abs=0.2)
    assert got["error_pct"] == pytest.approx(recorded["error_pct"], abs=0.02)


def test_the_summary_is_that_of_the_maps() -> None:
    recorded = json.loads(RECORDED.read_text())
    errors = [m["error_pct"] for m in recorded["maps"].values()]
    assert recorded["info"]["maps"] == len(errors) == 20
    assert recorded["summary"]["mean_error_pct"] == pytest.approx(sum(errors) / len(errors), abs=0.01)
    assert recorded["summary"]["mean_abs_error_pct"] == pytest.approx(sum(map(abs, errors)) / len(errors), abs=0.01)

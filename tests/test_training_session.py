"""Training that accumulates: the committed run resumes (weights, optimizer, step, generators), a prepared session
trains and exports it, a lost checkpoint is recovered from its export, and the training set travels as a pack."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnxruntime = pytest.importorskip("onnxruntime")

from inference.models import load_manifest  # noqa: E402
from inference.training import generator, recover, session, train  # noqa: E402
from inference.training.networks import build_network  # noqa: E402
from tests.conftest import SHARED_DATA, requires_shared_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMITTED_RUN = REPO / "inference" / "training" / "runs" / "synth-t1"
SYNTHSEG = SHARED_DATA / "labels" / "synthseg"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_the_committed_run_is_a_resumable_state() -> None:
    state = _load(COMMITTED_RUN / "checkpoint.pt")
    for key in ("model", "optimizer", "step", "config", "crop", "seed", "lr", "steps_planned", "history"):
        assert key in state, key
    build_network(state["config"]).load_state_dict(state["model"], strict=True)
    rows = (COMMITTED_RUN / "training_log.csv").read_text().splitlines()
    assert int(rows[-1].split(",")[0]) == state["step"] == len(rows) - 1  # one log row per step, none missing
    # small enough to commit: weights and Adam's two moments of a 0.8 M-parameter network
    assert (COMMITTED_RUN / "checkpoint.pt").stat().st_size < 12e6


def test_recover_rebuilds_the_exported_network_and_refuses_a_mismatch(tmp_path: Path) -> None:
    model_dir = REPO / "onnx_models" / "synth-t1-t1-2d"
    recover.main(["--model", str(model_dir), "--run", str(tmp_path / "run"), "--step", "3600", "--lr", "4e-4"])
    state = _load(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 3600 and state["optimizer"] is None and state["lr"] == 4e-4
    assert state["config"] == {"arch": "coarse", "n_labels": 33, "base": 12, "levels": 4, "max_channels": 96,
                               "norm": "instance"}
    model = build_network(state["config"])
    model.load_state_dict(state["model"])
    recover.check_equivalence(model.eval(), model_dir / "model.onnx")
    with torch.no_grad():
        model.core.seg_head.bias[3] += 0.01  # a single weight off: the check must see it
    with pytest.raises(ValueError, match="differs from the ONNX graph"):
        recover.check_equivalence(model, model_dir / "model.onnx")


def test_cuda_is_refused_clearly_where_there_is_none() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        train.resolve_device("cuda")
    assert train.resolve_device("auto").type == "cpu"


@requires_shared_data
def test_pack_holds_the_same_maps_and_priors(tmp_path: Path) -> None:
    pack = tmp_path / "pack.npz"
    generator.pack_label_maps(SYNTHSEG, pack, names=("training_seg_01", "training_seg_17"))
    for held_out, name in ((False, "training_seg_01"), (True, "training_seg_17")):
        priors, names, maps = generator.load_label_maps(pack, held_out=held_out)
        assert names == [name]
        path = SYNTHSEG / "training_label_maps" / f"{name}.nii.gz"
        np.testing.assert_array_equal(maps[0], generator.load_label_map(path, generator.load_priors(SYNTHSEG)))
    reference = generator.load_priors(SYNTHSEG)
    for field in ("generation_labels", "contrast_classes", "t1_means", "seg_index", "lr_swap"):
        np.testing.assert_array_equal(getattr(priors, field), getattr(reference, field))


@pytest.fixture(scope="module")
def small_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pack of one training map (loads in a moment; the sessions below need no more)."""
    if not SYNTHSEG.is_dir():
        pytest.skip(f"SynthSeg label maps not found at {SYNTHSEG} (../shared/data)")
    pack = tmp_path_factory.mktemp("pack") / "one-map.npz"
    generator.pack_label_maps(SYNTHSEG, pack, names=("training_seg_01",))
    return pack


def test_a_session_continues_the_committed_run_reproducibly_and_exports(tmp_path: Path, small_pack: Path) -> None:
    """The prepared session command on CPU, two steps: state, log and history advance, the export runs; and two
    continuations of one saved state are the same to the last bit (optimizer and generators restored)."""
    run = tmp_path / "a" / "synth-t1"
    shutil.copytree(COMMITTED_RUN, run)
    before = _load(run / "checkpoint.pt")
    common = ["--device", "cpu", "--minutes", "10", "--workers", "0", "--threads", "1", "--data", str(small_pack)]
    session.main(["--run", str(run), "--session-steps", "2", "--export-to", str(tmp_path / "models"),
                  "--copy-to", str(tmp_path / "out"), *common])
    after = _load(run / "checkpoint.pt")
    assert after["step"] == before["step"] + 2
    assert after["steps_planned"] == before["steps_planned"]  # the run's schedule stays put across sessions
    assert after["optimizer"] is not None and "rng" in after
    assert len(after["history"]) == len(before["history"]) + 1
    assert after["history"][-1]["from_step"] == before["step"] and after["history"][-1]["to_step"] == after["step"]
    rows = (run / "training_log.csv").read_text().splitlines()
    assert len(rows) - 1 == after["step"]
    assert _load(tmp_path / "out" / "synth-t1" / "checkpoint.pt")["step"] == after["step"]
    exported = tmp_path / "models" / "synth-t1"
    assert load_manifest(exported / "manifest.toml").metrics["info"]["train_step"] == after["step"]
    ort = onnxruntime.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    t1, seg = ort.run(None, {"image": np.random.default_rng(0).random((1, 1, 32, 32, 32), dtype=np.float32)})
    assert t1.shape == (1, 1, 32, 32, 32) and seg.shape == (1, 33, 32, 32, 32)

    twins = []
    for name in ("b", "c"):
        copy = tmp_path / name / "synth-t1"
        shutil.copytree(run, copy)
        train.main(["--model-id", "synth-t1", "--resume", str(copy), "--steps", str(after["steps_planned"]),
                    "--stop-at", str(after["step"] + 1),
                    "--workers", "0", "--threads", "1", "--data", str(small_pack)])
        twins.append(_load(copy / "checkpoint.pt"))
    assert twins[0]["step"] == after["step"] + 1
    for key, value in twins[0]["model"].items():
        torch.testing.assert_close(value, twins[1]["model"][key], rtol=0, atol=0)
    moved = sum(float((twins[0]["model"][k] - after["model"][k]).abs().sum()) for k in after["model"])
    assert moved > 0  # the step did train

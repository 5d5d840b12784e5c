"""Tests of inference.training: generator, network, losses, ONNX export, evaluation helpers."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnxruntime = pytest.importorskip("onnxruntime")

from inference.models import InputSpec, load_manifest  # noqa: E402
from inference.pipeline import normalize  # noqa: E402
from inference.training import evaluate, export, generator, train  # noqa: E402
from inference.training.networks import CoarseSynthNet, SynthUNet, build_network  # noqa: E402
from tests.conftest import SHARED_DATA, SYNTHSEG, requires_shared_data  # noqa: E402


@pytest.fixture(scope="module")
def label_map(priors: generator.Priors) -> np.ndarray:
    return generator.load_label_map(SYNTHSEG / "training_label_maps" / "training_seg_01.nii.gz", priors)


def _code_index(priors: generator.Priors, code: int) -> int:
    return int(np.nonzero(priors.generation_labels == code)[0][0])


def _edge_width(profile: np.ndarray) -> float:
    """10-90 % rise distance (voxels) of a monotone-ish step profile (linear interpolation)."""
    lo, hi = profile[:8].mean(), profile[-8:].mean()
    p = (profile - lo) / (hi - lo)
    x = np.arange(len(p), dtype=float)
    first = lambda level: float(np.interp(level, np.maximum.accumulate(p), x))  # noqa: E731
    return first(0.9) - first(0.1)


def _step_volume(axis: int, size: int = 64) -> torch.Tensor:
    vol = torch.zeros(size, size, size)
    index = [slice(None)] * 3
    index[axis] = slice(size // 2, None)
    vol[tuple(index)] = 100.0
    return vol + 20.0


def _mean_profile(vol: torch.Tensor, axis: int) -> np.ndarray:
    other = tuple(a for a in range(3) if a != axis)
    return vol.mean(dim=other).numpy()


# ---------------------------------------------------------------------------------------------- priors / labels


@requires_shared_data
def test_priors_seg_mapping_and_lr_swap(priors: generator.Priors) -> None:
    assert len(generator.SEG_LABELS) == 33
    seg_codes = np.asarray(generator.SEG_LABELS)[priors.seg_index]
    for code, expected in [(0, 0), (17, 17), (53, 53), (24, 24), (25, 2), (163, 43), (30, 0), (507, 0)]:
        assert seg_codes[_code_index(priors, code)] == expected
    swapped = priors.generation_labels[priors.lr_swap]
    assert swapped[_code_index(priors, 17)] == 53 and swapped[_code_index(priors, 53)] == 17
    assert swapped[_code_index(priors, 16)] == 16  # brainstem is midline
    assert set(generator.HELD_OUT).isdisjoint(
        p.name.removesuffix(".nii.gz") for p in generator.label_map_paths(SYNTHSEG, held_out=False))
    assert len(generator.label_map_paths(SYNTHSEG, held_out=True)) == 4


@requires_shared_data
def test_label_map_is_lps(priors: generator.Priors, label_map: np.ndarray) -> None:
    # LPS array [k, j, i]: left hemisphere (code 2) at larger i than right (41), i.e. patient left = +x
    i_left = np.nonzero(priors.generation_labels[label_map] == 2)[2].mean()
    i_right = np.nonzero(priors.generation_labels[label_map] == 41)[2].mean()
    assert i_left > i_right
    # superior (+k): cortex above the brainstem
    k_ctx = np.nonzero(priors.generation_labels[label_map] == 3)[0].mean()
    k_bs = np.nonzero(priors.generation_labels[label_map] == 16)[0].mean()
    assert k_ctx > k_bs


@requires_shared_data
def test_flip_left_right_swaps_labels(priors: generator.Priors) -> None:
    crop = torch.zeros(8, 8, 8, dtype=torch.long)
    crop[2, 3, 1] = _code_index(priors, 17)  # left hippocampus at small i
    flipped = generator.flip_left_right(crop, priors)
    assert priors.generation_labels[int(flipped[2, 3, 6])] == 53
    assert int(flipped[2, 3, 1]) == 0


# ---------------------------------------------------------------------------------------------- samples


@requires_shared_data
def test_deformed_crop_and_sample_ranges(priors: generator.Priors, label_map: np.ndarray) -> None:
    gen = torch.Generator().manual_seed(3)
    box = generator.brain_box(label_map, priors)
    crop = generator.deformed_crop(label_map, 32, gen, centre_box=box)
    assert crop.shape == (32, 32, 32) and crop.dtype == torch.long
    assert int(crop.min()) >= 0 and int(crop.max()) < len(priors.generation_labels)
    for kind in generator.INPUT_KINDS:
        s = generator.synthesize(crop, kind, priors, gen)
        assert s.image.shape == s.t1.shape == s.seg.shape == (32, 32, 32)
        assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.5 + 1e-6
        assert torch.isfinite(s.image).all()
        assert 0.0 <= float(s.t1.min()) and float(s.t1.max()) <= 1.0
        assert int(s.seg.max()) < len(generator.SEG_LABELS)


@requires_shared_data
def test_cerebrum_box_is_inside_the_brain_box_and_holds_the_cerebrum(priors: generator.Priors,
                                                                     label_map: np.ndarray) -> None:
    cerebrum = generator.cerebrum_box(label_map, priors)
    brain = generator.brain_box(label_map, priors)
    for (ca, cb), (ba, bb) in zip(cerebrum, brain, strict=True):
        assert ba <= ca < cb <= bb
    # the brain box reaches down the spinal canal, the cerebrum box does not (axis 0 = S in LPS arrays)
    assert cerebrum[0][1] - cerebrum[0][0] < 0.8 * (brain[0][1] - brain[0][0])
    inside = np.zeros(label_map.shape, bool)
    inside[tuple(slice(a, b) for a, b in cerebrum)] = True
    wm_cortex = np.isin(priors.generation_labels[label_map], generator.CEREBRUM_CODES)
    assert wm_cortex[inside].sum() == wm_cortex.sum()


@requires_shared_data
def test_target_t1_is_mprage_like(priors: generator.Priors) -> None:
    lut = priors.t1_target_lut
    wm, gm, csf = (lut[_code_index(priors, c)] for c in (2, 3, 4))
    assert wm > gm > csf  # T1 ordering


def test_normalization_matches_pipeline() -> None:
    rng = np.random.default_rng(0)
    vol = rng.gamma(2.0, 30.0, size=(20, 21, 22)).astype(np.float32)
    vol[:5] = 0
    spec = InputSpec(name="image")
    ref = normalize(vol, spec)
    ours = generator.normalize_percentile(torch.from_numpy(vol), spec.p_low, spec.p_high, spec.clip_max)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)


# ---------------------------------------------------------------------------------------------- acquisition


@pytest.mark.parametrize(("kind", "thick_axis", "min_width"), [("flair", 0, 3.0), ("cor_t2", 1, 3.0)])
def test_slice_kinds_blur_the_slice_axis(kind: str, thick_axis: int, min_width: float) -> None:
    widths = []
    for axis in range(3):
        out = generator.acquire(_step_volume(axis), kind, torch.Generator().manual_seed(1))
        widths.append(_edge_width(_mean_profile(out, axis)))
    assert widths[thick_axis] >= min_width
    for axis in range(3):
        if axis != thick_axis:
            assert widths[axis] < 2.0


def test_slice_profile_fwhm_equals_thickness() -> None:
    # FWHM 6 mm -> Gaussian sigma 2.55; sampling every 6 mm and linear interpolation back add a triangle
    # kernel (variance 6^2 / 6): total sigma 3.54 -> 10-90 % rise 2.563 sigma = 9.1 mm
    vol = _step_volume(0)
    out = generator.simulate_acquisition(vol, (6.0, 1.0, 1.0), (6.0, 1.0, 1.0), 0.0, torch.Generator().manual_seed(0))
    width = _edge_width(_mean_profile(out, 0))
    assert 7.5 < width < 11.0
    # the blur alone (no down-sampling) is the Gaussian slice profile: 6.5 mm
    blurred = generator.gaussian_blur_axis(vol, 6.0 / 2.3548, 0)
    assert _edge_width(_mean_profile(blurred, 0)) == pytest.approx(2.563 * 6.0 / 2.3548, abs=0.4)
    thin = generator.simulate_acquisition(vol, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 0.0, torch.Generator())
    assert _edge_width(_mean_profile(thin, 0)) < 1.5


def test_t1_2d_blurs_exactly_one_axis() -> None:
    for seed in range(3):
        widths = []
        for axis in range(3):
            out = generator.acquire(_step_volume(axis), "t1_2d", torch.Generator().manual_seed(seed))
            widths.append(_edge_width(_mean_profile(out, axis)))
        assert sum(w >= 4.0 for w in widths) == 1, widths


def test_scout_is_isotropic_low_res_with_ringing() -> None:
    widths, overshoot = [], []
    for axis in range(3):
        box = torch.full((64, 64, 64), 20.0)
        index = [slice(None)] * 3
        index[axis] = slice(16, 48)  # a slab: k-space is periodic, so both edges lie inside the field of view
        box[tuple(index)] = 120.0
        out = generator.simulate_kspace_truncation(box, 1.6, 0.0, torch.Generator())
        prof = _mean_profile(out, axis)[2:32]  # the rising edge at 16
        widths.append(_edge_width(prof))
        overshoot.append(prof.max() / prof[-8:].mean())
    assert all(1.0 < w < 3.0 for w in widths), widths
    assert max(widths) - min(widths) < 0.3
    assert all(o > 1.03 for o in overshoot), overshoot  # Gibbs ringing at the edge


def test_unknown_kind_raises() -> None:
    with pytest.raises(ValueError):
        generator.acquire(torch.zeros(8, 8, 8), "dwi", torch.Generator())


# ---------------------------------------------------------------------------------------------- network, losses


def test_network_shapes_and_ranges() -> None:
    torch.manual_seed(0)
    net = SynthUNet(n_labels=33, base=4, levels=3)
    assert net.divisible_by == 4
    t1, seg = net(torch.rand(1, 1, 16, 24, 32))
    assert t1.shape == (1, 1, 16, 24, 32) and seg.shape == (1, 33, 16, 24, 32)
    assert float(t1.min()) >= 0.0 and float(t1.max()) <= 1.0


def test_coarse_network_is_the_2mm_core_between_pooling_and_upsampling() -> None:
    torch.manual_seed(0)
    net = CoarseSynthNet(n_labels=33, base=4, levels=3).eval()
    assert net.divisible_by == 8
    x = torch.rand(1, 1, 16, 24, 32)
    with torch.no_grad():
        t1, seg = net(x)
        t1_2, seg_2 = net.forward_coarse(torch.nn.functional.avg_pool3d(x, 2))
    assert t1.shape == (1, 1, 16, 24, 32) and seg.shape == (1, 33, 16, 24, 32)
    assert float(t1.min()) >= 0.0 and float(t1.max()) <= 1.0
    up = torch.nn.functional.interpolate(seg_2, scale_factor=2, mode="trilinear", align_corners=False)
    torch.testing.assert_close(seg, up)
    # 2x2x2 block means of the 1 mm output come back close to the 2 mm output (smooth upsampling)
    assert float((torch.nn.functional.avg_pool3d(t1, 2) - t1_2).abs().mean()) < 0.05


def test_build_network_by_arch() -> None:
    assert isinstance(build_network({"arch": "coarse", "n_labels": 5, "base": 4, "levels": 2}), CoarseSynthNet)
    assert isinstance(build_network({"n_labels": 5, "base": 4, "levels": 2}), SynthUNet)  # older checkpoints
    with pytest.raises(ValueError, match="unknown network"):
        build_network({"arch": "vit"})


def test_instance_normalization_is_the_same_in_training_and_inference() -> None:
    torch.manual_seed(0)
    net = build_network({"arch": "coarse", "n_labels": 3, "base": 4, "levels": 2, "norm": "instance"})
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    assert sum(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules()) == 6  # 2 per block
    x = torch.rand(1, 1, 8, 8, 8)
    net.train()
    with torch.no_grad():
        train_out = net.forward_coarse(x)
        # per-input statistics absorb a global intensity scale of the input (up to the variance epsilon)
        shifted = net.forward_coarse(3.0 * x)
    net.eval()
    with torch.no_grad():
        eval_out = net.forward_coarse(x)
    for a, b, c in zip(train_out, eval_out, shifted, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="unknown normalisation"):
        build_network({"arch": "unet", "n_labels": 3, "base": 4, "levels": 2, "norm": "group"})


def test_frozen_normalization_uses_running_statistics_in_train_mode() -> None:
    torch.manual_seed(0)
    net = SynthUNet(n_labels=3, base=4, levels=2)
    net.train()
    x = torch.rand(1, 1, 8, 8, 8) * 5 + 3
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d))
    net(x)
    assert bn.num_batches_tracked == 1
    net.freeze_normalization()
    before = bn.running_mean.clone()
    out_train = net(x)
    assert bn.num_batches_tracked == 1 and torch.equal(bn.running_mean, before)
    net.eval()
    with torch.no_grad():
        out_eval = net(x)
    torch.testing.assert_close(out_train[1].detach(), out_eval[1])


def test_pool_sample_fractions(priors: generator.Priors, label_map: np.ndarray) -> None:
    gen = torch.Generator().manual_seed(5)  # a crop with eight labels
    crop = generator.deformed_crop(label_map, 32, gen, centre_box=generator.brain_box(label_map, priors))
    sample = generator.synthesize(crop, "t1_2d", priors, gen)
    sample.image, sample.t1, sample.seg = sample.image[:, 4:28], sample.t1[:, 4:28], sample.seg[:, 4:28, 2:]
    sample.image = sample.image[:, :, 2:]
    sample.t1 = sample.t1[:, :, 2:]  # 32 x 24 x 30: no axis may be confused with another
    pooled = generator.pool_sample(sample)
    assert pooled.image.shape == (1, 16, 12, 15) and pooled.t1.shape == (16, 12, 15)
    assert pooled.seg.shape == (33, 16, 12, 15)
    onehot = torch.nn.functional.one_hot(sample.seg, 33).permute(3, 0, 1, 2).float()
    torch.testing.assert_close(pooled.seg, torch.nn.functional.avg_pool3d(onehot[None], 2)[0])
    assert len(sample.seg.unique()) > 3  # the comparison means something
    torch.testing.assert_close(pooled.t1, torch.nn.functional.avg_pool3d(sample.t1[None, None], 2)[0, 0])
    torch.testing.assert_close(pooled.image[0], torch.nn.functional.avg_pool3d(sample.image[None, None], 2)[0, 0])


def test_soft_losses_equal_hard_losses_for_one_hot_targets() -> None:
    gen = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 5, (1, 8, 8, 8), generator=gen)
    t1 = torch.rand(1, 8, 8, 8, generator=gen)
    logits = torch.randn(1, 5, 8, 8, 8, generator=gen)
    onehot = torch.nn.functional.one_hot(seg, 5).permute(0, 4, 1, 2, 3).float()
    hard = train.losses(t1[:, None] * 0.9, logits, t1, seg)
    soft = train.soft_losses(t1[:, None] * 0.9, logits, t1, onehot)
    for h, s in zip(hard, soft, strict=False):
        assert float(h) == pytest.approx(float(s), rel=1e-5)


def test_losses_prefer_the_truth() -> None:
    gen = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 5, (1, 8, 8, 8), generator=gen)
    t1 = torch.rand(1, 8, 8, 8, generator=gen)
    perfect = torch.nn.functional.one_hot(seg, 5).permute(0, 4, 1, 2, 3).float() * 20
    good = train.losses(t1[:, None], perfect, t1, seg)
    bad = train.losses(1 - t1[:, None], torch.zeros(1, 5, 8, 8, 8), t1, seg)
    assert all(g < b for g, b in zip(good, bad, strict=False))
    assert float(good[0]) == pytest.approx(0.0) and float(good[2]) < 0.01


def test_learning_rate_schedule() -> None:
    assert train.learning_rate(0, 100, 1e-3) == 1e-3
    assert train.learning_rate(59, 100, 1e-3) == 1e-3
    assert train.learning_rate(100, 100, 1e-3) == pytest.approx(1e-4)


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize(("arch", "norm"), [("unet", "batch"), ("coarse", "batch"), ("coarse", "instance")])
def test_onnx_export_matches_torch(tmp_path: Path, arch: str, norm: str) -> None:
    torch.manual_seed(0)
    net = build_network({"arch": arch, "n_labels": 33, "base": 4, "levels": 3, "norm": norm})
    for m in net.modules():  # non-trivial running statistics and affine parameters, as after training
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, torch.nn.InstanceNorm3d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    path = tmp_path / "model.onnx"
    export.export_onnx(net, path, example_size=16)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 1, 24, 16, 32)  # other spatial size than the export example: dynamic axes
    with torch.no_grad():
        t1, seg = net(x)
    out_t1, out_seg = session.run(["t1", "seg"], {"image": x.numpy()})
    np.testing.assert_allclose(out_t1, t1.numpy(), atol=1e-3)
    np.testing.assert_allclose(out_seg, seg.numpy(), atol=1e-3)


def test_copy_training_log_keeps_the_redone_rows(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("step,loss\n1,5.0\n2,4.0\n3,3.0\n2,3.5\n3,2.5\n4,2.0\n")
    export.copy_training_log(src, tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text().split() == ["step,loss", "1,5.0", "2,3.5", "3,2.5", "4,2.0"]
    export.copy_training_log(src, tmp_path / "snapshot.csv", last_step=2)  # a snapshot's export: its own steps
    assert (tmp_path / "snapshot.csv").read_text().split() == ["step,loss", "1,5.0", "2,3.5"]


def test_manifest_follows_schema(tmp_path: Path) -> None:
    data = export.manifest_dict("synth-test", version="0.0.1", tile=96, divisible_by=8,
                                metrics={"held_out_flair": {"psnr_db": 30.5}, "info": {"seed": 0}})
    path = tmp_path / "manifest.toml"
    path.write_text(export.dump_toml(data))
    assert tomllib.loads(path.read_text()) == {**data, "tiling": {"tile": [96, 96, 96], "overlap": 16}}
    manifest = load_manifest(path)
    assert manifest.output.segmentation is not None
    assert manifest.output.segmentation.labels == list(generator.SEG_LABELS)
    assert manifest.input.orientation == "LPS" and manifest.task == "synthesis"


# ---------------------------------------------------------------------------------------------- evaluation


def test_label_metrics() -> None:
    truth = np.zeros((10, 10, 10), dtype=np.int64)
    truth[2:6, 2:6, 2:6] = 17
    truth[6:9, 2:6, 2:6] = 53
    same = evaluate.label_metrics(truth, truth)
    assert same["dice"]["17"] == 1.0 and same["aspc_pct"]["17"] == 0.0 and same["dice"]["2"] is None
    half = truth.copy()
    half[2:4, 2:6, 2:6] = 0  # half of the left hippocampus missing
    m = evaluate.label_metrics(half, truth)
    assert m["dice"]["17"] == pytest.approx(2 * 32 / (64 + 32))
    assert m["aspc_pct"]["17"] == pytest.approx(100 * 32 / 48)
    assert m["hippocampus_aspc_pct"] == pytest.approx(100 * 32 / 48 / 2)


def test_image_metrics_identical_and_noisy() -> None:
    rng = np.random.default_rng(0)
    target = rng.random((20, 20, 20)).astype(np.float32)
    mask = np.zeros_like(target, dtype=bool)
    mask[5:15, 5:15, 5:15] = True
    same = evaluate.image_metrics(target, target, mask)
    assert same["ssim"] == pytest.approx(1.0) and same["psnr_db"] == float("inf")
    noisy = evaluate.image_metrics(target + 0.1, target, mask)
    assert noisy["psnr_db"] == pytest.approx(20.0, abs=0.01)


@pytest.mark.heavy
@requires_shared_data
def test_train_two_steps_and_resume(tmp_path: Path) -> None:
    args = ["--model-id", "t", "--steps", "2", "--crop", "32", "--base", "4", "--levels", "3",
            "--workers", "0", "--out", str(tmp_path), "--data", str(SHARED_DATA)]
    train.main(args)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2
    train.main([*args[:3], "3", *args[4:]])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 3
    assert len((tmp_path / "training_log.csv").read_text().splitlines()) == 4


def test_warmup_curriculum_draws_only_the_warmup_kinds() -> None:
    stream = train.SampleStream(SYNTHSEG, 32, 0, 0, True, ("aahead_scout", "t1_2d"), 10)
    gen = torch.Generator().manual_seed(0)
    early = {stream.kind_for(step, gen) for step in range(10)}
    assert early == {"aahead_scout", "t1_2d"}
    assert stream.kind_for(10, gen) is None  # afterwards: the generator's own mix of every kind
    assert train.SampleStream(SYNTHSEG, 32, 0, 0, True).kind_for(0, gen) is None


def test_kinds_restrict_the_samples_after_the_warmup() -> None:
    stream = train.SampleStream(SYNTHSEG, 32, 0, 0, True, ("aahead_scout",), 5, kinds=("flair", "cor_t2"))
    gen = torch.Generator().manual_seed(0)
    assert {stream.kind_for(step, gen) for step in range(5)} == {"aahead_scout"}
    assert {stream.kind_for(step, gen) for step in range(5, 60)} == {"flair", "cor_t2"}
    assert {train.SampleStream(SYNTHSEG, 32, 0, 0, True, kinds=("t1_2d",)).kind_for(0, gen)} == {"t1_2d"}


def test_unknown_kinds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        train.main(["--model-id", "t", "--steps", "1", "--kinds", "flair,dwi", "--out", str(tmp_path)])
    assert not (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(SystemExit):
        train.main(["--model-id", "t", "--steps", "1", "--init-from", str(tmp_path / "absent.pt"), "--out",
                    str(tmp_path)])


@pytest.mark.heavy
@requires_shared_data
def test_fine_tune_from_another_run_on_one_kind(tmp_path: Path) -> None:
    base = ["--steps", "1", "--workers", "0", "--data", str(SHARED_DATA), "--warmup", "0"]
    train.main(["--model-id", "a", "--crop", "32", "--base", "4", "--levels", "3", "--out", str(tmp_path / "a"),
                *base])
    source = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    # the command line's network options are ignored: the fine-tune keeps the source's network and crop
    train.main(["--model-id", "b", "--kinds", "flair", "--init-from", str(tmp_path / "a" / "checkpoint.pt"),
                "--base", "8", "--crop", "64", "--out", str(tmp_path / "b"), *base])
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert state["config"] == source["config"] and state["crop"] == 32
    assert state["step"] == 1 and state["kinds"] == ["flair"]
    assert state["init_from"] == {"path": str(tmp_path / "a" / "checkpoint.pt"), "step": 1}
    assert (tmp_path / "b" / "training_log.csv").read_text().splitlines()[1].endswith(",flair")
    # started from the source's weights: one small step away from them, far closer than a fresh network
    fresh = build_network(source["config"]).state_dict()
    def distance(a: dict, b: dict) -> float:
        return sum(float((a[k].float() - b[k].float()).abs().sum()) for k in a if a[k].is_floating_point())
    assert distance(state["model"], source["model"]) < 0.2 * distance(fresh, source["model"])
    dest = tmp_path / "models"
    export.main(["--model-id", "b", "--checkpoint", str(tmp_path / "b" / "checkpoint.pt"), "--out", str(dest)])
    assert load_manifest(dest / "b" / "manifest.toml").input_kinds == ["flair"]
    card = (dest / "b" / "MODEL_CARD.md").read_text()
    assert "fine-tuned from" in card and "input kinds flair only" in card
    for log, kind in (("training_log.csv", "flair"), (export.INIT_LOG, None)):
        rows = (dest / "b" / log).read_text().splitlines()
        assert len(rows) == 2 and (kind is None or rows[1].endswith(f",{kind}"))


def test_instance_normalised_export_runs_on_the_head_box_in_tiles_of_the_training_crop(tmp_path: Path) -> None:
    config = {"arch": "coarse", "n_labels": 33, "base": 4, "levels": 2, "norm": "instance"}
    ckpt = tmp_path / "weights.pt"
    torch.save({"model": build_network(config).state_dict(), "step": 5, "config": config, "crop": 64}, ckpt)
    export.main(["--model-id", "synth-x", "--checkpoint", str(ckpt), "--out", str(tmp_path / "models")])
    manifest = load_manifest(tmp_path / "models" / "synth-x" / "manifest.toml")
    assert manifest.tiling.tile == (64, 64, 64) and manifest.tiling.overlap == 16  # a quarter of the tile
    assert manifest.input.foreground_margin == export.FOREGROUND_MARGIN
    export.main(["--model-id", "synth-x", "--checkpoint", str(ckpt), "--out", str(tmp_path / "models"),
                 "--tile", "96", "--overlap", "8"])
    manifest = load_manifest(tmp_path / "models" / "synth-x" / "manifest.toml")
    assert manifest.tiling.tile == (96, 96, 96) and manifest.tiling.overlap == 8


def test_export_writes_a_fresh_bundle_without_stale_metrics(tmp_path: Path) -> None:
    config = {"arch": "coarse", "n_labels": 33, "base": 4, "levels": 2}
    ckpt = tmp_path / "weights.pt"
    torch.save({"model": build_network(config).state_dict(), "step": 17, "config": config, "crop": 32}, ckpt)
    dest = tmp_path / "models" / "synth-x"
    dest.mkdir(parents=True)
    (dest / "metrics.json").write_text("{}")  # from weights that are about to be replaced
    export.main(["--model-id", "synth-x", "--checkpoint", str(ckpt), "--out", str(tmp_path / "models")])
    manifest = load_manifest(dest / "manifest.toml")
    assert manifest.id == "synth-x" and manifest.input.divisible_by == 4  # 2 levels at 2 mm
    assert manifest.metrics == {"info": {"train_step": 17}}
    assert manifest.tiling.tile == (192, 192, 192) and manifest.tiling.overlap == 16  # batch norm: any tile
    assert manifest.input.foreground_margin is None
    assert not (dest / "metrics.json").exists()
    card = (dest / "MODEL_CARD.md").read_text()
    assert card.startswith("# synth-x") and "checkpoint step 17" in card and "PLACEHOLDER" not in card
    session = onnxruntime.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    t1, seg = session.run(["t1", "seg"], {"image": np.zeros((1, 1, 16, 16, 16), np.float32)})
    assert t1.shape == (1, 1, 16, 16, 16) and seg.shape == (1, 33, 16, 16, 16)


def test_readme_table_lists_every_bundled_model_general_first(tmp_path: Path) -> None:
    row = {"psnr_db": 20.0, "ssim": 0.7, "dice_major": 0.7, "dice_all_structures": 0.6, "hippocampus_dice": 0.6,
           "hippocampus_aspc_pct": 12.0}
    bundles = {"synth-t1-flair": (["flair"], "synth-t1", {"held_out_flair": row}),
               "synth-t1": (["flair", "any"], None, {"held_out_flair": {**row, "dice_major": 0.65},
                                                     "held_out_any": {**row, "dice_major": 0.45}})}
    for name, (kinds, segmenter, summary) in bundles.items():
        (tmp_path / "models" / name).mkdir(parents=True)
        info = {"evaluated": "2026-12-01 22:00 UTC", "train_step": 200, "kinds": kinds}
        if segmenter:
            info["mprage_segmenter"] = segmenter
        (tmp_path / "models" / name / "metrics.json").write_text(json.dumps({"info": info, "summary": summary}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{evaluate.README_START}\nold\n{evaluate.README_END}\n\nafter\n")
    evaluate.update_readme(readme, tmp_path / "models")
    text = readme.read_text()
    assert "old" not in text and text.endswith("\n\nafter\n")
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [r.split(" | ")[0:2] for r in rows] == [["| `synth-t1`", "held-out label maps, flair"],
                                                   ["| `synth-t1`", "held-out label maps, any"],
                                                   ["| `synth-t1-flair`", "held-out label maps, flair"]]
    assert "0.650" in rows[0] and "0.450" in rows[1] and "0.700" in rows[2]
    assert ("`python -m inference.training.evaluate --model onnx_models/synth-t1-flair --kinds flair --segmenter "
            "onnx_models/synth-t1`") in text
    assert "| – | AutoAlign paper" in text


@requires_shared_data
def test_mprage_consistency_uses_the_given_segmenter(tmp_path: Path) -> None:
    """A per-kind model is checked on T1 input: the reference and the synthetic T1 are segmented by the general
    model, and the record says which model that was."""
    from inference.models import ModelRegistry
    from tests.onnx_fixtures import make_synthesis_model

    make_synthesis_model(tmp_path, model_id="per-kind", tile=(64, 64, 64), divisible_by=8)
    make_synthesis_model(tmp_path, model_id="general", tile=(64, 64, 64), divisible_by=8)
    registry = ModelRegistry(tmp_path, providers="cpu", threads=1)
    model, general = registry.session("per-kind"), registry.session("general")
    out = evaluate.evaluate_mprage(model, SHARED_DATA, ["t1_2d"], 0, general)
    assert out["reference"]["segmenter"] == "general"
    assert set(out["t1_2d"]) == {"psnr_db_vs_reference_t1", "ssim_vs_reference_t1", "synthetic_t1_segmented",
                                 "direct_segmentation"}
    assert evaluate.evaluate_mprage(model, SHARED_DATA, [], 0)["reference"]["segmenter"] == "per-kind"


def test_one_input_normalisation_for_training_export_and_serving() -> None:
    """The generator, the exported manifest and the manifest's defaults normalise the same way."""
    from inference.normalization import SYNTHESIS_INPUT

    exported = InputSpec(**export.manifest_dict("synth-test", version="0.0.1", tile=96, divisible_by=8)["input"])
    default = InputSpec(name="image")
    for spec in (exported, default):
        assert (spec.normalization, spec.p_low, spec.p_high, spec.clip_max) == (
            "percentile", SYNTHESIS_INPUT.p_low, SYNTHESIS_INPUT.p_high, SYNTHESIS_INPUT.clip_max)
    vol = np.random.default_rng(0).gamma(2.0, 50.0, size=(12, 12, 12)).astype(np.float32)
    ours = generator.normalize_percentile(torch.from_numpy(vol)).numpy()  # the generator's defaults
    np.testing.assert_allclose(ours, normalize(vol, default), atol=1e-3)

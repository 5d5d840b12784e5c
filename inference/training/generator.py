"""SynthSR-style training data: synthetic scans of each input kind generated from whole-head label maps.

Label maps are the 20 SynthSeg training maps (FreeSurfer aseg codes plus extra-cerebral classes), reoriented to
LPS so that volumes are numpy/torch arrays [k, j, i] of an LPS image (axis 0 = S, 1 = P, 2 = L), exactly what
the node's pipeline feeds the network. One sample = random crop of a label map → random affine + smooth elastic
deformation (nearest neighbour) → optional left-right flip with L/R label swap → per-label Gaussian intensities →
bias field → acquisition of the input kind (resolution, slice profile, noise, Gibbs ringing) → back to 1 mm →
percentile normalisation. Targets: an MPRAGE-like T1 made from the same deformed labels with fixed T1 prior mean
intensities, and the 33-class segmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from inference.labels import ASEG_LEFT, ASEG_RIGHT
from inference.normalization import SYNTHESIS_INPUT

INPUT_KINDS: tuple[str, ...] = ("aahead_scout", "flair", "cor_t2", "t1_2d", "any")
KIND_WEIGHTS: tuple[float, ...] = (0.3, 0.15, 0.15, 0.2, 0.2)

# Output segmentation: channel c <-> FreeSurfer code SEG_LABELS[c].
SEG_LABELS: tuple[int, ...] = (
    0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28,
    41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60,
)
# Generation labels that are folded into a segmentation label (SynthSeg's own sub-classes); others absent -> 0.
SEG_FOLD: dict[int, int] = {25: 2, 57: 41, 136: 4, 137: 5, 163: 43, 164: 44}

# Label maps never trained on (evaluation only).
HELD_OUT: tuple[str, ...] = ("training_seg_17", "training_seg_18", "training_seg_19", "training_seg_20")

AIR_MARGIN = 8  # voxels of background padded around each (head-cropped) training label map
CEREBRUM_CODES = (2, 3, 41, 42)  # cerebral white matter and cortex: where training crops are centred
# where crops are centred: 85 % in the middle of the cerebrum, 10 % anywhere in the brain box (which reaches
# down the spinal CSF), 5 % anywhere in the padded head
CENTRE_WEIGHTS = (0.85, 0.10, 0.05)
T1_TARGET_DIVISOR = 200.0  # target T1 = fixed prior mean / 200, clipped to 0..1 (WM ≈ 0.80, cortex ≈ 0.48)

# Fixed T2 / FLAIR class means for the brain classes of generation_classes_contrast_specific (index = class).
# Classes: 0 bg, 1 CSF, 2 WM, 3 GM-like (cortex, caudate, hippocampus, amygdala, accumbens), 4 cerebellar WM,
# 5 cerebellar cortex, 6 thalamus, 7 putamen, 8 pallidum, 9 ventral DC, 10 WM lesion (25/57), 11 vessel,
# 12 choroid-like (136/137/163/164), 13 brainstem. T2 values follow SynthSR's T2 priors; FLAIR is hand-set
# (CSF suppressed, GM > WM, lesions bright). Classes 14..24 (extra-cerebral) are drawn at random.
T2_MEANS = np.array([5, 238, 72, 97, 70, 100, 79, 65, 40, 61, 150, 30, 133, 65], dtype=np.float64)
FLAIR_MEANS = np.array([5, 25, 95, 125, 92, 118, 108, 112, 98, 96, 190, 40, 60, 100], dtype=np.float64)


def synthseg_dir(shared_data: Path) -> Path:
    """Folder of the SynthSeg label maps and priors inside the shared data folder."""
    return shared_data / "labels" / "synthseg"


@dataclass(frozen=True)
class Priors:
    """Generation labels, their classes and the T1 GMM priors of SynthSeg."""

    generation_labels: np.ndarray  # [54] FreeSurfer/SynthSeg codes, index 0 is background
    generation_classes: np.ndarray  # [54] 48 classes, L/R tied (used for random contrast)
    contrast_classes: np.ndarray  # [54] 25 classes indexing the T1 priors
    t1_means: np.ndarray  # [2, 25] mean and std of the class mean
    t1_stds: np.ndarray  # [2, 25] mean and std of the class std
    seg_index: np.ndarray  # [54] channel index into SEG_LABELS
    lr_swap: np.ndarray  # [54] generation index of the contralateral label (itself if unpaired)

    @property
    def t1_target_lut(self) -> np.ndarray:
        """Target T1 (0..1) per generation index, from the T1 prior class means."""
        return np.clip(self.t1_means[0][self.contrast_classes] / T1_TARGET_DIVISOR, 0.0, 1.0).astype(np.float32)


PRIOR_FILES: dict[str, str] = {  # Priors field -> file in labels_classes_priors/ (and key in a pack)
    "generation_labels": "generation_labels.npy",
    "generation_classes": "generation_classes.npy",
    "contrast_classes": "generation_classes_contrast_specific.npy",
    "t1_means": "prior_means_t1.npy",
    "t1_stds": "prior_stds_t1.npy",
}


def priors_from_arrays(arrays: dict[str, np.ndarray]) -> Priors:
    """Priors from SynthSeg's five arrays (keys of PRIOR_FILES), with the derived segmentation and L/R tables."""
    labels = np.asarray(arrays["generation_labels"]).astype(np.int64)
    seg_index = np.zeros(len(labels), dtype=np.int64)
    for n, lab in enumerate(labels):
        code = SEG_FOLD.get(int(lab), int(lab))
        seg_index[n] = SEG_LABELS.index(code) if code in SEG_LABELS else 0
    pos = {int(v): n for n, v in enumerate(labels)}
    lr_swap = np.arange(len(labels))
    for a, b in zip(ASEG_LEFT, ASEG_RIGHT, strict=True):
        lr_swap[pos[a]], lr_swap[pos[b]] = pos[b], pos[a]
    return Priors(
        generation_labels=labels,
        generation_classes=np.asarray(arrays["generation_classes"]).astype(np.int64),
        contrast_classes=np.asarray(arrays["contrast_classes"]).astype(np.int64),
        t1_means=np.asarray(arrays["t1_means"]),
        t1_stds=np.asarray(arrays["t1_stds"]),
        seg_index=seg_index,
        lr_swap=lr_swap,
    )


def load_priors(root: Path) -> Priors:
    """Read SynthSeg's label/class/prior arrays from `root` (the labels/synthseg folder)."""
    d = root / "labels_classes_priors"
    return priors_from_arrays({field: np.load(d / name) for field, name in PRIOR_FILES.items()})


def load_label_map(path: Path, priors: Priors) -> np.ndarray:
    """Label map reoriented to LPS as uint8 generation indices [k, j, i], cropped to its non-zero box."""
    import SimpleITK as sitk  # here, not at the top: a packed training set (pack_label_maps) needs no SimpleITK

    img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    codes = sitk.GetArrayFromImage(img).astype(np.int64)
    lut = np.zeros(int(priors.generation_labels.max()) + 1, dtype=np.uint8)
    lut[priors.generation_labels] = np.arange(len(priors.generation_labels), dtype=np.uint8)
    idx = lut[np.clip(codes, 0, len(lut) - 1)]
    nz = np.nonzero(idx)
    box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in nz)
    return np.ascontiguousarray(idx[box])


def label_map_paths(root: Path, *, held_out: bool) -> list[Path]:
    """Training (held_out=False) or held-out (held_out=True) label map files, sorted by name."""
    paths = sorted((root / "training_label_maps").glob("*.nii.gz"))
    return [p for p in paths if (p.name.removesuffix(".nii.gz") in HELD_OUT) == held_out]


def pack_label_maps(root: Path, out: Path, names: tuple[str, ...] = ()) -> None:
    """Write the priors and every label map of `root` (or those in `names`), as `load_label_map` returns them,
    into one compressed .npz: a training set that travels (~10 MB) and loads without SimpleITK or NIfTI."""
    priors = load_priors(root)
    arrays: dict[str, np.ndarray] = {f"priors/{field}": getattr(priors, field) for field in PRIOR_FILES}
    for held_out in (False, True):
        for path in label_map_paths(root, held_out=held_out):
            name = path.name.removesuffix(".nii.gz")
            if not names or name in names:
                arrays[f"map/{name}"] = load_label_map(path, priors)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)


def label_map_names(source: Path, *, held_out: bool) -> list[str]:
    """Names of the training (held_out=False) or held-out maps of a SynthSeg folder or pack, sorted, unread."""
    if source.is_file():
        with np.load(source) as pack:
            names = sorted(k.removeprefix("map/") for k in pack.files if k.startswith("map/"))
        return [n for n in names if (n in HELD_OUT) == held_out]
    return [p.name.removesuffix(".nii.gz") for p in label_map_paths(source, held_out=held_out)]


def load_label_maps(source: Path, *, held_out: bool) -> tuple[Priors, list[str], list[np.ndarray]]:
    """(priors, names, index maps) of the training (held_out=False) or held-out maps, sorted by name, from the
    SynthSeg folder or from a pack written by `pack_label_maps` (a file)."""
    if source.is_file():
        names = label_map_names(source, held_out=held_out)
        with np.load(source) as pack:
            priors = priors_from_arrays({field: pack[f"priors/{field}"] for field in PRIOR_FILES})
            return priors, names, [pack[f"map/{n}"] for n in names]
    priors = load_priors(source)
    paths = label_map_paths(source, held_out=held_out)
    return priors, [p.name.removesuffix(".nii.gz") for p in paths], [load_label_map(p, priors) for p in paths]


# ---------------------------------------------------------------------------------------------- spatial


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    a, b, c = (float(v) for v in angles)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def deformed_crop(
    index_map: np.ndarray,
    size: int,
    gen: torch.Generator,
    *,
    max_rotation_deg: float = 15.0,
    scaling: float = 0.15,
    elastic_mm: float = 3.0,
    centre_box: tuple[tuple[int, int], ...] | None = None,
) -> torch.Tensor:
    """Random crop [size]^3 of a generation-index map, with random affine + smooth elastic deformation.

    The source crop (with margin) is cut first and only it is resampled (nearest neighbour).
    """
    margin = int(math.ceil(size * 0.35)) + 4
    src = size + 2 * margin
    shape = np.array(index_map.shape)
    if centre_box is None:
        centre_box = tuple((0, int(n)) for n in shape)
    # crop centre: uniform inside centre_box (e.g. the brain's bounding box)
    centre = [int(a + torch.randint(0, max(1, b - a), (1,), generator=gen)) for a, b in centre_box]
    start = [c - src // 2 for c in centre]
    crop = np.zeros((src, src, src), dtype=np.uint8)
    s_from = [max(0, s) for s in start]
    s_to = [min(int(shape[a]), start[a] + src) for a in range(3)]
    crop[tuple(slice(f - s, t - s) for f, t, s in zip(s_from, s_to, start, strict=True))] = index_map[
        tuple(slice(f, t) for f, t in zip(s_from, s_to, strict=True))
    ]
    angles = (torch.rand(3, generator=gen) * 2 - 1) * math.radians(max_rotation_deg)
    scale = 1 + (torch.rand(3, generator=gen) * 2 - 1) * scaling
    shear = (torch.rand(3, 3, generator=gen) * 2 - 1) * 0.03
    shear.fill_diagonal_(0)
    affine = _rotation(angles) @ (torch.diag(scale) + shear)
    # output voxel coordinates (x=i, y=j, z=k order for grid_sample), centred, in voxels
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    coords = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3) @ affine.T.float()
    coords = coords.reshape(size, size, size, 3)
    ctrl = torch.randn(1, 3, 4, 4, 4, generator=gen) * _uniform(gen, 0.0, elastic_mm)
    disp = F.interpolate(ctrl, size=(size, size, size), mode="trilinear", align_corners=True)
    coords = coords + disp[0].permute(1, 2, 3, 0)
    grid = (coords / ((src - 1) / 2)).unsqueeze(0)
    vol = torch.from_numpy(crop).float()[None, None]
    out = F.grid_sample(vol, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return out[0, 0].round().long()


def flip_left_right(index_crop: torch.Tensor, priors: Priors) -> torch.Tensor:
    """Mirror along i (patient left-right, last array axis of LPS) and swap left/right labels."""
    return torch.from_numpy(priors.lr_swap)[index_crop.flip(-1)]


# ---------------------------------------------------------------------------------------------- intensity


def sample_contrast(kind: str, priors: Priors, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per generation index class means and standard deviations (0..255 scale) for an input kind."""
    n_cls = int(priors.contrast_classes.max()) + 1
    if kind == "any":
        n_rand = int(priors.generation_classes.max()) + 1
        means = torch.rand(n_rand, generator=gen) * 255
        stds = torch.rand(n_rand, generator=gen) * 25
        cls = torch.from_numpy(priors.generation_classes)
        return means[cls], stds[cls]
    if kind in ("aahead_scout", "t1_2d"):
        pm = torch.from_numpy(priors.t1_means).float()
        ps = torch.from_numpy(priors.t1_stds).float()
        means = pm[0] + pm[1] * torch.randn(n_cls, generator=gen)
        stds = ps[0] + ps[1] * torch.randn(n_cls, generator=gen)
        if kind == "aahead_scout":  # weak grey/white contrast of the fast 3D FLASH localizer
            brain = torch.arange(2, 14)
            centre = 0.5 * (means[2] + means[3])
            means[brain] = centre + _uniform(gen, 0.25, 0.7) * (means[brain] - centre)
    else:
        table = torch.from_numpy(T2_MEANS if kind == "cor_t2" else FLAIR_MEANS).float()
        means = torch.rand(n_cls, generator=gen) * 200 + 10
        means[: len(table)] = table + 12 * torch.randn(len(table), generator=gen)
        stds = 3 + torch.rand(n_cls, generator=gen) * 12
    means[0] = _uniform(gen, 0.0, 10.0)
    stds[0] = _uniform(gen, 0.0, 3.0)
    cls = torch.from_numpy(priors.contrast_classes)
    return means.clamp(min=0)[cls], stds.clamp(min=0.5)[cls]


def bias_field(shape: tuple[int, ...], gen: torch.Generator, strength: float) -> torch.Tensor:
    """Smooth multiplicative field exp(N(0, strength)) from a 4^3 control grid."""
    ctrl = torch.randn(1, 1, 4, 4, 4, generator=gen) * strength
    return torch.exp(F.interpolate(ctrl, size=shape, mode="trilinear", align_corners=True)[0, 0])


# ---------------------------------------------------------------------------------------------- acquisition


def gaussian_blur_axis(x: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    """1-D Gaussian blur (sigma in voxels) of a 3-D tensor along `axis`, edge-replicated."""
    if sigma < 0.1:
        return x
    radius = int(math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    moved = x.movedim(axis, -1)
    shp = moved.shape
    flat = F.pad(moved.reshape(-1, 1, shp[-1]), (radius, radius), mode="replicate")
    return F.conv1d(flat, kernel).reshape(shp).movedim(-1, axis)


def _linear_sample(x: torch.Tensor, positions: torch.Tensor, axis: int) -> torch.Tensor:
    n = x.shape[axis]
    p = positions.clamp(0, n - 1)
    i0 = p.floor().long().clamp(max=n - 2) if n > 1 else torch.zeros_like(p, dtype=torch.long)
    w = (p - i0).float()
    a = x.index_select(axis, i0)
    b = x.index_select(axis, (i0 + 1).clamp(max=n - 1))
    shape = [1] * x.dim()
    shape[axis] = -1
    w = w.view(shape)
    return a * (1 - w) + b * w


def simulate_acquisition(
    image: torch.Tensor,
    resolution: tuple[float, float, float],
    spacing: tuple[float, float, float],
    noise_std: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """Blur each axis with a Gaussian of FWHM = resolution (mm), sample every `spacing` mm (random offset),
    add Gaussian noise at the acquired resolution, and resample linearly back to the 1 mm grid."""
    x = image
    for axis in range(3):
        if resolution[axis] > 1.0:
            x = gaussian_blur_axis(x, resolution[axis] / 2.3548, axis)
    positions = []
    for axis in range(3):
        n = x.shape[axis]
        if spacing[axis] > 1.05:
            offset = _uniform(gen, 0.0, spacing[axis])
            pos = torch.arange(offset, n - 1 + 1e-6, spacing[axis])
            if len(pos) < 2:
                pos = torch.tensor([0.0, float(n - 1)])
            positions.append(pos)
            x = _linear_sample(x, pos, axis)
        else:
            positions.append(None)
    x = x + noise_std * torch.randn(x.shape, generator=gen)
    for axis in range(3):
        pos = positions[axis]
        if pos is None:
            continue
        # fractional index of every 1 mm voxel in the acquired sample list (edge values held)
        grid = torch.arange(image.shape[axis], dtype=torch.float32)
        frac = (grid - pos[0]) / float(pos[1] - pos[0])
        x = _linear_sample(x, frac, axis)
    return x.clamp(min=0)


def simulate_kspace_truncation(
    image: torch.Tensor, resolution_mm: float, noise_std: float, gen: torch.Generator
) -> torch.Tensor:
    """3-D acquisition at `resolution_mm` by truncating k-space (Gibbs ringing), complex Gaussian noise,
    magnitude, then trilinear resampling back to the 1 mm grid."""
    shape = image.shape
    k = torch.fft.fftshift(torch.fft.fftn(image), dim=(0, 1, 2))
    lr = [max(2, int(round(n / resolution_mm))) for n in shape]
    sl = tuple(slice((n - m) // 2, (n - m) // 2 + m) for n, m in zip(shape, lr, strict=True))
    k_lr = torch.fft.ifftshift(k[sl], dim=(0, 1, 2))
    scale = float(np.prod(lr)) / float(np.prod(shape))
    img_lr = torch.fft.ifftn(k_lr) * scale
    noise = torch.complex(torch.randn(img_lr.shape, generator=gen), torch.randn(img_lr.shape, generator=gen))
    mag = (img_lr + noise_std * noise).abs().float()
    return F.interpolate(mag[None, None], size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]


def acquire(image: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Simulate the acquisition of one input kind on a 1 mm image (0..255 scale); result on the 1 mm grid."""
    if kind == "aahead_scout":
        return simulate_kspace_truncation(image, _uniform(gen, 1.5, 1.8), _uniform(gen, 4.0, 14.0), gen)
    if kind == "flair":  # 2D axial: slices along S (axis 0)
        thick = _uniform(gen, 3.0, 7.0)
        inplane = _uniform(gen, 0.7, 1.3)
        res = (thick, inplane, inplane)
        spacing = (thick * _uniform(gen, 1.0, 1.3), inplane, inplane)
        return simulate_acquisition(image, res, spacing, _uniform(gen, 1.0, 8.0), gen)
    if kind == "cor_t2":  # coronal: slices along P (axis 1)
        thick = _uniform(gen, 3.0, 5.0)
        inplane = _uniform(gen, 0.4, 1.0)
        res = (inplane, thick, inplane)
        spacing = (inplane, thick * _uniform(gen, 1.0, 1.3), inplane)
        return simulate_acquisition(image, res, spacing, _uniform(gen, 1.0, 8.0), gen)
    if kind == "t1_2d":  # any plane
        axis = int(torch.randint(0, 3, (1,), generator=gen))
        thick = _uniform(gen, 4.0, 6.0)
        inplane = _uniform(gen, 0.7, 1.2)
        res = [inplane] * 3
        spacing = [inplane] * 3
        res[axis] = thick
        spacing[axis] = thick * _uniform(gen, 1.0, 1.3)
        return simulate_acquisition(image, tuple(res), tuple(spacing), _uniform(gen, 1.0, 8.0), gen)
    if kind == "any":
        if float(torch.rand((), generator=gen)) < 0.3:
            r = _uniform(gen, 1.0, 3.0)
            res = (r, r, r)
            spacing = res
        else:
            axis = int(torch.randint(0, 3, (1,), generator=gen))
            thick = _uniform(gen, 1.0, 8.0)
            res_l = [_uniform(gen, 0.7, 1.5)] * 3
            res_l[axis] = thick
            res = tuple(res_l)
            spacing_l = list(res_l)
            spacing_l[axis] = thick * _uniform(gen, 1.0, 1.3)
            spacing = tuple(spacing_l)
        return simulate_acquisition(image, res, spacing, _uniform(gen, 0.0, 10.0), gen)
    raise ValueError(f"unknown input kind {kind!r}")


# ---------------------------------------------------------------------------------------------- normalisation


def normalize_percentile(
    x: torch.Tensor, p_low: float = SYNTHESIS_INPUT.p_low, p_high: float = SYNTHESIS_INPUT.p_high,
    clip_max: float = SYNTHESIS_INPUT.clip_max,
) -> torch.Tensor:
    """(x - P_low) / (P_high - P_low), clipped to [0, clip_max], percentiles over the non-zero voxels —
    the manifest's normalisation as inference.pipeline.normalize applies it."""
    flat = x.reshape(-1)
    flat = flat[flat != 0]
    if flat.numel() == 0:
        return torch.zeros_like(x)
    if flat.numel() > 2_000_000:
        flat = flat[:: int(math.ceil(flat.numel() / 2_000_000))]
    lo = torch.quantile(flat, p_low / 100)
    hi = torch.quantile(flat, p_high / 100)
    return ((x - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, clip_max)


# ---------------------------------------------------------------------------------------------- samples


@dataclass
class Sample:
    image: torch.Tensor  # [D, H, W] normalised network input
    t1: torch.Tensor  # [D, H, W] target T1 in 0..1
    seg: torch.Tensor  # [D, H, W] int64 channel index into SEG_LABELS
    kind: str


def target_t1(index_crop: torch.Tensor, priors: Priors) -> torch.Tensor:
    """MPRAGE-like target: fixed T1 prior class means (÷200), light partial-volume blur (sigma 0.5 voxel)."""
    t1 = torch.from_numpy(priors.t1_target_lut)[index_crop]
    for axis in range(3):
        t1 = gaussian_blur_axis(t1, 0.5, axis)
    return t1


def simulate_input(index_volume: torch.Tensor, kind: str, priors: Priors, gen: torch.Generator) -> torch.Tensor:
    """Scan of one input kind (0..255 scale, before normalisation) on the 1 mm grid of a generation-index volume:
    random per-label contrast, bias field, acquisition."""
    means, stds = sample_contrast(kind, priors, gen)
    img = means[index_volume] + stds[index_volume] * torch.randn(index_volume.shape, generator=gen)
    img = img.clamp(min=0) * bias_field(tuple(index_volume.shape), gen, _uniform(gen, 0.0, 0.3))
    return acquire(img, kind, gen)


def synthesize(index_crop: torch.Tensor, kind: str, priors: Priors, gen: torch.Generator) -> Sample:
    """Generate input, T1 target and segmentation target from a (deformed) generation-index volume."""
    img = normalize_percentile(simulate_input(index_crop, kind, priors, gen))
    gamma = math.exp(0.2 * float(torch.randn((), generator=gen)))
    img = (img / 1.5).pow(gamma) * 1.5
    # the node normalises whole head volumes, training crops: percentiles differ (air, scalp fat), so the
    # network must tolerate a global intensity scale
    img = (img * _uniform(gen, 0.8, 1.25)).clamp(0, 1.5)
    seg = torch.from_numpy(priors.seg_index)[index_crop]
    return Sample(image=img.float(), t1=target_t1(index_crop, priors), seg=seg, kind=kind)


def brain_box(index_map: np.ndarray, priors: Priors) -> tuple[tuple[int, int], ...]:
    """Bounding box (start, stop) per axis of the voxels with a non-background segmentation label."""
    nz = np.nonzero(priors.seg_index[index_map])
    return tuple((int(a.min()), int(a.max()) + 1) for a in nz)


def cerebrum_box(index_map: np.ndarray, priors: Priors) -> tuple[tuple[int, int], ...]:
    """Bounding box (start, stop) per axis of cerebral white matter and cortex (CEREBRUM_CODES)."""
    wanted = np.isin(priors.generation_labels, CEREBRUM_CODES)
    nz = np.nonzero(wanted[index_map])
    return tuple((int(a.min()), int(a.max()) + 1) for a in nz)


def _shrunk(box: tuple[tuple[int, int], ...], fraction: float) -> tuple[tuple[int, int], ...]:
    out = []
    for a, b in box:
        start = int(a + fraction * (b - a))
        out.append((start, max(start + 1, int(b - fraction * (b - a)))))
    return tuple(out)


class SyntheticDataset:
    """Endless stream of training samples from a list of label maps."""

    def __init__(self, root: Path, *, crop: int = 80, held_out: bool = False) -> None:
        """`root`: the SynthSeg folder (synthseg_dir) or a pack of it (pack_label_maps)."""
        self.priors, self.names, self.maps = load_label_maps(root, held_out=held_out)
        self.crop = crop
        # why the cerebrum: the brain box reaches down the spinal canal, and crops centred in it were 80-90 %
        # background, which the 2026-12-01 run learnt to predict almost everywhere (docs/training.md)
        boxes = [(_shrunk(cerebrum_box(m, self.priors), 0.2), _shrunk(brain_box(m, self.priors), 0.1))
                 for m in self.maps]
        # label maps are cropped to the head: add air around it so that crops also teach the background
        self.maps = [np.pad(m, AIR_MARGIN) for m in self.maps]
        self.centre_boxes = [tuple(tuple((a + AIR_MARGIN, b + AIR_MARGIN) for a, b in box) for box in pair)
                             for pair in boxes]

    def sample(self, gen: torch.Generator, kind: str | None = None) -> Sample:
        if kind is None:
            kind = INPUT_KINDS[int(torch.multinomial(torch.tensor(KIND_WEIGHTS), 1, generator=gen))]
        n = int(torch.randint(0, len(self.maps), (1,), generator=gen))
        where = int(torch.multinomial(torch.tensor(CENTRE_WEIGHTS), 1, generator=gen))
        box = self.centre_boxes[n][where] if where < 2 else None
        crop = deformed_crop(self.maps[n], self.crop, gen, centre_box=box)
        if float(torch.rand((), generator=gen)) < 0.5:
            crop = flip_left_right(crop, self.priors)
        return synthesize(crop, kind, self.priors, gen)


@dataclass
class CoarseSample:
    """A sample pooled to 2 mm for a network that works at 2 mm (networks.CoarseSynthNet)."""

    image: torch.Tensor  # [1, d, h, w] input, 2 x 2 x 2 average of the 1 mm input
    t1: torch.Tensor  # [d, h, w] target T1, 2 x 2 x 2 average
    seg: torch.Tensor  # [C, d, h, w] fraction of each segmentation channel in each 2 mm voxel (soft target)
    kind: str


def pool_sample(sample: Sample, n_labels: int = len(SEG_LABELS)) -> CoarseSample:
    """2 mm version of a 1 mm sample (even sizes): averaged input and T1, per-channel label fractions."""
    d, h, w = (n // 2 for n in sample.seg.shape)
    image = F.avg_pool3d(sample.image[None, None], 2)[0]
    t1 = F.avg_pool3d(sample.t1[None, None], 2)[0, 0]
    k, j, i = torch.meshgrid(torch.arange(2 * d) // 2, torch.arange(2 * h) // 2, torch.arange(2 * w) // 2,
                             indexing="ij")
    block = (k * h + j) * w + i
    flat = torch.zeros(n_labels * d * h * w, dtype=torch.float32)
    flat.index_add_(0, (sample.seg * (d * h * w) + block).reshape(-1), torch.full((8 * d * h * w,), 0.125))
    return CoarseSample(image=image, t1=t1, seg=flat.view(n_labels, d, h, w), kind=sample.kind)


def main(argv: list[str] | None = None) -> None:
    """python -m inference.training.generator --data ../shared/data --pack FILE: pack the training set."""
    import argparse

    ap = argparse.ArgumentParser(description="Pack the SynthSeg label maps and priors into one .npz (pack_label_maps)")
    ap.add_argument("--data", type=Path, required=True, help="the shared data folder")
    ap.add_argument("--pack", type=Path, required=True, help="the .npz to write")
    args = ap.parse_args(argv)
    pack_label_maps(synthseg_dir(args.data), args.pack)
    print(f"packed {synthseg_dir(args.data)} into {args.pack} ({args.pack.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

"""Agreement of a synthetic T1 (sT1) with a real 3D T1 of the same head and study.

Method (the metrics of the AutoAlign-localizer evaluation):

* rigid registration of the synthetic T1 (moving) to the real T1 (fixed): Euler3D initialised to the
  identity about the centre of the real brain mask (the two share the Frame of Reference, so the start is
  usually already close; the fields of view may differ, so their centres are not aligned), on copies of
  both resampled to 2 mm (Gaussian pre-smoothed); Mattes mutual information (32 bins) sampled at random
  (20 %, fixed seed) within the real brain mask dilated by 8 mm; regular-step gradient descent (at most 100
  iterations per level) over two levels (4 mm with 2 mm smoothing, then 2 mm). The result is kept only if
  it improves the metric over the initial alignment (evaluated on the 2 mm copies with the same samples),
  so identical images stay exactly aligned;
* the synthetic T1 (linear) and its labels (nearest neighbour) are resampled onto the real T1's grid;
* brain mask = real labels with a code in 1..99 or a measured structure
  (``inference.volumetry.ICV_CODE_LIMIT``: background and
  SynthSeg's extra-cerebral classes >= 100 excluded) and inside the synthetic field of view;
* intensity matching: each image is divided by its own 99th percentile within the brain mask (a scale-only
  match: both are zero outside the head, and the percentile ignores a few bright vessels). PSNR (dB) and
  SSIM are computed within the mask on the matched images (``inference.metrics``: data range = that of the
  real image within the mask);
* per measured structure (``inference.labels.STRUCTURES``, present in either label map): Dice of the real
  labels against the resampled synthetic labels, and ASPC of the volumes, each volume measured on its own
  native grid (as the volumetry reports them). Both maps are first put in one label set: when one holds the
  cortex by lobe and the corpus callosum (the segmenter's) and the other the whole cortex of each side (a
  synthesis model's own labels), both are compared as whole cortex, the callosum in the white matter of its nearer
  side (``inference.labels.aseg_view``); structures the caller says the synthetic labels never hold (a model's
  ``unlabelled`` classes) are left out.

The transform maps points of the real T1 onto the synthetic T1 (LPS, mm): x' = R (x - c) + c + t, with
R = Rz Rx Ry (ITK's Euler3D order; ``rotation_deg`` = the angles about x, y, z) and ``translation_mm`` = t.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from inference.labels import LOBE_CORTEX_CODES, STRUCTURES, aseg_view
from inference.metrics import aspc, dice, psnr, ssim, volumes_ml
from inference.volume import resample_isotropic
from inference.volumetry import ICV_CODE_LIMIT

__all__ = ["Agreement", "StructureAgreement", "compare", "register_rigid", "RigidRegistration"]

#: Percentile (within the brain mask) each image is divided by before PSNR and SSIM.
INTENSITY_PERCENTILE = 99.0
SAMPLING_SEED = 20240
SAMPLING_PERCENTAGE = 0.2
HISTOGRAM_BINS = 32
MASK_DILATION_MM = 8.0
LEVELS_MM = (4.0, 2.0)            # target sample spacing per level; shrink factor = round(this / spacing)
SMOOTHING_MM = (2.0, 0.0)
REGISTRATION_SPACING_MM = 2.0
MAX_ITERATIONS = 100
#: Voxels kept around the brain mask for PSNR/SSIM: more than the SSIM Gaussian's radius, so cropping
#: does not change the result.
SSIM_MARGIN = 8


@dataclass(frozen=True)
class RigidRegistration:
    """A rigid transform from the real T1's physical space to the synthetic T1's, and how it was found."""

    transform: sitk.Euler3DTransform
    metric_initial: float         # Mattes MI (negative: lower is better) at the initial alignment
    metric_final: float           # at the transform kept
    iterations: int
    stop_condition: str

    @property
    def translation_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.transform.GetTranslation())  # type: ignore[return-value]

    @property
    def rotation_deg(self) -> tuple[float, float, float]:
        t = self.transform
        return tuple(math.degrees(a) for a in (t.GetAngleX(), t.GetAngleY(), t.GetAngleZ()))  # type: ignore[return-value]

    @property
    def center_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.transform.GetCenter())  # type: ignore[return-value]


@dataclass(frozen=True)
class StructureAgreement:
    code: int                     # FreeSurfer code
    dice: float
    real_ml: float
    synthetic_ml: float
    aspc: float                   # % of the volumes


@dataclass(frozen=True)
class Agreement:
    translation_mm: tuple[float, float, float]
    rotation_deg: tuple[float, float, float]
    center_mm: tuple[float, float, float]
    psnr: float                   # dB; inf for identical images
    ssim: float
    structures: dict[int, StructureAgreement]
    mask_voxels: int              # brain-mask voxels PSNR/SSIM were computed on
    coverage: float               # fraction of the real brain mask inside the synthetic field of view
    registration: RigidRegistration

    @property
    def dice(self) -> dict[int, float]:
        return {code: s.dice for code, s in self.structures.items()}

    @property
    def aspc(self) -> dict[int, float]:
        return {code: s.aspc for code, s in self.structures.items()}

    @property
    def n_structures(self) -> int:
        return len(self.structures)

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.dice.values()))) if self.structures else math.nan

    @property
    def mean_aspc(self) -> float:
        return float(np.mean(list(self.aspc.values()))) if self.structures else math.nan


def _brain_mask(labels: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayViewFromImage(labels)
    mask = sitk.GetImageFromArray((((array > 0) & (array < ICV_CODE_LIMIT))
                                   | np.isin(array, list(STRUCTURES))).astype(np.uint8))
    mask.CopyInformation(labels)
    return mask


def _check(image: sitk.Image, name: str) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{name} must be a scalar 3D image")


def _method(mask: sitk.Image) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING_PERCENTAGE, SAMPLING_SEED)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def _coarse(image: sitk.Image) -> sitk.Image:
    """Float32 copy at REGISTRATION_SPACING_MM (Gaussian pre-smoothing against aliasing); kept if coarser."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    spacing = np.array(image.GetSpacing())
    if spacing.min() >= REGISTRATION_SPACING_MM - 1e-6:
        return image
    sigma = np.sqrt(np.maximum(REGISTRATION_SPACING_MM**2 - spacing**2, 0.0)) / 2.355  # FWHM -> sigma
    smoothed = sitk.SmoothingRecursiveGaussian(image, [float(max(s, 1e-3)) for s in sigma])
    return resample_isotropic(smoothed, REGISTRATION_SPACING_MM)


def register_rigid(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image) -> RigidRegistration:
    """Rigid registration of ``moving`` onto ``fixed`` (the transform maps fixed points to moving points).

    Runs on copies at 2 mm. ``fixed_mask`` (non-zero = inside, on ``fixed``'s grid) restricts the metric
    samples after an 8 mm dilation.
    """
    fixed, moving = _coarse(fixed), _coarse(moving)
    mask = sitk.Resample(sitk.Cast(fixed_mask != 0, sitk.sitkUInt8), fixed, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    radius = [max(1, round(MASK_DILATION_MM / s)) for s in fixed.GetSpacing()]
    mask = sitk.BinaryDilate(mask, radius)
    # Shared Frame of Reference: start from the identity, rotating about the centre of the brain mask.
    # (CenteredTransformInitializer's GEOMETRY mode would align the two fields of view's centres instead,
    # wrong whenever the synthetic series covers another field of view than the real T1.)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(mask)
    if not shape.HasLabel(1):
        raise ValueError("the brain mask is empty")
    initial = sitk.Euler3DTransform()
    initial.SetCenter(shape.GetCentroid(1))

    finest = min(fixed.GetSpacing())
    method = _method(mask)
    method.SetShrinkFactorsPerLevel([max(1, round(level / finest)) for level in LEVELS_MM])
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_MM))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=0.01, numberOfIterations=MAX_ITERATIONS, relaxationFactor=0.8,
        gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    registered = sitk.Euler3DTransform(initial)
    method.SetInitialTransform(registered, inPlace=True)
    method.Execute(fixed, moving)

    check = _method(mask)  # finest level, same samples: did the registration improve on the start?
    check.SetInitialTransform(sitk.Euler3DTransform(initial))
    metric_initial = check.MetricEvaluate(fixed, moving)
    check.SetInitialTransform(sitk.Euler3DTransform(registered))
    metric_final = check.MetricEvaluate(fixed, moving)
    kept = registered if metric_final < metric_initial else initial
    return RigidRegistration(
        transform=kept, metric_initial=float(metric_initial),
        metric_final=float(min(metric_final, metric_initial)),
        iterations=int(method.GetOptimizerIteration()),
        stop_condition=method.GetOptimizerStopConditionDescription())


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, int(hits[0]) - margin), min(mask.shape[axis], int(hits[-1]) + margin + 1)))
    return tuple(box)


def _normalised(values: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
    scale = float(np.percentile(values[mask], INTENSITY_PERCENTILE))
    if not scale > 0:
        raise ValueError(f"{name} has no positive intensity within the brain mask")
    return values / scale


def _check_inputs(real_t1: sitk.Image, real_labels: sitk.Image, synth_t1: sitk.Image,
                  synth_labels: sitk.Image) -> None:
    """ValueError for a non-3D input or a label map off its T1's grid."""
    for image, name in ((real_t1, "real T1"), (real_labels, "real labels"), (synth_t1, "synthetic T1"),
                        (synth_labels, "synthetic labels")):
        _check(image, name)
    for image, labels, name in ((real_t1, real_labels, "real"), (synth_t1, synth_labels, "synthetic")):
        if (image.GetSize() != labels.GetSize()
                or not np.allclose(image.GetOrigin(), labels.GetOrigin(), atol=1e-3)
                or not np.allclose(image.GetSpacing(), labels.GetSpacing(), atol=1e-4)
                or not np.allclose(image.GetDirection(), labels.GetDirection(), atol=1e-4)):
            raise ValueError(f"the {name} labels are not on the {name} T1's grid")


#: FreeSurfer's CSF label: see :func:`compare`
CSF_CODE = 24


def _by_lobe(labels: sitk.Image) -> bool:
    """Whether a label map holds the cortex by lobe (or the corpus callosum): a segmenter's label set."""
    return bool(np.isin(sitk.GetArrayViewFromImage(labels), [*LOBE_CORTEX_CODES, 192]).any())


def _whole_cortex(labels: sitk.Image) -> sitk.Image:
    """``labels`` in the whole-cortex label set (:func:`inference.labels.aseg_view`), on the same grid, the corpus
    callosum given to the white matter of the nearer side (the side of the plane halfway between the two white
    matters' centroids), as a whole-cortex label set holds it."""
    codes = sitk.GetArrayViewFromImage(labels)
    out = aseg_view(codes)
    callosum = np.argwhere(codes == 192)
    left, right = np.argwhere(codes == 2), np.argwhere(codes == 41)
    if len(callosum) and len(left) and len(right):
        to_left = (np.linalg.norm(callosum - left.mean(axis=0), axis=1)
                   <= np.linalg.norm(callosum - right.mean(axis=0), axis=1))
        out[tuple(callosum.T)] = np.where(to_left, 2, 41)
    image = sitk.GetImageFromArray(out.astype(np.uint16))
    image.CopyInformation(labels)
    return image


def common_label_set(real_labels: sitk.Image, synth_labels: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """The two label maps in one label set: as they are when both hold the cortex the same way, else both as
    whole cortex with the corpus callosum in the white matter (a lobe would otherwise be compared with nothing:
    Dice 0, and the mean Dice and ASPC of the agreement skewed)."""
    if _by_lobe(real_labels) == _by_lobe(synth_labels):
        return real_labels, synth_labels
    return _whole_cortex(real_labels), _whole_cortex(synth_labels)


def _structure_agreement(real_labels: sitk.Image, labels_on_real: sitk.Image, synth_labels: sitk.Image,
                         ignore: Collection[int] = ()) -> dict[int, StructureAgreement]:
    """Dice (on the real grid, after registration) and volume ASPC of every structure either side has (but
    those in ``ignore``)."""
    real_codes = sitk.GetArrayViewFromImage(real_labels)
    synth_codes = sitk.GetArrayViewFromImage(labels_on_real)
    real_ml, synth_ml = volumes_ml(real_labels), volumes_ml(synth_labels)
    structures = {}
    for code in STRUCTURES:
        if code in ignore:
            continue
        a, b = real_ml.get(code, 0.0), synth_ml.get(code, 0.0)
        if a == 0.0 and b == 0.0:
            continue
        overlap = dice(real_codes, synth_codes, code)  # nan: only in synthetic labels outside the real grid
        structures[code] = StructureAgreement(code=code, dice=0.0 if math.isnan(overlap) else overlap, real_ml=a,
                                              synthetic_ml=b, aspc=aspc(a, b))
    return structures


def compare(real_t1: sitk.Image, real_labels: sitk.Image, synth_t1: sitk.Image,
            synth_labels: sitk.Image, *, synthetic_unlabelled: Collection[int] = ()) -> Agreement:
    """Register the synthetic T1 to the real T1 and measure their agreement (see the module docstring).

    ``real_labels`` must be on the real T1's grid and ``synth_labels`` on the synthetic T1's (FreeSurfer
    codes). ``synthetic_unlabelled``: structures the synthetic labels never hold (left out of the per-structure
    agreement). ValueError for non-3D inputs, label maps off their image's grid or an empty real brain mask.
    """
    _check_inputs(real_t1, real_labels, synth_t1, synth_labels)
    brain = _brain_mask(real_labels)
    if not sitk.GetArrayViewFromImage(brain).any():
        raise ValueError("the real labels hold no brain (no code in 1..99)")
    ignore = set(synthetic_unlabelled)
    if _by_lobe(real_labels) != _by_lobe(synth_labels):
        # two label families: label 24 is aparc+aseg's small extra-ventricular CSF (about 1 ml) in a segmenter's
        # and SynthSeg's whole CSF around the brain (hundreds of ml) in a synthesis model's own labels: the same
        # code for two things (Dice 0, ASPC 200 in every agreement SR before)
        ignore.add(CSF_CODE)
    real_labels, synth_labels = common_label_set(real_labels, synth_labels)  # (the mask keeps the callosum)

    registration = register_rigid(real_t1, synth_t1, brain)
    transform = registration.transform
    synth_on_real = sitk.Resample(sitk.Cast(synth_t1, sitk.sitkFloat32), real_t1, transform, sitk.sitkLinear,
                                  0.0, sitk.sitkFloat32)
    labels_on_real = sitk.Resample(synth_labels, real_t1, transform, sitk.sitkNearestNeighbor, 0,
                                   synth_labels.GetPixelID())
    field_of_view = sitk.Image(synth_t1.GetSize(), sitk.sitkUInt8) + 1
    field_of_view.CopyInformation(synth_t1)
    inside = sitk.Resample(field_of_view, real_t1, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    brain_array = sitk.GetArrayViewFromImage(brain).astype(bool)
    covered = brain_array & sitk.GetArrayViewFromImage(inside).astype(bool)
    if not covered.any():
        raise ValueError("the synthetic T1 does not cover the real brain after registration")
    box = _bounding_box(covered, SSIM_MARGIN)
    real = _normalised(sitk.GetArrayViewFromImage(real_t1)[box].astype(np.float64), covered[box], "real T1")
    synth = _normalised(sitk.GetArrayViewFromImage(synth_on_real)[box].astype(np.float64), covered[box],
                        "synthetic T1")

    structures = _structure_agreement(real_labels, labels_on_real, synth_labels, ignore)
    return Agreement(
        translation_mm=registration.translation_mm, rotation_deg=registration.rotation_deg,
        center_mm=registration.center_mm, psnr=psnr(real, synth, covered[box]),
        ssim=ssim(real, synth, covered[box]),
        structures=structures, mask_voxels=int(covered.sum()), coverage=float(covered.sum() / brain_array.sum()),
        registration=registration)

"""inference.training.evaluate_real_t1: inputs of each kind's contrast made from a real T1 and its label map."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from inference.training import evaluate_real_t1, generator  # noqa: E402


def _head() -> tuple[np.ndarray, torch.Tensor]:
    """aseg codes of a toy brain (WM 2/41 with a ventricle 4 and cortex 3) in a head, and its 'real T1'."""
    aseg = np.zeros((24, 24, 24), dtype=np.int64)
    aseg[4:20, 4:20, 4:12] = 2
    aseg[4:20, 4:20, 12:20] = 41
    aseg[10:14, 10:14, 8:12] = 4
    aseg[4:6, 4:20, 4:20] = 3
    aseg[12, 12, 12] = 192  # corpus callosum: white matter for the generator
    real = torch.full(aseg.shape, 60.0)
    real[torch.from_numpy(aseg > 0)] = 200.0
    return aseg, real


def test_generation_index_maps_aseg_codes_to_the_generators_labels(priors: generator.Priors) -> None:
    aseg, _ = _head()
    index = evaluate_real_t1.generation_index(aseg, priors)
    assert (priors.generation_labels[index[aseg == 4]] == 4).all()
    assert (priors.generation_labels[index[aseg == 41]] == 41).all()
    assert (index[aseg == 0] == 0).all() and index[12, 12, 12] == 0  # unknown codes: background


def test_kind_contrast_follows_the_kind_inside_the_brain_and_the_real_t1_outside(priors: generator.Priors) -> None:
    aseg, real = _head()
    index = evaluate_real_t1.generation_index(aseg, priors)
    flair = evaluate_real_t1.kind_contrast(real, index, "flair", priors, torch.Generator().manual_seed(0))
    t1 = evaluate_real_t1.kind_contrast(real, index, "t1_2d", priors, torch.Generator().manual_seed(0))
    wm, csf = torch.from_numpy(aseg == 2), torch.from_numpy(aseg == 4)
    # FLAIR suppresses the ventricles below white matter; a T1 keeps them below white matter too, but in both the
    # brain is drawn per label, not copied from the real T1 (which is flat 200 there)
    assert float(flair[csf].mean()) < 0.5 * float(flair[wm].mean())
    assert float(t1[csf].mean()) < 0.5 * float(t1[wm].mean())
    # outside the brain: the real T1 scaled by one factor (times the smooth bias field), never 0 where it is not
    outside = torch.from_numpy(aseg == 0)
    assert float(flair[outside].min()) > 0
    assert float(flair[outside].std() / flair[outside].mean()) < 0.3

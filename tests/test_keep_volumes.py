"""dicom_node.steps.keep_volumes_step: the T1 and labels an agreement check compares, kept losslessly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicom_node.config import Rule
from dicom_node.steps import (
    LABEL_VOLUME,
    T1_VOLUME,
    Images,
    JobContext,
    Measured,
    SeriesNaming,
    keep_volumes_step,
)
from inference.volumetry import compute_volumetry
from tests.volumetry_factory import make_phantom


def test_kept_volumes_are_compressed_and_read_back_unchanged(tmp_path: Path) -> None:
    labels, t1 = make_phantom()
    volumetry = compute_volumetry(labels, t1, age=None, sex=None)
    assert volumetry.structures
    rule = Rule(name="r", series_description="t1", model="m", output_name="sT1")
    ctx = JobContext(1, rule, None, SeriesNaming("sT1", 1, 1), tmp_path, None)  # type: ignore[arg-type]
    kept = keep_volumes_step(ctx, Images(t1, None, None, None), Measured(volumetry, labels, None))
    assert [f.kind for f in kept] == [T1_VOLUME, LABEL_VOLUME]
    for f, image in zip(kept, (t1, labels), strict=True):
        back = sitk.ReadImage(f.path)
        assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
        assert back.GetSpacing() == image.GetSpacing() and back.GetOrigin() == image.GetOrigin()
        raw = image.GetNumberOfPixels() * image.GetSizeOfPixelComponent()
        assert Path(f.path).stat().st_size < raw  # compressed
        assert b"CompressedData = True" in Path(f.path).read_bytes()[:2000]


def test_a_synthesis_models_csf_counts_in_the_icv_only(tmp_path: Path) -> None:
    """An sT1 measured by its model's own labels reported SynthSeg's CSF (all the CSF around the brain, hundreds of
    ml) as "Cerebrospinal fluid", the concept its real T1's SR gives the segmenter's CSF (about 1 ml): now it counts
    in the ICV only, and neither the SEG nor the labels kept for the agreement hold it."""
    from pydicom.dataset import Dataset

    from dicom_node.config import BUNDLED_MODELS_DIR, NodeConfig
    from dicom_node.steps import measure_step
    from inference.models import MANIFEST_FILE, load_manifest
    from inference.volume import LoadedSeries

    manifest = load_manifest(BUNDLED_MODELS_DIR / "synth-t1-t1-2d" / MANIFEST_FILE)
    labels, t1 = make_phantom()
    assert (sitk.GetArrayViewFromImage(labels) == 24).any()
    rule = Rule(name="r", series_description="t1", model="synth-t1-t1-2d", output_name="sT12DT1", volumetry=True)
    ctx = JobContext(1, rule, None, SeriesNaming("sT12DT1", 1, 1), tmp_path, None)  # type: ignore[arg-type]
    measured = measure_step(ctx, NodeConfig(), None, LoadedSeries(t1, [Dataset()], []),  # type: ignore[arg-type]
                            Images(t1, labels, manifest, manifest), {})
    assert measured.volumetry is not None and measured.labels is not None
    assert 24 not in measured.volumetry.structures and 17 in measured.volumetry.structures
    assert not (sitk.GetArrayViewFromImage(measured.labels) == 24).any()
    assert measured.volumetry.icv_ml == compute_volumetry(labels, t1, age=None, sex=None).icv_ml

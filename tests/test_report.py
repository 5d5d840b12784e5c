from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_node.report import ReportError, format_report
from dicom_node.writers.seg import write_seg
from dicom_node.writers.sr import write_sr
from inference.labels import STRUCTURES
from inference.volumetry import Norm, QCLimits, compute_volumetry, with_qc_flag
from tests.volumetry_factory import MODEL_ID, MODEL_VERSION, UID_PREFIX, make_t1_series


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("report")
    series = make_t1_series(folder)
    array = sitk.GetArrayFromImage(series.labels)
    layer = array[np.nonzero(array == 53)[0].max()]
    layer[layer == 53] = 42                        # right hippocampus smaller: positive asymmetry
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(series.labels)
    seg_written = write_seg(labels, series.t1_headers, out_path=folder / "seg.dcm", series_number=1002,
                            series_description="SEG", algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION,
                            uid_prefix=UID_PREFIX)
    return {"folder": folder, "series": series, "labels": labels, "seg_path": seg_written.path,
            "seg": seg_written}


def _report(build: dict, volumetry, name: str) -> str:
    series = build["series"]
    path = write_sr(volumetry, seg=build["seg"], source_images=series.t1_headers,
                    input_series_datasets=series.input_headers, out_path=build["folder"] / name,
                    series_number=1003, series_description=with_qc_flag("sT1AAH volumetry", volumetry),
                    uid_prefix=UID_PREFIX,
                    algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION).path
    return format_report(path)


def _row(text: str, name: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return line[34:].split()


def test_table_shows_every_structure_with_volume_icv_fraction_and_asymmetry(build: dict) -> None:
    volumetry = compute_volumetry(build["labels"], build["series"].t1, age="053Y", sex="F")
    text = _report(build, volumetry, "sr.dcm")
    for code, structure in STRUCTURES.items():
        cells = _row(text, structure.display_name)
        entry = volumetry.structures[code]
        assert float(cells[0]) == pytest.approx(entry.volume_ml, abs=0.005)
        assert float(cells[1]) == pytest.approx(entry.icv_percent, abs=0.005)
    hippocampus = next(p for p in volumetry.asymmetry if p.left_code == 17)
    assert hippocampus.index_percent > 0
    assert float(_row(text, "Left hippocampus")[2]) == pytest.approx(hippocampus.index_percent, abs=0.05)
    assert len(_row(text, "Brainstem")) == 2          # unpaired: no asymmetry
    assert f"Intracranial volume: {volumetry.icv_ml:.1f} ml" in text
    assert f"L {volumetry.hoc['L']:.3f}  R {volumetry.hoc['R']:.3f}" in text
    assert "age 53 y" in text and "sex Female" in text
    assert "Quality control: PASS" in text
    assert " z " not in text.splitlines()[5]          # no normative columns without norms


def test_qc_failure_and_reasons_are_printed(build: dict) -> None:
    volumetry = compute_volumetry(build["labels"], None, age="053Y", sex="F", limits=QCLimits(icv_min_ml=1500))
    text = _report(build, volumetry, "failed.dcm")
    assert "Quality control: FAIL" in text
    assert "sT1AAH volumetry QC FAILED" in text
    assert "FAIL Intracranial volume plausibility: ICV" in text and "outside 1500-2200 ml" in text
    assert "n/a  T1 intensity ordering: not evaluated: no T1 image" in text


def test_norm_columns(build: dict) -> None:
    hv = int((sitk.GetArrayFromImage(build["labels"]) == 17).sum()) * np.prod(build["labels"].GetSpacing()) / 1000
    volumetry = compute_volumetry(build["labels"], None, age="053Y", sex="F",
                                  norms=[Norm(17, 50, 60, None, mean_ml=hv + 0.2, sd_ml=0.1)])
    text = _report(build, volumetry, "norms.dcm")
    assert "pct" in text
    cells = _row(text, "Left hippocampus")
    assert float(cells[3]) == pytest.approx(-2.0) and float(cells[4]) == pytest.approx(2.0, abs=0.5)


def test_not_a_volumetry_report_is_refused(build: dict, tmp_path: Path) -> None:
    with pytest.raises(ReportError):
        format_report(build["seg_path"])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with pytest.raises(ReportError):
        format_report(junk)


def test_undefined_hoc_and_asymmetry_read_n_a(tmp_path: Path, build: dict) -> None:
    """Without a right hippocampus: its HOC and the hippocampal asymmetry read n/a (not 0, 1 or +200 %), on the
    summary page and in the SR's report."""
    from dicom_node.writers.summary import _table_rows

    series = build["series"]
    array = sitk.GetArrayFromImage(series.labels)
    array[array == 53] = 2
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(series.labels)
    volumetry = compute_volumetry(labels, series.t1, age="053Y", sex="F")
    assert "R" not in volumetry.hoc and "L" in volumetry.hoc
    rows = {cells[0]: cells for cells, _ in _table_rows(volumetry)}
    assert rows["Hippocampus"][2] == "absent" and rows["Hippocampus"][3] == "n/a"
    occupancy = rows["Hippocampal occupancy"]
    assert occupancy[2] == "n/a" and occupancy[1] != "n/a"
    seg_written = write_seg(labels, series.t1_headers, out_path=tmp_path / "seg.dcm", series_number=1002,
                            series_description="SEG", algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION,
                            uid_prefix=UID_PREFIX)
    path = write_sr(volumetry, seg=seg_written, source_images=series.t1_headers,
                    input_series_datasets=series.input_headers, out_path=tmp_path / "sr.dcm", series_number=1003,
                    series_description="sT1AAH volumetry", uid_prefix=UID_PREFIX, algorithm_name=MODEL_ID,
                    algorithm_version=MODEL_VERSION).path
    text = format_report(path)
    assert _row(text, "Left hippocampus")[-1] == "n/a"
    assert "Hippocampal occupancy: L " in text and text.rstrip().count("R n/a") >= 1


def test_each_lobe_shows_its_own_asymmetry_and_the_cortex_its_sum(build: dict) -> None:
    """Every lobe row showed "n/a" (its asymmetry was keyed by the finding type, cerebral cortex for every lobe), or
    the whole cortex's asymmetry where labels held 3/42 too; the SR coded a lobe's asymmetry site as the whole lobe.
    The lobes-summed cortex of each side (an SR group of its own) was never printed."""
    from dicom_node.writers.tid1500 import asymmetry_site
    from inference.labels import LOBE_CORTEX_CODES, by_code

    array = sitk.GetArrayFromImage(build["labels"])
    frontal = np.argwhere(array == 1201)
    array[tuple(frontal[: len(frontal) // 2].T)] = 2  # half the left frontal cortex: its own asymmetry only
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(build["labels"])
    volumetry = compute_volumetry(labels, build["series"].t1, age="053Y", sex="F")
    text = _report(build, volumetry, "lobes.dcm")
    lobes = [p for p in volumetry.asymmetry if p.left_code in LOBE_CORTEX_CODES]
    assert len(lobes) == 6 and len({round(p.index_percent, 1) for p in lobes}) > 1
    for pair in lobes:
        cells = _row(text, by_code(pair.left_code).display_name)
        assert float(cells[2]) == pytest.approx(pair.index_percent, abs=0.05), by_code(pair.left_code).display_name
        site = asymmetry_site(pair.left_code)
        assert site.value.value == "40146001" and site.topographical_modifier is not None and site.laterality is None
    without_whole = sitk.GetImageFromArray(np.where(np.isin(array, [3, 42]), 0, array).astype(array.dtype))
    without_whole.CopyInformation(labels)
    summed = compute_volumetry(without_whole, build["series"].t1, age="053Y", sex="F")
    text = _report(build, summed, "lobes-summed.dcm")
    assert (f"Cerebral cortex (its lobes summed): L {summed.cortex_ml['L']:.2f} ml  R {summed.cortex_ml['R']:.2f} ml"
            in text)

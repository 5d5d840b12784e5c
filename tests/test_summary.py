from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import dicom_node
from dicom_node.writers.summary import PAGE_SIZE, write_summary
from inference.volumetry import QC_FAILED_SUFFIX, QCLimits, compute_volumetry, with_qc_flag
from tests.volumetry_factory import (
    EXPORT_LACKS,
    JAPANESE_NAME,
    MODEL_ID,
    MODEL_VERSION,
    UID_PREFIX,
    as_exported,
    as_japanese,
    dciodvfy_errors,
    make_phantom,
    make_t1_series,
    with_invalid_identity,
)

BANNER_ROWS = slice(0, 50)


def _write(build: dict, volumetry, out: Path, *, labels: sitk.Image | None = None, synthetic: bool = True) -> Path:
    series = build["series"]
    return write_summary(volumetry, t1=series.t1, labels=series.labels if labels is None else labels,
                         source_images=series.t1_headers, out_path=out, series_number=1004,
                         # flagged as the job's SeriesNaming flags it (the writer writes the description it is given)
                         series_description=with_qc_flag("sT1AAH summary", volumetry), uid_prefix=UID_PREFIX,
                         algorithm_name=MODEL_ID,
                         algorithm_version=MODEL_VERSION, synthetic=synthetic).path


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("summary")
    series = make_t1_series(folder)
    build = {"series": series, "folder": folder}
    build["volumetry"] = compute_volumetry(series.labels, series.t1, age="053Y", sex="F")
    build["path"] = _write(build, build["volumetry"], folder / "summary.dcm")
    build["ds"] = pydicom.dcmread(build["path"])
    return build


def _mostly(pixels: np.ndarray, rgb: tuple[int, int, int]) -> float:
    """Fraction of pixels within 10 of ``rgb``."""
    return float(np.mean(np.all(np.abs(pixels.astype(int) - rgb) <= 10, axis=-1)))


def test_dciodvfy_reports_no_errors(build: dict) -> None:
    assert dciodvfy_errors(build["path"]) == []


def test_header(build: dict) -> None:
    ds, source = build["ds"], build["series"].t1_headers[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert (ds.Columns, ds.Rows) == PAGE_SIZE
    assert ds.Manufacturer == dicom_node.MANUFACTURER and ds.ManufacturerModelName == dicom_node.MODEL_NAME
    assert f"dicom-node {dicom_node.__version__}" in list(ds.SoftwareVersions)
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.SeriesDescription == "sT1AAH summary"
    assert ds.BurnedInAnnotation == "YES"
    assert "SYNTHETIC" in ds.ImageComments


def test_page_has_banner_qc_box_and_coloured_labels(build: dict) -> None:
    pixels = build["ds"].pixel_array
    assert pixels.shape == (PAGE_SIZE[1], PAGE_SIZE[0], 3)
    assert _mostly(pixels[BANNER_ROWS], (200, 30, 30)) > 0.8           # red synthetic banner
    assert _mostly(pixels[100:160, 640:], (40, 170, 60)) > 0.3            # green QC PASSED box
    panels = pixels[400:]
    # hippocampus overlay: grey blended with FreeSurfer yellow (220, 216, 20): red and green well above blue
    yellow = (panels[..., 0].astype(int) - panels[..., 2] > 60) & (panels[..., 1].astype(int) - panels[..., 2] > 60)
    assert yellow.sum() > 50


def test_no_hippocampus_colour_without_hippocampus(tmp_path: Path, build: dict) -> None:
    series = build["series"]
    array = sitk.GetArrayFromImage(series.labels)
    array[np.isin(array, (17, 53, 26, 58))] = 2     # hippocampi and (orange) accumbens become white matter
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(series.labels)
    volumetry = compute_volumetry(labels, series.t1, age="053Y", sex="F")
    panels = pydicom.dcmread(_write(build, volumetry, tmp_path / "s.dcm", labels=labels)).pixel_array[400:]
    yellow = (panels[..., 0].astype(int) - panels[..., 2] > 60) & (panels[..., 1].astype(int) - panels[..., 2] > 60)
    assert yellow.sum() == 0


def test_qc_failure_is_visible(tmp_path: Path, build: dict) -> None:
    series = build["series"]
    failed = compute_volumetry(series.labels, series.t1, age="053Y", sex="F", limits=QCLimits(icv_max_ml=1100.0))
    path = _write(build, failed, tmp_path / "failed.dcm")
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SeriesDescription == "sT1AAH summary" + QC_FAILED_SUFFIX
    assert "QC FAILED" in ds.ImageComments
    assert _mostly(ds.pixel_array[100:160, 640:], (200, 30, 30)) > 0.3   # red QC FAILED box
    assert _mostly(ds.pixel_array[100:160, 640:], (40, 170, 60)) == 0.0


def test_real_t1_has_no_synthetic_banner(tmp_path: Path, build: dict) -> None:
    ds = pydicom.dcmread(_write(build, build["volumetry"], tmp_path / "real.dcm", synthetic=False))
    assert _mostly(ds.pixel_array[BANNER_ROWS], (200, 30, 30)) < 0.05
    assert _mostly(ds.pixel_array[BANNER_ROWS], (230, 160, 20)) > 0.8
    assert "SYNTHETIC" not in ds.ImageComments


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),      # axial, LPS
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),    # axial, RAS-like flips
    (0, 0, -1, 1, 0, 0, 0, -1, 0),    # sagittal
    (1, 0, 0, 0, 0, 1, 0, -1, 0),     # coronal
    (0, 1, 0, 0, 0, -1, -1, 0, 0),    # permuted and flipped
])
def test_lip_view_is_dicomorient_without_a_copy(direction: tuple[int, ...]) -> None:

    from dicom_node.writers.summary import _centre_k, _lip_view

    rng = np.random.default_rng(0)
    array = rng.integers(0, 60, size=(7, 9, 11)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetDirection([float(v) for v in direction])
    reoriented = sitk.DICOMOrient(image, "LIP")
    view = _lip_view(image)
    assert view is not None
    expected = sitk.GetArrayFromImage(reoriented)
    np.testing.assert_array_equal(view[0], expected)
    assert view[1] == pytest.approx(reoriented.GetSpacing())
    hippocampi = np.argwhere(np.isin(expected, (17, 53)))
    assert _centre_k(view[0]) == pytest.approx(hippocampi.mean(axis=0)[0])


def _page_of(build: dict, sources: list[pydicom.Dataset], tmp_path: Path) -> pydicom.Dataset:
    """The summary page of the build's real T1 written from ``sources`` (checked valid by dciodvfy), read back."""
    series = build["series"]
    path = write_summary(build["volumetry"], t1=series.t1, labels=series.labels, source_images=sources,
                         out_path=tmp_path / "summary.dcm", series_number=1004, series_description="rT1 summary",
                         uid_prefix=UID_PREFIX, algorithm_name=MODEL_ID, algorithm_version=MODEL_VERSION,
                         synthetic=False).path
    assert dciodvfy_errors(path) == []
    return pydicom.dcmread(path)


def test_a_source_without_type2_identity_or_with_a_sex_dicom_forbids(tmp_path: Path, build: dict) -> None:
    ds = _page_of(build, as_exported(build["series"].t1_headers), tmp_path)
    assert all(ds[keyword].value in ("", None) for keyword in (*EXPORT_LACKS, "PatientSex"))


def test_the_page_carries_the_sources_issuer_of_patient_id_and_study_description(tmp_path: Path,
                                                                                  build: dict) -> None:
    """Found in review: the page (a Secondary Capture) carried only the identity highdicom copies: a PACS matching
    patients on ID and issuer held it apart from the study, and study browsers showed no description. Values their
    VR forbids stay out (the page must stay valid)."""
    sources = with_invalid_identity(build["series"].t1_headers)
    for ds in sources:
        ds.IssuerOfPatientID = "HOSP_A"
        ds.StudyDescription = "MRT Schädel"
        ds.SpecificCharacterSet = "ISO_IR 100"
    page = _page_of(build, sources, tmp_path)
    assert page.IssuerOfPatientID == "HOSP_A" and page.StudyDescription == "MRT Schädel"
    assert "PatientAge" not in page and "PatientWeight" not in page


def test_a_japanese_source(tmp_path: Path, build: dict) -> None:
    """SpecificCharacterSet \\ISO 2022 IR 87 (highdicom refuses it as it is): the page goes out, its name in UTF-8."""
    ds = _page_of(build, as_japanese(build["series"].t1_headers), tmp_path)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == JAPANESE_NAME


@pytest.mark.parametrize("wide", [True, False])
def test_two_names_differing_in_an_accent_do_not_look_the_same(wide: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's built-in font draws every letter outside basic Latin as the same box: "Müller" and "Möller" gave
    the same pixels, so the burned-in identity could not tell the two patients apart."""
    from dicom_node.writers import summary
    from dicom_node.writers.not_processed import render_not_processed

    if wide and summary._wide_font() is None:
        pytest.skip("no wide font (fonts-dejavu-core) on this machine")
    if not wide:
        monkeypatch.setattr(summary, "WIDE_FONTS", ())
    pages = [render_not_processed("x", header_lines=[name], footer_lines=[]) for name in ("Müller", "Möller")]
    assert not np.array_equal(*pages)


def test_text_the_font_lacks_is_spelt_in_basic_latin(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.writers import summary

    monkeypatch.setattr(summary, "WIDE_FONTS", ())
    assert summary.drawable("Müller^Jürgen, Straße, Ødegård, Иванов") == "Muller^Jurgen, Strasse, Odegard, ??????"


def test_a_name_is_shown_by_its_alphabetic_group_without_carets() -> None:
    from dicom_node.writers.summary import display_name

    assert display_name(JAPANESE_NAME) == "Yamada, Tarou"
    assert display_name("Müller^Hans^Peter^Dr.") == "Müller, Hans Peter Dr."
    assert display_name("ANONYMOUS") == "ANONYMOUS" and display_name(None) == ""


def test_a_body_part_the_vr_forbids_is_not_copied(tmp_path: Path, build: dict) -> None:
    """A source BodyPartExamined "Kopf" (lowercase, not a Code String) made the page invalid (dciodvfy errors)."""
    sources = [copy.deepcopy(ds) for ds in build["series"].t1_headers]
    for ds in sources:
        ds.BodyPartExamined = "Kopf"
    assert _page_of(build, sources, tmp_path).BodyPartExamined == "BRAIN"


def test_reasons_are_wrapped_to_the_width_they_are_drawn_in() -> None:
    """Wrapped by characters only, a reason of digits and capitals ran past the page's edge in the wider font."""
    from dicom_node.writers.summary import drawable, font, wrap_text

    big, width = font(26), 1024 - 44 - 24
    reason = " ".join(["1.2.826.0.1.3680043.8.498.12345", "WWWWWWWW", "MMMMMMM", "0123456789"] * 6)
    lines = wrap_text(reason, 72, max_lines=20, fit=(big, width))
    assert len(lines) > 2 and all(big.getlength(drawable(line)) <= width for line in lines)
    assert " ".join(lines) == reason


def test_letters_beyond_the_wide_fonts_blocks_are_not_drawn_as_boxes() -> None:
    from dicom_node.writers import summary

    if summary._wide_font() is None:
        pytest.skip("no wide font (fonts-dejavu-core) on this machine")
    # PS3.5's example puts the phonetic group in half-width katakana, which DejaVu Sans lacks
    assert summary.drawable("Ödön Иванов ﾔﾏﾀﾞ 山田") == "Ödön Иванов ???? ??"
    assert summary.display_name("=山田^太郎=やまだ^たろう") == "山田, 太郎"  # no alphabetic group: the next one


def test_labels_of_the_whole_cortex_show_no_lobe_rows() -> None:
    """Every sT1 measured by its model's own labels (whole cortex) showed six lobe rows reading "absent", as if the
    lobes had failed; labels by lobe keep them."""
    from dicom_node.writers.summary import _table_rows
    from inference.labels import aseg_view

    labels, t1 = make_phantom()
    whole = sitk.GetImageFromArray(aseg_view(sitk.GetArrayFromImage(labels)).astype(np.uint16))
    whole.CopyInformation(labels)
    rows = _table_rows(compute_volumetry(whole, t1, age=None, sex=None))
    names, cells = [row[0] for row, _ in rows], [cell for row, _ in rows for cell in row]
    assert "Cerebral cortex" in names and not any(n.endswith(" cortex") and n.startswith("  ") for n in names)
    assert "absent" not in cells
    by_lobe = [row[0] for row, _ in _table_rows(compute_volumetry(labels, t1, age=None, sex=None))]
    assert "  frontal cortex" in by_lobe and "  insula cortex" in by_lobe

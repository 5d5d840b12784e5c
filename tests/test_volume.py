"""inference.volume: DICOM series -> SimpleITK image geometry, header-only stack checks, resampling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from inference.volume import (
    GeometryError,
    isotropic_grid,
    load_series,
    resample_isotropic,
    series_geometry,
)
from tests.conftest import SHARED_DATA, requires_shared_data

DICOM = SHARED_DATA / "dicom"
PHANTOM = DICOM / "phantom_siemens_xa30_aahead_scout"
FRAGMENTED = DICOM / "phantom_siemens_xa30_t1_jpegll_j2k"
ENHANCED = DICOM / "phantom_siemens_xa30_enhanced_mr"
PRISMA_2D = DICOM / "human_siemens_prisma_t1_2d_4mm"


# ---------------------------------------------------------------- synthetic series written with pydicom


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


ROTATION = _rotation(0, 20.0) @ _rotation(2, -20.0)       # about patient L then S
ROW = ROTATION @ np.array([0.0, 1.0, 0.0])                 # oblique sagittal
COL = ROTATION @ np.array([0.0, 0.0, -1.0])
NORMAL = np.cross(ROW, COL)
ORIGIN = np.array([-40.0, -75.5, 60.25])
ROW_SPACING, COL_SPACING, SLICE_SPACING = 1.1, 0.9, 3.0     # PixelSpacing = [row spacing, column spacing]
ROWS, COLUMNS, SLICES = 40, 50, 12
MARKER = (7, 31, 5)                                        # (row, column, slice)


def patient_point(row: float, column: float, k: float) -> np.ndarray:
    """Patient (LPS) position of pixel centre (row, column) of slice k, straight from the DICOM definition."""
    return ORIGIN + column * COL_SPACING * ROW + row * ROW_SPACING * COL + k * SLICE_SPACING * NORMAL


def _slice_dataset(k: int, pixels: np.ndarray, *, series_uid: str, position: np.ndarray,
                   iop: np.ndarray | None = None, slope: float = 1.0, intercept: float = 0.0) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = k + 1
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (np.concatenate([ROW, COL]) if iop is None else iop)]
    ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
    ds.SliceThickness = 2.5
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write_series(folder: Path, *, drop: int | None = None, duplicate: int | None = None,
                 tilt_slice: int | None = None, resize_slice: int | None = None,
                 slope: float = 1.0, intercept: float = 0.0, slices: int = SLICES) -> list[Path]:
    """Oblique series with a marker pixel; files written in shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    rng = np.random.default_rng(7)
    paths = []
    ks = [k for k in range(slices) if k != drop] + ([duplicate] if duplicate is not None else [])
    for n, k in enumerate(rng.permutation(ks)):
        k = int(k)
        pixels = np.full((ROWS, COLUMNS), 100 + k, dtype=np.uint16)
        if (k == MARKER[2]):
            pixels[MARKER[0], MARKER[1]] = 3000
        iop = None
        if k == tilt_slice:
            iop = np.concatenate([_rotation(2, 5.0) @ ROW, _rotation(2, 5.0) @ COL])
        if k == resize_slice:
            pixels = pixels[:-2]
        ds = _slice_dataset(k, pixels, series_uid=series_uid, position=patient_point(0, 0, k), iop=iop,
                            slope=slope, intercept=intercept)
        path = folder / f"{n:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_oblique_marker_lands_at_its_patient_point(tmp_path: Path) -> None:
    series = load_series(write_series(tmp_path))
    image = series.image
    assert image.GetSize() == (COLUMNS, ROWS, SLICES)
    np.testing.assert_allclose(image.GetSpacing(), (COL_SPACING, ROW_SPACING, SLICE_SPACING), atol=1e-4)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3),
                               np.column_stack([ROW, COL, NORMAL]), atol=1e-6)
    array = sitk.GetArrayFromImage(image)
    k, j, i = np.unravel_index(int(np.argmax(array)), array.shape)
    assert (j, i, k) == MARKER
    expected = patient_point(*MARKER)
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((int(i), int(j), int(k))), expected, atol=1e-3)
    assert image.TransformPhysicalPointToIndex(tuple(expected)) == (MARKER[1], MARKER[0], MARKER[2])
    # slices are in position order, headers follow them, pixels without PixelData
    assert [int(ds.InstanceNumber) for ds in series.datasets] == list(range(1, SLICES + 1))
    assert all("PixelData" not in ds for ds in series.datasets)
    assert series.source_refs == [(MRImageStorage, ds.SOPInstanceUID) for ds in series.datasets]
    assert array[3].mean() == pytest.approx(103.0)


def test_rescale_is_applied(tmp_path: Path) -> None:
    array = sitk.GetArrayFromImage(load_series(write_series(tmp_path, slope=2.0, intercept=-100.0)).image)
    assert array.dtype == np.float32
    assert array[MARKER[2], MARKER[0], MARKER[1]] == pytest.approx(2 * 3000 - 100)
    assert array[0, 0, 0] == pytest.approx(2 * 100 - 100)


def test_gap_is_reported_and_refused(tmp_path: Path) -> None:
    paths = write_series(tmp_path, drop=6)
    geometry = series_geometry([pydicom.dcmread(p, stop_before_pixels=True) for p in paths])
    assert geometry.spacing == pytest.approx(SLICE_SPACING)
    assert geometry.problems == ["gap between slice 6 and 7 (6 mm, expected 3 mm)"]
    with pytest.raises(GeometryError, match="gap between slice 6 and 7"):
        load_series(paths)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tilt_slice": 4}, "mixed ImageOrientationPatient"),
        ({"duplicate": 3}, "duplicate position"),
        ({"resize_slice": 2}, "mixed Rows/Columns"),
    ],
)
def test_inconsistent_series_raise(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    paths = write_series(tmp_path, **kwargs)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert any(message in problem for problem in series_geometry(headers).problems)
    with pytest.raises(GeometryError, match=message):
        load_series(paths)


def test_a_spacing_that_changes_within_the_stack_is_a_problem(tmp_path: Path) -> None:
    """Every step within 10 % of the median, but the steps add up: 6 steps of 3.0 mm then 5 of 3.25 mm would put the
    last slice 1.25 mm from where it was acquired (two slice groups with different distance factors)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in write_series(tmp_path)]
    ranked = sorted(headers, key=lambda ds: float(np.array(ds.ImagePositionPatient, float) @ NORMAL))
    for k, ds in enumerate(ranked):
        offset = 0.25 * max(0, k - 6)
        ds.ImagePositionPatient = [float(v) for v in np.array(ds.ImagePositionPatient, float) + offset * NORMAL]
    problems = series_geometry(headers).problems
    assert len(problems) == 1, problems
    assert "drift from an even spacing of 3.07 mm: slice 12 is +0.462 mm off" in problems[0]
    # the same stack evenly spaced is whole
    assert series_geometry([pydicom.dcmread(p, stop_before_pixels=True) for p in write_series(tmp_path / "even")]
                           ).problems == []


@pytest.mark.parametrize("spacing", [[0.0, 0.0], [-0.9, -0.9], [0.9, 0.0]])
def test_a_pixel_spacing_that_is_not_positive_is_a_problem(tmp_path: Path, spacing: list[float]) -> None:
    paths = write_series(tmp_path)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    headers[3].PixelSpacing = spacing
    problems = series_geometry(headers).problems
    assert problems and problems[0].startswith("PixelSpacing is not positive in 1 of 12 frames (first: frame")


@pytest.mark.parametrize("keyword", ["FrameOfReferenceUID", "PatientID", "StudyInstanceUID"])
def test_a_series_of_two_patients_or_scans_is_refused(tmp_path: Path, keyword: str) -> None:
    """A SeriesInstanceUID reused (a faulty anonymiser or tool): stacks that happen to fit together would make one
    volume of two patients or scans, labelled as the first image's patient."""
    paths = write_series(tmp_path)
    for path in paths[::2]:
        ds = pydicom.dcmread(path)
        setattr(ds, keyword, "1.2.826.0.1.3680043.8.498.4242" if keyword.endswith("UID") else "OTHER-PATIENT")
        ds.save_as(path)
    with pytest.raises(GeometryError, match=f"the series mixes 2 different {keyword}"):
        load_series(paths)


@requires_shared_data
def test_interleaved_multiframe_files_are_each_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real Enhanced MR file split into two, odd and even frames (their slices interleave in space): the same
    volume, each file decoded once, and no decoded copy left on the data sets (Dataset.pixel_array keeps one: a
    3,000-image series held every decoded image beside the volume until the load returned)."""
    source = next((ENHANCED / "00005_anat_T1w_acq_tfl").glob("*.dcm"))
    whole = load_series([source])
    ds = pydicom.dcmread(source)
    frames = ds.pixel_array
    parts = []
    for part in (0, 1):
        piece = pydicom.dcmread(source)
        piece.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[part::2]
        piece.NumberOfFrames = len(piece.PerFrameFunctionalGroupsSequence)
        piece.PixelData = np.ascontiguousarray(frames[part::2]).tobytes()
        piece.SOPInstanceUID = piece.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.{part + 1}"
        parts.append(tmp_path / f"part{part}.dcm")
        piece.save_as(parts[-1])
    from inference import volume

    decoded: list[str] = []
    decode = volume.pixel_array

    def counting(source: pydicom.Dataset) -> np.ndarray:
        decoded.append(str(source.SOPInstanceUID))
        return decode(source)

    monkeypatch.setattr(volume, "pixel_array", counting)
    split = load_series(parts)
    assert sorted(decoded) == sorted(f"{ds.SOPInstanceUID}.{part + 1}" for part in (0, 1))
    assert all(getattr(ds, "_pixel_array", None) is None for ds in split.datasets)  # nothing decoded kept
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(split.image), sitk.GetArrayViewFromImage(whole.image))
    _assert_same_geometry(split.image, whole.image)


def test_in_plane_shift_and_bare_multiframe_are_problems(tmp_path: Path) -> None:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in write_series(tmp_path)]
    shifted = headers[4]
    shifted.ImagePositionPatient = [float(v) for v in np.array(shifted.ImagePositionPatient, float) + 2.0 * ROW]
    assert any("not stacked along the slice normal" in p for p in series_geometry(headers).problems)
    bare = headers[0]
    bare.NumberOfFrames = 3
    assert "file 1 has 3 frames but no PerFrameFunctionalGroupsSequence" in series_geometry([bare]).problems


def test_header_only_geometry_is_sorted_and_whole(tmp_path: Path) -> None:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in write_series(tmp_path)]
    geometry = series_geometry(headers)
    assert geometry.ok
    assert len(geometry.positions) == SLICES
    np.testing.assert_allclose(geometry.positions, [patient_point(0, 0, k) for k in range(SLICES)], atol=1e-4)
    assert geometry.spacing == pytest.approx(SLICE_SPACING)


def test_single_slice_uses_slice_thickness(tmp_path: Path) -> None:
    series = load_series(write_series(tmp_path, slices=1))
    assert series.image.GetSize() == (COLUMNS, ROWS, 1)
    assert series.image.GetSpacing()[2] == pytest.approx(2.5)


def test_load_puts_slice_k_at_its_position(tmp_path: Path) -> None:
    """Slice k of the loaded image lies at the IPP of source slice k, with the source IOP (what the writers
    of derived objects rely on)."""
    image = load_series(write_series(tmp_path)).image
    array = sitk.GetArrayFromImage(image)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert image.GetSize()[2] == SLICES
    for k in range(SLICES):
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((0, 0, k)), patient_point(0, 0, k), atol=1e-4)
        np.testing.assert_allclose(np.concatenate([direction[:, 0], direction[:, 1]]), np.concatenate([ROW, COL]),
                                   atol=1e-6)
        assert array[k].shape == (ROWS, COLUMNS)
    assert array[MARKER[2]][MARKER[0], MARKER[1]] == 3000


def _blob_image(center: np.ndarray) -> sitk.Image:
    image = sitk.Image([50, 40, 16], sitk.sitkFloat32)
    image.SetSpacing((0.9, 1.1, 3.0))
    image.SetDirection(tuple(np.column_stack([ROW, COL, NORMAL]).ravel()))
    image.SetOrigin(tuple(ORIGIN))
    k, j, i = np.indices(sitk.GetArrayViewFromImage(image).shape)
    points = (ORIGIN[:, None] + np.column_stack([ROW * 0.9, COL * 1.1, NORMAL * 3.0])
              @ np.vstack([i.ravel(), j.ravel(), k.ravel()])).T
    values = 1000.0 * np.exp(-np.sum((points - center) ** 2, axis=1) / (2 * 4.0**2))
    array = sitk.GetImageFromArray(values.reshape(k.shape).astype(np.float32))
    array.CopyInformation(image)
    return array


def _centroid(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    array[array < 0.3 * array.max()] = 0
    k, j, i = np.indices(array.shape)
    index = [float((array * a).sum() / array.sum()) for a in (i, j, k)]
    return np.array(image.TransformContinuousIndexToPhysicalPoint(index))


def test_resample_isotropic_keeps_geometry_and_marker() -> None:
    center = ORIGIN + 22 * 0.9 * ROW + 18 * 1.1 * COL + 7.4 * 3.0 * NORMAL
    image = _blob_image(center)
    resampled = resample_isotropic(image, 1.0)
    assert resampled.GetSpacing() == (1.0, 1.0, 1.0)
    assert resampled.GetDirection() == image.GetDirection()
    assert resampled.GetSize() == (45, 44, 48)  # ceil(size x spacing): covers the field of view
    np.testing.assert_allclose(_centroid(resampled), center, atol=0.5)
    # both grids centred on the same field of view
    for grid in (image, resampled):
        np.testing.assert_allclose(
            grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grid.GetSize()]),
            image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]), atol=1e-6)
    nearest = resample_isotropic(sitk.Cast(image, sitk.sitkUInt16), 2.0, interpolator=sitk.sitkNearestNeighbor)
    assert nearest.GetPixelID() == sitk.sitkUInt16
    assert isotropic_grid(image, 2.0).GetSize() == nearest.GetSize()


# ---------------------------------------------------------------- real data


def _load(folder: Path):  # noqa: ANN202
    return load_series(sorted(folder.glob("*.dcm")))


@requires_shared_data
def test_aahead_scout_loads() -> None:
    series = _load(PHANTOM / "01001_AAHead_Scout")
    assert series.image.GetSize() == (160, 160, 128)
    np.testing.assert_allclose(series.image.GetSpacing(), (1.625, 1.625, 1.6), atol=0.01)
    assert len(series.datasets) == len(series.source_refs) == 128
    assert sitk.GetArrayViewFromImage(series.image).max() > 0


@requires_shared_data
@pytest.mark.parametrize("position", ["HFS", "HFDL"])
def test_prisma_2d_t1_loads(position: str) -> None:
    folder = next((PRISMA_2D / position).iterdir())
    series = _load(folder)
    assert series.image.GetSize() == (256, 256, 35)
    assert series.image.GetSpacing()[2] == pytest.approx(4.8, abs=0.01)
    assert series.datasets[0].PatientPosition == position
    # slices increase along the normal (row x column)
    direction = np.array(series.image.GetDirection()).reshape(3, 3)
    steps = np.diff([float(np.dot(ds.ImagePositionPatient, direction[:, 2])) for ds in series.datasets])
    assert np.all(steps > 0)


@requires_shared_data
@pytest.mark.parametrize("compressed", ["05001_anat_T1w_acq_tfl"])
def test_jpeg_lossless_fragments_equal_uncompressed(compressed: str) -> None:
    original = _load(PHANTOM / "05001_anat_T1w_acq_tfl").image
    decoded = _load(FRAGMENTED / compressed).image
    assert pydicom.dcmread(next((FRAGMENTED / compressed).glob("*.dcm")),
                           stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    _assert_same_geometry(decoded, original)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(decoded), sitk.GetArrayViewFromImage(original))


@requires_shared_data
def test_jpeg2000_fragments_load() -> None:
    """6001 is the scanner's NORM (prescan-normalized) reconstruction of the same acquisition: no uncompressed
    original is in the data, so geometry must match 5001 and pixels correlate (but are not identical)."""
    folder = FRAGMENTED / "06001_anat_T1w_acq_tfl"
    if not folder.is_dir():
        pytest.skip("06001 JPEG 2000 series not present")
    original = _load(PHANTOM / "05001_anat_T1w_acq_tfl").image
    decoded = _load(folder).image
    assert pydicom.dcmread(next(folder.glob("*.dcm")),
                           stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    _assert_same_geometry(decoded, original)
    a, b = (sitk.GetArrayViewFromImage(x).ravel() for x in (decoded, original))
    assert np.corrcoef(a, b)[0, 1] > 0.8


@requires_shared_data
@pytest.mark.parametrize("series", ["00005_anat_T1w_acq_tfl", "00006_anat_T1w_acq_tfl"])
def test_enhanced_mr_matches_classic_geometry(series: str) -> None:
    """The Enhanced MR file is another session (2022-07-11) of the same phantom protocol as the classic
    series (2023-01-13): same planned geometry, different pixels. Geometry must be identical; the pixels
    must agree best in the loaded orientation (any flip of an axis correlates worse)."""
    enhanced = _load(ENHANCED / series)
    classic = _load(PHANTOM / "05001_anat_T1w_acq_tfl").image
    assert len(enhanced.datasets) == 1 and enhanced.datasets[0].NumberOfFrames == 96
    assert enhanced.source_refs[0][0] == "1.2.840.10008.5.1.4.1.1.4.1"
    _assert_same_geometry(enhanced.image, classic)
    a = sitk.GetArrayFromImage(enhanced.image)
    b = sitk.GetArrayViewFromImage(classic).ravel()
    unflipped = np.corrcoef(a.ravel(), b)[0, 1]
    for axis in range(3):
        assert unflipped > np.corrcoef(np.flip(a, axis).ravel(), b)[0, 1] + 0.05


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-2)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)


@requires_shared_data
@pytest.mark.filterwarnings("ignore:The pixel data is .* excess padding:UserWarning")  # MR_small_padded.dcm
@pytest.mark.parametrize("folder", ["pydicom_MR_small", "dcm_qa_ts_siemens_epi_mosaic_9ts"])
def test_every_transfer_syntax_decodes_identically(folder: str) -> None:
    """One image in several transfer syntaxes (Big Endian, Implicit, RLE, JPEG LL, JPEG-LS, J2K) loads the same."""
    files = sorted((DICOM / "transfer_syntaxes" / folder).glob("*.dcm"))
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    assert len(syntaxes) >= 6
    reference = load_series([files[0]]).image
    for path in files[1:]:
        image = load_series([path]).image
        _assert_same_geometry(image, reference)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference),
                                      err_msg=path.name)


def test_source_frames_follow_the_loaded_headers(tmp_path: Path) -> None:
    """The geometry load_series computed, re-indexed to its headers' order, is what reading the headers gives."""
    from inference.volume import frame_geometries
    from tests.dicom_factory import make_mr_series

    paths = make_mr_series(tmp_path, shape=(5, 8, 8), spacing=(1.0, 1.0, 3.0))
    loaded = load_series(list(reversed(paths)))  # received in another order than the slices lie
    frames = loaded.source_frames()
    expected = [f for n, ds in enumerate(loaded.datasets) for f in frame_geometries(ds, n)]
    assert frames is not None and len(frames) == len(expected) == 5
    for got, want in zip(frames, expected, strict=True):
        assert (got.dataset_index, got.frame_index) == (want.dataset_index, want.frame_index)
        assert got.position == want.position and got.orientation == want.orientation


def test_positions_written_with_two_decimals_are_an_even_stack() -> None:
    """An oblique 250-slice 0.9 mm stack whose positions a scanner wrote with two decimals: every slice within
    0.005 mm of its place, yet the median step missed the mean by enough to add up past the drift tolerance (the
    series was refused). The spacing is the least-squares fit."""
    normal = np.array([0.1, 0.3, 0.95])
    normal /= np.linalg.norm(normal)
    row = np.cross(normal, [1.0, 0.0, 0.0])
    row /= np.linalg.norm(row)
    col = np.cross(normal, row)
    headers = []
    for k in range(250):
        ds = pydicom.Dataset()
        ds.ImagePositionPatient = [round(float(v), 2) for v in np.array([-12.3, 45.6, -78.9]) + 0.9 * k * normal]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *col)]
        ds.PixelSpacing, ds.Rows, ds.Columns = [1.0, 1.0], 16, 16
        headers.append(ds)
    geometry = series_geometry(headers)
    assert geometry.problems == []
    assert geometry.spacing == pytest.approx(0.9, abs=2e-4)

"""Volumetry test inputs: a small synthetic brain (nested ellipsoids and blocks coded with FreeSurfer labels),
its T1 written as a synthetic sT1 series, and a dciodvfy helper.

Grid: 48 columns x 48 rows x 32 slices at 3.3 mm (an adult-sized intracranial volume, about 1.4 l, in few
voxels). Column index i increases towards the patient's left for the identity direction, so left structures
lie at i >= 24. Every measured structure of ``inference.labels.STRUCTURES`` is present; the T1 has
white matter brighter than grey matter brighter than CSF.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.writers.derived_mr import Derivation, write_derived_mr
from inference.labels import CORTEX, LOBES, LR_SWAP, STRUCTURES
from tests.dicom_factory import AXIAL_IOP, direction_from_iop, make_mr_series, make_study, oblique_iop

DCIODVFY = Path("/usr/bin/dciodvfy")
UID_PREFIX = "1.2.826.0.1.3680043.10.999."
MODEL_ID, MODEL_VERSION = "synth-t1-test", "0.1.0"
#: An axial grid tilted a few degrees: index i runs towards the patient's left, k towards superior.
PHANTOM_IOP = oblique_iop(AXIAL_IOP, rotation_deg=(6.0, -4.0, 3.0))

SHAPE = (32, 48, 48)          # numpy order: slices, rows, columns
SPACING = (3.3, 3.3, 3.3)
T1_INTENSITY = {"csf": 150.0, "cortex": 550.0, "wm": 800.0, "deep": 600.0}

# (di, dj, dk, size) offsets from the centre, for the left member of each pair (right is mirrored).
_LEFT_BLOCKS = {
    4: (2, -9, 4, 3), 5: (10, 4, -5, 2), 7: (6, 8, -5, 3), 8: (10, 8, -5, 3), 10: (2, 0, 0, 3),
    11: (6, -5, 4, 2), 12: (10, -4, 0, 3), 13: (6, -4, 0, 2), 17: (10, 0, -5, 3), 18: (6, 0, -5, 2),
    26: (6, -9, 0, 2), 28: (2, 5, -1, 3),
}
_MIDLINE_BLOCKS = {14: (-1, -2, 4, 2), 15: (-1, 9, -6, 2), 16: (-1, 5, -6, 3)}


def _grid(shape: Sequence[int], spacing: Sequence[float], direction: Sequence[float] | None,
          origin: Sequence[float] | None) -> sitk.Image:
    image = sitk.Image((shape[2], shape[1], shape[0]), sitk.sitkUInt16)
    image.SetSpacing(tuple(float(s) for s in spacing))
    if direction is not None:
        image.SetDirection(tuple(float(v) for v in direction))
    if origin is None:
        matrix = np.array(image.GetDirection()).reshape(3, 3)
        half = (np.array(image.GetSize()) - 1) * np.array(image.GetSpacing()) / 2.0
        origin = -(matrix @ half)
    image.SetOrigin(tuple(float(v) for v in origin))
    return image


def make_label_array(shape: Sequence[int] = SHAPE) -> np.ndarray:
    """uint16 [k, j, i] label array with every measured structure."""
    slices, rows, columns = shape
    k, j, i = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in (slices, rows, columns)), indexing="ij")
    radius = np.sqrt(i**2 + j**2 + k**2)
    left = np.broadcast_to(np.arange(columns)[None, None, :] >= columns // 2, tuple(shape))
    labels = np.zeros(shape, dtype=np.uint16)
    labels[radius < 0.98] = 24
    labels[radius < 0.88] = np.where(left, 3, 42)[radius < 0.88]
    # the cortex by lobe (as the segmenter codes it), an aseg-coded band left over
    sectors = {
        "frontal": j < -0.35, "occipital": j > 0.5,
        "parietal": (np.abs(j + 0.075) <= 0.425) & (k > 0.25), "temporal": (np.abs(j + 0.075) <= 0.425) & (k < -0.25),
        "cingulate": (np.abs(j + 0.075) <= 0.425) & (k > 0.6) & (np.abs(i) < 0.25),
        "insula": (j >= -0.35) & (j < 0.0) & (np.abs(k) <= 0.25) & (np.abs(i) >= 0.3),
    }
    cortex = (radius < 0.88) & (radius >= 0.72)
    for lobe, sector in sectors.items():
        offset = LOBES[lobe][0]
        labels[cortex & sector] = np.where(left, 1200 + offset, 2200 + offset)[cortex & sector]
    labels[radius < 0.72] = np.where(left, 2, 41)[radius < 0.72]
    centre = np.array([slices // 2, rows // 2, columns // 2])
    for code, (di, dj, dk, size) in _LEFT_BLOCKS.items():
        for sign, value in ((1, code), (-1, LR_SWAP[code])):
            start_i = centre[2] + di if sign > 0 else centre[2] - di - size
            start = (centre[0] + dk, centre[1] + dj, start_i)
            labels[start[0]:start[0] + size, start[1]:start[1] + size, start[2]:start[2] + size] = value
    labels[centre[0] + 3:centre[0] + 5, centre[1] - 4:centre[1] + 4, centre[2] - 1:centre[2] + 1] = 192
    for code, (di, dj, dk, size) in _MIDLINE_BLOCKS.items():
        start = (centre[0] + dk, centre[1] + dj, centre[2] + di)
        labels[start[0]:start[0] + size, start[1]:start[1] + size, start[2]:start[2] + size] = code
    missing = set(STRUCTURES) - set(np.unique(labels).tolist())
    if missing:
        raise AssertionError(f"phantom lacks structures {sorted(missing)}")
    return labels


def t1_array(labels: np.ndarray, *, seed: int = 0, swap_contrast: bool = False) -> np.ndarray:
    """float32 T1-like intensities for ``labels`` (``swap_contrast``: CSF bright, WM dark, as a T2)."""
    values = dict(T1_INTENSITY)
    if swap_contrast:
        values["csf"], values["wm"] = values["wm"], values["csf"]
    out = np.zeros(labels.shape, dtype=np.float32)
    out[labels > 0] = values["deep"]
    out[np.isin(labels, (24, 4, 43, 5, 44, 14, 15))] = values["csf"]
    out[np.isin(labels, (*CORTEX["L"], *CORTEX["R"], 8, 47))] = values["cortex"]
    out[np.isin(labels, (2, 41, 7, 46))] = values["wm"]
    rng = np.random.default_rng(seed)
    out[labels > 0] += rng.normal(0.0, 10.0, int((labels > 0).sum())).astype(np.float32)
    return out


def make_phantom(*, shape: Sequence[int] = SHAPE, spacing: Sequence[float] = SPACING,
                 direction: Sequence[float] | None = None, origin: Sequence[float] | None = None,
                 swap_contrast: bool = False) -> tuple[sitk.Image, sitk.Image]:
    """(labels uint16, T1 float32) on the same grid, centred on the origin of patient space by default."""
    reference = _grid(shape, spacing, direction, origin)
    array = make_label_array(shape)
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(reference)
    t1 = sitk.GetImageFromArray(t1_array(array, swap_contrast=swap_contrast))
    t1.CopyInformation(reference)
    return labels, t1


@dataclass
class T1Series:
    """A phantom, its T1 written as an sT1 series (headers without pixels) and the series it came from."""

    labels: sitk.Image
    t1: sitk.Image
    t1_paths: list[Path]
    t1_headers: list[Dataset]
    input_headers: list[Dataset]


def make_t1_series(out_dir: Path, *, swap_contrast: bool = False, patient_age: str = "053Y",
                   patient_sex: str = "F") -> T1Series:
    """Write a small input series and the phantom T1 as a synthetic sT1 series of the same study."""
    study = make_study(patient_age=patient_age, patient_sex=patient_sex)
    input_paths = make_mr_series(out_dir / "input", shape=(8, 24, 24), spacing=(6.0, 6.0, 12.0),
                                 iop=PHANTOM_IOP, study=study, marker_mm=None)
    input_headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in input_paths]
    labels, t1 = make_phantom(direction=direction_from_iop(PHANTOM_IOP), swap_contrast=swap_contrast)
    t1_paths = write_derived_mr(t1, input_headers, out_dir=out_dir / "st1", series_description="sT1AAH",
                                series_number=1001, uid_prefix=UID_PREFIX,
                                derivation=Derivation(MODEL_ID, MODEL_VERSION, "Synthetic T1 (test phantom)")).paths
    t1_headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in t1_paths]
    return T1Series(labels, t1, t1_paths, t1_headers, input_headers)


#: Type 2 identity attributes an anonymised or research export often lacks (highdicom reads them with no fallback).
EXPORT_LACKS = ("AccessionNumber", "StudyID", "ReferringPhysicianName", "PatientBirthDate")


def as_exported(headers: Sequence[Dataset], *, sex: str = "U") -> list[Dataset]:
    """Copies of ``headers`` as a research export or a RIS may give them: without :data:`EXPORT_LACKS`, and with a
    PatientSex DICOM does not allow (``U``)."""
    out = []
    for ds in headers:
        ds = copy.deepcopy(ds)
        for keyword in EXPORT_LACKS:
            if keyword in ds:
                delattr(ds, keyword)
        ds.PatientSex = sex
        out.append(ds)
    return out


def with_invalid_identity(headers: Sequence[Dataset]) -> list[Dataset]:
    """Copies of ``headers`` whose patient study values their VRs do not allow, as some RIS and scanners send them
    (read raw, as received): PatientAge "45Y" (AS is nnnD/W/M/Y), PatientWeight "70kg" (DS)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    out = []
    for ds in headers:
        ds = copy.deepcopy(ds)
        for tag, vr, raw in ((0x00101010, "AS", b"45Y "), (0x00101030, "DS", b"70kg")):
            ds[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)
        out.append(ds)
    return out


def dciodvfy_errors(path: Path) -> list[str]:
    """The 'Error' lines dciodvfy prints for one file (skips the test when dciodvfy is not installed)."""
    if not DCIODVFY.exists():
        pytest.skip(f"dciodvfy not installed at {DCIODVFY}")
    result = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, errors="replace",
                            timeout=60, check=False)
    return [line.strip() for line in (result.stderr + result.stdout).splitlines()
            if line.strip().startswith("Error")]


#: PS3.5 H.3.1: a Japanese name in ISO 2022 (alphabetic, ideographic and phonetic groups)
JAPANESE_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"
JAPANESE_CHARSET = ["", "ISO 2022 IR 87"]
#: a study description and a nested code meaning in the same encoding
JAPANESE_STUDY = "頭部ＭＲＩ"
JAPANESE_PROCEDURE = "頭部"


def as_japanese(headers: Sequence[Dataset], *, implicit_vr: bool = True) -> list[Dataset]:
    """Copies of ``headers`` as Japanese equipment sends them: SpecificCharacterSet ``\\ISO 2022 IR 87`` (the
    first value empty, as DICOM allows), the name, the study description and a procedure code's meaning encoded in
    it, read back from the bytes (raw, as received; Implicit VR by default, the common sender default)."""
    import io

    from pydicom import dcmread

    out = []
    for ds in headers:
        ds = copy.deepcopy(ds)
        ds.SpecificCharacterSet = JAPANESE_CHARSET
        ds.PatientName = JAPANESE_NAME
        ds.StudyDescription = JAPANESE_STUDY
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "X1", "99LOCAL", JAPANESE_PROCEDURE
        ds.ProcedureCodeSequence = [code]
        if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=False, implicit_vr=implicit_vr, little_endian=True)
        buffer.seek(0)
        out.append(dcmread(buffer, force=True))
    return out

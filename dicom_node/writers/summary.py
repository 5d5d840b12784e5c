"""One-page volumetry summary as an RGB Secondary Capture image.

The page holds a banner (synthetic input: "SYNTHETIC - not for diagnosis of lesions"), patient and series
lines, a table of key volumes (ICV, hippocampus, HOC, ventricles, amygdala, cortex, white matter; with
normative z-scores when present), the quality-control outcome, and three coronal slices through the
hippocampi with the labels in FreeSurfer colours (radiological convention: patient right on the left).
Text is drawn in DejaVu Sans where the machine has it (fonts-dejavu-core), else Pillow's built-in font
(:func:`font`, :func:`drawable`); the page carries patient identification (BurnedInAnnotation YES).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

import dicom_node
from dicom_node.uids import new_uid
from dicom_node.writers import WrittenSeries, equipment, identity_ready, write_single
from dicom_node.writers.derived_mr import copy_identity_optional
from inference.labels import HIPPOCAMPUS, LOBE_CORTEX_CODES, LOBES, STRUCTURES
from inference.volumetry import Volumetry, format_age

__all__ = ["PAGE_SIZE", "font", "render_page", "secondary_capture", "wrap_text", "write_summary"]

PAGE_SIZE = (1024, 1024)  # columns, rows
SYNTHETIC_BANNER = "SYNTHETIC - not for diagnosis of lesions"
REAL_BANNER = "Automated volumetry - verify before clinical use"
SLICE_OFFSETS_MM = (-10.0, 0.0, 10.0)
OVERLAY_ALPHA = 0.45

_BG, _FG, _DIM = (0, 0, 0), (235, 235, 235), (150, 150, 150)
_RED, _GREEN, _AMBER = (200, 30, 30), (40, 170, 60), (230, 160, 20)

# Rows of the key-volume table: (label, left code, right code or None).
_TABLE = (
    ("Hippocampus", HIPPOCAMPUS["L"], HIPPOCAMPUS["R"]),
    ("Amygdala", 18, 54),
    ("Lateral ventricle", 4, 43),
    ("Inf. lateral ventricle", 5, 44),
    ("Thalamus", 10, 49),
    ("Cerebral cortex", 3, 42),
    *((f"  {lobe} cortex", 1200 + LOBES[lobe][0], 2200 + LOBES[lobe][0])
      for lobe in ("frontal", "temporal", "parietal", "occipital", "cingulate", "insula")),
    ("Cerebral white matter", 2, 41),
    ("Third ventricle", 14, None),
    ("Brainstem", 16, None),
)


def _valid_cs(value: str) -> bool:
    """A non-empty Code String value DICOM allows (pydicom's VR validation)."""
    try:
        validate_value("CS", value, config.RAISE)
    except ValueError:
        return False
    return bool(value)


#: A font with Latin, Greek and Cyrillic letters (Debian's fonts-dejavu-core), used when the machine has it: Pillow's
#: built-in font draws every letter outside basic Latin as the same box ("Müller" and "Möller" alike)
WIDE_FONTS = (Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),)
#: the last code point of the blocks it draws (Latin, IPA, Greek, Cyrillic); beyond (Japanese half-width kana, CJK,
#: Thai...) it draws boxes, so those letters are treated as for a font without them
WIDE_FONT_LAST = "\u052f"
#: letters NFKD does not decompose, spelt in basic Latin for a font without them
_FOLDED = str.maketrans({"ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE", "đ": "d",
                         "Đ": "D", "ł": "l", "Ł": "L", "þ": "th", "Þ": "Th", "ð": "d", "Ð": "D", "ı": "i"})


def _wide_font() -> Path | None:
    return next((path for path in WIDE_FONTS if path.is_file()), None)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A font at ``size`` pixels: the first of WIDE_FONTS the machine has, else Pillow's built-in one."""
    wide = _wide_font()
    try:
        if wide is not None:
            return ImageFont.truetype(str(wide), size=size)
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def drawable(text: str) -> str:
    """``text`` as the page's font can draw it: letters it lacks spelt in basic Latin where they can be ("Müller"
    → "Muller", "Straße" → "Strasse"), "?" where they cannot (CJK; without a wide font also Greek and Cyrillic),
    so that two different names never look the same box for box."""
    wide = _wide_font() is not None
    out = []
    for char in text:
        if char.isascii() or (wide and char <= WIDE_FONT_LAST):
            out.append(char)
            continue
        folded = "".join(c for c in unicodedata.normalize("NFKD", char.translate(_FOLDED))
                         if not unicodedata.combining(c))
        out.append(folded if folded.isascii() and folded else "?")
    return "".join(out)


def display_name(value: object) -> str:
    """A PersonName for the page: its alphabetic group (Japanese and Korean names carry one; the ideographic and
    phonetic ones follow "="), "Family, Given Middle" rather than DICOM's carets."""
    groups = str(value or "").split("=")
    alphabetic = next((group for group in groups if group.strip("^ ")), "")  # the first group holding a name
    family, _, rest = alphabetic.partition("^")
    given = " ".join(part for part in rest.split("^") if part)
    return f"{family}, {given}" if family and given else (family or given)


def _window_range(t1: np.ndarray, mask: np.ndarray) -> tuple[np.floating | float, np.floating | float]:
    """The grey window: the 1st and 99th percentiles of ``t1`` inside ``mask`` (everywhere if it is empty)."""
    values = t1[mask] if mask.any() else t1.ravel()
    low, high = np.percentile(values, (1.0, 99.0)) if values.size else (0.0, 1.0)
    return low, high


def _window(t1: np.ndarray, low: np.floating | float, high: np.floating | float) -> np.ndarray:
    scaled = (t1 - low) / max(float(high - low), 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def _colour_lut(max_code: int) -> tuple[np.ndarray, np.ndarray]:
    lut = np.zeros((max_code + 1, 3), dtype=np.float32)
    shown = np.zeros(max_code + 1, dtype=bool)
    for code, structure in STRUCTURES.items():
        if code <= max_code:
            lut[code] = structure.rgb
            shown[code] = True
    return lut, shown


#: DICOMOrient "LIP" as (patient axis in LPS, sign) of the array axes k, j, i: posterior, inferior, left.
_LIP = ((1, 1.0), (2, -1.0), (0, 1.0))


def _lip_view(image: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float]] | None:
    """A view of ``image``'s voxels as ``sitk.DICOMOrient(image, "LIP")`` would hold them (axes permuted and
    flipped, nothing copied) and its spacing (i, j, k); None for a direction too oblique to tell its axes."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    dominant = [int(np.argmax(np.abs(direction[:, axis]))) for axis in range(3)]  # per index axis x, y, z
    if sorted(dominant) != [0, 1, 2]:
        return None
    array = sitk.GetArrayViewFromImage(image)  # axes z, y, x: numpy axis n is index axis 2 - n
    order, flips = [], []
    for patient_axis, sign in _LIP:
        axis = dominant.index(patient_axis)
        order.append(2 - axis)
        flips.append(np.sign(direction[patient_axis, axis]) != sign)
    view = np.transpose(array, order)[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    spacing = image.GetSpacing()
    return view, tuple(float(spacing[dominant.index(p)]) for p, _ in reversed(_LIP))  # type: ignore[return-value]


def _lip_arrays(t1: sitk.Image, labels: sitk.Image) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], sitk.Image]:
    """The T1 (float32) and labels in LIP array order, the spacing (i, j, k), and the image the views read."""
    t1 = sitk.Cast(t1, sitk.sitkFloat32)
    grey, codes = _lip_view(t1), _lip_view(labels)
    if grey is None or codes is None:  # DICOMOrient itself (copies both volumes)
        t1, labels = sitk.DICOMOrient(t1, "LIP"), sitk.DICOMOrient(labels, "LIP")
        return (sitk.GetArrayViewFromImage(t1), sitk.GetArrayViewFromImage(labels), labels.GetSpacing(), t1)
    return grey[0], codes[0], codes[1], t1


def _centre_k(codes: np.ndarray) -> float:
    """The mean k (posterior) index of the hippocampi's voxels (of the foreground without them, of the volume
    without either)."""
    for mask in (np.isin(codes, tuple(HIPPOCAMPUS.values())), codes > 0):
        counts = mask.sum(axis=(1, 2), dtype=np.int64)
        total = int(counts.sum())
        if total:
            return float(np.arange(codes.shape[0]) @ counts) / total
    return float(codes.shape[0] // 2)


def _coronal_panels(t1: sitk.Image, labels: sitk.Image) -> list[tuple[Image.Image, float, float, float]]:
    """(panel, physical width mm, physical height mm, offset mm) of coronal RGB panels through the hippocampi.

    Panel rows run superior to inferior, columns patient right to left. Only the three slices shown are
    scaled and coloured; the volumes are read through views, not reoriented copies.
    """
    same_grid = (t1.GetSize() == labels.GetSize() and np.allclose(t1.GetOrigin(), labels.GetOrigin(), atol=1e-3)
                 and np.allclose(t1.GetDirection(), labels.GetDirection(), atol=1e-4)
                 and np.allclose(t1.GetSpacing(), labels.GetSpacing(), atol=1e-4))
    if not same_grid:
        t1 = sitk.Resample(t1, labels, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    # index i -> patient left, j -> inferior, k -> posterior: array[k] is a coronal slice seen from the front
    grey_all, codes_all, spacing, _kept = _lip_arrays(t1, labels)
    low, high = _window_range(grey_all, codes_all > 0)
    centre = _centre_k(codes_all)
    lut, shown = _colour_lut(int(codes_all.max()))
    panels = []
    for offset in SLICE_OFFSETS_MM:
        k = int(np.clip(round(centre + offset / spacing[2]), 0, codes_all.shape[0] - 1))
        grey = _window(grey_all[k], low, high).astype(np.float32)[..., None].repeat(3, axis=2)
        codes = codes_all[k].astype(np.int64)
        mask = shown[codes][..., None]
        rgb = np.where(mask, (1 - OVERLAY_ALPHA) * grey + OVERLAY_ALPHA * lut[codes], grey)
        panel = Image.fromarray(rgb.astype(np.uint8), "RGB")
        # square pixels: physical width = columns x spacing[0], height = rows x spacing[1]
        width, height = codes.shape[1] * spacing[0], codes.shape[0] * spacing[1]
        panels.append((panel, width, height, offset))
    return panels


def _fmt(value: float | None, fmt: str) -> str:
    """A number, or "n/a" where it is undefined (e.g. HOC without an inferior horn, AI of an absent side)."""
    return "n/a" if value is None else format(value, fmt)


def _table_rows(volumetry: Volumetry) -> list[tuple[tuple[str, ...], tuple[int, int, int]]]:
    """Cells (name, left, right, AI) of the key-volume table, with their colour."""
    rows = [((f"Intracranial volume {volumetry.icv_ml:.1f} ml", "", "", ""), _FG), (("", "", "", ""), _FG),
            (("ml (% ICV)", "left", "right", "AI %"), _DIM)]
    asymmetry = {pair.left_code: pair.index_percent for pair in volumetry.asymmetry}
    cortex = volumetry.cortex_ml
    if 3 not in volumetry.structures and cortex.get("L", 0) > 0 and cortex.get("R", 0) > 0:  # the sum of the lobes
        asymmetry[3] = 200.0 * (cortex["L"] - cortex["R"]) / (cortex["L"] + cortex["R"])
    by_lobe = any(code in volumetry.structures for code in LOBE_CORTEX_CODES)
    for name, left, right in _TABLE:
        if left in LOBE_CORTEX_CODES and not by_lobe:  # labels of the whole cortex: no lobe is measured
            continue
        cells = []
        for code, side in ((left, "L"), (right, "R")):
            entry = volumetry.structures.get(code) if code is not None else None
            if code is None:
                cells.append("")
            elif entry is None and code in (3, 42) and cortex.get(side, 0) > 0:
                share = f"{100 * cortex[side] / volumetry.icv_ml:.2f}" if volumetry.icv_ml > 0 else "n/a"
                cells.append(f"{cortex[side]:.2f} ({share})")
            elif entry is None:
                cells.append("absent")
            else:
                z = f"  z {entry.norm_score.z:+.1f}" if entry.norm_score else ""
                share = f"{entry.icv_percent:.2f}" if math.isfinite(entry.icv_percent) else "n/a"
                cells.append(f"{entry.volume_ml:.2f} ({share}){z}")
        ai = _fmt(asymmetry.get(left), "+.1f") if right is not None else ""
        rows.append(((name, cells[0], cells[1], ai), _FG))
    hoc = volumetry.hoc
    rows += [(("", "", "", ""), _FG),
             (("Hippocampal occupancy", _fmt(hoc.get("L"), ".3f"), _fmt(hoc.get("R"), ".3f"), ""), _FG)]
    return rows


def render_page(volumetry: Volumetry, *, t1: sitk.Image, labels: sitk.Image, header_lines: Sequence[str],
                synthetic: bool) -> np.ndarray:
    """The summary page as a uint8 RGB array of PAGE_SIZE (rows, columns, 3)."""
    width, height = PAGE_SIZE
    page = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(page)
    big, normal, small = font(26), font(17), font(14)

    draw.rectangle((0, 0, width, 52), fill=_RED if synthetic else _AMBER)
    draw.text((width // 2, 26), SYNTHETIC_BANNER if synthetic else REAL_BANNER, font=big, fill=(255, 255, 255),
              anchor="mm")
    y = 62
    for line in header_lines:
        draw.text((16, y), drawable(line), font=normal, fill=_FG)
        y += 22

    y += 8
    table_top = y
    right_edges = (None, 370, 520, 600)  # name left-aligned at 16, the other columns right-aligned
    for cells, colour in _table_rows(volumetry):
        for text, edge in zip(cells, right_edges, strict=True):
            if edge is None:
                draw.text((16, y), text, font=small, fill=colour)
            elif text:
                draw.text((edge, y), text, font=small, fill=colour, anchor="ra")
        y += 19

    qc_y = _draw_qc(draw, volumetry, 640, table_top, width, big, small)

    top = max(y, qc_y) + 16
    box_w, box_h = (width - 4 * 16) // 3, height - top - 40
    for n, (panel, phys_w, phys_h, offset) in enumerate(_coronal_panels(t1, labels)):
        scale = min(box_w / phys_w, box_h / phys_h)
        size = (max(1, int(phys_w * scale)), max(1, int(phys_h * scale)))
        panel = panel.resize(size, Image.Resampling.NEAREST)
        x0 = 16 + n * (box_w + 16) + (box_w - size[0]) // 2
        page.paste(panel, (x0, top))
        draw.text((x0 + 4, top + 4), "R", font=normal, fill=_FG)
        draw.text((x0 + size[0] - 16, top + 4), "L", font=normal, fill=_FG)
        draw.text((x0, top + size[1] + 4), f"coronal, hippocampus {offset:+.0f} mm", font=small, fill=_DIM)
    return np.asarray(page, dtype=np.uint8).copy()


def _draw_qc(draw: ImageDraw.ImageDraw, volumetry: Volumetry, qc_x: int, qc_y: int, width: int,
             big: ImageFont.ImageFont | ImageFont.FreeTypeFont, small: ImageFont.ImageFont | ImageFont.FreeTypeFont,
             ) -> int:
    """The QC box and each check with its reason, from (qc_x, qc_y); returns the y below them."""
    passed = volumetry.qc_passed
    draw.rectangle((qc_x, qc_y, width - 16, qc_y + 34), fill=_GREEN if passed else _RED)
    draw.text(((qc_x + width - 16) // 2, qc_y + 17), "QC PASSED" if passed else "QC FAILED", font=big,
              fill=(255, 255, 255), anchor="mm")
    qc_y += 44
    for check in volumetry.qc:
        mark = {True: "pass", False: "FAIL", None: "n/a"}[check.passed]
        colour = {True: _FG, False: (255, 90, 90), None: _DIM}[check.passed]
        draw.text((qc_x, qc_y), f"{mark:<5}{check.name}", font=small, fill=colour)
        qc_y += 18
        for chunk in wrap_text(check.reason, 44, fit=(small, width - 16 - qc_x - 12)):
            draw.text((qc_x + 12, qc_y), drawable(chunk), font=small, fill=_DIM)
            qc_y += 17
        qc_y += 4
    return qc_y


def wrap_text(text: str, width: int, max_lines: int = 4, *,
              fit: tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, float] | None = None) -> list[str]:
    """``text`` in lines of at most ``width`` characters (a longer word stays whole), the first ``max_lines``;
    with ``fit`` (a font and a width in pixels) also no wider than that as drawn."""
    def too_long(candidate: str) -> bool:
        return len(candidate) > width or (fit is not None and fit[0].getlength(drawable(candidate)) > fit[1])

    words, lines, line = text.split(), [], ""
    for word in words:
        if line and too_long(f"{line} {word}"):
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines[:max_lines]


def write_summary(volumetry: Volumetry, *, t1: sitk.Image, labels: sitk.Image, source_images: Sequence[Dataset],
                  out_path: Path, series_number: int, series_description: str, uid_prefix: str | None,
                  algorithm_name: str, algorithm_version: str, synthetic: bool = True) -> WrittenSeries:
    """Write the summary page of ``volumetry`` as an RGB Secondary Capture in the study of ``source_images``.

    ``t1`` and ``labels`` are the image and label volume the volumetry was computed from; ``synthetic`` says
    whether the T1 is synthetic (banner). ``series_description`` is written as given (the job's ``SeriesNaming``
    flags ' QC FAILED').
    """
    if not source_images:
        raise ValueError("no source images")
    first = source_images[0]
    age = format_age(volumetry.age_years)
    header = [
        f"{display_name(first.get('PatientName'))}   ID {first.get('PatientID', '')}   age {age}   "
        f"sex {volumetry.sex or '?'}   study {first.get('StudyDate', '')}",
        f"T1: {first.get('SeriesDescription', '')} (series {first.get('SeriesNumber', '')})   "
        f"model {algorithm_name} {algorithm_version}   dicom-node {dicom_node.__version__}",
    ]
    pixels = render_page(volumetry, t1=t1, labels=labels, header_lines=header, synthetic=synthetic)
    image = secondary_capture(first, pixels, series_number=series_number,
                              series_description=series_description, uid_prefix=uid_prefix,
                              **equipment(algorithm_name, algorithm_version))
    image.ImageComments = ("Volumetry summary; " + ("SYNTHETIC T1, not for diagnosis of lesions; " if synthetic
                                                   else "") + ("QC passed" if volumetry.qc_passed else "QC FAILED"))
    return write_single(image, out_path)


def secondary_capture(first: Dataset, pixels: np.ndarray, *, series_number: int, series_description: str,
                      uid_prefix: str | None, **equipment_kwargs: object) -> hd.sc.SCImage:
    """A rendered RGB page (``pixels``: uint8 rows x columns x 3) as a Secondary Capture of a new series in the
    study of ``first`` (its patient and study attributes), with patient identification burnt in."""
    ref = identity_ready(first)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=new_uid(uid_prefix),
        series_number=int(series_number),
        sop_instance_uid=new_uid(uid_prefix),
        instance_number=1,
        patient_orientation=("L", "F"),
        transfer_syntax_uid=hd.UID("1.2.840.10008.1.2.1"),
        series_description=series_description,
        **equipment_kwargs,
    )
    # highdicom copies the required identity only: the issuer of the patient ID (a PACS matching on ID and issuer
    # held the page apart), the study description and the rest are the source's too
    copy_identity_optional(image, ref)
    image.ConversionType = "WSD"  # rendered by a workstation, not digitized
    image.BurnedInAnnotation = "YES"
    # unpaired: no Laterality needed; a source value CS forbids ("Kopf", "brain") would make the page invalid
    body_part = str(first.get("BodyPartExamined") or "").strip()
    image.BodyPartExamined = body_part if _valid_cs(body_part) else "BRAIN"
    return image

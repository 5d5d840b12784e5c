"""The "not processed" notice: an RGB Secondary Capture page saying why a routed series has no result.

When a job cannot produce its outputs (unsuitable input, a model error, a job given up), the reader waiting for
``sT1AAH`` (or ``rT1`` volumetry) would otherwise wait for good. This page goes into the same study as a new
series (``<output_name> NOT PROCESSED``): a red banner, the patient and the source series, the rule, and the
reason in plain words. It references every instance of the source series (Referenced Image Sequence) and says
the same in ImageComments for software that reads text rather than pixels. Rendering reuses the summary page's
font and text wrapping; the page carries patient identification (BurnedInAnnotation YES).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

import dicom_node
from dicom_node.writers import WrittenSeries, equipment, in_utf8, write_single
from dicom_node.writers.summary import display_name, drawable, font, secondary_capture, wrap_text

__all__ = ["NOT_PROCESSED_SIZE", "render_not_processed", "write_not_processed"]

NOT_PROCESSED_SIZE = (1024, 576)  # columns, rows
BANNER = "NOT PROCESSED"
#: Reason text longer than this is cut (the full reason is in ``dicom-node status`` and the log).
MAX_REASON_CHARS = 600

_BG, _FG, _DIM, _RED = (0, 0, 0), (235, 235, 235), (150, 150, 150), (200, 30, 30)


def render_not_processed(reason: str, *, header_lines: Sequence[str], footer_lines: Sequence[str]) -> np.ndarray:
    """The notice as a uint8 RGB array of NOT_PROCESSED_SIZE (rows, columns, 3)."""
    width, height = NOT_PROCESSED_SIZE
    page = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(page)
    banner, big, normal, small = font(44), font(26), font(20), font(16)
    draw.rectangle((0, 0, width, 80), fill=_RED)
    draw.text((width // 2, 40), BANNER, font=banner, fill=(255, 255, 255), anchor="mm")
    y = 100
    for line in header_lines:
        draw.text((24, y), drawable(line), font=normal, fill=_FG)
        y += 28
    y += 14
    draw.text((24, y), "Reason:", font=big, fill=(255, 90, 90))
    y += 38
    for line in wrap_text(reason, 72, max_lines=8, fit=(big, width - 44 - 24)):
        draw.text((44, y), drawable(line), font=big, fill=_FG)
        y += 32
    y = max(y + 16, height - 24 * len(footer_lines) - 16)
    for line in footer_lines:
        draw.text((24, y), drawable(line), font=small, fill=_DIM)
        y += 24
    return np.asarray(page, dtype=np.uint8).copy()


def _references(source_instances: Sequence[tuple[str, str]]) -> list[Dataset]:
    items = []
    for sop_class_uid, sop_instance_uid in source_instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class_uid
        item.ReferencedSOPInstanceUID = sop_instance_uid
        items.append(item)
    return items


def write_not_processed(reason: str, *, source: Dataset, source_instances: Sequence[tuple[str, str]],
                        out_path: Path, series_number: int, series_description: str, uid_prefix: str | None,
                        what: str, job_id: int | None = None) -> WrittenSeries:
    """Write the notice that the series of ``source`` (one of its headers) was not processed, and why.

    ``source_instances``: (SOP Class UID, SOP Instance UID) of the source series' instances, referenced by the
    notice. ``what``: the result that will not come (``sT1AAH: synthetic T1 by model synth-t1``).
    """
    reason = " ".join(reason.split())
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS - 3] + "..."
    header = [
        f"{display_name(source.get('PatientName'))}   ID {source.get('PatientID', '')}   "
        f"study {source.get('StudyDate', '')}   accession {source.get('AccessionNumber', '') or '-'}",
        f"Series: {source.get('SeriesDescription', '')} (series {source.get('SeriesNumber', '')}, "
        f"{len(source_instances)} image(s))",
        f"No result will follow for it: {what}",
    ]
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    job = f", job {job_id}" if job_id is not None else ""
    footer = [
        f"dicom-node {dicom_node.__version__}{job}, {when}. The received series is kept unchanged; the node's",
        "operator can see this failure in `dicom-node status` and run the series again with `dicom-node reprocess`.",
    ]
    pixels = render_not_processed(reason, header_lines=header, footer_lines=footer)
    image = secondary_capture(source, pixels, series_number=series_number, series_description=series_description,
                              uid_prefix=uid_prefix, **equipment())
    image.ImageComments = f"NOT PROCESSED: {reason}"[:10240]
    if not reason.isascii():  # what the source's character set may not hold ("≥", or "ä" without one)
        image = in_utf8(image)
    if source_instances:
        image.ReferencedImageSequence = _references(source_instances)
    return write_single(image, out_path)

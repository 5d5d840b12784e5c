"""Series assembly: is a received series whole?

Decided from the headers filed in the journal (never from pixels): a multi-frame instance is whole
by itself; single-frame slices are whole when their positions are evenly spaced along one
orientation with no gap and, where the scanner says how many images the acquisition has
(ImagesInAcquisition, or GE's and Philips' private slice counts where it is absent:
:data:`dicom_node.headers.VENDOR_SLICE_COUNTS`), all of them are there. A series that never becomes whole closes on the
node's idle timeout and is then processed, or failed with the geometry problem as the reason; one that the
scanner says has more images than arrived (:func:`missing_images`) is failed with that as the reason, not
processed as if the part were the whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inference.volume import series_geometry

from .journal import InstanceRecord


@dataclass(frozen=True)
class Completeness:
    whole: bool
    reason: str


def completeness(instances: Sequence[InstanceRecord]) -> Completeness:
    """Whether the series made of ``instances`` is whole, with the reason in words."""
    if not instances:
        return Completeness(False, "no instances")
    multi = [i for i in instances if i.header.number_of_frames > 1]
    if multi:
        if len(multi) == len(instances):
            frames = sum(i.header.number_of_frames for i in multi)
            return Completeness(True, f"{len(multi)} multi-frame instance(s), {frames} frames")
        return Completeness(False, "mixes multi-frame and single-frame instances")
    missing = missing_images(instances)
    if missing is not None:
        return Completeness(False, missing)
    if any(not i.header.image_position or not i.header.image_orientation for i in instances):
        return Completeness(False, "an instance has no ImagePositionPatient/ImageOrientationPatient")
    geometry = series_geometry([i.header.as_dataset() for i in instances])
    if geometry.problems:
        return Completeness(False, "; ".join(geometry.problems))
    return Completeness(True, f"{len(instances)} slices, evenly spaced, no gap")


def missing_images(instances: Sequence[InstanceRecord]) -> str | None:
    """``"N of M images (ImagesInAcquisition)"`` when the single-frame ``instances`` are fewer than their scanner
    said the acquisition has (an association aborted part-way, a sender that gave up); None otherwise, and when
    no instance says."""
    if any(i.header.number_of_frames > 1 for i in instances):
        return None
    expected = max((i.header.images_in_acquisition for i in instances), default=0)
    if expected and len(instances) < expected:
        return f"{len(instances)} of {expected} images (ImagesInAcquisition)"
    slices = max((i.header.vendor_slices for i in instances), default=0)
    if slices and len(instances) < slices:
        return f"{len(instances)} of {slices} slices (the vendor's private slice count)"
    return None

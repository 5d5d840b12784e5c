"""Series assembly: is a received series whole?

Decided from the headers filed in the journal (never from pixels): a multi-frame instance is whole
by itself; single-frame slices are whole when their positions are evenly spaced along one
orientation with no gap and, where the scanner says how many images the acquisition has
(ImagesInAcquisition), all of them are there. A series that never becomes whole closes on the
node's idle timeout and is then processed, or failed with the geometry problem as the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from inference.volume import series_geometry

from .journal import InstanceRecord


@dataclass(frozen=True)
class Completeness:
    whole: bool
    reason: str


def _header(geometry: dict) -> Dataset:
    ds = Dataset()
    if geometry.get("ipp"):
        ds.ImagePositionPatient = geometry["ipp"]
    if geometry.get("iop"):
        ds.ImageOrientationPatient = geometry["iop"]
    if geometry.get("ps"):
        ds.PixelSpacing = geometry["ps"]
    if geometry.get("thickness"):
        ds.SliceThickness = geometry["thickness"][0]
    ds.Rows = geometry.get("rows", 0)
    ds.Columns = geometry.get("cols", 0)
    ds.InstanceNumber = geometry.get("instance", 0)
    return ds


def completeness(instances: Sequence[InstanceRecord]) -> Completeness:
    """Whether the series made of ``instances`` is whole, with the reason in words."""
    if not instances:
        return Completeness(False, "no instances")
    multi = [i for i in instances if int(i.geometry.get("frames") or 1) > 1]
    if multi:
        if len(multi) == len(instances):
            frames = sum(int(i.geometry["frames"]) for i in multi)
            return Completeness(True, f"{len(multi)} multi-frame instance(s), {frames} frames")
        return Completeness(False, "mixes multi-frame and single-frame instances")
    expected = max(int(i.geometry.get("images_in_acquisition") or 0) for i in instances)
    if expected and len(instances) < expected:
        return Completeness(False, f"{len(instances)} of {expected} images (ImagesInAcquisition)")
    if any(not i.geometry.get("ipp") or not i.geometry.get("iop") for i in instances):
        return Completeness(False, "an instance has no ImagePositionPatient/ImageOrientationPatient")
    geometry = series_geometry([_header(i.geometry) for i in instances])
    if geometry.problems:
        return Completeness(False, "; ".join(geometry.problems))
    return Completeness(True, f"{len(instances)} slices, evenly spaced, no gap")

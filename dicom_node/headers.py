"""What the node keeps of a received instance's header, from receipt to routing.

:class:`InstanceHeader` is the per-instance part assembly decides on (Image Plane and Image Pixel
module values, frame and image counts); :class:`SeriesAttributes` the per-series part routing matches
on (General Series, MR Image and General Equipment values of the series' first instance). Both are
parsed once from the received data set (:func:`describe`), filed in the journal as JSON (with the keys
the journal has always used, so older journals read the same) and read back typed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.tag import Tag

T = TypeVar("T")


def text(value: object) -> str:
    """A DICOM value as stripped text ('' when absent)."""
    return "" if value is None else str(value).strip()


def _as_list(value: Any) -> list[Any]:
    """A DICOM value as a list: multi-valued elements iterate, single values are wrapped."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _floats(value: Any) -> tuple[float, ...] | None:
    try:
        values = tuple(float(v) for v in _as_list(value))
    except (TypeError, ValueError):
        return None
    return values or None


def _int(value: Any, default: int = 0) -> int:
    """An integer value, ``default`` when absent or empty; an unreadable one raises (the SCP refuses it)."""
    return int(value or default)


def _floats_of(data: Mapping[str, Any], key: str) -> tuple[float, ...] | None:
    value = data.get(key)
    return tuple(float(v) for v in value) if value else None


@dataclass(frozen=True)
class InstanceHeader:
    """The geometry and counts of one instance, as assembly needs them (no pixel data)."""

    image_position: tuple[float, ...] | None = None      # ImagePositionPatient
    image_orientation: tuple[float, ...] | None = None   # ImageOrientationPatient
    pixel_spacing: tuple[float, ...] | None = None       # PixelSpacing (row, column)
    rows: int = 0
    columns: int = 0
    number_of_frames: int = 1
    instance_number: int = 0
    images_in_acquisition: int = 0                       # ImagesInAcquisition (0: not said)
    slice_thickness: tuple[float, ...] | None = None     # SliceThickness
    #: the acquisition's slice count as the vendor writes it in a private element when ImagesInAcquisition is
    #: absent (:data:`VENDOR_SLICE_COUNTS`; 0: not said)
    vendor_slices: int = 0

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceHeader:
        frames = _int(ds.get("NumberOfFrames"), 1)
        # an Enhanced MR image of one frame holds its plane only in the functional groups
        in_groups = frames <= 1 and "ImagePositionPatient" not in ds
        # an optional count ("176\\176", "abc") reads as not said: it refused the image, and the series then failed
        # as incomplete
        said = _tolerant(lambda d: _int(d.get("ImagesInAcquisition")), ds) or 0
        return cls(
            image_position=_floats(ds.get("ImagePositionPatient"))
            or (_group_value(ds, "PlanePositionSequence", "ImagePositionPatient") if in_groups else None),
            image_orientation=_floats(ds.get("ImageOrientationPatient"))
            or (_group_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient") if in_groups else None),
            pixel_spacing=_floats(ds.get("PixelSpacing"))
            or (_group_value(ds, "PixelMeasuresSequence", "PixelSpacing") if in_groups else None),
            rows=_int(ds.get("Rows")),
            columns=_int(ds.get("Columns")),
            number_of_frames=_int(ds.get("NumberOfFrames"), 1),
            instance_number=_int(ds.get("InstanceNumber")),
            images_in_acquisition=said,
            slice_thickness=_floats(ds.get("SliceThickness")),
            vendor_slices=0 if said else vendor_slice_count(ds),
        )

    def to_json(self) -> dict[str, Any]:
        """The journal's ``instances.geometry`` (keys unchanged since schema 1)."""
        def listed(values: tuple[float, ...] | None) -> list[float] | None:
            return None if values is None else list(values)
        return {"ipp": listed(self.image_position), "iop": listed(self.image_orientation),
                "ps": listed(self.pixel_spacing), "rows": self.rows, "cols": self.columns,
                "frames": self.number_of_frames, "instance": self.instance_number,
                "images_in_acquisition": self.images_in_acquisition, "thickness": listed(self.slice_thickness),
                "vendor_slices": self.vendor_slices}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InstanceHeader:
        return cls(
            image_position=_floats_of(data, "ipp"), image_orientation=_floats_of(data, "iop"),
            pixel_spacing=_floats_of(data, "ps"), rows=_int(data.get("rows")), columns=_int(data.get("cols")),
            number_of_frames=_int(data.get("frames"), 1), instance_number=_int(data.get("instance")),
            images_in_acquisition=_int(data.get("images_in_acquisition")),
            slice_thickness=_floats_of(data, "thickness"), vendor_slices=_int(data.get("vendor_slices")),
        )

    def as_dataset(self) -> Dataset:
        """A header-only data set with these values (what :func:`inference.volume.series_geometry` reads)."""
        ds = Dataset()
        if self.image_position:
            ds.ImagePositionPatient = list(self.image_position)
        if self.image_orientation:
            ds.ImageOrientationPatient = list(self.image_orientation)
        if self.pixel_spacing:
            ds.PixelSpacing = list(self.pixel_spacing)
        if self.slice_thickness:
            ds.SliceThickness = self.slice_thickness[0]
        ds.Rows = self.rows
        ds.Columns = self.columns
        ds.InstanceNumber = self.instance_number
        return ds


#: Private elements in which a vendor that leaves ImagesInAcquisition out says how many slice locations the
#: acquisition has: (Manufacturer's first word, group, private creator, element offset, its name). A single-frame
#: series with fewer images than that is a part (multi-echo and multi-phase series have more).
VENDOR_SLICE_COUNTS = (
    ("GE", 0x0021, "GEMS_RELA_01", 0x4F, "GE Locations in acquisition (0021,xx4F)"),
    ("PHILIPS", 0x2001, "Philips Imaging DD 001", 0x18, "Philips Number of Slices MR (2001,xx18)"),
)


def vendor_slice_count(ds: Dataset) -> int:
    """The slice count of :data:`VENDOR_SLICE_COUNTS` for ``ds``'s manufacturer (0: none, or not readable: it only
    ever holds a series back, so an unreadable one is ignored rather than refused)."""
    manufacturer = text(ds.get("Manufacturer")).upper()
    for word, group, creator, offset, _ in VENDOR_SLICE_COUNTS:
        if not manufacturer.startswith(word):  # ("GE MEDICAL SYSTEMS", "GE HealthCare", "Philips Healthcare")
            continue
        try:
            # the creator's usual slot first, by its tag: finding a private block in general sorts the data set's
            # tags, which costs as much as the rest of the header on every C-STORE of such a series
            slot = ds.get(Tag(group, 0x0010))
            if slot is not None and text(slot.value) == creator:
                value = ds[Tag(group, 0x1000 + offset)].value
            else:
                value = ds.get_private_item(group, offset, creator).value
            if isinstance(value, bytes):  # not converted (an unknown VR, e.g. UN): the dictionary's VR
                value = int.from_bytes(value, "little", signed=True) if len(value) in (2, 4) else 0
            count = int(value)
        except (KeyError, TypeError, ValueError, OverflowError):
            return 0
        return count if 0 < count < 100_000 else 0
    return 0


#: SeriesAttributes field -> the DICOM keyword it holds (and its key in the journal's ``series.attrs``).
_KEYWORDS = {
    "series_description": "SeriesDescription", "modality": "Modality", "image_type": "ImageType",
    "mr_acquisition_type": "MRAcquisitionType", "slice_thickness": "SliceThickness",
    "manufacturer": "Manufacturer", "manufacturer_model_name": "ManufacturerModelName",
    "software_versions": "SoftwareVersions", "protocol_name": "ProtocolName", "series_number": "SeriesNumber",
    "sop_class_uid": "SOPClassUID", "patient_position": "PatientPosition", "sop_instance_uid": "SOPInstanceUID",
    "accession_number": "AccessionNumber", "study_date": "StudyDate", "study_description": "StudyDescription",
    "body_part_examined": "BodyPartExamined",
}


def _group_value(ds: Dataset, sequence: str, keyword: str) -> tuple[float, ...] | None:
    """``keyword`` of the functional group ``sequence`` (Enhanced MR): the shared one, else the first frame's."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            item = ds[groups][0][sequence][0]
        except (KeyError, IndexError, AttributeError, TypeError):
            continue
        found = _floats(item.get(keyword))
        if found:
            return found
    return None


def _slice_thickness(ds: Dataset) -> float | None:
    """SliceThickness: at the top level, or (Enhanced MR, where it is only in the functional groups) in the
    shared Pixel Measures, else in the first frame's."""
    found = _floats(ds.get("SliceThickness")) or _group_value(ds, "PixelMeasuresSequence", "SliceThickness")
    return found[0] if found else None


def _tolerant(read: Callable[[Dataset], T], ds: Dataset) -> T | None:
    """``read(ds)``, None when the value cannot be read. Series attributes are read from the first instance of a
    series the SCP sees and kept for the next (:class:`SeriesAttributes`): an unreadable one refused only the
    instances that happened to be first, so the replay of a receipt log (which starts without them) refused, and
    lost, instances the C-STORE had answered with Success. An unreadable SeriesNumber or SliceThickness reads as
    absent instead, for every instance alike."""
    try:
        return read(ds)
    except (TypeError, ValueError, OverflowError, BytesLengthException):
        return None


@dataclass(frozen=True)
class SeriesAttributes:
    """What routing matches on, from the series' first instance (each field holds the DICOM keyword's value),
    and the study's accession number, date and description the dashboard shows."""

    series_description: str = ""
    modality: str = ""
    image_type: tuple[str, ...] = field(default_factory=tuple)   # upper case
    mr_acquisition_type: str = ""
    slice_thickness: float | None = None
    manufacturer: str = ""
    manufacturer_model_name: str = ""
    software_versions: str = ""
    protocol_name: str = ""
    series_number: int = 0
    sop_class_uid: str = ""
    patient_position: str = ""
    sop_instance_uid: str = ""                                  # of the instance they were taken from
    # the study's, for the dashboard and its search ('' in series journaled before they were kept)
    accession_number: str = ""
    study_date: str = ""                                        # DA, YYYYMMDD as received
    study_description: str = ""
    body_part_examined: str = ""                                # '' also in series journaled before it was kept

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SeriesAttributes:
        return cls(
            series_description=text(ds.get("SeriesDescription")), modality=text(ds.get("Modality")),
            image_type=tuple(str(v).strip().upper() for v in _as_list(ds.get("ImageType"))),
            mr_acquisition_type=text(ds.get("MRAcquisitionType")),
            slice_thickness=_tolerant(_slice_thickness, ds),
            manufacturer=text(ds.get("Manufacturer")), manufacturer_model_name=text(ds.get("ManufacturerModelName")),
            software_versions=text(ds.get("SoftwareVersions")), protocol_name=text(ds.get("ProtocolName")),
            series_number=_tolerant(lambda d: _int(d.get("SeriesNumber")), ds) or 0,
            sop_class_uid=text(ds.get("SOPClassUID")),
            patient_position=text(ds.get("PatientPosition")), sop_instance_uid=text(ds.get("SOPInstanceUID")),
            accession_number=text(ds.get("AccessionNumber")), study_date=text(ds.get("StudyDate")),
            study_description=text(ds.get("StudyDescription")),
            body_part_examined=text(ds.get("BodyPartExamined")),
        )

    def to_json(self) -> dict[str, Any]:
        """The journal's ``series.attrs``: DICOM keywords as keys (unchanged since schema 1)."""
        data = {keyword: getattr(self, name) for name, keyword in _KEYWORDS.items()}
        data["ImageType"] = list(self.image_type)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SeriesAttributes:
        values: dict[str, Any] = {name: data[keyword] for name, keyword in _KEYWORDS.items()
                                  if data.get(keyword) is not None}
        values["image_type"] = tuple(str(v) for v in values.get("image_type") or ())
        values["series_number"] = _int(values.get("series_number"))
        if values.get("slice_thickness") is not None:
            values["slice_thickness"] = float(values["slice_thickness"])
        return cls(**values)


@dataclass(frozen=True)
class ReceivedInstance:
    """What the node files in the journal for one received instance (besides where and how it came)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    header: InstanceHeader
    series: SeriesAttributes


def describe(ds: Dataset, series: SeriesAttributes | None = None) -> ReceivedInstance:
    """Parse what the node keeps of a received data set's header (never its pixels).

    ``series``: the attributes already read from another instance of the same series (the journal keeps
    only the first instance's, so reading them again from each instance is wasted work).
    """
    return ReceivedInstance(
        sop_instance_uid=text(ds.get("SOPInstanceUID")), sop_class_uid=text(ds.get("SOPClassUID")),
        study_uid=text(ds.get("StudyInstanceUID")), series_uid=text(ds.get("SeriesInstanceUID")),
        patient_id=text(ds.get("PatientID")), header=InstanceHeader.from_dataset(ds),
        series=SeriesAttributes.from_dataset(ds) if series is None else series,
    )

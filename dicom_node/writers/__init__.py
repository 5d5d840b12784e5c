"""Writers: one module per DICOM object type the node creates (derived MR, SEG, SR, summary, "not processed").

Every writer returns what it wrote (:class:`WrittenSeries`): the files with their SOP Class and SOP
Instance UIDs, the Series Instance UID and the data sets as written (without pixel data), so the
caller never reads back a file it has just written.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from highdicom import SpecificCharacterSetValues
from pydicom import config, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.valuerep import validate_value

import dicom_node
from inference.volume import shallow_copy, without_pixels

_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = True


@contextmanager
def gc_paused() -> Iterator[None]:
    """While inside, Python's cyclic garbage collector does not run; it is on again (if it was) when the last
    writer inside leaves. A SEG or SR is tens of thousands of small pydicom objects that all live until the file
    is written: each collection their allocations trigger walks them again (about a fifth of building them).
    Reference counting still frees everything else; the cycles made meanwhile are collected afterwards."""
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def warm_up() -> None:
    """Load now the tables highdicom reads when it builds its first object (the attributes of every IOD module,
    parsed from JSON: 0.3-0.7 s), so that the first job of a process does not wait on them."""
    from highdicom import _standard_utils as standard  # highdicom caches them (lru_cache) for the process

    for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        loader = getattr(standard, name, None)
        if callable(loader):
            loader()


@dataclass(frozen=True)
class WrittenSeries:
    """One series the node wrote: its files in InstanceNumber order and their headers (no pixel data)."""

    series_instance_uid: str
    files: tuple[WrittenFile, ...]
    datasets: tuple[Dataset, ...]
    #: SEG only: FreeSurfer code -> SegmentNumber of each segment written
    segment_numbers: Mapping[int, int] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.files]

    @property
    def path(self) -> Path:
        """The file of a single-object series (SEG, SR, summary)."""
        (only,) = self.files
        return only.path

    @property
    def dataset(self) -> Dataset:
        """The header of a single-object series (SEG, SR, summary)."""
        (only,) = self.datasets
        return only


class WrittenFile(NamedTuple):
    """One DICOM file the node wrote."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str


#: Type 2 patient and study attributes that highdicom copies from the source of every SEG, SR and Secondary
#: Capture it builds, and reads with no fallback: a source without one (an anonymised or research export has no
#: AccessionNumber or StudyID) would fail the object.
IDENTITY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "StudyID", "AccessionNumber")
#: PatientSex's enumerated values (PS3.3 C.7.1.1); anything else (a RIS's "U", "unknown") is not one of them.
PATIENT_SEX_VALUES = ("M", "F", "O")


def patient_sex(value: object) -> str | None:
    """A PatientSex value as DICOM allows it: ``M``, ``F`` or ``O`` (case and padding aside), else None (written
    empty: unknown, which is what an empty Type 2 value says)."""
    text = str(value or "").strip().upper()
    return text if text in PATIENT_SEX_VALUES else None


#: VRs of text that SpecificCharacterSet applies to (PS3.5 6.1.2.3)
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
UTF8 = "ISO_IR 192"
_CHARSET = Tag("SpecificCharacterSet")


def charset_ready(ds: Dataset) -> bool:
    """Whether highdicom takes ``ds``'s SpecificCharacterSet as it is: none, or one value it knows without code
    extensions. Japanese and Korean equipment write several (``\\ISO 2022 IR 87``, the first empty as DICOM
    allows), which highdicom refuses."""
    value = ds.get("SpecificCharacterSet")
    if not value:
        return True
    values = [value] if isinstance(value, str) else list(value)
    if len(values) != 1 or str(values[0]).startswith("ISO 2022"):
        return False
    try:
        SpecificCharacterSetValues(str(values[0]))
    except ValueError:
        return False
    return True


def _in_utf8(ds: Dataset, ready: Dataset) -> None:
    """Every text element of ``ds``, nested ones too, decoded with ``ds``'s own character set and put in ``ready``
    (a shallow copy of ``ds``) as new elements of text, to be written in UTF-8; sequences holding text get new
    items (``ds``'s are left as they are). The caller sets ``ready``'s SpecificCharacterSet."""
    for element in ds:  # converted: the VR from the dictionary (Implicit VR), text decoded with ds's character set
        if element.tag == _CHARSET:
            continue
        if element.VR == "SQ" and element.value is not None:
            items = []
            for item in element.value:
                copy = shallow_copy(item, drop=[_CHARSET])
                _in_utf8(item, copy)
                items.append(copy)
            ready[element.tag] = DataElement(element.tag, "SQ", DicomSequence(items))
            continue
        value = element.value
        if str(element.VR) not in _TEXT_VRS or isinstance(value, bytes):
            continue  # not text (or a text VR holding bytes it could not decode: left as it is)
        text: Any = value if value is None or isinstance(value, str) else \
            [str(v) for v in value] if isinstance(value, MultiValue) else str(value)  # (a PersonName)
        ready[element.tag] = DataElement(element.tag, element.VR, text)  # a new element: ds keeps its own


def in_utf8(ds: Dataset) -> Dataset:
    """``ds`` with its text in UTF-8 (SpecificCharacterSet ISO_IR 192): a shallow copy, ``ds`` left as it is; ``ds``
    itself when it is UTF-8 already. For a text the node adds that the source's character set cannot hold (a
    failure reason with "≥" on a Latin-1 source, "ä" on one without a character set)."""
    charset = ds.get("SpecificCharacterSet")
    if charset and (charset if isinstance(charset, str) else "\\".join(charset)) == UTF8:
        return ds
    ready = shallow_copy(ds, drop=[_CHARSET])
    _in_utf8(ds, ready)
    ready.SpecificCharacterSet = UTF8
    return ready


def value_problem(element: DataElement) -> str | None:
    """Why ``element`` holds a value its VR does not allow (too long, bad characters), nested ones too; None if
    it holds none."""
    if element.VR == "SQ":
        return next((why for item in element.value for nested in item.iterall()
                     if nested.VR != "SQ" and (why := value_problem(nested)) is not None), None)
    if element.value is None:
        return None
    values = element.value if isinstance(element.value, (MultiValue, list, tuple)) else [element.value]
    for value in values:
        if element.VR in ("DS", "IS", "PN"):
            value = str(value)  # the validators check the string form
        try:
            validate_value(element.VR, value, config.RAISE)
        except ValueError as exc:
            return str(exc)
    return None


#: Optional patient and study attributes highdicom copies from a source into a SEG, an SR or a page: one whose value
#: its VR does not allow (a RIS's PatientAge "45Y") made the object invalid, and a strict PACS refused it while it
#: took the sT1 (whose writer leaves such optional values out). Left out here too. The identity itself
#: (:data:`IDENTITY_TYPE2`: patient ID and name, accession number...) is never altered: copied as it is.
IDENTITY_CHECKED = ("PatientAge", "PatientSize", "PatientWeight", "PatientBirthTime", "IssuerOfPatientID",
                    "StudyDescription", "EthnicGroup", "PatientComments", "AdditionalPatientHistory", "Occupation",
                    "OtherPatientNames", "InstitutionName")


def identity_ready(ds: Dataset) -> Dataset:
    """``ds`` as a source highdicom can build an object from: with every :data:`IDENTITY_TYPE2` attribute (empty
    where ``ds`` has none), none of :data:`IDENTITY_CHECKED` with a value its VR does not allow, a PatientSex it
    accepts (:func:`patient_sex`) and a character set it accepts (else its
    text in UTF-8: :func:`charset_ready`); ``ds`` itself when it has them, else a shallow copy (``ds`` is left as
    it is)."""
    invalid = [keyword for keyword in IDENTITY_CHECKED if keyword in ds and value_problem(ds[keyword]) is not None]
    missing = [keyword for keyword in IDENTITY_TYPE2 if keyword not in ds]
    sex = ds.get("PatientSex")
    sex_fixed = patient_sex(sex) if sex else sex
    charset = charset_ready(ds)
    if not missing and not invalid and sex_fixed == sex and charset:
        return ds
    # a new dataset sharing the other elements (setting an element both held would change the caller's too)
    ready = shallow_copy(ds, drop=[Tag("PatientSex"), *(Tag(keyword) for keyword in invalid)]
                         + ([] if charset else [Tag("SpecificCharacterSet")]))
    if not charset:
        _in_utf8(ds, ready)
        ready.SpecificCharacterSet = UTF8  # (left out of the copy: setting it would change ds's)
    for keyword in missing:
        setattr(ready, keyword, None)
    ready.PatientSex = sex_fixed
    return ready


def header_of(ds: Dataset) -> Dataset:
    """``ds`` without its pixel data (a shallow copy sharing the other elements, unconverted, and the file meta)."""
    return without_pixels(ds)


def write_file(ds: Dataset, out_path: Path) -> WrittenFile:
    """Write ``ds`` as a DICOM file (creating the folder) and say what was written."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(out_path, ds, enforce_file_format=True)
    return WrittenFile(out_path, str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def write_single(ds: Dataset, out_path: Path, *, segment_numbers: Mapping[int, int] | None = None,
                 encoded: Dataset | None = None) -> WrittenSeries:
    """Write the one object of a new series (SEG, SR, summary); ``encoded``: the same object partly encoded
    already, written in its place."""
    written = write_file(ds if encoded is None else encoded, out_path)
    return WrittenSeries(str(ds.SeriesInstanceUID), (written,), (header_of(ds),), dict(segment_numbers or {}))


def series_of(files: Sequence[WrittenFile], datasets: Sequence[Dataset]) -> WrittenSeries:
    """The series made of ``files`` (all of one Series Instance UID)."""
    return WrittenSeries(str(datasets[0].SeriesInstanceUID), tuple(files), tuple(datasets))


def software_versions(algorithm_name: str = "", algorithm_version: str = "") -> list[str]:
    """SoftwareVersions of every object the node writes: the node's and the model's (none for an object no model
    made, such as a "not processed" notice)."""
    node = f"dicom-node {dicom_node.__version__}"
    return [node, f"{algorithm_name} {algorithm_version}"] if algorithm_name else [node]


def equipment(algorithm_name: str = "", algorithm_version: str = "") -> dict[str, Any]:
    """General Equipment keyword arguments for highdicom constructors (this node; the loop guard
    recognises its own objects by Manufacturer and ManufacturerModelName)."""
    return {
        "manufacturer": dicom_node.MANUFACTURER,
        "manufacturer_model_name": dicom_node.MODEL_NAME,
        # a list: pydicom rejects a tuple for a multi-valued LO
        "software_versions": software_versions(algorithm_name, algorithm_version),
    }

"""Mutations of encoded DICOM objects for the C-STORE fuzzer (``bench.fuzz``).

A seed is a small series of well-formed objects (``tests.dicom_factory`` images in several transfer
syntaxes, and real scanner files from ``../shared/data`` when present). A mutation takes one encoded
object and a ``random.Random`` and returns a :class:`Mutant`: the file to send (file meta + data set;
the sender transmits the data set bytes as they are), the SOP Instance UID of the request and what the
node must answer. Everything is drawn from the generator it is given, so a case is reproducible from
its seed.

Element-level mutations change a copy of the data set with pydicom and encode it again (writing
validation off); byte-level ones work on the encoded data set, locating elements with pydicom's own
raw reader (``data_element_generator``), never by parsing DICOM by hand.
"""

from __future__ import annotations

import copy
import functools
import io
import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom.config
from PIL import Image
from pydicom import dcmread, dcmwrite
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments, itemize_fragment
from pydicom.filereader import _read_file_meta_info, data_element_generator
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from dicom_node.scp import STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH, STATUS_OUT_OF_RESOURCES, TRANSFER_SYNTAXES

#: ``Mutant.expect``: any valid status will do; the object is broken, so any failure status (not Success).
ANY = None
FAILURE = -1

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
#: SOP classes the fuzzer proposes (and may claim in a request)
SOP_CLASSES = (MRImageStorage, ENHANCED_MR_IMAGE_STORAGE, CT_IMAGE_STORAGE, SECONDARY_CAPTURE_STORAGE)

# VRs whose explicit-VR length field has 4 bytes (PS3.5 7.1.2)
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_KNOWN_VRS = ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD", "OF", "OL",
              "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US",
              "UT", "UV")
#: Not of UID form: the node must refuse them (0xA900) and never make a path of them
BAD_UIDS = ("..", ".", "/", "a/b", "../../../tmp/x", "1+1", "1_1", "1..2", ".1.2", "1.2.", "1.2.abc",
            "1.2.3\\1.2.4", "1.2.-3", "1" * 65, "1." * 40 + "1", "\u00e91.2", "1.2 .3")
_INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)
_INTERESTING_LENGTHS = (0, 1, 3, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFE, 0xFFFFFFFF)
_WEIRD_TEXT = ("", " ", "\\", "\\\\\\", "\x00", "\x1b$B", "\u00e9\u00e8\u4e2d\u6587", "%s%n%x", "A" * 10_000,
               "-1", "nan", "inf", "1e999", "9" * 40, "0x10", "1\\2\\3\\4\\5\\6\\7",
               "Doe^Jane=\u5c71\u7530^\u82b1\u5b50",
               "../../etc/passwd", "\r\n\t")
#: Header elements the node reads on receipt or in a job (geometry, routing, the patient module)
_HEADER_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize",
                    "PatientWeight", "StudyDate", "SeriesDescription", "SeriesNumber", "InstanceNumber",
                    "Modality", "ImageType", "MRAcquisitionType", "SliceThickness", "SpacingBetweenSlices",
                    "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "PatientPosition",
                    "ImagesInAcquisition", "Manufacturer", "SpecificCharacterSet", "WindowCenter", "WindowWidth",
                    "RescaleSlope", "RescaleIntercept", "BitsStored", "HighBit", "PixelRepresentation",
                    "PhotometricInterpretation", "PlanarConfiguration", "SliceLocation", "AcquisitionMatrix")


@dataclass(frozen=True)
class Encoded:
    """One object as it would be sent: its file meta (preamble included) and its encoded data set."""

    meta: bytes
    body: bytes
    transfer_syntax: UID
    sop_class_uid: str
    sop_instance_uid: str

    @property
    def data(self) -> bytes:
        return self.meta + self.body

    def dataset(self) -> Dataset:
        return dcmread(io.BytesIO(self.data), force=True)


@dataclass(frozen=True)
class Mutant:
    """A mutated object and what the node must answer (``expect``: ANY, FAILURE or one status)."""

    mutation: str
    detail: str
    encoded: Encoded
    expect: int | None = ANY


Mutation = Callable[[random.Random, Encoded], Mutant]


# -- encoding -----------------------------------------------------------------------------------------

def encode(ds: Dataset, transfer_syntax: UID | None = None) -> Encoded:
    """Encode ``ds`` with file meta (in its meta's transfer syntax, or ``transfer_syntax``), validation off."""
    ds = copy.copy(ds)
    ds.file_meta = copy.deepcopy(ds.file_meta)
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    ts = UID(ds.file_meta.TransferSyntaxUID)
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", ds.file_meta.get("MediaStorageSOPClassUID"))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID",
                                                     ds.file_meta.get("MediaStorageSOPInstanceUID"))
    buffer = io.BytesIO()
    with _no_validation():
        ds.save_as(buffer, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian,
                   enforce_file_format=True)
    return split(buffer.getvalue())


@contextmanager
def _no_validation() -> Iterator[None]:
    """pydicom writes (and accepts) any value: the point is to send what a careless sender would."""
    mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        pydicom.config.settings.writing_validation_mode = mode


def split(data: bytes) -> Encoded:
    """An encoded file as (file meta, data set), as the node splits it (PS3.10 7.1)."""
    meta = _meta(data)
    end = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    return Encoded(data[:end], data[end:], UID(meta.TransferSyntaxUID), str(meta.MediaStorageSOPClassUID),
                   str(meta.MediaStorageSOPInstanceUID))


def _meta(data: bytes) -> FileMetaDataset:
    stream = io.BytesIO(data)
    stream.seek(132)  # preamble and "DICM"
    return _read_file_meta_info(stream)


def with_meta(encoded: Encoded, *, transfer_syntax: UID | None = None, sop_class_uid: str | None = None,
              sop_instance_uid: str | None = None, body: bytes | None = None) -> Encoded:
    """``encoded`` with other file meta values (what the request will say) and/or another data set body."""
    meta = _meta(encoded.meta)
    if transfer_syntax is not None:
        meta.TransferSyntaxUID = transfer_syntax
    if sop_class_uid is not None:
        meta.MediaStorageSOPClassUID = sop_class_uid
    if sop_instance_uid is not None:
        meta.MediaStorageSOPInstanceUID = sop_instance_uid
    shell = Dataset()
    shell.file_meta = meta
    shell.preamble = b"\x00" * 128
    buffer = io.BytesIO()
    with _no_validation():
        ts = UID(meta.TransferSyntaxUID)
        try:
            shell.save_as(buffer, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian,
                          enforce_file_format=True)
        except (ValueError, AttributeError):  # a transfer syntax pydicom does not know
            buffer = io.BytesIO()
            dcmwrite(buffer, shell, implicit_vr=False, little_endian=True)
    head = split(buffer.getvalue())
    return Encoded(head.meta, encoded.body if body is None else body, head.transfer_syntax,
                   head.sop_class_uid, head.sop_instance_uid)


def elements(encoded: Encoded) -> list[RawDataElement]:
    """The top-level elements of a non-deflated data set, read raw (with ``value_tell`` offsets)."""
    ts = encoded.transfer_syntax
    if ts == DeflatedExplicitVRLittleEndian:
        return []
    found = []
    try:
        for elem in data_element_generator(io.BytesIO(encoded.body), ts.is_implicit_VR, ts.is_little_endian,
                                           defer_size=64):
            if isinstance(elem, RawDataElement):
                found.append(elem)
    except Exception:  # noqa: BLE001 - a seed is well formed; stop at whatever cannot be read
        pass
    return found


def _header(elem: RawDataElement, ts: UID) -> tuple[int, int, int]:
    """(offset of the element's tag, of its length field, size of the length field) in the body."""
    if ts.is_implicit_VR:
        return elem.value_tell - 8, elem.value_tell - 4, 4
    if str(elem.VR) in _LONG_VRS:
        return elem.value_tell - 12, elem.value_tell - 4, 4
    return elem.value_tell - 8, elem.value_tell - 2, 2


def _encapsulated(encoded: Encoded) -> bool:
    return encoded.transfer_syntax.is_encapsulated


def _native_plain(encoded: Encoded) -> bool:
    return not encoded.transfer_syntax.is_encapsulated and not encoded.transfer_syntax.is_deflated


# -- byte-level mutations -----------------------------------------------------------------------------

def bit_flip(rng: random.Random, e: Encoded) -> Mutant:
    body = bytearray(e.body)
    n = rng.randint(1, 16)
    for _ in range(n):
        i = rng.randrange(len(body))
        body[i] ^= 1 << rng.randrange(8)
    return Mutant("bit-flip", f"{n} bits", with_meta(e, body=bytes(body)))


def byte_run(rng: random.Random, e: Encoded) -> Mutant:
    body = bytearray(e.body)
    at, n = rng.randrange(len(body)), rng.randint(1, 64)
    value = rng.choice(_INTERESTING_BYTES)
    run = bytes(rng.randrange(256) for _ in range(n)) if rng.random() < 0.5 else bytes([value]) * n
    body[at:at + n] = run[:len(body) - at]
    return Mutant("byte-run", f"{n} bytes at {at}", with_meta(e, body=bytes(body)))


def truncate(rng: random.Random, e: Encoded) -> Mutant:
    at = rng.randrange(len(e.body))
    # an image cut anywhere loses (part of) its pixel data: never a Success for a plain native encoding
    return Mutant("truncate", f"at {at} of {len(e.body)}", with_meta(e, body=e.body[:at]),
                  FAILURE if _native_plain(e) else ANY)


def length_field(rng: random.Random, e: Encoded) -> Mutant:
    found = elements(e)
    if not found:
        return bit_flip(rng, e)
    elem = rng.choice(found)
    _, at, size = _header(elem, e.transfer_syntax)
    value = rng.choice(_INTERESTING_LENGTHS + (elem.length + 1, elem.length + 2, max(elem.length - 2, 0)))
    value &= (1 << (8 * size)) - 1
    order = "little" if e.transfer_syntax.is_little_endian else "big"
    body = e.body[:at] + value.to_bytes(size, order) + e.body[at + size:]
    return Mutant("length-field", f"({elem.tag.group:04X},{elem.tag.element:04X}) length {value:#x}",
                  with_meta(e, body=body))


def wrong_vr(rng: random.Random, e: Encoded) -> Mutant:
    found = elements(e)
    if e.transfer_syntax.is_implicit_VR or not found:
        return length_field(rng, e)
    elem = rng.choice(found)
    start, _, _ = _header(elem, e.transfer_syntax)
    unknown = rng.random() < 0.3
    vr = rng.choice(("ZZ", "QQ", "XA")) if unknown else rng.choice(_KNOWN_VRS)
    body = e.body[:start + 4] + vr.encode() + e.body[start + 6:]
    return Mutant("wrong-vr", f"({elem.tag.group:04X},{elem.tag.element:04X}) {elem.VR} -> {vr}",
                  with_meta(e, body=body), FAILURE if unknown else ANY)


def transfer_syntax(rng: random.Random, e: Encoded) -> Mutant:
    """The request's transfer syntax is another one the node accepts; the bytes stay as they are."""
    other = rng.choice([ts for ts in TRANSFER_SYNTAXES if ts != e.transfer_syntax])
    return Mutant("transfer-syntax", f"{e.transfer_syntax.name} sent as {other.name}",
                  with_meta(e, transfer_syntax=other))


# -- element-level mutations --------------------------------------------------------------------------

def header_value(rng: random.Random, e: Encoded) -> Mutant:
    """A header element the node reads removed, or its encoded value replaced by odd text or bytes
    (written raw: pydicom would refuse to encode most of them)."""
    ds = e.dataset()
    keyword = rng.choice(_HEADER_KEYWORDS)
    if rng.random() < 0.15:
        if keyword in ds:
            del ds[keyword]
        return Mutant("header-value", f"{keyword} removed", encode(ds))
    tag = Tag(keyword_dict[keyword])
    vr = str(dictionary_VR(tag))[:2]
    if rng.random() < 0.7:
        text = rng.choice(_WEIRD_TEXT)
        value = text.encode("utf-8")
        detail = f"{keyword} = {text[:40]!r}"
    else:
        value = rng.randbytes(rng.choice((0, 1, 2, 3, 4, 6, 8, 12, 48, 1000)))
        detail = f"{keyword} = {len(value)} random bytes"
    if len(value) % 2 and rng.random() < 0.7:
        value += b" "
    ts = e.transfer_syntax
    ds[tag] = RawDataElement(tag, None if ts.is_implicit_VR else vr, len(value), value, 0, ts.is_implicit_VR,
                             ts.is_little_endian)
    return Mutant("header-value", detail, encode(ds))


def bad_uid(rng: random.Random, e: Encoded) -> Mutant:
    ds = e.dataset()
    keyword = rng.choice(("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"))
    value = rng.choice(BAD_UIDS)
    setattr(ds, keyword, value)
    return Mutant("bad-uid", f"{keyword} = {value[:24]!r}", encode(ds), STATUS_DATASET_MISMATCH)


def sop_class(rng: random.Random, e: Encoded) -> Mutant:
    """The request names another SOP class than the data set (0xA900), or the data set claims another class."""
    other = rng.choice([c for c in SOP_CLASSES if c != e.sop_class_uid])
    if rng.random() < 0.6:
        return Mutant("sop-class", f"request {other.name}, data set {e.sop_class_uid}",
                      with_meta(e, sop_class_uid=other), STATUS_DATASET_MISMATCH)
    ds = e.dataset()
    ds.SOPClassUID = other
    return Mutant("sop-class", f"data set and request {other.name}", encode(ds))


def pixel_module(rng: random.Random, e: Encoded) -> Mutant:
    ds = e.dataset()
    keyword, value = rng.choice((("Rows", 0), ("Columns", 0), ("SamplesPerPixel", 0),
                                 ("NumberOfFrames", 0), ("NumberOfFrames", -3), ("BitsAllocated", 0),
                                 ("BitsAllocated", 12), ("BitsAllocated", 7), ("BitsAllocated", 65),
                                 ("Rows", 4096), ("Columns", 65535), ("NumberOfFrames", 100_000),
                                 ("BitsStored", 0), ("BitsStored", 64), ("HighBit", 99), ("PixelRepresentation", 7),
                                 ("SamplesPerPixel", 3), ("PhotometricInterpretation", "YBR_FULL_422"),
                                 ("PlanarConfiguration", 5)))
    if keyword in ds:
        ds[keyword].value = value
    else:
        setattr(ds, keyword, value)
    # impossible values the node checks before anything else; larger images than the pixels hold
    # are a truncation (0xC000) for native encodings
    impossible = ((keyword in ("Rows", "Columns", "SamplesPerPixel", "NumberOfFrames") and int(value) < 1)
                  or (keyword == "BitsAllocated" and value not in (1, 8, 16, 24, 32, 40, 48, 56, 64)))
    larger = keyword in ("Rows", "Columns", "NumberOfFrames") and int(value) > 1000
    expect: int | None = ANY
    if impossible:
        expect = STATUS_DATASET_MISMATCH
    elif larger and _native_plain(e):
        expect = STATUS_CANNOT_UNDERSTAND
    return Mutant("pixel-module", f"{keyword} = {value}", encode(ds), expect)


def native_pixels(rng: random.Random, e: Encoded) -> Mutant:
    """PixelData of a native encoding cut, doubled, emptied, made odd or filled with noise."""
    if not _native_plain(e):
        return encapsulated_pixels(rng, e) if _encapsulated(e) else bit_flip(rng, e)
    pixel = next((x for x in elements(e) if x.tag == 0x7FE00010), None)
    if pixel is None:
        return truncate(rng, e)
    _, at, size = _header(pixel, e.transfer_syntax)
    order = "little" if e.transfer_syntax.is_little_endian else "big"
    n = pixel.length
    variant = rng.choice(("odd", "half", "double", "empty", "noise"))
    if variant == "odd":
        value, expect = e.body[pixel.value_tell:pixel.value_tell + n - 1], STATUS_CANNOT_UNDERSTAND
    elif variant == "half":
        value, expect = e.body[pixel.value_tell:pixel.value_tell + n // 2 // 2 * 2], STATUS_CANNOT_UNDERSTAND
    elif variant == "double":
        value, expect = e.body[pixel.value_tell:pixel.value_tell + n] * 2, STATUS_DATASET_MISMATCH
    elif variant == "empty":
        value, expect = b"", FAILURE
    else:
        value, expect = rng.randbytes(n), ANY
    body = e.body[:at] + len(value).to_bytes(size, order) + value + e.body[pixel.value_tell + n:]
    return Mutant("native-pixels", variant, with_meta(e, body=body), expect)


def encapsulated_pixels(rng: random.Random, e: Encoded) -> Mutant:
    """Broken fragments of RLE, JPEG, JPEG-LS or JPEG 2000 pixel data: stored as received (the node
    decodes nothing on receipt), so a routed series takes them to the decoders in a job."""
    if not _encapsulated(e):
        return native_pixels(rng, e) if _native_plain(e) else bit_flip(rng, e)
    ds = e.dataset()
    try:
        fragments = [bytearray(f) for f in generate_fragments(ds.PixelData)]
    except Exception:  # noqa: BLE001 - a seed whose fragments cannot be listed: break bytes instead
        return bit_flip(rng, e)
    if not fragments:
        return bit_flip(rng, e)
    k = rng.randrange(len(fragments))
    frag = fragments[k]
    variant = rng.choice(("flip", "noise", "cut", "empty", "rle-header", "markers", "split", "drop", "bot"))
    if variant == "flip" and frag:
        for _ in range(rng.randint(1, 32)):
            i = rng.randrange(len(frag))
            frag[i] ^= 1 << rng.randrange(8)
    elif variant == "noise":
        fragments[k] = bytearray(rng.randbytes(max(len(frag), 2)))
    elif variant == "cut":
        fragments[k] = frag[:rng.randrange(len(frag) + 1)]
    elif variant == "empty":
        fragments[k] = bytearray()
    elif variant == "rle-header" and len(frag) >= 64:
        # RLE: the 64-byte header, number of segments then 15 segment offsets (PS3.5 G.3.1)
        slot = rng.randrange(16)
        frag[4 * slot:4 * slot + 4] = rng.choice((0, 1, 15, 16, 255, 0x7FFFFFFF, 0xFFFFFFFF,
                                                  len(frag), len(frag) + 1000)).to_bytes(4, "little")
    elif variant == "markers" and len(frag) >= 4:
        # JPEG family: break the SOI/EOI markers or a marker segment length near the start
        at = rng.choice((0, 2, 4, len(frag) - 2))
        frag[at:at + 2] = rng.choice((b"\xff\xd9", b"\xff\xd8", b"\x00\x00", b"\xff\xff", b"\xff\xc4"))
    elif variant == "split" and len(frag) > 2:
        cuts = sorted(rng.sample(range(1, len(frag)), min(rng.randint(1, 8), len(frag) - 1)))
        pieces = [frag[a:b] for a, b in zip([0, *cuts], [*cuts, len(frag)], strict=True)]
        fragments[k:k + 1] = pieces
    elif variant == "drop" and len(fragments) > 1:
        del fragments[k]
    else:
        variant = "bot"
    frames = [bytes(f) + (b"\x00" if len(f) % 2 else b"") for f in fragments]
    table = b""
    if variant == "bot":
        # a Basic Offset Table that points past the fragments (or into the middle of one)
        table = b"".join(rng.choice((0, 1, 7, 0xFFFFFFF0)).to_bytes(4, "little") for _ in frames)
    # the items; pydicom writes the sequence delimiter after a value of undefined length
    ds.PixelData = itemize_fragment(table) + b"".join(itemize_fragment(f) for f in frames)
    ds["PixelData"].is_undefined_length = True
    return Mutant("encapsulated-pixels", f"{e.transfer_syntax.name}: {variant} fragment {k}", encode(ds))


def deflate(rng: random.Random, e: Encoded) -> Mutant:
    """Deflate: a valid re-encoding, a broken stream, or a bomb past ``max_object_mb`` (0xA700)."""
    variant = rng.choice(("valid", "garbage", "cut", "bomb"))
    if variant == "valid" and _native_plain(e) and not e.transfer_syntax.is_implicit_VR:
        if e.transfer_syntax.is_little_endian:
            return Mutant("deflate", variant, encode(e.dataset(), DeflatedExplicitVRLittleEndian))
    meta = with_meta(e, transfer_syntax=DeflatedExplicitVRLittleEndian)
    if variant == "bomb":
        size = BOMB_BYTES
        body = _deflated_zeros(size)
        return Mutant("deflate", f"bomb: {len(body)} bytes inflate to {size >> 20} MiB",
                      with_meta(meta, body=body), STATUS_OUT_OF_RESOURCES)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = compressor.compress(e.body if not e.transfer_syntax.is_deflated else b"\x00" * 64) + compressor.flush()
    if variant == "cut":
        body = stream[:rng.randrange(max(len(stream) // 2, 1))]
    else:
        body = rng.randbytes(rng.randint(0, 4096))
        variant = "garbage"
    return Mutant("deflate", variant, with_meta(meta, body=body), FAILURE)


#: Inflated size of a deflate bomb: past the fuzzing node's ``max_object_mb``
BOMB_BYTES = 64 << 20


@functools.lru_cache(maxsize=2)
def _deflated_zeros(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = b"\x00" * (1 << 20)
    parts = [compressor.compress(chunk) for _ in range(size >> 20)]
    return b"".join(parts) + compressor.flush()


def nesting(rng: random.Random, e: Encoded) -> Mutant:
    """A private sequence nested tens to hundreds of levels deep."""
    ds = e.dataset()
    depth = rng.randint(10, 120)
    inner = Dataset()
    inner.add_new(0x00091010, "LO", "deep")
    for _ in range(depth):
        outer = Dataset()
        outer.add_new(0x00091011, "SQ", DicomSequence([inner]))
        inner = outer
    ds.add_new(0x00090010, "LO", "FUZZ")
    ds.add_new(0x00091011, "SQ", DicomSequence([inner]))
    return Mutant("nesting", f"depth {depth}", encode(ds))


def big_element(rng: random.Random, e: Encoded) -> Mutant:
    """A large private element: under the object limit it is stored, past it the answer is 0xA700."""
    ds = e.dataset()
    oversize = rng.random() < 0.15
    size = OVERSIZE_BYTES if oversize else rng.choice((1 << 16, 1 << 20, 3 << 20))
    ds.add_new(0x00090010, "LO", "FUZZ")
    ds.add_new(0x00091020, "OB", b"\x5a" * size)
    return Mutant("big-element", f"{size >> 10} KiB", encode(ds), STATUS_OUT_OF_RESOURCES if oversize else ANY)


#: An object past the fuzzing node's ``max_object_mb``
OVERSIZE_BYTES = 24 << 20

#: name → (mutation, weight)
MUTATIONS: dict[str, tuple[Mutation, int]] = {
    "bit-flip": (bit_flip, 3),
    "byte-run": (byte_run, 2),
    "truncate": (truncate, 2),
    "length-field": (length_field, 3),
    "wrong-vr": (wrong_vr, 2),
    "transfer-syntax": (transfer_syntax, 2),
    "header-value": (header_value, 3),
    "bad-uid": (bad_uid, 2),
    "sop-class": (sop_class, 1),
    "pixel-module": (pixel_module, 2),
    "native-pixels": (native_pixels, 2),
    "encapsulated-pixels": (encapsulated_pixels, 4),
    "deflate": (deflate, 1),
    "nesting": (nesting, 1),
    "big-element": (big_element, 1),
}


def pick(rng: random.Random) -> str:
    names = list(MUTATIONS)
    return rng.choices(names, weights=[MUTATIONS[n][1] for n in names])[0]


# -- seeds --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seed:
    """A series to mutate: one or more well-formed objects of one encoding."""

    name: str
    objects: tuple[Dataset, ...]


def factory_seeds(folder: Path) -> list[Seed]:
    """``tests.dicom_factory`` series (3 slices of 32×32, 2 mm: the smallest the test model turns into
    an sT1, so that a job goes all the way through the writers) in every encoding the node takes and pydicom
    (or Pillow, for JPEG Baseline) can write."""
    from tests.dicom_factory import make_mr_series

    paths = make_mr_series(folder, shape=(3, 32, 32), spacing=(2.0, 2.0, 2.0), series_description="fuzz_t1_sag")
    base = [dcmread(p) for p in paths]
    seeds = [Seed("factory/explicit-le", tuple(base))]
    for ts, name in ((ImplicitVRLittleEndian, "implicit-le"), (ExplicitVRBigEndian, "explicit-be"),
                     (DeflatedExplicitVRLittleEndian, "deflate")):
        seeds.append(Seed(f"factory/{name}", tuple(_retagged(ds, ts) for ds in base)))
    for ts, name in ((RLELossless, "rle"), (JPEG2000Lossless, "jpeg2000"), (JPEGLSLossless, "jpeg-ls")):
        compressed = []
        for ds in base:
            copy_ = copy.deepcopy(ds)
            copy_.compress(ts)
            compressed.append(copy_)
        seeds.append(Seed(f"factory/{name}", tuple(compressed)))
    seeds.append(Seed("factory/jpeg-baseline", tuple(_jpeg_baseline(ds) for ds in base)))
    return seeds


def _retagged(ds: Dataset, ts: UID) -> Dataset:
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = ts
    if ts != ExplicitVRBigEndian:
        return out
    # pydicom converts between endiannesses only when forced; read back, the data set is big endian
    out.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
    out.preamble = b"\x00" * 128
    buffer = io.BytesIO()
    dcmwrite(buffer, out, implicit_vr=False, little_endian=False, force_encoding=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


def _jpeg_baseline(ds: Dataset) -> Dataset:
    """An 8-bit JPEG Baseline image (Pillow encodes it; pydicom encapsulates it)."""
    out = copy.deepcopy(ds)
    pixels = np.frombuffer(ds.PixelData, "<u2").reshape(int(ds.Rows), int(ds.Columns)).astype(float)
    eight = np.clip(pixels / max(float(pixels.max()), 1.0) * 255, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(eight).save(buffer, format="JPEG", quality=90)
    out.BitsAllocated, out.BitsStored, out.HighBit = 8, 8, 7
    out.PixelData = encapsulate([buffer.getvalue()])
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    out.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return out


#: Real files under ../shared/data/dicom used as seeds (small ones, each encoding once)
SHARED_SEEDS = (
    "transfer_syntaxes/pydicom_MR_small/MR_small.dcm",
    "transfer_syntaxes/pydicom_MR_small/MR_small_RLE.dcm",
    "transfer_syntaxes/pydicom_MR_small/MR_small_bigendian.dcm",
    "transfer_syntaxes/pydicom_MR_small/MR_small_implicit.dcm",
    "transfer_syntaxes/pydicom_MR_small/MR_small_jp2klossless.dcm",
    "transfer_syntaxes/pydicom_MR_small/MR_small_jpeg_ls_lossless.dcm",
    "transfer_syntaxes/dcm_qa_ts_siemens_epi_mosaic_9ts/4.dcm",
    "transfer_syntaxes/dcm_qa_ts_siemens_epi_mosaic_9ts/8.dcm",
    "transfer_syntaxes/dcm_qa_enh_enhanced_mr_siemens_xa10_philips/Siemens/XA10/6_1.dcm",
    "phantom_siemens_xa30_t1_jpegll_j2k/05001_anat_T1w_acq_tfl/5001040.dcm",
)


def shared_seeds(dicom_dir: Path, *, max_bytes: int | None = None) -> tuple[list[Seed], str]:
    """Real scanner files as one-object seeds (those up to ``max_bytes``), and a note (why there are
    none, when there are none)."""
    if not dicom_dir.is_dir():
        return [], f"real-data seeds skipped: {dicom_dir} not found (../shared/data is absent)"
    seeds = []
    for relative in SHARED_SEEDS:
        path = dicom_dir / relative
        if path.is_file() and (max_bytes is None or path.stat().st_size <= max_bytes):
            seeds.append(Seed(f"shared/{relative}", (dcmread(path),)))
    left = len(SHARED_SEEDS) - len(seeds)
    return seeds, (f"{len(seeds)} real-data seeds from {dicom_dir}"
                   + (f"; {left} left out (larger than {max_bytes} bytes, or not found)" if left else ""))


def fresh(ds: Dataset, *, study_uid: str, series_uid: str, frame_uid: str, sop_uid: str,
          description: str | None = None) -> Dataset:
    """A copy of a seed object with the case's own UIDs (every case is a new series of a new study)."""
    out = copy.copy(ds)
    out.file_meta = copy.deepcopy(ds.file_meta)
    out.StudyInstanceUID, out.SeriesInstanceUID, out.SOPInstanceUID = study_uid, series_uid, sop_uid
    if "FrameOfReferenceUID" in out:
        out.FrameOfReferenceUID = frame_uid
    if description is not None:
        out.SeriesDescription = description
    out.file_meta.MediaStorageSOPInstanceUID = sop_uid
    return out


def case_uids(campaign_seed: int, case: int, n: int) -> tuple[str, str, str, list[str]]:
    """Deterministic (study, series, frame of reference, [SOP instance]) UIDs of one case."""
    key = f"fuzz:{campaign_seed}:{case}"
    make = lambda what: str(generate_uid(entropy_srcs=[key, what]))
    return make("study"), make("series"), make("frame"), [make(f"sop{i}") for i in range(n)]


def describe(mutants: Sequence[Mutant]) -> str:
    return "; ".join(f"{m.mutation} ({m.detail})" for m in mutants)

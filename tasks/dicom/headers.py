"""Header parsing without pixel data, in batches, with detection of files that are not usable.

Every file under the source gives exactly one row of ``catalog/instances.parquet``
(docs/tables.md), whatever its content: ``status`` is ``ok`` or ``quarantined`` with a
reason code (:class:`tasks.records.Reason`). Nothing raises out of :func:`read_instance`.

Detection, without reading pixel values:

* ``empty-file``: zero bytes.
* ``not-dicom``: no ``DICM`` prefix at byte 128 (PS3.10 file format).
* ``dicomdir``: a media storage directory (its SOP class, or a Directory Record Sequence).
* ``truncated-file``: the Pixel Data element is read up to its header only, and its declared
  length (or, for encapsulated data, the chain of item lengths up to the sequence delimiter) is
  compared with the file size; an image header without Pixel Data, a header element running
  past the end of the file, or an incomplete deflated data set also mean truncation.
* ``missing-uids``: no SOP Instance, Series Instance or Study Instance UID.
* ``unreadable-header``: anything else the parser rejects.

Two readers, both pydicom's:

* the fast reader (little-endian single-frame files, the common case) runs pydicom's
  ``data_element_generator`` over the file meta group and the data set, keeps only the
  catalogue's tags (other values are skipped, not read) and builds no ``Dataset``;
* the full reader, ``pydicom.filereader.read_partial`` (what ``dcmread`` uses), takes every
  other file: big endian, deflated, unknown transfer syntax, multi-frame (functional groups),
  VR encoding contradicting the transfer syntax, or anything the fast reader cannot parse.

Values are decoded straight from the raw elements (pydicom's own character-set decoding for
text), several times faster than ``Dataset`` attribute access. Tests check that both readers
give identical rows on pydicom's sample files and that the values equal pydicom's attribute
access.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, BinaryIO

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_partial
from pydicom.uid import UID
from pydicom.values import converters

from tasks.dicom.listing import (
    STATUS_OK,
    STATUS_QUARANTINED,
    Batch,
    ListedFile,
    files_from_json,
    files_to_json,
)
from tasks.records import Reason
from tasks.store import Existing, SiteStore, open_url, protocol_of

#: Where batch tasks write their private part files (store-relative, cleaned after the merge).
PARTS_DIR = "catalog/_parts"

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DIRECTORY_RECORD_SEQUENCE = 0x00041220
DEFLATED_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"})
ITEM_TAG = (0xFFFE, 0xE000)
SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
MAX_FRAGMENTS = 1_000_000
PIXEL_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"})
TEXT_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
PN_DELIMITERS = {0x5E, 0x3D}


@dataclass(frozen=True)
class Column:
    r"""One catalogue column read from a top-level data element.

    Parameters
    ----------
    name
        Column name (docs/tables.md).
    tag
        DICOM tag.
    vr
        Dictionary VR (used for implicit VR and ``UN`` elements).
    kind
        ``text`` (one string, multiple values joined by ``\\``), ``int``, ``float`` or
        ``floats`` (a list of ``count`` numbers).
    count
        Expected number of values for ``floats``.
    """

    name: str
    tag: int
    vr: str
    kind: str
    count: int = 0


HEADER_COLUMNS: tuple[Column, ...] = (
    Column("sop_instance_uid", 0x00080018, "UI", "text"),
    Column("sop_class_uid", 0x00080016, "UI", "text"),
    Column("series_instance_uid", 0x0020000E, "UI", "text"),
    Column("study_instance_uid", 0x0020000D, "UI", "text"),
    Column("frame_of_reference_uid", 0x00200052, "UI", "text"),
    Column("patient_id", 0x00100020, "LO", "text"),
    Column("patient_name", 0x00100010, "PN", "text"),
    Column("patient_birth_date", 0x00100030, "DA", "text"),
    Column("patient_sex", 0x00100040, "CS", "text"),
    Column("patient_age", 0x00101010, "AS", "text"),
    Column("accession_number", 0x00080050, "SH", "text"),
    Column("study_date", 0x00080020, "DA", "text"),
    Column("study_time", 0x00080030, "TM", "text"),
    Column("series_date", 0x00080021, "DA", "text"),
    Column("series_time", 0x00080031, "TM", "text"),
    Column("acquisition_time", 0x00080032, "TM", "text"),
    Column("modality", 0x00080060, "CS", "text"),
    Column("manufacturer", 0x00080070, "LO", "text"),
    Column("model", 0x00081090, "LO", "text"),
    Column("body_part_examined", 0x00180015, "CS", "text"),
    Column("series_description", 0x0008103E, "LO", "text"),
    Column("image_type", 0x00080008, "CS", "text"),
    Column("series_number", 0x00200011, "IS", "int"),
    Column("instance_number", 0x00200013, "IS", "int"),
    Column("rows", 0x00280010, "US", "int"),
    Column("columns", 0x00280011, "US", "int"),
    Column("number_of_frames", 0x00280008, "IS", "int"),
    Column("samples_per_pixel", 0x00280002, "US", "int"),
    Column("bits_allocated", 0x00280100, "US", "int"),
    Column("pixel_spacing", 0x00280030, "DS", "floats", 2),
    Column("slice_thickness", 0x00180050, "DS", "float"),
    Column("rescale_slope", 0x00281053, "DS", "float"),
    Column("rescale_intercept", 0x00281052, "DS", "float"),
    Column("image_position", 0x00200032, "DS", "floats", 3),
    Column("image_orientation", 0x00200037, "DS", "floats", 6),
    Column("burned_in_annotation", 0x00280301, "CS", "text"),
)

META_COLUMNS: tuple[Column, ...] = (
    Column("media_sop_class_uid", 0x00020002, "UI", "text"),
    Column("media_sop_instance_uid", 0x00020003, "UI", "text"),
    Column("transfer_syntax_uid", 0x00020010, "UI", "text"),
)
_COLUMN_BY_TAG = {c.tag: c for c in HEADER_COLUMNS}
_FRAMES = _COLUMN_BY_TAG[0x00280008]
_META_BY_TAG = {c.tag: c for c in META_COLUMNS}

_FLOATS = pa.list_(pa.float64())
_ARROW_TYPES = {"text": pa.string(), "int": pa.int64(), "float": pa.float64(), "floats": _FLOATS}

#: Schema of ``catalog/instances.parquet`` and of the batch part files (docs/tables.md).
_HEADER_TYPES = {c.name: _ARROW_TYPES[c.kind] for c in HEADER_COLUMNS}
_COLUMN_ORDER = (
    "path",
    "size",
    "mtime",
    "status",
    "reason",
    "detail",
    "sop_instance_uid",
    "sop_class_uid",
    "series_instance_uid",
    "study_instance_uid",
    "frame_of_reference_uid",
    "patient_id",
    "patient_name",
    "patient_birth_date",
    "patient_sex",
    "patient_age",
    "accession_number",
    "study_date",
    "study_time",
    "series_date",
    "series_time",
    "acquisition_time",
    "modality",
    "manufacturer",
    "model",
    "body_part_examined",
    "series_description",
    "image_type",
    "series_number",
    "instance_number",
    "rows",
    "columns",
    "number_of_frames",
    "samples_per_pixel",
    "bits_allocated",
    "transfer_syntax_uid",
    "pixel_spacing",
    "slice_thickness",
    "rescale_slope",
    "rescale_intercept",
    "image_position",
    "image_orientation",
    "burned_in_annotation",
    "frame_positions",
)
_OTHER_TYPES = {
    "path": pa.string(),
    "size": pa.int64(),
    "mtime": pa.string(),
    "status": pa.string(),
    "reason": pa.string(),
    "detail": pa.string(),
    "transfer_syntax_uid": pa.string(),
    "frame_positions": pa.list_(_FLOATS),
}

#: Schema of ``catalog/instances.parquet`` and of the batch part files (docs/tables.md).
INSTANCE_SCHEMA = pa.schema(
    [(name, _HEADER_TYPES.get(name) or _OTHER_TYPES[name]) for name in _COLUMN_ORDER]
)
INSTANCE_COLUMNS: tuple[str, ...] = tuple(INSTANCE_SCHEMA.names)


def empty_row(listed: ListedFile) -> dict[str, Any]:
    """Return a catalogue row for ``listed`` with every header column null."""
    row: dict[str, Any] = dict.fromkeys(INSTANCE_COLUMNS)
    row.update(path=listed.path, size=listed.size, mtime=listed.mtime, status=STATUS_OK)
    row.update(reason="", detail="")
    return row


def warm_up() -> None:
    """Import what parsing a batch needs (pyarrow imports pandas on first table build).

    Called once per Dask worker when the cluster starts, so the import is start-up cost.
    """
    rows_to_table([])


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Build an instances table (sorted by path) from catalogue rows."""
    ordered = sorted(rows, key=lambda r: r["path"])
    return pa.Table.from_pylist(ordered, schema=INSTANCE_SCHEMA)


# --- decoding raw elements ---------------------------------------------------------------------


@lru_cache(maxsize=64)
def _encodings(charset: tuple[str, ...] | str) -> tuple[str, ...]:
    values = [charset] if isinstance(charset, str) else list(charset)
    try:
        return tuple(convert_encodings(values))
    except Exception:
        return ("iso8859",)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _decode_text(raw: bytes, vr: str, encodings: tuple[str, ...]) -> str:
    if vr in TEXT_VRS:
        delimiters = PN_DELIMITERS if vr == "PN" else {0x5C}
        try:
            text = decode_bytes(raw, list(encodings), delimiters)
        except Exception:
            text = raw.decode("latin-1")
    else:
        text = raw.decode("latin-1")
    if "\\" in text:
        text = "\\".join(part.strip(" \x00") for part in text.split("\\")).strip("\\")
    else:
        text = text.strip(" \x00")
    # pydicom drops empty trailing component groups of a person name ("Wang^XiaoDong=王^小东=")
    return text.rstrip("=") if vr == "PN" else text


def _decode_numbers(raw: bytes, vr: str, little: bool) -> list[float]:
    fmt = "<" if little else ">"
    if vr in ("US", "SS", "UL", "SL", "FL", "FD"):
        code = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}[vr]
        width = struct.calcsize(code)
        n = len(raw) // width
        return [float(v) for v in struct.unpack(f"{fmt}{n}{code}", raw[: n * width])]
    text = raw.decode("latin-1").strip(" \x00")
    if not text:
        return []
    return [float(part) for part in text.split("\\")]


def _element_value(elem: Any, column: Column, encodings: tuple[str, ...]) -> Any:
    """Decode one element for ``column``; return None for absent, empty or invalid values."""
    if getattr(elem, "is_raw", False):
        raw = elem.value
        if raw is None:
            return None
        vr = elem.VR if elem.VR and elem.VR not in ("UN", "OB") else column.vr
        little = elem.is_little_endian
        if column.kind == "text":
            text = _decode_text(raw, vr, encodings)
            return text or None
        numbers = _decode_numbers(raw, vr, little)
    else:
        value = elem.value
        if value is None or value == "":
            return None
        if column.kind == "text":
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                return str(value).strip(" \x00") or None
            return "\\".join(str(v).strip(" \x00") for v in value) or None
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            value = [value]
        numbers = [float(v) for v in value]
    if column.kind == "floats":
        if len(numbers) != column.count:
            return None
        checked = [_finite(v) for v in numbers]
        return None if any(v is None for v in checked) else checked
    if not numbers:
        return None
    first = _finite(numbers[0])
    if first is None:
        return None
    if column.kind == "int":
        return int(first) if first == int(first) else None
    return first


def header_values(ds: Dataset) -> dict[str, Any]:
    """Return the catalogue header columns of a dataset read by pydicom.

    Values that are absent, empty or invalid (e.g. a non-numeric ``IS``) are None; a bad value
    never raises.

    Parameters
    ----------
    ds
        Dataset (typically read with ``stop_before_pixels``).

    Returns
    -------
    dict
        Column name to value.
    """
    charset = getattr(ds, "original_character_set", None) or "iso8859"
    encodings = _encodings(tuple(charset) if not isinstance(charset, str) else charset)
    meta = getattr(ds, "file_meta", None)
    meta_values = file_meta_values(meta) if meta is not None else {}
    out = _column_values(ds.items(), encodings, meta_values)
    if (out.get("number_of_frames") or 1) > 1 or 0x52009230 in ds:
        out.update(_multiframe_geometry(ds, out))
    return out


def _decode_columns(
    items: Iterable[tuple[int, Any]], by_tag: dict[int, Column], encodings: tuple[str, ...]
) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(c.name for c in by_tag.values())
    for tag, elem in items:
        column = by_tag.get(tag)
        if column is not None:
            try:
                out[column.name] = _element_value(elem, column, encodings)
            except Exception:
                out[column.name] = None
    return out


def _column_values(
    items: Iterable[tuple[int, Any]],
    encodings: tuple[str, ...],
    meta_values: dict[str, str | None],
) -> dict[str, Any]:
    """Catalogue columns from top-level elements, completed from the file meta values."""
    out = _decode_columns(items, _COLUMN_BY_TAG, encodings)
    if not out["sop_instance_uid"]:
        out["sop_instance_uid"] = meta_values.get("media_sop_instance_uid")
    if not out["sop_class_uid"]:
        out["sop_class_uid"] = meta_values.get("media_sop_class_uid")
    out["transfer_syntax_uid"] = meta_values.get("transfer_syntax_uid")
    return out


def file_meta_values(meta: Dataset) -> dict[str, str | None]:
    """Return the media storage SOP class/instance UIDs and transfer syntax of a file meta group."""
    return _decode_columns(meta.items(), _META_BY_TAG, ("iso8859",))


def _floats(value: Any, count: int) -> list[float] | None:
    try:
        numbers = [float(v) for v in value]
    except Exception:
        return None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _multiframe_geometry(ds: Dataset, values: dict[str, Any]) -> dict[str, Any]:
    """Geometry of an enhanced multi-frame instance from its functional groups."""
    out: dict[str, Any] = {}
    try:
        shared = _first_item(ds, "SharedFunctionalGroupsSequence")
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        first = per_frame[0] if per_frame else None

        def group(item_name: str) -> Dataset | None:
            return _first_item(shared, item_name) or _first_item(first, item_name)

        orientation = group("PlaneOrientationSequence")
        if orientation is not None and values.get("image_orientation") is None:
            out["image_orientation"] = _floats(orientation.get("ImageOrientationPatient", []), 6)
        measures = group("PixelMeasuresSequence")
        if measures is not None:
            if values.get("pixel_spacing") is None:
                out["pixel_spacing"] = _floats(measures.get("PixelSpacing", []), 2)
            if values.get("slice_thickness") is None and measures.get("SliceThickness"):
                out["slice_thickness"] = float(measures.SliceThickness)
        positions = []
        for item in per_frame:
            plane = _first_item(item, "PlanePositionSequence")
            pos = _floats(plane.get("ImagePositionPatient", []), 3) if plane is not None else None
            if pos is None:
                positions = []
                break
            positions.append(pos)
        if positions:
            out["frame_positions"] = positions
            if values.get("image_position") is None:
                out["image_position"] = positions[0]
    except Exception:
        return {}
    return out


# --- completeness ------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def expects_pixel_data(sop_class_uid: str) -> bool:
    """Whether instances of a SOP class carry Pixel Data (image storage classes and SEG)."""
    try:
        name = UID(sop_class_uid).name if sop_class_uid else ""
    except Exception:
        return False
    return name.endswith("Image Storage") or name == "Segmentation Storage"


class _StopAtPixels:
    """``stop_when`` callback for pydicom that records whether it stopped at Pixel Data."""

    def __init__(self) -> None:
        self.tag: int | None = None

    def __call__(self, tag: int, vr: str | None, length: int) -> bool:
        if tag in PIXEL_TAGS:
            self.tag = int(tag)
            return True
        return False


def _pixel_data_problem(fp: BinaryIO, size: int, little: bool) -> str:
    """Check the Pixel Data element at the current position against the file size.

    Returns
    -------
    str
        Empty when complete, else a short explanation (no identifying values).
    """
    start = fp.tell()
    header = fp.read(12)
    if len(header) < 8:
        return "Pixel Data element header cut off"
    # Some writers switch to implicit VR inside an explicit-VR file (pydicom reads on): look at
    # the bytes rather than trusting the transfer syntax.
    explicit = header[4:6] in PIXEL_VRS and header[6:8] == b"\x00\x00"
    if explicit and len(header) < 12:
        return "Pixel Data element header cut off"
    header_len = 12 if explicit else 8
    endian = "<" if little else ">"
    (length,) = struct.unpack(f"{endian}I", header[header_len - 4 : header_len])
    value_start = start + header_len
    if length != 0xFFFFFFFF:
        present = size - value_start
        if length > present:
            return f"Pixel Data declares {length} bytes, {max(present, 0)} present"
        return ""
    # Encapsulated: walk the item headers up to the sequence delimiter.
    pos = value_start
    for _ in range(MAX_FRAGMENTS):
        fp.seek(pos)
        item = fp.read(8)
        if len(item) < 8:
            return "encapsulated Pixel Data ends before its sequence delimiter"
        group, element, item_len = struct.unpack(f"{endian}HHI", item)
        if (group, element) == SEQUENCE_DELIMITER:
            return ""
        if (group, element) != ITEM_TAG or item_len == 0xFFFFFFFF:
            return "encapsulated Pixel Data is malformed"
        pos += 8 + item_len
        if pos > size:
            return f"encapsulated Pixel Data fragment runs {pos - size} bytes past the end"
    return "encapsulated Pixel Data has too many fragments"


def _header_past_end(ds: Dataset, size: int) -> bool:
    """Whether a top-level element's value was declared longer than what the file holds."""
    for tag in list(ds.keys()):
        try:
            elem = ds.get_item(tag)
        except Exception:
            return True
        tell = getattr(elem, "value_tell", None)
        length = getattr(elem, "length", None)
        if tell is None or length is None or length == 0xFFFFFFFF:
            continue
        if tell + length > size:
            return True
    return False


# --- one file ----------------------------------------------------------------------------------


def _quarantine(row: dict[str, Any], reason: Reason, detail: str) -> dict[str, Any]:
    row.update(status=STATUS_QUARANTINED, reason=str(reason), detail=detail)
    return row


@dataclass
class _Header:
    """A header read up to Pixel Data, by either reader.

    Attributes
    ----------
    elements
        Top-level elements by tag (pydicom raw elements, or converted ones).
    meta
        File meta values (media storage SOP class/instance, transfer syntax).
    pixel_tag
        The Pixel Data tag reading stopped at, None when the data set ended before one.
    little
        Little-endian encoding.
    past_end
        A header element was declared longer than the file.
    encodings
        Python codecs of the Specific Character Set.
    dataset
        The pydicom dataset (full reader only; multi-frame functional groups need it).
    deflated
        Deflated transfer syntax (positions are in the inflated stream).
    """

    elements: dict[int, Any]
    meta: dict[str, str | None]
    pixel_tag: int | None
    little: bool
    past_end: bool
    encodings: tuple[str, ...]
    dataset: Dataset | None = None
    deflated: bool = False


#: Transfer syntaxes the fast reader handles: (implicit VR, little endian); others use pydicom's
#: full reader (big endian, deflate, unknown).
_IMPLICIT_LE = "1.2.840.10008.1.2"
_FAST_EXCLUDED = frozenset({"1.2.840.10008.1.2.2", *DEFLATED_SYNTAXES})
#: Top-level tags the fast reader keeps (values of other elements are skipped, not read).
_FAST_TAGS = [
    *(c.tag for c in HEADER_COLUMNS),
    0x00080005,  # Specific Character Set
    DIRECTORY_RECORD_SEQUENCE,
    0x52009229,  # Shared Functional Groups Sequence
    0x52009230,  # Per-frame Functional Groups Sequence
]
_VALID_VRS = frozenset(vr.encode() for vr in converters)


def _after_meta(tag: int, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def _read_fast(fp: BinaryIO, size: int) -> _Header | None:
    """Read a header with pydicom's element generator, without building datasets.

    Returns None when the file needs pydicom's full reader: big-endian, deflated or unknown
    transfer syntax, a data set whose first element contradicts the transfer syntax's VR
    encoding, a multi-frame instance (its functional groups are read as datasets), or any
    error (the full reader then decides what is wrong with the file).
    """
    try:
        fp.seek(132)
        meta_items = [(e.tag, e) for e in data_element_generator(fp, False, True, _after_meta)]
        meta = _decode_columns(meta_items, _META_BY_TAG, ("iso8859",))
        syntax = meta.get("transfer_syntax_uid")
        if not syntax or syntax in _FAST_EXCLUDED:
            return None
        if meta.get("media_sop_class_uid") == DICOMDIR_SOP_CLASS:
            return _Header({}, meta, None, True, False, ("iso8859",))
        implicit = syntax == _IMPLICIT_LE
        start = fp.tell()
        peek = fp.read(6)
        fp.seek(start)
        if len(peek) == 6 and (peek[4:6] in _VALID_VRS) == implicit:
            return None  # encoded otherwise than the transfer syntax says: let pydicom decide
        stop = _StopAtPixels()
        elements = {
            e.tag: e
            for e in data_element_generator(
                fp, implicit, True, stop, defer_size=None, specific_tags=_FAST_TAGS
            )
        }
        if 0x52009230 in elements or 0x52009229 in elements:
            return None
        frames = elements.get(0x00280008)
        if frames is not None and (_element_value(frames, _FRAMES, ()) or 1) > 1:
            return None
        past_end = stop.tag is None and (
            fp.tell() > size
            or any(
                e.value_tell + e.length > size
                for e in elements.values()
                if getattr(e, "is_raw", False) and e.length != 0xFFFFFFFF
            )
        )
        charset = elements.get(0x00080005)
        encodings = ("iso8859",)
        if charset is not None and getattr(charset, "is_raw", False) and charset.value:
            terms = tuple(t.strip(" \x00") for t in charset.value.decode("latin-1").split("\\"))
            encodings = _encodings(terms if len(terms) > 1 else terms[0])
        return _Header(elements, meta, stop.tag, True, past_end, encodings)
    except Exception:
        return None


#: Bytes read at once from the start of each file; a typical header fits.
HEAD_BYTES = 16384


class _HeadFirst:
    """A read-only file whose first bytes are served from memory.

    The header parser asks for a few bytes at a time (tag, VR, length, value); served from
    one up-front read of ``HEAD_BYTES``, a file's header parses about 10 % faster than from a
    buffered file.
    Reads past the head go to the file itself, so nothing beyond is read unless asked for.
    """

    def __init__(self, fp: BinaryIO) -> None:
        self.raw = fp
        self._head = fp.read(HEAD_BYTES)
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = offset
        elif whence == 1:
            self._pos += offset
        else:
            self._pos = self.raw.seek(offset, whence)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        pos, head = self._pos, self._head
        if n is not None and n >= 0 and pos + n <= len(head):
            self._pos = pos + n
            return head[pos : pos + n]
        self.raw.seek(pos)
        data = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        self._pos = pos + len(data)
        return data


def _read_full(fp: BinaryIO, size: int) -> _Header:
    """Read a header with pydicom's ``read_partial`` (every transfer syntax); may raise."""
    raw = fp.raw if isinstance(fp, _HeadFirst) else fp
    raw.seek(0)
    stop = _StopAtPixels()
    try:
        ds = read_partial(raw, stop_when=stop, defer_size=None, force=False)
    finally:
        if raw is not fp:
            fp.seek(raw.tell())  # where pydicom stopped, for the checks that follow
    meta = file_meta_values(ds.file_meta) if ds.file_meta is not None else {}
    deflated = meta.get("transfer_syntax_uid") in DEFLATED_SYNTAXES
    _, little = ds.original_encoding
    charset = getattr(ds, "original_character_set", None) or "iso8859"
    encodings = _encodings(tuple(charset) if not isinstance(charset, str) else charset)
    # positions of a deflated data set are in the inflated stream; zlib checks completeness
    past_end = stop.tag is None and not deflated and _header_past_end(ds, size)
    return _Header(
        dict(ds.items()), meta, stop.tag, little is not False, past_end, encodings, ds, deflated
    )


#: VRs with a 4-byte length in explicit VR encoding (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})  # fmt: skip


@dataclass(frozen=True)
class _MetaScan:
    """What the element headers of the file meta group tell before any reader runs."""

    invalid_vr: bool = False
    syntax: str = ""
    end: int = 132


def _scan_meta(fp: BinaryIO) -> _MetaScan:
    """Walk the file meta group (explicit VR little endian) from byte 132; leave ``fp`` there.

    Reports an element without a valid VR, the transfer syntax and where the group ends. A
    group cut short is left to the readers (they report the truncation).
    """
    pos, syntax = 132, ""
    try:
        for _ in range(256):
            fp.seek(pos)
            head = fp.read(8)
            if len(head) < 8 or head[:2] != b"\x02\x00":
                break
            vr = head[4:6]
            if vr not in _VALID_VRS:
                return _MetaScan(invalid_vr=True)
            if vr in _LONG_VRS:
                extra = fp.read(4)
                if len(extra) < 4 or extra == b"\xff\xff\xff\xff":
                    break
                start, length = pos + 12, int.from_bytes(extra, "little")
            else:
                start, length = pos + 8, int.from_bytes(head[6:8], "little")
            if head[2:4] == b"\x10\x00" and length <= 64:  # (0002,0010) TransferSyntaxUID
                syntax = fp.read(length).decode("latin-1").strip("\x00 ")
            pos = start + length
        return _MetaScan(syntax=syntax, end=pos)
    finally:
        fp.seek(132)


def max_inflated_bytes() -> int:
    """Bound of an inflated deflated data set (``ONCOFLOW_MAX_INFLATED_MB``, default 1024 MiB)."""
    return int(os.environ.get("ONCOFLOW_MAX_INFLATED_MB", "1024")) * (1 << 20)


def _inflates_beyond(fp: BinaryIO, start: int, limit: int) -> bool:
    """Whether the deflated data set from ``start`` inflates to more than ``limit`` bytes.

    Streams the file through zlib in chunks, holding at most one chunk of output; a corrupt
    stream is left to the readers. Leaves ``fp`` at byte 132.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        fp.seek(start)
        while True:
            chunk = inflater.unconsumed_tail or fp.read(1 << 20)
            if not chunk:
                return False
            total += len(inflater.decompress(chunk, 1 << 22))
            if total > limit:
                return True
            if inflater.eof:
                return False
    except zlib.error:
        return False
    finally:
        fp.seek(132)


def _parse_open_file(
    fp: BinaryIO, row: dict[str, Any], size: int, fast: bool = True
) -> dict[str, Any]:
    head = fp.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        return _quarantine(row, Reason.NOT_DICOM, "no DICM prefix at byte 128")
    scan = _scan_meta(fp)
    if scan.invalid_vr:
        # the readers would each guess differently (one skips the element, the other reads
        # the rest of the file as its value): decided here, the same for both
        return _quarantine(row, Reason.UNREADABLE_HEADER, "file meta element with an invalid VR")
    if scan.syntax in DEFLATED_SYNTAXES:
        limit = max_inflated_bytes()
        if _inflates_beyond(fp, scan.end, limit):
            detail = f"deflated data set over {limit >> 20} MiB inflated"
            return _quarantine(row, Reason.INPUT_TOO_LARGE, detail)
    header = _read_fast(fp, size) if fast else None
    if header is None:
        try:
            header = _read_full(fp, size)
        except zlib.error:
            return _quarantine(row, Reason.TRUNCATED_FILE, "deflated data set is incomplete")
        except Exception as exc:
            try:
                at_end = fp.tell() >= size
            except Exception:
                at_end = False
            if at_end or isinstance(exc, EOFError):
                return _quarantine(row, Reason.TRUNCATED_FILE, "header cut inside an element")
            detail = f"header not parsable ({type(exc).__name__})"
            return _quarantine(row, Reason.UNREADABLE_HEADER, detail)

    meta = header.meta
    if (
        meta.get("media_sop_class_uid") == DICOMDIR_SOP_CLASS
        or DIRECTORY_RECORD_SEQUENCE in header.elements
    ):
        return _quarantine(row, Reason.DICOMDIR, "media storage directory, not an instance")

    if header.pixel_tag is not None:
        if not header.deflated:
            problem = _pixel_data_problem(fp, size, header.little)
            if problem:
                return _quarantine(row, Reason.TRUNCATED_FILE, problem)
    else:
        if header.past_end:
            return _quarantine(row, Reason.TRUNCATED_FILE, "a header element runs past the end")
        sop_class = meta.get("media_sop_class_uid") or ""
        is_image = 0x00280010 in header.elements and 0x00280011 in header.elements
        if is_image or expects_pixel_data(sop_class):
            return _quarantine(row, Reason.TRUNCATED_FILE, "image header without Pixel Data")

    if header.dataset is not None:
        row.update(header_values(header.dataset))
    else:
        row.update(_column_values(header.elements.items(), header.encodings, meta))
    missing = [
        name
        for name in ("sop_instance_uid", "series_instance_uid", "study_instance_uid")
        if not row.get(name)
    ]
    if missing:
        return _quarantine(row, Reason.MISSING_UIDS, "missing " + ", ".join(missing))
    return row


def read_instance(opener: Callable[[str], BinaryIO], full_path: str, listed: ListedFile) -> dict:
    """Read one file's header and return its catalogue row; never raises.

    Parameters
    ----------
    opener
        Opens a path for binary reading (builtin ``open`` or an fsspec filesystem's ``open``).
    full_path
        Path of the file for ``opener``.
    listed
        The listing entry (source-relative path, size, change token).

    Returns
    -------
    dict
        A row with every column of :data:`INSTANCE_SCHEMA`.
    """
    row = empty_row(listed)
    if listed.size == 0:
        return _quarantine(row, Reason.EMPTY_FILE, "0 bytes")
    try:
        with opener(full_path) as fp:
            return _parse_open_file(_HeadFirst(fp), row, listed.size)
    except FileNotFoundError:
        return _quarantine(empty_row(listed), Reason.UNREADABLE_HEADER, "file vanished")
    except Exception as exc:
        return _quarantine(
            empty_row(listed), Reason.UNREADABLE_HEADER, f"read failed ({type(exc).__name__})"
        )


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom warnings and log records (they may quote header values) and validation."""
    logger = logging.getLogger("pydicom")
    disabled = logger.disabled
    mode = pydicom_config.settings.reading_validation_mode
    logger.disabled = True
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled
        pydicom_config.settings.reading_validation_mode = mode


def parse_files(source_url: str, files: Sequence[ListedFile]) -> list[dict[str, Any]]:
    """Read the headers of ``files`` under ``source_url``; one row per file, in input order.

    Parameters
    ----------
    source_url
        fsspec URL of the source root.
    files
        Listing entries (paths relative to the root).

    Returns
    -------
    list of dict
        Catalogue rows.
    """
    fs, root = open_url(source_url)
    if fs.isfile(root):
        root = root.rsplit("/", 1)[0]
    local = protocol_of(fs) in ("file", "local")

    def opener(path: str) -> BinaryIO:
        if local:
            return open(path, "rb")
        return fs.open(path, "rb", block_size=2**16, cache_type="readahead")

    with quiet_pydicom():
        return [read_instance(opener, f"{root}/{f.path}", f) for f in files]


# --- the batch task ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchResult:
    """What a batch task returns: counts only, never rows or identifying values.

    Parameters
    ----------
    key
        Batch content key.
    part
        Store-relative key of the private part file holding the batch's rows.
    files
        Number of files parsed.
    statuses, reasons
        Counts by row status and by quarantine reason.
    seconds
        Wall time of the batch.
    cpu_seconds
        CPU time of the batch in its worker process.
    started_at
        Wall-clock start (epoch seconds), to see how batches were spread over time.
    """

    key: str
    part: str
    files: int
    statuses: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    started_at: float = 0.0


def part_key(batch_key: str) -> str:
    """Return the store-relative key of a batch's part file."""
    return f"{PARTS_DIR}/{batch_key}.parquet"


def files_key(batch_key: str) -> str:
    """Return the store-relative key of the file list of a batch (private: it holds paths)."""
    return f"{PARTS_DIR}/{batch_key}.files.json"


def write_batch_files(store: SiteStore, batch: Batch) -> None:
    """Write a batch's file list to the store, where its task reads it."""
    store.write_bytes(files_key(batch.key), files_to_json(batch.files), mode=Existing.OVERWRITE)


def parse_batch_to_part(
    key: str, files: Sequence[ListedFile], source_url: str, store_url: str, site: str
) -> BatchResult:
    """Parse a batch of files and write their rows to a private part file in the store.

    Parameters
    ----------
    key
        Batch content key (names the part file).
    files
        Listing entries of the batch.
    source_url
        Source root URL.
    store_url, site
        The site store.

    Returns
    -------
    BatchResult
        Counts and the part key.
    """
    started_at = time.time()
    started, cpu_started = time.perf_counter(), time.process_time()
    rows = parse_files(source_url, files)
    store = SiteStore(store_url, site)
    store.write_table(part_key(key), rows_to_table(rows))
    return BatchResult(
        key=key,
        part=part_key(key),
        files=len(rows),
        statuses=dict(sorted(Counter(r["status"] for r in rows).items())),
        reasons=dict(sorted(Counter(r["reason"] for r in rows if r["reason"]).items())),
        seconds=round(time.perf_counter() - started, 4),
        cpu_seconds=round(time.process_time() - cpu_started, 4),
        started_at=round(started_at, 4),
    )


@task(
    name="parse-dicom-batch",
    task_run_name="parse-{key}",
    retries=2,
    retry_delay_seconds=2,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def parse_batch(key: str, source_url: str, store_url: str, site: str) -> BatchResult:
    """Prefect task: parse one batch into a private part file; return counts only.

    The batch's file list is read from the store (:func:`write_batch_files`), so paths never
    pass through Prefect parameters, and submitting a task costs the same for any batch size.
    See :func:`parse_batch_to_part`.
    """
    files = files_from_json(SiteStore(store_url, site).read_bytes(files_key(key)))
    return parse_batch_to_part(key, files, source_url, store_url, site)

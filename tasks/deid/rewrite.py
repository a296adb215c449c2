"""De-identify a DICOM file by rewriting its byte stream: the fast path of ``deidentify_instance``.

:func:`rewrite_instance` applies exactly the profile of :mod:`tasks.deid.dataset` (the same
decisions in the same order, the same audit counts) and returns exactly the bytes that
``deidentify_dataset`` + ``encode_dataset`` would write, without building pydicom datasets:

* the file is parsed into element offsets (tag, VR, value range); sequences are split into
  items only when the profile walks into them;
* elements the profile keeps untouched are copied from the input as byte slices (pixel data
  included: never decoded, never copied through Python objects);
* replaced values (remapped UIDs, shifted dates, pseudonyms, dummies, cleaned text) are
  encoded directly when they are plain ASCII, and through pydicom's own element writer
  otherwise;
* elements that pydicom would convert and write back (e.g. ``SpecificCharacterSet``, or the
  values the burned-in check reads) are written through pydicom's element writer too, cached
  by their raw bytes, so their canonical form is pydicom's.

Anything this module does not rewrite itself (big endian, no file meta, private or unknown
transfer syntax, elements out of order, malformed lengths, VRs pydicom would switch or correct,
non-ASCII replacement text, pixel cleaning...) raises :class:`Unsupported` before touching the
context, and the caller uses the pydicom path. ``tests/unit/test_deid_rewrite.py`` checks that
both paths give the same bytes and audit on real-world, synthetic and random files.
"""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import ENCODED_VR
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import AMBIGUOUS_VR, EXPLICIT_VR_LENGTH_32

from tasks.deid.checks import MEGABYTE, TooLarge, inflate_bounded, patient_age, screen
from tasks.deid.dataset import (
    _CLEANABLE_VRS,
    _KEPT_TEXT_VRS,
    _METHOD_SEQUENCE,
    _REPLACING,
    _SAFE_PRIVATE_VRS,
    CODE_KEYWORDS,
    IDENTIFIER_KEYWORDS,
    STANDARD_SCHEMES,
    UNCHECKED_VRS,
    DeidContext,
    _dictionary_vr,
    _dummy,
    _forbidden,
    _label,
    _method_sequence_bytes,
    _numeric,
    _private_label,
    _values,
)
from tasks.deid.descriptors import clean_descriptor, holds_identifier
from tasks.deid.pixels import PixelLayoutError, clear_unused_bits
from tasks.deid.policy import (
    PIXEL_DATA,
    REMOVALS,
    REQUIRED,
    decide,
    effective_vr,
    valid_value,
)
from tasks.deid.profile import PROFILE_VERSION, Action, keyword_of, method_codes

_TAG = struct.Struct("<HH")
_TAG_LENGTH = struct.Struct("<HHL")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_SPECIFIC_CHARACTER_SET = 0x00080005
_CODING_SCHEME_DESIGNATOR = 0x00080102
_UNDEFINED = 0xFFFFFFFF
_ITEM_DELIMITER_BYTES = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_DELIMITER_BYTES = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_AMBIGUOUS = frozenset(str(vr) for vr in AMBIGUOUS_VR)
#: Top-level elements the checks before the walk read (converted through pydicom, as there).
_CHECKED_TAGS = (
    0x00080005,  # SpecificCharacterSet
    0x00080008,  # ImageType
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x00080020,  # StudyDate
    0x00080060,  # Modality
    0x00080064,  # ConversionType
    0x00080070,  # Manufacturer
    0x00081090,  # ManufacturerModelName
    0x00100030,  # PatientBirthDate
    0x00101010,  # PatientAge
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280301,  # BurnedInAnnotation
)
#: Python codecs in which ASCII text encodes and decodes to itself (no escape sequences).
_ASCII_CODECS = frozenset(
    {"iso8859", "latin_1", "UTF8", "utf_8", "ascii", "iso_ir_6"}
    | {f"iso8859_{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 11, 15)}
)
_TEXT_VRS = frozenset({"LO", "SH", "UC"})
_SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_STRING_VRS = frozenset({"CS", "AS", "DA", "DT", "TM"})
#: VRs whose empty raw value pydicom reads as b"" (others read as None: converted on access).
_EMPTY_BYTES_VRS = frozenset(
    {"SQ", "PN", "AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
#: VRs whose empty value converts to "".
_STRING_TEXT = frozenset({"LO", "SH", "UC", "LT", "ST", "UT", "PN", "UI"}) | _STRING_VRS
_NUMBER_FORMATS = {
    "US": "<H",
    "SS": "<h",
    "UL": "<L",
    "SL": "<l",
    "FL": "<f",
    "FD": "<d",
    "SV": "<q",
    "UV": "<Q",
}
#: Transfer syntaxes the rewriter handles: (implicit VR, deflated) by UID; other public
#: compressed syntaxes are explicit VR little endian with encapsulated pixel data.
_SYNTAXES = {
    ImplicitVRLittleEndian: (True, False),
    ExplicitVRLittleEndian: (False, False),
    DeflatedExplicitVRLittleEndian: (False, True),
}


class Unsupported(Exception):
    """The file needs the pydicom path (raised before the context is changed)."""


@dataclass(frozen=True)
class Rewritten:
    """Outcome of :func:`rewrite_instance`.

    Parameters
    ----------
    data
        The de-identified file (empty when quarantined).
    reason, detail
        Quarantine reason name (``"dicomdir"``, ``"missing-uids"``, ``"burned-in-annotation"``)
        and detail, or empty.
    age
        Patient age string read before de-identification (when configured).
    references
        Whether the output holds a top-level sequence that may reference other series.
    """

    data: bytes = b""
    reason: str = ""
    detail: str = ""
    age: str = ""
    references: bool = False


class _Converted:
    """A value converted as pydicom would (VR and value), without a DataElement."""

    __slots__ = ("VR", "value")

    def __init__(self, vr: str, value: object) -> None:
        self.VR = vr
        self.value = value


class _Elem:
    """One element: where its bytes are and what the profile did to it."""

    __slots__ = ("conv", "items", "new", "start", "tag", "undefined", "vend", "vr", "vstart")

    def __init__(
        self, tag: int, vr: str | None, start: int, vstart: int, vend: int, undefined: bool
    ) -> None:
        self.tag = tag
        self.vr = vr  # as read (None: implicit VR)
        self.start = start
        self.vstart = vstart
        self.vend = vend
        self.undefined = undefined
        self.items: list[_Item] | None = None
        self.conv: DataElement | _Converted | None = None  # converted as pydicom would
        self.new: tuple[str, bytes] | None = None  # replacement: (VR, encoded value)

    def current_vr(self) -> str | None:
        """Return the ``VR`` attribute pydicom's element object would have now."""
        if self.new is not None:
            return self.new[0]
        if self.conv is not None:
            return self.conv.VR
        return self.vr


class _Item:
    """One dataset (the top level or a sequence item)."""

    __slots__ = ("data", "elems", "encoding", "implicit", "undefined")

    def __init__(self, data: bytes, implicit: bool, undefined: bool) -> None:
        self.data = data
        self.elems: dict[int, _Elem] = {}
        self.implicit = implicit
        self.undefined = undefined
        self.encoding: list[str] = []


# -- parsing ---------------------------------------------------------------------------------


def _parse_dataset(
    data: bytes,
    pos: int,
    end: int,
    implicit: bool,
    encoding: list[str],
    *,
    top: bool = False,
    undefined: bool = False,
) -> tuple[_Item, int]:
    """Parse the elements of one dataset from ``pos`` up to ``end`` or its item delimiter."""
    item = _Item(data, implicit, undefined)
    elems = item.elems
    last = -1
    if not implicit and pos + 6 <= end and data[pos : pos + 4] != b"\xfe\xff\x0d\xe0":
        first = data[pos + 4 : pos + 6]
        if not (0x40 < first[0] < 0x5B and 0x40 < first[1] < 0x5B):
            raise Unsupported("implicit VR dataset inside explicit VR")
    elif implicit and top and pos + 6 <= end:
        first = data[pos + 4 : pos + 6]
        if 0x40 < first[0] < 0x5B and 0x40 < first[1] < 0x5B:
            raise Unsupported("explicit VR dataset with an implicit VR syntax")
    while True:
        if undefined:
            if pos + 8 > end:
                raise Unsupported("item without delimiter")
        elif pos >= end:
            break
        elif pos + 8 > end:
            if top:
                break  # fewer than 8 trailing bytes: pydicom stops reading there
            raise Unsupported("element header past item end")
        group, element = _TAG.unpack_from(data, pos)
        tag = group << 16 | element
        if tag == _ITEM_DELIMITER:
            if not undefined:
                raise Unsupported("item delimiter outside an undefined-length item")
            item.encoding = encoding
            return item, pos + 8
        if group == 0xFFFE or tag <= last:
            raise Unsupported("delimiter, duplicate or unsorted tag")
        if implicit:
            vr = None
            length = _UL.unpack_from(data, pos + 4)[0]
            vstart = pos + 8
        else:
            raw_vr = data[pos + 4 : pos + 6]
            if raw_vr not in ENCODED_VR:
                raise Unsupported("unknown VR")
            vr = raw_vr.decode("ascii")
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise Unsupported("truncated header")
                length = _UL.unpack_from(data, pos + 8)[0]
                vstart = pos + 12
            else:
                length = _US.unpack_from(data, pos + 6)[0]
                vstart = pos + 8
        elem: _Elem
        if length == _UNDEFINED:
            if _is_sequence(data, tag, vr, vstart):
                items, vend, pos = _parse_sequence(data, vstart, None, implicit, encoding, end)
                elem = _Elem(tag, vr, -1, vstart, vend, True)
                elem.items = items
                elem.conv = _Converted("SQ", items)
            elif tag == _PIXEL_DATA and top:
                vend = _fragments_end(data, vstart, end)
                pos = vend + 8
                elem = _Elem(tag, vr, -1, vstart, vend, True)
            else:
                raise Unsupported("undefined length element that is not a sequence")
            start = -1
        else:
            vend = vstart + length
            if vend > end:
                raise Unsupported("value past the end of its dataset")
            start = pos
            if not implicit and vr in _LONG_VRS and data[pos + 6 : pos + 8] != b"\x00\x00":
                start = -1  # reserved bytes are written as zero: rebuild the header
            elem = _Elem(tag, vr, start, vstart, vend, False)
            pos = vend
        elems[tag] = elem
        last = tag
        if tag == _SPECIFIC_CHARACTER_SET:
            encoding = _encodings(data[elem.vstart : elem.vend])
    item.encoding = encoding
    return item, pos


def _fragments_end(data: bytes, pos: int, size: int) -> int:
    """Return where the sequence delimiter of encapsulated pixel data starts.

    Steps over the fragments item by item, as pydicom's reader does first (a delimiter's
    bytes inside a fragment do not end the value); anything else is left to pydicom.
    """
    while pos + 8 <= size:
        marker = data[pos : pos + 4]
        if marker == b"\xfe\xff\xdd\xe0":
            return pos
        if marker != b"\xfe\xff\x00\xe0":
            break
        pos += 8 + _UL.unpack_from(data, pos + 4)[0]
    raise Unsupported("encapsulated pixel data without items and delimiter")


def _is_sequence(data: bytes, tag: int, vr: str | None, vstart: int) -> bool:
    if vr is not None:
        if vr == "UN":
            raise Unsupported("undefined length UN")
        return vr == "SQ"
    dictionary = _dictionary_vr(tag)
    if dictionary:
        return dictionary == "SQ"
    return data[vstart : vstart + 4] == b"\xfe\xff\x00\xe0"


def _parse_sequence(
    data: bytes,
    pos: int,
    end: int | None,
    implicit: bool,
    encoding: list[str],
    limit: int | None = None,
) -> tuple[list[_Item], int, int]:
    """Parse sequence items; return (items, end of the value, position after the sequence).

    ``end`` is the end of a defined-length value (None: undefined length, read up to the
    sequence delimiter within ``limit``, the end of the dataset holding the sequence).
    Nothing is read past ``end`` or ``limit``: pydicom reads a defined-length sequence from
    its value bytes alone.
    """
    items: list[_Item] = []
    size = end if end is not None else limit if limit is not None else len(data)
    while True:
        if end is not None and pos >= end:
            return items, end, end
        if pos + 8 > size:
            raise Unsupported("truncated sequence")
        group, element, length = _TAG_LENGTH.unpack_from(data, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER and end is None:
            return items, pos, pos + 8
        if tag != _ITEM:
            raise Unsupported("not an item tag")
        if length == _UNDEFINED:
            item, pos = _parse_dataset(data, pos + 8, size, implicit, encoding, undefined=True)
        else:
            item_end = pos + 8 + length
            if item_end > size:
                raise Unsupported("item past the end of its sequence")
            item, pos = _parse_dataset(data, pos + 8, item_end, implicit, encoding)
        items.append(item)


@lru_cache(maxsize=64)
def _encodings(raw: bytes) -> list[str]:
    """Python encodings of a Specific Character Set value, as pydicom's reader derives them."""
    value = _convert_pydicom(
        RawDataElement(BaseTag(_SPECIFIC_CHARACTER_SET), "CS", len(raw), raw, 0, False, True)
    ).value
    if not value:
        raise Unsupported("empty character set")
    try:
        return convert_encodings(value)
    except (LookupError, ValueError) as exc:  # a malformed or unknown term: pydicom decides
        raise Unsupported("character set") from exc


@contextlib.contextmanager
def _pydicom_reads() -> Iterator[None]:
    """Hand a value pydicom cannot convert or write over to the pydicom path (Unsupported).

    Only pydicom's own conversions and writers run inside: an error of this module's byte
    handling still surfaces as itself.
    """
    try:
        yield
    except Unsupported:
        raise
    except Exception as exc:
        raise Unsupported(f"value pydicom cannot read ({type(exc).__name__})") from exc


def _convert_pydicom(raw: RawDataElement, encoding: list[str] | None = None) -> DataElement:
    from pydicom.dataelem import convert_raw_data_element

    with _pydicom_reads():
        return convert_raw_data_element(raw, encoding=encoding)


# -- value conversion, as pydicom's converters do it -----------------------------------------


def _raw_element(item: _Item, elem: _Elem) -> RawDataElement:
    value = item.data[elem.vstart : elem.vend]
    length = _UNDEFINED if elem.undefined else len(value)
    return RawDataElement(BaseTag(elem.tag), elem.vr, length, value, 0, item.implicit, True)


def _conversion_vr(item: _Item, elem: _Elem) -> str:
    """Return the VR pydicom's conversion gives a public element (Unsupported when subtle)."""
    vr = elem.vr
    if vr is not None and vr != "UN":
        return vr
    dictionary = _dictionary_vr(elem.tag)
    if not dictionary or dictionary in _AMBIGUOUS:
        raise Unsupported("VR left to pydicom")
    if vr == "UN" and elem.vend - elem.vstart >= 0xFFFF:
        raise Unsupported("long UN value")
    return dictionary


def _ascii_text(raw: bytes, encoding: list[str]) -> str | None:
    """Decode ASCII text without escape sequences (pydicom then uses the first codec only)."""
    if raw.isascii() and b"\x1b" not in raw and encoding[0] in _ASCII_CODECS:
        return raw.decode("ascii")
    return None


_NOT_CONVERTED = object()


def _convert_value(vr: str, raw: bytes, encoding: list[str]) -> object:
    """Value of pydicom's converter for ``vr`` for plain ASCII text, else ``_NOT_CONVERTED``."""
    if not raw:
        return "" if vr in _STRING_TEXT else _NOT_CONVERTED
    if vr in _STRING_VRS:  # convert_string: default encoding, no character set
        parts = raw.decode("latin-1").rstrip(" \x00").split("\\")
        return parts[0] if len(parts) == 1 else parts
    if vr == "UI":
        parts = raw.decode("latin-1").rstrip("\x00 ").rstrip(" \x00").split("\\")
        return parts[0] if len(parts) == 1 else parts
    if vr == "PN":
        text = _ascii_text(raw.rstrip(b"\x00 "), encoding)
        if text is None:
            return _NOT_CONVERTED
        parts = text.split("\\")
        return parts[0] if len(parts) == 1 else parts
    if vr not in _TEXT_VRS and vr not in _SINGLE_TEXT_VRS:
        return _NOT_CONVERTED
    text = _ascii_text(raw, encoding)
    if text is None:
        return _NOT_CONVERTED
    if vr in _TEXT_VRS:
        parts = [p.rstrip("\x00 ") for p in text.split("\\")]
        return parts[0] if len(parts) == 1 else parts
    return text.rstrip("\x00 ")


# -- encoding --------------------------------------------------------------------------------


def _header(tag: int, vr: str | None, length: int) -> bytes:
    head = _TAG.pack(tag >> 16, tag & 0xFFFF)
    if vr is None:
        return head + _UL.pack(length)
    if vr in _LONG_VRS:
        return head + vr.encode("ascii") + b"\x00\x00" + _UL.pack(length)
    if length > 0xFFFF:
        raise Unsupported("value too long for a 16-bit length")
    return head + vr.encode("ascii") + _US.pack(length)


def _encode_strings(vr: str, values: list[str], encoding: list[str]) -> bytes:
    """Encode string values as pydicom's writers do (ASCII only; Unsupported otherwise)."""
    text = "\\".join(values)
    if not text.isascii() or "\x1b" in text:
        raise Unsupported("non-ASCII value")
    if vr in _TEXT_VRS or vr in _SINGLE_TEXT_VRS or vr == "PN":
        if encoding[0] not in _ASCII_CODECS:
            raise Unsupported("character set")
    elif vr not in _STRING_VRS and vr not in ("UI", "AE", "DS", "IS", "UR"):
        raise Unsupported("VR encoded by pydicom only")
    out = text.encode("ascii")
    if len(out) % 2:
        out += b"\x00" if vr == "UI" else b" "
    return out


def _encode_new(vr: str, value: object, encoding: list[str]) -> bytes:
    """Value bytes of ``DataElement(tag, vr, value)`` as pydicom writes it."""
    if value is None:
        return b""
    if isinstance(value, str):
        if vr in ("LT", "ST", "UT"):
            return _encode_strings(vr, [value], encoding)
        return _encode_strings(vr, value.split("\\"), encoding) if value else b""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return _encode_strings(vr, value, encoding)
    if isinstance(value, int) and vr in _NUMBER_FORMATS:
        return struct.pack(_NUMBER_FORMATS[vr], value)
    raise Unsupported("value encoded by pydicom only")


_CANONICAL: dict[tuple, bytes] = {}


def _canonical(item: _Item, elem: _Elem, creator: bytes | None) -> bytes:
    """Bytes pydicom writes for an element it converted and did not change (cached)."""
    raw = item.data[elem.vstart : elem.vend]
    key = (elem.tag, elem.vr, raw, item.implicit, tuple(item.encoding), creator)
    cached = _CANONICAL.get(key)
    if cached is None:
        mini = Dataset()
        mini._dict[BaseTag(elem.tag)] = _raw_element(item, elem)
        if creator is not None:
            block = (elem.tag >> 16) << 16 | (elem.tag & 0xFFFF) >> 8
            mini._dict[BaseTag(block)] = RawDataElement(
                BaseTag(block), None, len(creator), creator, 0, item.implicit, True
            )
        mini.set_original_encoding(item.implicit, True, item.encoding)
        with _pydicom_reads():
            converted = mini[elem.tag]
            if converted.VR in _AMBIGUOUS or converted.VR == "SQ":
                raise Unsupported("VR corrected by pydicom")
            cached = _write_pydicom(converted, item)
        if len(_CANONICAL) > 4096:
            _CANONICAL.clear()
        if len(raw) <= 1024:
            _CANONICAL[key] = cached
    return cached


def _write_pydicom(elem: DataElement, item: _Item) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, item.implicit
    write_data_element(buffer, elem, item.encoding)
    return buffer.getvalue()


# -- the walk --------------------------------------------------------------------------------


class _Walker:
    """The profile walk of :class:`tasks.deid.dataset._Walker`, over parsed byte ranges."""

    def __init__(self, ctx: DeidContext) -> None:
        self.ctx = ctx
        self.audit: Counter[tuple[str, str]] = Counter()
        self.names: list[str] = [str(v) for v in ctx.extra_identifiers]
        self.others: list[str] = []
        self.deferred: list[tuple[_Item, int, str, Action]] = []
        self.forbidden: frozenset[str] = frozenset()
        self._actions = ctx.action_cache
        self._fast_keep = ctx.fast_keep
        self.invalid_required = ""

    def note(self, attribute: str, action: Action) -> None:
        self.audit[(attribute, action.value)] += 1

    # -- element access, as the pydicom Dataset would give it --------------------------------
    def convert(self, item: _Item, tag: int) -> DataElement | _Converted:
        """``ds[tag]``: the converted element (the element then counts as converted)."""
        elem = item.elems[tag]
        if elem.new is not None:
            raise Unsupported("converted replacement")
        if elem.conv is None:
            if tag >> 16 & 1:
                raise Unsupported("private element converted")
            vr = _conversion_vr(item, elem)
            if vr == "SQ":
                self.items(item, elem)
                elem.conv = _Converted("SQ", elem.items)
            else:
                raw = item.data[elem.vstart : elem.vend]
                value = _convert_value(vr, raw, item.encoding)
                if value is _NOT_CONVERTED:
                    converted = _convert_pydicom(_raw_element(item, elem), item.encoding)
                    if vr != converted.VR:
                        raise Unsupported("VR changed by conversion")
                    elem.conv = converted
                else:
                    elem.conv = _Converted(vr, value)
        return elem.conv

    def items(self, item: _Item, elem: _Elem) -> list[_Item]:
        if elem.items is None:
            elem.items = _parse_sequence(
                item.data, elem.vstart, elem.vend, item.implicit, item.encoding
            )[0]
        return elem.items

    def str_values(self, item: _Item, tag: int) -> list[str]:
        """``[str(v) for v in _values(ds[tag])]``."""
        conv = self.convert(item, tag)
        if conv.VR == "SQ":
            raise Unsupported("sequence read as text")
        return [str(v) for v in _values(conv)]  # type: ignore[arg-type]

    def ascii_values(self, item: _Item, tag: int) -> list[str]:
        """:func:`tasks.deid.dataset.ascii_values` on the current element."""
        elem = item.elems[tag]
        if elem.new is None and elem.conv is None:
            if elem.vstart == elem.vend:
                return []
            text = item.data[elem.vstart : elem.vend].decode("ascii", "replace")
            return [v.strip("\x00 ") for v in text.split("\\") if v.strip("\x00 ")]
        if elem.new is not None:
            raise Unsupported("replacement read back")
        return [str(v) for v in _values(elem.conv)]  # type: ignore[arg-type]

    def vr_now(self, item: _Item, tag: int) -> str:
        """:func:`tasks.deid.dataset.vr_of` on the current element."""
        elem = item.elems[tag]
        vr = elem.current_vr()
        if vr and vr != "UN":
            return vr
        return _dictionary_vr(tag) or vr or "UN"

    def replace(self, item: _Item, tag: int, vr: str, value: object) -> None:
        """``ds[tag] = _element(tag, vr, value)``."""
        vr = vr.split(" or ")[0]
        elem = item.elems[tag]
        elem.new = (vr, _encode_new(vr, value, item.encoding))
        elem.items = None

    def replace_values(self, item: _Item, tag: int, vr: str, values: list | None) -> None:
        """:func:`tasks.deid.dataset._replace`."""
        if not values:
            self.replace(item, tag, vr, None)
        else:
            self.replace(item, tag, vr, values[0] if len(values) == 1 else values)

    # -- the walk ----------------------------------------------------------------------------
    def walk(self, item: _Item, top: bool = False) -> None:
        done: set[int] = set()
        private_seen = False
        creators: dict[int, str] = {}
        fast = self._fast_keep
        audit = self.audit
        elems = item.elems
        for tag, vr in [(t, e.vr) for t, e in elems.items()]:
            if top and tag > PIXEL_DATA:
                del elems[tag]
                self.note(_label(tag), Action.REMOVE_AFTER_PIXEL_DATA)
                continue
            key = fast.get((tag, vr))
            if key is not None:
                audit[key] += 1
                continue
            if done and tag in done:
                continue
            group = tag >> 16
            if tag & 0xFFFF == 0 or group in (0x0000, 0x0002):
                del elems[tag]
                self.note(
                    f"({group:04X},0000)" if tag & 0xFFFF == 0 else keyword_of(tag), Action.REMOVE
                )
                continue
            if group & 1:
                private_seen = True
                self.private(item, tag, creators)
                continue
            if (0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF) and group % 2 == 0:
                del elems[tag]
                self.note("Overlay" if group >= 0x6000 else "Curve", Action.REMOVE)
                continue
            self.public(item, tag, done, vr, top)
        if private_seen:
            self.drop_empty_creators(item)

    def private(self, item: _Item, tag: int, creators: dict[int, str]) -> None:
        group, element = tag >> 16, tag & 0xFFFF
        if 0x0010 <= element < 0x0100:
            return
        label = _private_label(group)
        if element >= 0x1000 and group in self.ctx.safe_private_groups:
            block = (group << 16) | (element >> 8)
            creator = creators.get(block)
            if creator is None:
                creator = creators[block] = (
                    self.creator_text(item, block) if block in item.elems else ""
                )
            if creator and self.ctx.is_safe_private(creator, group, element):
                elem = self.convert_private(item, tag, block)
                if elem.VR in _SAFE_PRIVATE_VRS and _numeric(elem):
                    self.audit[(label, "keep")] += 1
                    return
        del item.elems[tag]
        self.audit[(label, "remove")] += 1

    def creator_text(self, item: _Item, block: int) -> str:
        """``str(ds[block].value)`` of a private creator (it then counts as converted)."""
        elem = item.elems[block]
        if elem.conv is None:
            vr = elem.vr if elem.vr is not None and elem.vr != "UN" else "LO"
            if vr not in _TEXT_VRS:
                raise Unsupported("private creator VR")
            value = _convert_value(vr, item.data[elem.vstart : elem.vend], item.encoding)
            if value is _NOT_CONVERTED:
                raise Unsupported("private creator text")
            elem.conv = _Converted(vr, value)
        value = elem.conv.value
        if not isinstance(value, str):
            raise Unsupported("multi-valued private creator")
        return value

    def convert_private(self, item: _Item, tag: int, block: int) -> DataElement:
        """``ds[tag]`` of an allow-listed private element, through pydicom."""
        elem = item.elems[tag]
        if elem.undefined or elem.new is not None:
            raise Unsupported("private sequence")
        mini = Dataset()
        mini._dict[BaseTag(tag)] = _raw_element(item, elem)
        creator = item.elems[block]
        mini._dict[BaseTag(block)] = _raw_element(item, creator)
        mini.set_original_encoding(item.implicit, True, item.encoding)
        with _pydicom_reads():
            converted = mini[tag]
        if converted.VR in _AMBIGUOUS or converted.VR == "SQ":
            raise Unsupported("private VR")
        elem.conv = converted
        return converted

    def drop_empty_creators(self, item: _Item) -> None:
        elems = item.elems
        used = {(t >> 16, (t & 0xFFFF) >> 8) for t in elems if t >> 16 & 1 and t & 0xFFFF >= 0x1000}
        for tag in list(elems):
            group, element = tag >> 16, tag & 0xFFFF
            if group & 1 and 0x0010 <= element < 0x0100 and (group, element) not in used:
                del elems[tag]
                self.note(_private_label(group), Action.REMOVE)

    def public(
        self, item: _Item, tag: int, done: set[int], raw_vr: str | None, top: bool
    ) -> None:
        vr = effective_vr(tag, raw_vr)
        keyword = keyword_of(tag)
        elems = item.elems
        key = (tag, raw_vr)
        action = self._actions.get(key)
        if action is None:
            action = self._actions[key] = decide(tag, raw_vr, self.ctx.options)
        scheme = ""
        if action not in REMOVALS:
            if keyword in CODE_KEYWORDS and _CODING_SCHEME_DESIGNATOR in elems:
                scheme = self.scheme(item)
            if scheme in STANDARD_SCHEMES:
                action = Action.KEEP
        if vr == "PN":
            self.names.extend(self.str_values(item, tag))
        elif vr in ("DA", "DT"):
            self.others.extend(v[:8] for v in self.ascii_values(item, tag))
        elif keyword in IDENTIFIER_KEYWORDS:
            self.others.extend(self.str_values(item, tag))
        if action is Action.KEEP:
            elem = elems[tag]
            if vr not in UNCHECKED_VRS and not valid_value(vr, item.data[elem.vstart : elem.vend]):
                del elems[tag]
                self.note(keyword, Action.REMOVE_INVALID_VALUE)
                if top and tag in REQUIRED and not self.invalid_required:
                    self.invalid_required = keyword
                return
            if vr in _KEPT_TEXT_VRS:
                self.deferred.append((item, tag, keyword, action))
                return
            self.note(keyword, action)
            if vr in UNCHECKED_VRS and not scheme and keyword != "TextValue":
                self._fast_keep[(tag, raw_vr)] = (keyword, Action.KEEP.value)
            return
        if action in REMOVALS:
            del elems[tag]
            self.note(keyword, action)
            if action is Action.REMOVE_INVALID_VR and top and tag in REQUIRED:
                self.invalid_required = self.invalid_required or keyword
            return
        if action in _REPLACING:
            if action is Action.DUMMY and vr == "SQ":
                self.recurse(item, tag)
            else:
                if action is Action.EMPTY:
                    value = None
                elif action is Action.PSEUDONYM:
                    value = self.ctx.patient
                elif action is Action.REPLACE:
                    value = self.ctx.keys.site
                else:
                    value = _dummy(vr)
                self.replace(item, tag, vr, value)
        elif action is Action.REMAP_UID and vr != "SQ":
            remap = self.ctx.remap
            self.replace_values(item, tag, "UI", [remap(v) for v in self.ascii_values(item, tag)])
        elif action is Action.SHIFT:
            action = self.shift(item, tag, vr, keyword, done)
        else:
            conv = self.convert(item, tag)
            vr = conv.VR
            if vr == "SQ" and action in (Action.RECURSE, Action.CLEAN, Action.REMAP_UID):
                self.recurse(item, tag)
            elif action is Action.CLEAN and vr in _CLEANABLE_VRS:
                self.deferred.append((item, tag, keyword, action))
                return
            else:
                del elems[tag]
                action = Action.REMOVE
        self.note(keyword, action)

    def scheme(self, item: _Item) -> str:
        """``str(ds.get("CodingSchemeDesignator", ""))`` (the element then counts as converted)."""
        value = self.convert(item, _CODING_SCHEME_DESIGNATOR).value
        if not isinstance(value, str):
            raise Unsupported("multi-valued scheme")
        return value

    def recurse(self, item: _Item, tag: int) -> None:
        elem = item.elems[tag]
        if elem.new is not None:
            raise Unsupported("replaced sequence")
        if elem.vr is not None and elem.vr not in ("SQ",):
            raise Unsupported("sequence with another VR")
        if elem.vr is None and _dictionary_vr(tag) != "SQ" and not elem.undefined:
            raise Unsupported("implicit sequence without dictionary VR")
        for child in self.items(item, elem):
            self.walk(child)
        elem.conv = _Converted("SQ", elem.items)

    def shift(self, item: _Item, tag: int, vr: str, keyword: str, done: set[int]) -> Action:
        shift = self.ctx.shift
        values = self.ascii_values(item, tag)
        if not values:
            return Action.SHIFT
        partner = self.time_partner(item, tag, keyword) if vr == "DA" and len(values) == 1 else None
        if partner is not None:
            times = self.ascii_values(item, partner)
            new_date, new_time = shift.shift_pair(values[0], times[0])
            done.add(partner)
            self.note(keyword_of(partner), Action.SHIFT if new_time else Action.REMOVE)
            self.replace_values(item, partner, "TM", [new_time] if new_time else None)
            self.replace_values(item, tag, "DA", [new_date] if new_date else None)
            return Action.SHIFT if new_date else Action.REMOVE
        if vr == "DA":
            shifted = [shift.shift_date(v) for v in values]
        elif vr == "TM":
            shifted = [shift.shift_time(v) for v in values]
        else:
            shifted = [shift.shift_datetime(v) for v in values]
        if any(v is None for v in shifted):
            del item.elems[tag]
            return Action.REMOVE
        self.replace_values(item, tag, vr, shifted)
        return Action.SHIFT

    def time_partner(self, item: _Item, tag: int, keyword: str) -> int | None:
        if not keyword.endswith("Date"):
            return None
        partner = _partner_tag(keyword)
        if partner is None or partner <= tag or partner not in item.elems:
            return None
        if self.vr_now(item, partner) != "TM" or len(self.ascii_values(item, partner)) != 1:
            return None
        return partner

    def finish(self) -> None:
        self.forbidden = _forbidden(tuple(self.names), tuple(self.others))
        for item, tag, keyword, action in self.deferred:
            if action is Action.KEEP and not self.has_forbidden(item, tag):
                self.note(keyword, action)
                continue
            conv = self.convert(item, tag)
            cleaned = [
                clean_descriptor(str(v), self.forbidden, self.ctx.vocabulary)
                for v in _values(conv)  # type: ignore[arg-type]
            ]
            kept = [c for c in cleaned if c]
            vr = conv.VR
            if tag == _SPECIFIC_CHARACTER_SET:
                raise Unsupported("character set cleaned")
            elem = item.elems[tag]
            if not kept:
                elem.new = (vr, b"")
            else:
                elem.new = (vr, _encode_strings(vr, kept, item.encoding))
            self.note(keyword, Action.CLEAN)
        self.deferred.clear()

    def has_forbidden(self, item: _Item, tag: int) -> bool:
        if not self.forbidden:
            return False
        elem = item.elems[tag]
        if elem.new is None and elem.conv is None:
            return holds_identifier(item.data[elem.vstart : elem.vend], self.forbidden)
        if elem.new is not None:
            raise Unsupported("replacement read back")
        text = "\\".join(str(v) for v in _values(elem.conv))  # type: ignore[arg-type]
        return holds_identifier(text, self.forbidden)


@lru_cache(maxsize=512)
def _partner_tag(keyword: str) -> int | None:
    return tag_for_keyword(keyword[:-4] + "Time")


# -- writing ---------------------------------------------------------------------------------


def _write_item(item: _Item, out: list) -> None:
    """Append the encoded elements of ``item`` (sorted by tag) to ``out``."""
    data = item.data
    implicit = item.implicit
    elems = item.elems
    for tag in sorted(elems):
        elem = elems[tag]
        new = elem.new
        if new is not None:
            vr, value = new
            out.append(_header(tag, None if implicit else vr, len(value)))
            if value:
                out.append(value)
            continue
        conv = elem.conv
        if (conv is not None and conv.VR == "SQ") or (elem.items is not None and elem.undefined):
            _write_sequence(item, elem, out)
            continue
        if conv is not None or tag == _SPECIFIC_CHARACTER_SET:
            out.append(_canonical(item, elem, _creator(item, tag)))
            continue
        if elem.undefined:  # encapsulated pixel data
            out.append(_header(tag, elem.vr, _UNDEFINED))
            out.append(memoryview(data)[elem.vstart : elem.vend])
            out.append(_SEQUENCE_DELIMITER_BYTES)
            continue
        if elem.vstart == elem.vend and elem.vr not in _EMPTY_BYTES_VRS:
            # pydicom reads this empty value as None and converts the element when writing
            if elem.vr == "UN":
                out.append(_canonical(item, elem, _creator(item, tag)))
                continue
            if elem.vr is None and _dictionary_vr(tag) in _AMBIGUOUS:
                raise Unsupported("empty element with an ambiguous VR")
        if elem.start >= 0:
            out.append(memoryview(data)[elem.start : elem.vend])
        else:
            out.append(_header(tag, elem.vr, elem.vend - elem.vstart))
            out.append(memoryview(data)[elem.vstart : elem.vend])


def _creator(item: _Item, tag: int) -> bytes | None:
    """Raw private creator of a private element (None for public elements and creators)."""
    if not tag >> 16 & 1 or tag & 0xFFFF < 0x1000:
        return None
    owner = item.elems.get(tag & 0xFFFF0000 | (tag & 0xFFFF) >> 8)
    return item.data[owner.vstart : owner.vend] if owner is not None else b""


def _write_sequence(item: _Item, elem: _Elem, out: list) -> None:
    vr = None if item.implicit else "SQ"
    if elem.vr is not None and elem.vr != "SQ":
        raise Unsupported("sequence VR")
    body: list = []
    for child in elem.items or []:
        if child.undefined:
            body.append(b"\xfe\xff\x00\xe0\xff\xff\xff\xff")
            _write_item(child, body)
            body.append(_ITEM_DELIMITER_BYTES)
        else:
            inner: list = []
            _write_item(child, inner)
            length = sum(len(p) for p in inner)
            body.append(b"\xfe\xff\x00\xe0" + _UL.pack(length))
            body.extend(inner)
    if elem.undefined:
        out.append(_header(elem.tag, vr, _UNDEFINED))
        out.extend(body)
        out.append(_SEQUENCE_DELIMITER_BYTES)
    else:
        out.append(_header(elem.tag, vr, sum(len(p) for p in body)))
        out.extend(body)


def _file_meta(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    parts = [b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"]
    for element, vr, value in (
        (0x0002, "UI", sop_class),
        (0x0003, "UI", sop_instance),
        (0x0010, "UI", syntax),
        (0x0012, "UI", PYDICOM_IMPLEMENTATION_UID),
        (0x0013, "SH", PROFILE_VERSION[:16]),
    ):
        encoded = value.encode("ascii")
        if len(encoded) % 2:
            encoded += b"\x00" if vr == "UI" else b" "
        parts.append(_header(0x00020000 | element, vr, len(encoded)) + encoded)
    body = b"".join(parts)
    return b"\x02\x00\x00\x00UL\x04\x00" + _UL.pack(len(body)) + body


# -- the file --------------------------------------------------------------------------------


def read_meta(data: bytes) -> tuple[str, int]:
    """Return (transfer syntax UID, dataset offset) of a Part 10 file, or Unsupported."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise Unsupported("no DICOM prefix")
    pos = 132
    syntax = None
    size = len(data)
    while pos + 8 <= size:
        group, element = _TAG.unpack_from(data, pos)
        if group != 0x0002:
            break
        raw_vr = data[pos + 4 : pos + 6]
        if raw_vr not in ENCODED_VR:
            raise Unsupported("file meta VR")
        if raw_vr.decode("ascii") in _LONG_VRS:
            if pos + 12 > size:
                raise Unsupported("truncated file meta")
            length = _UL.unpack_from(data, pos + 8)[0]
            vstart = pos + 12
        else:
            length = _US.unpack_from(data, pos + 6)[0]
            vstart = pos + 8
        if length == _UNDEFINED or vstart + length > size:
            raise Unsupported("file meta length")
        if element == 0x0010:
            if raw_vr != b"UI":
                raise Unsupported("transfer syntax VR")
            syntax = data[vstart : vstart + length].decode("latin-1").rstrip("\x00 ")
        pos = vstart + length
    if syntax is None:
        raise Unsupported("no transfer syntax")
    if pos + 8 <= size and _TAG.unpack_from(data, pos)[0] == 0x0000:
        raise Unsupported("command set")
    return syntax, pos


def _syntax_encoding(syntax: str) -> tuple[bool, bool]:
    """(implicit VR, deflated) of a transfer syntax the rewriter handles."""
    known = _SYNTAXES.get(syntax)  # type: ignore[call-overload]
    if known is not None:
        return known
    uid = UID(syntax)
    if (
        uid.is_transfer_syntax
        and not uid.is_private
        and uid.is_compressed
        and uid.is_little_endian
        and not uid.is_implicit_VR
        and uid != DeflatedExplicitVRLittleEndian
    ):
        return False, False
    raise Unsupported("transfer syntax")


def _checks(top: _Item, ctx: DeidContext) -> tuple[Dataset, Rewritten | None, str]:
    """Make the checks of ``deidentify_instance`` before the walk, on the same converted values.

    Returns the small dataset of the elements they read, a quarantine outcome or None, and
    the patient age.
    """
    ds = Dataset()
    elems = top.elems
    for tag in _CHECKED_TAGS:
        elem = elems.get(tag)
        if elem is not None:
            ds._dict[BaseTag(tag)] = _raw_element(top, elem)
    ds.set_original_encoding(top.implicit, True, top.encoding)
    pixel = elems.get(_PIXEL_DATA)
    with _pydicom_reads():  # the checks read these values through pydicom
        _ = ds.get("SOPInstanceUID")
        screened = screen(ds, elems.keys(), pixel is not None and pixel.undefined, ctx.options)
        age_ds = ds if "PatientAge" in ctx.options.patient_characteristics else None
        age = patient_age(age_ds, ctx.options) if age_ds is not None else ""
    if screened.reason:
        return ds, Rewritten(reason=screened.reason, detail=screened.detail), ""
    if screened.rule is not None:
        raise Unsupported("pixel cleaning")
    if pixel is not None and not pixel.undefined and pixel.vend > pixel.vstart:
        bits = [_unsigned_short(top, tag) for tag in _PIXEL_BITS]
        try:
            cleared = clear_unused_bits(
                top.data[pixel.vstart : pixel.vend], bits[0], bits[1], bits[2], bits[3] == 1
            )
        except PixelLayoutError as exc:
            return ds, Rewritten(reason="overlay-in-pixel-data", detail=f"pixels: {exc}"), ""
        if cleared is not None:
            pixel.new = (pixel.vr or "OW", cleared)
            pixel.start = -1
    return ds, None, age


#: BitsAllocated, BitsStored, HighBit, PixelRepresentation.
_PIXEL_BITS = (0x00280100, 0x00280101, 0x00280102, 0x00280103)


def _unsigned_short(item: _Item, tag: int) -> int:
    """Return a US value read from its bytes (0 when absent; Unsupported when not one US)."""
    elem = item.elems.get(tag)
    if elem is None:
        return 0
    if elem.vend - elem.vstart != 2 or elem.vr not in (None, "US"):
        raise Unsupported("pixel description")
    return _US.unpack_from(item.data, elem.vstart)[0]


def rewrite_instance(data: bytes, ctx: DeidContext) -> Rewritten:
    """De-identify one file's bytes as ``deidentify_instance`` would, on the byte stream.

    Parameters
    ----------
    data
        The file content.
    ctx
        Context of the patient; its audit counter is updated only when this returns.

    Returns
    -------
    Rewritten
        The de-identified file, or a quarantine reason (DICOMDIR, missing UIDs, burned-in
        text without a cleaning rule).

    Raises
    ------
    Unsupported
        When the file needs the pydicom path; ``ctx`` is then unchanged.
    """
    syntax, offset = read_meta(data)
    implicit, deflated = _syntax_encoding(syntax)
    body = data
    if deflated:
        try:
            body = inflate_bounded(data[offset:], ctx.options.max_inflated_mb * MEGABYTE)
        except TooLarge as exc:
            return Rewritten(reason="input-too-large", detail=str(exc))
        except zlib.error as exc:
            raise Unsupported("deflate") from exc
        offset = 0
    top, _ = _parse_dataset(body, offset, len(body), implicit, ["iso8859"], top=True)
    if _SPECIFIC_CHARACTER_SET not in top.elems:
        top.encoding = ["iso8859"]
    checked, quarantine, age = _checks(top, ctx)
    if quarantine is not None:
        return quarantine
    for tag, converted in checked._dict.items():
        if isinstance(converted, DataElement):
            if converted.VR in _AMBIGUOUS or converted.VR == "SQ":
                raise Unsupported("checked element VR")
            top.elems[int(tag)].conv = converted
    pixel = top.elems.get(_PIXEL_DATA)
    compressed = not implicit and syntax not in _SYNTAXES
    if pixel is not None:
        if pixel.undefined != compressed or (pixel.vr is not None and pixel.vr not in ("OB", "OW")):
            raise Unsupported("pixel data encoding")
        if (pixel.vend - pixel.vstart) % 2:
            raise Unsupported("odd pixel data length")
    walker = _Walker(ctx)
    walker.walk(top, top=True)
    walker.finish()
    if walker.invalid_required:
        return Rewritten(reason="invalid-attribute", detail=f"malformed {walker.invalid_required}")
    elems = top.elems
    method = f"DICOM PS3.15 E.1-1 {PROFILE_VERSION} key {ctx.keys.key_id}"
    for tag, vr, value in (
        (0x00100010, "PN", ctx.patient),
        (0x00100020, "LO", ctx.patient),
        (0x00120062, "CS", "YES"),
        (0x00120063, "LO", method),
        (0x00280303, "CS", "MODIFIED"),
    ):
        elem = elems.get(tag)
        if elem is None:
            elem = elems[tag] = _Elem(tag, vr, -1, 0, 0, False)
        elem.items = None
        elem.new = (vr, _encode_new(vr, value, top.encoding))
    codes = method_codes(ctx.options, ctx.pixels_cleaned)
    method_value = _method_sequence_bytes(tuple(codes), implicit, True)
    seq = elems.get(_METHOD_SEQUENCE)
    if seq is None:
        seq = elems[_METHOD_SEQUENCE] = _Elem(_METHOD_SEQUENCE, "SQ", -1, 0, 0, False)
    seq.items, seq.conv = None, None
    seq.new = ("SQ", method_value)
    sop_class = walker.ascii_values(top, 0x00080016) if 0x00080016 in elems else []
    sop_instance = _new_values(elems.get(0x00080018))
    if len(sop_class) != 1 or len(sop_instance) != 1 or not sop_instance[0]:
        raise Unsupported("SOP UIDs")
    if str(checked.get("SOPClassUID")) != sop_class[0]:
        raise Unsupported("SOP class")
    out: list = [b"\x00" * 128, b"DICM", _file_meta(sop_class[0], sop_instance[0], syntax)]
    dataset: list = []
    _write_item(top, dataset)
    if deflated:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        deflated_bytes = bytearray(compressor.compress(b"".join(dataset)))
        deflated_bytes += compressor.flush()
        if len(deflated_bytes) % 2:
            deflated_bytes += b"\x00"
        out.append(deflated_bytes)
    else:
        out.extend(dataset)
    if pixel is not None and pixel.new is not None:
        walker.audit[("PixelData", "clear-unused-bits")] += 1
    ctx.audit.update(walker.audit)
    references = 0x00081115 in elems or 0x30060010 in elems
    return Rewritten(data=b"".join(out), age=age, references=references)


def _new_values(elem: _Elem | None) -> list[str]:
    """Values of the remapped SOPInstanceUID (a replacement written by this module)."""
    if elem is None or elem.new is None or elem.new[0] != "UI":
        raise Unsupported("SOP instance UID not remapped")
    text = elem.new[1].decode("ascii").rstrip("\x00")
    return text.split("\\") if text else []

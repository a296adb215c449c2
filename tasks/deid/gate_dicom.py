"""The leak gate's DICOM scanner: every element, every byte, pixel data skipped.

:func:`scan_dicom_stream` reads one file from a seekable stream: the preamble, the file meta,
every element at every nesting level (public, retired, private, unknown), binary values decoded
with every candidate character set, encapsulated documents (PDF streams inflated), every byte
after the pixel data. Pixel data is skipped without being read; a deflated file is inflated up
to :data:`MAX_INFLATED_BYTES`. :mod:`tasks.deid.scan_phi` lists the kinds reported.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from pydicom import dcmread
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID_dictionary as WELL_KNOWN_UIDS

from tasks.deid.dataset import STANDARD_SCHEMES, quiet_pydicom
from tasks.deid.descriptors import token_allowed
from tasks.deid.descriptors import words as descriptor_words
from tasks.deid.gate_match import DUMMY_NAMES, IdentifierMatcher, text_pattern
from tasks.deid.gate_text import decodings, printable
from tasks.deid.profile import (
    CLASS_UID_KEYWORDS,
    DEFAULT_SAFE_PRIVATE,
    SAFE_TEXT_KEYWORDS,
    Action,
    DeidOptions,
    resolve,
    table,
)

TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC"})
#: VRs whose values are binary: decoded as text with every candidate character set.
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
#: Numeric VRs: a value longer than 8 bytes is decoded as text too (a name written there).
NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "AT", "SV", "UV"})
#: Elements written by the profile itself (skipped by the scan).
_OWN_ELEMENTS = frozenset({"DeidentificationMethod", "DeidentificationMethodCodeSequence"})
#: Text attributes the pattern checks skip (technical values, the profile's own record).
_PATTERN_EXEMPT = SAFE_TEXT_KEYWORDS | {"DeidentificationMethod", "ImplementationVersionName"}
#: Pixel data tags: their values are skipped (never read into memory).
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_DEFLATED = "1.2.840.10008.1.2.1.99"

#: Chunk size for reading large values and trailing data, and the overlap between chunks.
CHUNK = 1 << 20
_OVERLAP = 256
#: Most bytes of one value, of trailing data or of an inflated stream that are scanned.
MAX_SCAN_BYTES = 256 * 1024 * 1024
#: Largest inflated size of a deflated DICOM file (beyond: a ``too-large`` finding).
MAX_INFLATED_BYTES = 1024 * 1024 * 1024


@dataclass
class _Scan:
    """State of one DICOM file's scan."""

    matcher: IdentifierMatcher
    out: list[tuple[str, str]] = field(default_factory=list)
    charset: str | None = None
    keys: tuple[str, ...] = ()

    def add(self, where: str, kind: str) -> None:
        self.out.append((where, kind))

    def texts_match(
        self, where: str, texts: Sequence[str], vr: str = "", dates_only: bool = False
    ) -> None:
        """Check decoded texts for catalogue identifiers and dates."""
        m = self.matcher
        if not dates_only and any(m.found(t) for t in texts):
            self.add(where, "identifier")
        if vr == "UI":
            return
        if vr in ("DA", "DT"):
            if any(m.patient_date_found(k, t, exact=True) for k in self.keys for t in texts):
                self.add(where, "catalogue-date")
        elif vr in ("DS", "IS"):
            # a decimal number reads as a day and a month ("12.3"): only a full date counts
            if any(
                m.date_found(t) or any(m.patient_date_found(k, t, full=True) for k in self.keys)
                for t in texts
            ):
                self.add(where, "catalogue-date")
        elif vr != "TM" and any(
            m.date_found(t) or any(m.patient_date_found(k, t) for k in self.keys) for t in texts
        ):
            self.add(where, "catalogue-date")


def _charset(ds: Dataset) -> str | None:
    value = ds.get("SpecificCharacterSet")
    if not value:
        return None
    terms = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    for term in terms:
        name = python_encoding.get(str(term).strip())
        if name:
            return name
    return None


def _chunks(data: bytes) -> Iterator[bytes]:
    if len(data) <= CHUNK:
        yield data
        return
    for start in range(0, min(len(data), MAX_SCAN_BYTES), CHUNK - _OVERLAP):
        yield data[start : start + CHUNK]


#: Where a full date can be in bytes: a year 19xx/20xx (or 19xxmmdd) or a numeric d.m.yy, in an
#: ASCII-compatible character set or in UTF-16 (either byte order).
_DATE_BYTES = re.compile(
    rb"(?<![0-9])(?:19|20)[0-9]{2}(?:[0-9]{4})?(?![0-9])"
    rb"|(?<![0-9.])[0-9]{1,2}[./-][0-9]{1,2}[./-][0-9]{2}(?![0-9])"
    rb"|(?:1\x009|2\x000)\x00[0-9]\x00[0-9]"
)
_DATE_REACH = 128


def _date_windows(data: bytes) -> Iterator[bytes]:
    """Yield the parts of ``data`` around each place a full date can be (merged)."""
    start = end = -1
    for match in _DATE_BYTES.finditer(data):
        lo, hi = max(0, match.start() - _DATE_REACH), match.end() + _DATE_REACH
        if lo <= end:
            end = max(end, hi)
            continue
        if end > 0:
            yield data[start:end]
        start, end = lo, hi
    if end > 0:
        yield data[start:end]


def _scan_blob(scan: _Scan, where: str, data: bytes, patterns: bool) -> None:
    """Decode binary data with every candidate character set and check the texts.

    Names and IDs are looked for in the whole of every decoding; dates only around the bytes
    where one can be (one pass of a bytes regular expression), which keeps large numeric
    values (lookup tables, waveforms) cheap.
    """
    if len(data) > MAX_SCAN_BYTES:
        scan.add(where, "too-large")
    for chunk in _chunks(data):
        texts = list(decodings(chunk, scan.charset))
        if any(scan.matcher.found(t) for t in texts):
            scan.add(where, "identifier")
        for window in _date_windows(chunk):
            scan.texts_match(where, list(decodings(window, scan.charset)), dates_only=True)
        if patterns:
            readable = [t for t in texts if printable(t)]
            for text in readable:
                kind = text_pattern(text)
                if kind:
                    scan.add(where, kind)
                    break


def _pdf_streams(data: bytes) -> Iterator[bytes]:
    """Inflate the Flate streams of a PDF (each capped at :data:`MAX_SCAN_BYTES`)."""
    for match in re.finditer(rb"stream\r?\n", data):
        start = match.end()
        end = data.find(b"endstream", start)
        if end < 0:
            break
        inflater = zlib.decompressobj()
        try:
            yield inflater.decompress(data[start:end], MAX_SCAN_BYTES)
        except zlib.error:
            continue


def _raw_value(ds: Dataset, tag: int) -> tuple[str, object]:
    """Return (VR, value) of an element without converting binary values."""
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    value = raw.value if raw is not None else None
    if not vr:
        try:
            vr = dictionary_VR(tag).split(" or ")[0]
        except KeyError:
            vr = "UN"
    return vr, value


def _walk(ds: Dataset, scan: _Scan, path: str, top: bool) -> None:
    pseudonym = str(ds.get("PatientID", "") or "") if top else ""
    for tag in list(ds.keys()):
        tag = int(tag)
        group, element = tag >> 16, tag & 0xFFFF
        keyword = (keyword_for_tag(tag) if group % 2 == 0 else "") or f"({group:04X},{element:04X})"
        if keyword in _OWN_ELEMENTS:
            continue
        private = group % 2 == 1
        where = f"{path}({group:04X},xxxx)" if private else f"{path}{keyword}"
        if private and element >= 0x0100 and not _safe_private(ds, tag):
            scan.add(where, "private-tag")
        if 0x6000 <= group <= 0x60FF and group % 2 == 0:
            scan.add(f"{path}Overlay", "overlay")
        try:
            vr, value = _raw_value(ds, tag)
            if vr == "SQ" or not isinstance(value, bytes | str | int | float | type(None)):
                elem = ds[tag]
                vr, value = elem.VR, elem.value
        except Exception:
            scan.add(where, "unreadable")
            continue
        if isinstance(value, DicomSequence) or vr == "SQ":
            for i, item in enumerate(value or []):
                _walk(item, scan, f"{where}[{i}].", False)
            continue
        _check_element(ds, tag, keyword, where, vr, value, scan, private, pseudonym)


def _check_element(
    ds: Dataset,
    tag: int,
    keyword: str,
    where: str,
    vr: str,
    value: object,
    scan: _Scan,
    private: bool,
    pseudonym: str,
) -> None:
    if value is None or value in (b"", ""):
        return
    if keyword == "EncapsulatedDocument":
        scan.add(where, "encapsulated-document")
        data = value if isinstance(value, bytes) else b""
        for stream in _pdf_streams(data):
            _scan_blob(scan, where, stream, patterns=False)
    if isinstance(value, bytes):
        binary = vr in BINARY_VRS or (vr in NUMERIC_VRS)
        if binary and (vr not in NUMERIC_VRS or len(value) > 8):
            _scan_blob(scan, where, value, patterns=True)
            return
        if binary:
            return
        texts = list(decodings(value.rstrip(b"\x00 "), scan.charset))
    else:
        values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        texts = ["\\".join(str(v) for v in values if v not in (None, ""))]
    texts = [t for t in texts if t.strip("\x00 ")]
    if not texts:
        return
    scan.texts_match(where, texts, vr)
    if private or vr in NUMERIC_VRS:
        return
    if table().get(tag) is not None:
        action = resolve(tag, vr, DeidOptions())
        if action in (Action.REMOVE, Action.EMPTY):
            scan.add(where, "profile-attribute")
            return
    declared = texts[0]
    values = [v for v in declared.split("\\") if v.strip("\x00 ")]
    if vr == "PN":
        allowed = {n.upper() for n in DUMMY_NAMES | {pseudonym, str(ds.get("PatientID", "") or "")}}
        if any(v.strip().upper() not in allowed for v in values):
            scan.add(where, "person-name")
    elif vr == "UI":
        if keyword not in CLASS_UID_KEYWORDS and any(
            not v.strip().startswith("2.25.") and v.strip() not in WELL_KNOWN_UIDS for v in values
        ):
            scan.add(where, "uid-not-remapped")
    elif vr in TEXT_VRS and keyword not in _PATTERN_EXEMPT:
        scheme = str(ds.get("CodingSchemeDesignator", ""))
        if keyword in ("CodeMeaning", "CodeValue") and (
            scheme in STANDARD_SCHEMES or _reviewed_feature_code(ds, scheme)
        ):
            return
        for text in texts:
            kind = text_pattern(text)
            if kind:
                scan.add(where, kind)
                break
        unknown = (w for w in descriptor_words(declared) if not token_allowed(w))
        if _is_descriptor(tag, vr) and any(unknown):
            scan.add(where, "non-vocabulary-word")


def _reviewed_feature_code(ds: Dataset, scheme: str) -> bool:
    """Whether a code item is a radiomics feature or filter code of the reviewed IBSI table."""
    from tasks.radiomics.ibsi import reviewed_codes

    code = (scheme, str(ds.get("CodeValue", "")), str(ds.get("CodeMeaning", "")))
    return code in reviewed_codes()


def _is_descriptor(tag: int, vr: str) -> bool:
    """Whether the profile cleans this attribute against the vocabulary (Clean Descriptors)."""
    return resolve(tag, vr, DeidOptions()) is Action.CLEAN


def _safe_private(ds: Dataset, tag: int) -> bool:
    group, element = tag >> 16, tag & 0xFFFF
    creator_elem = ds.get((group, element >> 8)) if element >= 0x1000 else None
    if creator_elem is None:
        return False
    creator = str(creator_elem.value).strip().upper()
    return any(
        t.creator.upper() == creator and t.group == group and t.element == element & 0xFF
        for t in DEFAULT_SAFE_PRIVATE
    )


def _at_pixels(tag: int, vr: str | None, length: int) -> bool:
    return int(tag) in PIXEL_TAGS


_LONG_VRS = {
    b"OB",
    b"OW",
    b"OF",
    b"OD",
    b"OL",
    b"OV",
    b"UN",
    b"UT",
    b"SQ",
    b"UC",
    b"UR",
    b"SV",
    b"UV",
}


def _skip_pixels(stream: BinaryIO, implicit: bool, little: bool) -> bool:
    """Skip the pixel data element at the stream position (value not read).

    Returns False when there is no pixel data element there (the position is restored).
    """
    start = stream.tell()
    endian = "<" if little else ">"
    head = stream.read(8)
    if len(head) < 8:
        stream.seek(start)
        return False
    group, element = struct.unpack(endian + "HH", head[:4])
    if (group << 16 | element) not in PIXEL_TAGS:
        stream.seek(start)
        return False
    if implicit:
        (length,) = struct.unpack(endian + "L", head[4:8])
    elif head[4:6] in _LONG_VRS:
        (length,) = struct.unpack(endian + "L", stream.read(4))
    else:
        (length,) = struct.unpack(endian + "H", head[6:8])
    if length != 0xFFFFFFFF:
        stream.seek(length, io.SEEK_CUR)
        return True
    while True:  # encapsulated: items up to the sequence delimiter
        item = stream.read(8)
        if len(item) < 8:
            return True
        group, element, size = struct.unpack(endian + "HHL", item)
        tag = group << 16 | element
        if tag == 0xFFFEE0DD:
            return True
        if tag != 0xFFFEE000:
            stream.seek(-8, io.SEEK_CUR)
            return True
        stream.seek(size, io.SEEK_CUR)


def _scan_trailing(stream: BinaryIO, scan: _Scan) -> None:
    """Scan every byte after the pixel data (in chunks); any data there is a finding."""
    flagged = False
    total = 0
    tail = b""
    while total < MAX_SCAN_BYTES:
        chunk = stream.read(CHUNK)
        if not chunk:
            return
        total += len(chunk)
        if not flagged and chunk.strip(b"\x00"):
            scan.add("after-pixel-data", "after-pixel-data")
            flagged = True
        if flagged:
            texts = list(decodings(tail + chunk, scan.charset))
            scan.texts_match("after-pixel-data", texts)
        tail = chunk[-_OVERLAP:]
    if stream.read(1):
        scan.add("after-pixel-data", "too-large")


def _read_header(stream: BinaryIO, scan: _Scan) -> tuple[Dataset, Dataset, BinaryIO, bool, bool]:
    """Read the file meta and data set up to the pixel data; inflate deflated files (capped)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    read_preamble(stream, True)
    meta = _read_file_meta_info(stream)
    syntax = str(meta.get("TransferSyntaxUID", "") or "")
    if syntax == _DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflater.decompress(stream.read(), MAX_INFLATED_BYTES)
        if inflater.unconsumed_tail:
            raise _TooLarge
        # bytes after the end of the deflate stream are data after the data set too
        stream = io.BytesIO(data + inflater.unused_data)
        ds = read_dataset(stream, False, True, stop_when=_at_pixels)
        return meta, ds, stream, False, True
    stream.seek(0)
    ds = dcmread(stream, force=True, stop_before_pixels=True)
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = (True, True)
    return ds.file_meta if hasattr(ds, "file_meta") else meta, ds, stream, implicit, little


class _TooLarge(Exception):
    """A deflated file inflates beyond :data:`MAX_INFLATED_BYTES`."""


def scan_dicom_stream(stream: BinaryIO, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    """Scan one DICOM file read from a seekable binary stream; return (attribute, kind) pairs."""
    with quiet_pydicom():
        return _scan_dicom_stream(stream, matcher)


def _scan_dicom_stream(stream: BinaryIO, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    scan = _Scan(matcher)
    head = stream.read(132)
    if head[128:132] == b"DICM" and head[:128].strip(b"\x00"):
        scan.add("preamble", "preamble")
    stream.seek(0)
    try:
        meta, ds, body, implicit, little = _read_header(stream, scan)
        _ = ds.keys()  # the element headers are read; values stay raw until checked
    except _TooLarge:
        return [("file", "too-large")]
    except Exception:
        stream.seek(0)
        scan.add("file", "unreadable")
        _scan_blob(scan, "raw-bytes", stream.read(MAX_SCAN_BYTES), patterns=False)
        return scan.out
    scan.charset = _charset(ds)
    keys = [str(ds.get("PatientID", "") or ""), str(ds.get("StudyInstanceUID", "") or "")]
    scan.keys = tuple(k for k in keys if k)
    try:
        _walk(meta, scan, "file_meta.", False)
        _walk(ds, scan, "", True)
    except Exception:
        scan.add("file", "unreadable")
    if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        scan.add("PatientIdentityRemoved", "identity-not-removed")
    end = body.tell()
    if _skip_pixels(body, implicit, little) or end == body.tell():
        _scan_trailing(body, scan)
    if matcher and not any(kind in ("identifier", "catalogue-date") for _, kind in scan.out):
        # the raw header bytes: values in places the parser does not show
        body.seek(0)
        header = body.read(min(end, MAX_SCAN_BYTES))
        if body is not stream:
            stream.seek(0)
            header = stream.read(132) + header
        probe = _Scan(matcher, charset=scan.charset)
        probe.texts_match("raw-bytes", list(decodings(header, scan.charset)))
        if any(kind == "identifier" for _, kind in probe.out):
            scan.add("raw-bytes", "identifier")
    return scan.out


def scan_dicom(data: bytes, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    """Scan one DICOM file's bytes; return (attribute, kind) pairs."""
    return scan_dicom_stream(io.BytesIO(data), matcher)

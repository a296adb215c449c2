"""The leak gate: scan DICOM and table files for residual identifiers.

:func:`scan_phi` looks at every file under a folder or URL (or a list of files):

* DICOM: the preamble, every file meta element, every element at every nesting level (public,
  private and unknown tags), values of every VR decoded as text (binary ``OB``/``OW``/``UN``
  values with the declared character set, UTF-8, Latin-1/2, Greek, Cyrillic and UTF-16),
  encapsulated documents (PDF streams inflated, bounded) and every byte after the pixel data.
  Pixel data itself is skipped without being read. Deflated files are inflated with a cap.
* Parquet, JSON and CSV tables: every string cell, column name and metadata value;
* NIfTI headers and extensions (image data skipped), and other files as raw bytes.

What is looked for:

* the site's own identifiers (with ``--store``, from the private catalogue, see
  :func:`catalogue_identifiers`): every name part, ID and UID, matched as whole words after
  Unicode normalisation (NFKC, case folded, with and without diacritics, Greek and Cyrillic
  also in Latin letters, see :mod:`tasks.deid.gate_text`), and every catalogue date written in
  any European form (:mod:`tasks.deid.gate_dates`); date attributes (DA, DT) and day-month
  mentions are compared with the dates of the file's own patient when the site secret is at
  hand (a shifted date may equal another patient's real date);
* patterns, with or without a store: person names in PN attributes, honorific + name in any
  text, dates and IDs in free text, words that are not in the technical vocabulary in
  descriptors (any script: a Greek or Cyrillic name in SeriesDescription is flagged),
  unremapped UIDs, attributes the profile removes, unsafe private tags, overlays, encapsulated
  documents, data after the pixel data.

A :class:`Finding` names the file and the attribute and never carries the identifying value,
so findings are safe to print, log and post. Memory is bounded: one file's header at a time,
pixel data skipped, large values and trailing data read in chunks.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.deid.gate_dicom import (
    _OVERLAP,
    CHUNK,
    MAX_SCAN_BYTES,
    _Scan,
    scan_dicom,
    scan_dicom_stream,
)
from tasks.deid.gate_match import (
    ID_PATTERN,
    PRIVATE_COLUMN_NAMES,
    IdentifierMatcher,
    catalogue_identifiers,
    honorific_name,
    patient_dates,
    store_matcher,
)
from tasks.deid.gate_text import decodings
from tasks.errors import OncoflowError
from tasks.store import SiteStore, open_url

__all__ = [
    "Finding",
    "IdentifierMatcher",
    "catalogue_identifiers",
    "patient_dates",
    "scan_bytes",
    "scan_dicom",
    "scan_dicom_stream",
    "scan_phi",
    "scan_target",
    "store_matcher",
]

_MAX_RAW_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, order=True)
class Finding:
    """One suspected identifier: where it is, never what it is.

    Parameters
    ----------
    file
        File path relative to the scanned root (store-relative under a site store).
    attribute
        Keyword path (``RequestAttributesSequence[0].AccessionNumber``), private group,
        table column, JSON path, ``file_meta.<keyword>``, ``preamble``, ``after-pixel-data``
        or ``raw-bytes``.
    kind
        ``identifier`` (a name, ID or UID from the private catalogue), ``catalogue-date``
        (a date of the private catalogue, in any written form), ``person-name``,
        ``date-in-text``, ``id-in-text``, ``honorific-name``, ``non-vocabulary-word`` (a word
        of a descriptor that the vocabulary does not know), ``uid-not-remapped``,
        ``private-tag``, ``overlay``, ``profile-attribute``, ``identity-not-removed``,
        ``preamble``, ``encapsulated-document``, ``after-pixel-data``, ``private-column``,
        ``too-large`` (not scanned in full) or ``unreadable``.
    """

    file: str
    attribute: str
    kind: str

    def line(self) -> str:
        """One printable line (no value)."""
        return f"{self.file}: {self.attribute}: {self.kind}"


# --- tables ---------------------------------------------------------------------------------------


def _cell_kind(text: str, matcher: IdentifierMatcher) -> str:
    if matcher.found(text):
        return "identifier"
    if matcher.date_found(text):
        return "catalogue-date"
    if re.fullmatch(r"2\.25\.\d+|[0-9a-f]{16,64}", text):
        return ""
    if ID_PATTERN.search(text) and not re.fullmatch(r"[A-Z2-7]{26}", text):
        return "id-in-text"
    if honorific_name(text):
        return "honorific-name"
    return ""


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def scan_parquet(data: bytes | BinaryIO, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    """Scan a Parquet table's column names, string cells and metadata (one batch at a time)."""
    out: list[tuple[str, str]] = []
    try:
        source = pa.BufferReader(data) if isinstance(data, bytes) else data
        parquet = pq.ParquetFile(source)
        schema = parquet.schema_arrow
    except Exception:
        return [("file", "unreadable")]
    for key, value in (schema.metadata or {}).items():
        text = value.decode("utf-8", "replace")
        if matcher.found(text) or matcher.date_found(text):
            out.append((f"metadata.{key.decode('utf-8', 'replace')}", "identifier"))
    text_columns = []
    for name in schema.names:
        if name.lower() in PRIVATE_COLUMN_NAMES:
            out.append((name, "private-column"))
        if _is_text(schema.field(name).type):
            text_columns.append(name)
    done: set[str] = set()
    try:
        for batch in parquet.iter_batches(batch_size=4096, columns=text_columns):
            for name in text_columns:
                if name in done:
                    continue
                for value in batch.column(name).to_pylist():
                    kinds = {_cell_kind(s, matcher) for s in _strings(value)} - {""}
                    if kinds:
                        out.extend((name, k) for k in sorted(kinds))
                        done.add(name)
                        break
    except Exception:
        out.append(("file", "unreadable"))
    return out


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return True
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _is_text(kind.value_type)
    if pa.types.is_struct(kind):
        return any(_is_text(f.type) for f in kind)
    return False


def scan_json(data: bytes, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    """Scan every key and string value of a JSON document."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return [("file", "unreadable")]
    out: list[tuple[str, str]] = []

    def visit(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                child = f"{path}.{key}" if path else str(key)
                if matcher.found(str(key)):
                    out.append((child, "identifier"))
                visit(value, child)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                visit(value, f"{path}[{i}]")
        elif isinstance(node, str):
            kind = _cell_kind(node, matcher)
            if kind:
                out.append((path or "$", kind))

    visit(doc, "")
    return out


def scan_csv(data: bytes, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    """Scan a CSV/TSV table (first row = header)."""
    text = data.decode("utf-8", "replace")
    dialect = csv.excel_tab if "\t" in text.split("\n", 1)[0] else csv.excel
    rows = list(csv.reader(io.StringIO(text), dialect))
    if not rows:
        return []
    header = rows[0]
    out: list[tuple[str, str]] = []
    for i, name in enumerate(header):
        if name.strip().lower() in PRIVATE_COLUMN_NAMES:
            out.append((name, "private-column"))
        for row in rows[1:]:
            if i < len(row):
                kind = _cell_kind(row[i], matcher)
                if kind:
                    out.append((name or f"column {i + 1}", kind))
                    break
    return out


# --- NIfTI and other files --------------------------------------------------------------------


def _nifti_header_length(head: bytes) -> int:
    """Bytes before the image data of a NIfTI-1/2 file (header and extensions), or 0."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            return max(352, offset)
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            return max(544, struct.unpack(endian + "q", head[168:176])[0])
    return 0


def scan_raw(data: bytes | BinaryIO, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    """Scan raw bytes (gzip-compressed content is inflated as a stream first, e.g. NIfTI).

    A NIfTI file is scanned up to its image data (header and extensions, every character
    set); other files up to :data:`_MAX_RAW_BYTES` as UTF-8 and Latin-1.
    """
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    magic = stream.read(2)
    stream.seek(0)
    if magic == b"\x1f\x8b":
        stream = gzip.GzipFile(fileobj=stream)
    out: list[tuple[str, str]] = []
    try:
        head = stream.read(CHUNK)
    except (OSError, EOFError, zlib.error):
        return [("file", "unreadable")]
    header = _nifti_header_length(head)
    if header:
        scan = _Scan(matcher)
        body = head[:header] if header <= len(head) else head + stream.read(header - len(head))
        scan.texts_match("header", list(decodings(body[:MAX_SCAN_BYTES])))
        return scan.out
    total, tail = 0, b""
    chunk = head
    while chunk and total < _MAX_RAW_BYTES:
        total += len(chunk)
        window = tail + chunk
        for text in (window.decode("utf-8", "ignore"), window.decode("latin-1")):
            if matcher.found(text) or matcher.date_found(text):
                return [("raw-bytes", "identifier")]
        tail = chunk[-_OVERLAP:]
        try:
            chunk = stream.read(CHUNK)
        except (OSError, EOFError, zlib.error):
            return [*out, ("file", "unreadable")]
    return out


def _is_dicom(name: str, head: bytes) -> bool:
    if head[128:132] == b"DICM":
        return True
    if name.lower().endswith((".dcm", ".dicom")):
        return True
    if "." not in name.rsplit("/", 1)[-1] and len(head) >= 8:
        # a file without extension: DICOM without preamble starts with a group 0002/0008 tag
        group = struct.unpack("<H", head[:2])[0]
        return group in (0x0002, 0x0008)
    return False


def scan_stream(name: str, stream: BinaryIO, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    """Scan one file read from a seekable binary stream, by type (DICOM, tables, other)."""
    low = name.lower()
    if low.endswith(".parquet"):
        return scan_parquet(stream, matcher)
    if low.endswith((".json", ".jsonld")):
        return scan_json(stream.read(), matcher)
    if low.endswith((".csv", ".tsv")):
        return scan_csv(stream.read(), matcher)
    head = stream.read(132)
    stream.seek(0)
    if _is_dicom(name, head):
        return scan_dicom_stream(stream, matcher)
    return scan_raw(stream, matcher)


def scan_bytes(name: str, data: bytes, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    """Scan one file's content by type (DICOM, Parquet, JSON, CSV, anything else raw)."""
    return scan_stream(name, io.BytesIO(data), matcher)


def _files(target: str | Sequence[str]) -> Iterator[tuple[object, str, str]]:
    """Yield (filesystem, path, name relative to the root) for every file of the target."""
    targets = [target] if isinstance(target, str) else list(target)
    for item in targets:
        fs, root = open_url(item)
        if fs.isdir(root):
            for path in sorted(fs.find(root)):
                yield fs, path, path[len(root) :].lstrip("/")
        elif fs.exists(root):
            yield fs, root, root.rsplit("/", 1)[-1]
        else:
            raise OncoflowError(f"nothing to scan at {item}")


def scan_phi(
    paths_or_url: str | Sequence[str],
    identifiers: Iterable[str] | IdentifierMatcher = (),
    prefix: str = "",
) -> list[Finding]:
    """Scan files for residual identifiers (one file open at a time, streamed).

    Parameters
    ----------
    paths_or_url
        A folder or file (local path or fsspec URL), or a list of them.
    identifiers
        Identifying values to look for (e.g. :func:`catalogue_identifiers`), or a ready
        matcher (:func:`store_matcher`); patterns are always checked.
    prefix
        Prepended to each reported file name (e.g. ``"deid/"`` to make names store-relative).

    Returns
    -------
    list of Finding
        Sorted, de-duplicated findings; empty when nothing was found.
    """
    matcher = (
        identifiers
        if isinstance(identifiers, IdentifierMatcher)
        else IdentifierMatcher(identifiers)
    )
    found: set[Finding] = set()
    for fs, path, name in _files(paths_or_url):
        try:
            with fs.open(path, "rb") as stream:
                pairs = scan_stream(name, stream, matcher)
        except OSError:
            pairs = [("file", "unreadable")]
        for attribute, kind in pairs:
            found.add(Finding(prefix + name, attribute, kind))
    return sorted(found)


def scan_target(path: str, store_url: str | None = None, site: str | None = None) -> list[Finding]:
    """Scan ``path`` as the ``scan-phi`` command does.

    With a site store, the catalogue's identifiers are searched too and files under the store
    are named store-relative (``deid/dicom/...``); otherwise names are relative to ``path``.

    Raises
    ------
    OncoflowError
        When only one of ``store_url`` and ``site`` is given, or nothing exists at ``path``.
    """
    if bool(store_url) != bool(site):
        raise OncoflowError("--store and --site go together")
    matcher = IdentifierMatcher()
    prefix = ""
    if store_url and site:
        store = SiteStore(store_url, site)
        matcher = store_matcher(store)
        fs, target = open_url(path)
        if target == store.root or target.startswith(store.root + "/"):
            relative = target[len(store.root) :].strip("/")
            if not fs.isdir(target):
                relative = relative.rsplit("/", 1)[0] if "/" in relative else ""
            prefix = f"{relative}/" if relative else ""
    return scan_phi(path, matcher, prefix)

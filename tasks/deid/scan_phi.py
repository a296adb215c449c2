"""The leak gate: scan DICOM and table files for residual identifiers.

:func:`scan_phi` looks at every file under a folder or URL (or a list of files):

* DICOM: every element at every nesting level (private tags, free text, person names, UIDs,
  profile attributes that must be empty) plus the raw header bytes (preamble included);
* Parquet, JSON and CSV tables: every string cell, column name and metadata value;
* NIfTI headers and other files: raw bytes.

It matches the site's own identifiers (from the private catalogue, see
:func:`catalogue_identifiers`) and patterns (dates and IDs in free text, honorific + name,
unremapped UIDs). A :class:`Finding` names the file and the attribute and never carries the
identifying value, so findings are safe to print, log and post.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID_dictionary as WELL_KNOWN_UIDS

from tasks.deid.dataset import STANDARD_SCHEMES, quiet_pydicom
from tasks.deid.descriptors import VOCABULARY
from tasks.deid.profile import (
    CLASS_UID_KEYWORDS,
    DEFAULT_SAFE_PRIVATE,
    SAFE_TEXT_KEYWORDS,
    Action,
    DeidOptions,
    resolve,
    table,
)
from tasks.errors import OncoflowError
from tasks.store import CATALOG_INSTANCES, SiteStore, open_url

TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC"})
#: Catalogue columns whose values are identifiers.
IDENTIFIER_COLUMNS = (
    "patient_id",
    "patient_name",
    "patient_birth_date",
    "accession_number",
    "sop_instance_uid",
    "series_instance_uid",
    "study_instance_uid",
    "frame_of_reference_uid",
)
#: Column names that only a private table may have.
PRIVATE_COLUMN_NAMES = frozenset(IDENTIFIER_COLUMNS) | {"birth_date", "mrn", "patient_address"}
_DUMMY_NAMES = frozenset({"", "ANONYMOUS", "ANONYMIZED"})
#: Words too generic to count as identifiers even when a catalogue value is one of them.
GENERIC_WORDS = frozenset(
    {
        "anonymous", "anonymized", "anonymised", "anonymize", "patient", "unknown", "none",
        "null", "test", "phantom", "yes", "no", "male", "female", "other", "option", "profile",
        "retain", "basic", "clean", "name", "id",
    }
)  # fmt: skip
#: Elements written by the profile itself (skipped by the scan).
_OWN_ELEMENTS = frozenset({"DeidentificationMethod", "DeidentificationMethodCodeSequence"})
#: Text attributes the pattern checks skip (technical values, the profile's own record).
_PATTERN_EXEMPT = SAFE_TEXT_KEYWORDS | {"DeidentificationMethod", "ImplementationVersionName"}

_MONTHS = "jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec"
DATE_PATTERNS = (
    re.compile(
        r"(?<![0-9.])(?:19|20)\d{2}[-/.]?(?:0[1-9]|1[0-2])[-/.]?(?:0[1-9]|[12]\d|3[01])(?![0-9.])"
    ),
    re.compile(r"(?<![0-9.])\d{1,2}[./-]\d{1,2}[./-](?:19|20)?\d{2}(?![0-9.])"),
    re.compile(rf"(?i)\b(?:{_MONTHS})[a-z]*[ -]?(?:19|20)\d{{2}}\b"),
)
ID_PATTERN = re.compile(r"(?<![A-Za-z0-9.])[A-Za-z]{1,6}[-_# ]?\d{6,}(?![0-9.])")
NUMBER_RUN = re.compile(r"(?<![0-9.])\d{6,}(?![0-9.])")
HONORIFIC_PATTERN = re.compile(r"\b(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+[A-Z][a-z]{2,}")
_WORDS = re.compile(r"[A-Za-z0-9]+")
_UID_RUNS = re.compile(r"\d[\d.]*\d")
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
        table column, JSON path, or ``raw-bytes``.
    kind
        ``identifier`` (a value from the private catalogue), ``person-name``, ``date-in-text``,
        ``id-in-text``, ``honorific-name``, ``uid-not-remapped``, ``private-tag``, ``overlay``,
        ``profile-attribute``, ``identity-not-removed``, ``preamble``, ``private-column`` or
        ``unreadable``.
    """

    file: str
    attribute: str
    kind: str

    def line(self) -> str:
        """One printable line (no value)."""
        return f"{self.file}: {self.attribute}: {self.kind}"


class IdentifierMatcher:
    """Fast case-insensitive matching of many identifier values in text (whole words only).

    Single-word values and UIDs are looked up in sets; values with separators (``Doe^John``,
    ``MRN-123``) are pre-filtered on their longest word and confirmed with a regular expression.
    Values shorter than 3 characters, and vocabulary words, are ignored (too many false hits).
    """

    def __init__(self, values: Iterable[str]) -> None:
        self.words: set[str] = set()
        self.uids: set[str] = set()
        self.phrases: dict[str, list[re.Pattern[str]]] = {}
        for raw in values:
            for value in _expand(str(raw)):
                self._add(value)

    def _add(self, value: str) -> None:
        value = value.strip()
        if len(value) < 3 or value.upper() in _DUMMY_NAMES:
            return
        low = value.lower()
        if re.fullmatch(r"\d+(?:\.\d+)+", value):
            self.uids.add(value)
        elif re.fullmatch(r"[A-Za-z0-9]+", value):
            if low in VOCABULARY or low in GENERIC_WORDS or (value.isdigit() and len(value) < 4):
                return
            self.words.add(low)
        else:
            words = _WORDS.findall(low)
            if not words:
                return
            key = max(words, key=len)
            if len(key) < 2:
                return
            pattern = re.compile(
                r"(?<![A-Za-z0-9])" + re.escape(low) + r"(?![A-Za-z0-9])", re.IGNORECASE
            )
            self.phrases.setdefault(key, []).append(pattern)

    def __bool__(self) -> bool:
        return bool(self.words or self.uids or self.phrases)

    def found(self, text: str) -> bool:
        """Whether ``text`` contains any identifier."""
        if not text or not self:
            return False
        if self.uids and any(run in self.uids for run in _UID_RUNS.findall(text)):
            return True
        tokens = {w.lower() for w in _WORDS.findall(text)}
        if tokens & self.words:
            return True
        for key in tokens & self.phrases.keys():
            if any(p.search(text) for p in self.phrases[key]):
                return True
        return False


def _expand(value: str) -> Iterator[str]:
    """Yield a value and the parts a person name or phrase may appear as."""
    value = value.replace("\x00", "").strip()
    if not value:
        return
    yield value
    if "^" in value:
        parts = [p.strip() for p in value.split("^") if p.strip()]
        yield from parts
        if len(parts) >= 2:
            yield f"{parts[1]} {parts[0]}"
            yield f"{parts[0]} {parts[1]}"


def catalogue_identifiers(store: SiteStore) -> list[str]:
    """Return the distinct identifying values of a site's private catalogue.

    Raises
    ------
    OncoflowError
        When the catalogue does not exist.
    """
    instances = store.read_table(CATALOG_INSTANCES)
    if instances is None:
        raise OncoflowError(f"no catalogue for site {store.site!r}: run `oncoflow ingest` first")
    values: set[str] = set()
    for column in IDENTIFIER_COLUMNS:
        if column in instances.column_names:
            values.update(str(v) for v in instances.column(column).to_pylist() if v)
    return sorted(values)


# --- DICOM --------------------------------------------------------------------------------------


def _header_bytes(data: bytes) -> bytes:
    """Return the bytes before the pixel data (preamble and header): where text lives."""
    with quiet_pydicom():
        buffer = io.BytesIO(data)
        try:
            dcmread(buffer, stop_before_pixels=True, force=True)
            end = buffer.tell()
        except Exception:
            end = len(data)
    return data[: max(end, 132)]


def _scan_dataset(
    ds: Dataset, matcher: IdentifierMatcher, path: str, out: list[tuple[str, str]], top: bool
) -> None:
    pseudonym = str(ds.get("PatientID", "") or "") if top else ""
    for elem in ds:
        tag = elem.tag
        keyword = elem.keyword or f"({tag.group:04X},{tag.element:04X})"
        if keyword in _OWN_ELEMENTS:
            continue
        where = f"{path}{keyword}"
        if tag.is_private:
            if not tag.is_private_creator and not _safe_private(ds, tag):
                out.append((f"({tag.group:04X},xxxx)", "private-tag"))
            continue
        if 0x6000 <= tag.group <= 0x60FF and tag.group % 2 == 0:
            out.append(("Overlay", "overlay"))
            continue
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                _scan_dataset(item, matcher, f"{where}[{i}].", out, False)
            continue
        if elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") or elem.value is None:
            continue
        values = elem.value if isinstance(elem.value, (list, tuple)) else [elem.value]
        texts = [str(v) for v in values if v not in (None, "")]
        if not texts:
            continue
        if any(matcher.found(t) for t in texts):
            out.append((where, "identifier"))
        row = table().get(int(tag))
        if row is not None:
            action = resolve(tag, elem.VR, DeidOptions())
            if action in (Action.REMOVE, Action.EMPTY):
                out.append((where, "profile-attribute"))
                continue
        if elem.VR == "PN":
            allowed = _DUMMY_NAMES | {pseudonym, str(ds.get("PatientID", "") or "")}
            if any(t.strip().upper() not in {a.upper() for a in allowed} for t in texts):
                out.append((where, "person-name"))
        elif elem.VR == "UI":
            if keyword not in CLASS_UID_KEYWORDS and any(
                not t.startswith("2.25.") and t not in WELL_KNOWN_UIDS for t in texts
            ):
                out.append((where, "uid-not-remapped"))
        elif elem.VR in TEXT_VRS and keyword not in _PATTERN_EXEMPT:
            if (
                keyword in ("CodeMeaning", "CodeValue")
                and str(ds.get("CodingSchemeDesignator", "")) in STANDARD_SCHEMES
            ):
                continue
            for text in texts:
                kind = _text_pattern(text)
                if kind:
                    out.append((where, kind))
                    break


def _text_pattern(text: str) -> str:
    if any(p.search(text) for p in DATE_PATTERNS):
        return "date-in-text"
    if ID_PATTERN.search(text) or NUMBER_RUN.search(text):
        return "id-in-text"
    if HONORIFIC_PATTERN.search(text):
        return "honorific-name"
    return ""


def _safe_private(ds: Dataset, tag) -> bool:
    creator_elem = ds.get((tag.group, tag.element >> 8)) if tag.element >= 0x1000 else None
    if creator_elem is None:
        return False
    creator = str(creator_elem.value).strip().upper()
    return any(
        t.creator.upper() == creator and t.group == tag.group and t.element == tag.element & 0xFF
        for t in DEFAULT_SAFE_PRIVATE
    )


def scan_dicom(data: bytes, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    """Scan one DICOM file; return (attribute, kind) pairs."""
    with quiet_pydicom():
        return _scan_dicom(data, matcher)


def _scan_dicom(data: bytes, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    try:
        ds = dcmread(io.BytesIO(data), force=True)
        _ = list(ds)  # parse every element now
    except Exception:
        return [("file", "unreadable")]
    if data[:128].strip(b"\x00"):
        out.append(("preamble", "preamble"))
    for elem in getattr(ds, "file_meta", Dataset()):
        if elem.VR in ("LO", "SH", "AE", "UT", "ST") and matcher.found(str(elem.value)):
            out.append((f"file_meta.{elem.keyword}", "identifier"))
    try:
        _scan_dataset(ds, matcher, "", out, True)
    except Exception:
        out.append(("file", "unreadable"))
    if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        out.append(("PatientIdentityRemoved", "identity-not-removed"))
    parsed_hit = any(kind == "identifier" for _, kind in out)
    if matcher and not parsed_hit and matcher.found(_header_bytes(data).decode("latin-1")):
        out.append(("raw-bytes", "identifier"))
    return out


# --- tables ---------------------------------------------------------------------------------------


def _cell_kind(text: str, matcher: IdentifierMatcher) -> str:
    if matcher.found(text):
        return "identifier"
    if re.fullmatch(r"2\.25\.\d+|[0-9a-f]{16,64}", text):
        return ""
    if ID_PATTERN.search(text) and not re.fullmatch(r"[A-Z2-7]{26}", text):
        return "id-in-text"
    if HONORIFIC_PATTERN.search(text):
        return "honorific-name"
    return ""


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def scan_parquet(data: bytes, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    """Scan a Parquet table's column names, string cells and metadata."""
    out: list[tuple[str, str]] = []
    try:
        tbl = pq.read_table(pa.BufferReader(data))
    except Exception:
        return [("file", "unreadable")]
    for key, value in (tbl.schema.metadata or {}).items():
        if matcher.found(value.decode("utf-8", "replace")):
            out.append((f"metadata.{key.decode('utf-8', 'replace')}", "identifier"))
    for name in tbl.column_names:
        if name.lower() in PRIVATE_COLUMN_NAMES:
            out.append((name, "private-column"))
        column = tbl.column(name)
        if not (_is_text(column.type)):
            continue
        for value in column.to_pylist():
            kinds = {_cell_kind(s, matcher) for s in _strings(value)} - {""}
            if kinds:
                out.extend((name, k) for k in sorted(kinds))
                break
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


def scan_raw(data: bytes, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    """Scan raw bytes (gzip-compressed content is decompressed first, e.g. NIfTI)."""
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError):
            data = gzip.decompress(data)
    text = data[:_MAX_RAW_BYTES].decode("latin-1")
    return [("raw-bytes", "identifier")] if matcher.found(text) else []


def _is_dicom(name: str, data: bytes) -> bool:
    if data[128:132] == b"DICM":
        return True
    if name.lower().endswith((".dcm", ".dicom")):
        return True
    if "." not in name.rsplit("/", 1)[-1]:
        try:
            with quiet_pydicom():
                dcmread(io.BytesIO(data), stop_before_pixels=True)
            return True
        except (InvalidDicomError, Exception):
            return False
    return False


def scan_bytes(name: str, data: bytes, matcher: IdentifierMatcher) -> list[tuple[str, str]]:
    """Scan one file's content by type (DICOM, Parquet, JSON, CSV, anything else raw)."""
    low = name.lower()
    if low.endswith(".parquet"):
        return scan_parquet(data, matcher)
    if low.endswith((".json", ".jsonld")):
        return scan_json(data, matcher)
    if low.endswith((".csv", ".tsv")):
        return scan_csv(data, matcher)
    if _is_dicom(name, data):
        return scan_dicom(data, matcher)
    return scan_raw(data, matcher)


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
    paths_or_url: str | Sequence[str], identifiers: Iterable[str] = (), prefix: str = ""
) -> list[Finding]:
    """Scan files for residual identifiers.

    Parameters
    ----------
    paths_or_url
        A folder or file (local path or fsspec URL), or a list of them.
    identifiers
        Identifying values to look for (e.g. :func:`catalogue_identifiers`); patterns are
        always checked.
    prefix
        Prepended to each reported file name (e.g. ``"deid/"`` to make names store-relative).

    Returns
    -------
    list of Finding
        Sorted, de-duplicated findings; empty when nothing was found.
    """
    matcher = IdentifierMatcher(identifiers)
    found: set[Finding] = set()
    for fs, path, name in _files(paths_or_url):
        try:
            data = fs.cat_file(path)
        except OSError:
            found.add(Finding(prefix + name, "file", "unreadable"))
            continue
        for attribute, kind in scan_bytes(name, data, matcher):
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
    identifiers: list[str] = []
    prefix = ""
    if store_url and site:
        store = SiteStore(store_url, site)
        identifiers = catalogue_identifiers(store)
        fs, target = open_url(path)
        if target == store.root or target.startswith(store.root + "/"):
            relative = target[len(store.root) :].strip("/")
            if not fs.isdir(target):
                relative = relative.rsplit("/", 1)[0] if "/" in relative else ""
            prefix = f"{relative}/" if relative else ""
    return scan_phi(path, identifiers, prefix)

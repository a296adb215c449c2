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
from dataclasses import dataclass, field
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from pydicom import dcmread
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID_dictionary as WELL_KNOWN_UIDS

from tasks.deid.dataset import STANDARD_SCHEMES, quiet_pydicom
from tasks.deid.descriptors import VOCABULARY, token_allowed
from tasks.deid.descriptors import words as descriptor_words
from tasks.deid.gate_dates import DateMention, find_dates, has_date, parse_da
from tasks.deid.gate_text import (
    WORD,
    decodings,
    fold,
    not_spaced,
    printable,
    strip_marks,
    variants,
    words,
)
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
from tasks.store import CATALOG_INSTANCES, CATALOG_SERIES, SiteStore, open_url

TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC"})
#: VRs whose values are binary: decoded as text with every candidate character set.
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
#: Numeric VRs: a value longer than 8 bytes is decoded as text too (a name written there).
NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "AT", "SV", "UV"})
#: Catalogue columns whose values are identifiers (names, IDs, UIDs).
IDENTIFIER_COLUMNS = (
    "patient_id",
    "patient_name",
    "accession_number",
    "sop_instance_uid",
    "series_instance_uid",
    "study_instance_uid",
    "frame_of_reference_uid",
)
#: Catalogue columns whose values are dates.
DATE_COLUMNS = ("patient_birth_date", "study_date", "series_date")
#: Column names that only a private table may have.
PRIVATE_COLUMN_NAMES = frozenset(IDENTIFIER_COLUMNS + DATE_COLUMNS) | {
    "birth_date",
    "mrn",
    "patient_address",
}
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
#: Pixel data tags: their values are skipped (never read into memory).
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_DEFLATED = "1.2.840.10008.1.2.1.99"

ID_PATTERN = re.compile(r"(?<![A-Za-z0-9.])[A-Za-z]{1,6}[-_# ]?\d{6,}(?![0-9.])")
NUMBER_RUN = re.compile(r"(?<![0-9.])\d{6,}(?![0-9.])")
#: Honorifics in the data space's languages (folded, without diacritics).
HONORIFICS = frozenset(
    {
        "dr", "mr", "mrs", "ms", "miss", "prof", "herr", "frau", "hr", "fr", "mme", "mlle",
        "mons", "monsieur", "madame", "sr", "sra", "srta", "dott", "dottssa", "sig", "sigra",
        "pan", "pani", "mudr", "mgr", "ing", "doc", "dra", "κ", "κος", "κα", "δρ", "καθ",
        "проф", "гн", "гжа", "др", "úr", "ur", "asszony", "dhr", "mevr", "fru", "herra",
        "rouva",
    }
)  # fmt: skip
_HONORIFIC_NEXT = re.compile(r"(?:\.\s*|\s+)([^\W\d_]{3,})")
_UID_RUNS = re.compile(r"\d[\d.]*\d")
_DIGIT_RUNS = re.compile(r"\d{6,}")
#: Chunk size for reading large values and trailing data, and the overlap between chunks.
CHUNK = 1 << 20
_OVERLAP = 256
#: Most bytes of one value, of trailing data or of an inflated stream that are scanned.
MAX_SCAN_BYTES = 256 * 1024 * 1024
#: Largest inflated size of a deflated DICOM file (beyond: a ``too-large`` finding).
MAX_INFLATED_BYTES = 1024 * 1024 * 1024
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


class IdentifierMatcher:
    """Unicode-aware matching of many identifying values in text (whole words only).

    Each value is split into words (any script); every word is compared in its folded form,
    without diacritics and transliterated (:func:`tasks.deid.gate_text.variants`), and so is
    the text searched. Single words of 3+ characters (not vocabulary or generic words) are
    looked up in a set; values of several words (``Doe^John`` gives ``doe john``, ``john doe``
    and each part) match as a run of consecutive words; UIDs match whole dotted runs; digit
    runs of 6+ digits of an ID match even when glued to letters (``Pat48213977``); values in scripts
    written without spaces (CJK) match as substrings. Values that are dates (``YYYYMMDD``,
    ``YYYY-MM-DD``) go to :attr:`dates` and match in any written form.

    Parameters
    ----------
    values
        Identifying values (names, IDs, UIDs, dates).
    patient_dates
        Dates of each patient by key (the patient pseudonym or remapped study UID found in a
        de-identified file), for :meth:`patient_date_found`.
    """

    def __init__(
        self,
        values: Iterable[str] = (),
        patient_dates: dict[str, frozenset[DateMention]] | None = None,
    ) -> None:
        self.words: set[str] = set()
        self.uids: set[str] = set()
        self.digits: set[str] = set()
        self.phrases: dict[str, set[tuple[str, ...]]] = {}
        self.substrings: set[str] = set()
        self.dates: set[DateMention] = set()
        self.patient_dates = patient_dates or {}
        for raw in values:
            self.add(str(raw))

    def add(self, raw: str) -> None:
        """Add one identifying value."""
        value = raw.replace("\x00", "").strip()
        if not value or value.upper() in _DUMMY_NAMES:
            return
        if re.fullmatch(r"\d+(?:\.\d+)+", value) and not re.fullmatch(r"\d{4}\.\d\d\.\d\d", value):
            self.uids.add(value)
            return
        date = parse_da(value)
        if date is not None and re.fullmatch(r"\d{8}|\d{4}[-./]\d\d[-./]\d\d", value):
            self.dates.add(date)
            return
        parts = [p for p in re.split(r"[\^=]", value) if p.strip()]
        candidates = [value, *parts]
        if len(parts) >= 2:
            candidates += [f"{parts[1]} {parts[0]}", f"{parts[0]} {parts[1]}"]
        for text in candidates:
            self._add_text(text)

    def _add_text(self, text: str) -> None:
        if not_spaced(text):
            folded = fold(text).strip()
            if len(folded) >= 2:
                self.substrings.add(folded)
        tokens = words(text)
        if not tokens:
            return
        for run in re.findall(r"\d{6,}", text):
            self.digits.add(run)
        if len(tokens) == 1:
            token = tokens[0]
            if _worth_a_word(token) and not (token.isdigit() and len(token) < 4):
                self.words.update(variants(token))
            return
        for form in range(3):
            seq = tuple(_form(t, form) for t in tokens)
            self.phrases.setdefault(seq[0], set()).add(seq)
        name = not any(c.isdigit() for c in text)
        for token in tokens:  # each word of a name; of an ID, its parts with 5+ digits
            digits = sum(c.isdigit() for c in token)
            if _worth_a_word(token) and (digits >= 5 if not name else True):
                self.words.update(variants(token))

    def __bool__(self) -> bool:
        return bool(
            self.words or self.uids or self.phrases or self.substrings or self.dates
            or self.digits
        )  # fmt: skip

    def found(self, text: str) -> bool:
        """Whether ``text`` contains a name, ID or UID of the catalogue."""
        if not text:
            return False
        if self.uids and any(run in self.uids for run in _UID_RUNS.findall(text)):
            return True
        if self.digits and self._digits_found(text):
            return True
        tokens = words(text)
        if self.words:
            for token in tokens:
                if any(v in self.words for v in variants(token)):
                    return True
        if self.phrases:
            for form in range(3):
                seq = [_form(t, form) for t in tokens]
                for i, token in enumerate(seq):
                    for phrase in self.phrases.get(token, ()):
                        if tuple(seq[i : i + len(phrase)]) == phrase:
                            return True
        if self.substrings:
            folded = fold(text)
            if any(s in folded for s in self.substrings):
                return True
        return False

    def _digits_found(self, text: str) -> bool:
        """Whether a whole digit run of ``text`` is an ID's digits (``Pat48213977``)."""
        return any(run in self.digits for run in _DIGIT_RUNS.findall(text))

    def date_found(self, text: str) -> bool:
        """Whether ``text`` writes a date of the catalogue (any form, full dates only)."""
        if not self.dates or not text:
            return False
        return any(d.full and d in self.dates for d in find_dates(text))

    def patient_date_found(self, key: str, text: str, exact: bool = False) -> bool:
        """Whether ``text`` writes a date of the patient ``key`` (day and month suffice).

        With ``exact``, ``text`` is a DA/DT value compared as a full date.
        """
        dates = self.patient_dates.get(key)
        if not dates or not text:
            return False
        if exact:
            value = parse_da(text)
            return value is not None and value in dates
        days = {(d.month, d.day) for d in dates}
        for mention in find_dates(text):
            if mention.full and mention in dates:
                return True
            if not mention.year and (mention.month, mention.day) in days:
                return True
        return False


#: Name particles: never matched on their own.
PARTICLES = frozenset(
    {"de", "da", "do", "dos", "das", "del", "della", "di", "van", "von", "der", "den", "ten",
     "ter", "la", "le", "les", "du", "des", "mac", "mc", "nic", "ní", "ua", "bin", "ibn",
     "al", "el", "af", "zu", "und", "and", "y", "e", "i"}
)  # fmt: skip


def _worth_a_word(token: str) -> bool:
    if len(token) < 3 and not not_spaced(token):
        return False
    if token in GENERIC_WORDS or token in PARTICLES:
        return False
    return token not in VOCABULARY and strip_marks(token) not in VOCABULARY


def _form(token: str, form: int) -> str:
    forms = variants(token)
    return forms[min(form, len(forms) - 1)]


# --- the private catalogue -------------------------------------------------------------------


def _read_columns(store: SiteStore, key: str, columns: Sequence[str]) -> pa.Table | None:
    """Read the given columns that exist of a table (a file or a folder of parts)."""
    path = store.path(key)
    if not store.fs.exists(path):
        return None
    first = path
    if store.fs.isdir(path):  # a table in parts: every part has the table's schema
        parts = [k for k in store.children(key) if k.rsplit("/", 1)[-1].startswith("part-")]
        if not parts:
            return None
        first = store.path(parts[0])
    with store.fs.open(first, "rb") as fh:
        names = pq.ParquetFile(fh).schema_arrow.names
    return store.read_table(key, columns=[c for c in columns if c in names])


def catalogue_identifiers(store: SiteStore) -> list[str]:
    """Return the distinct identifying values (names, IDs, UIDs, dates) of the private catalogue.

    Reads ``catalog/instances.parquet`` and ``catalog/series.parquet`` (only the identifier
    and date columns) and the NIfTI/NRRD cases of ``catalog/volumes.parquet``.

    Raises
    ------
    OncoflowError
        When the catalogue does not exist.
    """
    from tasks.volumes.cases import volume_identifiers

    columns = IDENTIFIER_COLUMNS + DATE_COLUMNS
    instances = _read_columns(store, CATALOG_INSTANCES, columns)
    volumes = volume_identifiers(store)  # NIfTI/NRRD cases: patient IDs and file names
    if instances is None and volumes is None:
        raise OncoflowError(f"no catalogue for site {store.site!r}: run `oncoflow ingest` first")
    values: set[str] = set(volumes or [])
    for tbl in (instances, _read_columns(store, CATALOG_SERIES, columns)):
        if tbl is None:
            continue
        for column in tbl.column_names:
            unique = tbl.column(column).unique().to_pylist()
            values.update(str(v) for v in unique if v)
    return sorted(values)


def _site_keys(store: SiteStore):  # -> SiteKeys | None
    from tasks.deid.pseudonyms import SiteKeys
    from tasks.deid.secret import load_site_secret

    try:
        return SiteKeys.derive(load_site_secret(store.site), store.site)
    except OncoflowError:
        return None


def patient_dates(store: SiteStore, keys=None) -> dict[str, frozenset[DateMention]]:
    """Dates of each catalogue patient, keyed as a de-identified file shows the patient.

    The keys are the patient pseudonym (the de-identified PatientID) and the remapped
    StudyInstanceUID of each study, both derived with the site secret. Without a site secret at
    hand this returns an empty mapping (date attributes are then not compared per patient).

    Parameters
    ----------
    store
        The site store.
    keys
        The site's :class:`~tasks.deid.pseudonyms.SiteKeys` (default: from the site secret).
    """
    keys = keys or _site_keys(store)
    if keys is None:
        return {}
    tbl = _read_columns(
        store, CATALOG_INSTANCES, ("patient_id", "study_instance_uid", *DATE_COLUMNS)
    )
    if tbl is None:
        return {}
    by_patient: dict[str, set[DateMention]] = {}
    studies: dict[str, str] = {}
    for row in tbl.group_by(tbl.column_names).aggregate([]).to_pylist():
        patient = str(row.get("patient_id") or "")
        dates = by_patient.setdefault(patient, set())
        for column in DATE_COLUMNS:
            value = parse_da(str(row.get(column) or ""))
            if value is not None:
                dates.add(value)
        if row.get("study_instance_uid"):
            studies[keys.remap_uid(str(row["study_instance_uid"]))] = patient
    out: dict[str, frozenset[DateMention]] = {}
    for patient, dates in by_patient.items():
        if patient and dates:
            out[keys.patient_pseudonym(patient)] = frozenset(dates)
    for study, patient in studies.items():
        if by_patient.get(patient):
            out[study] = frozenset(by_patient[patient])
    return out


def _catalogue_signature(store: SiteStore, key_id: str) -> tuple[str, ...]:
    parts = [store.url, store.site, key_id]
    for key in (CATALOG_INSTANCES, CATALOG_SERIES):
        try:
            info = store.fs.info(store.path(key))
        except FileNotFoundError:
            parts.append("-")
            continue
        parts.append(str(info.get("size")))
        parts.append(str(info.get("mtime") or info.get("LastModified") or info.get("ETag")))
    return tuple(parts)


_MATCHERS: dict[tuple[str, ...], IdentifierMatcher] = {}


def store_matcher(store: SiteStore) -> IdentifierMatcher:
    """Return the matcher of a site's private catalogue (cached per process and catalogue state).

    Raises
    ------
    OncoflowError
        When the catalogue does not exist.
    """
    keys = _site_keys(store)
    signature = _catalogue_signature(store, keys.key_id if keys else "")
    matcher = _MATCHERS.get(signature)
    if matcher is None:
        matcher = IdentifierMatcher(catalogue_identifiers(store), patient_dates(store, keys))
        if len(_MATCHERS) >= 4:
            _MATCHERS.clear()
        _MATCHERS[signature] = matcher
    return matcher


# --- DICOM ---------------------------------------------------------------------------------------


@dataclass
class _Scan:
    """State of one DICOM file's scan."""

    matcher: IdentifierMatcher
    out: list[tuple[str, str]] = field(default_factory=list)
    charset: str | None = None
    keys: tuple[str, ...] = ()

    def add(self, where: str, kind: str) -> None:
        self.out.append((where, kind))

    def texts_match(self, where: str, texts: Sequence[str], vr: str = "") -> None:
        """Check decoded texts for catalogue identifiers and dates."""
        m = self.matcher
        if any(m.found(t) for t in texts):
            self.add(where, "identifier")
        if vr == "UI":
            return
        if vr in ("DA", "DT"):
            if any(m.patient_date_found(k, t, exact=True) for k in self.keys for t in texts):
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


def _scan_blob(scan: _Scan, where: str, data: bytes, patterns: bool) -> None:
    """Decode binary data with every candidate character set and check the texts."""
    if len(data) > MAX_SCAN_BYTES:
        scan.add(where, "too-large")
    for chunk in _chunks(data):
        texts = list(decodings(chunk, scan.charset))
        scan.texts_match(where, texts)
        if patterns:
            readable = [t for t in texts if printable(t)]
            for text in readable:
                kind = _text_pattern(text)
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
        allowed = {
            n.upper() for n in _DUMMY_NAMES | {pseudonym, str(ds.get("PatientID", "") or "")}
        }
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
            kind = _text_pattern(text)
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


def _text_pattern(text: str) -> str:
    if has_date(text):
        return "date-in-text"
    if ID_PATTERN.search(text) or NUMBER_RUN.search(text):
        return "id-in-text"
    if _honorific_name(text):
        return "honorific-name"
    return ""


def _honorific_name(text: str) -> bool:
    """Whether ``text`` has an honorific and a capitalised word (``Dr. Müller``, not ``DR CT``)."""
    for match in WORD.finditer(text):
        if fold(match.group(0)) in HONORIFICS:
            nxt = _HONORIFIC_NEXT.match(text, match.end())
            if nxt and nxt.group(1)[0].isupper() and nxt.group(1)[1:].islower():
                return True
    return False


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
        _ = list(ds)  # parse every element now
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
    if _honorific_name(text):
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

"""What the leak gate looks for: the private catalogue's identifiers and identifier patterns.

:class:`IdentifierMatcher` matches the names, IDs, UIDs and dates of the private catalogue in
any text (Unicode-aware, see :mod:`tasks.deid.gate_text` and :mod:`tasks.deid.gate_dates`);
:func:`store_matcher` builds it from a site store (cached per process);
:func:`text_pattern` finds dates, IDs and honorific + name in free text without a catalogue.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import pyarrow as pa

from tasks.deid.descriptors import VOCABULARY
from tasks.deid.gate_dates import DateMention, find_dates, find_full_dates, has_date, parse_da
from tasks.deid.gate_text import WORD, fold, not_spaced, strip_marks, variants, words
from tasks.errors import OncoflowError
from tasks.store import CATALOG_INSTANCES, CATALOG_SERIES, SiteStore

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
DUMMY_NAMES = frozenset({"", "ANONYMOUS", "ANONYMIZED"})
#: Words too generic to count as identifiers even when a catalogue value is one of them.
GENERIC_WORDS = frozenset(
    {
        "anonymous", "anonymized", "anonymised", "anonymize", "patient", "unknown", "none",
        "null", "test", "phantom", "yes", "no", "male", "female", "other", "option", "profile",
        "retain", "basic", "clean", "name", "id",
    }
)  # fmt: skip
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
        if not value or value.upper() in DUMMY_NAMES:
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
        distinct = set(tokens)
        # every form of every distinct word (ASCII words have one form)
        forms = distinct.union(*(variants(t) for t in distinct if not t.isascii() and t.isalpha()))
        if self.words and not forms.isdisjoint(self.words):
            return True
        if self.phrases and not forms.isdisjoint(self.phrases):
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
        return not self.dates.isdisjoint(find_full_dates(text))

    def patient_date_found(
        self, key: str, text: str, exact: bool = False, full: bool = False
    ) -> bool:
        """Whether ``text`` writes a date of the patient ``key`` (day and month suffice).

        With ``exact``, ``text`` is a DA/DT value compared as a full date; with ``full``, only
        a full date in ``text`` counts (a number such as ``12.3`` also reads as a day and month).
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
            if not full and not mention.year and (mention.month, mention.day) in days:
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


def _read_columns(store: SiteStore, key: str, columns: Sequence[str]) -> pa.Table | None:
    """Read the given columns that exist of a table (a file or a folder of parts)."""
    schema = store.table_schema(key)
    if schema is None:
        return None
    return store.read_table(key, columns=[c for c in columns if c in schema.names])


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
    """Name, size and change time of every catalogue file (or part): changes when it changes."""
    parts = [store.url, store.site, key_id]
    for key in (CATALOG_INSTANCES, CATALOG_SERIES, "catalog/volumes.parquet"):
        stamps = store.stamps(key)
        parts.extend(f"{k}={v}" for k, v in sorted(stamps.items()))
        if not stamps:
            parts.append("-")
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


def text_pattern(text: str) -> str:
    """Return the pattern kind ``text`` shows (a date, an ID, honorific + name) or ``""``."""
    if has_date(text):
        return "date-in-text"
    if ID_PATTERN.search(text) or NUMBER_RUN.search(text):
        return "id-in-text"
    if honorific_name(text):
        return "honorific-name"
    return ""


def honorific_name(text: str) -> bool:
    """Whether ``text`` has an honorific and a capitalised word (``Dr. Müller``, not ``DR CT``)."""
    for match in WORD.finditer(text):
        if fold(match.group(0)) in HONORIFICS:
            nxt = _HONORIFIC_NEXT.match(text, match.end())
            if nxt and nxt.group(1)[0].isupper() and nxt.group(1)[1:].islower():
                return True
    return False

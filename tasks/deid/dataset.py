"""De-identify one pydicom Dataset: every element at every nesting level, references kept.

:func:`deidentify_dataset` applies the profile of :mod:`tasks.deid.profile` in place:

* public elements get the action of Table E.1-1 (with the options), or the action of their
  value representation when the table does not list them;
* every UID that is not a well-known class or syntax UID is remapped with the site's keyed
  HMAC wherever it occurs (SOPInstanceUID, ReferencedSOPInstanceUID in any sequence, series,
  study and frame of reference references in SEG and RTSTRUCT...), so references still
  resolve after de-identification;
* dates and times are shifted by the patient's shift (paired ``...Date``/``...Time`` elements
  as one instant);
* private elements are removed unless allow-listed (Retain Safe Private, numeric values only);
  overlays, curves and graphic annotations are removed (Clean Graphics);
* PatientIdentityRemoved, DeidentificationMethod and its code sequence are set.

:func:`encode_dataset` then writes the file with a zeroed preamble and a fresh file meta
group (no source application entity or private meta information).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.uid import UID_dictionary as WELL_KNOWN_UIDS

from tasks.deid.descriptors import (
    VOCABULARY,
    clean_descriptor,
    holds_identifier,
    identifier_tokens,
    site_vocabulary,
)
from tasks.deid.policy import (
    PIXEL_DATA,
    REMOVALS,
    REQUIRED,
    decide,
    effective_vr,
    valid_text_value,
    valid_value,
)
from tasks.deid.profile import (
    METHOD_CODES,
    NUMERIC_VRS,
    PROFILE_VERSION,
    Action,
    DeidOptions,
    keyword_of,
    method_codes,
)
from tasks.deid.pseudonyms import DateShift, SiteKeys, patient_key

#: Coding schemes whose code meanings are standard vocabulary (kept verbatim).
STANDARD_SCHEMES = frozenset(
    {"DCM", "SCT", "SRT", "LN", "UCUM", "FMA", "RADLEX", "NCIT", "NCIt", "UMLS", "ICD10", "99SDM"}
)
CODE_KEYWORDS = frozenset({"CodeValue", "CodeMeaning", "LongCodeValue", "URNCodeValue"})
#: Text VRs of kept elements that are still checked for the patient's identifier words.
_KEPT_TEXT_VRS = frozenset({"LO", "SH", "CS", "UC"})
_METHOD_SEQUENCE = 0x00120064  # DeidentificationMethodCodeSequence
_CLEANABLE_VRS = frozenset({"LO", "SH", "UC", "LT", "ST", "UT", "CS"})
_REPLACING = frozenset({Action.EMPTY, Action.DUMMY, Action.PSEUDONYM, Action.REPLACE})
_SAFE_PRIVATE_VRS = NUMERIC_VRS - {"OB", "OW", "OD", "OF", "OL", "OV", "AT"}
#: VRs of kept values that need no look (binary data such as Pixel Data).
UNCHECKED_VRS = frozenset({"OB", "OW", "OB or OW"})
#: VRs whose dummy value is text.
_DUMMY_TEXT = {"PN": "ANONYMOUS", "AE": "ANONYMOUS", "CS": "ANONYMIZED", "AS": "000Y"}
_DUMMY_OTHER = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}
#: Attribute keywords whose values are identifiers (their words are removed from descriptors).
IDENTIFIER_KEYWORDS = frozenset(
    {
        "PatientID",
        "OtherPatientIDs",
        "IssuerOfPatientID",
        "AccessionNumber",
        "StudyID",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "PatientAddress",
        "MedicalRecordLocator",
        "AdmissionID",
        "MilitaryRank",
        "PatientTelephoneNumbers",
        "ReferringPhysicianAddress",
        "DeviceSerialNumber",
        "RequestedProcedureID",
        "ScheduledProcedureStepID",
        "PerformedProcedureStepID",
        "UniversalEntityID",
        "LocalNamespaceEntityID",
    }
)


@dataclass
class DeidContext:
    """What the walker needs for one patient (built per series; holds keys, never logged).

    Parameters
    ----------
    keys
        The site's derived keys.
    options
        Profile options.
    patient_id
        The original PatientID (private; used to derive pseudonym and shift).
    extra_identifiers
        More identifying values (e.g. from the private catalogue) whose words must not
        survive in cleaned descriptors.
    fallback_key
        What identifies the patient when PatientID is empty (the study UID): see
        :func:`tasks.deid.pseudonyms.patient_key`.
    """

    keys: SiteKeys
    options: DeidOptions
    patient_id: str
    extra_identifiers: tuple[str, ...] = ()
    audit: Counter[tuple[str, str]] = field(default_factory=Counter)
    pixels_cleaned: bool = False
    series_uid_override: dict[str, str] = field(default_factory=dict)
    fallback_key: str = ""

    def __post_init__(self) -> None:
        # an empty PatientID gets its own stand-in key: never another patient's pseudonym
        self.patient_id = patient_key(self.patient_id, self.fallback_key)
        self.patient = self.keys.patient_pseudonym(self.patient_id)
        self.shift: DateShift = self.keys.date_shift(self.patient_id)
        self._safe_private = {
            (t.creator.strip().upper(), t.group, t.element) for t in self.options.safe_private
        }
        self.safe_private_groups = frozenset(t.group for t in self.options.safe_private)
        self.vocabulary = site_vocabulary(tuple(self.options.vocabulary))
        self._uid_cache: dict[str, str] = {}
        self.action_cache: dict[tuple[int, str], Action] = {}
        #: (tag, VR as read) of kept elements whose value needs no look: counted, not visited.
        self.fast_keep: dict[tuple[int, str | None], tuple[str, str]] = {}

    def remap(self, uid: str) -> str:
        """Remap one UID (well-known class and syntax UIDs are kept)."""
        clean = str(uid).replace("\x00", "").strip()
        if not clean or clean in WELL_KNOWN_UIDS:
            return clean
        mapped = self._uid_cache.get(clean)
        if mapped is None:
            mapped = self.series_uid_override.get(clean) or self.keys.remap_uid(clean)
            self._uid_cache[clean] = mapped
        return mapped

    def is_safe_private(self, creator: str, group: int, element: int) -> bool:
        """Whether a private element is on the allow-list."""
        return (creator.strip().upper(), group, element & 0xFF) in self._safe_private


def vr_of(ds: Dataset, tag: BaseTag) -> str:
    """Return the VR of an element without converting its value.

    Raw implicit-VR elements carry no VR and explicit ``UN`` may hide a known attribute: both
    take the dictionary VR (ambiguous ones such as ``US or SS`` stay as written there).
    """
    return _vr(tag, ds.get_item(tag))


def _vr(tag: BaseTag, raw: object) -> str:
    vr = getattr(raw, "VR", None)
    if vr and vr != "UN":
        return vr
    return _dictionary_vr(int(tag)) or vr or "UN"


@cache
def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


def _values(elem: DataElement) -> list:
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


def _set_values(elem: DataElement, values: list) -> None:
    if not values:
        elem.value = elem.empty_value
    elif len(values) == 1:
        elem.value = values[0]
    else:
        elem.value = values


@lru_cache(maxsize=64)
def _forbidden(names: tuple[str, ...], others: tuple[str, ...]) -> frozenset[str]:
    """Return the identifier words of names and other identifiers (a series repeats them)."""
    other_tokens = {t for t in identifier_tokens(others) if t not in VOCABULARY}
    return identifier_tokens(names) | frozenset(other_tokens)


class _Walker:
    """One pass over a dataset and its items, then :meth:`finish` for deferred text.

    Text whose cleaning depends on the patient's identifier words is collected during the pass
    and cleaned in :meth:`finish`, once every name in the dataset is known.
    """

    def __init__(self, ctx: DeidContext, raws: dict | None = None) -> None:
        self.ctx = ctx
        self.audit: Counter[tuple[str, str]] = Counter()
        self.forbidden: frozenset[str] = frozenset()
        self.names: list[str] = [str(v) for v in ctx.extra_identifiers]
        self.others: list[str] = []
        self.deferred: list[tuple[Dataset, BaseTag, str, Action]] = []
        self._actions = ctx.action_cache
        self._fast_keep = ctx.fast_keep
        #: the top-level elements as read, before the instance checks converted some of them
        self.raws: dict | None = raws
        #: keyword of a required attribute whose value was malformed (quarantine)
        self.invalid_required = ""

    def note(self, attribute: str, action: Action | str) -> None:
        self.audit[(attribute, action.value if isinstance(action, Action) else action)] += 1

    def walk(self, ds: Dataset, top: bool = False) -> None:
        """Apply the profile to every element of ``ds`` and of its sequence items.

        Elements are converted from their raw encoding only when their value is needed, so
        kept numeric and binary elements (pixel data included) are written back untouched.
        """
        done: set[int] = set()
        private_seen = False
        creators: dict[int, str] = {}
        fast = self._fast_keep
        audit = self.audit
        # the elements as read (before any check converted them): written VRs and raw values
        raws = self.raws if top and self.raws is not None else dict(ds._dict)
        for tag, current in list(ds.items()):
            if top and tag > PIXEL_DATA:
                del ds[tag]
                self.note(_label(int(tag)), Action.REMOVE_AFTER_PIXEL_DATA)
                continue
            raw = raws.get(tag, current)
            vr = getattr(raw, "VR", None)
            key = fast.get((int(tag), vr))
            if key is not None:  # a kept element that needs no look at its value
                audit[key] += 1
                continue
            if done and int(tag) in done:
                continue
            group = tag.group
            if tag.element == 0 or group in (0x0000, 0x0002):
                del ds[tag]  # group lengths, command and file meta elements inside a dataset
                self.note(
                    f"({group:04X},0000)" if tag.element == 0 else keyword_of(int(tag)),
                    Action.REMOVE,
                )
                continue
            if group & 1:
                private_seen = True
                self.private(ds, tag, creators)
                continue
            if (0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF) and group % 2 == 0:
                del ds[tag]
                self.note("Overlay" if group >= 0x6000 else "Curve", Action.REMOVE)
                continue
            self.public(ds, tag, raw, done, top)
        if private_seen:
            self.drop_empty_creators(ds)

    # -- private elements ------------------------------------------------------------------
    def private(self, ds: Dataset, tag: BaseTag, creators: dict[int, str]) -> None:
        group, element = tag >> 16, tag & 0xFFFF
        if 0x0010 <= element < 0x0100:
            return  # a private creator: decided in drop_empty_creators
        label = _private_label(group)
        if element >= 0x1000 and group in self.ctx.safe_private_groups:
            block = (group << 16) | (element >> 8)
            creator = creators.get(block)
            if creator is None:
                creator = creators[block] = str(ds[block].value) if block in ds else ""
            if creator and self.ctx.is_safe_private(creator, group, element):
                elem = ds[tag]
                if elem.VR in _SAFE_PRIVATE_VRS and _numeric(elem):
                    self.audit[(label, "keep")] += 1
                    return
        del ds[tag]
        self.audit[(label, "remove")] += 1

    def drop_empty_creators(self, ds: Dataset) -> None:
        tags = ds.keys()
        used = {(t.group, t.element >> 8) for t in tags if t.is_private and t.element >= 0x1000}
        for tag in list(tags):
            if tag.is_private and tag.is_private_creator and (tag.group, tag.element) not in used:
                del ds[tag]
                self.note(_private_label(tag.group), Action.REMOVE)

    # -- public elements -------------------------------------------------------------------
    def public(
        self, ds: Dataset, tag: BaseTag, raw: object, done: set[int], top: bool
    ) -> None:
        raw_vr = getattr(raw, "VR", None)
        vr = effective_vr(int(tag), raw_vr)
        keyword = keyword_of(int(tag))
        key = (int(tag), raw_vr)
        action = self._actions.get(key)
        if action is None:
            action = self._actions[key] = decide(int(tag), raw_vr, self.ctx.options)
        scheme = ""
        if action not in REMOVALS:
            if keyword in CODE_KEYWORDS:
                scheme = str(ds.get("CodingSchemeDesignator", ""))
            if scheme in STANDARD_SCHEMES:
                action = Action.KEEP
        if vr == "PN":
            self.names.extend(str(v) for v in _values(ds[tag]))
        elif vr in ("DA", "DT"):
            self.others.extend(v[:8] for v in ascii_values(ds, tag))
        elif keyword in IDENTIFIER_KEYWORDS:
            self.others.extend(str(v) for v in _values(ds[tag]))
        if action is Action.KEEP:
            if not _valid(raw, vr):
                self.invalid(ds, tag, keyword, top)
                return
            if vr in _KEPT_TEXT_VRS:
                self.deferred.append((ds, tag, keyword, action))
                return
            self.note(keyword, action)
            if vr in UNCHECKED_VRS and not scheme and keyword != "TextValue":
                # same tag and raw VR next time: count it without any other work
                self._fast_keep[(int(tag), raw_vr)] = (keyword, Action.KEEP.value)
            return
        if action in REMOVALS:
            del ds[tag]
            self.note(keyword, action)
            if action is Action.REMOVE_INVALID_VR and top and int(tag) in REQUIRED:
                self.invalid_required = self.invalid_required or keyword
            return
        if action in _REPLACING:
            value = {
                Action.EMPTY: None,
                Action.PSEUDONYM: self.ctx.patient,
                Action.REPLACE: self.ctx.keys.site,
            }.get(action, _dummy(vr))
            if action is Action.DUMMY and vr == "SQ":
                self.recurse(ds[tag])
            else:
                ds[tag] = _element(tag, vr, value)
        elif action is Action.REMAP_UID and vr != "SQ":
            _replace(ds, tag, "UI", [self.ctx.remap(v) for v in ascii_values(ds, tag)])
        elif action is Action.SHIFT:
            action = self.shift(ds, tag, vr, keyword, done)
        else:
            elem = ds[tag]  # the value is needed from here on
            vr = elem.VR
            if vr == "SQ" and action in (Action.RECURSE, Action.CLEAN, Action.REMAP_UID):
                self.recurse(elem)
            elif action is Action.CLEAN and vr in _CLEANABLE_VRS:
                self.deferred.append((ds, tag, keyword, action))
                return
            else:  # a value where the table expects something else: fail closed
                del ds[tag]
                action = Action.REMOVE
        self.note(keyword, action)

    def invalid(self, ds: Dataset, tag: BaseTag, keyword: str, top: bool) -> None:
        """Remove a kept element whose value is malformed (remember it when required)."""
        del ds[tag]
        self.note(keyword, Action.REMOVE_INVALID_VALUE)
        if top and int(tag) in REQUIRED and not self.invalid_required:
            self.invalid_required = keyword

    def finish(self) -> None:
        """Clean the deferred text elements now that every identifier word is known."""
        self.forbidden = _forbidden(tuple(self.names), tuple(self.others))
        for ds, tag, keyword, action in self.deferred:
            if action is Action.KEEP and not self.has_forbidden(ds, tag):
                self.note(keyword, action)
                continue
            elem = ds[tag]
            cleaned = [
                clean_descriptor(str(v), self.forbidden, self.ctx.vocabulary)
                for v in _values(elem)
            ]
            _set_values(elem, [c for c in cleaned if c])
            self.note(keyword, Action.CLEAN)
        self.deferred.clear()

    def has_forbidden(self, ds: Dataset, tag: BaseTag) -> bool:
        """Whether a kept text value contains an identifier word (raw bytes read directly)."""
        if not self.forbidden:
            return False
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement):
            return holds_identifier(raw.value or b"", self.forbidden)
        return holds_identifier("\\".join(str(v) for v in _values(raw)), self.forbidden)

    def recurse(self, elem: DataElement) -> None:
        for item in elem.value or []:
            self.walk(item)

    def shift(self, ds: Dataset, tag: BaseTag, vr: str, keyword: str, done: set[int]) -> Action:
        shift = self.ctx.shift
        values = ascii_values(ds, tag)
        if not values:
            return Action.SHIFT
        partner = _time_partner(ds, tag, keyword) if vr == "DA" and len(values) == 1 else None
        if partner is not None:
            times = ascii_values(ds, partner)
            new_date, new_time = shift.shift_pair(values[0], times[0])
            done.add(int(partner))
            self.note(keyword_of(int(partner)), Action.SHIFT if new_time else Action.REMOVE)
            _replace(ds, partner, "TM", [new_time] if new_time else None)
            _replace(ds, tag, "DA", [new_date] if new_date else None)
            return Action.SHIFT if new_date else Action.REMOVE
        if vr == "DA":
            shifted = [shift.shift_date(v) for v in values]
        elif vr == "TM":
            shifted = [shift.shift_time(v) for v in values]
        else:
            shifted = [shift.shift_datetime(v) for v in values]
        if any(v is None for v in shifted):
            del ds[tag]
            return Action.REMOVE
        _replace(ds, tag, vr, shifted)
        return Action.SHIFT


@cache
def _private_label(group: int) -> str:
    """Audit label of a private group, e.g. ``(0011,xxxx)``."""
    return f"({group:04X},xxxx)"


def _time_partner(ds: Dataset, tag: BaseTag, keyword: str) -> BaseTag | None:
    """Return the tag of the single-valued TM paired with a ``...Date`` element, if not visited."""
    if not keyword.endswith("Date"):
        return None
    partner = tag_for_keyword(keyword[:-4] + "Time")
    if partner is None or partner <= int(tag) or partner not in ds:
        return None
    partner_tag = Tag(partner)
    if vr_of(ds, partner_tag) != "TM" or len(ascii_values(ds, partner_tag)) != 1:
        return None
    return partner_tag


def ascii_values(ds: Dataset, tag: BaseTag) -> list[str]:
    """Return the values of a UI, DA, TM or DT element, decoding raw bytes directly.

    These VRs are ASCII by definition, so pydicom's value conversion (character sets,
    validation) is skipped for speed; an already converted element is read as is.
    """
    raw = ds.get_item(tag)
    if isinstance(raw, RawDataElement):
        if not raw.value:
            return []
        text = raw.value.decode("ascii", "replace")
        return [v.strip("\x00 ") for v in text.split("\\") if v.strip("\x00 ")]
    return [str(v) for v in _values(raw)]


def _element(tag: BaseTag, vr: str, value: object) -> DataElement:
    vr = vr.split(" or ")[0]
    return DataElement(tag, vr, empty_value_for_VR(vr) if value is None else value)


def _replace(ds: Dataset, tag: BaseTag, vr: str, values: list | None) -> None:
    """Put a new element with ``values`` (None or empty: zero length) in place of ``tag``."""
    if not values:
        ds[tag] = _element(tag, vr, None)
    else:
        ds[tag] = _element(tag, vr, values[0] if len(values) == 1 else values)


def _numeric(elem: DataElement) -> bool:
    for value in _values(elem):
        try:
            float(value)
        except (TypeError, ValueError):
            return False
    return True


def _dummy(vr: str) -> object:
    if vr in _DUMMY_TEXT:
        return _DUMMY_TEXT[vr]
    if vr in _DUMMY_OTHER:
        return _DUMMY_OTHER[vr]
    if vr in ("LO", "SH", "LT", "ST", "UT", "UC"):
        return "ANONYMIZED"
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "SV", "UV"):
        return 0
    if vr in ("DS", "IS"):
        return "0"
    return None


@cache
def _method_items(codes: tuple[str, ...]) -> tuple[Dataset, ...]:
    """Code items of De-identification Method Code Sequence (built once, shared read-only)."""
    items = []
    for code in codes:
        item = Dataset()
        item.add(DataElement(0x00080100, "SH", code))
        item.add(DataElement(0x00080102, "SH", "DCM"))
        item.add(DataElement(0x00080104, "LO", METHOD_CODES[code]))
        items.append(item)
    return tuple(items)


def _method_sequence(codes: list[str]) -> Sequence:
    return Sequence(list(_method_items(tuple(codes))))


@lru_cache(maxsize=32)
def _method_sequence_bytes(codes: tuple[str, ...], implicit: bool, little: bool) -> bytes:
    """Return the encoded value of De-identification Method Code Sequence (once per encoding).

    Writing new item datasets is slow in pydicom (each is checked for ambiguous VRs), and the
    value is the same for every instance, so it is encoded once and stored as a raw element.
    """
    holder = Dataset()
    holder.add(DataElement(_METHOD_SEQUENCE, "SQ", _method_sequence(list(codes))))
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = little, implicit
    write_dataset(buffer, holder)
    return buffer.getvalue()[8 if implicit else 12 :]  # drop tag, VR and length


def _method_element(codes: list[str], syntax: UID) -> RawDataElement:
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    value = _method_sequence_bytes(tuple(codes), implicit, little)
    return RawDataElement(
        Tag(_METHOD_SEQUENCE), None if implicit else "SQ", len(value), value, 0, implicit, little
    )


class InvalidInstance(ValueError):
    """A required attribute has a malformed value: the instance is quarantined.

    The message is the attribute's keyword (never its value).
    """


def _valid(raw: object, vr: str) -> bool:
    """:func:`tasks.deid.policy.valid_value` of an element as read (or as built in memory)."""
    if isinstance(raw, RawDataElement):
        return raw.value is None or valid_value(vr, raw.value)
    return valid_text_value(vr, getattr(raw, "value", None))


def _label(tag: int) -> str:
    """Audit label of any tag: a keyword, ``(GGGG,EEEE)`` or a private group ``(GGGG,xxxx)``."""
    return _private_label(tag >> 16) if tag >> 16 & 1 else keyword_of(tag)


def deidentify_dataset(ds: Dataset, ctx: DeidContext, raws: dict | None = None) -> Dataset:
    """De-identify ``ds`` in place and return it.

    Parameters
    ----------
    ds
        A dataset as read by pydicom (its ``file_meta`` is replaced).
    ctx
        Keys, options and the patient's original PatientID; its ``audit`` counter receives
        one count per (attribute, action).
    raws
        The top-level elements as read (``dict(ds._dict)`` right after reading, before any
        check converted them), for the written VRs and values; default: ``ds`` as it is now.

    Returns
    -------
    Dataset
        The same dataset, de-identified.

    Raises
    ------
    InvalidInstance
        When a required attribute (:data:`tasks.deid.policy.REQUIRED`) has a malformed value;
        ``ctx.audit`` is then unchanged.
    """
    source_syntax = _transfer_syntax(ds)
    walker = _Walker(ctx, raws)
    walker.walk(ds, top=True)
    walker.finish()
    if walker.invalid_required:
        raise InvalidInstance(walker.invalid_required)
    ctx.audit.update(walker.audit)
    method = f"DICOM PS3.15 E.1-1 {PROFILE_VERSION} key {ctx.keys.key_id}"
    for tag, vr, value in (
        (0x00100010, "PN", ctx.patient),  # PatientName
        (0x00100020, "LO", ctx.patient),  # PatientID
        (0x00120062, "CS", "YES"),  # PatientIdentityRemoved
        (0x00120063, "LO", method),  # DeidentificationMethod
        (0x00280303, "CS", "MODIFIED"),  # LongitudinalTemporalInformationModified
    ):
        ds[tag] = DataElement(tag, vr, value)
    codes = method_codes(ctx.options, ctx.pixels_cleaned)
    ds[_METHOD_SEQUENCE] = _method_element(codes, UID(str(source_syntax)))
    meta = FileMetaDataset()
    sop_class = ascii_values(ds, Tag(0x00080016)) if 0x00080016 in ds else []
    sop_instance = ascii_values(ds, Tag(0x00080018)) if 0x00080018 in ds else []
    for tag, value in (
        (0x00020002, sop_class[0] if sop_class else "1.2.840.10008.5.1.4.1.1.7"),
        (0x00020003, sop_instance[0] if sop_instance else ""),
        (0x00020010, str(source_syntax)),
        (0x00020012, PYDICOM_IMPLEMENTATION_UID),
    ):
        meta[tag] = DataElement(tag, "UI", value)
    meta[0x00020013] = DataElement(0x00020013, "SH", PROFILE_VERSION[:16])
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax:
        return UID(str(syntax))
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit:
        return ImplicitVRLittleEndian
    if little is False:
        return ExplicitVRBigEndian
    return ExplicitVRLittleEndian


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's value validation, warnings and log records while de-identifying.

    pydicom's messages quote header values (names, UIDs), which must not reach a terminal, a
    worker log or the Prefect API; validation is also skipped for speed (values written by
    the profile are valid by construction, the rest is copied as it came).
    """
    logger = logging.getLogger("pydicom")
    level = logger.level
    silent = logging.CRITICAL + 1
    if level != silent:  # setLevel clears every logger's cache: only when not already quiet
        logger.setLevel(silent)
    try:
        with warnings.catch_warnings(), pydicom_config.disable_value_validation():
            warnings.simplefilter("ignore")
            yield
    finally:
        if level != silent:
            logger.setLevel(level)


def encode_dataset(ds: Dataset) -> bytes:
    """Write a de-identified dataset to bytes: zero preamble, ``DICM``, file meta, dataset."""
    buffer = io.BytesIO()
    with pydicom_config.disable_value_validation():
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

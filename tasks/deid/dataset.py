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

import io
import re
from collections import Counter
from dataclasses import dataclass, field

from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.uid import UID_dictionary as WELL_KNOWN_UIDS

from tasks.deid.descriptors import VOCABULARY, clean_descriptor, identifier_tokens
from tasks.deid.profile import (
    METHOD_CODES,
    NUMERIC_VRS,
    PROFILE_VERSION,
    Action,
    DeidOptions,
    keyword_of,
    method_codes,
    resolve,
)
from tasks.deid.pseudonyms import DateShift, SiteKeys

#: Coding schemes whose code meanings are standard vocabulary (kept verbatim).
STANDARD_SCHEMES = frozenset(
    {"DCM", "SCT", "SRT", "LN", "UCUM", "FMA", "RADLEX", "NCIT", "NCIt", "UMLS", "ICD10", "99SDM"}
)
CODE_KEYWORDS = frozenset({"CodeValue", "CodeMeaning", "LongCodeValue", "URNCodeValue"})
#: Text VRs of kept elements that are still checked for the patient's identifier words.
_KEPT_TEXT_VRS = frozenset({"LO", "SH", "CS", "UC"})
_WORD = re.compile(r"[A-Za-z0-9]+")
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
    """

    keys: SiteKeys
    options: DeidOptions
    patient_id: str
    extra_identifiers: tuple[str, ...] = ()
    audit: Counter[tuple[str, str]] = field(default_factory=Counter)
    pixels_cleaned: bool = False
    series_uid_override: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.patient = self.keys.patient_pseudonym(self.patient_id)
        self.shift: DateShift = self.keys.date_shift(self.patient_id)
        self._safe_private = {
            (t.creator.strip().upper(), t.group, t.element) for t in self.options.safe_private
        }
        self._uid_cache: dict[str, str] = {}

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


def collect_forbidden_tokens(ds: Dataset, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """Return the identifier words of a dataset: every person name, and identifier attributes.

    Words of identifier attributes that are imaging vocabulary are not included (so an
    institution called "Chest Clinic" does not empty every "CHEST" descriptor); person-name
    words always are.
    """
    names: list[str] = [str(v) for v in extra]
    others: list[str] = []

    def visit(dataset: Dataset) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                for item in elem.value or []:
                    visit(item)
            elif elem.VR == "PN":
                names.extend(str(v) for v in _values(elem))
            elif elem.VR in ("DA", "DT"):
                others.extend(str(v)[:8] for v in _values(elem))
            elif elem.keyword in IDENTIFIER_KEYWORDS:
                others.extend(str(v) for v in _values(elem))

    visit(ds)
    other_tokens = {t for t in identifier_tokens(others) if t not in VOCABULARY}
    return identifier_tokens(names) | frozenset(other_tokens)


class _Walker:
    def __init__(self, ctx: DeidContext, forbidden: frozenset[str]) -> None:
        self.ctx = ctx
        self.forbidden = forbidden
        self.audit = ctx.audit

    def note(self, attribute: str, action: Action | str) -> None:
        self.audit[(attribute, str(action))] += 1

    def walk(self, ds: Dataset) -> None:
        done: set[int] = set()
        private_seen = False
        for elem in list(ds):
            tag = elem.tag
            if int(tag) in done:
                continue
            group = tag.group
            if tag.element == 0 or group in (0x0000, 0x0002):
                del ds[tag]  # group lengths, command and file meta elements inside a dataset
                self.note(
                    f"({group:04X},0000)" if tag.element == 0 else keyword_of(int(tag)),
                    Action.REMOVE,
                )
                continue
            if tag.is_private:
                private_seen = True
                self.private(ds, elem)
                continue
            if (0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF) and group % 2 == 0:
                del ds[tag]
                self.note("Overlay" if group >= 0x6000 else "Curve", Action.REMOVE)
                continue
            self.public(ds, elem, done)
        if private_seen:
            self.drop_empty_creators(ds)

    # -- private elements ------------------------------------------------------------------
    def private(self, ds: Dataset, elem: DataElement) -> None:
        tag = elem.tag
        label = f"({tag.group:04X},xxxx)"
        if tag.is_private_creator:
            return  # decided in drop_empty_creators
        creator_elem = ds.get((tag.group, tag.element >> 8)) if tag.element >= 0x1000 else None
        creator = str(creator_elem.value) if creator_elem is not None else ""
        if (
            creator
            and self.ctx.is_safe_private(creator, tag.group, tag.element)
            and elem.VR in NUMERIC_VRS - {"OB", "OW", "OD", "OF", "OL", "OV", "AT"}
            and _numeric(elem)
        ):
            self.note(label, Action.KEEP)
            return
        del ds[tag]
        self.note(label, Action.REMOVE)

    def drop_empty_creators(self, ds: Dataset) -> None:
        tags = ds.keys()
        used = {(t.group, t.element >> 8) for t in tags if t.is_private and t.element >= 0x1000}
        for tag in list(tags):
            if tag.is_private and tag.is_private_creator and (tag.group, tag.element) not in used:
                del ds[tag]
                self.note(f"({tag.group:04X},xxxx)", Action.REMOVE)

    # -- public elements -------------------------------------------------------------------
    def public(self, ds: Dataset, elem: DataElement, done: set[int]) -> None:
        tag = elem.tag
        keyword = keyword_of(int(tag))
        vr = elem.VR
        if (
            keyword in CODE_KEYWORDS
            and str(ds.get("CodingSchemeDesignator", "")) in STANDARD_SCHEMES
        ):
            action = Action.KEEP
        elif keyword == "TextValue":
            action = Action.CLEAN  # Clean Structured Content: SR text items keep vocabulary only
        else:
            action = resolve(tag, vr, self.ctx.options)
        if action is Action.KEEP:
            if vr in _KEPT_TEXT_VRS and self.forbidden and self.has_forbidden(elem):
                cleaned = [clean_descriptor(str(v), self.forbidden) for v in _values(elem)]
                _set_values(elem, [c for c in cleaned if c])
                action = Action.CLEAN
        elif action is Action.REMOVE:
            del ds[tag]
        elif action is Action.EMPTY:
            elem.value = elem.empty_value
        elif action is Action.DUMMY:
            if vr == "SQ":
                self.recurse(elem)
            else:
                elem.value = _dummy(vr)
        elif action is Action.PSEUDONYM:
            elem.value = self.ctx.patient
        elif action is Action.REPLACE:
            elem.value = self.ctx.keys.site
        elif action is Action.REMAP_UID:
            if vr == "SQ":
                self.recurse(elem)
            else:
                _set_values(elem, [self.ctx.remap(v) for v in _values(elem)])
        elif action is Action.RECURSE:
            if vr == "SQ":
                self.recurse(elem)
            else:  # a non-sequence where the table expects one: fail closed
                del ds[tag]
                action = Action.REMOVE
        elif action is Action.CLEAN:
            if vr in ("LO", "SH", "UC", "LT", "ST", "UT", "CS"):
                cleaned = [clean_descriptor(str(v), self.forbidden) for v in _values(elem)]
                _set_values(elem, [c for c in cleaned if c])
            elif vr == "SQ":
                self.recurse(elem)
            else:
                del ds[tag]
                action = Action.REMOVE
        elif action is Action.SHIFT:
            action = self.shift(ds, elem, keyword, done)
        self.note(keyword, action)

    def has_forbidden(self, elem: DataElement) -> bool:
        """Whether a kept text value contains an identifier word of the patient."""
        return any(
            w.lower() in self.forbidden for v in _values(elem) for w in _WORD.findall(str(v))
        )

    def recurse(self, elem: DataElement) -> None:
        for item in elem.value or []:
            self.walk(item)

    def shift(self, ds: Dataset, elem: DataElement, keyword: str, done: set[int]) -> Action:
        shift = self.ctx.shift
        values = [str(v) for v in _values(elem)]
        if not values:
            return Action.SHIFT
        vr = elem.VR
        partner = _time_partner(ds, elem, keyword) if vr == "DA" and len(values) == 1 else None
        if partner is not None:
            new_date, new_time = shift.shift_pair(values[0], str(partner.value))
            done.add(int(partner.tag))
            self.note(keyword_of(int(partner.tag)), Action.SHIFT if new_time else Action.REMOVE)
            if new_time is None:
                del ds[partner.tag]
            else:
                partner.value = new_time
            if new_date is None:
                del ds[elem.tag]
                return Action.REMOVE
            elem.value = new_date
            return Action.SHIFT
        if vr == "DA":
            shifted = [shift.shift_date(v) for v in values]
        elif vr == "TM":
            shifted = [shift.shift_time(v) for v in values]
        else:
            shifted = [shift.shift_datetime(v) for v in values]
        if any(s is None for s in shifted):
            del ds[elem.tag]
            return Action.REMOVE
        _set_values(elem, shifted)
        return Action.SHIFT


def _time_partner(ds: Dataset, elem: DataElement, keyword: str) -> DataElement | None:
    """Return the single-valued TM element paired with a ``...Date`` element, if not visited."""
    if not keyword.endswith("Date"):
        return None
    partner_keyword = keyword[:-4] + "Time"
    if partner_keyword not in ds:
        return None
    partner = ds.data_element(partner_keyword)
    if partner is None or partner.VR != "TM" or int(partner.tag) < int(elem.tag):
        return None
    if len(_values(partner)) != 1:
        return None
    return partner


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


def _method_sequence(codes: list[str]) -> Sequence:
    items = []
    for code in codes:
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = METHOD_CODES[code]
        items.append(item)
    return Sequence(items)


def deidentify_dataset(ds: Dataset, ctx: DeidContext) -> Dataset:
    """De-identify ``ds`` in place and return it.

    Parameters
    ----------
    ds
        A dataset as read by pydicom (its ``file_meta`` is replaced).
    ctx
        Keys, options and the patient's original PatientID; its ``audit`` counter receives
        one count per (attribute, action).

    Returns
    -------
    Dataset
        The same dataset, de-identified.
    """
    forbidden = collect_forbidden_tokens(ds, ctx.extra_identifiers)
    source_syntax = _transfer_syntax(ds)
    _Walker(ctx, forbidden).walk(ds)
    ds.PatientID = ctx.patient
    ds.PatientName = ctx.patient
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = f"DICOM PS3.15 E.1-1 {PROFILE_VERSION} key {ctx.keys.key_id}"
    ds.DeidentificationMethodCodeSequence = _method_sequence(
        method_codes(ctx.options, ctx.pixels_cleaned)
    )
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", UID("1.2.840.10008.5.1.4.1.1.7"))
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    meta.TransferSyntaxUID = source_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PROFILE_VERSION[:16]
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


def encode_dataset(ds: Dataset) -> bytes:
    """Write a de-identified dataset to bytes: zero preamble, ``DICM``, file meta, dataset."""
    buffer = io.BytesIO()
    with pydicom_config.disable_value_validation():
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

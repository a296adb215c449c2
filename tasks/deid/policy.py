"""The one decision table of de-identification: what happens to each public element.

Both engines — the pydicom walk (:mod:`tasks.deid.dataset`) and the byte-stream rewriter
(:mod:`tasks.deid.rewrite`) — call :func:`decide` for every public element at every nesting
level, and :func:`valid_value` for every value they keep; they differ only in how they read
and write bytes. The decision, in order:

1. attributes pydicom's data dictionary does not know: removed (``remove-unknown``);
2. retired attributes: removed (``remove-retired``);
3. a written VR other than the dictionary's (explicit VR files; ``UN`` included), or ``SQ``
   where the dictionary does not say SQ: removed (``remove-invalid-vr``);
4. attributes PS3.15 Table E.1-1 lists: the table's action with the configured options
   (:func:`tasks.deid.profile.resolve`); SR ``TextValue`` is cleaned (Clean Structured
   Content);
5. attributes on the reviewed allow-list (:mod:`tasks.deid.allowlist`): kept, cleaned, shifted
   or remapped by value representation (:func:`tasks.deid.profile.resolve`);
6. everything else: removed (``remove-not-allowed``).

``EncapsulatedDocument`` is kept only for the document classes a site allowed in its options
(instances of other classes are quarantined before the walk, see :mod:`tasks.deid.checks`).

Kept values must be well formed for their VR (:func:`valid_value`), else they are removed
(``remove-invalid-value``); when such an attribute is one the instance cannot do without
(:data:`REQUIRED`), the instance is quarantined. Elements after Pixel Data at the top level
are removed (``remove-after-pixel-data``) before any of this. Private elements (Retain Safe
Private), overlays and curves are decided by the walkers with the shared helpers of
:mod:`tasks.deid.dataset`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache

from pydicom.datadict import dictionary_is_retired, dictionary_VR

from tasks.deid.allowlist import allowed_tags
from tasks.deid.pixels import ENCAPSULATED_DOCUMENT
from tasks.deid.profile import Action, DeidOptions, resolve_for, table

PIXEL_DATA = 0x7FE00010

#: Every action that deletes the element (the audit tells them apart).
REMOVALS = frozenset(
    {
        Action.REMOVE,
        Action.REMOVE_UNKNOWN,
        Action.REMOVE_RETIRED,
        Action.REMOVE_INVALID_VR,
        Action.REMOVE_INVALID_VALUE,
        Action.REMOVE_NOT_ALLOWED,
        Action.REMOVE_AFTER_PIXEL_DATA,
    }
)

#: Top-level attributes an image cannot do without: an invalid value quarantines the instance.
REQUIRED = frozenset(
    {
        0x00080016,  # SOPClassUID
        0x00280002,  # SamplesPerPixel
        0x00280004,  # PhotometricInterpretation
        0x00280010,  # Rows
        0x00280011,  # Columns
        0x00280100,  # BitsAllocated
        0x00280101,  # BitsStored
        0x00280102,  # HighBit
        0x00280103,  # PixelRepresentation
        0x7FE00010,  # PixelData
    }
)

#: Attributes replaced by the pseudonym or the site code, whatever the lists say.
_ALWAYS_DECIDED = frozenset({0x00100010, 0x00100020, 0x00080080})
_TEXT_VALUE = 0x0040A160


@cache
def dictionary_vrs(tag: int) -> tuple[str, ...]:
    """Return the VRs the data dictionary allows for a public tag (``()`` when unknown)."""
    try:
        return tuple(dictionary_VR(tag).split(" or "))
    except KeyError:
        return ()


@cache
def _decide(
    tag: int,
    written_vr: str | None,
    patient_characteristics: tuple[str, ...],
    clean: bool,
    documents: bool,
) -> Action:
    if tag == ENCAPSULATED_DOCUMENT and documents and written_vr in (None, "OB"):
        return Action.KEEP  # a document class the site allowed (others never reach the walk)
    vrs = dictionary_vrs(tag)
    if not vrs:
        return Action.REMOVE_UNKNOWN
    if dictionary_is_retired(tag):
        return Action.REMOVE_RETIRED
    if written_vr is not None and written_vr not in vrs:
        return Action.REMOVE_INVALID_VR
    if tag not in _ALWAYS_DECIDED and tag not in table() and tag not in allowed_tags():
        return Action.REMOVE_NOT_ALLOWED
    if tag == _TEXT_VALUE:
        return Action.CLEAN  # Clean Structured Content: SR text keeps vocabulary words only
    vr = written_vr if written_vr is not None else " or ".join(vrs)
    return resolve_for(tag, vr, patient_characteristics, clean)


def decide(tag: int, written_vr: str | None, options: DeidOptions) -> Action:
    """Return the action for one public element (cached per tag, written VR and options).

    Parameters
    ----------
    tag
        The element's tag (public: even group, not a group length, overlay or curve).
    written_vr
        The VR as written in the file (None for implicit VR).
    options
        Profile options.

    Returns
    -------
    Action
        What to do; one of :data:`REMOVALS` when the element goes.
    """
    if written_vr is not None and " or " in written_vr:
        written_vr = None  # built in memory with the dictionary's alternatives: not written
    return _decide(
        tag,
        written_vr,
        tuple(options.patient_characteristics),
        options.clean_descriptors,
        bool(options.document_classes),
    )


def effective_vr(tag: int, written_vr: str | None) -> str:
    """Return the VR to handle a value with: as written, else the dictionary's (``US or SS``)."""
    if written_vr is not None:
        return written_vr
    return " or ".join(dictionary_vrs(tag)) or "UN"


# -- value forms (PS3.5 Table 6.2-1) ---------------------------------------------------------

_FORMS = {
    "DS": rb" *[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)? *",
    "IS": rb" *[+-]?\d{1,12} *",
    "DA": rb"\d{8}|\d{4}\.\d{2}\.\d{2}",
    "TM": rb"\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)? *|\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?",
    "DT": rb"\d{4}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?)?)?(?:[+-]\d{4})? *",
    "CS": rb" *[A-Z0-9_][A-Z0-9_ ]{0,15}|",
    "AS": rb"\d{3}[DWMY]",
    "UI": rb"[0-9]+(?:\.[0-9]+)*",
}
_COMPILED = {vr: re.compile(form) for vr, form in _FORMS.items()}
#: Binary VRs and the size their value length must be a multiple of.
_SIZES = {
    "US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "SV": 8, "UV": 8, "AT": 4,
}  # fmt: skip
_MAX_LENGTH = {"CS": 16, "DS": 16, "IS": 12, "AS": 4, "UI": 64, "DA": 10, "TM": 16, "DT": 26}


def valid_value(vr: str, raw: bytes) -> bool:
    """Whether a raw value is well formed for its VR.

    Parameters
    ----------
    vr
        The element's VR (``US or SS`` style alternatives: any may match).
    raw
        The value bytes as written (padding included; empty is valid).

    Returns
    -------
    bool
        False when a value does not have the VR's form (a name in a DS, letters in a UI, a
        binary value of the wrong length...). Text VRs (LO, SH, UC...) have no form: their
        content is cleaned against the vocabulary instead.
    """
    if len(raw) <= 64:  # short values repeat from slice to slice: decided once
        key = (vr, raw)
        known = _VALID_CACHE.get(key)
        if known is None:
            if len(_VALID_CACHE) > 8192:
                _VALID_CACHE.clear()
            known = _VALID_CACHE[key] = _valid(vr, raw)
        return known
    return _valid(vr, raw)


_VALID_CACHE: dict[tuple[str, bytes], bool] = {}


def _valid(vr: str, raw: bytes) -> bool:
    if " or " in vr:
        return any(_valid(v, raw) for v in vr.split(" or "))
    size = _SIZES.get(vr)
    if size is not None:
        return len(raw) % size == 0
    pattern = _COMPILED.get(vr)
    if pattern is None:
        return True
    text = raw.rstrip(b"\x00 ") if vr != "UI" else raw.rstrip(b"\x00")
    if not text:
        return True
    limit = _MAX_LENGTH[vr]
    for value in text.split(b"\\"):
        if not value and vr not in ("DA", "TM", "DT"):
            continue
        if vr == "DS" and len(value.strip()) > 2 * limit:  # generous: real files overrun 16
            return False
        if vr != "DS" and len(value) > limit:
            return False
        if value and pattern.fullmatch(value) is None:
            return False
    return True


def valid_text_value(vr: str, value: object) -> bool:
    """Return :func:`valid_value` of an element converted to Python values (built in memory).

    Numbers are valid by construction; strings are checked in their written form.
    """
    first = vr.split(" or ")[0]
    if value is None or first in _SIZES or first not in _COMPILED:
        return True
    if isinstance(value, bytes):
        return valid_value(first, value)
    values = [value] if isinstance(value, str) or not isinstance(value, Iterable) else value
    text = "\\".join(getattr(v, "original_string", None) or str(v) for v in values)
    try:
        return valid_value(first, text.encode("ascii"))
    except UnicodeEncodeError:
        return False

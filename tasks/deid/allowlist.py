"""The reviewed allow-list of attributes that may be kept, derived from the DICOM standard.

PS3.15 Table E.1-1 (:mod:`tasks.deid.profile`) says what to do with the attributes it lists;
it does not make any other attribute safe. An attribute the table does not list is kept only
when it is on this allow-list: the attributes (at any nesting level) of the modules below,
taken from the standard's module tables that highdicom ships (``highdicom/_standard``), minus

* retired attributes and attributes pydicom's data dictionary does not know;
* person names, free text, AE titles and URIs (``PN``, ``LT``, ``ST``, ``UT``, ``AE``, ``UR``,
  ``UN``): never kept, whatever the module;

plus a few reviewed additions (:data:`EXTRA_KEYWORDS`; SR ``TextValue`` is cleaned against the
vocabulary like a descriptor). The modules are those of the image,
segmentation, RT structure set, RT dose and SR objects the pipeline handles, without the
modules about people, trials, specimens, devices, approvals and overlays.

The list is held as data in ``allow_list.txt`` next to this module (one attribute a line:
tag, VR, keyword, module) so that a change shows up in review; ``python -m
tasks.deid.allowlist`` prints the derived list, and a test checks that the file matches it.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

from pydicom.datadict import dictionary_is_retired, dictionary_VR, tag_for_keyword

ALLOW_LIST_FILE = Path(__file__).with_name("allow_list.txt")

#: Information object definitions whose modules the allow-list is made of.
IODS: tuple[str, ...] = (
    "ct-image",
    "enhanced-ct-image",
    "legacy-converted-enhanced-ct-image",
    "mr-image",
    "enhanced-mr-image",
    "legacy-converted-enhanced-mr-image",
    "positron-emission-tomography-image",
    "enhanced-pet-image",
    "legacy-converted-enhanced-pet-image",
    "nuclear-medicine-image",
    "digital-x-ray-image",
    "computed-radiography-image",
    "secondary-capture-image",
    "segmentation",
    "parametric-map",
    "rt-structure-set",
    "rt-dose",
    "basic-text-sr",
    "enhanced-sr",
    "comprehensive-sr",
    "comprehensive-3d-sr",
)

#: Modules of those IODs left out: people, trials, specimens, devices, approvals, overlays.
EXCLUDED_MODULES: frozenset[str] = frozenset(
    {
        "patient",
        "patient-study",
        "general-study",
        "clinical-trial-subject",
        "clinical-trial-study",
        "clinical-trial-series",
        "specimen",
        "device",
        "approval",
        "overlay-plane",
        "multi-frame-overlay",
        "intervention",
    }
)

#: Value representations never kept by the allow-list (persons, free text, network names).
NEVER_KEPT_VRS: frozenset[str] = frozenset({"PN", "LT", "ST", "UT", "AE", "UR", "UN"})

#: Reviewed additions: the code sequence macro (coded vocabulary, kept as in every module
#: that uses it) and SR content item values (cleaned or remapped like any other value).
EXTRA_KEYWORDS: tuple[str, ...] = (
    "CodeValue",
    "CodingSchemeDesignator",
    "CodingSchemeVersion",
    "CodeMeaning",
    "LongCodeValue",
    "ContextIdentifier",
    "ContextUID",
    "MappingResource",
    "MappingResourceUID",
    "ContextGroupVersion",
    "ContextGroupExtensionFlag",
    "ContextGroupLocalVersion",
    "ContextGroupExtensionCreatorUID",
    "ValueType",
    "RelationshipType",
    "NumericValue",
    "FloatingPointValue",
    "MeasuredValueSequence",
    "MeasurementUnitsCodeSequence",
    "ConceptNameCodeSequence",
    "ConceptCodeSequence",
    "ContentSequence",
    "TextValue",
    "Date",
    "Time",
    "DateTime",
    "UID",
    "ReferencedSOPSequence",
    "ReferencedSOPClassUID",
    "ReferencedSOPInstanceUID",
    "ReferencedFrameNumber",
    "ReferencedSegmentNumber",
    "GraphicType",
    "GraphicData",
)


def derive() -> dict[int, tuple[str, str, str]]:
    """Return ``tag -> (VR, keyword, module)`` derived from the standard's module tables.

    Returns
    -------
    dict[int, tuple[str, str, str]]
        Every allowed attribute with its dictionary VR, keyword and the first module (in
        sorted order) that holds it; ``"extra"`` for the reviewed additions.
    """
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map

    iod_modules = get_iod_module_map()
    module_attributes = get_module_attribute_map()
    modules = sorted(
        {entry["key"] for iod in IODS for entry in iod_modules[iod]} - EXCLUDED_MODULES
    )
    allowed: dict[int, tuple[str, str, str]] = {}
    for module in modules:
        for entry in module_attributes[module]:
            _add(allowed, entry["keyword"], module)
    for keyword in EXTRA_KEYWORDS:
        _add(allowed, keyword, "extra")
    return dict(sorted(allowed.items()))


def _add(allowed: dict[int, tuple[str, str, str]], keyword: str, module: str) -> None:
    tag = tag_for_keyword(keyword)
    if tag is None or tag in allowed or dictionary_is_retired(tag):
        return
    vr = dictionary_VR(tag)
    if module != "extra" and any(part in NEVER_KEPT_VRS for part in vr.split(" or ")):
        return
    allowed[tag] = (vr.replace(" ", "_"), keyword, module)


def render(allowed: dict[int, tuple[str, str, str]]) -> str:
    """Return the text of ``allow_list.txt`` for a derived list."""
    lines = [
        "# Attributes kept when PS3.15 Table E.1-1 does not list them (tasks/deid/allowlist.py).",
        "# Derived from the standard's module tables; regenerate: python -m tasks.deid.allowlist",
        "# tag      VR  keyword  module",
    ]
    for tag, (vr, keyword, module) in allowed.items():
        lines.append(f"{tag:08X} {vr} {keyword} {module}")
    return "\n".join(lines) + "\n"


@cache
def allowed_tags() -> frozenset[int]:
    """Return the allow-list as read from ``allow_list.txt`` (parsed once per process)."""
    tags = set()
    for line in ALLOW_LIST_FILE.read_text(encoding="ascii").splitlines():
        if line and not line.startswith("#"):
            tags.add(int(line.split()[0], 16))
    return frozenset(tags)


if __name__ == "__main__":
    sys.stdout.write(render(derive()))

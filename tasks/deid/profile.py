"""The DICOM PS3.15 Annex E confidentiality profile, held as data, and the options applied.

:data:`TABLE_E1_1` transcribes PS3.15 Table E.1-1 (Application Level Confidentiality Profile
Attributes): one line per attribute, ``GGGGEEEE BASIC [FLAGS]``. ``BASIC`` is the action of the
Basic Profile (``D`` dummy, ``Z`` zero length, ``X`` remove, ``K`` keep, ``C`` clean, ``U`` new
UID, or a compound such as ``X/Z/D``). ``FLAGS`` give the option columns that differ from the
basic action:

====  ==============================================================  ===========
flag  option column                                                   action
====  ==============================================================  ===========
L     Retain Longitudinal Temporal Information with Modified Dates    C (shift)
D     Clean Descriptors                                               C
S     Clean Structured Content                                        C
G     Clean Graphics                                                  C
V     Retain Device Identity                                          K
I     Retain Institution Identity                                     K
P     Retain Patient Characteristics                                  K
p     Retain Patient Characteristics                                  C
====  ==============================================================  ===========

Retain UIDs and Retain Full Dates are not applied, so their columns are not transcribed.
Keywords come from pydicom's data dictionary (:func:`pydicom.datadict.keyword_for_tag`).

Attributes the table does not list are handled by value representation in
:func:`resolve` (an allow-list approach: person names, free text, application entity titles
and unknown public elements are removed; other text is cleaned; dates are shifted; UIDs are
remapped), so an attribute nobody thought of is never kept verbatim.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cache

from pydantic import BaseModel, ConfigDict, Field
from pydicom.datadict import keyword_for_tag
from pydicom.tag import BaseTag, Tag

#: Version of this de-identification profile (part of DeidentificationMethod and the audit).
PROFILE_VERSION = "oncoflow-deid-1"

TABLE_E1_1 = """
00080050 Z
00184000 X D
00400555 X/Z S
00080022 X/Z L
0008002A X/Z/D L
00181400 X/D D
001811BB D D
00189424 X D
00080032 X/Z L
00404035 X
001021B0 X D
0040A353 X
00380010 X
00380020 X L
00081084 X D
00081080 X D
00380021 X L
00001000 X
00102110 X p D
40000010 X
0040A078 X
22000005 X/Z
300A00C3 X D
300A00DD X D
00101081 X
0016004D X
00181007 X V
00120060 Z I
00120082 X
00120081 D I
00120020 D
00120021 Z
00120072 X D
00120071 X
00120030 Z I
00120031 Z I
00120010 D
00120040 D
00120042 D
00120051 X D
00120050 Z
00400310 X D
00400280 X D
300A02EB X D
00209161 U
3010000F Z D
30100017 Z D
30100006 U
00403001 X
30100013 U
0008009C Z
0008009D X
0050001B X
0040051A X D
00400512 D
00700086 X
00700084 Z/D
00080023 Z/D L
0040A730 D S
00080033 Z/D L
00180010 Z/D D
0018A003 X D
00102150 X
0040A307 X
00380300 X
00080025 X L
00080035 X L
0040A07C X
FFFCFFFC X
0018937F X D
00082111 X D
0018700A X/D V
3010001B Z
00500020 X V
3010002D D V
00181000 X/Z/D V
0016004B X D
00181002 U V
FFFAFFFA X
04000100 U
00209164 U
00380040 X D
4008011A X
40080119 X
300A0016 X D
300A0013 U
3010006E U
00189517 X/D L
30100037 X D
30100035 D D
30100038 D D
30100036 X D
300A0676 X D
00102160 X P
00404011 X L
00080058 U
0070031A U
00402017 Z
30080054 X/D L
300A0196 X D
00340002 D
00340001 D
3010007F Z D
300A0072 X D
00209158 X D
00200052 U
00340007 D L
00181008 X V
00181005 X V
00160076 X
00160075 X
0016008C X
0016008D X L
00160088 X
00160087 X
0016008A X
00160089 X
00160084 X
00160083 X
00160086 X
00160085 X
0016008E X
0016007B X
00160081 X
00160080 X
00160072 X
00160071 X
00160074 X
00160073 X
00160082 X
0016007A X
0016008B X
00160078 X
0016007D X
0016007C X
00160079 X
00160077 X
0016007F X
0016007E X
00160070 X
00700001 D G
00404037 X
00404036 X
00880200 X
00084000 X D
00204000 X D
00284000 X
00402400 X D
003A0314 D L
40080300 X D
00080015 X L
00080014 U
04000600 X
00080081 X I
00081040 X I
00081041 X I
00080082 X/Z/D I
00080080 X/Z/D I
00101050 X
3010004D X/D L
3010004C X/D L
00401011 X
300A0741 D L
300A0742 D D
300A0783 D D
40080111 X
4008010C X
40080115 X D
40080202 X
40080102 X
4008010B X D
4008010A X
00083010 U
00380011 X
00380014 X
00100021 X
00380061 X
00380064 X
00400513 Z
00400562 Z
22000002 X/Z D
00281214 U
001021D0 X L
0016004F X V
00160050 X V
00160051 X V
0016004E X V
00500021 X D
04000404 X
0016002B X D
0018100B U V
30100043 Z V
00020003 U
00102000 X D
00101090 X
00101080 X
04000550 X
00203406 X
00203401 X
30080056 X/D L
0018937B X D
003A0310 U
00081060 X
00401010 X
04000551 X
04000552 X
0040A192 X L
0040A402 U
0040A193 X L
0040A171 U
00102180 X D
00081072 X/D
00081070 X/Z/D
00402010 X
00402011 X
00402008 X
00402009 X
04000561 X
00101000 X
00101002 X
00101001 X
00080024 X L
00080034 X L
300A0760 D L
00281199 U
0040A07A X
00101040 X
00101010 X P
00100030 Z
00101005 X
00100032 X
00380400 X
00100050 X
00101060 X
00100010 Z
00100101 X
00100102 X
001021F0 X
00100040 Z P
00102203 X/Z P
00101020 X P
00102155 X
00102154 X
00101030 X P
00104000 X D
00100020 Z
300A0650 U
00380500 X p D
00401004 X
00400243 X
00400254 X D
00400250 X L
00404051 X L
00400251 X L
00400253 X
00400244 X L
00404050 X L
00400245 X L
00400241 X V
00404030 X V
00400242 X V
00404028 X V
00081050 X
00081052 X
00401102 X
00401104 X
00401103 X
00401101 D
0040A123 D
00081048 X
00081049 X
00081062 X
40080114 X
00402016 Z
00181004 X V
001021C0 X P
00400012 X p
300A000E X D
3010007B Z D
30100081 Z D
00701101 U
00701102 U
30100061 X D
00404052 X L
00181030 X/D D
300A0619 D D
300A0623 D D
300A067D Z D
300A067C D D
300C0113 X D
0040100A X D
00321030 X D
3010005C Z D
00402001 X D
00401002 X D
00321066 X D
00321067 X D
300A073A D L
3010000B U
04000402 X
300A0083 U
3010006F U
30100031 U
30060024 U
00404023 U
00081140 X/Z/U*
0040A172 U
00380004 X
00101100 X
00081120 X
00081111 X/Z/D
04000403 X
00081155 U
00041511 U
00081110 X/Z
00080092 X
00080090 Z
00080094 X
00080096 X
00102152 X
300600C2 U
00400275 X D
00321070 X D
00401400 X D
00321060 X/Z D
00401001 X
00401005 X
00189937 X D
00001001 U
00321032 X
00321033 X
00189185 X D
00102299 X
00102297 X
40084000 X D
40080118 X
40080042 X
300E0008 X/Z
30060028 X D
30060038 X D
300600A6 Z
30060026 Z D
30060088 X D
30060085 X D
300A0615 Z
300A0611 Z
3010005A Z D
300A0006 X/D L
300A0004 X D
300A0002 D D
300A0003 X D
300A0007 X/D L
30100054 D D
300A062A D D
30100056 X/D D
3010003B U
00404034 X
0038001E X
00400006 X
0040000B X
00400007 X D
00400004 X L
00400005 X L
00404008 X L
00400009 X
00400011 X V
00404010 X L
00400002 X L
00404005 X L
00400003 X L
00400001 X V
00404027 X V
00400010 X V
00404025 X V
00321020 X V
00321021 X V
00080021 X/D L
0008103E X D
0020000E U
00080031 X/D L
00380062 X D
00380060 X
300A01B2 X D
300A01A6 X D
004006FA X
001021A0 X P
00080018 U
30100015 U
0018936A D L
00340005 D
00082112 X/Z/U*
300A0216 X V
30080105 X/Z V
00189369 D L
00380050 X p
0040050A X
00400602 X D
00400551 D
00400610 Z S
00400600 X D
00400554 U
00189516 X/D L
00081010 X/Z/D V
00880140 U
30060008 Z L
30060006 X D
30060002 D D
30060004 X D
30060009 X/D L
00324000 X D
00080020 Z L
00081030 X D
00200010 Z
00320012 X
0020000D U
00080030 Z L
00200200 U
00182042 U
0040A354 X
0040DB0D U
0040DB0C U
40004000 X
20300020 X
00080201 X L
00880910 X
00880912 X
00880906 X
00880904 X
00620021 U
00081195 U
00185011 X V
30080250 X/D L
300A00B2 X V
300A0608 D D
300A0609 U
300A0700 U
30100077 D D
3010007A Z D
30080251 X/D L
300A0736 D L
300A0734 D D
0018100A X V
0040A124 U
00181009 X V
30100033 D D
30100034 D D
0040A352 X
0040A358 X
0040A088 Z
0040A075 D
0040A073 D
0040A027 D
00384000 X D
00189371 D V
00189373 X V
00189367 D V
"""


class Action(StrEnum):
    """What is done to one element (also the ``action`` column of ``deid/audit.parquet``)."""

    REMOVE = "remove"
    EMPTY = "empty"
    DUMMY = "dummy"
    KEEP = "keep"
    CLEAN = "clean"
    SHIFT = "shift-date"
    REMAP_UID = "remap-uid"
    PSEUDONYM = "pseudonym"
    REPLACE = "replace"
    RECURSE = "recurse"
    REMOVE_UNKNOWN = "remove-unknown"
    REMOVE_RETIRED = "remove-retired"
    REMOVE_INVALID_VR = "remove-invalid-vr"
    REMOVE_INVALID_VALUE = "remove-invalid-value"
    REMOVE_NOT_ALLOWED = "remove-not-allowed"
    REMOVE_AFTER_PIXEL_DATA = "remove-after-pixel-data"


class ProfileRow(BaseModel):
    """One row of Table E.1-1."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tag: int
    keyword: str
    basic: str
    flags: str = ""


@cache
def table() -> dict[int, ProfileRow]:
    """Return Table E.1-1 keyed by tag (as an int), parsed once per process."""
    rows: dict[int, ProfileRow] = {}
    for line in TABLE_E1_1.strip().splitlines():
        parts = line.split()
        tag = int(parts[0], 16)
        keyword = keyword_for_tag(tag) or f"({parts[0][:4]},{parts[0][4:]})"
        flags = "".join(parts[2:]) if len(parts) > 2 else ""
        rows[tag] = ProfileRow(tag=tag, keyword=keyword, basic=parts[1], flags=flags)
    return rows


class SafePrivateTag(BaseModel):
    """One private element allowed by Retain Safe Private (numeric values only are kept).

    Parameters
    ----------
    creator
        Private creator string, e.g. ``"SIEMENS MR HEADER"``.
    group
        Odd group number, e.g. ``0x0019``.
    element
        Element offset inside the creator's block (the low byte, ``0x00``-``0xFF``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    creator: str
    group: int
    element: int


#: Private elements kept by default: numeric acquisition parameters that harmonisation needs
#: (diffusion b-values and gradient directions, Philips MR scale factors). Only numeric values
#: are ever kept; a text value under one of these tags is removed.
DEFAULT_SAFE_PRIVATE: tuple[SafePrivateTag, ...] = (
    SafePrivateTag(creator="SIEMENS MR HEADER", group=0x0019, element=0x0A),  # images in mosaic
    SafePrivateTag(creator="SIEMENS MR HEADER", group=0x0019, element=0x0C),  # b-value
    SafePrivateTag(creator="SIEMENS MR HEADER", group=0x0019, element=0x0E),  # gradient direction
    SafePrivateTag(creator="SIEMENS MR HEADER", group=0x0019, element=0x27),  # b-matrix
    SafePrivateTag(creator="GEMS_PARM_01", group=0x0043, element=0x39),  # b-value (slop_int_6..9)
    SafePrivateTag(creator="Philips MR Imaging DD 001", group=0x2005, element=0x0D),  # scale int.
    SafePrivateTag(creator="Philips MR Imaging DD 001", group=0x2005, element=0x0E),  # scale slope
)

#: Patient characteristics kept by default (Retain Patient Characteristics, configurable).
DEFAULT_PATIENT_CHARACTERISTICS: tuple[str, ...] = (
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)

#: Device identity attributes kept under Retain Device Identity: descriptive ones only, never
#: serial numbers, station names, AE titles, locations or device IDs.
DEVICE_DESCRIPTIVE = frozenset(
    {
        "DeviceDescription",
        "DeviceLabel",
        "LensMake",
        "LensModel",
        "LensSpecification",
        "SourceManufacturer",
        "XRayDetectorLabel",
    }
)


class PixelCleaningRule(BaseModel):
    """Rectangles to blank in series that may carry burned-in text (Clean Pixel Data).

    A rule covers an instance when every given criterion matches (``None`` = any).

    Parameters
    ----------
    name
        Short rule name, recorded in the audit.
    modality
        Modality, e.g. ``"US"``.
    manufacturer
        Case-insensitive substring of Manufacturer.
    model
        Case-insensitive substring of ManufacturerModelName.
    sop_class_uid
        SOP Class UID.
    rows, columns
        Image size.
    rectangles
        ``(x0, y0, x1, y1)`` pixel rectangles (columns x, rows y; end exclusive) set to zero.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Short rule name (recorded in the audit).")
    modality: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    sop_class_uid: str | None = None
    rows: int | None = None
    columns: int | None = None
    rectangles: tuple[tuple[int, int, int, int], ...] = Field(
        description="(x0, y0, x1, y1) rectangles to blank, end exclusive."
    )


class DeidOptions(BaseModel):
    """Options of the profile (safe as a flow parameter: no identifiers, no secret).

    The profile always applies the Basic Profile with Retain Longitudinal Temporal Information
    with Modified Dates, Retain Device Identity (without serial numbers), Clean Graphics and
    Clean Structured Content. The rest is configurable here.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    patient_characteristics: tuple[str, ...] = Field(
        DEFAULT_PATIENT_CHARACTERISTICS,
        description="Keywords kept by Retain Patient Characteristics (empty: option off).",
    )
    clean_descriptors: bool = Field(
        True,
        description="Clean free-text descriptors against a vocabulary (off: remove them).",
    )
    vocabulary: tuple[str, ...] = Field(
        (),
        description=(
            "Site words kept by Clean Descriptors in addition to the reviewed vocabulary "
            "(technical terms only: never names)."
        ),
    )
    safe_private: tuple[SafePrivateTag, ...] = Field(
        DEFAULT_SAFE_PRIVATE, description="Private elements kept (numeric values only)."
    )
    pixel_rules: tuple[PixelCleaningRule, ...] = Field(
        (), description="Pixel cleaning rules for series that may carry burned-in text."
    )
    document_classes: tuple[str, ...] = Field(
        (),
        description=(
            "SOP Class UIDs of encapsulated documents (PDF, CDA, STL, OBJ, MTL...) a site has "
            "reviewed as safe to publish; their EncapsulatedDocument is kept. Others are "
            "quarantined (encapsulated-document)."
        ),
    )
    max_input_mb: int = Field(
        2048, gt=0, description="Largest source file read (MiB); larger ones are quarantined."
    )
    max_inflated_mb: int = Field(
        1024,
        gt=0,
        description=(
            "Largest data set inflated from a deflated file, or pixel data decoded for "
            "cleaning (MiB); beyond it the instance is quarantined (input-too-large)."
        ),
    )


#: De-identification Method Code Sequence codes (CID 7050, scheme DCM).
METHOD_CODES: dict[str, str] = {
    "113100": "Basic Application Confidentiality Profile",
    "113101": "Clean Pixel Data Option",
    "113103": "Clean Graphics Option",
    "113104": "Clean Structured Content Option",
    "113105": "Clean Descriptors Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
    "113109": "Retain Device Identity Option",
    "113111": "Retain Safe Private Option",
}


def method_codes(options: DeidOptions, pixels_cleaned: bool) -> list[str]:
    """Return the CID 7050 codes of the options applied to one instance, in code order."""
    codes = ["113100", "113103", "113104", "113107", "113109"]
    if options.clean_descriptors:
        codes.append("113105")
    if options.patient_characteristics:
        codes.append("113108")
    if options.safe_private:
        codes.append("113111")
    if pixels_cleaned:
        codes.append("113101")
    return sorted(codes)


# --- resolution -------------------------------------------------------------------------------

#: VRs whose values are numbers or binary data: kept when the table does not list them.
NUMERIC_VRS = frozenset(
    {
        "DS",
        "IS",
        "FL",
        "FD",
        "SS",
        "US",
        "SL",
        "UL",
        "SV",
        "UV",
        "AT",
        "OB",
        "OW",
        "OF",
        "OD",
        "OL",
        "OV",
    }
)
#: Free-text VRs: removed when the table does not list them.
FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
#: Short-text VRs: cleaned against the vocabulary when the table does not list them.
SHORT_TEXT_VRS = frozenset({"LO", "SH", "UC"})
DATE_VRS = frozenset({"DA", "DT", "TM"})

#: Technical text attributes kept verbatim (equipment and acquisition descriptions that
#: harmonisation needs and that carry no identifiers).
SAFE_TEXT_KEYWORDS = frozenset(
    {
        "Manufacturer",
        "ManufacturerModelName",
        "SoftwareVersions",
        "ConvolutionKernel",
        "RescaleType",
        "SequenceName",
        "ReceiveCoilName",
        "TransmitCoilName",
        "Radiopharmaceutical",
        "ReconstructionMethod",
        "AttenuationCorrectionMethod",
        "ScatterCorrectionMethod",
        "RandomsCorrectionMethod",
        "DecayCorrection",
        "FilterType",
        "ContrastBolusRoute",
        "SegmentAlgorithmName",
        "ImplementationVersionName",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "CodingSchemeName",
        "ContextIdentifier",
        "MappingResource",
        "LossyImageCompressionMethod",
        "PixelPresentation",
        "VolumetricProperties",
        "VolumeBasedCalculationTechnique",
        "ComplexImageComponent",
        "AcquisitionContrast",
        "ImageLaterality",
        "SegmentAlgorithmType",
        "ContentLabel",
        "RTROIInterpretedType",
        "ROIGenerationAlgorithm",
        "ContourGeometricType",
        "CountsSource",
        "SeriesType",
        "Units",
        "CorrectedImage",
    }
)

#: Date/time attributes that are versions of coding resources, not events: kept.
UNSHIFTED_DATE_KEYWORDS = frozenset({"ContextGroupVersion", "ContextGroupLocalVersion"})

#: UI attributes that hold classes, syntaxes or coding resources: never remapped.
CLASS_UID_KEYWORDS = frozenset(
    {
        "SOPClassUID",
        "ReferencedSOPClassUID",
        "MediaStorageSOPClassUID",
        "TransferSyntaxUID",
        "ReferencedSOPClassUIDInFile",
        "ReferencedTransferSyntaxUIDInFile",
        "AffectedSOPClassUID",
        "RequestedSOPClassUID",
        "RelatedGeneralSOPClassUID",
        "OriginalSpecializedSOPClassUID",
        "ImplementationClassUID",
        "CodingSchemeUID",
        "ContextGroupExtensionCreatorUID",
        "MappingResourceUID",
        "PrivateInformationCreatorUID",
        "SOPClassesInStudy",
        "EncryptedContentTransferSyntaxUID",
    }
)


@cache
def keyword_of(tag: int) -> str:
    """Keyword of a public tag, or ``(GGGG,EEEE)`` when pydicom does not know it."""
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _compound(code: str) -> Action:
    """Resolve a Basic Profile code (possibly compound) to one action.

    Compound codes are resolved to the least destructive choice that keeps a Type 1/2
    attribute conformant without keeping its value: ``X/Z``, ``Z/D``, ``X/Z/D`` → empty;
    ``X/D`` → dummy; ``X/Z/U*`` → recurse (and remap the UIDs inside).
    """
    if code == "X":
        return Action.REMOVE
    if code in ("Z", "X/Z", "Z/D", "X/Z/D"):
        return Action.EMPTY
    if code in ("D", "X/D"):
        return Action.DUMMY
    if code == "U":
        return Action.REMAP_UID
    if code == "X/Z/U*":
        return Action.RECURSE
    if code == "K":
        return Action.KEEP
    if code == "C":
        return Action.CLEAN
    raise ValueError(f"unknown profile code {code!r}")


@cache
def _resolve_cached(
    tag: int, vr: str, patient_characteristics: tuple[str, ...], clean_descriptors: bool
) -> Action:
    keyword = keyword_of(tag)
    # Identity attributes replaced by pseudonyms (PatientName/PatientID: Z allows a dummy).
    if keyword in ("PatientID", "PatientName"):
        return Action.PSEUDONYM
    if keyword == "InstitutionName":
        return Action.REPLACE  # replaced by the site code (not Retain Institution Identity)
    row = table().get(tag)
    if row is not None:
        flags = row.flags
        if "P" in flags:
            return Action.KEEP if keyword in patient_characteristics else _compound(row.basic)
        if "p" in flags:
            return Action.REMOVE
        if "L" in flags:
            return Action.SHIFT if vr in DATE_VRS else Action.REMOVE
        if "V" in flags:
            if keyword in DEVICE_DESCRIPTIVE:
                return Action.KEEP
            if row.basic == "U":
                return Action.REMAP_UID
            return Action.REMOVE
        if "G" in flags:
            return Action.REMOVE
        if "S" in flags:
            return Action.RECURSE if vr == "SQ" else Action.CLEAN
        if "D" in flags:
            if vr == "SQ":
                return Action.RECURSE if clean_descriptors else Action.REMOVE
            if vr in FREE_TEXT_VRS or vr == "PN":
                return Action.REMOVE
            if clean_descriptors:
                return Action.CLEAN
            return _compound(row.basic)
        action = _compound(row.basic)
        if vr == "SQ" and action is Action.DUMMY:
            return Action.RECURSE  # dummy items: clean each item with the same rules
        if vr == "SQ" and action is Action.REMAP_UID:
            return Action.RECURSE
        return action
    # Not listed in Table E.1-1: decide by value representation.
    if vr == "SQ":
        return Action.RECURSE
    if vr == "UI":
        return Action.KEEP if keyword in CLASS_UID_KEYWORDS else Action.REMAP_UID
    if vr in DATE_VRS:
        return Action.KEEP if keyword in UNSHIFTED_DATE_KEYWORDS else Action.SHIFT
    if vr in NUMERIC_VRS or vr in ("CS", "AS"):
        return Action.KEEP
    if vr in SHORT_TEXT_VRS:
        return Action.KEEP if keyword in SAFE_TEXT_KEYWORDS else Action.CLEAN
    # PN, LT, ST, UT, AE, UR, UN and anything else unknown.
    return Action.REMOVE


def resolve_for(
    tag: int, vr: str, patient_characteristics: tuple[str, ...], clean_descriptors: bool
) -> Action:
    """:func:`resolve` with the options it reads given one by one (for cached callers)."""
    return _resolve_cached(tag, vr.split(" or ")[0], patient_characteristics, clean_descriptors)


def resolve(tag: BaseTag | int, vr: str, options: DeidOptions) -> Action:
    """Return the action for a public (even-group) element.

    Parameters
    ----------
    tag
        Element tag.
    vr
        Value representation as read (``UN`` when unknown).
    options
        Profile options.

    Returns
    -------
    Action
        What to do with the element. Private elements, overlays and curves are handled by
        the dataset walker, not here.
    """
    return _resolve_cached(
        int(Tag(tag)),
        vr.split(" or ")[0],
        tuple(options.patient_characteristics),
        options.clean_descriptors,
    )

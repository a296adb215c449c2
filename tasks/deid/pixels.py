"""Burned-in annotation risk and Clean Pixel Data by configured rectangles.

Instances that may show text in their pixels (ultrasound, secondary capture and other
screenshot classes, documents, photographs, ``BurnedInAnnotation=YES``) are quarantined unless
a :class:`~tasks.deid.profile.PixelCleaningRule` covers them; a covering rule blanks its
rectangles in every frame (numpy) and the instance is rewritten uncompressed.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from tasks.deid.profile import PixelCleaningRule

#: Modalities whose images routinely carry burned-in text.
RISKY_MODALITIES = frozenset({"US", "IVUS", "XC", "ES", "GM", "SM", "DOC", "OP", "OPT", "ECG"})

#: SOP classes that are screenshots, documents, photographs or video.
RISKY_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
        "1.2.840.10008.5.1.4.1.1.104.2",  # Encapsulated CDA
        "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic
        "1.2.840.10008.5.1.4.1.1.77.1.2",  # VL Microscopic
        "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image (retired)
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
        "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame (retired)
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame
    }
)

#: ImageType / ConversionType values of screen captures and dose screens.
RISKY_IMAGE_TYPES = frozenset(
    {"SCREEN SAVE", "SCREENSHOT", "DOSE_INFO", "DOSE INFO", "SECONDARY CAPTURE"}
)
RISKY_CONVERSION_TYPES = frozenset({"WSD", "SI", "DRW"})


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip().upper() if value is not None else ""


def burned_in_risk(ds: Dataset) -> str:
    """Return why an instance may carry burned-in text, or ``""`` when it is not at risk.

    The reason is a short code (never a value from the header): ``burned-in-flag``,
    ``modality``, ``sop-class``, ``image-type`` or ``conversion-type``.
    """
    if _text(ds, "BurnedInAnnotation") == "YES":
        return "burned-in-flag"
    if _text(ds, "Modality") in RISKY_MODALITIES:
        return "modality"
    if str(ds.get("SOPClassUID", "")) in RISKY_SOP_CLASSES:
        return "sop-class"
    image_type = ds.get("ImageType")
    if image_type is not None:
        values = image_type if isinstance(image_type, (list, tuple)) else [image_type]
        values = [str(v) for v in values]
        if any(str(v).upper() in RISKY_IMAGE_TYPES for v in values):
            return "image-type"
    if _text(ds, "ConversionType") in RISKY_CONVERSION_TYPES:
        return "conversion-type"
    return ""


def matching_rule(ds: Dataset, rules: tuple[PixelCleaningRule, ...]) -> PixelCleaningRule | None:
    """Return the first rule that covers the instance, or None."""
    modality = _text(ds, "Modality")
    manufacturer = _text(ds, "Manufacturer")
    model = _text(ds, "ManufacturerModelName")
    sop_class = str(ds.get("SOPClassUID", ""))
    rows, columns = ds.get("Rows"), ds.get("Columns")
    for rule in rules:
        if rule.modality is not None and rule.modality.upper() != modality:
            continue
        if rule.manufacturer is not None and rule.manufacturer.upper() not in manufacturer:
            continue
        if rule.model is not None and rule.model.upper() not in model:
            continue
        if rule.sop_class_uid is not None and rule.sop_class_uid != sop_class:
            continue
        if rule.rows is not None and rule.rows != rows:
            continue
        if rule.columns is not None and rule.columns != columns:
            continue
        return rule
    return None


def blank_rectangles(ds: Dataset, rule: PixelCleaningRule) -> None:
    """Set the rule's rectangles to zero in every frame and store the pixels uncompressed.

    Raises
    ------
    ValueError
        When the instance has no pixel data or a rectangle lies outside the image.
    """
    if "PixelData" not in ds:
        raise ValueError("no pixel data to clean")
    pixels = ds.pixel_array.copy()
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    shaped = pixels.reshape((frames, rows, columns, samples))
    for x0, y0, x1, y1 in rule.rectangles:
        if not (0 <= x0 < x1 <= columns and 0 <= y0 < y1 <= rows):
            raise ValueError("cleaning rectangle outside the image")
        shaped[:, y0:y1, x0:x1, :] = 0
    if samples == 3 and "YBR" in str(ds.get("PhotometricInterpretation", "")):
        # pixel_array converted YBR to RGB; store what we hold.
        ds.PhotometricInterpretation = "RGB"
    ds.set_pixel_data(
        np.ascontiguousarray(pixels),
        str(ds.PhotometricInterpretation),
        int(ds.BitsStored),
        generate_instance_uid=False,
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.BurnedInAnnotation = "NO"


class PixelLayoutError(ValueError):
    """Native pixel data whose unused bits cannot be cleared safely (quarantine)."""


#: Encapsulated document SOP classes (PDF, CDA, STL, OBJ, MTL and any later 1.104.x).
DOCUMENT_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.104."
ENCAPSULATED_DOCUMENT = 0x00420011


def document_kind(sop_class: str, has_document: bool) -> str:
    """Return why an instance is an encapsulated document, or ``""`` when it is not.

    Parameters
    ----------
    sop_class
        SOPClassUID.
    has_document
        Whether the top level holds EncapsulatedDocument (0042,0011).

    Returns
    -------
    str
        ``"sop-class"`` or ``"encapsulated-document"`` (a code, never a value); ``""``.
    """
    if sop_class.startswith(DOCUMENT_SOP_PREFIX):
        return "sop-class"
    if has_document:
        return "encapsulated-document"
    return ""


def clear_unused_bits(
    raw: bytes,
    bits_allocated: int,
    bits_stored: int,
    high_bit: int,
    signed: bool,
    little_endian: bool = True,
) -> bytes | None:
    """Clear the bits of native pixel data outside BitsStored (where old overlays hide).

    Parameters
    ----------
    raw
        The native (uncompressed) PixelData value.
    bits_allocated, bits_stored, high_bit
        Image Pixel module values.
    signed
        PixelRepresentation is 1: the bits above HighBit must repeat the sign bit.
    little_endian
        Byte order of the data set.

    Returns
    -------
    bytes or None
        The cleaned value, or None when no unused bit was set (nothing to change).

    Raises
    ------
    PixelLayoutError
        When the pixel description is not one this handles (unused bits below the stored
        ones, an odd allocation): the caller quarantines the instance.
    """
    if bits_stored >= bits_allocated:
        return None
    if bits_allocated not in (8, 16, 32) or high_bit != bits_stored - 1 or bits_stored < 1:
        raise PixelLayoutError("unsupported pixel bit layout")
    size = bits_allocated // 8
    if len(raw) % size:
        raise PixelLayoutError("pixel data length")
    order = "<" if little_endian else ">"
    unsigned = np.frombuffer(raw, dtype=f"{order}u{size}")
    mask = (1 << bits_stored) - 1
    stored = unsigned & mask
    if signed:
        sign = 1 << (bits_stored - 1)
        full = (1 << bits_allocated) - 1
        expected = np.where(stored & sign, stored | (full ^ mask), stored).astype(unsigned.dtype)
    else:
        expected = stored
    if np.array_equal(expected, unsigned):
        return None
    return expected.astype(unsigned.dtype).tobytes()

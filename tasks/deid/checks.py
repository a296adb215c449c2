"""The checks made on an instance before its elements are walked, shared by both engines.

:func:`screen` decides, from the few top-level values it reads, whether an instance is
quarantined (DICOMDIR, missing UIDs, an encapsulated document, burned-in text without a
cleaning rule, an overlay stored in compressed pixel data) or needs its pixels cleaned by a
rule; :func:`age_at` derives the patient age kept by Retain Patient Characteristics.
:func:`inflate_bounded` inflates a deflated data set without ever holding more than the
configured number of bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import date

from pydicom.dataset import Dataset

from tasks.deid.pixels import (
    ENCAPSULATED_DOCUMENT,
    burned_in_risk,
    document_kind,
    matching_rule,
)
from tasks.deid.profile import DeidOptions, PixelCleaningRule

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DIRECTORY_RECORD_SEQUENCE = 0x00041220
MEGABYTE = 1 << 20


class TooLarge(ValueError):
    """Input that would exceed a configured size bound once inflated or decoded."""


@dataclass(frozen=True)
class Screened:
    """Outcome of :func:`screen`: a quarantine reason and detail, or a cleaning rule."""

    reason: str = ""
    detail: str = ""
    rule: PixelCleaningRule | None = None


def screen(
    ds: Dataset, tags: Collection[int], compressed: bool, options: DeidOptions
) -> Screened:
    """Check one instance before de-identification.

    Parameters
    ----------
    ds
        The instance (only SOP UIDs, Modality, ImageType, ConversionType, BurnedInAnnotation
        and the values pixel rules match on are read).
    tags
        The top-level tags present.
    compressed
        Whether PixelData is encapsulated (compressed).
    options
        Profile options (pixel cleaning rules).

    Returns
    -------
    Screened
        ``reason`` and ``detail`` when the instance is quarantined (details are codes, never
        values); else the pixel cleaning ``rule`` that applies, if any.
    """
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class == DICOMDIR_SOP_CLASS or DIRECTORY_RECORD_SEQUENCE in tags:
        return Screened("dicomdir", "DICOMDIR")
    if not ds.get("SOPInstanceUID") or not sop_class:
        return Screened("missing-uids", "no SOP instance or class UID")
    document = document_kind(sop_class, ENCAPSULATED_DOCUMENT in tags)
    if document:
        if sop_class not in options.document_classes:
            return Screened("encapsulated-document", f"encapsulated document ({document})")
        return Screened()  # a document class the site reviewed: no pixels to check
    rule = None
    risk = burned_in_risk(ds)
    if risk:
        rule = matching_rule(ds, options.pixel_rules)
        if rule is None:
            return Screened("burned-in-annotation", f"may carry burned-in text ({risk})")
    if compressed and overlay_in_pixels(tags):
        return Screened("overlay-in-pixel-data", "overlay bits in compressed pixel data")
    return Screened(rule=rule)


def overlay_in_pixels(tags: Collection[int]) -> bool:
    """Whether an overlay group is present without its own OverlayData (60xx,3000)."""
    groups = {tag >> 16 for tag in tags if 0x6000 <= tag >> 16 <= 0x601E and not tag >> 16 & 1}
    return any(((group << 16) | 0x3000) not in tags for group in groups)


def age_at(birth: str, study: str) -> str:
    """DICOM age string (``063Y``) from original DA values, or ``""``."""
    try:
        b = date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
        s = date(int(study[:4]), int(study[4:6]), int(study[6:8]))
    except (ValueError, TypeError, IndexError):
        return ""
    years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    return f"{years:03d}Y" if 0 <= years < 1000 else ""


def patient_age(ds: Dataset, options: DeidOptions) -> str:
    """Return the age kept with the series row: PatientAge, else from birth and study dates."""
    if "PatientAge" not in options.patient_characteristics:
        return ""
    return str(ds.get("PatientAge", "") or "") or age_at(
        str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
    )


def inflate_bounded(data: bytes, limit: int) -> bytes:
    """Inflate a raw deflate stream (PS3.5 A.5) holding at most ``limit`` bytes.

    Raises
    ------
    TooLarge
        When the inflated data would exceed ``limit`` bytes.
    zlib.error
        When the stream is corrupt.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = inflater.decompress(data, limit)
    if inflater.unconsumed_tail:
        raise TooLarge(f"inflated data set over {limit // MEGABYTE} MiB")
    out += inflater.flush()
    if not inflater.eof:
        raise zlib.error("incomplete or truncated stream")
    return out


def decoded_size(ds: Dataset) -> int:
    """Bytes of the decoded pixel data of an instance (from its Image Pixel description)."""
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    return rows * columns * frames * samples * max(bits, 8) // 8

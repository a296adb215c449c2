"""ROI masks as DICOM SEG (highdicom) for processing-ready (Tier 3) releases.

A series whose annotations came from an RTSTRUCT or a NIfTI mask has no DICOM SEG; when a cohort
ships DICOM, :func:`export_segs` writes one SEG per such series from its harmonised masks,
placed back on the de-identified DICOM grid (nearest neighbour), with one segment per ROI and
the attributes the EUCAIM handbook asks for: segment number, label, description, algorithm type
(the method: manual, semi-automatic, automatic) and, for algorithms, their identification.

The SEG takes its patient and study attributes from the de-identified images it references;
its UIDs are derived from the image series key (same input, same bytes) and its dates are the
images' shifted dates. It is written to ``deid/seg-export/<seg-series>/00000.dcm`` in the site
store and published, like a site's own SEG, beside the image series.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.dicom.uids import replace_generated_uids
from tasks.errors import OncoflowError

EXPORT_PREFIX = "deid/seg-export"
TUMOUR = ("gtv", "ctv", "ptv", "tumour", "tumor", "lesion", "nodule", "metastasis")
METHODS = ("manual", "semiautomatic", "automatic")


@dataclass(frozen=True)
class SegSettings:
    """How the masks were made (written into every segment)."""

    method: str = "manual"
    algorithm: str | None = None
    algorithm_version: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OncoflowError(f"annotation method must be one of {', '.join(METHODS)}")
        if self.method != "manual" and not self.algorithm:
            raise OncoflowError("a semi-automatic or automatic annotation needs its algorithm")


def derived_uid(*parts: str) -> str:
    """Derive a ``2.25`` UID from the parts (pseudonymous keys in, same UID out)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:15], 'big')}"


def reference_grid(datasets: Sequence[Any]) -> tuple[Any, list[Any]]:
    """Return the SimpleITK grid of a single-frame series and its slices in grid order."""
    import SimpleITK as sitk

    first = datasets[0]
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)

    def position(ds: Any) -> np.ndarray:
        return np.array([float(v) for v in ds.ImagePositionPatient])

    ordered = sorted(datasets, key=lambda d: float(np.dot(normal, position(d))))
    positions = [position(d) for d in ordered]
    dz = float(np.dot(positions[1] - positions[0], normal)) if len(ordered) > 1 else float(
        getattr(first, "SliceThickness", 1.0) or 1.0
    )
    spacing = [float(v) for v in first.PixelSpacing]
    grid = sitk.Image(int(first.Columns), int(first.Rows), len(ordered), sitk.sitkUInt8)
    grid.SetSpacing((spacing[1], spacing[0], dz))
    grid.SetOrigin(tuple(positions[0]))
    grid.SetDirection(tuple(np.column_stack([row, col, normal]).ravel()))
    return grid, ordered


def _codes(roi: str) -> tuple[Any, Any]:
    from pydicom.sr.codedict import codes

    if any(t in roi.lower() for t in TUMOUR):
        return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm
    return codes.SCT.AnatomicalStructure, codes.SCT.Organ


def build_seg(
    datasets: Sequence[Any],
    masks: dict[str, Any],
    settings: SegSettings,
    *,
    source: str,
    series_key: str,
) -> Any:
    """Build a BINARY DICOM SEG of an image series from masks in physical space.

    Parameters
    ----------
    datasets
        The de-identified single-frame image instances of the series.
    masks
        ROI name -> SimpleITK mask image (any grid; resampled with nearest neighbour).
    settings
        Annotation method and algorithm.
    source
        Where the masks came from (``RTSTRUCT``, ``NIfTI mask``), for the segment description.
    series_key
        Pseudonymous key of the image series (seeds the SEG's UIDs).

    Returns
    -------
    highdicom.seg.Segmentation
        One segment per non-empty ROI, numbered from 1 in ROI name order.

    Raises
    ------
    OncoflowError
        When no ROI has a voxel on the DICOM grid.
    """
    import highdicom as hd
    import SimpleITK as sitk
    from pydicom.sr.codedict import codes

    grid, ordered = reference_grid(datasets)
    arrays, labels = [], []
    for roi in sorted(masks):
        placed = sitk.Resample(masks[roi], grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        array = sitk.GetArrayFromImage(placed) > 0
        if array.any():
            arrays.append(array)
            labels.append(roi)
    if not arrays:
        raise OncoflowError(f"series {series_key}: no ROI has a voxel on the DICOM grid")
    algorithm_type = {
        "manual": hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        "semiautomatic": hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
        "automatic": hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
    }[settings.method]
    identification = None
    if settings.algorithm:
        identification = hd.AlgorithmIdentificationSequence(
            name=settings.algorithm,
            version=settings.algorithm_version or "unknown",
            family=codes.cid7162.ArtificialIntelligence,
        )
    descriptions = []
    for number, roi in enumerate(labels, start=1):
        category, kind = _codes(roi)
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=roi,
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=algorithm_type,
            algorithm_identification=identification,
            tracking_id=f"{roi}",
            tracking_uid=derived_uid(series_key, "seg-tracking", roi),
        )
        desc.SegmentDescription = f"{roi} ({settings.method}, from {source})"
        descriptions.append(desc)
    seg_series = derived_uid(series_key, "seg-export", *labels)
    sop_uid = derived_uid(seg_series, "instance")
    with warnings.catch_warnings():
        # a de-identified PatientName is the one-component pseudonym: expected, not a mistake
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
        seg = _segmentation(hd, ordered, arrays, descriptions, seg_series, sop_uid)
    _deterministic(seg, sop_uid, ordered[0])
    _plain(seg)
    return seg


def _segmentation(
    hd: Any,
    ordered: list[Any],
    arrays: list[np.ndarray],
    descriptions: list[Any],
    seg_series: str,
    sop_uid: str,
) -> Any:
    return hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=np.stack(arrays, axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=seg_series,
        series_number=9000,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="oncoflow",
        manufacturer_model_name="oncoflow",
        software_versions="oncoflow",
        device_serial_number="0",
        content_label="ROI",
    )


def _plain(seg: Any) -> None:
    """Leave out what the leak gate treats as free text or equipment identity.

    Content description and dimension labels are free text the de-identification profile
    cleans; the contributing equipment names highdicom; the device serial number is emptied
    as the profile does for the site's own SEG.
    """
    seg.ContentDescription = ""
    seg.DeviceSerialNumber = ""
    if "ContributingEquipmentSequence" in seg:
        del seg.ContributingEquipmentSequence
    for item in seg.get("DimensionIndexSequence", []):
        if "DimensionDescriptionLabel" in item:
            del item.DimensionDescriptionLabel


def _deterministic(seg: Any, seed: str, image: Any) -> None:
    """Replace random UIDs and wall-clock dates by derived UIDs and the images' dates."""
    replace_generated_uids(seg, lambda n: derived_uid(seed, "hd", str(n)))
    date = str(getattr(image, "SeriesDate", "") or getattr(image, "StudyDate", "") or "")
    seg.ContentDate = seg.SeriesDate = seg.InstanceCreationDate = date
    seg.ContentTime = seg.SeriesTime = seg.InstanceCreationTime = "000000"
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{date}000000"


def seg_bytes(seg: Any) -> bytes:
    """Serialise a SEG instance."""
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def export_segs(
    store: Any, rows: list[dict[str, Any]], sources: dict[str, list[str]], settings: SegSettings
) -> dict[str, tuple[str, str]]:
    """Write a SEG for every published series that has masks and DICOM but no SEG.

    Parameters
    ----------
    store
        The site store.
    rows
        Harmonised rows of the series to export (``series``, ``rois``, ``masks`` store keys).
    sources
        Series key -> store keys of its de-identified DICOM instances.
    settings
        Annotation method and algorithm.

    Returns
    -------
    dict
        Series key -> (SEG series key, store key of the SEG instance).
    """
    import pydicom

    from tasks.harmonise.masks import read_nifti

    out = {}
    for row in rows:
        series = row["series"]
        pairs = zip(row["rois"] or [], row["masks"] or [], strict=False)
        masks = {roi: read_nifti(store.read_bytes(key)) for roi, key in pairs}
        if not masks or not sources.get(series):
            continue
        datasets = [pydicom.dcmread(io.BytesIO(store.read_bytes(k))) for k in sources[series]]
        seg = build_seg(datasets, masks, settings, source=row.get("mask_source") or "ROI masks",
                        series_key=series)  # fmt: skip
        key = f"{EXPORT_PREFIX}/{seg.SeriesInstanceUID}/00000.dcm"
        store.write_bytes(key, seg_bytes(seg))
        out[series] = (str(seg.SeriesInstanceUID), key)
    return out

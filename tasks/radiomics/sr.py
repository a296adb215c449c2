"""DICOM SR (TID 1500 Imaging Measurement Report) of the features of one (series, ROI).

Built with highdicom (``Comprehensive3DSR`` + ``MeasurementReport``), the way the Imaging Data
Commons publishes pyradiomics features:

* one measurement group per image type of the features table (``original``,
  ``log-sigma-1-0-mm-3D``, ``wavelet-LLH``, ...), referencing the segment of the de-identified
  DICOM SEG the ROI mask was built from and, through it, the de-identified image series; the
  group's method is the filter's IBSI code where IBSI defines one (``L6PA`` LoG, ``25BO``
  wavelets) and its algorithm identification names pyradiomics, its version and the parameter
  hash;
* one measurement per feature, coded ``(IBSI id, "IBSI", IBSI name)`` where IBSI defines the
  feature (see :mod:`tasks.radiomics.ibsi`), otherwise ``(hash, "99PYRADIOMICS", class_name)``
  as pyradiomics' own ``labs/pyradiomics-dcm`` converter codes it, with its UCUM unit.

Patient and study attributes come from the de-identified SEG and image headers (pseudonyms,
shifted dates); UIDs of the report are derived from pseudonymous keys and the parameter hash, so
the same table gives byte-identical reports. A ROI whose mask does not come from a DICOM SEG
(RTSTRUCT, NIfTI) has nothing a TID 1500 group can reference when the extract stage runs: its
report is written at publish, by :func:`write_exported_reports`, referencing the DICOM SEG the
publication exports from the masks (:mod:`tasks.cohort.seg_export`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from tasks.radiomics.cache import PYRADIOMICS_VERSION
from tasks.radiomics.ibsi import (
    FEATURE_COLUMN,
    IBSI_SCHEME,
    PRIVATE_SCHEME,
    describe_column,
    load_table,
    private_code_value,
)
from tasks.store import DEID_SERIES, FEATURES, HARMONISED, SiteStore

if TYPE_CHECKING:  # highdicom and pydicom load when a report is built (none on most reruns)
    import highdicom as hd
    from pydicom.dataset import Dataset

SR_SERIES_NUMBER = 9100
#: Header bytes read per DICOM file (patient, study and SOP attributes come first).
HEADER_BLOCK = 1 << 16

UNITS = {
    "mm3": ("mm3", "cubic millimeter"),
    "mm2": ("mm2", "square millimeter"),
    "mm": ("mm", "millimeter"),
    "/mm": ("/mm", "per millimeter"),
    "1": ("1", "no units"),
}
#: Intensity unit of an unfiltered image, by modality (UCUM); others are arbitrary ("1").
INTENSITY_UNITS = {
    "CT": ("[hnsf'U]", "Hounsfield unit"),
    "PT": ("{SUVbw}g/ml", "Standardized Uptake Value body weight"),
}


def reports_prefix(params_hash: str) -> str:
    """Store prefix of the reports of one features table: ``features/<params-hash>.sr``."""
    return f"{FEATURES}/{params_hash}.sr"


def report_key(params_hash: str, series: str, roi: str) -> str:
    """Store key of the report of one (series, ROI)."""
    return f"{reports_prefix(params_hash)}/{series}/{roi}.dcm"


def derived_uid(*parts: str) -> str:
    """Return a ``2.25.<int>`` UID from a hash of pseudonymous parts (deterministic)."""
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def params_label(params_hash: str) -> str:
    """Return the parameter hash as report text: ``parameters sha256 126d 4b62 ...``.

    Grouped by four so that no run of digits in a hex hash looks like an identifier to the leak
    gate's text patterns; remove the spaces to compare with the table's ``params_hash``.
    """
    groups = " ".join(params_hash[i : i + 4] for i in range(0, len(params_hash), 4))
    return f"parameters sha256 {groups}"


def unit_code(token: str, modality: str, image_type: str) -> hd.sr.CodedConcept:
    """UCUM unit of a feature from its unit token (see the IBSI table), modality and filter."""
    import highdicom as hd

    if token in UNITS:
        value, meaning = UNITS[token]
        return hd.sr.CodedConcept(value, "UCUM", meaning)
    base = INTENSITY_UNITS.get(modality.upper()) if image_type == "Original" else None
    if base is None:
        if token == "I2.mm3":
            return hd.sr.CodedConcept("mm3", "UCUM", "cubic millimeter")
        return hd.sr.CodedConcept("1", "UCUM", "no units")
    value, meaning = base
    if token == "I":
        return hd.sr.CodedConcept(value, "UCUM", meaning)
    if token == "I2":
        return hd.sr.CodedConcept(f"({value})2", "UCUM", f"{meaning} squared")
    return hd.sr.CodedConcept(f"({value})2.mm3", "UCUM", f"{meaning} squared cubic millimeter")


def feature_code(column: str, used: set[str]) -> tuple[hd.sr.CodedConcept, str]:
    """Concept name of a feature column and the image type it belongs to.

    An IBSI identifier already used in the same group (a deprecated pyradiomics duplicate such
    as ``Homogeneity1`` beside ``Id``) falls back to the private code, so names stay unique.
    """
    import highdicom as hd

    described = describe_column(column)
    assert described is not None
    meaning = f"{described.feature_class}_{described.feature}"
    if described.ibsi and described.ibsi not in used:
        assert described.entry is not None
        used.add(described.ibsi)
        return (
            hd.sr.CodedConcept(described.ibsi, IBSI_SCHEME, described.entry.ibsi_name),
            described.image_type,
        )
    return (
        hd.sr.CodedConcept(private_code_value(meaning), PRIVATE_SCHEME, meaning),
        described.image_type,
    )


@dataclass(frozen=True)
class SegmentRef:
    """Where the mask of one ROI came from: a segment of a de-identified DICOM SEG."""

    seg_key: str
    segment_numbers: tuple[int, ...]


def segment_of(store: SiteStore, series: str, roi: str) -> SegmentRef | None:
    """Find the DICOM SEG and segment numbers the harmonised mask of ``roi`` was built from.

    Reads ``harmonised/<series>/provenance.json`` (step ``seg-masks``); None when the mask came
    from an RTSTRUCT or a NIfTI file.
    """
    try:
        prov = json.loads(store.read_bytes(f"{HARMONISED}/{series}/provenance.json"))
    except FileNotFoundError:
        return None
    kept = None
    for step in prov.get("steps", []):
        if step.get("name") == "select-masks":
            kept = step.get("parameters", {}).get("kept")
    for step in prov.get("steps", []):
        if step.get("name") != "seg-masks":
            continue
        rois = step.get("parameters", {}).get("rois", {})
        if roi in rois and (kept is None or roi in kept):
            inputs = list(step.get("inputs", {}))
            numbers = rois[roi].get("segment_numbers") or []
            if len(inputs) == 1 and numbers:
                return SegmentRef(inputs[0], tuple(int(n) for n in numbers))
    return None


#: Attributes of a de-identified header a report may carry (everything else is dropped).
SAFE_EVIDENCE = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "PatientID",
    "PatientSex",
    "StudyDate",
    "StudyTime",
)
#: Patient and study attributes highdicom reads from the evidence: present, but empty.
EMPTY_EVIDENCE = ("PatientBirthDate", "AccessionNumber", "StudyID", "ReferringPhysicianName")


def safe_evidence(ds: Dataset) -> Dataset:
    """Keep only the allow-listed attributes of a de-identified header.

    The pseudonymous patient key doubles as the patient name; the report copies nothing else.
    """
    from pydicom.dataset import Dataset

    out = Dataset()
    for keyword in SAFE_EVIDENCE:
        if keyword in ds:
            setattr(out, keyword, ds.data_element(keyword).value)
    out.PatientName = str(ds.get("PatientID", "") or "")
    for keyword in EMPTY_EVIDENCE:
        setattr(out, keyword, None)
    out.SpecificCharacterSet = "ISO_IR 192"
    return out


def read_header(store: SiteStore, key: str) -> Dataset:
    """Read a DICOM file's attributes without its pixel data."""
    import pydicom

    with store.open(key, block_size=HEADER_BLOCK) as fh:
        return pydicom.dcmread(fh, stop_before_pixels=True)


@dataclass(frozen=True)
class ReportOutcome:
    """One (series, ROI) report: written, unchanged, or skipped with a reason."""

    series: str
    roi: str
    status: str
    key: str = ""
    reason: str = ""


def build_report(
    *,
    row: dict[str, Any],
    columns: list[str],
    params_hash: str,
    seg: Dataset,
    segment_numbers: tuple[int, ...],
    images: list[Dataset],
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report of one features-table row.

    Parameters
    ----------
    row
        The row (key columns and feature values).
    columns
        Feature columns in table order.
    params_hash
        Parameter hash of the table.
    seg
        Header of the de-identified DICOM SEG of the ROI.
    segment_numbers
        Its segments the mask was built from (the first is referenced).
    images
        Headers of the de-identified image series (evidence).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The report.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    series, roi, modality = row["series"], row["roi"], row.get("modality") or ""
    groups: dict[str, list[hd.sr.Measurement]] = {}
    used: dict[str, set[str]] = {}
    prefixes: dict[str, str] = {}
    for column in columns:
        value = row.get(column)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        prefix = column.split("_", 1)[0]
        name, image_type = feature_code(column, used.setdefault(prefix, set()))
        prefixes[prefix] = image_type
        entry = load_table().features.get(tuple(column.split("_", 2)[1:]))  # type: ignore[arg-type]
        groups.setdefault(prefix, []).append(
            hd.sr.Measurement(
                name=name,
                value=float(value),
                unit=unit_code(entry.unit if entry else "1", modality, image_type),
            )
        )
    referenced = hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=segment_numbers[0],
        source_series=hd.sr.SourceSeriesForSegmentation(series),
    )
    filters = load_table().filters
    measurement_groups = []
    for prefix, measurements in groups.items():
        image_type = prefixes[prefix]
        filter_entry = filters.get(image_type)
        method = None
        if filter_entry is not None and filter_entry.ibsi:
            method = hd.sr.CodedConcept(filter_entry.ibsi, IBSI_SCHEME, filter_entry.ibsi_name)
        measurement_groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid("sr-group", params_hash, series, roi, prefix),
                    identifier=f"{roi} {prefix}",
                ),
                referenced_segment=referenced,
                method=method,
                algorithm_id=hd.sr.AlgorithmIdentification(
                    name="pyradiomics",
                    version=PYRADIOMICS_VERSION,
                    parameters=[params_label(params_hash), f"image type {prefix}"],
                ),
                measurements=measurements,
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("oncoflow-device"), name="oncoflow", model_name="pyradiomics"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("P0-0099A", "SRT", "Imaging procedure"),
        imaging_measurements=measurement_groups,
    )
    with warnings.catch_warnings():
        # the pseudonymous patient key is the patient name, deliberately a single component
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
        sr = _report_object(report, seg, images, params_hash, series, roi)
    _stamp(sr, seg)
    return sr


def _report_object(
    report: hd.sr.MeasurementReport,
    seg: Dataset,
    images: list[Dataset],
    params_hash: str,
    series: str,
    roi: str,
) -> hd.sr.Comprehensive3DSR:
    import highdicom as hd

    sr = hd.sr.Comprehensive3DSR(
        evidence=[safe_evidence(ds) for ds in (seg, *images)],
        content=report[0],
        series_instance_uid=derived_uid("sr-series", params_hash, series),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid("sr", params_hash, series, roi),
        instance_number=1,
        manufacturer="oncoflow",
        is_complete=True,
    )
    # highdicom records the evidence's acquisition equipment, of which nothing is kept here
    if "ContributingEquipmentSequence" in sr:
        del sr.ContributingEquipmentSequence
    sr.PatientIdentityRemoved = "YES"
    sr.DeidentificationMethod = "oncoflow: built from de-identified objects only"
    return sr


def _stamp(sr: Dataset, seg: Dataset) -> None:
    """Replace the creation dates and times highdicom stamps with the SEG's (shifted) ones."""
    date = str(seg.get("ContentDate") or seg.get("SeriesDate") or seg.get("StudyDate") or "")
    time = str(seg.get("ContentTime") or seg.get("SeriesTime") or seg.get("StudyTime") or "")
    for elem in sr.iterall():
        if elem.keyword in ("ObservationDateTime",) or elem.VR == "DT":
            elem.value = f"{date}{time}" if date else None
        elif elem.VR == "DA" and elem.keyword not in ("StudyDate", "PatientBirthDate"):
            elem.value = date or None
        elif elem.VR == "TM" and elem.keyword != "StudyTime":
            elem.value = time or None


def sr_bytes(sr: Dataset) -> bytes:
    """Encode a report as a DICOM file."""
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_reports(
    store: SiteStore,
    table: pa.Table,
    params_hash: str,
    removed: Iterable[tuple[str, str]] | None = None,
) -> list[ReportOutcome]:
    """Write the TID 1500 report of every ``ok`` row of a features table, or of its changed rows.

    Reports of rows no longer in the table are removed. A row whose mask did not come from a
    DICOM SEG, or whose SEG or image series is missing from ``deid/``, is skipped with a reason;
    the report a publication wrote for such a row (:func:`write_exported_reports`) is kept.

    Parameters
    ----------
    store
        The site store.
    table
        The features table (as written by the extract stage), or with ``removed`` only the
        rows a run added or changed.
    params_hash
        Its parameter hash.
    removed
        (series, ROI) of the rows that left the table: given, ``table`` holds the changed rows
        only and the reports of other rows are left as they are.

    Returns
    -------
    list of ReportOutcome
        One per ``ok`` row, in table order.
    """
    columns = [c for c in table.column_names if FEATURE_COLUMN.match(c)]
    deid = store.read_table(DEID_SERIES)
    paths: dict[str, list[str]] = {}
    if deid is not None and "paths" in deid.column_names:
        paths = {
            r["series"]: r["paths"] or [] for r in deid.select(["series", "paths"]).to_pylist()
        }
    headers: dict[str, list[Dataset]] = {}
    outcomes: list[ReportOutcome] = []
    exported: set[str] = set()
    for row in table.to_pylist():
        if row.get("status") not in (None, "ok"):
            continue
        series, roi = row["series"], row["roi"]
        ref = segment_of(store, series, roi)
        if ref is None:
            outcomes.append(ReportOutcome(series, roi, "skipped", reason="no-dicom-segmentation"))
            exported.add(report_key(params_hash, series, roi))
            continue
        if series not in paths or not store.exists(ref.seg_key):
            outcomes.append(ReportOutcome(series, roi, "skipped", reason="missing-dicom"))
            continue
        outcomes.append(
            _write_report(store, row, columns, params_hash, ref, paths[series], headers)
        )
    if removed is None:
        store.prune(reports_prefix(params_hash), exported | {o.key for o in outcomes if o.key})
        return outcomes
    written = {(o.series, o.roi) for o in outcomes if o.key}
    exported_rows = {(o.series, o.roi) for o in outcomes if o.reason == "no-dicom-segmentation"}
    keys = zip(table["series"].to_pylist(), table["roi"].to_pylist(), strict=True)
    stale = set(removed) | set(keys)
    for series, roi in sorted(stale - written - exported_rows):
        store.remove(report_key(params_hash, series, roi))
    return outcomes


def _write_report(
    store: SiteStore,
    row: dict[str, Any],
    columns: list[str],
    params_hash: str,
    ref: SegmentRef,
    image_keys: list[str],
    headers: dict[str, list[Dataset]],
) -> ReportOutcome:
    """Build and write the report of one row (``headers`` caches image headers by series)."""
    series, roi = row["series"], row["roi"]
    key = report_key(params_hash, series, roi)
    try:
        if series not in headers:
            headers[series] = [read_header(store, k) for k in image_keys]
        sr = build_report(
            row=row,
            columns=columns,
            params_hash=params_hash,
            seg=read_header(store, ref.seg_key),
            segment_numbers=ref.segment_numbers,
            images=headers[series],
        )
        written = store.write_bytes(key, sr_bytes(sr))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        # one unreadable header or an object highdicom refuses: report it, go on
        return ReportOutcome(series, roi, "failed", reason=type(exc).__name__)
    return ReportOutcome(series, roi, "written" if written else "unchanged", key)


@dataclass(frozen=True)
class ExportedSeg:
    """A DICOM SEG a publication made from the masks of one series.

    Parameters
    ----------
    seg_key
        Store key of the SEG instance (one segment per ROI, labelled with the ROI name).
    image_keys
        Store keys of the de-identified image instances it references.
    """

    seg_key: str
    image_keys: tuple[str, ...]


def write_exported_reports(
    store: SiteStore, features: pa.Table, params_hash: str, exported: Mapping[str, ExportedSeg]
) -> list[ReportOutcome]:
    """Write the reports of ROIs whose mask became a DICOM SEG at publish.

    The report of each ``ok`` row of an exported series references the segment labelled with
    the row's ROI and, through it, the image series; it is written where the extract stage
    writes its reports (:func:`report_key`), so the same inputs leave the store unchanged.

    Parameters
    ----------
    store
        The site store.
    features
        Feature rows to report (``series``, ``roi``, ``modality`` and feature columns), such as
        the published features table.
    params_hash
        Parameter hash of the features.
    exported
        Series key -> the SEG made from its masks.

    Returns
    -------
    list of ReportOutcome
        One per row of an exported series, in table order; ``skipped`` with reason
        ``not-in-seg`` for a ROI the SEG has no segment for (no voxel on the DICOM grid).
    """
    columns = [c for c in features.column_names if FEATURE_COLUMN.match(c)]
    headers: dict[str, list[Dataset]] = {}
    segments: dict[str, dict[str, int]] = {}
    outcomes: list[ReportOutcome] = []
    for row in features.to_pylist():
        series, roi = row["series"], row["roi"]
        if series not in exported or row.get("status") not in (None, "ok"):
            continue
        seg = exported[series]
        if series not in segments:
            items = read_header(store, seg.seg_key).get("SegmentSequence", [])
            segments[series] = {str(i.SegmentLabel): int(i.SegmentNumber) for i in items}
        if roi not in segments[series]:
            outcomes.append(ReportOutcome(series, roi, "skipped", reason="not-in-seg"))
            continue
        ref = SegmentRef(seg.seg_key, (segments[series][roi],))
        outcomes.append(
            _write_report(store, row, columns, params_hash, ref, list(seg.image_keys), headers)
        )
    return outcomes

"""Grouping catalogued instances into series and validating their geometry.

Runs on the merged catalogue rows (``catalog/instances.parquet``), so the outcome depends only
on the rows, never on batch boundaries or worker count.

* Duplicate instances (same SOP Instance UID in several files): the first file by path is kept,
  the others are quarantined as ``duplicate-instance``.
* Localizers (``LOCALIZER`` in Image Type) are split out of their series into
  ``<uid>:localizer`` and quarantined as ``localizer``.
* Image series: same rows/columns, orientation and pixel spacing in every slice; positions
  projected on the slice normal (the cross product of the ImageOrientationPatient direction
  cosines), sorted, then the gaps checked: equal within tolerance (``ok``), some gaps an integer
  multiple of the usual one (``missing-slice``), two slices at one position
  (``duplicate-position``), anything else (``inconsistent-spacing``).
* Enhanced multi-frame instances get the same spacing check over their per-frame positions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.dicom.listing import STATUS_OK, STATUS_QUARANTINED
from tasks.records import Kind, QuarantineRecord, Reason, Stage

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
LOCALIZER_SUFFIX = ":localizer"

#: Reasons decided when series are built (recomputed on every merge, unlike parse reasons).
DERIVED_REASONS = frozenset({str(Reason.DUPLICATE_INSTANCE), str(Reason.LOCALIZER)})

#: Two positions closer than this (mm) along the normal are the same position.
SAME_POSITION_MM = 1e-3
#: Smallest spacing tolerance (mm), whatever the relative tolerance.
MIN_TOLERANCE_MM = 0.01
#: Orientation cosines equal within this.
ORIENTATION_TOLERANCE = 1e-4
#: Missing slices are reported when at most this fraction of the gaps are multiples.
MAX_GAP_FRACTION = 0.25

_FLOATS = pa.list_(pa.float64())

#: Schema of ``catalog/series.parquet`` (docs/tables.md).
SERIES_SCHEMA = pa.schema(
    [
        ("series_key", pa.string()),
        ("series_instance_uid", pa.string()),
        ("study_instance_uid", pa.string()),
        ("patient_id", pa.string()),
        ("frame_of_reference_uid", pa.string()),
        ("modality", pa.string()),
        ("sop_class_uid", pa.string()),
        ("manufacturer", pa.string()),
        ("body_part_examined", pa.string()),
        ("study_date", pa.string()),
        ("kind", pa.string()),
        ("n_instances", pa.int64()),
        ("n_frames", pa.int64()),
        ("rows", pa.int64()),
        ("columns", pa.int64()),
        ("pixel_spacing", _FLOATS),
        ("slice_spacing", pa.float64()),
        ("image_orientation", _FLOATS),
        ("paths", pa.list_(pa.string())),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class SpacingCheck:
    """Outcome of a slice-spacing check.

    Parameters
    ----------
    reason
        Empty when consistent, else a reason code.
    detail
        Short explanation (distances in mm only).
    spacing
        Measured spacing along the normal (None for fewer than two positions).
    """

    reason: str = ""
    detail: str = ""
    spacing: float | None = None


@dataclass
class SeriesBuild:
    """What :func:`build_series` returns.

    Attributes
    ----------
    instances
        The input rows, with duplicate and localizer files marked quarantined.
    series
        One row per series (schema :data:`SERIES_SCHEMA`), sorted by key.
    quarantine
        Quarantine records of files and series.
    """

    instances: list[dict[str, Any]]
    series: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[QuarantineRecord] = field(default_factory=list)


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Return the unit normal of a slice from its ImageOrientationPatient (row x column)."""
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm == 0.0 or not np.isfinite(norm):
        raise ValueError("degenerate orientation")
    return normal / norm


def slice_offsets(positions: Sequence[Sequence[float]], orientation: Sequence[float]) -> np.ndarray:
    """Project ImagePositionPatient values on the slice normal (mm along the normal)."""
    return np.asarray(positions, dtype=float) @ slice_normal(orientation)


def check_spacing(offsets: Iterable[float], tolerance: float) -> SpacingCheck:
    """Check the gaps between sorted slice offsets.

    Parameters
    ----------
    offsets
        Positions along the slice normal (any order).
    tolerance
        Allowed deviation from the median gap, as a fraction of it (at least 0.01 mm).

    Returns
    -------
    SpacingCheck
        ``ok`` (empty reason) with the mean spacing, or the reason and a short detail.
    """
    ordered = np.sort(np.asarray(list(offsets), dtype=float))
    if ordered.size < 2:
        return SpacingCheck()
    gaps = np.diff(ordered)
    same = int(np.count_nonzero(gaps <= SAME_POSITION_MM))
    if same:
        return SpacingCheck(
            str(Reason.DUPLICATE_POSITION), f"{same} slice(s) share a position with another"
        )
    usual = float(np.median(gaps))
    tol = max(tolerance * usual, MIN_TOLERANCE_MM)
    deviant = np.abs(gaps - usual) > tol
    if not deviant.any():
        spacing = float((ordered[-1] - ordered[0]) / (ordered.size - 1))
        return SpacingCheck(spacing=round(spacing, 6))
    odd = gaps[deviant]
    multiples = np.rint(odd / usual)
    is_multiple = (multiples >= 2) & (np.abs(odd - multiples * usual) <= tol)
    if is_multiple.all() and odd.size <= max(1, int(MAX_GAP_FRACTION * gaps.size)):
        missing = int((multiples - 1).sum())
        return SpacingCheck(
            str(Reason.MISSING_SLICE),
            f"{missing} slice(s) missing in {odd.size} gap(s) of a {usual:g} mm series",
            spacing=round(usual, 6),
        )
    return SpacingCheck(
        str(Reason.INCONSISTENT_SPACING),
        f"gaps from {gaps.min():.3g} to {gaps.max():.3g} mm (median {usual:.3g} mm)",
        spacing=round(usual, 6),
    )


def _is_localizer(row: dict[str, Any]) -> bool:
    image_type = row.get("image_type") or ""
    return "LOCALIZER" in (part.strip().upper() for part in image_type.split("\\"))


def _kind(rows: Sequence[dict[str, Any]]) -> str:
    sop = rows[0].get("sop_class_uid") or ""
    if sop == RTSTRUCT_SOP_CLASS:
        return "rtstruct"
    if sop == SEG_SOP_CLASS:
        return "seg"
    if sop.startswith(SECONDARY_CAPTURE_PREFIX):
        return "secondary"
    if any((r.get("number_of_frames") or 1) > 1 for r in rows):
        return "multiframe"
    if any(r.get("rows") for r in rows):
        return "image"
    return "other"


def _instance_order(row: dict[str, Any]) -> tuple[int, str]:
    number = row.get("instance_number")
    return (number if number is not None else 2**62, row["path"])


def _same(values: list[Any], tol: float) -> bool:
    """Whether equal-length number lists all match the first within ``tol``."""
    if len({len(v) for v in values}) > 1:
        return False
    array = np.asarray(values, dtype=float)
    return bool(np.all(np.abs(array - array[0]) <= tol))


def _image_geometry(
    rows: list[dict[str, Any]], tolerance: float
) -> tuple[list[dict[str, Any]], SpacingCheck]:
    """Order single-frame image rows along the normal and check their geometry."""
    if len({(r.get("rows"), r.get("columns")) for r in rows}) > 1:
        check = SpacingCheck(
            str(Reason.INCONSISTENT_GEOMETRY), "image size differs between instances"
        )
        return sorted(rows, key=_instance_order), check
    with_geometry = [r for r in rows if r.get("image_position") and r.get("image_orientation")]
    if not with_geometry:
        return sorted(rows, key=_instance_order), SpacingCheck()
    if len(with_geometry) != len(rows):
        check = SpacingCheck(
            str(Reason.INCONSISTENT_GEOMETRY), "some instances lack position or orientation"
        )
        return sorted(rows, key=_instance_order), check
    orientations = [r["image_orientation"] for r in rows]
    if not _same(orientations, ORIENTATION_TOLERANCE):
        check = SpacingCheck(
            str(Reason.INCONSISTENT_ORIENTATION), "orientation differs between instances"
        )
        return sorted(rows, key=_instance_order), check
    spacings = [r.get("pixel_spacing") for r in rows]
    if any(s is None for s in spacings) != all(s is None for s in spacings) or (
        spacings[0] is not None and not _same(spacings, 1e-3 * max(spacings[0]))
    ):
        check = SpacingCheck(
            str(Reason.INCONSISTENT_GEOMETRY), "pixel spacing differs between instances"
        )
        return sorted(rows, key=_instance_order), check
    try:
        offsets = slice_offsets([r["image_position"] for r in rows], orientations[0])
    except ValueError:
        check = SpacingCheck(str(Reason.INCONSISTENT_GEOMETRY), "degenerate orientation")
        return sorted(rows, key=_instance_order), check
    order = sorted(range(len(rows)), key=lambda i: (float(offsets[i]), rows[i]["path"]))
    return [rows[i] for i in order], check_spacing(offsets, tolerance)


def _multiframe_geometry(rows: list[dict[str, Any]], tolerance: float) -> SpacingCheck:
    """Check the per-frame positions of each multi-frame instance (distinct positions only)."""
    result = SpacingCheck()
    for row in rows:
        positions = row.get("frame_positions")
        orientation = row.get("image_orientation")
        if not positions or not orientation:
            continue
        try:
            offsets = slice_offsets(positions, orientation)
        except ValueError:
            return SpacingCheck(str(Reason.INCONSISTENT_GEOMETRY), "degenerate orientation")
        distinct = np.unique(np.round(offsets / SAME_POSITION_MM).astype(np.int64))
        check = check_spacing(distinct * SAME_POSITION_MM, tolerance)
        if check.reason:
            return check
        result = check
    return result


def _series_row(
    key: str, rows: list[dict[str, Any]], kind: str, check: SpacingCheck
) -> dict[str, Any]:
    first = rows[0]
    status = STATUS_QUARANTINED if check.reason else STATUS_OK
    return {
        "series_key": key,
        "series_instance_uid": first.get("series_instance_uid"),
        "study_instance_uid": first.get("study_instance_uid"),
        "patient_id": first.get("patient_id"),
        "frame_of_reference_uid": first.get("frame_of_reference_uid"),
        "modality": first.get("modality"),
        "sop_class_uid": first.get("sop_class_uid"),
        "manufacturer": first.get("manufacturer"),
        "body_part_examined": first.get("body_part_examined"),
        "study_date": first.get("study_date"),
        "kind": kind,
        "n_instances": len(rows),
        "n_frames": sum(max(r.get("number_of_frames") or 1, 1) for r in rows),
        "rows": first.get("rows"),
        "columns": first.get("columns"),
        "pixel_spacing": first.get("pixel_spacing"),
        "slice_spacing": check.spacing,
        "image_orientation": first.get("image_orientation"),
        "paths": [r["path"] for r in rows],
        "status": status,
        "reason": check.reason,
        "detail": check.detail,
    }


#: Detail of a duplicate-instance quarantine row.
DUPLICATE_DETAIL = "same SOP Instance UID as another file"


def mark_duplicates(rows: list[dict[str, Any]]) -> None:
    """Quarantine every file whose SOP Instance UID was seen in a file earlier by path."""
    seen: set[str] = set()
    for row in sorted(rows, key=lambda r: r["path"]):
        if row["status"] != STATUS_OK:
            continue
        uid = row.get("sop_instance_uid")
        if not uid:
            continue
        if uid in seen:
            row.update(
                status=STATUS_QUARANTINED,
                reason=str(Reason.DUPLICATE_INSTANCE),
                detail=DUPLICATE_DETAIL,
            )
        else:
            seen.add(uid)


def build_series(
    rows: Iterable[dict[str, Any]], tolerance: float = 0.01, *, duplicates_marked: bool = False
) -> SeriesBuild:
    """Group catalogue rows into series, validate them, and collect quarantine records.

    Parameters
    ----------
    rows
        Catalogue rows (any order). Rows with a derived reason (duplicate, localizer) from a
        previous merge are re-evaluated; parse outcomes are kept.
    tolerance
        Allowed slice-gap deviation as a fraction of the median gap.
    duplicates_marked
        The rows' duplicate-instance marks were set over a larger set of rows (the catalogue
        merge does it in DuckDB): keep them instead of re-evaluating them among ``rows``.

    Returns
    -------
    SeriesBuild
        Updated instance rows (sorted by path), series rows and quarantine records.
    """
    instances = [dict(r) for r in rows]
    derived = {str(Reason.LOCALIZER)} if duplicates_marked else DERIVED_REASONS
    for row in instances:
        if row["status"] == STATUS_QUARANTINED and row.get("reason") in derived:
            row.update(status=STATUS_OK, reason="", detail="")
    instances.sort(key=lambda r: r["path"])
    if not duplicates_marked:
        mark_duplicates(instances)

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in instances:
        if row["status"] == STATUS_OK:
            groups[row["series_instance_uid"]].append(row)

    series: list[dict[str, Any]] = []
    for uid, members in groups.items():
        scouts = [r for r in members if _is_localizer(r)]
        if scouts:
            for row in scouts:
                row.update(
                    status=STATUS_QUARANTINED,
                    reason=str(Reason.LOCALIZER),
                    detail="localizer image split out of its series",
                )
            check = SpacingCheck(str(Reason.LOCALIZER), "localizer images")
            ordered = sorted(scouts, key=_instance_order)
            series.append(_series_row(uid + LOCALIZER_SUFFIX, ordered, _kind(ordered), check))
            members = [r for r in members if not _is_localizer(r)]
            if not members:
                continue
        kind = _kind(members)
        if kind == "image":
            ordered, check = _image_geometry(members, tolerance)
        elif kind == "multiframe":
            ordered = sorted(members, key=_instance_order)
            check = _multiframe_geometry(ordered, tolerance)
        else:
            ordered, check = sorted(members, key=_instance_order), SpacingCheck()
        series.append(_series_row(uid, ordered, kind, check))

    series.sort(key=lambda s: s["series_key"])
    quarantine = [
        QuarantineRecord(r["path"], Kind.FILE, Stage.INGEST, Reason(r["reason"]), r["detail"] or "")
        for r in instances
        if r["status"] == STATUS_QUARANTINED
    ]
    quarantine += [
        QuarantineRecord(
            s["series_key"], Kind.SERIES, Stage.INGEST, Reason(s["reason"]), s["detail"]
        )
        for s in series
        if s["status"] == STATUS_QUARANTINED and not s["series_key"].endswith(LOCALIZER_SUFFIX)
    ]
    return SeriesBuild(instances=instances, series=series, quarantine=quarantine)


def series_table(series: Sequence[dict[str, Any]]) -> pa.Table:
    """Build the ``catalog/series.parquet`` table (sorted by key)."""
    ordered = sorted(series, key=lambda s: s["series_key"])
    return pa.Table.from_pylist(ordered, schema=SERIES_SCHEMA)

"""Select a cohort's series from a site's de-identified zone and plan the objects to publish.

Reads only de-identified tables (``deid/series.parquet``, ``harmonised/series.parquet``,
``features/<params-hash>.parquet``); the private catalogue is never touched here. Published
tables keep a fixed list of de-identified columns, and object names are built from
pseudonymous series keys and normalised ROI names only.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tasks.cohort.spec import PARAMS_HASH, CohortSpec
from tasks.errors import OncoflowError
from tasks.research.methods import restrict_to_series
from tasks.store import (
    DEID_SERIES,
    FEATURES,
    HARMONISED_SERIES,
    SiteStore,
    sha256_bytes,
)
from tasks.store_checks import missing_input

SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
PSEUDONYM = re.compile(r"^[0-9][0-9.]{0,63}$|^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

#: Key columns of the published feature table (docs/tables.md).
FEATURE_KEYS = ("site", "patient", "study", "series", "modality", "roi", "params_hash")
#: pyradiomics feature names: <image type>_<feature class>_<feature>.
RADIOMICS_FEATURE = re.compile(
    r"^[a-z][A-Za-z0-9-]*_(firstorder|shape|shape2D|glcm|glrlm|glszm|gldm|ngtdm)_[A-Za-z0-9]+$"
)

#: The published series table: de-identified columns only (contract with researchers).
SERIES_SCHEMA = pa.schema(
    [
        ("site", pa.string()),
        ("series", pa.string()),
        ("study", pa.string()),
        ("patient", pa.string()),
        ("modality", pa.string()),
        ("body_part", pa.string()),
        ("manufacturer", pa.string()),
        ("acquisition_date", pa.string()),
        ("age_at_study", pa.string()),
        ("sex", pa.string()),
        ("intensity", pa.string()),
        ("size", pa.list_(pa.int64())),
        ("spacing", pa.list_(pa.float64())),
        ("rois", pa.list_(pa.string())),
        ("image", pa.string()),
        ("image_sha256", pa.string()),
        ("masks", pa.list_(pa.string())),
        ("mask_sha256", pa.list_(pa.string())),
        ("dicom", pa.list_(pa.string())),
        ("seg_series", pa.list_(pa.string())),
    ]
)


@dataclass(frozen=True)
class PlannedFile:
    """One object to copy from the site store into the published version.

    Parameters
    ----------
    source
        Store-relative key (under ``STORE/<site>/``).
    name
        Version-relative object name (pseudonymous).
    sha256
        Expected content hash (from the harmonised table, or computed while planning).
    """

    source: str
    name: str
    sha256: str


@dataclass
class CohortSelection:
    """The selected series, their published rows, and the files to copy."""

    site: str
    series: pa.Table
    features: pa.Table | None
    features_metadata: dict[str, str] = field(default_factory=dict)
    files_by_series: dict[str, list[PlannedFile]] = field(default_factory=dict)

    @property
    def files(self) -> list[PlannedFile]:
        """All planned files, sorted by name."""
        return sorted(
            (f for files in self.files_by_series.values() for f in files), key=lambda f: f.name
        )


def _require(store: SiteStore, key: str, what: str) -> pa.Table:
    table = store.read_table(key)
    if table is None:
        raise missing_input(store, f"{what} ({key})", "the earlier stages")
    return table


def _check_columns(table: pa.Table, needed: Iterable[str], key: str) -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise OncoflowError(f"{key} lacks column(s) {', '.join(missing)}")


def _safe_roi(roi: str, index: int) -> str:
    return roi if SAFE_NAME.match(roi) else f"roi-{index}"


def _safe_key(value: str, what: str) -> str:
    if not value or not PSEUDONYM.match(value):
        raise OncoflowError(f"a {what} key is not a pseudonymous key; refusing to publish")
    return value


def _date_ok(value: str | None, spec: CohortSpec) -> bool:
    sel = spec.selection
    if sel.date_from is None and sel.date_to is None:
        return True
    try:
        date = dt.datetime.strptime(value or "", "%Y%m%d").date()
    except ValueError:
        return False
    if sel.date_from and date < sel.date_from:
        return False
    return not (sel.date_to and date > sel.date_to)


def _row_matches(row: dict[str, Any], spec: CohortSpec) -> bool:
    sel = spec.selection
    if row.get("status") not in (None, "ok") or not row.get("image"):
        return False
    if sel.modality and (row.get("modality") or "").upper() not in sel.modality:
        return False
    if sel.body_part and (row.get("body_part") or "").upper() not in sel.body_part:
        return False
    if sel.roi and not set(sel.roi) & {r.lower() for r in row.get("rois") or []}:
        return False
    return _date_ok(row.get("acquisition_date"), spec)


def resolve_feature_table(store: SiteStore, name: str) -> str:
    """Return the store key of the feature table named by a params hash or a preset name.

    A preset name (``ct``, ``mr``, ``pet``) is resolved to its params hash by the radiomics
    parameter model, so the cohort picks the table that preset produced.
    """
    params_hash, label = name, name
    if not PARAMS_HASH.match(name):
        from tasks.radiomics.params import load_params

        params, label = load_params(name)
        label = label.removeprefix("preset:")
        params_hash = params.params_hash()
    key = f"{FEATURES}/{params_hash}.parquet"
    if not store.exists(key):
        raise OncoflowError(
            f"site {store.site} has no feature table for {label!r}: run `oncoflow extract "
            f"--params {label}` first"
        )
    return key


def check_publishable(store: SiteStore, spec: CohortSpec) -> None:
    """Check, before any flow run, that the site has what the spec needs (one-line errors).

    Raises
    ------
    OncoflowError
        When the store or site is missing, nothing is harmonised, or the feature table the
        spec names (hash, preset or parameter file) was not extracted.
    """
    if store.read_table(HARMONISED_SERIES) is None:
        raise missing_input(store, "harmonised series", "oncoflow harmonise")
    if spec.features is not None:
        resolve_feature_table(store, spec.features)


def published_feature_columns(columns: Iterable[str]) -> list[str]:
    """Return the feature-table columns that may be published (keys, features, ``prov_*``)."""
    return [
        c
        for c in columns
        if c in FEATURE_KEYS or c.startswith("prov_") or RADIOMICS_FEATURE.match(c)
    ]


def _select_features(
    store: SiteStore, spec: CohortSpec, keep: dict[str, set[str] | None]
) -> tuple[pa.Table | None, dict[str, str]]:
    if spec.features is None:
        return None, {}
    key = resolve_feature_table(store, spec.features)
    table = store.read_table(key)
    assert table is not None
    _check_columns(table, ("series", "roi"), key)
    rows = []
    for i, row in enumerate(
        table.select(
            ["series", "roi", "status"] if "status" in table.column_names else ["series", "roi"]
        ).to_pylist()
    ):
        if row.get("status") not in (None, "ok") or row["series"] not in keep:
            continue
        rois = keep[row["series"]]
        if rois is not None and (row["roi"] or "").lower() not in rois:
            continue
        rows.append(i)
    columns = published_feature_columns(table.column_names)
    out = table.take(pa.array(rows, pa.int64())).select(columns)
    if out.num_rows:
        order = pc.sort_indices(out, sort_keys=[("series", "ascending"), ("roi", "ascending")])
        out = out.take(order)
    meta = {
        k.decode(): v.decode()
        for k, v in (table.schema.metadata or {}).items()
        if not k.startswith(b"ARROW:") and k != b"pandas"
    }
    return out.replace_schema_metadata(None), restrict_to_series(
        meta, set(out.column("series").to_pylist())
    )


def select_cohort(store: SiteStore, spec: CohortSpec) -> CohortSelection:
    """Select the cohort's series at one site and plan the files to publish.

    Parameters
    ----------
    store
        The site store (only its de-identified zone is read).
    spec
        The validated cohort spec.

    Returns
    -------
    CohortSelection
        Published series rows (sorted by series), the feature rows, and the planned files.

    Raises
    ------
    OncoflowError
        When an input table is missing, the site is not in the spec's site list, or nothing
        matches.
    """
    if spec.selection.site and store.site not in spec.selection.site:
        raise OncoflowError(f"site {store.site} is not in the site list of cohort {spec.name}")
    harmonised = _require(store, HARMONISED_SERIES, "harmonised series table")
    _check_columns(
        harmonised, ("series", "study", "patient", "image", "rois", "masks"), HARMONISED_SERIES
    )
    deid_rows: list[dict[str, Any]] = []
    if spec.include.dicom:
        deid = _require(store, DEID_SERIES, "de-identified series table")
        _check_columns(deid, ("series", "kind", "paths"), DEID_SERIES)
        deid_rows = deid.to_pylist()
    deid_by_series = {r["series"]: r for r in deid_rows}

    roi_filter = set(spec.selection.roi) or None
    rows: list[dict[str, Any]] = []
    files: dict[str, list[PlannedFile]] = {}
    keep: dict[str, set[str] | None] = {}
    for row in sorted(harmonised.to_pylist(), key=lambda r: r["series"]):
        if not _row_matches(row, spec):
            continue
        series = _safe_key(row["series"], "series")
        _safe_key(row["patient"], "patient")
        _safe_key(row["study"], "study")
        planned: list[PlannedFile] = []
        image_name = None
        if spec.include.images:
            image_name = f"images/{series}.nii.gz"
            planned.append(PlannedFile(row["image"], image_name, row.get("image_sha256") or ""))
        rois, mask_names, mask_sums = [], [], []
        shas = row.get("mask_sha256") or [""] * len(row["rois"] or [])
        for i, (roi, mask, sha) in enumerate(
            zip(row["rois"] or [], row["masks"] or [], shas, strict=False)
        ):
            if roi_filter is not None and roi.lower() not in roi_filter:
                continue
            rois.append(roi)
            mask_sums.append(sha or "")
            if spec.include.masks:
                name = f"masks/{series}/{_safe_roi(roi, i)}.nii.gz"
                mask_names.append(name)
                planned.append(PlannedFile(mask, name, sha or ""))
        dicom_names, seg_series = [], []
        if spec.include.dicom:
            sources = [(series, deid_by_series.get(series, {}).get("paths") or [])]
            for seg in deid_rows:
                if (
                    seg.get("kind") == "seg"
                    and series in (seg.get("referenced_series") or [])
                    and seg.get("status") in (None, "ok")
                ):
                    seg_series.append(_safe_key(seg["series"], "series"))
                    sources.append((seg["series"], seg.get("paths") or []))
            for owner, paths in sources:
                for j, path in enumerate(paths):
                    name = f"dicom/{owner}/{j:05d}.dcm"
                    dicom_names.append(name)
                    planned.append(PlannedFile(path, name, ""))
        rows.append(
            {
                "site": store.site,
                **{
                    c: row.get(c)
                    for c in SERIES_SCHEMA.names
                    if c in row
                    and c
                    not in ("site", "image", "masks", "rois", "mask_sha256", "dicom", "seg_series")
                },
                "rois": rois,
                "image": image_name,
                "masks": mask_names,
                "mask_sha256": mask_sums,
                "dicom": dicom_names,
                "seg_series": sorted(seg_series),
            }
        )
        files[series] = [_with_hash(store, f) for f in planned]
        keep[series] = roi_filter
    if not rows:
        raise OncoflowError(f"cohort {spec.name} selects no series at site {store.site}")
    series_table = pa.Table.from_pylist(rows, schema=SERIES_SCHEMA)
    features, meta = _select_features(store, spec, keep)
    if features is not None:
        _plan_reports(store, features, meta.get("oncoflow.params_hash", ""), harmonised, files)
    return CohortSelection(
        site=store.site,
        series=series_table,
        features=features,
        features_metadata=meta,
        files_by_series=files,
    )


def _plan_reports(
    store: SiteStore,
    features: pa.Table,
    params_hash: str,
    harmonised: pa.Table,
    files: dict[str, list[PlannedFile]],
) -> None:
    """Add the DICOM SR measurement report of every published feature row that has one."""
    from tasks.radiomics.sr import report_key

    rois = {r["series"]: r["rois"] or [] for r in harmonised.select(["series", "rois"]).to_pylist()}
    for row in features.select(["series", "roi"]).to_pylist():
        series, roi = row["series"], row["roi"]
        key = report_key(params_hash, series, roi)
        if not params_hash or series not in files or not store.exists(key):
            continue
        name = report_name(series, roi, rois.get(series, []))
        files[series].append(_with_hash(store, PlannedFile(key, name, "")))


def report_name(series: str, roi: str, rois: list[str]) -> str:
    """Return the published name of the DICOM SR of (series, ROI): ``sr/<series>/<roi>.dcm``.

    ``rois`` are the series' harmonised ROI names (a ROI name that is not a safe file name is
    published by its position among them).
    """
    index = rois.index(roi) if roi in rois else 0
    return f"sr/{series}/{_safe_roi(roi, index)}.dcm"


def _with_hash(store: SiteStore, planned: PlannedFile) -> PlannedFile:
    if planned.sha256:
        return planned
    try:
        data = store.read_bytes(planned.source)
    except FileNotFoundError:
        raise OncoflowError(f"a file of series {planned.name.split('/')[1]} is missing") from None
    return PlannedFile(planned.source, planned.name, sha256_bytes(data))

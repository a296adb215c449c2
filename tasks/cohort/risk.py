"""Data preparation of a release, as the EUCAIM Data Holders Handbook asks, before it leaves.

Applied to the selected series of a cohort version (:func:`prepare_release`), in this order:

1. **duplicates**: series whose harmonised image has the same content hash as another selected
   series (identical pixel data under different UIDs, within or across patients) are withheld
   and quarantined (stage ``publish``, reason ``duplicate-pixel-data``); the first series by key
   is kept;
2. **faces**: head-and-neck series (by body part or by ROI anatomy) are published as features
   only (no image, mask or DICOM) unless the harmonised series records that a defacing step ran
   on it (``defaced`` true);
3. **minimum metadata**: patient, modality, body part, manufacturer, acquisition date and age
   at study are checked per series; missing values are listed (not blocking);
4. **relative days**: ``days_from_first_study`` (days since the patient's first study in the
   release; the shifted dates keep intervals) is added beside the shifted dates;
5. **re-identification risk**: k-anonymity and l-diversity (pyCANON) of one row per patient
   over the quasi-identifiers that leave the site (age, sex, body parts, modalities,
   manufacturers, first study date, number of series; sensitive attribute: the ROI set), at
   each generalisation level in turn (:data:`LEVELS`). The first level whose k reaches the
   configured minimum (and l the minimum l) is applied to the published table; when none does,
   publication is refused.

The published ``risk-report.json`` holds counts only; the detailed report with the
pseudonymous keys of the series withheld and of those missing metadata stays in the site store
(``reports/publish/<cohort>-risk.json``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tasks.cohort.catalogue import RiskSpec
from tasks.errors import OncoflowError

log = logging.getLogger(__name__)

RISK_REPORT = "risk-report.json"
DUPLICATE = "duplicate-pixel-data"
FACE = "head-neck-not-defaced"
#: The minimum imaging metadata of the handbook, as published columns.
MINIMUM_METADATA = (
    "patient", "modality", "body_part", "manufacturer", "acquisition_date", "age_at_study",
)  # fmt: skip
QUASI_IDENTIFIERS = ("age", "sex", "body_parts", "modalities", "manufacturers", "first_date",
                     "n_series")  # fmt: skip
SENSITIVE = "rois"
HEAD_NECK_PARTS = frozenset(
    {"HEAD", "BRAIN", "NECK", "HEADNECK", "HEAD_NECK", "HEAD AND NECK", "HNECK", "FACE", "SKULL",
     "ORBIT", "SINUS", "JAW", "TMJ", "EAR", "NOSE", "LARYNX", "PHARYNX", "NASOPHARYNX", "IAC"}
)  # fmt: skip
HEAD_NECK_ROIS = frozenset(
    {"brain", "brainstem", "parotid", "parotid_l", "parotid_r", "eye", "eye_l", "eye_r", "lens",
     "optic_nerve", "optic_chiasm", "cochlea", "mandible", "larynx", "oral_cavity", "pharynx",
     "submandibular", "face", "skull"}
)  # fmt: skip


def _years(age: str | None) -> int | None:
    if not age or len(age) != 4 or not age[:3].isdigit():
        return None
    return int(age[:3]) if age[3] == "Y" else 0


def _band(width: int) -> Callable[[int | None], str]:
    def band(years: int | None) -> str:
        if years is None:
            return "*"
        if years >= 90:
            return "90+"
        low = width * (years // width)
        return f"{low}-{low + width - 1}"

    return band


def _series_band(n: int) -> str:
    return "1" if n == 1 else "2-3" if n <= 3 else "4+"


@dataclass(frozen=True)
class Level:
    """One generalisation level: how each quasi-identifier is coarsened."""

    name: str
    age: Callable[[int | None], str]
    date: Callable[[str], str]
    manufacturer: bool
    n_series: Callable[[int], str]


LEVELS = (
    Level("none", lambda y: "*" if y is None else str(y), lambda d: d or "*", True, str),
    Level("age in 10-year bands, dates to year", _band(10), lambda d: d[:4] or "*", True,
          _series_band),
    Level("age in 20-year bands, dates to year, no manufacturer", _band(20),
          lambda d: d[:4] or "*", False, _series_band),
    Level("age, dates and manufacturer removed", lambda y: "*", lambda d: "*", False,
          lambda n: "*"),
)  # fmt: skip


@dataclass
class ReleaseReport:
    """What data preparation found and did (``public()`` holds counts only)."""

    min_k: int
    min_l: int
    patients: int = 0
    series: int = 0
    levels: list[dict[str, Any]] = field(default_factory=list)
    level: int | None = None
    withheld: dict[str, list[str]] = field(default_factory=dict)
    features_only: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    cross_patient: list[str] = field(default_factory=list)

    @property
    def generalisation(self) -> str | None:
        """Name of the generalisation applied (None when publication is refused)."""
        return LEVELS[self.level].name if self.level is not None else None

    def public(self) -> dict[str, Any]:
        """Return the published summary: counts and k, l per level, never a key."""
        return {
            "min_k": self.min_k,
            "min_l": self.min_l,
            "patients": self.patients,
            "series": self.series,
            "quasi_identifiers": list(QUASI_IDENTIFIERS),
            "sensitive_attribute": SENSITIVE,
            "levels": self.levels,
            "generalisation": self.generalisation,
            "withheld": {k: len(v) for k, v in sorted(self.withheld.items())},
            "duplicates_across_patients": len(self.cross_patient),
            "features_only": {k: len(v) for k, v in sorted(self.features_only.items())},
            "missing_metadata": {k: len(v) for k, v in sorted(self.missing.items())},
        }

    def summary(self, cohort: str) -> dict[str, Any]:
        """Return what the publish result shows: the level applied, series set aside, report key."""
        return {
            "generalisation": self.generalisation,
            "k": self.levels[self.level]["k"] if self.level is not None else None,
            "withheld": sum(len(v) for v in self.withheld.values()),
            "features_only": sum(len(v) for v in self.features_only.values()),
            "report": f"reports/publish/{cohort}-risk.json",
        }

    def private(self) -> dict[str, Any]:
        """Return the site's detailed report: the summary plus the pseudonymous series keys."""
        return {
            **self.public(),
            "withheld_series": self.withheld,
            "features_only_series": self.features_only,
            "missing_metadata_series": self.missing,
        }


def is_head_neck(row: dict[str, Any]) -> bool:
    """Whether a series shows the head or neck (body part or ROI anatomy)."""
    part = (row.get("body_part") or "").upper().replace("-", " ").strip()
    if part in HEAD_NECK_PARTS:
        return True
    return any((r or "").lower() in HEAD_NECK_ROIS for r in row.get("rois") or [])


def _days(date: str | None) -> dt.date | None:
    try:
        return dt.datetime.strptime(date or "", "%Y%m%d").date()
    except ValueError:
        return None


def patient_rows(rows: list[dict[str, Any]], level: Level) -> list[dict[str, str]]:
    """One row per patient: the generalised quasi-identifiers and the sensitive attribute."""
    by_patient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_patient[row["patient"] or "*"].append(row)
    out = []
    for patient in sorted(by_patient):
        series = sorted(by_patient[patient], key=lambda r: r.get("acquisition_date") or "")
        first = series[0]
        out.append(
            {
                "age": level.age(_years(first.get("age_at_study"))),
                "sex": (first.get("sex") or "*").upper(),
                "body_parts": "|".join(sorted({(r.get("body_part") or "*") for r in series})),
                "modalities": "|".join(sorted({(r.get("modality") or "*") for r in series})),
                "manufacturers": "|".join(sorted({(r.get("manufacturer") or "*") for r in series}))
                if level.manufacturer
                else "*",
                "first_date": level.date(first.get("acquisition_date") or ""),
                "n_series": level.n_series(len(series)),
                SENSITIVE: "|".join(sorted({x for r in series for x in r.get("rois") or []})),
            }
        )
    return out


def measure(rows: list[dict[str, Any]], level: Level) -> dict[str, Any]:
    """k-anonymity and l-diversity (pyCANON) of the release at one generalisation level."""
    import pandas as pd
    from pycanon import anonymity

    table = pd.DataFrame(patient_rows(rows, level))
    qi = list(QUASI_IDENTIFIERS)
    k = int(anonymity.k_anonymity(table, qi))
    ell = int(anonymity.l_diversity(table, qi, [SENSITIVE]))
    sizes = table.groupby(qi).size()
    return {"k": k, "l": ell, "classes": len(sizes), "smallest_classes": int((sizes == k).sum())}


def _generalise(rows: list[dict[str, Any]], level: int) -> None:
    if level == 0:
        return
    spec = LEVELS[level]
    for row in rows:
        years = _years(row.get("age_at_study"))
        row["age_at_study"] = None if spec.age(years) == "*" else spec.age(years)
        date = row.get("acquisition_date") or ""
        row["acquisition_date"] = None if spec.date(date) == "*" else spec.date(date)
        if not spec.manufacturer:
            row["manufacturer"] = None


def prepare_release(
    rows: list[dict[str, Any]], spec: RiskSpec
) -> tuple[list[dict[str, Any]], ReleaseReport]:
    """Check and prepare the selected series rows of a release (see the module docstring).

    Parameters
    ----------
    rows
        Published series rows (``tasks.cohort.select.SERIES_SCHEMA``), plus the harmonised
        ``defaced`` flag when the site has one.
    spec
        Minimum k and l, and whether to generalise.

    Returns
    -------
    tuple
        The rows to publish (withheld series removed, head-and-neck voxels dropped, the
        generalisation applied, ``days_from_first_study`` added) and the report.

    Raises
    ------
    OncoflowError
        When no generalisation level reaches the minimum k and l (nothing is published).
    """
    report = ReleaseReport(min_k=spec.min_k, min_l=spec.min_l)
    rows = [dict(r) for r in sorted(rows, key=lambda r: r["series"])]
    first_with: dict[str, dict[str, Any]] = {}
    kept = []
    for row in rows:
        sha = row.get("image_sha256")
        if sha and sha in first_with:
            if first_with[sha]["patient"] != row["patient"]:
                report.cross_patient.append(row["series"])
            report.withheld.setdefault(DUPLICATE, []).append(row["series"])
            continue
        if sha:
            first_with[sha] = row
        kept.append(row)
    rows = kept
    for row in rows:
        if is_head_neck(row) and not row.get("defaced"):
            report.features_only.setdefault(FACE, []).append(row["series"])
            row.update(image=None, image_sha256=None, masks=[], mask_sha256=[], dicom=[],
                       seg_series=[])  # fmt: skip
        for name in MINIMUM_METADATA:
            if not row.get(name):
                report.missing.setdefault(name, []).append(row["series"])
    first_day: dict[str, dt.date] = {}
    for row in rows:
        day = _days(row.get("acquisition_date"))
        if day is not None:
            patient = row["patient"]
            first_day[patient] = min(day, first_day.get(patient, day))
    for row in rows:
        day = _days(row.get("acquisition_date"))
        start = first_day.get(row["patient"])
        row["days_from_first_study"] = (day - start).days if day and start else None
    report.patients = len({r["patient"] for r in rows})
    report.series = len(rows)
    levels = range(len(LEVELS)) if spec.generalise else range(1)
    for i in levels:
        result = {"level": i, "generalisation": LEVELS[i].name, **measure(rows, LEVELS[i])}
        report.levels.append(result)
        if result["k"] >= spec.min_k and result["l"] >= spec.min_l:
            report.level = i
            break
    if report.level is None:
        last = report.levels[-1]
        raise OncoflowError(
            f"re-identification risk too high: k = {last['k']}, l = {last['l']} at the most "
            f"generalised level (minimum k = {spec.min_k}, l = {spec.min_l}); nothing was "
            "published"
        )
    _generalise(rows, report.level)
    for row in rows:
        row.pop("defaced", None)
    return rows, report


def report_bytes(report: dict[str, Any]) -> bytes:
    """Serialise a report deterministically."""
    return (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()


def with_days_column(schema: pa.Schema) -> pa.Schema:
    """Return the series schema with ``days_from_first_study`` after the shifted date."""
    index = schema.get_field_index("acquisition_date") + 1
    return schema.insert(index, pa.field("days_from_first_study", pa.int64()))


def prepare_selection(store: Any, spec: Any, selection: Any) -> tuple[Any, ReleaseReport]:
    """Apply :func:`prepare_release` to a cohort selection and record what was withheld.

    Withheld series lose their rows, feature rows and files; head-and-neck series keep their
    row and features but lose their images, masks and DICOM. Duplicates are quarantined
    (stage ``publish``) and the detailed report is written to the site store.

    Parameters
    ----------
    store
        The site store (:class:`tasks.store.SiteStore`).
    spec
        The cohort spec (:class:`tasks.cohort.spec.CohortSpec`); ``spec.risk`` configures.
    selection
        The :class:`tasks.cohort.select.CohortSelection` to prepare.

    Returns
    -------
    tuple
        The prepared selection and the report.
    """
    import dataclasses

    import pyarrow.compute as pc

    from tasks.store import HARMONISED_SERIES

    harmonised = store.read_table(HARMONISED_SERIES)
    defaced: set[str] = set()
    if harmonised is not None and "defaced" in harmonised.column_names:
        flags = harmonised.select(["series", "defaced"]).to_pylist()
        defaced = {r["series"] for r in flags if r["defaced"]}
    rows = [{**r, "defaced": r["series"] in defaced} for r in selection.series.to_pylist()]
    rows, report = prepare_release(rows, spec.risk)
    kept = {r["series"] for r in rows}
    voxels = ("images/", "masks/", "dicom/")
    no_voxels = {s for keys in report.features_only.values() for s in keys}
    files = {
        series: [f for f in planned if series not in no_voxels or not f.name.startswith(voxels)]
        for series, planned in selection.files_by_series.items()
        if series in kept
    }
    exported = {}
    if spec.include.seg_from_masks and (spec.include.dicom or selection.features is not None):
        exported = _export_segs(store, spec, rows, files, harmonised, no_voxels, report)
    features = selection.features
    if features is not None and features.num_rows:
        mask = pc.is_in(features.column("series"), value_set=pa.array(sorted(kept), pa.string()))
        features = features.filter(mask)
    if exported and features is not None:
        params_hash = selection.features_metadata.get("oncoflow.params_hash", "")
        _export_reports(store, features, params_hash, exported, files, harmonised, report)
    table = pa.Table.from_pylist(rows, schema=with_days_column(selection.series.schema))
    prepared = dataclasses.replace(
        selection, series=table, features=features, files_by_series=files
    )
    _quarantine(store, spec.name, report)
    store.write_bytes(report.summary(spec.name)["report"], report_bytes(report.private()))
    return prepared, report


def _quarantine(store: Any, cohort: str, report: ReleaseReport) -> None:
    """Replace this cohort's duplicate rows in the publish stage's quarantine (others kept)."""
    from tasks.quarantine import replace_quarantine
    from tasks.records import Kind, QuarantineRecord, Reason, Stage
    from tasks.store import QUARANTINE

    tag = f"cohort {cohort}:"
    current = store.read_table(QUARANTINE)
    publish_rows = [
        r for r in (current.to_pylist() if current is not None else [])
        if r["stage"] == str(Stage.PUBLISH)
    ]  # fmt: skip
    others = [
        QuarantineRecord(r["item"], r["kind"], Stage.PUBLISH, r["reason"], r["detail"] or "")
        for r in publish_rows
        if not (r["detail"] or "").startswith(tag)
    ]
    cross = set(report.cross_patient)
    mine = [
        QuarantineRecord(
            series, Kind.SERIES, Stage.PUBLISH, Reason.DUPLICATE_PIXEL_DATA,
            f"{tag} same pixel data as another series"
            + (" of another patient" if series in cross else ""),
        )
        for series in report.withheld.get(DUPLICATE, [])
    ]  # fmt: skip
    if mine or len(others) != len(publish_rows):
        replace_quarantine(store, Stage.PUBLISH, others + mine)


def _export_segs(
    store: Any,
    spec: Any,
    rows: list[dict[str, Any]],
    files: dict[str, list[Any]],
    harmonised: pa.Table | None,
    no_voxels: set[str],
    report: ReleaseReport,
) -> dict[str, Any]:
    """Make a DICOM SEG from the masks of every published series that has none.

    With ``include.dicom`` the SEG is published beside the image series; without, it is only
    written to the site store, for the DICOM SR of the published features to reference (the
    same SEG, same UIDs, that a publication with DICOM ships). Returns the exported SEG of each
    such series (:class:`tasks.radiomics.sr.ExportedSeg`).
    """
    import hashlib

    from tasks.cohort.seg_export import SegSettings, export_segs
    from tasks.cohort.select import PlannedFile
    from tasks.radiomics.sr import ExportedSeg

    ship = spec.include.dicom
    exported: dict[str, ExportedSeg] = {}
    settings = SegSettings(spec.include.annotation_method, spec.include.annotation_algorithm)
    by_series = {r["series"]: r for r in harmonised.to_pylist()} if harmonised else {}
    dicom = {} if ship else _unshipped_dicom(store)
    for row in rows:
        series = row["series"]
        if not row["rois"] or series in no_voxels:
            continue
        if ship and (not row["dicom"] or row["seg_series"]):
            continue
        if ship:
            prefix = f"dicom/{series}/"
            paths = [f.source for f in files[series] if f.name.startswith(prefix)]
        else:
            paths = dicom.get(series) or []
            if not paths:
                continue
        source = by_series.get(series, {})
        masks = dict(zip(source.get("rois") or [], source.get("masks") or [], strict=False))
        wanted = {"series": series, "rois": [r for r in row["rois"] if r in masks]}
        wanted["masks"] = [masks[r] for r in wanted["rois"]]
        try:
            made = export_segs(store, [wanted], {series: paths}, settings)
        except (OncoflowError, ValueError, AttributeError, RuntimeError) as exc:
            report.missing.setdefault("dicom_seg" if ship else "dicom_sr", []).append(series)
            log.info("series %s: no DICOM SEG (%s)", series, type(exc).__name__)
            continue
        if series not in made:
            continue
        seg_series, key = made[series]
        exported[series] = ExportedSeg(key, tuple(paths))
        if ship:
            name = f"dicom/{seg_series}/00000.dcm"
            sha = hashlib.sha256(store.read_bytes(key)).hexdigest()
            files[series].append(PlannedFile(key, name, sha))
            row["dicom"] = [*row["dicom"], name]
            row["seg_series"] = [seg_series]
    return exported


def _unshipped_dicom(store: Any) -> dict[str, list[str]]:
    """De-identified DICOM of the image series without a DICOM SEG (series -> store keys)."""
    from tasks.store import DEID_SERIES

    deid = store.read_table(DEID_SERIES)
    if deid is None or not {"series", "kind", "paths"} <= set(deid.column_names):
        return {}
    rows = deid.to_pylist()
    segmented = {
        s
        for r in rows
        if r.get("kind") == "seg" and r.get("status") in (None, "ok")
        for s in r.get("referenced_series") or []
    }
    return {
        r["series"]: r["paths"] or []
        for r in rows
        if r.get("kind") == "image" and r["series"] not in segmented
    }


def _export_reports(
    store: Any,
    features: pa.Table,
    params_hash: str,
    exported: dict[str, Any],
    files: dict[str, list[Any]],
    harmonised: pa.Table | None,
    report: ReleaseReport,
) -> None:
    """Write and add the DICOM SR of every published ROI of a series whose SEG was exported.

    The extract stage could not write them (their masks came from an RTSTRUCT or a NIfTI
    file); each references its segment of the exported SEG and, through it, the image series.
    """
    import hashlib

    from tasks.cohort.select import PlannedFile, report_name
    from tasks.radiomics.sr import write_exported_reports

    if not params_hash:
        return
    rois = {r["series"]: r["rois"] or [] for r in harmonised.to_pylist()} if harmonised else {}
    for outcome in write_exported_reports(store, features, params_hash, exported):
        series = outcome.series
        if not outcome.key:
            report.missing.setdefault("dicom_sr", []).append(series)
            log.info("series %s: no DICOM SR (%s)", series, outcome.reason)
            continue
        name = report_name(series, outcome.roi, rois.get(series, []))
        sha = hashlib.sha256(store.read_bytes(outcome.key)).hexdigest()
        kept = [f for f in files[series] if f.name != name]  # an earlier publication's report
        files[series] = [*kept, PlannedFile(outcome.key, name, sha)]

"""De-identification plan and outputs: the jobs of a run, its tables and stale objects.

What the ``deidentify-dicom`` flow needs around the per-series task
(:func:`tasks.deid.series.deidentify_series_task`): the jobs from the private catalogue, the
schema of ``deid/series.parquet``, the stage's quarantine rows and the removal of objects the
run no longer produces.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks.deid.audit import audit_table
from tasks.deid.profile import PROFILE_VERSION, DeidOptions
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.series import SeriesJob, pseudonymous_series_uid
from tasks.errors import OncoflowError
from tasks.records import Kind, QuarantineRecord, Reason, Stage, Status, UnitOutcome, UnitResult
from tasks.store import (
    CATALOG_INSTANCES,
    CATALOG_SERIES,
    DEID_AUDIT,
    DEID_DICOM,
    DEID_SERIES,
    DEID_UNITS,
    SiteStore,
)
from tasks.table_parts import PartedTable, sql_list
from tasks.unit_state import UnitState, code_digest, keyed_digest, plan_reuse
from tasks.volumes.deid import DEID_VOLUMES

#: Parquet schema-metadata key of the catalogue tables holding the SOURCE URL (docs/tables.md).
SOURCE_METADATA_KEY = b"source"

DEID_SERIES_SCHEMA = pa.schema(
    [
        ("series", pa.string()),
        ("study", pa.string()),
        ("patient", pa.string()),
        ("frame_of_reference", pa.string()),
        ("modality", pa.string()),
        ("kind", pa.string()),
        ("body_part", pa.string()),
        ("manufacturer", pa.string()),
        ("sex", pa.string()),
        ("acquisition_date", pa.string()),
        ("age_at_study", pa.string()),
        ("n_instances", pa.int64()),
        ("paths", pa.list_(pa.string())),
        ("referenced_series", pa.list_(pa.string())),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("rois", pa.list_(pa.string())),
    ]
)


def source_root(store: SiteStore, table: pa.Table, override: str | None) -> str:
    """Return the SOURCE URL the catalogue's paths are relative to.

    Raises
    ------
    OncoflowError
        When neither ``override`` nor the catalogue metadata gives one.
    """
    if override:
        return override
    metadata = table.schema.metadata or {}
    value = metadata.get(SOURCE_METADATA_KEY)
    if not value:
        raise OncoflowError(
            f"{CATALOG_SERIES} does not record its source: re-run `oncoflow ingest` "
            "or pass --source"
        )
    return value.decode("utf-8")


def plan_jobs(table: pa.Table) -> list[SeriesJob]:
    """One job per ``ok`` series of the catalogue, in series-key order."""
    jobs = []
    for row in sorted(table.to_pylist(), key=lambda r: r["series_key"]):
        if row.get("status") != "ok" or not row.get("paths"):
            continue
        jobs.append(
            SeriesJob(
                series_key=row["series_key"],
                series_instance_uid=row.get("series_instance_uid") or row["series_key"],
                study_instance_uid=row.get("study_instance_uid") or "",
                patient_id=row.get("patient_id") or "",
                modality=row.get("modality") or "",
                kind=row.get("kind") or "",
                paths=tuple(row["paths"]),
            )
        )
    return jobs


@dataclass
class DeidPlan:
    """The series of a de-identification run and the outcomes reused from the last run.

    Attributes
    ----------
    jobs
        One job per ``ok`` series of the catalogue, in series-key order.
    label
        Series key -> pseudonymous series UID.
    reused
        Job index -> outcome of the jobs unchanged since the last run (no task).
    digests
        Pseudonymous series UID -> digest of the series' source files, options and code.
    old_rows
        ``deid/series.parquet`` of the last run, by series.
    previous
        ``deid/units.parquet`` of the last run.
    """

    jobs: list[SeriesJob]
    label: dict[str, str]
    reused: dict[int, UnitOutcome]
    digests: dict[str, str]
    old_rows: dict[str, dict[str, Any]]
    previous: dict[str, tuple[str, dict[str, Any]]]


def source_stamps(store: SiteStore, jobs: list[SeriesJob]) -> dict[str, str]:
    """Return series key -> SHA-256 of its files' (path, size, mtime) in the catalogue.

    Computed in DuckDB over the catalogue's parts; what ingest compares to find changed files,
    so a series' stamp changes exactly when one of its files does.
    """
    instances = PartedTable(store, CATALOG_INSTANCES, ("path",))
    uris = instances.uris()
    if not jobs or not uris:
        return {}
    pairs = [(j.series_key, p) for j in jobs for p in j.paths]
    listed = pa.table(
        {
            "series_key": pa.array([s for s, _ in pairs], pa.string()),
            "path": pa.array([p for _, p in pairs], pa.string()),
        }
    )
    con = store.connect_duckdb()
    try:
        con.execute("SET threads TO 1")
        con.register("listed", listed)
        found = con.execute(
            "SELECT l.series_key, sha256(string_agg(l.path || '|' || coalesce(CAST(i.size AS "
            "VARCHAR), '-') || '|' || coalesce(i.mtime, '-'), chr(10) ORDER BY l.path)) "
            "FROM listed l LEFT JOIN (SELECT path, size, mtime FROM "
            f"read_parquet({sql_list(uris)})) i ON i.path = l.path GROUP BY l.series_key"
        ).fetchall()
    finally:
        con.close()
    return dict(found)


def plan_deid(
    store: SiteStore, catalog: pa.Table | None, keys: SiteKeys, options: DeidOptions
) -> DeidPlan:
    """Plan a run: the jobs, their pseudonymous labels and the unchanged ones to reuse.

    A series is reused (no task) when its source files, the profile, the options, the site
    key and the de-identification code are those of the last run's ``ok`` outcome and its
    de-identified files are all still in the store.
    """
    jobs = plan_jobs(catalog) if catalog is not None else []
    label = {
        j.series_key: pseudonymous_series_uid(keys, j.series_key, j.series_instance_uid)
        for j in jobs
    }
    previous = deid_units(store).read()
    stamps = source_stamps(store, jobs)
    settings = (PROFILE_VERSION, options.model_dump_json(), keys.key_id, _DEID_CODE)
    digests = {
        label[j.series_key]: keyed_digest(
            keys.uid_key, "deid", asdict(j), stamps[j.series_key], settings
        )
        for j in jobs
        if j.series_key in stamps
    }
    old = store.read_table(DEID_SERIES)
    old_rows = {r["series"]: r for r in old.to_pylist()} if old is not None else {}
    present = set(store.find(DEID_DICOM)) if previous and store.exists(DEID_DICOM) else set()

    def reused(job: SeriesJob, saved: dict[str, Any]) -> UnitOutcome | None:
        row = old_rows.get(label[job.series_key])
        if row is None or row.get("status") != str(Status.OK) or not set(row["paths"]) <= present:
            return None
        outputs = tuple(row["paths"])
        return UnitOutcome(
            UnitResult(row["series"], Status.OK, outputs=outputs, computed=False),
            row=row,
            audit=tuple((a["attribute"], a["action"], a["count"]) for a in saved["audit"]),
            content=saved["content"],
        )

    reused = plan_reuse(
        jobs, lambda j: digests.get(label[j.series_key]), lambda j: label[j.series_key],
        previous, reused,
    )  # fmt: skip
    return DeidPlan(jobs, label, reused, digests, old_rows, previous)


_DEID_CODE = code_digest(str(Path(__file__).parent))

#: State columns of ``deid/units.parquet``: the content digest harmonise plans from, and the
#: series' audit counts (the audit table is their sum).
DEID_UNIT_COLUMNS = pa.schema(
    [
        ("content", pa.string()),
        (
            "audit",
            pa.list_(
                pa.struct(
                    [("attribute", pa.string()), ("action", pa.string()), ("count", pa.int64())]
                )
            ),
        ),
    ]
)


def deid_units(store: SiteStore) -> UnitState:
    """``deid/units.parquet``: what the last run knows of each de-identified series."""
    return UnitState(store, DEID_UNITS, DEID_UNIT_COLUMNS)


def audit_rows(outcome: UnitOutcome) -> list[dict[str, Any]]:
    """Return one series' audit counts as rows of ``deid/units.parquet``'s ``audit`` column."""
    return [{"attribute": a, "action": b, "count": n} for a, b, n in outcome.audit]


def remove_stale(store: SiteStore, outcomes: list[UnitOutcome], volumes: list[UnitOutcome]) -> int:
    """Remove de-identified objects this run did not produce; return how many."""
    keep = {key for o in outcomes if o.result.status == Status.OK for key in o.result.outputs}
    removed = store.prune(DEID_DICOM, keep)
    return removed + store.prune(DEID_VOLUMES, {k for v in volumes for k in v.result.outputs})


def write_tables(
    store: SiteStore,
    plan: DeidPlan,
    outcomes: list[UnitOutcome],
    volumes: list[UnitOutcome],
    counts: Counter[tuple[str, str]],
    key_id: str,
) -> list[str]:
    """Write ``deid/series.parquet``, ``deid/audit.parquet`` and ``deid/units.parquet``.

    The series table changes in proportion to what changed: only rows that differ from the
    last run's are written, and only the parts that held their old rows are rewritten.

    Returns
    -------
    list of str
        Keys of the tables written (unchanged tables are left out).
    """
    profile = {"oncoflow.deid.profile": PROFILE_VERSION}
    table = deid_table(outcomes, volumes)
    rows = table.to_pylist()
    changed = pa.array(
        [i for i, r in enumerate(rows) if plan.old_rows.get(r["series"]) != r], pa.int64()
    )
    gone = sorted(set(plan.old_rows) - {r["series"] for r in rows})
    written = []
    series = PartedTable(store, DEID_SERIES, ("series",))
    metadata = {**profile, "oncoflow.deid.key_id": key_id}
    if series.update(table.take(changed), gone, key="series", metadata=metadata):
        written.append(DEID_SERIES)
    if PartedTable(store, DEID_AUDIT, ("attribute", "action")).write(audit_table(counts), profile):
        written.append(DEID_AUDIT)
    entries = {
        o.result.key: (plan.digests[o.result.key], {"content": o.content, "audit": audit_rows(o)})
        for o in outcomes
        if o.result.status == Status.OK and o.result.key in plan.digests
    }
    if deid_units(store).write(entries, plan.previous):
        written.append(DEID_UNITS)
    return written


def deid_table(outcomes: list[UnitOutcome], volumes: list[UnitOutcome]) -> pa.Table:
    """Return ``deid/series.parquet``: the de-identified series and volumes, by series key."""
    rows = [r for o in [*outcomes, *volumes] for r in o.rows]
    rows.sort(key=lambda r: r["series"])
    return pa.Table.from_pylist(rows, schema=DEID_SERIES_SCHEMA)


def quarantine_records(
    jobs: list[SeriesJob], outcomes: list[UnitOutcome]
) -> list[QuarantineRecord]:
    """Return the stage's quarantine rows: quarantined and failed series (private series key)."""
    records = []
    for job, outcome in zip(jobs, outcomes, strict=True):
        if outcome.result.status in (Status.QUARANTINED, Status.FAILED):
            records.append(
                QuarantineRecord(
                    item=job.series_key,
                    kind=Kind.SERIES,
                    stage=Stage.DEIDENTIFY,
                    reason=Reason(outcome.result.reason or str(Reason.DEID_ERROR)),
                    detail=outcome.result.detail or outcome.result.error_class,
                )
            )
    return records


def outcome_rows(outcomes: list[UnitOutcome]) -> list[dict[str, Any]]:
    """Return the outcome table of a run (pseudonymous series UID, last 16 digits)."""
    return [
        {
            "series": o.result.key[-16:],
            "status": str(o.result.status),
            "reason": o.result.reason,
            "instances": len(o.result.outputs),
            "written": o.written,
        }
        for o in outcomes
    ]

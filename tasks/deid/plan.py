"""De-identification plan and outputs: the jobs of a run, its tables and stale objects.

What the ``deidentify-dicom`` flow needs around the per-series task
(:func:`tasks.deid.series.deidentify_series_task`): the jobs from the private catalogue, the
schema of ``deid/series.parquet``, the stage's quarantine rows and the removal of objects the
run no longer produces.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

from tasks.deid.audit import audit_table
from tasks.deid.profile import PROFILE_VERSION
from tasks.deid.series import SeriesJob
from tasks.errors import OncoflowError
from tasks.records import Kind, QuarantineRecord, Reason, Stage, Status, UnitOutcome
from tasks.store import CATALOG_SERIES, DEID_AUDIT, DEID_DICOM, DEID_SERIES, SiteStore
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


def remove_stale(store: SiteStore, outcomes: list[UnitOutcome], volumes: list[UnitOutcome]) -> int:
    """Remove de-identified objects this run did not produce; return how many."""
    keep = {key for o in outcomes if o.result.status == Status.OK for key in o.result.outputs}
    removed = store.prune(DEID_DICOM, keep)
    return removed + store.prune(DEID_VOLUMES, {k for v in volumes for k in v.result.outputs})


def write_tables(
    store: SiteStore,
    outcomes: list[UnitOutcome],
    volumes: list[UnitOutcome],
    counts: Counter[tuple[str, str]],
    key_id: str,
) -> list[str]:
    """Write ``deid/series.parquet`` and ``deid/audit.parquet``; return the keys written."""
    tables = {
        DEID_SERIES: (deid_table(outcomes, volumes), {"oncoflow.deid.key_id": key_id}),
        DEID_AUDIT: (audit_table(counts), {}),
    }
    return [
        key
        for key, (table, extra) in tables.items()
        if store.write_table(key, table, {"oncoflow.deid.profile": PROFILE_VERSION, **extra})
    ]


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

"""Flow ``deidentify-dicom``: the private catalogue to ``deid/`` (PS3.15 profile, pseudonyms).

Reads ``catalog/series.parquet`` (series ingest found usable), submits one Dask task per series
(:func:`tasks.deid.series.deidentify_series_task`), and writes de-identified DICOM under
pseudonymous keys ``deid/dicom/<patient>/<study>/<series>/<n>.dcm``, the pseudonymised catalogue
``deid/series.parquet``, the audit ``deid/audit.parquet`` and the stage's quarantine rows.

Privacy: the flow parameters hold no identifier and no secret; task run names and results use
pseudonymous keys; logs and artifacts hold counts and reason codes only. The site secret is read
from ``ONCOFLOW_SITE_SECRET`` or a Prefect Secret block by the flow process (to name the tasks)
and by each task. Re-running on unchanged input rewrites nothing (identical bytes are skipped).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from prefect import flow, get_run_logger
from prefect.futures import as_completed
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.reporting import Progress, markdown_table, post_summary, post_table
from flows.runtime import RuntimeOptions, default_task_runner, run_on_dask
from tasks.deid.audit import audit_summary_rows, audit_table
from tasks.deid.profile import PROFILE_VERSION, DeidOptions
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.secret import load_site_secret
from tasks.deid.series import (
    SeriesJob,
    SeriesOutcome,
    counter_from,
    deidentify_series_task,
    pseudonymous_series_uid,
)
from tasks.errors import OncoflowError, StageFailed, validation_message
from tasks.records import QuarantineRecord, Reason, Stage, StageSummary, Status, UnitResult
from tasks.store import (
    CATALOG_SERIES,
    DEID_AUDIT,
    DEID_DICOM,
    DEID_SERIES,
    SiteStore,
    open_url,
    validate_site,
)
from tasks.store_checks import missing_input
from tasks.volumes.deid import (
    DEID_VOLUMES,
    VolumeJob,
    VolumeOutcome,
    deidentify_volume_task,
    plan_volume_jobs,
    volume_records,
    volume_series_uid,
)

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


class DeidParams(BaseModel):
    """One de-identification run of a site (the Prefect UI form; no identifiers, no secret)."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(description="Site code: lowercase letters, digits, dashes.")
    store: str = Field(description="Site store URL (path, file://, s3://bucket/prefix).")
    source: str | None = Field(
        None,
        description="Source root the catalogue's paths are relative to "
        "(default: the SOURCE recorded by ingest).",
    )
    options: DeidOptions = Field(default_factory=DeidOptions, description="PS3.15 profile options.")
    max_failure_ratio: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Fail the run when more than this share of series fail with an error "
        "(quarantined series do not count).",
    )

    @model_validator(mode="after")
    def _valid_site(self) -> DeidParams:
        validate_site(self.site)
        return self


def load_options(path: str | Path | None) -> DeidOptions:
    """Read :class:`DeidOptions` from a YAML file (None: the defaults), one-line errors."""
    if path is None:
        return DeidOptions()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise OncoflowError(f"cannot read options file {path}: {exc.strerror}") from None
    except yaml.YAMLError:
        raise OncoflowError(f"options file {path} is not valid YAML") from None
    try:
        return DeidOptions.model_validate(data)
    except ValidationError as exc:
        raise OncoflowError(f"options file {path}: {validation_message(exc)}") from None


def build_params(
    site: str, store: str, source: str | None = None, options: str | Path | None = None
) -> DeidParams:
    """Build :class:`DeidParams` from CLI values, with a one-line error on bad input."""
    settings = load_options(options)
    try:
        return DeidParams(site=site, store=store, source=source, options=settings)
    except ValidationError as exc:
        raise OncoflowError(validation_message(exc)) from None


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


def remove_stale(store: SiteStore, keep: set[str]) -> int:
    """Remove objects under ``deid/dicom/`` that this run did not produce; return how many."""
    return store.prune(DEID_DICOM, keep)


def _failed(job_label: str, exc: BaseException) -> SeriesOutcome:
    return SeriesOutcome(
        unit=UnitResult(key=job_label, status=Status.FAILED, error_class=type(exc).__name__),
        row={},
    )


def _deid_rows(outcomes: list[SeriesOutcome], volumes: list[VolumeOutcome]) -> pa.Table:
    rows = [o.row for o in outcomes if o.row] + [r for v in volumes for r in v.rows]
    rows.sort(key=lambda r: r["series"])
    return pa.Table.from_pylist(rows, schema=DEID_SERIES_SCHEMA)


def _deidentify_volumes(
    params: DeidParams, keys: SiteKeys, jobs: list[VolumeJob]
) -> list[VolumeOutcome]:
    """De-identify the catalogued NIfTI/NRRD volumes, one task each (see tasks/volumes)."""
    labels = [volume_series_uid(keys, job) for job in jobs]
    futures = {
        deidentify_volume_task.submit(job, label, params.store, params.site): label
        for job, label in zip(jobs, labels, strict=True)
    }
    done: dict[str, VolumeOutcome] = {}
    for future in as_completed(list(futures)):
        try:
            done[futures[future]] = future.result()
        except Exception as exc:  # retries exhausted or worker lost: count it, never re-raise
            unit = UnitResult(futures[future], Status.FAILED, error_class=type(exc).__name__)
            done[futures[future]] = VolumeOutcome(unit)
    return [done[label] for label in labels]


@flow(
    name="deidentify-dicom",
    flow_run_name="deidentify-{params.site}",
    log_prints=False,
    task_runner=default_task_runner(),
)
def deidentify_flow(params: DeidParams) -> dict[str, Any]:
    """De-identify every usable series of the site's catalogue into ``deid/``.

    Parameters
    ----------
    params
        Site, store, optional source root, profile options, failure threshold.

    Returns
    -------
    dict
        The stage summary (counts by status and reason, objects written, stale removed).

    Raises
    ------
    StageFailed
        When the share of failed series exceeds ``params.max_failure_ratio``.
    """
    logger = get_run_logger()
    store = SiteStore(params.store, params.site)
    catalog = store.read_table(CATALOG_SERIES)
    volume_jobs = plan_volume_jobs(store)
    if catalog is None and not volume_jobs:
        raise missing_input(store, "catalogue", "oncoflow ingest")
    source = source_root(store, catalog, params.source) if catalog is not None else ""
    keys = SiteKeys.derive(load_site_secret(params.site), params.site)
    jobs = plan_jobs(catalog) if catalog is not None else []
    logger.info(
        "de-identifying %d series (profile %s, key %s)", len(jobs), PROFILE_VERSION, keys.key_id
    )
    labels = [pseudonymous_series_uid(keys, j.series_key, j.series_instance_uid) for j in jobs]
    progress = Progress(len(jobs), "series de-identified")
    futures = {
        deidentify_series_task.submit(
            job, label, params.store, params.site, source, params.options
        ): i
        for i, (job, label) in enumerate(zip(jobs, labels, strict=True))
    }
    outcomes: list[SeriesOutcome | None] = [None] * len(jobs)
    for future in as_completed(list(futures)):
        i = futures[future]
        try:
            outcomes[i] = future.result()
        except Exception as exc:  # retries exhausted or worker lost: count it, never re-raise
            outcomes[i] = _failed(labels[i], exc)
        progress.advance()
    done = [o for o in outcomes if o is not None]
    volumes = _deidentify_volumes(params, keys, volume_jobs)

    table_written = store.write_table(
        DEID_SERIES,
        _deid_rows(done, volumes),
        {"oncoflow.deid.profile": PROFILE_VERSION, "oncoflow.deid.key_id": keys.key_id},
    )
    counts = counter_from([*done, *volumes])  # type: ignore[list-item]
    audit_written = store.write_table(
        DEID_AUDIT, audit_table(counts), {"oncoflow.deid.profile": PROFILE_VERSION}
    )
    records = []
    for job, outcome in zip(jobs, outcomes, strict=True):
        assert outcome is not None
        if outcome.unit.status in (Status.QUARANTINED, Status.FAILED):
            reason = outcome.unit.reason or str(Reason.DEID_ERROR)
            records.append(
                QuarantineRecord(
                    item=job.series_key,
                    kind="series",
                    stage=Stage.DEIDENTIFY,
                    reason=Reason(reason),
                    detail=outcome.unit.detail or outcome.unit.error_class,
                )
            )
    records.extend(volume_records(volumes))
    store.replace_quarantine(Stage.DEIDENTIFY, records)
    keep = {key for o in done if o.unit.status == Status.OK for key in o.outputs}
    removed = remove_stale(store, keep)
    removed += store.prune(DEID_VOLUMES, {k for v in volumes for k in v.outputs})

    results = [o.unit for o in [*done, *volumes]]
    summary = StageSummary.from_results(
        Stage.DEIDENTIFY,
        params.site,
        results,
        table=DEID_SERIES,
        table_written=table_written,
        audit_written=audit_written,
        objects_written=sum(o.written for o in [*done, *volumes]),
        series_computed=sum(1 for r in results if r.status == Status.OK and r.computed),
        series_unchanged=sum(1 for r in results if r.status == Status.OK and not r.computed),
        stale_removed=removed,
        profile=PROFILE_VERSION,
        key_id=keys.key_id,
        options_hash=hashlib.sha256(params.options.model_dump_json().encode()).hexdigest()[:12],
    )
    post_summary(
        summary,
        "De-identification",
        {
            "Actions": markdown_table(audit_summary_rows(counts), ["action", "count"]),
            "Note": "Per-attribute counts are in `deid/audit.parquet` (never values).",
        },
    )
    post_table(
        params.site,
        str(Stage.DEIDENTIFY),
        "series",
        [
            {
                "series": o.unit.key[-16:],
                "status": str(o.unit.status),
                "reason": o.unit.reason,
                "instances": len(o.outputs),
                "written": o.written,
            }
            for o in done
        ],
        "De-identified series (pseudonymous series UID, last 16 digits)",
    )
    logger.info(
        "de-identification done: %s",
        ", ".join(f"{k}={v}" for k, v in summary.counts.items()) or "nothing to do",
    )
    if summary.failure_ratio > params.max_failure_ratio:
        raise StageFailed(
            f"de-identification failed for {summary.counts.get('failed', 0)} of "
            f"{len(results)} series (threshold {params.max_failure_ratio:.0%})"
        )
    return summary.to_dict()


def deidentify(params: DeidParams, runtime: RuntimeOptions | None = None) -> StageSummary:
    """Run the flow on the configured task runner and return its summary.

    Raises
    ------
    OncoflowError
        For a missing catalogue, source or secret (checked before any task starts).
    """
    runtime = runtime or RuntimeOptions()
    store = SiteStore(params.store, params.site)
    catalog = store.read_table(CATALOG_SERIES)
    if catalog is None:
        if not plan_volume_jobs(store):
            raise missing_input(store, "catalogue", "oncoflow ingest")
        load_site_secret(params.site)
        result = run_on_dask(deidentify_flow, runtime, params)
        return StageSummary.from_dict(Stage.DEIDENTIFY, params.site, result)
    source = source_root(store, catalog, params.source)
    try:
        fs, root = open_url(source)
        found = fs.exists(root)
    except OncoflowError:
        raise
    except Exception as exc:
        raise OncoflowError(f"source unreachable: {source} ({type(exc).__name__})") from None
    if not found:
        raise OncoflowError(f"source not found: {source} (pass --source if it moved)")
    load_site_secret(params.site)
    result = run_on_dask(deidentify_flow, runtime, params)
    return StageSummary.from_dict(Stage.DEIDENTIFY, params.site, result)

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
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from pydantic import Field, ValidationError

from flows.reporting import markdown_table
from flows.runtime import RuntimeOptions, default_task_runner, run_on_dask, run_stage
from flows.stage import (
    Grouping,
    StageParams,
    StageReport,
    failed_result,
    finish_stage,
    run_units,
)
from tasks.deid.audit import audit_summary_rows
from tasks.deid.plan import (
    outcome_rows,
    plan_deid,
    quarantine_records,
    remove_stale,
    source_root,
    write_tables,
)
from tasks.deid.profile import PROFILE_VERSION, DeidOptions
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.secret import load_site_secret
from tasks.deid.series import (
    SeriesJob,
    counter_from,
    deidentify_series_task,
)
from tasks.errors import OncoflowError, validation_message
from tasks.names import group_label
from tasks.records import Stage, StageSummary, UnitOutcome
from tasks.store import CATALOG_SERIES, DEID_SERIES, SiteStore, open_url
from tasks.store_checks import missing_input
from tasks.unit_state import needs_workers
from tasks.volumes.deid import (
    deidentify_volume_task,
    plan_volume_jobs,
    volume_records,
    volume_series_uid,
)


class DeidParams(StageParams):
    """One de-identification run of a site (the Prefect UI form; no identifiers, no secret)."""

    source: str | None = Field(
        None,
        description="Source root the catalogue's paths are relative to "
        "(default: the SOURCE recorded by ingest).",
    )
    options: DeidOptions = Field(default_factory=DeidOptions, description="PS3.15 profile options.")

    @property
    def options_hash(self) -> str:
        """Short hash of the profile options (recorded in the summary)."""
        return hashlib.sha256(self.options.model_dump_json().encode()).hexdigest()[:12]


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


def _report(outcomes: list[UnitOutcome], counts: Counter[tuple[str, str]]) -> StageReport:
    """Return what the Prefect UI shows of a run: the series table and the action counts."""
    return StageReport(
        "De-identification",
        outcome_rows(outcomes),
        "De-identified series (pseudonymous series UID, last 16 digits)",
        {
            "Actions": markdown_table(audit_summary_rows(counts), ["action", "count"]),
            "Note": "Per-attribute counts are in `deid/audit.parquet` (never values).",
        },
        rows_name="series",
    )


def _failed(label: str, exc: BaseException) -> UnitOutcome:
    return UnitOutcome(failed_result(label, exc))


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
    store = params.open_store()
    catalog = store.read_table(CATALOG_SERIES)
    volume_jobs = plan_volume_jobs(store)
    if catalog is None and not volume_jobs:
        raise missing_input(store, "catalogue", "oncoflow ingest")
    source = source_root(store, catalog, params.source) if catalog is not None else ""
    keys = SiteKeys.derive(load_site_secret(params.site), params.site)
    plan = plan_deid(store, catalog, keys, params.options)
    label = plan.label
    get_run_logger().info("de-identifying %d series (%d unchanged)", len(label), len(plan.reused))

    def args(job: SeriesJob) -> tuple[Any, ...]:
        return (job, label[job.series_key], params.store, params.site, source, params.options)

    outcomes = run_units(
        plan.jobs,
        lambda job: deidentify_series_task.submit(*args(job)),
        lambda job, exc: _failed(label[job.series_key], exc),
        "series de-identified",
        # series of a few files (radiographs, SR, one-file scans) several to a task
        Grouping(
            size=lambda job: len(job.paths),
            call=lambda job: (deidentify_series_task.fn, args(job)),
            name=lambda group: "deid-"
            + group_label((j.modality, label[j.series_key]) for j in group),
        ),
        plan.reused,
    )
    volumes = run_units(  # catalogued NIfTI/NRRD volumes, see tasks/volumes
        volume_jobs,
        lambda job: deidentify_volume_task.submit(
            job, volume_series_uid(keys, job), params.store, params.site
        ),
        lambda job, exc: UnitOutcome(failed_result(volume_series_uid(keys, job), exc)),
        "volumes de-identified",
    )
    counts = counter_from([*outcomes, *volumes])  # type: ignore[list-item]
    written = write_tables(store, plan, outcomes, volumes, counts, keys.key_id)
    return finish_stage(
        store,
        Stage.DEIDENTIFY,
        params,
        [o.result for o in [*outcomes, *volumes]],
        [*quarantine_records(plan.jobs, outcomes), *volume_records(volumes)],
        _report(outcomes, counts),
        "series",
        tables_written=written,
        stale_removed=remove_stale(store, outcomes, volumes),
        table=DEID_SERIES,
        objects_written=sum(o.written for o in [*outcomes, *volumes]),
        unit_cpu_seconds=round(sum(o.cpu_seconds for o in outcomes), 2),
        profile=PROFILE_VERSION,
        key_id=keys.key_id,
        options_hash=params.options_hash,
    )


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
    keys = SiteKeys.derive(load_site_secret(params.site), params.site)
    plan = plan_deid(store, catalog, keys, params.options)
    todo = [len(j.paths) for i, j in enumerate(plan.jobs) if i not in plan.reused]
    work = needs_workers(todo, len(plan.jobs)) or bool(plan_volume_jobs(store))
    result = run_stage(deidentify_flow, runtime, params, workers=work)
    return StageSummary.from_dict(Stage.DEIDENTIFY, params.site, result)

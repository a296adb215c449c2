"""Flow ``harmonise-series``: de-identified DICOM series to verified volumes, masks and QC.

Reads ``deid/series.parquet``, submits one Dask task per image series (with its RTSTRUCT and
SEG objects), and writes ``harmonised/<series>/`` (image, masks, QC picture, provenance),
``harmonised/series.parquet`` and the stage's quarantine rows. Series whose inputs, settings
and code are unchanged are skipped and nothing is rewritten. The run posts a QC report (small
thumbnails) and a table of outcomes to the Prefect UI, and fails when the share of failed
series exceeds ``max_failure_ratio`` (quarantined series do not count).
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import Field, ValidationError

from flows.runtime import RuntimeOptions, default_task_runner, run_stage
from flows.stage import (
    Grouping,
    StageParams,
    StageReport,
    failed_result,
    finish_stage,
    run_units,
)
from tasks.errors import OncoflowError, validation_message
from tasks.harmonise.config import HarmoniseConfig, load_config
from tasks.harmonise.plan import (
    outcome_rows,
    plan_harmonise,
    qc_report,
    quarantined_report,
    remove_stale,
    write_tables,
)
from tasks.harmonise.series import SeriesUnit, harmonise_series_task, series_row
from tasks.names import group_label
from tasks.records import Stage, StageSummary, Status, UnitOutcome
from tasks.store import HARMONISED_SERIES, SiteStore
from tasks.unit_state import needs_workers


class HarmoniseParams(StageParams):
    """One harmonisation run of a site (the Prefect UI form; no identifiers)."""

    config: HarmoniseConfig = Field(
        default_factory=HarmoniseConfig,
        description="Harmonisation settings (deployments/harmonise/config.yaml by default).",
    )
    qc_thumbnails: int = Field(
        24, ge=0, le=200, description="Series shown as thumbnails in the QC report."
    )


def build_params(
    site: str, store: str, config: str | None = None, max_failure_ratio: float = 0.1
) -> HarmoniseParams:
    """Build :class:`HarmoniseParams` from CLI values (``config``: a YAML file or None).

    Raises
    ------
    OncoflowError
        One line for any invalid value.
    """
    settings = load_config(config)
    try:
        return HarmoniseParams(
            site=site, store=store, config=settings, max_failure_ratio=max_failure_ratio
        )
    except ValidationError as exc:
        raise OncoflowError(validation_message(exc)) from None


def _failed(unit: SeriesUnit, exc: BaseException) -> UnitOutcome:
    result = failed_result(unit.series, exc)
    return UnitOutcome(result, series_row(unit, Status.FAILED, result.error_class))


@flow(
    name="harmonise-series",
    flow_run_name="harmonise-{params.site}",
    log_prints=False,
    task_runner=default_task_runner(),
)
def harmonise_flow(params: HarmoniseParams) -> dict[str, Any]:
    """Harmonise the site's de-identified image series into ``harmonised/``.

    Parameters
    ----------
    params
        Site, store, harmonisation settings, failure threshold.

    Returns
    -------
    dict
        The stage summary (counts by status and reason, series computed/reused, table key).

    Raises
    ------
    StageFailed
        When the share of failed series exceeds ``params.max_failure_ratio``.
    """
    store = params.open_store()
    plan = plan_harmonise(store, params.config)

    def args(unit: SeriesUnit) -> tuple[Any, ...]:
        return (params.store, params.site, unit, params.config)

    outcomes = run_units(
        plan.units,
        lambda unit: harmonise_series_task.submit(*args(unit)),
        _failed,
        "series harmonised",
        # series of a few slices several to a task
        Grouping(
            size=lambda unit: len(unit.keys),
            call=lambda unit: (harmonise_series_task.fn, args(unit)),
            name=lambda group: "harmonise-"
            + group_label((u.meta.get("modality", ""), u.series) for u in group),
        ),
        plan.reused,
    )
    written = write_tables(store, plan, outcomes, params.config)
    records = [*plan.records, *(r for o in outcomes for r in o.quarantine)]
    ok = {o.result.key for o in outcomes if o.result.status == Status.OK}
    report = StageReport(
        "Image harmonisation",
        outcome_rows(outcomes),
        "Harmonisation outcome per series",
        {
            "QC report": qc_report(store, outcomes, params.qc_thumbnails),
            "Quarantined by harmonisation": quarantined_report(store),
        },
    )
    return finish_stage(
        store,
        Stage.HARMONISE,
        params,
        [o.result for o in outcomes],
        records,
        report,
        "series",
        tables_written=written,
        stale_removed=remove_stale(store, ok),
        table=HARMONISED_SERIES,
        masks=sum(len(o.row["rois"]) for o in outcomes),
        unit_cpu_seconds=round(sum(o.cpu_seconds for o in outcomes), 2),
        masks_quarantined=sum(1 for r in records if r.kind == "mask"),
        config_hash=params.config.config_hash(),
    )


def harmonise(params: HarmoniseParams, runtime: RuntimeOptions) -> StageSummary:
    """Run :func:`harmonise_flow` on the Dask task runner.

    Parameters
    ----------
    params
        The flow parameters.
    runtime
        Workers or the address of an existing Dask scheduler.

    Returns
    -------
    StageSummary
        Counts, reasons and extras of the run.
    """
    # fail in one line before any service; no workers for an unchanged run or a small increment
    plan = plan_harmonise(SiteStore(params.store, params.site), params.config)
    todo = [len(u.keys) for i, u in enumerate(plan.units) if i not in plan.reused]
    work = needs_workers(todo, len(plan.units))
    result = run_stage(harmonise_flow, runtime, params, workers=work)
    return StageSummary.from_dict(Stage.HARMONISE, params.site, result)

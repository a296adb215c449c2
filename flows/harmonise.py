"""Flow ``harmonise-series``: de-identified DICOM series to verified volumes, masks and QC.

Reads ``deid/series.parquet``, submits one Dask task per image series (with its RTSTRUCT and
SEG objects), and writes ``harmonised/<series>/`` (image, masks, QC picture, provenance),
``harmonised/series.parquet`` and the stage's quarantine rows. Series whose inputs, settings
and code are unchanged are skipped and nothing is rewritten. The run posts a QC report (small
thumbnails) and a table of outcomes to the Prefect UI, and fails when the share of failed
series exceeds ``max_failure_ratio`` (quarantined series do not count).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from prefect import flow
from prefect.futures import as_completed
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.reporting import Progress, post_summary, post_table
from flows.runtime import RuntimeOptions, default_task_runner, run_on_dask
from tasks.errors import OncoflowError, StageFailed, validation_message
from tasks.harmonise.config import HarmoniseConfig, load_config
from tasks.harmonise.plan import plan_units, series_table
from tasks.harmonise.qc import thumbnail_data_uri
from tasks.harmonise.series import (
    SeriesOutcome,
    SeriesUnit,
    harmonise_series_task,
    output_dir,
    series_row,
)
from tasks.records import Stage, StageSummary, Status, UnitResult
from tasks.store import HARMONISED, HARMONISED_SERIES, SiteStore, validate_site


class HarmoniseParams(BaseModel):
    """One harmonisation run of a site (the Prefect UI form; no identifiers)."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(description="Site code: lowercase letters, digits, dashes.")
    store: str = Field(description="Site store URL (path, file://, s3://bucket/prefix).")
    config: HarmoniseConfig = Field(
        default_factory=HarmoniseConfig,
        description="Harmonisation settings (deployments/harmonise/config.yaml by default).",
    )
    max_failure_ratio: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Fail the run when more than this share of series fail with an error "
        "(quarantined series do not count).",
    )
    qc_thumbnails: int = Field(
        24, ge=0, le=200, description="Series shown as thumbnails in the QC report."
    )

    @model_validator(mode="after")
    def _valid_site(self) -> HarmoniseParams:
        validate_site(self.site)
        return self


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


def _failed(unit: SeriesUnit, exc: BaseException) -> SeriesOutcome:
    name = type(exc).__name__
    return SeriesOutcome(
        UnitResult(unit.series, Status.FAILED, error_class=name),
        series_row(unit, Status.FAILED, name),
    )


def _remove_stale(store: SiteStore, keep: set[str]) -> int:
    """Remove output folders of series that are no longer harmonised; return how many."""
    return store.prune(
        HARMONISED, {HARMONISED_SERIES, *(output_dir(s) for s in keep)}, children=True
    )


def qc_report(store: SiteStore, outcomes: list[SeriesOutcome], limit: int) -> str:
    """Markdown QC report: thumbnails of the first ``limit`` harmonised series, keys of the rest."""
    ok = [o for o in outcomes if o.result.status == Status.OK]
    if not ok:
        return "No harmonised series."
    cells, rest = [], []
    for outcome in ok:
        qc_key = f"{output_dir(outcome.result.key)}/qc.png"
        rois = ", ".join(outcome.row["rois"]) or "no ROI"
        caption = f"`{outcome.result.key[-12:]}` {outcome.row['intensity']}, {rois}"
        if len(cells) < limit:
            try:
                uri = thumbnail_data_uri(store.read_bytes(qc_key), size=96)
            except FileNotFoundError:
                rest.append(f"- {caption}: `{qc_key}` (missing)")
                continue
            cells.append(f"![qc]({uri}) {caption}")
        else:
            rest.append(f"- {caption}: `{qc_key}`")
    text = "Slice through the largest ROI cross-section, mask outlines in colour.\n\n"
    text += "\n\n".join(cells)
    if rest:
        text += "\n\nOther QC pictures (store keys):\n" + "\n".join(rest)
    return text


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
        The stage summary (counts by status and reason, series computed/skipped, table key).

    Raises
    ------
    StageFailed
        When the share of failed series exceeds ``params.max_failure_ratio``.
    """
    store = SiteStore(params.store, params.site)
    units, plan_records = plan_units(store)
    progress = Progress(len(units), "series harmonised")
    futures = {
        harmonise_series_task.submit(params.store, params.site, unit, params.config): unit
        for unit in units
    }
    outcomes: dict[str, SeriesOutcome] = {}
    for future in as_completed(list(futures)):
        unit = futures[future]
        try:
            outcomes[unit.series] = future.result()
        except Exception as exc:  # retries exhausted, worker lost for good, ...
            outcomes[unit.series] = _failed(unit, exc)
        progress.advance()
    ordered = [outcomes[u.series] for u in units]

    table = series_table([o.row for o in ordered])
    written = store.write_table(
        HARMONISED_SERIES,
        table,
        {"oncoflow.harmonise.config": json.dumps(params.config.model_dump(mode="json"))},
    )
    records = [*plan_records, *(r for o in ordered for r in o.quarantine)]
    store.replace_quarantine(Stage.HARMONISE, records)
    removed = _remove_stale(store, {o.result.key for o in ordered if o.result.status == Status.OK})

    results = [o.result for o in ordered]
    summary = StageSummary.from_results(
        Stage.HARMONISE,
        params.site,
        results,
        table=HARMONISED_SERIES,
        table_written=written,
        series_computed=sum(1 for r in results if r.status == Status.OK and r.computed),
        series_skipped=sum(1 for r in results if r.status == Status.OK and not r.computed),
        masks=sum(len(o.row["rois"]) for o in ordered),
        masks_quarantined=sum(1 for r in records if r.kind == "mask"),
        stale_removed=removed,
        config_hash=params.config.config_hash(),
    )
    post_summary(
        summary,
        "Image harmonisation",
        {"QC report": qc_report(store, ordered, params.qc_thumbnails)},
    )
    post_table(
        params.site,
        str(Stage.HARMONISE),
        "outcomes",
        [
            {
                "series": o.result.key[-12:],
                "status": str(o.result.status),
                "reason": o.result.reason or o.result.error_class,
                "intensity": o.row["intensity"] or "",
                "rois": ", ".join(o.row["rois"]),
                "size": "x".join(str(v) for v in o.row["size"] or []),
                "spacing": "x".join(f"{v:.3g}" for v in o.row["spacing"] or []),
                "computed": o.result.computed,
            }
            for o in ordered
        ],
        "Harmonisation outcome per series",
    )
    if summary.failure_ratio > params.max_failure_ratio:
        failed = Counter(r.error_class or "error" for r in results if r.status == Status.FAILED)
        raise StageFailed(
            f"harmonise: {summary.counts.get('failed', 0)} of {len(results)} series failed "
            f"({summary.failure_ratio:.0%} > {params.max_failure_ratio:.0%}): "
            + ", ".join(f"{k}={v}" for k, v in sorted(failed.items()))
        )
    return summary.to_dict()


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
    plan_units(SiteStore(params.store, params.site))  # fail in one line before any service
    result = run_on_dask(harmonise_flow, runtime, params)
    return StageSummary.from_dict(Stage.HARMONISE, params.site, result)

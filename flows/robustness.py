"""Flow ``feature-robustness``: perturbed replicas and negative controls of every harmonised ROI.

One Dask task per image computes the replicas and controls of its ROIs with
:mod:`tasks.radiomics.robustness` through the content-addressed cache; the flow then writes
``features/<params-hash>.robustness.parquet`` (one row per feature: ICC(3,1) across replicas,
``stable``, correlation with each negative control) and posts a summary with the least stable
features. The run fails when the share of failed ROIs exceeds ``max_failure_ratio``.
"""

from __future__ import annotations

import math
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, ValidationError

from flows.extract import ExtractParams, image_run_name, image_submitter, select_rois
from flows.extract import build_params as build_extract_params
from flows.reporting import markdown_table
from flows.runtime import RuntimeOptions, default_task_runner, pin_native_threads, run_on_dask
from flows.stage import StageReport, finish_stage, run_units
from tasks.errors import OncoflowError, validation_message
from tasks.radiomics.cache import read_parts
from tasks.radiomics.extract import RoiUnit
from tasks.radiomics.params import RadiomicsParams
from tasks.radiomics.plan import group_by_image
from tasks.radiomics.robustness import (
    DEFAULT_ICC_THRESHOLD,
    RobustnessOutcome,
    robustness_image,
    robustness_key,
    robustness_metadata,
    robustness_table,
)
from tasks.records import Stage, StageSummary, Status
from tasks.store import SiteStore


class RobustnessParams(ExtractParams):
    """The extract form plus the ICC threshold (the Prefect UI form)."""

    icc_threshold: float = Field(
        DEFAULT_ICC_THRESHOLD,
        ge=0.0,
        le=1.0,
        description="A feature is stable when its ICC(3,1) across replicas is at least this.",
    )


def build_params(
    site: str,
    store: str,
    params: str,
    series: list[str] | None = None,
    rois: list[str] | None = None,
    modalities: list[str] | None = None,
    icc_threshold: float = DEFAULT_ICC_THRESHOLD,
) -> RobustnessParams:
    """Build :class:`RobustnessParams` from CLI values (one-line error when invalid)."""
    base = build_extract_params(site, store, params, series, rois, 0.1, modalities)
    try:
        return RobustnessParams(**base.model_dump(), icc_threshold=icc_threshold)
    except ValidationError as exc:
        raise OncoflowError(validation_message(exc)) from None


@task(
    name="robustness-image",
    task_run_name=image_run_name("robustness"),
    retries=2,
    retry_delay_seconds=2,
    cache_policy=NO_CACHE,
)
def robustness_task(
    store_url: str, site: str, units: list[RoiUnit], params: RadiomicsParams
) -> list[RobustnessOutcome]:
    """Compute the replicas and controls of the ROIs of one image on a worker.

    The task run is named ``robustness-<modality>-<ROIs>-<end of the pseudonymous series key>``.
    """
    pin_native_threads()
    return robustness_image(SiteStore(store_url, site), units, params)


def _failed(group: list[RoiUnit], exc: BaseException) -> list[RobustnessOutcome]:
    """Return the outcomes of an image whose task raised after its retries (error class only)."""
    name = type(exc).__name__
    return [RobustnessOutcome(u.key, Status.FAILED, detail=name, error_class=name) for u in group]


def collect_values(
    store: SiteStore, outcomes: list[RobustnessOutcome]
) -> dict[str, dict[str, dict[str, float]]]:
    """Read the cached features of every variant of the ``ok`` outcomes."""
    ok = [o for o in outcomes if o.status == Status.OK]
    parts = read_parts(store, sorted({k for o in ok for ks in o.variants.values() for k in ks}))
    values: dict[str, dict[str, dict[str, float]]] = {}
    for outcome in ok:
        per_variant = {}
        for name, keys in outcome.variants.items():
            if all(k in parts for k in keys):
                per_variant[name] = {f: v for k in keys for f, v in parts[k].features.items()}
        values[outcome.key] = per_variant
    return values


@flow(
    name="feature-robustness",
    flow_run_name="robustness-{params.site}",
    log_prints=False,
    task_runner=default_task_runner(),
)
def robustness_flow(params: RobustnessParams) -> dict[str, Any]:
    """Assess feature robustness and negative controls of the site's harmonised ROIs.

    Parameters
    ----------
    params
        Site, store, parameters, filters, ICC threshold, failure threshold.

    Returns
    -------
    dict
        The stage summary (counts, table key, stable features).

    Raises
    ------
    StageFailed
        When the share of failed ROIs exceeds ``params.max_failure_ratio``.
    """
    store, radiomics_params, source, _, units = select_rois(params)
    params_hash = radiomics_params.params_hash()
    groups = group_by_image(units)
    submit = image_submitter(robustness_task, params, radiomics_params, groups)
    done = run_units(groups, submit, _failed, "images assessed")
    outcomes = [o for group in done for o in group]
    table = robustness_table(collect_values(store, outcomes), params.icc_threshold)
    key = robustness_key(params_hash)
    written = store.write_table(key, table, robustness_metadata(params_hash, params.icc_threshold))
    rows = table.to_pylist()
    stable = sum(1 for r in rows if r["stable"])
    return finish_stage(
        store,
        Stage.ROBUSTNESS,
        params,
        [o.unit_result() for o in outcomes],
        [],  # a ROI without features is quarantined by the extract stage already
        _report(key, rows, source, params.icc_threshold, outcomes),
        "ROIs",
        tables_written=[key] if written else [],
        params=source,
        params_hash=params_hash,
        table=key,
        features=len(rows),
        stable=stable,
        icc_threshold=params.icc_threshold,
        variants_computed=sum(o.computed for o in outcomes),
    )


def _report(
    key: str,
    rows: list[dict[str, Any]],
    source: str,
    threshold: float,
    outcomes: list[RobustnessOutcome],
) -> StageReport:
    """Return what a robustness run shows in the Prefect UI: the table and its least stable."""
    finite = [r for r in rows if r["icc"] is not None and math.isfinite(r["icc"])]
    least = sorted(finite, key=lambda r: r["icc"])[:10]
    stable = sum(1 for r in rows if r["stable"])
    return StageReport(
        "Feature robustness",
        [o.outcome_row() for o in outcomes if o.status != Status.OK or o.missing],
        "ROIs not assessed on every replica and control",
        {
            "Table": f"`{key}`: {stable} of {len(rows)} features stable "
            f"(ICC(3,1) >= {threshold}), parameters `{source}`",
            "Least stable features": markdown_table(
                [
                    {
                        "feature": r["feature"],
                        "ibsi": r["ibsi"],
                        "icc": f"{r['icc']:.3f}",
                        "corr shuffled": _fmt(r["corr_shuffled"]),
                        "corr random ROI": _fmt(r["corr_random_roi"]),
                    }
                    for r in least
                ],
                ["feature", "ibsi", "icc", "corr shuffled", "corr random ROI"],
            ),
        },
    )


def _fmt(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.2f}"


def assess_robustness(params: RobustnessParams, runtime: RuntimeOptions) -> StageSummary:
    """Validate the parameters, then run :func:`robustness_flow` on the Dask task runner.

    Raises
    ------
    OncoflowError
        One line when the parameters are invalid, nothing is harmonised, or the filters select
        no ROI.
    """
    if not select_rois(params).units:
        raise OncoflowError(
            f"no harmonised ROI of site {params.site} matches the filters "
            f"(modalities: {','.join(params.modality_filter()) or 'all'})"
        )
    result = run_on_dask(robustness_flow, runtime, params)
    return StageSummary.from_dict(Stage.ROBUSTNESS, params.site, result)

"""Flow ``feature-robustness``: perturbed replicas and negative controls of every harmonised ROI.

One Dask task per (series, ROI) computes the replicas and controls of
:mod:`tasks.radiomics.robustness` through the content-addressed cache; the flow then writes
``features/<params-hash>.robustness.parquet`` (one row per feature: ICC(3,1) across replicas,
``stable``, correlation with each negative control) and posts a summary with the least stable
features. The run fails when the share of failed ROIs exceeds ``max_failure_ratio``.
"""

from __future__ import annotations

import math
from typing import Any

import dask
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from pydantic import Field, ValidationError

from flows.extract import ExtractParams, select_checked
from flows.extract import build_params as build_extract_params
from flows.reporting import Progress, markdown_table, post_summary
from flows.runtime import RuntimeOptions, default_task_runner, pin_native_threads, run_on_dask
from tasks.errors import OncoflowError, StageFailed, validation_message
from tasks.radiomics.cache import read_parts
from tasks.radiomics.extract import RoiUnit, plan_units
from tasks.radiomics.params import RadiomicsParams, load_params
from tasks.radiomics.robustness import (
    CONTROLS,
    DEFAULT_ICC_THRESHOLD,
    REPLICAS,
    RobustnessOutcome,
    robustness_key,
    robustness_table,
    robustness_unit,
)
from tasks.records import Stage, StageSummary, Status, UnitResult
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
    name="robustness-roi",
    task_run_name="robustness-{unit.roi}-{unit.image_sha256:.12}",
    retries=2,
    retry_delay_seconds=2,
    cache_policy=NO_CACHE,
)
def robustness_task(
    store_url: str, site: str, unit: RoiUnit, params: RadiomicsParams
) -> RobustnessOutcome:
    """Compute the replicas and controls of one (series, ROI) on a worker."""
    pin_native_threads()
    return robustness_unit(SiteStore(store_url, site), unit, params)


def _unit_result(outcome: RobustnessOutcome) -> UnitResult:
    return UnitResult(
        key=outcome.key,
        status=outcome.status,
        reason=outcome.detail if outcome.status == Status.QUARANTINED else "",
        error_class="InputError" if outcome.status == Status.FAILED else "",
        detail=outcome.detail,
        computed=outcome.computed > 0,
    )


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
    radiomics_params, source = load_params(params.params_spec())
    store = SiteStore(params.store, params.site)
    params_hash = radiomics_params.params_hash()
    units = select_checked(store, plan_units(store), params, radiomics_params)
    progress = Progress(len(units), "ROIs assessed")
    futures = {}
    for rank, unit in enumerate(units):
        with dask.annotate(priority=len(units) - rank):
            futures[robustness_task.submit(params.store, params.site, unit, radiomics_params)] = (
                unit
            )
    outcomes: list[RobustnessOutcome] = []
    for future in as_completed(list(futures)):
        try:
            outcomes.append(future.result())
        except Exception as exc:  # retries exhausted, worker lost for good
            unit = futures[future]
            outcomes.append(RobustnessOutcome(unit.key, Status.FAILED, detail=type(exc).__name__))
        progress.advance()
    outcomes.sort(key=lambda o: o.key)
    table = robustness_table(collect_values(store, outcomes), params.icc_threshold)
    key = robustness_key(params_hash)
    metadata = {
        "oncoflow.table": "robustness",
        "oncoflow.params_hash": params_hash,
        "oncoflow.icc_threshold": str(params.icc_threshold),
        "oncoflow.replicas": ",".join(REPLICAS),
        "oncoflow.controls": ",".join(CONTROLS),
    }
    written = store.write_table(key, table, metadata)
    results = [_unit_result(o) for o in outcomes]
    rows = table.to_pylist()
    stable = sum(1 for r in rows if r["stable"])
    summary = StageSummary.from_results(
        Stage.ROBUSTNESS,
        params.site,
        results,
        params=source,
        params_hash=params_hash,
        table=key,
        table_written=written,
        features=len(rows),
        stable=stable,
        icc_threshold=params.icc_threshold,
        variants_computed=sum(o.computed for o in outcomes),
    )
    finite = [r for r in rows if r["icc"] is not None and math.isfinite(r["icc"])]
    least = sorted(finite, key=lambda r: r["icc"])[:10]
    post_summary(
        summary,
        "Feature robustness",
        {
            "Table": f"`{key}`: {stable} of {len(rows)} features stable "
            f"(ICC(3,1) >= {params.icc_threshold}), parameters `{source}`",
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
    if summary.failure_ratio > params.max_failure_ratio:
        raise StageFailed(
            f"robustness: {summary.counts.get('failed', 0)} of {len(results)} ROIs failed "
            f"({summary.failure_ratio:.0%} > {params.max_failure_ratio:.0%})"
        )
    return summary.to_dict()


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
    radiomics_params, _ = load_params(params.params_spec())
    store = SiteStore(params.store, params.site)
    if not select_checked(store, plan_units(store), params, radiomics_params):
        raise OncoflowError(
            f"no harmonised ROI of site {params.site} matches the filters "
            f"(modalities: {','.join(params.modality_filter()) or 'all'})"
        )
    result = run_on_dask(robustness_flow, runtime, params)
    return StageSummary.from_dict(Stage.ROBUSTNESS, params.site, result)

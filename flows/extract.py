"""Flow ``extract-radiomics``: pyradiomics features of every harmonised (series, ROI).

Reads ``harmonised/series.parquet``, submits one Dask task per image with ROIs to compute
(each filtered image made once for all of the image's ROIs), largest images first, each
computing only what the content-addressed cache lacks, and writes
``features/<params-hash>.parquet`` plus the stage's quarantine rows. The run fails (final state
Failed) when the share of failed units exceeds ``max_failure_ratio``; quarantined ROIs (empty,
one voxel, outside the image, ...) do not count as failures.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import dask
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.reporting import Progress, markdown_table, post_summary, post_table
from flows.runtime import (
    RuntimeOptions,
    default_task_runner,
    ensure_prefect_api,
    pin_native_threads,
    run_on_dask,
)
from tasks.errors import OncoflowError, StageFailed, validation_message
from tasks.radiomics.cache import read_parts
from tasks.radiomics.diagnostics import diagnostics_table, diagnostics_table_key, ok_pairs
from tasks.radiomics.extract import (
    RoiOutcome,
    RoiUnit,
    extract_image_rois,
    plan_units,
    select_units,
)
from tasks.radiomics.filters import check_label, check_selection, inventory
from tasks.radiomics.params import Preset, RadiomicsParams, load_params
from tasks.radiomics.sr import reports_prefix, write_reports
from tasks.radiomics.table import (
    KEY_COLUMNS,
    PROV_COLUMNS,
    STATUS_COLUMNS,
    FeatureRow,
    build_features_table,
    features_key,
)
from tasks.records import QuarantineRecord, Stage, StageSummary, Status
from tasks.research.methods import methods_metadata
from tasks.store import SiteStore, validate_site

FIXED_COLUMNS = (*KEY_COLUMNS, *STATUS_COLUMNS, *PROV_COLUMNS)


class ExtractParams(BaseModel):
    """What a researcher chooses for one extraction run (the Prefect UI form)."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(description="Site code: lowercase letters, digits, dashes.")
    store: str = Field(description="Site store URL (path, file://, s3://bucket/prefix).")
    preset: Preset | None = Field(
        None,
        description="Parameter preset from deployments/radiomics/ (ct, mr, pet). "
        "Leave empty when giving a parameter file.",
    )
    params_file: str | None = Field(
        None,
        description="Path or URL of a pyradiomics parameter file (YAML or JSON), instead of a "
        "preset.",
    )
    series: list[str] = Field(
        default_factory=list,
        description="Only these pseudonymous series keys (empty: every harmonised series).",
    )
    rois: list[str] = Field(
        default_factory=list, description="Only these ROI names (empty: every ROI)."
    )
    modalities: list[str] | None = Field(
        None,
        description="Only these modalities (CT, MR, PT). Empty: the preset's own modality, or "
        "every modality with a parameter file.",
    )
    max_failure_ratio: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Fail the run when more than this share of ROIs fail with an error "
        "(quarantined ROIs do not count).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ExtractParams:
        validate_site(self.site)
        if (self.preset is None) == (self.params_file is None):
            raise ValueError("give exactly one of preset or params_file")
        return self

    def modality_filter(self) -> list[str]:
        """Return the modalities to extract: as given, else the preset's, else all (``[]``)."""
        if self.modalities:
            return [m.upper() for m in self.modalities]
        return [self.preset.modality] if self.preset is not None else []

    def explicit_filters(self) -> tuple[list[str], list[str], list[str]]:
        """Return the series, ROI and modality filters the user gave (not the preset's)."""
        return list(self.series), list(self.rois), [m.upper() for m in self.modalities or []]

    def params_spec(self) -> str:
        """Return the preset name or parameter-file location, as :func:`load_params` takes it."""
        return self.params_file if self.params_file is not None else str(self.preset)


def build_params(
    site: str,
    store: str,
    params: str,
    series: list[str] | None = None,
    rois: list[str] | None = None,
    max_failure_ratio: float = 0.1,
    modalities: list[str] | None = None,
) -> ExtractParams:
    """Build :class:`ExtractParams` from CLI values; ``params`` is a preset name or a file.

    Raises
    ------
    OncoflowError
        One line for any invalid value.
    """
    presets = {p.value for p in Preset}
    is_preset = params.strip().lower() in presets and not Path(params).exists()
    try:
        return ExtractParams(
            site=site,
            store=store,
            preset=Preset(params.strip().lower()) if is_preset else None,
            params_file=None if is_preset else params,
            series=list(series or []),
            rois=list(rois or []),
            modalities=list(modalities) if modalities else None,
            max_failure_ratio=max_failure_ratio,
        )
    except ValidationError as exc:
        raise OncoflowError(validation_message(exc)) from None


@task(
    name="extract-image",
    task_run_name="extract-{units[0].image_sha256:.12}",
    retries=2,
    retry_delay_seconds=2,
    cache_policy=NO_CACHE,
)
def extract_image_task(
    store_url: str, site: str, units: list[RoiUnit], params: RadiomicsParams
) -> list[RoiOutcome]:
    """Extract the ROIs of one image on a worker, each filtered image made once.

    One native thread per worker process.
    Store errors other than a missing object propagate, so Prefect retries them.
    """
    pin_native_threads()
    return extract_image_rois(SiteStore(store_url, site), units, params)


def group_by_image(units: list[RoiUnit]) -> list[list[RoiUnit]]:
    """Group units by image, keeping the units' order (largest images first).

    Parameters
    ----------
    units
        Units in scheduling order.

    Returns
    -------
    list of list of RoiUnit
        One group per image, in the order of each image's first unit.
    """
    groups: dict[tuple[str, str], list[RoiUnit]] = {}
    for unit in units:
        groups.setdefault((unit.image, unit.image_sha256), []).append(unit)
    return list(groups.values())


def _collect_rows(
    store: SiteStore, units: list[RoiUnit], outcomes: dict[str, RoiOutcome]
) -> list[FeatureRow]:
    """Read the cached parts of every finished unit and build table rows.

    An ``ok`` outcome whose parts cannot be found any more is replaced in ``outcomes`` by a
    failed one.
    """
    keys = sorted({k for o in outcomes.values() if o.status == Status.OK for k in o.parts})
    parts = read_parts(store, keys)
    rows = []
    for unit in units:
        outcome = outcomes.get(unit.key)
        if outcome is None:
            continue
        features: dict[str, float] = {}
        if outcome.status == Status.OK:
            if not all(key in parts for key in outcome.parts):
                # a part vanished between the task and now (pruned cache): report, never guess
                outcome = RoiOutcome(
                    unit.key,
                    Status.FAILED,
                    error_class="CacheMiss",
                    detail="a cached result disappeared: re-run the extraction",
                )
                outcomes[unit.key] = outcome
            else:
                for key in outcome.parts:
                    features.update(parts[key].features or {})
        rows.append(
            FeatureRow(
                unit=unit,
                status=str(outcome.status),
                reason=outcome.reason,
                detail=outcome.detail or outcome.error_class,
                features=features,
            )
        )
    return rows


def _cached_outcomes(
    store: SiteStore, units: list[RoiUnit], params: RadiomicsParams
) -> dict[str, RoiOutcome]:
    """Outcomes of units whose every part is already cached (nothing to compute for them)."""
    from tasks.radiomics.cache import object_key, plan_parts

    parts = plan_parts(params)
    wanted = {u.key: [object_key(u.image_sha256, u.mask_sha256, p) for p in parts] for u in units}
    found = read_parts(store, [k for keys in wanted.values() for k in keys])
    out: dict[str, RoiOutcome] = {}
    for key, keys in wanted.items():
        if not all(k in found for k in keys):
            continue
        bad = next((found[k] for k in keys if not found[k].ok), None)
        status = Status.QUARANTINED if bad else Status.OK
        out[key] = RoiOutcome(
            key,
            status,
            reason=bad.reason if bad else "",
            detail=bad.detail if bad else "",
            parts=tuple(keys),
            parts_reused=len(keys),
        )
    return out


@flow(
    name="extract-radiomics",
    flow_run_name="extract-{params.site}",
    log_prints=False,
    task_runner=default_task_runner(),
)
def extract_flow(params: ExtractParams) -> dict[str, Any]:
    """Extract pyradiomics features of the site's harmonised (series, ROI) pairs.

    Parameters
    ----------
    params
        Site, store, parameter preset or file, optional series/ROI filters, failure threshold.

    Returns
    -------
    dict
        The stage summary (counts by status and reason, params hash, table key, cache use).

    Raises
    ------
    StageFailed
        When the share of failed units exceeds ``params.max_failure_ratio``.
    """
    radiomics_params, source = load_params(params.params_spec())
    store = SiteStore(params.store, params.site)
    params_hash = radiomics_params.params_hash()
    every_unit = plan_units(store)
    units = select_checked(store, every_unit, params, radiomics_params)
    if not units:
        summary = nothing_to_extract(params, source, params_hash, inventory(every_unit))
        post_summary(summary, "Radiomics extraction", {"Note": str(summary.extra["note"])})
        return summary.to_dict()

    progress = Progress(len(units), "ROIs extracted")
    # units whose every part is cached are settled here: no task run, no worker round trip
    outcomes: dict[str, RoiOutcome] = _cached_outcomes(store, units, radiomics_params)
    if outcomes:
        progress.advance(len(outcomes))
    to_compute = [u for u in units if u.key not in outcomes]
    futures = {}
    groups = group_by_image(to_compute)
    for rank, group in enumerate(groups):  # largest images first, also by Dask priority
        with dask.annotate(priority=len(groups) - rank):
            future = extract_image_task.submit(params.store, params.site, group, radiomics_params)
        futures[future] = group
    for future in as_completed(list(futures)):
        group = futures[future]
        try:
            done = future.result()
        except Exception as exc:  # retries exhausted, worker lost for good, ...
            done = [RoiOutcome(u.key, Status.FAILED, error_class=type(exc).__name__) for u in group]
        for outcome in done:
            outcomes[outcome.key] = outcome
        progress.advance(len(done))

    selected = {u.key for u in units}
    others = [u for u in every_unit if u.key not in selected]
    kept = _cached_outcomes(store, others, radiomics_params) if others else {}
    merged = {**kept, **outcomes}
    rows = _collect_rows(store, every_unit, merged)  # may turn an outcome into a failure
    outcomes = {key: merged[key] for key in outcomes}
    table, metadata = build_features_table(params.site, rows, radiomics_params)
    metadata.update(methods_metadata(store, radiomics_params, [r.unit.series for r in rows]))
    key = features_key(params_hash)
    written = store.write_table(key, table, metadata)
    store.write_table(
        diagnostics_table_key(params_hash),
        diagnostics_table(store, ok_pairs(rows), radiomics_params),
        {"oncoflow.table": "diagnostics", "oncoflow.params_hash": params_hash},
    )
    quarantined = [
        QuarantineRecord(
            item=r.unit.key, kind="mask", stage=Stage.EXTRACT, reason=r.reason, detail=r.detail
        )
        for r in rows
        if r.status == str(Status.QUARANTINED)
    ]
    store.replace_quarantine(Stage.EXTRACT, quarantined)
    reports = Counter(o.status for o in write_reports(store, table, params_hash))

    results = [outcomes[u.key].unit_result() for u in units]
    summary = StageSummary.from_results(
        Stage.EXTRACT,
        params.site,
        results,
        params=source,
        modalities=",".join(params.modality_filter()) or "all",
        params_hash=params_hash,
        table=key,
        table_written=written,
        rows=table.num_rows,
        feature_columns=table.num_columns - len(FIXED_COLUMNS),
        parts_computed=sum(outcomes[u.key].parts_computed for u in units),
        parts_reused=sum(outcomes[u.key].parts_reused for u in units),
        compute_cpu_seconds=round(sum(outcomes[u.key].compute_seconds for u in units), 1),
        sr_reports=dict(sorted(reports.items())),
    )
    post_summary(
        summary,
        "Radiomics extraction",
        {
            "Table": f"`{key}`: {table.num_rows} rows, parameters `{source}`",
            "DICOM SR": f"`{reports_prefix(params_hash)}/`: "
            + (", ".join(f"{n} {s}" for s, n in sorted(reports.items())) or "none"),
            "Cache": markdown_table(
                [
                    {"parts": "computed", "count": summary.extra["parts_computed"]},
                    {"parts": "reused", "count": summary.extra["parts_reused"]},
                ],
                ["parts", "count"],
            ),
        },
    )
    post_table(
        params.site,
        str(Stage.EXTRACT),
        "quarantine",
        [{"roi": q.item, "reason": str(q.reason), "detail": q.detail} for q in quarantined],
        "ROIs quarantined by the extract stage",
    )
    if summary.failure_ratio > params.max_failure_ratio:
        failed = Counter(r.error_class or "error" for r in results if r.status == Status.FAILED)
        raise StageFailed(
            f"extract: {summary.counts.get('failed', 0)} of {len(results)} ROIs failed "
            f"({summary.failure_ratio:.0%} > {params.max_failure_ratio:.0%}): "
            + ", ".join(f"{k}={v}" for k, v in sorted(failed.items()))
        )
    return summary.to_dict()


def select_checked(
    store: SiteStore, units: list[RoiUnit], params: ExtractParams, radiomics: RadiomicsParams
) -> list[RoiUnit]:
    """Select the units to extract; a filter the user gave that matches nothing is an error.

    The preset's own modality is not a user filter: ``--params mr`` on a CT-only site selects
    nothing and the run reports it (the site pipeline runs every preset it was given).

    Raises
    ------
    OncoflowError
        One line naming the filter and what the site has, or a ``label`` no mask carries.
    """
    series, rois, modalities = params.explicit_filters()
    if series or rois or modalities:
        check_selection(units, series, rois, modalities)
    selected = select_units(units, params.series, params.rois, params.modality_filter())
    check_label(store, selected, radiomics)
    return selected


def nothing_to_extract(
    params: ExtractParams, source: str, params_hash: str, have: str = ""
) -> StageSummary:
    """Return the summary of a run whose filters select no (series, ROI): nothing is written."""
    modalities = ",".join(params.modality_filter()) or "all"
    return StageSummary(
        stage=Stage.EXTRACT,
        site=params.site,
        extra={
            "params": source,
            "modalities": modalities,
            "params_hash": params_hash,
            "table": None,
            "rows": 0,
            "note": f"nothing to extract: no harmonised ROI matches the filters "
            f"(modalities: {modalities}; the site has {have or 'nothing harmonised'})",
        },
    )


def extract_radiomics(params: ExtractParams, runtime: RuntimeOptions) -> StageSummary:
    """Validate the parameters, then run :func:`extract_flow` on the Dask task runner.

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
    # before starting any service: fail in one line on bad parameters or no harmonised table,
    # and return at once when the filters select nothing
    radiomics_params, source = load_params(params.params_spec())
    store = SiteStore(params.store, params.site)
    every_unit = plan_units(store)
    selected = select_checked(store, every_unit, params, radiomics_params)
    if not selected:
        return nothing_to_extract(
            params, source, radiomics_params.params_hash(), inventory(every_unit)
        )
    if len(_cached_outcomes(store, selected, radiomics_params)) == len(selected):
        # every result is cached: the flow only assembles the table, no Dask cluster to start
        from prefect.task_runners import ThreadPoolTaskRunner

        ensure_prefect_api()
        result = extract_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(params)
    else:
        result = run_on_dask(extract_flow, runtime, params)
    return StageSummary.from_dict(Stage.EXTRACT, params.site, result)

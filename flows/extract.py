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
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, ValidationError, model_validator

from flows.reporting import markdown_table, post_summary
from flows.runtime import (
    RuntimeOptions,
    default_task_runner,
    pin_native_threads,
    run_stage,
)
from flows.stage import StageParams, StageReport, finish_stage, run_units
from tasks.errors import OncoflowError, validation_message
from tasks.names import task_label
from tasks.radiomics.extract import (
    RoiUnit,
    extract_image_rois,
    plan_units,
    select_units,
)
from tasks.radiomics.filters import check_label, check_selection, inventory
from tasks.radiomics.params import Preset, RadiomicsParams, check_with_pyradiomics, load_params
from tasks.radiomics.plan import (
    cached_outcomes,
    collect_rows,
    failed_outcomes,
    group_by_image,
    quarantine_records,
)
from tasks.radiomics.sr import reports_prefix, write_reports
from tasks.radiomics.table import (
    FIXED_COLUMNS,
    features_key,
    recorded_metadata,
    table_metadata,
    written_with,
)
from tasks.radiomics.table_writer import plan_features, write_diagnostics_parts
from tasks.records import Stage, StageSummary, UnitOutcome
from tasks.research.methods import methods_metadata
from tasks.store import SiteStore


class ExtractParams(StageParams):
    """What a researcher chooses for one extraction run (the Prefect UI form)."""

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

    @model_validator(mode="after")
    def _one_source(self) -> ExtractParams:
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


def image_run_name(stage: str) -> Callable[..., str]:
    """Return the task-run namer of a task over the ROIs of one image (parameter ``units``).

    Names read ``<stage>-<modality>-<ROIs>-<end of the pseudonymous series key>``, for example
    ``extract-CT-gtv+node-459818``: never an identifier, never a content hash alone.
    """

    def name(parameters: dict[str, Any]) -> str:
        units = parameters.get("units") or []
        if not units:
            return stage
        rois = "+".join(sorted({u.roi for u in units}))
        return f"{stage}-" + task_label(units[0].modality, units[0].series, rois)

    return name


@task(
    name="extract-image",
    task_run_name=image_run_name("extract"),
    retries=2,
    retry_delay_seconds=2,
    cache_policy=NO_CACHE,
)
def extract_image_task(
    store_url: str, site: str, units: list[RoiUnit], params: RadiomicsParams
) -> list[UnitOutcome]:
    """Extract the ROIs of one image on a worker, each filtered image made once.

    One native thread per worker process.
    Store errors other than a missing object propagate, so Prefect retries them.
    """
    pin_native_threads()
    return extract_image_rois(SiteStore(store_url, site), units, params)


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
    store, radiomics_params, source, every_unit, units = select_rois(params)
    params_hash = radiomics_params.params_hash()
    if not units:
        summary = nothing_to_extract(params, source, params_hash, inventory(every_unit))
        post_summary(summary, "Radiomics extraction", {"Note": str(summary.extra["note"])})
        return summary.to_dict()
    # units whose every part is cached are settled here: no task run, no worker round trip
    outcomes = cached_outcomes(store, units, radiomics_params)
    groups = group_by_image([u for u in units if u.key not in outcomes])
    submit = image_submitter(extract_image_task, params, radiomics_params, groups)
    done = run_units(groups, submit, failed_outcomes, "images extracted")
    outcomes.update({o.result.key: o for group in done for o in group})
    others = [u for u in every_unit if u.key not in outcomes]
    kept = cached_outcomes(store, others, radiomics_params) if others else {}
    merged = {**kept, **outcomes}
    rows = collect_rows(store, every_unit, merged)  # may turn an outcome into a failure
    results = [merged[u.key] for u in units]
    computed = {o.result.key for o in results if o.written}
    out = _write_outputs(store, params, radiomics_params, rows, computed)
    return finish_stage(
        store,
        Stage.EXTRACT,
        params,
        [o.result for o in results],
        quarantine_records(rows),
        _report(out, source, params_hash, rows, results),
        "ROIs",
        tables_written=[features_key(params_hash)] if out.written else [],
        stale_removed=out.removed,
        params=source,
        modalities=",".join(params.modality_filter()) or "all",
        params_hash=params_hash,
        table=features_key(params_hash),
        rows=out.rows,
        feature_columns=out.feature_columns,
        parts_computed=sum(o.written for o in results),
        parts_reused=sum(o.reused for o in results),
        compute_cpu_seconds=round(sum(o.cpu_seconds for o in results), 1),
        sr_reports=dict(sorted(out.reports.items())),
    )


def image_submitter(
    image_task: Any, params: ExtractParams, radiomics: RadiomicsParams, groups: list[list[RoiUnit]]
) -> Callable[[list[RoiUnit]], Any]:
    """Return the submitter of a task over one image's ROIs (``groups`` of the plan).

    Larger images (earlier groups) get a higher Dask priority; ``image_task`` takes the store
    URL, the site, the image's units and the parameters.
    """
    priority = {id(g): len(groups) - rank for rank, g in enumerate(groups)}

    def submit(group: list[RoiUnit]) -> Any:
        import dask  # here: a run with nothing to compute never imports it

        with dask.annotate(priority=priority[id(group)]):
            return image_task.submit(params.store, params.site, group, radiomics)

    return submit


class Outputs(NamedTuple):
    """What :func:`_write_outputs` did: the table's size and what was written."""

    rows: int
    feature_columns: int
    written: bool
    removed: int
    reports: Counter[str]


def _write_outputs(
    store: SiteStore,
    params: ExtractParams,
    radiomics_params: RadiomicsParams,
    rows: list,
    computed: set[str],
) -> Outputs:
    """Write what changed in the features table, its diagnostics and the DICOM SR reports.

    The rows are compared with the table before anything is built: a run in which nothing
    changed writes nothing. The features table is committed last, so a run killed before it
    leaves the same changes to the next run (diagnostics and reports are rewritten as needed).
    """
    params_hash = radiomics_params.params_hash()
    # effective settings: a function of the parameters and pyradiomics' version (computing them
    # imports pyradiomics), so the entry a table of the same two records is reused
    known = recorded_metadata(store, radiomics_params).get(b"oncoflow.effective_settings")
    metadata = table_metadata(radiomics_params)
    series = [r.unit.series for r in rows]
    metadata.update(
        methods_metadata(store, radiomics_params, series, known.decode() if known else None)
    )
    plan = plan_features(store, params.site, rows, radiomics_params, metadata)
    schema = plan.schema
    if plan.unchanged and schema is not None:
        return Outputs(len(rows), len(schema) - len(FIXED_COLUMNS), False, 0, Counter())
    table = plan.build()
    touched = {(r.unit.series, r.unit.roi) for r in rows if r.unit.key in computed}
    write_diagnostics_parts(store, plan, touched)
    removed = None if plan.full else plan.gone
    reports = Counter(o.status for o in write_reports(store, table, params_hash, removed))
    written = plan.commit(table)  # its columns are the table's (built rows fit its schema)
    feature_columns = table.num_columns - len(FIXED_COLUMNS)
    return Outputs(len(rows), feature_columns, written.changed, len(plan.gone), reports)


def _report(
    out: Outputs,
    source: str,
    params_hash: str,
    rows: list,
    results: list[UnitOutcome],
) -> StageReport:
    """Return what an extraction run shows in the Prefect UI."""
    cache = [
        {"parts": "computed", "count": sum(o.written for o in results)},
        {"parts": "reused", "count": sum(o.reused for o in results)},
    ]
    return StageReport(
        "Radiomics extraction",
        [
            {"roi": q.item, "reason": str(q.reason), "detail": q.detail}
            for q in quarantine_records(rows)
        ],
        "ROIs quarantined by the extract stage",
        {
            "Table": f"`{features_key(params_hash)}`: {out.rows} rows, parameters `{source}`"
            + ("" if out.written else " (unchanged)"),
            "DICOM SR": f"`{reports_prefix(params_hash)}/`: "
            + (", ".join(f"{n} {s}" for s, n in sorted(out.reports.items())) or "none written"),
            "Cache": markdown_table(cache, ["parts", "count"]),
        },
        rows_name="quarantine",
    )


class RoiSelection(NamedTuple):
    """What a run on the site's harmonised ROIs works on (see :func:`select_rois`)."""

    store: SiteStore
    radiomics: RadiomicsParams
    source: str
    every_unit: list[RoiUnit]
    units: list[RoiUnit]


def select_rois(params: ExtractParams) -> RoiSelection:
    """Load the pyradiomics parameters, plan the site's ROIs and select those of the filters.

    Used by extract and robustness, in the flow and before it starts (one-line errors).

    Returns
    -------
    RoiSelection
        The store, the parameters and their source label, every harmonised (series, ROI) and
        the selected ones (largest images first).

    Raises
    ------
    OncoflowError
        One line: invalid parameters, nothing harmonised, a filter matching nothing.
    """
    radiomics_params, source = load_params(params.params_spec(), pyradiomics_check=False)
    store = params.open_store()
    if not written_with(store, radiomics_params):
        # pyradiomics' own schema (importing pyradiomics and SimpleITK): passed by the run that
        # wrote the features table of these very parameters with this pyradiomics, if any
        check_with_pyradiomics(radiomics_params, source)
    every_unit = plan_units(store)
    units = select_checked(store, every_unit, params, radiomics_params)
    return RoiSelection(store, radiomics_params, source, every_unit, units)


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
    store, radiomics_params, source, every_unit, selected = select_rois(params)
    if not selected:
        return nothing_to_extract(
            params, source, radiomics_params.params_hash(), inventory(every_unit)
        )
    # every result cached: the flow only assembles the table, no Dask cluster to start
    every_cached = len(cached_outcomes(store, selected, radiomics_params)) == len(selected)
    result = run_stage(extract_flow, runtime, params, workers=not every_cached)
    return StageSummary.from_dict(Stage.EXTRACT, params.site, result)

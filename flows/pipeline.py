"""The site pipeline: ingest → deidentify → harmonise → extract → publish, as subflows.

One pydantic parameter model drives the whole chain (the Prefect UI form of the nightly and
weekly deployments). One Dask cluster serves every stage of a run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

from prefect import flow, tags
from prefect.runtime import flow_run
from pydantic import Field, model_validator

from flows.reporting import artifact_key, markdown_table
from flows.runtime import RuntimeOptions, dashboard_link, dask_cluster
from flows.stage import SiteParams
from tasks.records import Stage, StageSummary

StageName = Literal["ingest", "deidentify", "harmonise", "extract", "publish"]
ALL_STAGES: tuple[StageName, ...] = ("ingest", "deidentify", "harmonise", "extract", "publish")


class SitePipelineParams(SiteParams):
    """One run of a site's pipeline (no identifiers, no secrets: those come from the site)."""

    source: str = Field(
        description="Where the site's DICOM is: folder, file://, s3://, or dicomweb+http://...",
    )
    stages: list[StageName] = Field(
        default_factory=lambda: [s for s in ALL_STAGES if s != "publish"],
        description="Stages to run, in pipeline order.",
    )
    params: list[str] = Field(
        default_factory=lambda: ["ct"],
        description="Radiomics presets (ct, mr, pet) or parameter files; one feature table each.",
    )
    cohort: str | None = Field(None, description="Cohort spec (YAML) to publish.")
    to: str | None = Field(
        None,
        description="Publication URL (s3://bucket/prefix or a folder).",
    )
    runtime: RuntimeOptions = Field(
        default_factory=RuntimeOptions,
        description="Dask workers or an existing scheduler.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SitePipelineParams:
        if "publish" in self.stages and not (self.cohort and self.to):
            raise ValueError("the publish stage needs both cohort and to")
        return self


def ingest_any(
    source: str, site: str, store: str, runtime: RuntimeOptions, **pull: Any
) -> StageSummary:
    """Ingest from any source: a ``dicomweb+http(s)://`` PACS, a folder / fsspec URL, or NIfTI/NRRD.

    A PACS pull lands studies in the site's raw zone and ingests that, so both kinds of source
    feed the same catalogue. ``pull`` holds :class:`flows.pacs.PullParams` options (modalities,
    dates, secret block), used for a DICOMweb source only.
    """
    from tasks.pacs.dicomweb import is_dicomweb_source

    if is_dicomweb_source(source):
        from flows.pacs import PullParams, pull_dicomweb

        return pull_dicomweb(PullParams(source=source, site=site, store=store, **pull), runtime)
    from tasks.volumes.cases import is_volume_source

    if is_volume_source(source):  # a cases CSV or a folder of NIfTI/NRRD pairs
        from flows.volumes import ingest_volumes

        return ingest_volumes(source, site, store)
    from flows.ingest import IngestParams, ingest_dicom

    return ingest_dicom(IngestParams(source=source, site=site, store=store), runtime=runtime)


def _run_stage(stage: StageName, p: SitePipelineParams) -> list[StageSummary]:
    """Run one stage as a subflow (lazy imports keep start-up light)."""
    rt = p.runtime
    if stage == "ingest":
        return [ingest_any(p.source, p.site, p.store, rt)]
    if stage == "deidentify":
        from flows.deidentify import build_params, deidentify

        return [deidentify(build_params(p.site, p.store), rt)]
    if stage == "harmonise":
        from flows.harmonise import build_params, harmonise

        return [harmonise(build_params(p.site, p.store), rt)]
    if stage == "extract":
        from flows.extract import build_params, extract_radiomics

        return [extract_radiomics(build_params(p.site, p.store, spec), rt) for spec in p.params]
    from flows.publish import build_params, publish

    assert p.cohort and p.to  # checked by the model
    result = publish(build_params(p.site, p.store, p.cohort, p.to), rt)
    outcome = "published" if result.get("created") else "unchanged"
    extra = {k: v for k, v in result.items() if k not in ("stage", "site")}
    return [StageSummary(stage=Stage.PUBLISH, site=p.site, counts={outcome: 1}, extra=extra)]


def stage_rows(summaries: list[StageSummary]) -> list[dict[str, Any]]:
    """One row per stage run: outcome counts and how much work was done or reused."""
    return [
        {
            "stage": str(s.stage),
            **{k: s.counts.get(k, 0) for k in ("ok", "quarantined", "failed")},
            "computed": s.computed,
            "reused": s.reused,
            "tables_written": len(s.tables_written),
        }
        for s in summaries
    ]


#: What one counted item is, per stage (the report says it, so the counts can be compared).
UNITS = {
    "ingest": "files",
    "deidentify": "series",
    "harmonise": "image series",
    "extract": "ROIs",
    "publish": "versions",
}


def report_rows(summaries: list[StageSummary]) -> list[dict[str, Any]]:
    """One row per stage run and unit: outcomes, reasons, and how the counts relate.

    Ingest counts files and, on a row of its own, series; later stages count series (the
    de-identified series include segmentations, which harmonise turns into the masks of their
    image series), ROIs or versions.
    """
    rows: list[dict[str, Any]] = []
    deidentified = 0
    for s in summaries:
        stage = str(s.stage)
        kinds = s.extra.get("reasons_by_kind") or {}
        row = {
            "stage": stage,
            "counted": UNITS.get(stage, "items"),
            "outcomes": _join(s.counts),
            "reasons": _join(kinds.get("file", {}) if kinds else s.reasons),
            "note": "",
        }
        if stage == "deidentify":
            deidentified = s.counts.get("ok", 0)
        if stage == "harmonise" and deidentified:
            images = sum(s.counts.values())
            row["note"] = (
                f"{images} of the {deidentified} de-identified series are images; the other "
                f"{max(deidentified - images, 0)} (segmentations, other objects) are not "
                f"harmonised on their own ({s.extra.get('masks', 0)} masks made from them)"
            )
        if stage == "extract":
            row["note"] = f"{s.extra.get('params', '')}; modalities {s.extra.get('modalities', '')}"
        rows.append(row)
        if stage == "ingest" and isinstance(s.extra.get("series"), dict):
            rows.append(
                {
                    "stage": "ingest",
                    "counted": "series",
                    "outcomes": _join(s.extra["series"]),
                    "reasons": _join(kinds.get("series", {})),
                    "note": "series made of the files above",
                }
            )
    return rows


def _join(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def report_markdown(site: str, summaries: list[StageSummary], dashboard: str | None = None) -> str:
    """Render the run report: per stage and counted unit, outcomes, reasons and notes.

    Parameters
    ----------
    site
        Site code.
    summaries
        The stage summaries of the run.
    dashboard
        URL of the Dask dashboard the run used (linked while the run lasts), if any.
    """
    where = (
        f"Dask dashboard of this run (live while it runs): [{dashboard}]({dashboard})"
        if dashboard
        else "Dask dashboard: none for this run (an external cluster's own, or turned off)."
    )
    return "\n\n".join(
        [
            f"# Site pipeline `{site}`",
            markdown_table(
                report_rows(summaries), ["stage", "counted", "outcomes", "reasons", "note"]
            ),
            "Quarantined items are listed by reference in each stage's quarantine table; "
            f"`oncoflow quarantine --site {site} --store STORE REF` shows the item on the "
            "site's host.",
            where,
        ]
    )


def run_site_stages(params: SitePipelineParams) -> dict[str, Any]:
    """Run the requested stages of one site in order in the current flow run; post the report.

    The stages are subflows of the current run, and the report and stage table are artifacts
    of it: the run an operator opens (``oncoflow run``'s, or a deployment's) holds them.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    summaries: list[StageSummary] = []
    with tags(f"site:{params.site}"), dask_cluster(params.runtime):
        dashboard = dashboard_link()
        for stage in ALL_STAGES:
            if stage in params.stages:
                summaries.extend(_run_stage(stage, params))
    create_markdown_artifact(
        markdown=report_markdown(params.site, summaries, dashboard),
        key=artifact_key(params.site, "pipeline-report"),
        description=f"Site pipeline report ({flow_run.get_name() or params.site})",
    )
    create_table_artifact(
        table=stage_rows(summaries),
        key=artifact_key(params.site, "pipeline-stages"),
        description="Per stage: outcomes, and work done or reused",
    )
    return {"site": params.site, "stages": [s.to_dict() for s in summaries]}


@flow(name="site-pipeline", flow_run_name="site-pipeline-{params.site}", log_prints=False)
def site_pipeline(params: SitePipelineParams) -> dict[str, Any]:
    """Run the requested stages of one site in order; stop at the first stage that fails.

    Parameters
    ----------
    params
        Source, site, store, stages and their options.

    Returns
    -------
    dict
        ``{"site": ..., "stages": [stage summaries as dicts]}``.
    """
    return run_site_stages(params)


def run_pipeline(params: SitePipelineParams) -> dict[str, Any]:
    """Run :func:`site_pipeline` from the CLI (starts or reuses the Prefect API first)."""
    from flows.runtime import ensure_prefect_api, pin_native_threads

    pin_native_threads()
    ensure_prefect_api()
    with tags("oncoflow", f"site:{params.site}"):
        return site_pipeline(params)


class SiteConfig(SiteParams):
    """A site's configuration file in ``deployments/sites/`` (non-secret values only)."""

    source: str
    publication: str | None = None
    radiomics: list[str] = Field(default_factory=lambda: ["ct"])
    cohort: str | None = None
    workers: int | None = Field(None, ge=1)
    dask_address: str | None = None

    def pipeline_params(self, stages: list[StageName]) -> SitePipelineParams:
        """Return the pipeline parameters for ``stages`` of this site.

        ``workers`` and ``dask_address`` left empty in the file come from the worker host's
        ``ONCOFLOW_WORKERS`` and ``ONCOFLOW_DASK_ADDRESS`` (the production topology is chosen
        by the host's configuration, not by the repository).
        """
        host = RuntimeOptions.from_env()
        return SitePipelineParams(
            source=self.source,
            site=self.site,
            store=self.store,
            stages=stages,
            params=self.radiomics,
            cohort=self.cohort if "publish" in stages else None,
            to=self.publication if "publish" in stages else None,
            runtime=RuntimeOptions(
                workers=self.workers or host.workers,
                dask_address=self.dask_address or host.dask_address,
                dashboard=host.dashboard,
            ),
        )


def check_store(config: SiteConfig) -> None:
    """Fail in one line when the site's store cannot be reached (no credentials, no bucket).

    Raises
    ------
    OncoflowError
        Naming the store and what to set, instead of a botocore traceback mid-run.
    """
    from tasks.errors import OncoflowError
    from tasks.store import SiteStore

    try:
        store = SiteStore(config.store, config.site)
        store.exists("")
    except OncoflowError:
        raise
    except Exception as exc:
        name = type(exc).__name__
        if name in {"NoCredentialsError", "PartialCredentialsError", "NoRegionError"}:
            raise OncoflowError(
                f"cannot reach the store {config.store} of {config.site}: {name} (set the S3 "
                "credentials in the worker's environment, docs/production.md §3)"
            ) from None
        raise OncoflowError(f"cannot reach the store {config.store}: {name}: {exc}") from None


def load_site_config(path: str) -> SiteConfig:
    """Read and validate a site configuration YAML file, with a one-line error."""
    import yaml
    from pydantic import ValidationError

    from tasks.errors import OncoflowError

    try:
        with open(path, encoding="utf-8") as fh:
            return SiteConfig.model_validate(yaml.safe_load(fh))
    except FileNotFoundError:
        raise OncoflowError(f"site config not found: {path}") from None
    except (yaml.YAMLError, ValidationError) as exc:
        first = str(exc).splitlines()[0:3]
        raise OncoflowError(f"invalid site config {path}: {' '.join(first)}") from None


def tag_current_run(*new_tags: str) -> None:
    """Add tags to the current flow run itself (a deployment's run starts with its own tags)."""
    from prefect.client.orchestration import get_client

    run_id = flow_run.get_id()
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id).tags or []
        wanted = [*current, *(t for t in new_tags if t not in current)]
        if wanted != current:
            client.update_flow_run(run_id, tags=wanted)


def open_site_run(site_config: str) -> SiteConfig:
    """Start a deployment's run from the site's file: read it, tag the run, check the store.

    Returns
    -------
    SiteConfig
        The validated site configuration (the run now carries ``site:<site>``).
    """
    config = load_site_config(site_config)
    tag_current_run(f"site:{config.site}")
    check_store(config)
    return config


def _scheduled_run_name() -> str:
    """Name a scheduled run after its site and stages, e.g. ``site-a-ingest-to-extract``."""
    parameters = flow_run.get_parameters() or {}
    site = Path(str(parameters.get("site_config") or "site")).stem
    with contextlib.suppress(Exception):
        site = load_site_config(str(parameters["site_config"])).site
    stages = list(parameters.get("stages") or DEFAULT_SCHEDULED)
    span = stages[0] if len(stages) == 1 else f"{stages[0]}-to-{stages[-1]}"
    return f"{site}-{span}"


DEFAULT_SCHEDULED: list[StageName] = ["ingest", "deidentify", "harmonise", "extract"]


@flow(name="site-pipeline-scheduled", flow_run_name=_scheduled_run_name)
def scheduled_site_pipeline(
    site_config: str = "deployments/sites/site-a.yaml",
    stages: list[StageName] | None = None,
) -> dict[str, Any]:
    """Run the site pipeline from the site's configuration file (what deployments schedule).

    The stages run as subflows of this run, which carries the ``site:<site>`` tag and the
    report artifacts: the run an operator opens from ``prefect deployment run`` shows it all.

    Parameters
    ----------
    site_config
        Site configuration file in the repository (``deployments/sites/<site>.yaml``).
    stages
        Stages to run (default: ingest to extract).
    """
    config = open_site_run(site_config)
    chosen = list(stages or DEFAULT_SCHEDULED)
    result = run_site_stages(config.pipeline_params(chosen))
    if "harmonise" in chosen:
        _refresh_on_demand_form(config.site, config.store)
    return result


def _refresh_on_demand_form(site: str, store: str) -> None:
    """Offer the site's current series and ROIs in its on-demand form (never fails the run)."""
    from prefect import get_run_logger

    from flows.on_demand_form import offer_form_choices

    logger = get_run_logger()
    try:
        if offer_form_choices(site, store):
            logger.info("on-demand form of %s: series and ROI choices updated", site)
    except Exception as exc:  # the form is a convenience: the run's outcome stands
        logger.warning("on-demand form of %s not updated: %s", site, type(exc).__name__)

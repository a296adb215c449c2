"""The site pipeline: ingest → deidentify → harmonise → extract → publish, as subflows.

One pydantic parameter model drives the whole chain (the Prefect UI form of the nightly and
weekly deployments). One Dask cluster serves every stage of a run.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, tags
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.reporting import artifact_key, markdown_table
from flows.runtime import RuntimeOptions, dask_cluster
from tasks.records import Stage, StageSummary
from tasks.store import validate_site

StageName = Literal["ingest", "deidentify", "harmonise", "extract", "publish"]
ALL_STAGES: tuple[StageName, ...] = ("ingest", "deidentify", "harmonise", "extract", "publish")


class SitePipelineParams(BaseModel):
    """One run of a site's pipeline (no identifiers, no secrets: those come from the site)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        description="Where the site's DICOM is: folder, file://, s3://, or dicomweb+http://...",
        json_schema_extra={"position": 0},
    )
    site: str = Field(
        description="Site code: lowercase letters, digits, dashes.",
        json_schema_extra={"position": 1},
    )
    store: str = Field(
        description="Site store URL (path, file://, s3://bucket/prefix).",
        json_schema_extra={"position": 2},
    )
    stages: list[StageName] = Field(
        default_factory=lambda: [s for s in ALL_STAGES if s != "publish"],
        description="Stages to run, in pipeline order.",
        json_schema_extra={"position": 3},
    )
    params: list[str] = Field(
        default_factory=lambda: ["ct"],
        description="Radiomics presets (ct, mr, pet) or parameter files; one feature table each.",
        json_schema_extra={"position": 4},
    )
    cohort: str | None = Field(
        None, description="Cohort spec (YAML) to publish.", json_schema_extra={"position": 5}
    )
    to: str | None = Field(
        None,
        description="Publication URL (s3://bucket/prefix or a folder).",
        json_schema_extra={"position": 6},
    )
    runtime: RuntimeOptions = Field(
        default_factory=RuntimeOptions,
        description="Dask workers or an existing scheduler.",
        json_schema_extra={"position": 7},
    )

    @model_validator(mode="after")
    def _consistent(self) -> SitePipelineParams:
        validate_site(self.site)
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


def report_markdown(site: str, summaries: list[StageSummary]) -> str:
    """Render the run report: one row per stage run with its outcome counts and reasons."""
    rows = [
        {
            "stage": str(s.stage),
            "outcomes": ", ".join(f"{k} {v}" for k, v in s.counts.items()) or "-",
            "reasons": ", ".join(f"{k} {v}" for k, v in s.reasons.items()) or "-",
        }
        for s in summaries
    ]
    return "\n\n".join(
        [
            f"# Site pipeline `{site}`",
            markdown_table(rows, ["stage", "outcomes", "reasons"]),
        ]
    )


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
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    summaries: list[StageSummary] = []
    with tags(f"site:{params.site}"), dask_cluster(params.runtime):
        for stage in ALL_STAGES:
            if stage in params.stages:
                summaries.extend(_run_stage(stage, params))
    create_markdown_artifact(
        markdown=report_markdown(params.site, summaries),
        key=artifact_key(params.site, "pipeline-report"),
        description=f"Site pipeline report ({flow_run.get_name() or params.site})",
    )
    create_table_artifact(
        table=stage_rows(summaries),
        key=artifact_key(params.site, "pipeline-stages"),
        description="Per stage: outcomes, and work done or reused",
    )
    return {"site": params.site, "stages": [s.to_dict() for s in summaries]}


def run_pipeline(params: SitePipelineParams) -> dict[str, Any]:
    """Run :func:`site_pipeline` from the CLI (starts or reuses the Prefect API first)."""
    from flows.runtime import ensure_prefect_api, pin_native_threads

    pin_native_threads()
    ensure_prefect_api()
    with tags("oncoflow", f"site:{params.site}"):
        return site_pipeline(params)


class SiteConfig(BaseModel):
    """A site's configuration file in ``deployments/sites/`` (non-secret values only)."""

    model_config = ConfigDict(extra="forbid")

    site: str
    source: str
    store: str
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
            ),
        )


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


@flow(name="site-pipeline-scheduled")
def scheduled_site_pipeline(
    site_config: str = "deployments/sites/site-a.yaml",
    stages: list[StageName] | None = None,
) -> dict[str, Any]:
    """Run the site pipeline from the site's configuration file (what deployments schedule).

    Parameters
    ----------
    site_config
        Site configuration file in the repository (``deployments/sites/<site>.yaml``).
    stages
        Stages to run (default: ingest to extract).
    """
    chosen = list(stages or ["ingest", "deidentify", "harmonise", "extract"])
    return site_pipeline(load_site_config(site_config).pipeline_params(chosen))

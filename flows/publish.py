"""Flow ``publish-cohort``: a cohort spec to an immutable, verified version on object storage.

Plans the cohort in the flow (selection, tables, content hash), stops when the latest version
already has this content, runs the leak gate at the site on every series' files (one Dask task
per series) and on the tables, manifest and checksums, and only then stages every series' files
(one Dask task per series), verifies and commits (``tasks.cohort.publish`` explains the
protocol). A new version emits the Prefect event ``oncoflow.cohort.published`` and a link
artifact to its manifest. Any series that cannot be gated or staged fails the run and nothing is
committed: a cohort is published whole or not at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.events import emit_event
from pydantic import Field, ValidationError

from flows.reporting import artifact_key, markdown_table, post_summary
from flows.runtime import RuntimeOptions, default_task_runner, run_on_dask
from flows.stage import SiteParams, failed_result, run_units
from tasks.cohort.publish import (
    GateOutcome,
    PublishPlan,
    PublishResult,
    SealedVersion,
    finalize,
    gate_files,
    gate_sealed,
    plan_publication,
    prepare_target,
    refuse,
    seal_version,
    stage_files,
)
from tasks.cohort.select import PlannedFile, check_publishable
from tasks.cohort.spec import load_spec
from tasks.cohort.storage import Retrier, RetryPolicy
from tasks.errors import OncoflowError, StageFailed, validation_message
from tasks.records import Stage, StageSummary, Status, UnitResult
from tasks.store import SiteStore

EVENT = "oncoflow.cohort.published"


class PublishParams(SiteParams):
    """One publication of a cohort by a site (the Prefect UI form; no identifiers)."""

    cohort: str = Field(description="Cohort spec YAML file (see deployments/cohorts/).")
    to: str = Field(description="Publication root URL, e.g. s3://bucket/cohorts.")
    retry_attempts: int = Field(8, ge=1, le=50, description="Attempts per storage call.")
    retry_base_delay: float = Field(
        0.2, ge=0.0, le=60.0, description="Backoff base in seconds (doubles, full jitter)."
    )
    date_published: str | None = Field(
        None, description="ISO date for the manifest (default: today)."
    )

    @property
    def policy(self) -> RetryPolicy:
        """Retry policy for storage calls."""
        return RetryPolicy(attempts=self.retry_attempts, base_delay=self.retry_base_delay)


def build_params(site: str, store: str, cohort: str, to: str) -> PublishParams:
    """Build :class:`PublishParams` from CLI values (one-line error when invalid)."""
    try:
        return PublishParams(site=site, store=store, cohort=cohort, to=to)
    except ValidationError as exc:
        raise OncoflowError(validation_message(exc)) from None


@task(name="gate-series", task_run_name="gate-{series}")
def gate_series_task(
    store_url: str, site: str, series: str, files: list[PlannedFile]
) -> GateOutcome:
    """Run the leak gate on one series' files at the site (reads the store, uploads nothing)."""
    return gate_files(SiteStore(store_url, site), files)


def _gate_all(params: PublishParams, plan: PublishPlan) -> GateOutcome:
    """Gate every series' files with one task per series; one line error when a task fails."""
    outcomes = run_units(
        sorted(plan.files.items()),
        lambda unit: gate_series_task.submit(params.store, params.site, unit[0], unit[1]),
        lambda unit, exc: exc,  # collected below: any series not gated stops the publication
        "series gated",
    )
    errors = sorted(_first_line(o) for o in outcomes if isinstance(o, BaseException))
    if errors:
        raise StageFailed(
            f"{len(errors)} of {len(outcomes)} series could not be gated ({errors[0]}); "
            "nothing was published"
        )
    total = GateOutcome()
    for outcome in outcomes:
        total.findings.extend(outcome.findings)
        total.sizes.update(outcome.sizes)
    return total


def _first_line(exc: BaseException) -> str:
    """Return an expected error's first line, or only the class of an unexpected one."""
    if isinstance(exc, OncoflowError):
        return str(exc).splitlines()[0][:200]
    return f"{type(exc).__name__} while gating a series"


def _gate_and_seal(params: PublishParams, plan: PublishPlan, retry: Retrier) -> SealedVersion:
    """Run the leak gate on every series and on the sealed objects; refuse on any finding.

    The gate runs at the site on every object first; the target receives bytes only after it
    passed (``tasks.cohort.publish`` explains the protocol).
    """
    outcome = _gate_all(params, plan)
    sealed = seal_version(plan, outcome.sizes, retry, params.date_published)
    findings = outcome.findings + gate_sealed(params.open_store(), sealed)
    if findings:
        raise refuse(plan, findings, retry)
    return sealed


@task(name="stage-series", task_run_name="stage-{series}")
def stage_series_task(
    store_url: str,
    site: str,
    plan: PublishPlan,
    series: str,
    files: list[PlannedFile],
    policy: RetryPolicy,
) -> UnitResult:
    """Upload one series' files to the staging prefix (a record, never an exception)."""
    try:
        uploaded, reused = stage_files(SiteStore(store_url, site), plan, files, Retrier(policy))
    except Exception as exc:
        detail = str(exc).splitlines()[0][:200] if isinstance(exc, OncoflowError) else ""
        return UnitResult(series, Status.FAILED, error_class=type(exc).__name__, detail=detail)
    return UnitResult(
        series,
        Status.OK,
        detail=f"uploaded {len(uploaded)}, reused {reused}",
        outputs=tuple(uploaded),
        computed=bool(uploaded),
    )


def _stage_all(params: PublishParams, plan: PublishPlan) -> list[UnitResult]:
    """Stage every series' files (one task per series); any failure stops the publication.

    Raises
    ------
    StageFailed
        When a series could not be staged: nothing is committed, a new run resumes.
    """
    results = run_units(
        sorted(plan.files.items()),
        lambda unit: stage_series_task.submit(
            params.store, params.site, _slim(plan, unit[1]), unit[0], unit[1], params.policy
        ),
        lambda unit, exc: failed_result(unit[0], exc),
        "series staged",
    )
    failed = [r for r in results if r.status == Status.FAILED]
    if failed:
        first = failed[0]
        raise StageFailed(
            f"{len(failed)} of {len(results)} series could not be staged "
            f"({first.error_class}: {first.detail or 'see the task logs'}); "
            "nothing was published, run again to resume"
        )
    return results


def _slim(plan: PublishPlan, files: list[PlannedFile]) -> PublishPlan:
    """Return the part of a plan a staging task needs (no tables, its own staged names)."""
    names = {f.name for f in files}
    return dataclasses.replace(
        plan,
        description={},
        files={},
        tables={},
        schemas={},
        staged={k: v for k, v in plan.staged.items() if k in names},
        report_markdown="",
    )


def _announce(result: PublishResult, counts: dict[str, Any]) -> None:
    """Emit the published event and the link artifact of a new version."""
    emit_event(
        event=EVENT,
        resource={
            "prefect.resource.id": f"oncoflow.cohort.{result.site}.{result.cohort}",
            "prefect.resource.name": result.cohort,
            "oncoflow.site": result.site,
            "oncoflow.version": result.version,
        },
        payload={
            "site": result.site,
            "cohort": result.cohort,
            "version": result.version,
            "url": result.url,
            "manifest": f"{result.url}/manifest.json",
            "content_hash": result.content_hash,
            "series": counts.get("series", 0),
            "patients": counts.get("patients", 0),
        },
    )


def _report(
    params: PublishParams, plan: PublishPlan, result: PublishResult, results: list[UnitResult]
) -> None:
    """Post the summary, the cohort report and the link to the version's manifest."""
    counts = plan.description["counts"]
    extra = {k: v for k, v in result.to_dict().items() if k not in ("stage", "site")}
    summary = StageSummary.from_results(
        Stage.PUBLISH, params.site, results, **extra, series=counts["series"]
    )
    post_summary(
        summary,
        f"Cohort {result.cohort} {result.version}"
        + (" published" if result.created else " unchanged"),
        {
            "Counts by modality": markdown_table(
                [{"modality": k, "series": v} for k, v in counts["by_modality"]["series"].items()],
                ["modality", "series"],
            )
        },
    )
    if plan.report_markdown:
        create_markdown_artifact(
            markdown=plan.report_markdown,
            key=artifact_key(params.site, "publish", result.cohort, "report"),
            description="report.html of the cohort version: QC pictures, distributions, robustness",
        )
    create_link_artifact(
        link=f"{result.url}/manifest.json",
        link_text=f"{result.cohort} {result.version} manifest",
        key=artifact_key(params.site, "publish", result.cohort),
        description="Croissant manifest of the published cohort version",
    )


@flow(
    name="publish-cohort",
    flow_run_name="publish-{params.site}",
    log_prints=False,
    task_runner=default_task_runner(),
)
def publish_flow(params: PublishParams) -> dict[str, Any]:
    """Publish a cohort version of one site (or do nothing when the content is unchanged).

    Parameters
    ----------
    params
        Site, store, cohort spec, publication root, retry settings.

    Returns
    -------
    dict
        The publish result (version, URL, content hash, counts of files).

    Raises
    ------
    StageFailed
        When a series could not be gated or staged (nothing is committed).
    """
    retry = Retrier(params.policy)
    plan = plan_publication(params.open_store(), load_spec(params.cohort), params.to)
    done, cleaned = prepare_target(plan, retry)
    results: list[UnitResult] = []
    if done is None:
        sealed = _gate_and_seal(params, plan, retry)
        results = _stage_all(params, plan)
        result = finalize(plan, sealed, retry)
        result.cleaned = cleaned
        result.uploaded = sum(len(r.outputs) for r in results)
        result.reused = sum(len(files) for files in plan.files.values()) - result.uploaded
    else:
        result = done
    _report(params, plan, result, results)
    if result.created:
        _announce(result, plan.description["counts"])
    return result.to_dict()


def publish(params: PublishParams, runtime: RuntimeOptions) -> dict[str, Any]:
    """Run the publish flow on the configured task runner (what the CLI and tests call).

    The spec and the site's inputs are checked first, so a bad spec is one line, not a
    failed flow run with a traceback.
    """
    check_publishable(SiteStore(params.store, params.site), load_spec(params.cohort))
    return run_on_dask(publish_flow, runtime, params)

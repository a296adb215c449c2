"""PACS flows: ``pull-dicomweb`` (QIDO-RS search, WADO-RS retrieval on Dask, normal ingest).

The pull lands complete series in the site's raw zone and then runs the normal ingest on the
PACS part of the raw zone (``STORE/<site>/raw/pacs``), so PACS data feeds the same catalogue
and stages as a folder or S3 source. The C-STORE receiver (``oncoflow receive``) lives in
:mod:`tasks.pacs.receiver`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time
from dataclasses import asdict
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from pydantic import Field, field_validator

from flows.reporting import artifact_key, markdown_table, post_table
from flows.runtime import RuntimeOptions, dask_cluster, ensure_prefect_api, task_runner
from flows.stage import Grouping, StageParams, failure_ratio, run_units
from tasks.errors import StageFailed
from tasks.names import group_label
from tasks.pacs.credentials import load_credentials
from tasks.pacs.dicomweb import (
    PACS_ZONE,
    PullSettings,
    PullSettlement,
    PullState,
    SeriesHandle,
    SeriesPull,
    clean_staging,
    describe_error,
    dicomweb_client,
    now_iso,
    parse_date,
    parse_source,
    plan_handles,
    plan_pull,
    pull_series,
    pull_series_task,
    settle_pull,
    study_date_filter,
    write_plan,
)
from tasks.pacs.receiver import ReceiverStats, StorageReceiver
from tasks.records import Stage, StageSummary
from tasks.refs import site_ref_key
from tasks.store import SiteStore


class PullParams(StageParams):
    """Parameters of a DICOMweb pull (no identifiers, no credentials)."""

    source: str = Field(
        description="DICOMweb source, e.g. dicomweb+http://pacs:8042/dicom-web "
        "(credentials come from the environment or a Prefect Secret block)."
    )
    modalities: list[str] = Field(
        default_factory=list,
        description="Pull studies containing any of these modalities (e.g. CT, MR); empty: all.",
    )
    since: str = Field(
        "last",
        description="'last': studies dated from the last successful pull on (minus "
        "overlap_days); 'all': no lower date bound; or a date YYYY-MM-DD.",
    )
    until: str | None = Field(None, description="Latest study date YYYY-MM-DD (inclusive).")
    overlap_days: int = Field(1, ge=0, le=365, description="Days re-searched before the watermark.")
    secret_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the DICOMweb credentials."
    )
    retries: int = Field(3, ge=0, le=10, description="Retries per series (exponential backoff).")
    group_below: int = Field(
        1000,
        ge=0,
        description="Series with fewer instances share a task with other small series "
        "(0: a task per series).",
    )
    group_instances: int = Field(
        2000, ge=1, description="Largest number of instances pulled by one shared task."
    )
    retry_delay_seconds: float = Field(2.0, ge=0, le=600, description="First retry delay.")
    timeout_seconds: float = Field(60.0, gt=0, le=3600, description="HTTP read timeout.")
    max_failure_ratio: float = failure_ratio(0.2, "studies")
    ingest: bool = Field(True, description="Run the normal ingest on the raw zone afterwards.")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        parse_source(value)
        return value.strip()

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str]) -> list[str]:
        out = sorted({m.strip().upper() for m in value if m.strip()})
        for m in out:
            if not m.isalnum() or len(m) > 16:
                raise ValueError(f"invalid modality {m!r}")
        return out

    @field_validator("since")
    @classmethod
    def _since(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("last", "all"):
            parse_date(value, "--since date")
        return value

    @field_validator("until")
    @classmethod
    def _until(cls, value: str | None) -> str | None:
        if value:
            parse_date(value, "--until date")
        return value


def pull_planned_series(
    settings: PullSettings, plan: str, group_below: int = 1000, group_instances: int = 2000
) -> dict[str, dict[str, Any]]:
    """Pull the series of a plan on the current flow run's task runner and wait on all of them.

    Series with fewer than ``group_below`` instances share tasks (see :func:`series_grouping`);
    larger ones get a task each. Tasks get pseudonymous handles and resolve the UIDs from the
    plan in the private zone themselves.

    Parameters
    ----------
    settings
        DICOMweb source, site store, timeout and retries.
    plan
        Store-relative key of the plan written by ``pull-dicomweb`` (it holds the UIDs).
    group_below, group_instances
        Grouping of small series (:func:`series_grouping`).

    Returns
    -------
    dict
        Per series key: the :class:`SeriesPull` fields, or ``{"error": <one line>}``.
    """
    handles = plan_handles(SiteStore(settings.store_url, settings.site), plan)
    outcomes = run_units(
        handles,
        lambda handle: pull_series_task.submit(handle, settings),
        lambda handle, exc: {"error": describe_error(exc)},
        "series pulled over DICOMweb",
        series_grouping(handles, settings, group_below, group_instances, worker_slots()),
    )
    return {
        h.series_key: o if isinstance(o, dict) else asdict(o)
        for h, o in zip(handles, outcomes, strict=True)
    }


@flow(name="pull-dicomweb-series", flow_run_name="pull-series-{settings.site}", log_prints=False)
def pull_series_flow(
    settings: PullSettings, plan: str, group_below: int = 1000, group_instances: int = 2000
) -> dict[str, dict[str, Any]]:
    """Subflow of :func:`pull_planned_series` on the ``runtime`` of a deployment's run."""
    return pull_planned_series(settings, plan, group_below, group_instances)


def _dask_runner() -> Any:
    """Return the current flow run's Dask task runner, or None when it runs on another."""
    from prefect_dask import DaskTaskRunner

    runner = getattr(FlowRunContext.get(), "task_runner", None)
    return runner if isinstance(runner, DaskTaskRunner) else None


def on_dask() -> bool:
    """Whether the current flow run's tasks run on Dask."""
    return _dask_runner() is not None


def worker_slots() -> int:
    """Return the tasks the current flow run's task runner runs at once (Dask: its threads)."""
    runner = _dask_runner()
    return max(1, sum(runner.client.nthreads().values())) if runner is not None else 1


def series_grouping(
    handles: list[SeriesHandle],
    settings: PullSettings,
    group_below: int,
    group_instances: int,
    slots: int,
) -> Grouping:
    """Group the small series of a pull: as few tasks as keep every worker busy.

    Every Prefect task costs 0.1-0.3 s to submit, start and report, as much as pulling a
    series of a hundred CT slices. Series with fewer than ``group_below`` instances (unknown
    counts count as large) are packed, in plan order, into tasks of about their total divided
    by ``slots`` (so each worker gets one share, as a plain process per core would), and at
    most ``group_instances`` instances (so a group still reports progress and a lost worker
    costs little).
    """

    def size(handle: SeriesHandle) -> int:
        return handle.expected if handle.expected is not None else group_below

    small = [size(h) for h in handles if size(h) < group_below]
    share = -(-sum(small) // slots) + max(small, default=1) - 1
    return Grouping(
        size=size,
        call=lambda handle: (pull_series, (handle, settings)),
        name=lambda group: "pull-" + group_label((h.modality, h.series_key) for h in group),
        small=group_below,
        per_task=max(1, min(group_instances, share)),
    )


def _pull_series(
    params: PullParams, store: SiteStore, base_url: str, jobs: list, runtime: RuntimeOptions
) -> dict[str, SeriesPull | str]:
    """Pull the planned series with the ``pull-dicomweb-series`` subflow on the Dask runner.

    Returns
    -------
    dict
        Per series key: the staged series, or a one-line error.
    """
    if not jobs:
        return {}
    plan_key = write_plan(store, jobs)  # the plan holds UIDs: private zone, not a parameter
    settings = PullSettings(
        base_url,
        params.store,
        params.site,
        params.secret_block,
        params.timeout_seconds,
        params.retries,
        params.retry_delay_seconds,
    )
    grouping = (params.group_below, params.group_instances)
    try:
        if on_dask():  # run by pull_dicomweb (CLI, pipeline): on the runtime's Dask runner
            raw = pull_planned_series(settings, plan_key, *grouping)
        else:  # a deployment's run: its runtime parameter says where the pulls run
            subflow = pull_series_flow.with_options(task_runner=task_runner(runtime))
            raw = subflow(settings, plan_key, *grouping)
    finally:
        store.remove(plan_key)
    results: dict[str, SeriesPull | str] = {}
    for job in jobs:
        got = raw.get(job.series_key, {"error": "no result"})
        results[job.series_key] = str(got["error"]) if "error" in got else SeriesPull(**got)
    return results


def _report(summary: StageSummary, studies: list[dict[str, object]]) -> None:
    counts = summary.extra["studies"]
    series = summary.extra["series"]
    body = "\n\n".join(
        [
            "# DICOMweb pull",
            f"Site `{summary.site}`, source `{summary.extra['source']}`, "
            f"date filter `{summary.extra['study_dates'] or 'none'}`.",
            "## Studies",
            markdown_table([counts], ["found", "pulled", "skipped", "failed"]),
            "## Series and instances",
            markdown_table(
                [
                    {
                        **series,
                        "instances": summary.extra["instances"],
                        "bytes": summary.extra["bytes"],
                    }
                ],
                ["pulled", "skipped", "failed", "instances", "bytes"],
            ),
            "Failed studies are searched again by UID on the next run; none of their series "
            "was committed.",
            "## Time (seconds)",
            markdown_table(
                [{k.removesuffix("_seconds"): v for k, v in summary.extra["timings"].items()}],
                ["search", "pull", "series", "commit"],
            ),
            "`series` is the time inside the series pulls (listing, retrieval, writing) summed "
            "over the workers; the rest of `pull` is orchestration and idle workers.",
        ]
    )
    create_markdown_artifact(
        markdown=body,
        key=artifact_key(summary.site, "pull-dicomweb", "report"),
        description="DICOMweb pull: studies found, pulled, skipped, failed",
    )
    post_table(
        summary.site,
        "pull-dicomweb",
        "studies",
        studies,
        "Per-study outcome of the DICOMweb pull (opaque study keys)",
    )


@flow(name="pull-dicomweb", flow_run_name="pull-dicomweb-{params.site}", log_prints=False)
def pull_dicomweb_flow(params: PullParams, runtime: RuntimeOptions | None = None) -> dict:
    """Pull new studies from a DICOMweb server into the raw zone, then ingest the raw zone.

    The search runs here; the series are pulled on Dask (a task per large series, small
    series several to a task): by this flow's tasks when it runs on Dask (:func:`pull_dicomweb`,
    what the CLI and the pipeline call), else by the ``pull-dicomweb-series`` subflow on
    ``runtime``'s Dask runner (a deployment's run). A study's
    series are committed only when all of them arrived. The watermark advances when the
    search succeeded; failed studies are searched again by UID on the next run.

    Parameters
    ----------
    params
        Source, site, store, filters, retries, failure threshold.
    runtime
        Dask workers or an existing scheduler for the pull and the ingest.
    """
    store = SiteStore(params.store, params.site)
    base_url = parse_source(params.source)
    started = now_iso()
    t0 = time.perf_counter()
    state = PullState.load(store)
    source_state = state.source(base_url)
    clean_staging(store)
    study_dates = study_date_filter(
        params.since, params.until, source_state.last_success, params.overlap_days
    )
    credentials = load_credentials(params.secret_block)
    with dicomweb_client(base_url, credentials, params.timeout_seconds) as client:
        plans = plan_pull(
            client,
            state,
            base_url,
            params.modalities,
            study_dates,
            attempts=params.retries + 1,
            delay=params.retry_delay_seconds,
            key=site_ref_key(store),
        )
    jobs = [job for plan in plans for job in plan.jobs]
    t_search = time.perf_counter()
    results = _pull_series(params, store, base_url, jobs, runtime or RuntimeOptions())
    t_pulled = time.perf_counter()

    settled = settle_pull(store, state, base_url, plans, results)
    source_state.last_success = started
    state.save(store)
    t_committed = time.perf_counter()

    summary = settled.summary(params.site, base_url, study_dates, len(plans))
    summary.extra["timings"] = {
        "search_seconds": round(t_search - t0, 3),
        "pull_seconds": round(t_pulled - t_search, 3),
        "commit_seconds": round(t_committed - t_pulled, 3),
        # summed over the workers: time inside the series pulls (listing, retrieval, writing)
        "series_seconds": round(
            sum(r.seconds for r in results.values() if isinstance(r, SeriesPull)), 3
        ),
    }
    _report(summary, settled.rows)
    needs_ingest = settled.committed or not store.exists("catalog/instances.parquet")
    if params.ingest and needs_ingest and store.exists(PACS_ZONE):
        from flows.ingest import IngestParams, ingest_dicom

        ingested = ingest_dicom(
            IngestParams(source=store.uri(PACS_ZONE), site=params.site, store=params.store),
            runtime=runtime or RuntimeOptions(),
        )
        summary.extra["ingest"] = ingested.to_dict()
    summary.extra["timings"]["total_seconds"] = round(time.perf_counter() - t0, 3)
    _check_failures(settled, len(plans), params.max_failure_ratio)
    return summary.to_dict()


def _check_failures(settled: PullSettlement, studies: int, max_failure_ratio: float) -> None:
    """Raise :class:`StageFailed` when more than ``max_failure_ratio`` of the studies failed."""
    failed = settled.studies["failed"]
    if studies and failed / studies > max_failure_ratio:
        raise StageFailed(
            f"DICOMweb pull: {failed} of {studies} studies failed "
            f"({', '.join(sorted({str(r['error']) for r in settled.rows if r['error']}))}); "
            "they will be retried on the next run"
        )


def pull_dicomweb(params: PullParams, runtime: RuntimeOptions) -> StageSummary:
    """Run the ``pull-dicomweb`` flow on the Dask task runner (what the CLI and tests call).

    One Dask cluster serves both the per-series pulls and the ingest that follows.
    """
    ensure_prefect_api()
    with dask_cluster(runtime):
        result = pull_dicomweb_flow.with_options(task_runner=task_runner(runtime))(params, runtime)
    return StageSummary.from_dict(Stage.INGEST, params.site, result)


def run_receiver(
    store: str,
    site: str,
    port: int,
    ae_title: str,
    allow: list[str],
    host: str = "0.0.0.0",  # a storage SCP listens for the PACS and modalities
    quiet_seconds: float = 30.0,
    ingest: bool = True,
    runtime: RuntimeOptions | None = None,
) -> ReceiverStats:
    """Run the C-STORE receiver until SIGTERM or Ctrl-C; ingest each batch of quiet studies.

    One Dask cluster (or ``runtime.dask_address``) serves every ingest run of the process.
    Studies still arriving when the receiver stops are committed and ingested before exit.

    Returns
    -------
    ReceiverStats
        Counters of the receiver's life.
    """
    runtime = runtime or RuntimeOptions()
    site_store = SiteStore(store, site)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    receiver_log = logging.getLogger("oncoflow.receiver")
    receiver_log.addHandler(handler)
    receiver_log.setLevel(logging.INFO)

    def ingest_batch(studies: list[str]) -> None:
        from flows.ingest import IngestParams, ingest_dicom

        summary = ingest_dicom(
            IngestParams(source=site_store.uri(PACS_ZONE), site=site, store=store), runtime=runtime
        )
        receiver_log.info(
            "ingest after %d new studies: files %s", len(studies), json.dumps(summary.counts)
        )

    receiver = StorageReceiver(
        site_store,
        ae_title,
        allow,
        port=port,
        host=host,
        quiet_seconds=quiet_seconds,
        on_batch=ingest_batch if ingest else None,
    )
    with dask_cluster(runtime) if ingest else contextlib.nullcontext():
        receiver.start()
        previous = signal.signal(signal.SIGTERM, lambda *_: receiver.stop())
        try:
            if ingest and site_store.exists(PACS_ZONE):
                ingest_batch([])  # catch up with studies landed before a restart
            receiver.run()
        except (KeyboardInterrupt, TerminationSignal):
            # Stopped during an ingest (Prefect turns SIGTERM into TerminationSignal while a
            # flow runs): land the pending studies; the next start ingests them.
            receiver.stop()
            receiver.on_batch = None
            receiver.commit_due(force=True)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return receiver.stats

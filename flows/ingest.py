"""Flow ``ingest-dicom``: SOURCE (any fsspec URL) into the site's private catalogue.

1. List SOURCE (path, size, mtime or ETag) into ``catalog/_parts/listing.parquet``, a record
   batch at a time, and diff it with ``catalog/instances.parquet`` in DuckDB, which writes the
   plan (the new and changed files, sorted) and the deleted paths beside it: no list of every
   file is held in memory. A file whose name is not UTF-8 (a legacy code page) goes to a list
   of its own and is quarantined as ``undecodable-name``, never parsed (docs/ingest.md).
2. Parse only new or changed files, in batches of hundreds to thousands of files per Dask
   task, about one per worker (subflow ``parse-dicom-headers``, started only when there is
   something to parse, so an unchanged re-run never starts a cluster). A batch task reads its
   file list from the store, writes its rows to a private part file
   ``catalog/_parts/<batch-key>.parquet`` and returns counts only.
3. Merge the parts with the unchanged rows, mark deleted files, group series and validate their
   geometry, write ``catalog/instances.parquet``, ``catalog/series.parquet`` and the ingest rows
   of ``quarantine.parquet`` (each skipped when unchanged), then remove the parts, the plan and
   the listing (also when the run fails; a killed run's are removed by the next run).
4. Post a markdown summary, a table of quarantined items (opaque references, reason codes) and,
   while batches run, a progress artifact.

Privacy: flow and task parameters are URLs, the site code, numbers and content keys; file
paths go through the private zone of the store (the plan and the batch file lists), never
through Prefect parameters, results or logs. Nothing under SOURCE is ever written. Two ingest
runs of the same site must not overlap (they share ``catalog/_parts/``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from pydantic import Field, field_validator

from flows.reporting import markdown_table, post_summary, post_table
from flows.runtime import RuntimeOptions, ensure_prefect_api, task_runner
from flows.stage import StageParams, failure_ratio, run_units
from tasks.dicom.catalog import (
    LISTING,
    UNDECODABLE,
    CatalogCounts,
    catalog_is_current,
    diff_catalog,
    fill_counts,
    merge_catalog,
    planned_files,
    read_parsed,
    remove_parts,
    replace_undecodable,
    undecodable_records,
)
from tasks.dicom.headers import (
    BatchResult,
    parse_batch,
    parse_batch_to_part,
    warm_up,
    write_batch_files,
)
from tasks.dicom.ingest_summary import ParseRun, check_parse_failures, ingest_summary
from tasks.dicom.listing import (
    BatchRef,
    ListingDiff,
    batch_key,
    batched_files,
    files_from_parquet,
    resolve_source,
    write_listing,
)
from tasks.records import Stage, StageSummary
from tasks.refs import site_ref_key
from tasks.store import QUARANTINE, SiteStore, open_url, parquet_file, protocol_of

#: Parquet schema-metadata key of the catalogue tables holding the SOURCE URL.
SOURCE_METADATA_KEY = "source"
#: Batches are sized for about this many tasks per worker: a Prefect task run costs 0.2-0.3 s
#: of orchestration (its API calls, the context shipped to the worker), the cost of parsing
#: about a thousand headers, so one large batch per worker beats several smaller ones; header
#: cost varies little from file to file, so the workers stay balanced ...
TASKS_PER_WORKER = 1
#: ... but never fewer files than this per task (task overhead), unless batch_size is lower.
MIN_BATCH = 100
#: Files to parse that fit in one batch of at most this many are parsed in the ingest's own
#: process: starting Dask workers costs seconds, parsing 2,000 headers about one (a nightly
#: increment, a PACS study).
IN_PROCESS_FILES = 2_000


class IngestParams(StageParams):
    """One ingest run of a site (the Prefect UI form; URLs and numbers, no identifiers)."""

    source: str = Field(
        description="Where the DICOM files are: folder, file://, s3://bucket/prefix."
    )
    batch_size: int = Field(
        5000,
        ge=1,
        le=100_000,
        description="Largest number of files per parsing task; batches are sized for about "
        "one task per worker, with at least 100 files each.",
    )
    # a lost batch task loses hundreds of files: a lower threshold than the per-series stages
    max_failure_ratio: float = failure_ratio(0.05, "files to parse")
    spacing_tolerance: float = Field(
        0.01,
        gt=0.0,
        le=0.5,
        description="Allowed deviation of a slice gap from the series' median gap (fraction).",
    )

    @field_validator("source", "store")
    @classmethod
    def _strip_url(cls, value: str) -> str:
        value = value.strip()
        return value.rstrip("/") or value


def open_store(url: str, site: str) -> SiteStore:
    """Open the site store and check it is reachable, with a one-line error otherwise.

    A missing local folder is created; an object store's bucket must already exist.
    """
    store = SiteStore(url, site)
    store.check_reachable()
    return store


def check_inputs(params: IngestParams) -> SiteStore:
    """Check SOURCE and STORE before any flow starts (one-line errors, no traceback)."""
    resolve_source(params.source)
    return open_store(params.store, params.site)


def _store_prefix_in_source(params: IngestParams, store: SiteStore) -> str | None:
    """Source-relative prefix of the store when the store lies inside the source, else None."""
    source_fs, source_root = open_url(params.source)
    if protocol_of(source_fs) != store.protocol:
        return None
    root = source_root.rstrip("/") + "/"
    store_root = store.path("").rstrip("/") + "/"
    return store_root[len(root) :] if store_root.startswith(root) else None


def _listing(params: IngestParams, store: SiteStore) -> ListingDiff:
    """List SOURCE into the store's private zone and diff it with the catalogue in DuckDB.

    The listing, the plan (files to parse) and the deleted paths are Parquet files under
    ``catalog/_parts/``, written a record batch at a time: no list of every file in memory.
    Files whose name is not UTF-8 go to a Parquet file of their own (escaped), to be
    quarantined rather than parsed.
    """
    exclude = _store_prefix_in_source(params, store)
    write_listing(params.source, store, LISTING, exclude=exclude, undecodable=UNDECODABLE)
    return diff_catalog(store, LISTING, UNDECODABLE)


def _start_workers() -> int:
    """Start the Dask cluster now, import the parser on every worker; return the worker count.

    prefect-dask creates the cluster on first use; doing it here keeps the start-up cost out
    of the parse timing and the progress artifact.
    """
    context = FlowRunContext.get()
    client = getattr(context.task_runner, "client", None) if context else None
    if client is None:
        return 1
    client.run(warm_up)
    return max(1, len(client.scheduler_info().get("workers", {})))


def batch_size_for(files: int, workers: int, largest: int) -> int:
    """Files per task: about one task per worker, at least MIN_BATCH, at most ``largest``.

    Each Prefect task costs a fixed overhead (0.2-0.3 s), so batches stay in the hundreds to
    thousands of files; ``largest`` bounds what one lost task costs to redo.
    """
    wanted = math.ceil(files / (TASKS_PER_WORKER * max(workers, 1)))
    return max(1, min(largest, max(MIN_BATCH, wanted)))


@flow(name="parse-dicom-headers", flow_run_name="parse-{site}", log_prints=False)
def parse_headers_flow(
    site: str, store: str, source: str, plan: str, batch_size: int
) -> dict[str, Any]:
    """Parse the batches of a plan in parallel, one Dask task per batch.

    Parameters
    ----------
    site, store
        The site store (the plan and the part files live in its private zone).
    source
        Source root URL.
    plan
        Store-relative key of the plan (the files to parse) written by ``ingest-dicom``.
    batch_size
        Largest number of files per task (see :func:`batch_size_for`).

    Returns
    -------
    dict
        ``results`` (batch counts), ``failed`` (batch key, files, error class), ``batches``,
        ``workers`` and the ``parse_seconds`` from the first submission to the last batch done.
    """
    workers = _start_workers()
    started, started_at = time.perf_counter(), time.time()
    batches = write_plan_batches(SiteStore(store, site), plan, workers, batch_size)
    outcomes = run_units(
        batches,
        lambda batch: parse_batch.submit(batch.key, source, store, site),
        # retries exhausted or worker lost: counted, the next run parses the files again
        lambda batch, exc: {
            "key": batch.key,
            "files": batch.files,
            "error": type(exc).__name__,
        },
        "DICOM files parsed",
        weight=lambda batch: batch.files,
    )
    results = sorted((asdict(o) for o in outcomes if isinstance(o, BatchResult)), key=_by_key)
    failed = sorted((o for o in outcomes if isinstance(o, dict)), key=_by_key)
    return {
        "results": results,
        "failed": failed,
        "batches": len(batches),
        "workers": workers,
        "body_started": started,
        "first_batch_after": round(
            min((r["started_at"] for r in results), default=started_at) - started_at, 4
        ),
        "parse_seconds": round(time.perf_counter() - started, 4),
    }


def write_plan_batches(store: SiteStore, plan: str, workers: int, largest: int) -> list[BatchRef]:
    """Cut the plan into batches and write each batch's file list, reading the plan in pieces.

    Only one batch's entries are held at a time (the plan of a first ingest lists the archive).
    """
    refs = []
    with store.open(plan) as fh:
        plan_file = parquet_file(fh)
        size = batch_size_for(plan_file.metadata.num_rows, workers, largest)
        for batch in batched_files(files_from_parquet(plan_file), size, site_ref_key(store)):
            write_batch_files(store, batch)
            refs.append(BatchRef(batch.key, len(batch.files)))
    return refs


def _by_key(row: dict[str, Any]) -> str:
    return row["key"]


def _files_markdown(extra: dict[str, Any]) -> str:
    names = ("listed", "new", "changed", "unchanged", "deleted", "parsed", "failed")
    if extra.get("files_undecodable"):  # quarantined for a name that is not UTF-8
        names = (*names, "undecodable")
    return markdown_table(
        [{"files": n, "count": extra.get(f"files_{n}", 0)} for n in names], ["files", "count"]
    )


def _series_markdown(counts: CatalogCounts) -> str:
    statuses = sorted({s for by in counts.series_by_modality.values() for s in by})
    rows = [
        {"modality": m, **{s: by.get(s, 0) for s in statuses}}
        for m, by in counts.series_by_modality.items()
    ]
    return markdown_table(rows, ["modality", *statuses]) if rows else "No series."


def _report(summary: StageSummary, counts: CatalogCounts) -> None:
    post_summary(
        summary,
        "DICOM ingest",
        {
            "Files": _files_markdown(summary.extra),
            "Series by modality and status": _series_markdown(counts),
            "Note": "Quarantined items are listed by an opaque reference (a hash of the source "
            "path or series key); the private `quarantine.parquet` holds the items themselves.",
        },
    )
    post_table(
        summary.site,
        str(Stage.INGEST),
        "quarantine",
        counts.quarantine,
        "Quarantined files and series (opaque reference, reason code)",
    )


def _parse(
    params: IngestParams, store: SiteStore, diff: ListingDiff, runtime: RuntimeOptions
) -> ParseRun:
    """Parse the plan's files into part files: in this process when they are few, else on Dask."""
    if diff.to_parse <= min(IN_PROCESS_FILES, params.batch_size):
        t_start = time.perf_counter()
        to_parse = list(planned_files(store, diff))  # at most IN_PROCESS_FILES
        key = batch_key(to_parse, site_ref_key(store))
        result = parse_batch_to_part(key, to_parse, params.source, params.store, params.site)
        seconds = round(time.perf_counter() - t_start, 4)
        zero = {"startup_seconds": 0.0, "first_batch_after_seconds": 0.0}
        return ParseRun([asdict(result)], [], 1, {**zero, "parse_seconds": seconds})
    t_start = time.perf_counter()
    run = parse_headers_flow.with_options(task_runner=task_runner(runtime))
    outcome = run(params.site, params.store, params.source, diff.plan, params.batch_size)
    timings = {
        "startup_seconds": round(outcome["body_started"] - t_start, 4),
        "parse_seconds": outcome["parse_seconds"],
        "first_batch_after_seconds": outcome["first_batch_after"],
    }
    return ParseRun(outcome["results"], outcome["failed"], outcome["batches"], timings)


def catalogue_source(
    params: IngestParams,
    store: SiteStore,
    runtime: RuntimeOptions | None,
    logger: logging.Logger | logging.LoggerAdapter,
) -> tuple[ListingDiff, ParseRun, CatalogCounts, dict[str, float]]:
    """List SOURCE, parse what changed and merge it into the catalogue (steps 1 to 3).

    The body of ``ingest-dicom`` without its reports; a plan of at most
    :data:`IN_PROCESS_FILES` files is parsed in this process (no Dask, no Prefect task).
    The private work files under ``catalog/_parts/`` are removed, also on failure.

    Parameters
    ----------
    params
        The run's parameters.
    store
        The site store (:func:`check_inputs`).
    runtime
        Dask workers for a larger plan.
    logger
        Where the counts are logged (no paths).

    Returns
    -------
    tuple
        The listing's diff, the parse, the catalogue counts and the timings so far.
    """
    t0 = time.perf_counter()
    remove_parts(store)  # left by a crashed run
    try:
        diff = _listing(params, store)
        metadata = {SOURCE_METADATA_KEY: params.source}
        current = catalog_is_current(store, metadata)
        timings = {"listing_seconds": round(time.perf_counter() - t0, 4)}
        logger.info(
            "listed %d files: %d new, %d changed, %d unchanged, %d deleted, "
            "%d quarantined for a name that is not UTF-8",
            diff.listed,
            diff.new,
            diff.changed,
            diff.unchanged,
            diff.deleted,
            diff.undecodable,
        )
        undecodable = undecodable_records(store, UNDECODABLE)
        run, counts = ParseRun(), CatalogCounts()
        if diff.to_parse or not current or diff.deleted:
            if diff.to_parse:
                run = _parse(params, store, diff, runtime or RuntimeOptions())
            t_merge = time.perf_counter()
            parsed = read_parsed(store, run.parts)
            counts = merge_catalog(
                store,
                diff,
                parsed,
                params.spacing_tolerance,
                metadata=metadata,
                undecodable=undecodable,
            )
            run.timings["merge_seconds"] = round(time.perf_counter() - t_merge, 4)
        else:  # nothing to merge; the names that are not UTF-8 still follow the source
            if replace_undecodable(store, undecodable):
                counts.written.append(QUARANTINE)
            fill_counts(counts, store)
    finally:
        remove_parts(store)  # the listing, plan and batch parts hold paths
    return diff, run, counts, timings


@flow(name="ingest-dicom", flow_run_name="ingest-{params.site}", log_prints=False)
def ingest_flow(params: IngestParams, runtime: RuntimeOptions | None = None) -> dict[str, Any]:
    """Catalogue the DICOM files under SOURCE into the site's private catalogue.

    Parameters
    ----------
    params
        Source, site, store, batch size, failure threshold, spacing tolerance.
    runtime
        Dask workers or an existing scheduler, used only when there are files to parse.

    Returns
    -------
    dict
        The stage summary (:func:`tasks.dicom.ingest_summary.ingest_summary`): files by
        status, quarantine by reason, and in ``extra`` the files listed/new/changed/unchanged/
        deleted/parsed/failed, series counts and timings.

    Raises
    ------
    OncoflowError
        When SOURCE or STORE is unusable.
    StageFailed
        When more than ``params.max_failure_ratio`` of the files to parse were lost with
        their batch task.
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    store = check_inputs(params)
    diff, run, counts, timings = catalogue_source(params, store, runtime, logger)
    timings.update(run.all_timings(), total_seconds=round(time.perf_counter() - t0, 4))
    summary = ingest_summary(params.site, diff, counts, run, timings)
    _report(summary, counts)
    logger.info(
        "ingest done: files %s; series %s; tables written: %s",
        ", ".join(f"{k}={v}" for k, v in summary.counts.items()) or "none",
        ", ".join(f"{k}={v}" for k, v in counts.series.items()) or "none",
        ", ".join(counts.written) or "none",
    )
    check_parse_failures(run, diff.to_parse, params.max_failure_ratio)
    return summary.to_dict()


def _summary_from(result: dict[str, Any], site: str) -> StageSummary:
    return StageSummary.from_dict(Stage.INGEST, site, result)


def ingest_dicom(params: IngestParams, runtime: RuntimeOptions | None = None) -> StageSummary:
    """Run ``ingest-dicom`` (what the CLI and tests call) and return its summary.

    SOURCE and STORE are checked first, so a bad URL gives a one-line error before any flow
    run starts.

    Raises
    ------
    OncoflowError
        For an unreachable or empty SOURCE or an unusable STORE.
    StageFailed
        When too many files were lost with failed batch tasks.
    """
    check_inputs(params)
    ensure_prefect_api()
    result = ingest_flow(params, runtime or RuntimeOptions())
    return _summary_from(result, params.site)

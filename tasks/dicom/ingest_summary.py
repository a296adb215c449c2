"""The ingest stage's summary: files and series counts, timings (no paths, no identifiers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.dicom.catalog import CatalogCounts
from tasks.dicom.listing import ListingDiff
from tasks.errors import StageFailed
from tasks.records import Kind, Stage, StageSummary


@dataclass
class ParseRun:
    """What parsing the new and changed files gave: batch counts and timings.

    Parameters
    ----------
    results
        One dict per parsed batch (:class:`tasks.dicom.headers.BatchResult` as a dict).
    failed
        One dict per batch whose task failed: ``key``, ``files``, ``error`` (class name).
    batches
        Batches planned.
    timings
        Start-up, parse and merge seconds.
    """

    results: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    batches: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def parts(self) -> list[str]:
        """Store keys of the part files the parsed batches wrote."""
        return [r["part"] for r in self.results]

    @property
    def files_parsed(self) -> int:
        """Files parsed (their rows are in the part files)."""
        return sum(r["files"] for r in self.results)

    @property
    def files_failed(self) -> int:
        """Files lost with a failed batch task (the next run parses them again)."""
        return sum(f["files"] for f in self.failed)

    def all_timings(self) -> dict[str, float]:
        """Return the run's timings plus the summed wall and CPU seconds of its batches."""
        if not self.results:
            return dict(self.timings)
        return {
            **self.timings,
            "batch_seconds_sum": round(sum(r["seconds"] for r in self.results), 4),
            "batch_cpu_seconds_sum": round(sum(r["cpu_seconds"] for r in self.results), 4),
        }


def reasons_of_kind(quarantine: list[dict[str, str]], kind: Kind) -> dict[str, int]:
    """Count the quarantine rows of one kind (``file`` or ``series``) by reason."""
    counts: dict[str, int] = {}
    for row in quarantine:
        if row["kind"] == kind:
            counts[row["reason"]] = counts.get(row["reason"], 0) + 1
    return dict(sorted(counts.items()))


def ingest_summary(
    site: str,
    diff: ListingDiff,
    counts: CatalogCounts,
    run: ParseRun,
    timings: dict[str, float],
) -> StageSummary:
    """Return the ingest summary: files by status, quarantine by reason, the listing's diff.

    Parameters
    ----------
    site
        Site code.
    diff
        The listing's difference with the catalogue (and the files listed).
    counts
        Catalogue counts after the merge.
    run
        The parse of the new and changed files.
    timings
        Seconds by phase (listing, start-up, parse, merge, total).

    Returns
    -------
    StageSummary
        ``counts`` are files by status (``failed``: lost with their batch task); ``extra``
        holds the files listed/new/changed/unchanged/deleted/parsed/failed, batches, series
        counts, reasons by kind and the timings.
    """
    file_counts = dict(counts.files)
    if run.files_failed:
        file_counts["failed"] = run.files_failed
    return StageSummary(
        stage=Stage.INGEST,
        site=site,
        counts=dict(sorted(file_counts.items())),
        reasons=counts.reasons,
        computed=run.files_parsed,
        reused=diff.unchanged,
        tables_written=list(counts.written),
        extra={
            "files_listed": diff.listed,
            "files_new": diff.new,
            "files_changed": diff.changed,
            "files_unchanged": diff.unchanged,
            "files_deleted": diff.deleted,
            "files_undecodable": diff.undecodable,
            "files_parsed": run.files_parsed,
            "files_failed": run.files_failed,
            "batches": run.batches,
            "series": counts.series,
            "reasons_by_kind": {
                "file": reasons_of_kind(counts.quarantine, Kind.FILE),
                "series": counts.series_reasons,
            },
            "series_by_modality": counts.series_by_modality,
            "timings": timings,
        },
    )


def check_parse_failures(run: ParseRun, to_parse: int, max_failure_ratio: float) -> None:
    """Raise :class:`StageFailed` when too many of the files to parse were lost with their task.

    Raises
    ------
    StageFailed
        When more than ``max_failure_ratio`` of ``to_parse`` files were in failed batches.
    """
    if to_parse and run.files_failed / to_parse > max_failure_ratio:
        raise StageFailed(
            f"ingest could not parse {run.files_failed} of {to_parse} files (their batch tasks "
            f"failed; threshold {max_failure_ratio:.0%}); the next run retries them"
        )

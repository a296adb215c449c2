"""Result records shared by every stage.

Each per-series (or per-batch) task returns one of these records instead of raising, so one
bad file or series never fails a run (architecture principle 1). Records hold keys, counts and
reason codes only: never pixel data, datasets, or identifying values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Stage(StrEnum):
    """Pipeline stages, in order."""

    INGEST = "ingest"
    DEIDENTIFY = "deidentify"
    HARMONISE = "harmonise"
    EXTRACT = "extract"
    ROBUSTNESS = "robustness"
    PUBLISH = "publish"


class Status(StrEnum):
    """Outcome of one unit of work (file, series, or series x ROI)."""

    OK = "ok"
    QUARANTINED = "quarantined"
    FAILED = "failed"
    SKIPPED = "skipped"


class Reason(StrEnum):
    """Machine-readable quarantine reasons (contract: tests and truth.json use these codes).

    Stages add their own members here so that every reason has one spelling.
    """

    # ingest: files
    EMPTY_FILE = "empty-file"
    TRUNCATED_FILE = "truncated-file"
    NOT_DICOM = "not-dicom"
    DICOMDIR = "dicomdir"
    UNREADABLE_HEADER = "unreadable-header"
    MISSING_UIDS = "missing-uids"
    DUPLICATE_INSTANCE = "duplicate-instance"
    UNDECODABLE_NAME = "undecodable-name"  # file name not UTF-8 (no catalogue row)
    # ingest: series geometry
    MISSING_SLICE = "missing-slice"
    INCONSISTENT_SPACING = "inconsistent-spacing"
    LOCALIZER = "localizer"
    INCONSISTENT_ORIENTATION = "inconsistent-orientation"
    INCONSISTENT_GEOMETRY = "inconsistent-geometry"
    DUPLICATE_POSITION = "duplicate-position"
    # deidentify
    BURNED_IN_ANNOTATION = "burned-in-annotation"
    DEID_ERROR = "deid-error"
    INVALID_ATTRIBUTE = "invalid-attribute"
    ENCAPSULATED_DOCUMENT = "encapsulated-document"
    OVERLAY_IN_PIXEL_DATA = "overlay-in-pixel-data"
    INPUT_TOO_LARGE = "input-too-large"
    # harmonise
    GANTRY_TILT = "gantry-tilt"
    MISSING_SUV_DATA = "missing-suv-data"
    BAD_UNITS = "bad-units"
    EMPTY_MASK = "empty-mask"
    MASK_OUTSIDE_IMAGE = "mask-outside-image"
    FRAME_OF_REFERENCE_MISMATCH = "frame-of-reference-mismatch"
    UNSUPPORTED_IMAGE = "unsupported-image"
    MISSING_REFERENCED_SERIES = "missing-referenced-series"
    # extract
    ONE_VOXEL_MASK = "one-voxel-mask"
    EXTRACTION_ERROR = "extraction-error"
    ROI_TOO_SMALL = "roi-too-small"
    # publish (release preparation)
    DUPLICATE_PIXEL_DATA = "duplicate-pixel-data"
    MASK_GEOMETRY_MISMATCH = "mask-geometry-mismatch"
    # ingest of NIfTI/NRRD cases (tasks/volumes)
    MISSING_FILE = "missing-file"
    MISSING_MASK = "missing-mask"


class Kind(StrEnum):
    """What a quarantine row names: a source file, a series, a mask (series x ROI), a volume."""

    FILE = "file"
    SERIES = "series"
    MASK = "mask"
    VOLUME = "volume"


@dataclass(frozen=True)
class QuarantineRecord:
    """One rejected file or series.

    Parameters
    ----------
    item
        Source-relative file path (private zone) or series key.
    kind
        What the item is (a plain string read back from a table becomes a :class:`Kind`).
    stage
        Stage that rejected it.
    reason
        Reason code.
    detail
        Short human explanation without identifying values.
    """

    item: str
    kind: Kind
    stage: Stage
    reason: Reason
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))

    def to_row(self) -> dict[str, str]:
        """Return the record as a flat row for ``quarantine.parquet``."""
        row = asdict(self)
        row["kind"] = str(self.kind)
        row["stage"] = str(self.stage)
        row["reason"] = str(self.reason)
        return row


@dataclass(frozen=True)
class UnitResult:
    """Outcome of one unit of parallel work, as returned by a task.

    Parameters
    ----------
    key
        Pseudonymous or content key of the unit (never an identifier outside the private zone).
    status
        Outcome.
    reason
        Reason code when quarantined.
    error_class
        Exception class name when failed.
    detail
        Short explanation without identifying values.
    outputs
        Store-relative keys written by the unit.
    computed
        False when the unit was skipped because its output was already up to date.
    """

    key: str
    status: Status
    reason: str = ""
    error_class: str = ""
    detail: str = ""
    outputs: tuple[str, ...] = ()
    computed: bool = True


@dataclass(frozen=True)
class UnitOutcome:
    """What a stage's unit task returns: its result, its stage-table rows and quarantine rows.

    Every stage's unit task returns this record.

    Parameters
    ----------
    result
        Status, reason, outputs of the unit.
    row
        The unit's row of the stage table (pseudonymous keys, no identifiers).
    quarantine
        Quarantine rows the unit adds (e.g. one per rejected mask of a kept series).
    derived_rows
        Rows of the same table for outputs derived from the unit (a volume's label maps).
    audit
        ``(attribute, action, count)`` triples for the stage's audit table (never values).
    written
        Objects this run wrote for the unit (0 when everything was already up to date).
    cpu_seconds
        CPU seconds the worker spent computing the unit (0 when its outputs were reused).
    content
        SHA-256 over the SHA-256 of each output, in order (de-identification records it so
        harmonise can plan from tables; empty when not computed).
    """

    result: UnitResult
    row: dict[str, Any] = field(default_factory=dict)
    quarantine: tuple[QuarantineRecord, ...] = ()
    derived_rows: tuple[dict[str, Any], ...] = ()
    audit: tuple[tuple[str, str, int], ...] = ()
    written: int = 0
    cpu_seconds: float = 0.0
    content: str = ""

    @property
    def reused(self) -> int:
        """Outputs of the unit kept as they were (not written by this run)."""
        return max(len(self.result.outputs) - self.written, 0)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The unit's stage-table rows: its own (when it has one) and the derived ones."""
        return ([self.row] if self.row else []) + list(self.derived_rows)


_SUMMARY_FIELDS = (
    "stage",
    "site",
    "counts",
    "reasons",
    "errors",
    "computed",
    "reused",
    "tables_written",
    "stale_removed",
)


@dataclass
class StageSummary:
    """What one stage run did, safe to print, log and post as an artifact.

    Parameters
    ----------
    stage, site
        Which stage ran for which site.
    counts
        Units by status (``ok``, ``quarantined``, ``failed``).
    reasons
        Units by quarantine reason code.
    errors
        Failed units by error class.
    computed
        Units whose output was computed by this run.
    reused
        Units whose up-to-date output was kept (nothing written).
    tables_written
        Store keys of the tables this run wrote (an unchanged table is not written).
    stale_removed
        Outputs of units no longer planned that were removed.
    extra
        Stage-specific fields (documented in the stage's guide).
    """

    stage: Stage
    site: str
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    computed: int = 0
    reused: int = 0
    tables_written: list[str] = field(default_factory=list)
    stale_removed: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_results(
        cls,
        stage: Stage,
        site: str,
        results: list[UnitResult],
        *,
        tables_written: list[str] | None = None,
        stale_removed: int = 0,
        **extra: object,
    ) -> StageSummary:
        """Build a summary by counting results by status, reason and error class."""
        counts = Counter(str(r.status) for r in results)
        reasons = Counter(r.reason for r in results if r.reason)
        errors = Counter(r.error_class for r in results if r.error_class)
        ok = [r for r in results if r.status == Status.OK]
        return cls(
            stage=stage,
            site=site,
            counts=dict(sorted(counts.items())),
            reasons=dict(sorted(reasons.items())),
            errors=dict(sorted(errors.items())),
            computed=sum(1 for r in ok if r.computed),
            reused=sum(1 for r in ok if not r.computed),
            tables_written=list(tables_written or []),
            stale_removed=stale_removed,
            extra=dict(extra),
        )

    @classmethod
    def from_dict(cls, stage: Stage, site: str, data: dict[str, object]) -> StageSummary:
        """Rebuild a summary from what a flow returned (:meth:`to_dict` output)."""
        return cls(
            stage=stage,
            site=site,
            counts=dict(data.get("counts", {})),  # type: ignore[call-overload]
            reasons=dict(data.get("reasons", {})),  # type: ignore[call-overload]
            errors=dict(data.get("errors", {})),  # type: ignore[call-overload]
            computed=int(data.get("computed", 0)),  # type: ignore[call-overload]
            reused=int(data.get("reused", 0)),  # type: ignore[call-overload]
            tables_written=list(data.get("tables_written", [])),  # type: ignore[call-overload]
            stale_removed=int(data.get("stale_removed", 0)),  # type: ignore[call-overload]
            extra={k: v for k, v in data.items() if k not in _SUMMARY_FIELDS},
        )

    @property
    def failure_ratio(self) -> float:
        """Fraction of units that failed (not quarantined: failures are unexpected errors)."""
        total = sum(self.counts.values())
        return self.counts.get(str(Status.FAILED), 0) / total if total else 0.0

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-serialisable dict."""
        return {
            **self.extra,
            "stage": str(self.stage),
            "site": self.site,
            "counts": self.counts,
            "reasons": self.reasons,
            "errors": self.errors,
            "computed": self.computed,
            "reused": self.reused,
            "tables_written": self.tables_written,
            "stale_removed": self.stale_removed,
        }

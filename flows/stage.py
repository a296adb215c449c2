"""The stage runner: what every stage flow does around its per-unit task.

A stage flow declares its plan (the units, from ``tasks/``), its unit task and its outputs;
this module does the rest the same way for every stage:

1. :func:`run_units` fans the units out on the runtime's task runner (Dask), collects one
   outcome per unit in plan order, and turns a task that still raised after its retries into a
   ``failed`` outcome (one bad unit never fails the run);
2. the flow writes its table(s) with the store's operations;
3. :func:`finish_stage` replaces the stage's quarantine rows, builds the typed
   :class:`~tasks.records.StageSummary`, posts the summary and the outcome table as Prefect
   artifacts and applies the failure ratio.

:class:`SiteParams` and :class:`StageParams` are the parameter fields every stage shares.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.reporting import Progress, post_summary, post_table
from tasks.errors import StageFailed
from tasks.quarantine import replace_quarantine
from tasks.records import QuarantineRecord, Stage, StageSummary, Status, UnitResult
from tasks.store import SiteStore, validate_site

Unit = TypeVar("Unit")
Outcome = TypeVar("Outcome")


def _source_first(schema: dict[str, Any]) -> None:
    """Show a model's ``source`` field first in the Prefect form (inherited fields lead)."""
    properties = schema.get("properties", {})
    if "source" in properties:
        schema["properties"] = {"source": properties.pop("source"), **properties}


def failure_ratio(default: float = 0.1, units: str = "units") -> Any:
    """Return the ``max_failure_ratio`` field: the same bounds everywhere, a stage's default.

    Parameters
    ----------
    default
        The stage's default share.
    units
        What the stage counts, plural (for the form's description).
    """
    return Field(
        default,
        ge=0.0,
        le=1.0,
        description=f"Fail the run when more than this share of {units} fail with an error "
        f"(quarantined {units} do not count).",
    )


class SiteParams(BaseModel):
    """Which site and store a run works on (flow parameters: no identifiers).

    Every flow's parameter model derives from this one (or :class:`StageParams`); a ``source``
    field of a derived model is shown first in the Prefect form.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=_source_first)

    site: str = Field(description="Site code: lowercase letters, digits, dashes.")
    store: str = Field(description="Site store URL (path, file://, s3://bucket/prefix).")

    @model_validator(mode="after")
    def _valid_site(self) -> SiteParams:
        validate_site(self.site)
        return self

    def open_store(self) -> SiteStore:
        """Return the site's store."""
        return SiteStore(self.store, self.site)


class StageParams(SiteParams):
    """What every per-unit stage shares: site, store and the failure threshold."""

    max_failure_ratio: float = failure_ratio()


@dataclass(frozen=True)
class Grouping:
    """Run small units together: one task per group, still one outcome per unit.

    Every Prefect task costs a fixed 0.2-0.3 s to submit, start and report; a unit that takes
    less than that (a one-file series) is dominated by it. Units whose ``size`` is below
    ``small`` are packed, in plan order, into groups of at most ``per_task`` size.

    Parameters
    ----------
    size
        Size of a unit (files in a series, ...).
    call
        The plain function and arguments that compute a unit's outcome (the unit task's
        ``.fn`` and the arguments its ``submit`` gets).
    name
        The task-run name of a group from its units, without identifiers (stage, modality,
        count and a pseudonymous key tail: :func:`tasks.names.group_label`).
    small
        Units below this size are grouped; larger ones keep a task of their own.
    per_task
        Largest total size of a group.
    """

    size: Callable[[Any], int]
    call: Callable[[Any], tuple[Callable[..., Any], tuple[Any, ...]]]
    name: Callable[[Sequence[Any]], str]
    small: int = 32
    per_task: int = 256


def group_units(sizes: Sequence[int], small: int, per_task: int) -> list[list[int]]:
    """Return the task groups of units with ``sizes``: unit indices, in plan order.

    Parameters
    ----------
    sizes
        Size of each unit.
    small, per_task
        See :class:`Grouping`.

    Returns
    -------
    list of list of int
        A unit of size ``small`` or more alone; smaller ones packed, in plan order, into a
        group that is listed when it is full (so large units come first, as planned).
    """
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if size >= small:
            groups.append([i])
            continue
        if current and total + size > per_task:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        groups.append(current)
    return groups


@task(
    name="unit-group",
    task_run_name="{name}",
    retries=1,
    retry_delay_seconds=2,
    cache_policy=NO_CACHE,
)
def run_unit_group(name: str, calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
    """Compute several small units in one task; a unit's exception takes its outcome's place.

    ``name`` (:attr:`Grouping.name` of the group's units) only names the task run.
    """
    out: list[Any] = []
    for fn, args in calls:
        try:
            out.append(fn(*args))
        except Exception as exc:  # that unit fails, the others of the group do not
            out.append(exc)
    return out


def run_units(
    units: Sequence[Unit],
    submit: Callable[[Unit], PrefectFuture[Outcome]],
    failed: Callable[[Unit, BaseException], Outcome],
    progress: str,
    grouping: Grouping | None = None,
    reused: Mapping[int, Outcome] | None = None,
    weight: Callable[[Unit], int] | None = None,
) -> list[Outcome]:
    """Run one task per unit on the flow's task runner; return the outcomes in plan order.

    Parameters
    ----------
    units
        The plan.
    submit
        Submits the unit task of one unit (``task.submit(...)``) and returns its future.
    failed
        Builds the ``failed`` outcome of a unit whose task raised (retries exhausted, worker
        lost): the run goes on.
    progress
        What the progress artifact counts (no identifiers), e.g. ``"series harmonised"``.
    grouping
        Run small units several to a task (see :class:`Grouping`); None: one task per unit.
    reused
        Plan index -> outcome of the units unchanged since the last run
        (:func:`tasks.unit_state.plan_reuse`): they get no task.
    weight
        What a unit counts for in the progress artifact (the files of a batch); None: one.

    Returns
    -------
    list
        One outcome per unit, in the order of ``units``.
    """
    count = weight or (lambda _unit: 1)
    bar = Progress(sum(count(u) for u in units), progress)
    done = dict(reused or {})
    todo = [i for i in range(len(units)) if i not in done]
    if grouping is None:
        groups = [[i] for i in todo]
    else:
        sizes = [grouping.size(units[i]) for i in todo]
        packed = group_units(sizes, grouping.small, grouping.per_task)
        groups = [[todo[j] for j in group] for group in packed]
    futures: dict[PrefectFuture[Any], list[int]] = {}
    for group in groups:
        if len(group) == 1:
            futures[submit(units[group[0]])] = group
        else:
            assert grouping is not None
            calls = [grouping.call(units[i]) for i in group]
            name = grouping.name([units[i] for i in group])
            futures[run_unit_group.submit(name, calls)] = group
    outcomes: list[Outcome | None] = [done.get(i) for i in range(len(units))]
    if done:
        bar.advance(sum(count(units[i]) for i in done))
    for future in as_completed(list(futures)):
        group = futures[future]
        try:
            results = future.result() if len(group) > 1 else [future.result()]
        except Exception as exc:  # retries exhausted, worker lost for good, ...
            results = [exc] * len(group)
        for i, result in zip(group, results, strict=True):
            outcomes[i] = failed(units[i], result) if isinstance(result, Exception) else result
        bar.advance(sum(count(units[i]) for i in group))
    return [o for o in outcomes if o is not None]


def failed_result(key: str, exc: BaseException) -> UnitResult:
    """Return the failed result of a unit: its error class only (messages may identify)."""
    return UnitResult(key, Status.FAILED, error_class=type(exc).__name__)


@dataclass
class StageReport:
    """What a stage shows in the Prefect UI besides its counts.

    Parameters
    ----------
    title
        Title of the summary artifact.
    rows
        The outcome table (one row per unit; no identifiers).
    rows_title
        Description of the outcome table.
    sections
        Extra markdown sections of the summary (title -> markdown).
    rows_name
        Name of the table artifact (``<site>-<stage>-<name>``).
    """

    title: str
    rows: list[dict[str, Any]]
    rows_title: str
    sections: Mapping[str, str] = field(default_factory=dict)
    rows_name: str = "outcomes"


def finish_stage(
    store: SiteStore,
    stage: Stage,
    params: StageParams,
    results: Sequence[UnitResult],
    quarantine: Sequence[QuarantineRecord],
    report: StageReport,
    noun: str,
    /,
    *,
    tables_written: Sequence[str] = (),
    stale_removed: int = 0,
    **extra: object,
) -> dict[str, Any]:
    """Record the quarantine, post the summary and outcome table, apply the failure ratio.

    Parameters
    ----------
    store
        The site store.
    stage
        The stage.
    params
        The run's parameters (site, failure threshold).
    results
        One result per unit.
    quarantine
        The stage's quarantine rows (they replace the stage's previous rows).
    report
        What the Prefect UI shows.
    noun
        What a unit is, plural, for the failure message (``"series"``, ``"ROIs"``).
    tables_written
        Store keys of the tables this run wrote (unchanged tables are left out).
    stale_removed
        Outputs of units no longer in the plan that were removed.
    **extra
        Stage-specific summary fields (any name, ``params`` included: the arguments before
        them are positional only).

    Returns
    -------
    dict
        The summary (:meth:`StageSummary.to_dict`), what the flow returns.

    Raises
    ------
    StageFailed
        When the share of failed units exceeds ``params.max_failure_ratio``.
    """
    replace_quarantine(store, stage, list(quarantine))
    summary = StageSummary.from_results(
        stage,
        params.site,
        list(results),
        tables_written=list(tables_written),
        stale_removed=stale_removed,
        **extra,
    )
    post_summary(summary, report.title, report.sections)
    post_table(params.site, str(stage), report.rows_name, report.rows, report.rows_title)
    get_run_logger().info(
        "%s done: %s",
        report.title.lower(),
        ", ".join(f"{k}={v}" for k, v in summary.counts.items()) or "nothing to do",
    )
    check_failure_ratio(summary, params.max_failure_ratio, noun)
    return summary.to_dict()


def check_failure_ratio(summary: StageSummary, max_failure_ratio: float, noun: str) -> None:
    """Raise :class:`StageFailed` when more than ``max_failure_ratio`` of the units failed.

    Raises
    ------
    StageFailed
        With the count and the error classes, in one line.
    """
    if summary.failure_ratio <= max_failure_ratio:
        return
    total = sum(summary.counts.values())
    errors = Counter(summary.errors)
    raise StageFailed(
        f"{summary.stage}: {summary.counts.get(str(Status.FAILED), 0)} of {total} {noun} failed "
        f"({summary.failure_ratio:.0%} > {max_failure_ratio:.0%})"
        + (": " + ", ".join(f"{k}={v}" for k, v in sorted(errors.items())) if errors else "")
    )

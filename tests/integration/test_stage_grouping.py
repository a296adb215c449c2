"""The stage runner groups small units into one task each and still gives one outcome per unit."""

import asyncio

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.stage import Grouping, group_units, run_units

pytestmark = pytest.mark.integration


def test_groups_keep_plan_order_pack_small_units_and_leave_big_ones_alone():
    sizes = [1, 2, 300, 5, 100, 1, 1, 40, 2]
    groups = group_units(sizes, small=32, per_task=8)
    assert groups == [[2], [4], [0, 1, 3], [7], [5, 6, 8]]  # a group goes when full
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert group_units([], small=32, per_task=8) == []
    assert group_units([1] * 5, small=32, per_task=2) == [[0, 1], [2, 3], [4]]


CALLS: list[tuple[str, int]] = []  # (how, unit): the tasks run in threads of this process


def square(n: int) -> int:
    """One unit's work: fails on 13, like a corrupt series."""
    CALLS.append(("plain", n))
    if n == 13:
        raise ValueError("unlucky unit")
    return n * n


@task(name="square-unit", task_run_name="square", cache_policy=NO_CACHE)
def square_task(n: int) -> int:
    CALLS.append(("task", n))
    return n * n


@flow(name="grouping-check", task_runner=ThreadPoolTaskRunner(max_workers=2))
def grouped(units: list[int]) -> list[object]:
    return run_units(
        units,
        lambda n: square_task.submit(n),
        lambda n, exc: f"failed {n}: {type(exc).__name__}",
        "units squared",
        Grouping(
            size=lambda n: n,
            call=lambda n: (square, (n,)),
            name=lambda group: f"squares-x{len(group)}-from-{group[0]}",
            small=32,
            per_task=40,
        ),
    )


def test_a_run_with_grouping_gives_one_outcome_per_unit_in_plan_order(prefect_api):
    CALLS.clear()
    units = [3, 100, 13, 7, 1, 64, 2, 5]
    state = grouped(units, return_state=True)
    assert state.result() == [9, 10000, "failed 13: ValueError", 49, 1, 4096, 4, 25]
    # 100 and 64 ran as tasks of their own; the six small units (31 in all) in one group task,
    # where 13 failed alone
    assert sorted(n for how, n in CALLS if how == "task") == [64, 100]
    assert sorted(n for how, n in CALLS if how == "plain") == [1, 2, 3, 5, 7, 13]
    # the group's task run is named from its units (Grouping.name)
    assert asyncio.run(_task_run_names(state.state_details.flow_run_id, 3)) == [
        "square",
        "square",
        "squares-x6-from-3",
    ]


async def _task_run_names(flow_run_id, expected: int) -> list[str]:
    """Names of a flow run's task runs, sorted (the server records them from events: wait)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        for _ in range(300):
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if len(runs) >= expected:
                break
            await asyncio.sleep(0.1)
    return sorted(r.name for r in runs)

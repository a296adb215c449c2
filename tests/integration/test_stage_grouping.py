"""The stage runner groups small units into one task each and still gives one outcome per unit."""

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
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


def square(n: int) -> int:
    """One unit's work: fails on 13, like a corrupt series."""
    if n == 13:
        raise ValueError("unlucky unit")
    return n * n


@task(name="square-unit", task_run_name="square", cache_policy=NO_CACHE)
def square_task(n: int) -> int:
    return square(n)


@flow(name="grouping-check", task_runner=ThreadPoolTaskRunner(max_workers=2))
def grouped(units: list[int]) -> list[object]:
    return run_units(
        units,
        lambda n: square_task.submit(n),
        lambda n, exc: f"failed {n}: {type(exc).__name__}",
        "units squared",
        Grouping(size=lambda n: n, call=lambda n: (square, (n,)), small=32, per_task=40),
    )


def test_a_run_with_grouping_gives_one_outcome_per_unit_in_plan_order(prefect_api):
    units = [3, 100, 13, 7, 1, 64, 2, 5]
    state = grouped(units, return_state=True)
    assert state.result() == [9, 10000, "failed 13: ValueError", 49, 1, 4096, 4, 25]

    import asyncio

    async def task_runs() -> list[str]:
        async with get_client() as client:
            flow_run = await client.read_flow_run(state.state_details.flow_run_id)
            runs = await client.read_task_runs()
            return [r.name for r in runs if r.flow_run_id == flow_run.id]

    names = sorted(asyncio.run(task_runs()))
    # 100 and 64 alone; the six small units (31 in all) in one group, 13 failing alone
    assert names == ["square", "square", "unit-group-31"]

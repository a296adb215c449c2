"""A task runner built when a flow run starts, not when its flow is declared.

Stage flows declare the Dask task runner in their ``@flow`` decorator (a deployment runs them
with it). Building a ``DaskTaskRunner`` imports ``prefect_dask`` and ``distributed``, about
0.3 s of CPU, which every command importing a flow module paid even when it never used the
runner (the CLI replaces it per run; a fully cached extract rerun starts no cluster at all).
:class:`DeferredTaskRunner` stands in for it: Prefect enters ``flow.task_runner.duplicate()`` for
every run, and ``duplicate`` builds the real runner then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.task_runners import TaskRunner


class DeferredTaskRunner(TaskRunner[Any]):
    """Stand-in for the task runner ``factory`` returns, built at the start of each flow run.

    Parameters
    ----------
    factory
        A module-level function (picklable) returning the real task runner.
    """

    def __init__(self, factory: Callable[[], TaskRunner[Any]]) -> None:
        super().__init__()
        self.factory = factory

    def duplicate(self) -> Any:
        """Return the real task runner (what Prefect enters for a flow run)."""
        return self.factory()

    def submit(self, task: Any, parameters: Any, wait_for: Any = None, dependencies: Any = None):
        """Never called: a flow run uses the runner :meth:`duplicate` returns.

        Raises
        ------
        RuntimeError
            Always.
        """
        raise RuntimeError("a DeferredTaskRunner runs no task: enter its duplicate()")

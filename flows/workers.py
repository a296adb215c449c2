"""Dask worker set-up for oncoflow's own LocalCluster (imported by Dask when the cluster starts).

A closing Dask worker process gets 4 s to exit before its nanny kills it and logs
``Worker process still alive after 4.0 seconds, killing`` at WARNING: ``Nanny.close(timeout=5)``
calls ``WorkerProcess.kill(timeout)``, which waits ``0.8 * timeout`` for the process to join.
Dask has no setting for it (``LocalCluster`` closes its nannies with the default). The worker
itself stops at once; its process then runs Prefect's at-exit drains of the log and event
services and the interpreter's teardown of pyradiomics, SimpleITK and Prefect: measured
3.8-9.2 s from the nanny's request to the process's exit on a busy 2-core host (load 16-22),
so normal runs ended with one WARNING per worker and could lose their last log lines.
:class:`PatientNanny` gives them :data:`CLOSE_TIMEOUT` seconds instead. The order is already
right: prefect-dask closes a run's client before its cluster, and a closing ``LocalCluster``
retires its workers while the scheduler still runs, then closes the scheduler.
"""

from __future__ import annotations

from typing import Literal

from distributed import Nanny

#: Seconds a closing worker process gets to exit before its nanny kills it.
CLOSE_TIMEOUT = 30.0


class PatientNanny(Nanny):
    """A Dask nanny that waits up to :data:`CLOSE_TIMEOUT` seconds for its worker to exit."""

    async def close(  # type: ignore[override]
        self, timeout: float = CLOSE_TIMEOUT, reason: str = "nanny-close"
    ) -> Literal["OK"]:
        """Close the worker process, waiting up to ``timeout`` seconds before killing it."""
        return await super().close(timeout=timeout, reason=reason)

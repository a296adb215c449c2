"""Dask worker set-up for oncoflow's own LocalCluster (imported by Dask when the cluster starts).

A closing Dask worker process gets 4 s to exit before its nanny kills it and logs a WARNING.
Worker processes send their Prefect logs and events to the API at exit, which takes longer than
that on a busy machine, so every normal run ended with one WARNING per worker and could lose
its last log lines. :class:`PatientNanny` gives them :data:`CLOSE_TIMEOUT` seconds instead.
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

"""The one place that decides where flows report and where tasks run.

* Prefect API: an operator's ``PREFECT_API_URL`` is honoured; otherwise one temporary local
  server is started for the whole command and its URL exported into the environment *before*
  any Dask worker starts, so workers report to it instead of each starting a server of their own.
* Task runner: a Dask ``LocalCluster`` (one thread per worker process, dashboard off) by
  default, or an existing scheduler given by ``--dask-address``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from tasks.errors import OncoflowError

#: Native thread pools pinned to one thread per worker, so N workers use N cores.
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
}

#: Prefect settings applied when the operator has not set them.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "radiomics,distributed,tasks,flows",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


class RuntimeOptions(BaseModel):
    """Where the heavy per-series work runs (never identifying, safe as a flow parameter)."""

    workers: int = Field(2, ge=1, le=256, description="Dask worker processes (LocalCluster).")
    dask_address: str | None = Field(
        None, description="Address of an existing Dask scheduler, e.g. tcp://host:8786."
    )

    @classmethod
    def from_env(cls) -> RuntimeOptions:
        """Options from the worker host's environment.

        ``ONCOFLOW_DASK_ADDRESS`` selects an existing scheduler and ``ONCOFLOW_WORKERS`` the size
        of the LocalCluster: the production topology is chosen by configuration, not code.
        """
        return cls(
            workers=int(os.environ.get("ONCOFLOW_WORKERS", "2")),
            dask_address=os.environ.get("ONCOFLOW_DASK_ADDRESS") or None,
        )


@dataclass
class PrefectApi:
    """The Prefect API used by this command."""

    url: str
    temporary: bool
    settings_scope: contextlib.AbstractContextManager[Any] | None = None


def pin_native_threads() -> None:
    """Pin OpenMP/BLAS/ITK thread pools to one thread in this process and its children."""
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except ImportError:  # pragma: no cover - SimpleITK is a dependency
        pass


def apply_prefect_defaults() -> None:
    """Set Prefect defaults (no analytics, extra loggers) unless the operator set them."""
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


_API: PrefectApi | None = None


def ensure_prefect_api() -> PrefectApi:
    """Return the Prefect API for this command, starting one temporary server if needed.

    The server is left to stop at interpreter exit (stopping it earlier, before Prefect's
    background clients flush, makes the process hang).
    """
    global _API
    if _API is not None:
        return _API
    apply_prefect_defaults()
    url = os.environ.get("PREFECT_API_URL")
    if url:
        _API = PrefectApi(url=url, temporary=False)
        return _API
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    logging.getLogger("prefect.server.api.server").setLevel(logging.WARNING)
    server = SubprocessASGIServer()
    try:
        server.start(timeout=int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    except Exception as exc:
        raise OncoflowError(f"could not start a temporary Prefect server: {exc}") from None
    # Child processes (Dask workers) read the environment; this process's Prefect already
    # built its settings at import time, so update them too, for the life of the command.
    # Flow-run heartbeats exist so that a lasting server can mark a silent run crashed; this
    # server ends with the command, and the heartbeat thread costs every flow run up to a
    # second at its end (it sleeps in one-second steps and is joined), so they are off here.
    # The settings scope is kept referenced: a generator context manager that is entered and
    # dropped is closed by the garbage collector, which silently restores the old settings.
    os.environ["PREFECT_API_URL"] = server.api_url
    scope = temporary_settings(
        updates={PREFECT_API_URL: server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    )
    scope.__enter__()
    _API = PrefectApi(url=server.api_url, temporary=True, settings_scope=scope)
    return _API


_SHARED_ADDRESS: str | None = None


@contextlib.contextmanager
def dask_cluster(options: RuntimeOptions) -> Iterator[str]:
    """Start one Dask cluster for several flow runs of one command and yield its address.

    Inside this block :func:`task_runner` connects to the shared cluster instead of starting a
    ``LocalCluster`` per flow run (each start costs seconds). With ``options.dask_address`` the
    existing scheduler is used and nothing is started.
    """
    global _SHARED_ADDRESS
    if options.dask_address or _SHARED_ADDRESS:  # an existing scheduler, or nested in a block
        yield options.dask_address or _SHARED_ADDRESS  # type: ignore[misc]
        return
    from distributed import LocalCluster

    pin_native_threads()
    ensure_prefect_api()
    with LocalCluster(**_local_cluster_kwargs(options)) as cluster:
        previous, _SHARED_ADDRESS = _SHARED_ADDRESS, cluster.scheduler_address
        try:
            yield cluster.scheduler_address
        finally:
            _SHARED_ADDRESS = previous


#: glibc mmap threshold for worker processes (bytes), see :func:`_set_worker_malloc`.
WORKER_MMAP_THRESHOLD = str(16 * 2**20)


def _set_worker_malloc() -> None:
    """Give Dask worker processes a fixed 16 MiB glibc mmap threshold.

    Dask starts workers with ``MALLOC_TRIM_THRESHOLD_`` set, which also freezes glibc's mmap
    threshold at 128 KiB: every buffer the size of a DICOM file is then a fresh ``mmap``
    (page faults, zeroing), and bytes-heavy tasks (DICOMweb decoding, header parsing) ran 2-3x
    slower in a worker than in a plain process (benchmarks/pacs.py). A ``dask worker`` started
    by hand needs ``MALLOC_MMAP_THRESHOLD_=16777216`` in its environment for the same effect.
    """
    import dask
    import distributed  # noqa: F401 - load distributed's defaults before updating them

    key = "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_"
    if dask.config.get(key, None) is None:
        dask.config.set({key: WORKER_MMAP_THRESHOLD})


def _local_cluster_kwargs(options: RuntimeOptions) -> dict[str, object]:
    # The dashboard is off, but the scheduler's small HTTP server still tries port 8787 first
    # and warns when a second cluster on the host has it: expected, not worth a warning.
    warnings.filterwarnings("ignore", message="Port 8787 is already in use")
    _set_worker_malloc()
    return {
        "n_workers": options.workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "memory_limit": 0,
    }


def task_runner(options: RuntimeOptions):
    """Build the Dask task runner for a flow run.

    Parameters
    ----------
    options
        Number of workers, or the address of an existing scheduler.

    Returns
    -------
    prefect_dask.DaskTaskRunner
        Runner connected to ``options.dask_address``, to the cluster of an enclosing
        :func:`dask_cluster` block, or with its own one-thread-per-worker ``LocalCluster``
        (dashboard off).
    """
    from prefect_dask import DaskTaskRunner

    pin_native_threads()
    ensure_prefect_api()
    address = options.dask_address or _SHARED_ADDRESS
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster", cluster_kwargs=_local_cluster_kwargs(options)
    )


def default_task_runner():
    """Task runner for flow decorators: used when a deployment runs a stage flow directly.

    Built from :meth:`RuntimeOptions.from_env` without starting anything at import time; the
    CLI and the site pipeline replace it with :func:`task_runner` per run.
    """
    from prefect_dask import DaskTaskRunner

    options = RuntimeOptions.from_env()
    if options.dask_address:
        return DaskTaskRunner(address=options.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster", cluster_kwargs=_local_cluster_kwargs(options)
    )

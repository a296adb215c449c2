"""The one place that decides where flows report and where tasks run.

* Prefect API: an operator's ``PREFECT_API_URL`` is honoured; otherwise one temporary local
  server is started for the whole command and its URL exported into the environment *before*
  any Dask worker starts, so workers report to it instead of each starting a server of their own.
* Task runner: a Dask ``LocalCluster`` (one thread per worker process, its dashboard on
  127.0.0.1 at a free port unless ``--no-dashboard``) by default, or an existing scheduler
  given by ``--dask-address``. Worker processes get their
  native thread pools pinned to one thread and a fixed glibc mmap threshold in their
  environment before they start (Dask's pre-spawn environment), so domain code never has to.

No module state: the temporary server lives in the environment (``PREFECT_API_URL``, marked as
ours by ``ONCOFLOW_TEMPORARY_PREFECT_API``) until interpreter exit, and the cluster shared by the
flow runs of one command is a context variable set inside :func:`dask_cluster`.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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

#: Environment switch (``0`` turns it off) and address of the LocalCluster's dashboard.
DASHBOARD_ENV = "ONCOFLOW_DASHBOARD"
DASHBOARD_ADDRESS_ENV = "ONCOFLOW_DASHBOARD_ADDRESS"
OFF_VALUES = frozenset({"0", "false", "no", "off"})

#: Marks ``PREFECT_API_URL`` as the temporary server this command started (value: the URL).
TEMPORARY_API_ENV = "ONCOFLOW_TEMPORARY_PREFECT_API"

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
    dashboard: bool = Field(
        default_factory=lambda: dashboard_from_env(),
        description="Serve the Dask dashboard of oncoflow's own LocalCluster (127.0.0.1, a "
        "free port; ONCOFLOW_DASHBOARD_ADDRESS to change). Default: on, unless "
        "ONCOFLOW_DASHBOARD=0.",
    )

    @classmethod
    def from_env(cls) -> RuntimeOptions:
        """Options from the worker host's environment.

        ``ONCOFLOW_DASK_ADDRESS`` selects an existing scheduler and ``ONCOFLOW_WORKERS`` the size
        of the LocalCluster: the production topology is chosen by configuration, not code.
        ``ONCOFLOW_DASHBOARD=0`` turns the LocalCluster's dashboard off.
        """
        return cls(
            workers=int(os.environ.get("ONCOFLOW_WORKERS", "2")),
            dask_address=os.environ.get("ONCOFLOW_DASK_ADDRESS") or None,
            dashboard=dashboard_from_env(),
        )


def dashboard_from_env() -> bool:
    """Return whether the LocalCluster's dashboard is wanted (``ONCOFLOW_DASHBOARD``; on)."""
    return os.environ.get(DASHBOARD_ENV, "1").strip().lower() not in OFF_VALUES


@dataclass
class PrefectApi:
    """The Prefect API used by this command.

    Attributes
    ----------
    url
        API URL (``.../api``).
    temporary
        True when this command started the server (it stops at interpreter exit).
    process
        The temporary server's process, else None.
    """

    url: str
    temporary: bool
    process: subprocess.Popen[bytes] | None = None
    settings_scope: contextlib.AbstractContextManager[Any] | None = None
    ready: bool = False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the server answers its health check (at once for an operator's server).

        Parameters
        ----------
        timeout
            Seconds; default ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``.

        Raises
        ------
        OncoflowError
            When the temporary server exits or does not answer within ``timeout`` seconds.
        """
        if self.ready or not self.temporary:
            self.ready = True
            return
        import httpx

        if timeout is None:
            timeout = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                code = self.process.poll() if self.process is not None else None
                if code is not None:
                    raise OncoflowError(
                        f"could not start a temporary Prefect server (it exited with code {code})"
                    )
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        self.ready = True
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise OncoflowError(f"could not start a temporary Prefect server within {timeout:.0f} s")


def pin_native_threads() -> None:
    """Pin OpenMP/BLAS/ITK thread pools to one thread in this process and its children.

    Worker processes of oncoflow's LocalCluster get the same environment before they start
    (:func:`_worker_environment`); a ``dask worker`` started by hand needs :data:`THREAD_ENV`
    in its environment (docs/production.md).
    """
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


class _ExpectedErrors(logging.Filter):
    """Log records of an expected error (:class:`OncoflowError`): no traceback, or not at all."""

    def __init__(self, drop: bool) -> None:
        super().__init__()
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OncoflowError) or getattr(record, "oncoflow_expected", False):
            if self.drop:
                return False
            record.oncoflow_expected = True
            record.exc_info = None
            record.exc_text = None
        elif self.drop and self._final_state_of_expected_error(record):
            return False
        return True

    @staticmethod
    def _final_state_of_expected_error(record: logging.LogRecord) -> bool:
        """Tell whether a record is a run's final state line for an expected error (no exc_info)."""
        message = record.getMessage()
        if not message.startswith("Finished in state Failed"):
            return False
        names = [OncoflowError, *OncoflowError.__subclasses__()]
        return any(f"{cls.__name__}: " in message for cls in names)


def quiet_exit_progress() -> None:
    """Keep Prefect's at-exit progress line off the logs.

    When the interpreter exits, Prefect stops its events and log services, and each logs
    ``Still processing items: N items remaining...`` at WARNING whenever anything is still
    queued, which is the case after most runs (the service then sends it). It is progress, not
    a problem.
    """
    for service in ("EventsWorker", "APILogWorker"):
        logging.getLogger(service).setLevel(logging.ERROR)


def hide_expected_tracebacks(console: bool = True) -> None:
    """Keep tracebacks of expected errors out of Prefect's logs (the UI) and the console.

    An :class:`OncoflowError` raised in a flow (a missing file, an invalid value) is logged by
    Prefect's engine with its traceback; the run log keeps the message only, and the console
    leaves it to the command's one line ``error: ...`` (``console=True``).
    """
    import prefect.main  # noqa: F401 - sets up Prefect's logging, once (as flows import it)
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    names = ("prefect.flow_runs", "prefect.task_runs")
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedErrors) for f in logger.filters):
            logger.addFilter(_ExpectedErrors(drop=False))
    if not console:
        return
    for name in ("", "prefect", *names):
        for handler in logging.getLogger(name).handlers:
            is_console = isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            )
            if is_console and not any(isinstance(f, _ExpectedErrors) for f in handler.filters):
                handler.addFilter(_ExpectedErrors(drop=True))


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 now (the one helper for servers and tests)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server_process(port: int) -> subprocess.Popen[bytes]:
    """Start Prefect's API server app under uvicorn, as Prefect's own temporary server does.

    Started directly instead of through ``prefect.server.api.server.SubprocessASGIServer``:
    importing that module in this process costs 2-3 s of start-up for nothing (the server
    runs in the child), and this process can do other start-up work while the child boots.
    """
    import prefect

    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    env.pop("PREFECT_API_URL", None)
    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parents[1])]
    args += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--log-level", "error", "--lifespan", "on"]
    in_main_thread = threading.current_thread() is threading.main_thread()
    return subprocess.Popen(
        args,
        env=env,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if in_main_thread and sys.platform == "linux" else None,
    )


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to terminate the server when the command's process dies, even by SIGKILL.

    (The signal follows the thread that started the child, hence main-thread starts only.)
    """
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop_server_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ensure_prefect_api(wait: bool = True) -> PrefectApi:
    """Return the Prefect API for this command, starting one temporary server if needed.

    Parameters
    ----------
    wait
        Block until the server answers. With False the server boots in the background and
        the caller calls :meth:`PrefectApi.wait_ready` before the first flow run (used to
        start the Dask cluster meanwhile).

    Notes
    -----
    The temporary server stops at interpreter exit, after Prefect's own exit handlers have
    flushed logs and events (stopping it earlier makes the process hang). This process's flow
    runs get heartbeats that stop as soon as a run ends (:mod:`flows.prompt_heartbeats`).
    """
    from flows import prompt_heartbeats

    api = _open_prefect_api()  # first: a temporary server boots while this process goes on
    prompt_heartbeats.install()
    if wait:
        api.wait_ready()
    return api


def _open_prefect_api() -> PrefectApi:
    apply_prefect_defaults()
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return PrefectApi(url=url, temporary=os.environ.get(TEMPORARY_API_ENV) == url)
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    try:
        process = _start_server_process(port)
    except OSError as exc:
        raise OncoflowError(f"could not start a temporary Prefect server: {exc}") from None
    # Registered now, so it runs after the exit handlers Prefect registers later (LIFO).
    atexit.register(_stop_server_process, process)
    os.environ[TEMPORARY_API_ENV] = url
    # Child processes (Dask workers) read the environment; this process's Prefect already
    # built its settings at import time, so update them too, for the life of the command.
    # Flow-run heartbeats exist so that a lasting server can mark a silent run crashed; this
    # server ends with the command, and the heartbeat thread costs every flow run up to a
    # second at its end (it sleeps in one-second steps and is joined), so they are off here.
    # The settings scope is kept referenced: a generator context manager that is entered and
    # dropped is closed by the garbage collector, which silently restores the old settings.
    os.environ["PREFECT_API_URL"] = url
    scope = temporary_settings(
        updates={PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    )
    scope.__enter__()
    atexit.register(lambda: scope)  # keeps the scope referenced for the life of the command
    return PrefectApi(url=url, temporary=True, process=process, settings_scope=scope)


#: Address of the cluster of an enclosing :func:`dask_cluster` block (None outside one).
_shared_address: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "oncoflow_shared_dask_address", default=None
)
#: Dashboard URL of the cluster of an enclosing :func:`dask_cluster` block (None: no dashboard).
_dashboard_link: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "oncoflow_dask_dashboard", default=None
)


def dashboard_link() -> str | None:
    """Return the dashboard URL of the enclosing :func:`dask_cluster` block's LocalCluster."""
    return _dashboard_link.get()


@contextlib.contextmanager
def dask_cluster(options: RuntimeOptions) -> Iterator[str]:
    """Start one Dask cluster for several flow runs of one command and yield its address.

    Inside this block :func:`task_runner` connects to the shared cluster instead of starting a
    ``LocalCluster`` per flow run (each start costs seconds). With ``options.dask_address`` the
    existing scheduler is used and nothing is started.
    """
    existing = options.dask_address or _shared_address.get()
    if existing:  # an existing scheduler, or nested in a block
        yield existing
        return
    from distributed import LocalCluster

    pin_native_threads()
    api = ensure_prefect_api(wait=False)  # the server boots while the cluster starts
    with LocalCluster(**_local_cluster_kwargs(options)) as cluster:
        link = cluster.dashboard_link if options.dashboard else None
        if link:
            # the command's user sees it at once; runs link it from their report
            print(f"Dask dashboard: {link}", file=sys.stderr, flush=True)
            logging.getLogger("flows.runtime").info("Dask dashboard: %s", link)
        api.wait_ready()
        token = _shared_address.set(cluster.scheduler_address)
        link_token = _dashboard_link.set(link)
        try:
            yield cluster.scheduler_address
        finally:
            _dashboard_link.reset(link_token)
            _shared_address.reset(token)


#: glibc mmap threshold for worker processes (bytes), see :func:`_set_worker_malloc`.
WORKER_MMAP_THRESHOLD = str(16 * 2**20)


def _worker_environment() -> None:
    """Set the environment of oncoflow's LocalCluster workers before they start.

    Native thread pools are pinned to one thread (:data:`THREAD_ENV`), so N workers use N
    cores. Dask starts workers with ``MALLOC_TRIM_THRESHOLD_`` set, which also freezes glibc's mmap
    threshold at 128 KiB: every buffer the size of a DICOM file is then a fresh ``mmap``
    (page faults, zeroing), and bytes-heavy tasks (DICOMweb decoding, header parsing) ran 2-3x
    slower in a worker than in a plain process (benchmarks/pacs.py). A ``dask worker`` started
    by hand needs ``MALLOC_MMAP_THRESHOLD_=16777216`` in its environment for the same effect.
    """
    import dask
    import distributed  # noqa: F401 - load distributed's defaults before updating them

    wanted = {"MALLOC_MMAP_THRESHOLD_": WORKER_MMAP_THRESHOLD, **THREAD_ENV}
    for name, value in wanted.items():
        key = f"distributed.nanny.pre-spawn-environ.{name}"
        if dask.config.get(key, None) is None:
            dask.config.set({key: value})


def _no_worker_profiling() -> None:
    """Turn off the statistical profiler of the workers of oncoflow's own LocalCluster.

    Each worker samples the stack of its task thread every 10 ms for the dashboard's profile
    page; it takes the GIL from the task, so it stays off (the dashboard's other pages, task
    stream, workers, memory, progress, work without it). An external cluster keeps its own
    configuration.
    """
    import dask

    dask.config.set({"distributed.worker.profile.enabled": False})


def _local_cluster_kwargs(options: RuntimeOptions) -> dict[str, object]:
    # Without the dashboard, the scheduler's small HTTP server still tries port 8787 first
    # and warns when a second cluster on the host has it: expected, not worth a warning.
    warnings.filterwarnings("ignore", message="Port 8787 is already in use")
    dashboard = os.environ.get(DASHBOARD_ADDRESS_ENV) or "127.0.0.1:0"
    _worker_environment()
    _no_worker_profiling()
    return {
        "worker_class": "flows.workers.PatientNanny",
        "n_workers": options.workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": dashboard if options.dashboard else None,
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
        (dashboard per ``options.dashboard``; Prefect logs its URL).
    """
    from prefect_dask import DaskTaskRunner

    pin_native_threads()
    ensure_prefect_api()
    address = options.dask_address or _shared_address.get()
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster", cluster_kwargs=_local_cluster_kwargs(options)
    )


def default_task_runner():
    """Task runner for flow decorators: used when a deployment runs a stage flow directly.

    Built from :meth:`RuntimeOptions.from_env` when a run starts (see
    :mod:`flows.deferred_runner`), so importing a flow module imports no Dask; the CLI and the
    site pipeline replace it with :func:`task_runner` per run.
    """
    from flows.deferred_runner import DeferredTaskRunner

    return DeferredTaskRunner(dask_runner_from_env)


def dask_runner_from_env():
    """Build the Dask task runner :meth:`RuntimeOptions.from_env` describes.

    Returns
    -------
    prefect_dask.DaskTaskRunner
        Connected to ``ONCOFLOW_DASK_ADDRESS``, or with its own ``LocalCluster``.
    """
    from prefect_dask import DaskTaskRunner

    options = RuntimeOptions.from_env()
    if options.dask_address:
        return DaskTaskRunner(address=options.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster", cluster_kwargs=_local_cluster_kwargs(options)
    )


def run_on_dask(flow: Any, options: RuntimeOptions, *args: Any) -> Any:
    """Run a stage flow with its tasks on Dask, as the CLI and the stage wrappers do.

    The Dask cluster starts while a temporary Prefect server boots (instead of after it, inside
    the flow run); inside a :func:`dask_cluster` block the block's cluster is reused.

    Parameters
    ----------
    flow
        The Prefect flow.
    options
        Workers or the address of an existing scheduler.
    *args
        The flow's arguments.

    Returns
    -------
    Any
        What the flow returns.
    """
    with dask_cluster(options):
        return flow.with_options(task_runner=task_runner(options))(*args)


def run_stage(flow: Any, options: RuntimeOptions, *args: Any, workers: bool = True) -> Any:
    """Run a stage flow: on Dask (:func:`run_on_dask`), or without workers when it needs none.

    A stage whose plan found every unit unchanged, or only a small increment
    (:func:`tasks.unit_state.needs_workers`), would spend most of its time starting a Dask
    cluster (processes, imports: seconds), so it runs in this process with a one-thread task
    runner instead.

    Parameters
    ----------
    flow
        The Prefect flow.
    options
        Workers or the address of an existing scheduler.
    *args
        The flow's arguments.
    workers
        False when the flow has nothing or little to compute.

    Returns
    -------
    Any
        What the flow returns.
    """
    if workers:
        return run_on_dask(flow, options, *args)
    from prefect.task_runners import ThreadPoolTaskRunner

    ensure_prefect_api()
    return flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(*args)

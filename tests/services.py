"""Start real services for integration tests: PostgreSQL, a Prefect server, a Prefect worker,
a Dask scheduler with workers. Each picks free loopback ports, waits for readiness with a bounded
timeout and is stopped by its pid when the context exits, so a failed test leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from flows.runtime import free_port

BIN = Path(sys.executable).parent
PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``check()`` until it is truthy, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.25)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Terminate a process group started by :func:`spawn`, then kill it if needed."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def _default_sigint() -> None:  # pragma: no cover - runs in the child before exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """Start a process in its own process group with output to ``log``.

    SIGINT gets its default action in the child even when this process ignores it (a test run
    started in the background by a shell): `prefect worker` turns SIGTERM into a SIGINT to
    itself, and with SIGINT ignored it would never stop on SIGTERM.
    """
    fh = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        args,
        stdout=fh,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        preexec_fn=_default_sigint,
        **kw,
    )


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster."""

    port: int
    url: str  # SQLAlchemy asyncpg URL for Prefect


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """Create and start a throwaway PostgreSQL cluster (initdb refuses root: run as postgres)."""
    if not PG_BIN:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    pg_bin = PG_BIN[-1]
    workdir = Path(tempfile.mkdtemp(prefix="oncoflow-pg-"))
    data = workdir / "data"
    shutil.chown(workdir, "postgres", "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(
        [*as_pg, str(pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "oncoflow"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    opts = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1"
    ctl = [*as_pg, str(pg_bin / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        [*ctl, "-o", opts, "-l", str(workdir / "log"), "-w", "-t", "60", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield Postgres(port=port, url=f"postgresql+asyncpg://oncoflow@127.0.0.1:{port}/postgres")
    finally:
        subprocess.run([*ctl, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class PrefectServer:
    """A ``prefect server start`` process."""

    port: int
    api_url: str
    proc: subprocess.Popen
    env: dict[str, str]


@contextlib.contextmanager
def prefect_server(
    home: Path, database_url: str | None = None, port: int | None = None
) -> Iterator[PrefectServer]:
    """Start ``prefect server start`` (SQLite under ``home`` unless ``database_url`` is given)."""
    port = port or free_port()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    proc = spawn(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        home / "server.log",
        env,
    )
    try:
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200,
            180,
            "prefect server",
            proc,
        )
        yield PrefectServer(port=port, api_url=env["PREFECT_API_URL"], proc=proc, env=env)
    finally:
        stop(proc)


@contextlib.contextmanager
def prefect_worker(
    server: PrefectServer, pool: str, home: Path, cwd: Path, extra_env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """Start ``prefect worker start -p <pool>`` (process pool) against ``server``."""
    proc = spawn(
        [str(BIN / "prefect"), "worker", "start", "-p", pool, "--type", "process"],
        home / f"worker-{pool}.log",
        {**server.env, **(extra_env or {})},
        cwd=cwd,
    )
    try:
        yield proc
    finally:
        stop(proc)


@dataclass
class DaskCluster:
    """An external ``dask scheduler`` with ``dask worker`` processes."""

    address: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen]


@contextlib.contextmanager
def dask_cluster(
    logdir: Path, n_workers: int = 2, env: dict[str, str] | None = None
) -> Iterator[DaskCluster]:
    """Start ``dask scheduler`` and ``n_workers`` single-threaded ``dask worker`` processes."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = spawn(
        [
            str(BIN / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            ":0",
            "--no-show",
        ],
        logdir / "scheduler.log",
        env,
    )
    workers: list[subprocess.Popen] = []
    try:
        for i in range(n_workers):
            workers.append(
                spawn(
                    [
                        str(BIN / "dask"),
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--nworkers",
                        "1",
                        "--no-dashboard",
                        "--name",
                        f"ext-{i}",
                        "--memory-limit",
                        "0",
                    ],
                    logdir / f"worker-{i}.log",
                    env,
                )
            )

        def ready() -> bool:
            with Client(address, timeout=5) as client:
                return len(client.scheduler_info()["workers"]) >= n_workers

        wait_for(ready, 120, "dask cluster", scheduler)
        yield DaskCluster(address=address, scheduler=scheduler, workers=workers)
    finally:
        for proc in [*workers, scheduler]:
            stop(proc)


async def prefect_records(flow_names: list[str]):
    """Flow runs of the named flows with their logs, artifacts and task runs (Prefect API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=flow_names))
        )
        ids = [r.id for r in runs]
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids))
        )
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        tasks = await client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids))
        )
        return runs, logs, artifacts, tasks


class Inbox(ThreadingHTTPServer):
    """An HTTP endpoint that records every POST: (path, body)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:  # noqa: N805 - http.server API
                length = int(handler.headers.get("Content-Length") or 0)
                self.received.append((handler.path, handler.rfile.read(length)))
                handler.send_response(200)
                handler.end_headers()

            def log_message(handler, *args: object) -> None:  # noqa: N805
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for(self, path: str, timeout: float) -> bytes:
        """Return the first body posted to ``path``; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for got_path, body in list(self.received):
                if got_path == path:
                    return body
            time.sleep(0.25)
        raise AssertionError(f"nothing posted to {path} in {timeout:.0f}s: {self.received}")

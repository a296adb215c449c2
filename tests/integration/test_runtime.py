"""The runtime starts one Prefect server per command and Dask workers report to it."""

import asyncio
import logging
import os
import threading
import time

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.runtime import (
    RuntimeOptions,
    _local_cluster_kwargs,
    dashboard_link,
    dask_cluster,
    task_runner,
)


@task
def where_am_i(i: int) -> tuple[int, int, str, str]:
    threads = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "")
    return i, os.getpid(), os.environ.get("PREFECT_API_URL", ""), threads


@flow
def probe(n: int) -> list[tuple[int, int, str, str]]:
    futures = [where_am_i.submit(i) for i in range(n)]
    return [f.result() for f in futures]


@task
def fetch(url: str) -> tuple[int, str]:
    import httpx

    response = httpx.get(url, timeout=30, follow_redirects=True)
    return response.status_code, response.text


@flow
def watch_dashboard(url: str) -> tuple[int, str]:
    """A run whose task, on a Dask worker, opens the cluster's dashboard while the run lasts."""
    return fetch.submit(url).result()


async def _task_runs_of(flow_run_id) -> int:
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        return len(runs)


def test_workers_report_to_the_one_server(prefect_api, caplog):
    options = RuntimeOptions(workers=2, dashboard=True)
    caplog.set_level(logging.WARNING)
    distributed_logger = logging.getLogger("distributed")  # does not propagate to the root
    distributed_logger.addHandler(caplog.handler)
    with dask_cluster(options) as address:
        assert address.startswith("tcp://127.0.0.1:")
        state = probe.with_options(task_runner=task_runner(options))(6, return_state=True)
        # a second flow run reuses the same cluster (no new LocalCluster)
        state2 = probe.with_options(task_runner=task_runner(options))(2, return_state=True)
        with dask_cluster(options) as nested:  # a nested block reuses the cluster
            assert nested == address
        # the dashboard (bokeh) is served at the printed URL during a run
        link = dashboard_link()
        assert link and link.startswith("http://127.0.0.1:") and link.endswith("/status")
        code, page = watch_dashboard.with_options(task_runner=task_runner(options))(link)
        assert code == 200 and "Dask" in page and "needs bokeh" not in page
    results = state.result()
    assert [r[0] for r in results] == list(range(6))
    assert {r[2] for r in results} == {prefect_api}
    assert os.getpid() not in {r[1] for r in results}  # ran in worker processes
    assert len({r[1] for r in results + state2.result()}) <= 2
    assert asyncio.run(_task_runs_of(state.state_details.flow_run_id)) == 6
    assert {r[3] for r in results} == {"1"}  # native threads pinned before the worker started
    # workers exit cleanly: no "Worker process still alive after 4.0 seconds, killing"
    distributed_logger.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_no_dashboard_turns_it_off(monkeypatch):
    assert _local_cluster_kwargs(RuntimeOptions(dashboard=False))["dashboard_address"] is None
    assert _local_cluster_kwargs(RuntimeOptions(dashboard=True))["dashboard_address"] == (
        "127.0.0.1:0"
    )
    monkeypatch.delenv("ONCOFLOW_DASHBOARD", raising=False)
    assert RuntimeOptions().dashboard is True  # on by default
    monkeypatch.setenv("ONCOFLOW_DASHBOARD", "0")
    assert RuntimeOptions().dashboard is False and RuntimeOptions.from_env().dashboard is False


def test_temporary_server_ends_with_its_command_even_when_killed(tmp_path):
    """A command killed by SIGKILL leaves no Prefect server behind (it would hold a port)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = (
        f"import sys, time; sys.path.insert(0, {str(root)!r})\n"
        "from flows.runtime import ensure_prefect_api\n"
        "api = ensure_prefect_api()\n"
        "print(api.process.pid, api.url, flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path)  # its own database, not the session's
    command = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        server_pid, url = command.stdout.readline().split()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
        os.kill(int(server_pid), 0)  # the server runs while the command runs
        os.kill(command.pid, signal.SIGKILL)
        command.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(int(server_pid), 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(int(server_pid), signal.SIGKILL)
            raise AssertionError("the temporary Prefect server outlived its killed command")
    finally:
        command.kill()
        command.stdout.close()


@flow
def beating() -> list[threading.Thread]:
    """A run that returns the threads started for it (its heartbeat thread among them)."""
    return [t for t in threading.enumerate() if t is not threading.current_thread()]


async def _heartbeats_of(flow_run_id) -> list:
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    async with get_client() as client:
        page = await client.read_events(
            EventFilter(
                event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
            ),
            limit=50,
        )
        return page.events


def test_heartbeats_start_with_the_run_and_stop_with_it(prefect_api):
    import prefect.flow_engine
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows import prompt_heartbeats

    assert prefect.flow_engine._send_heartbeats is prompt_heartbeats.prompt_heartbeats
    before = set(threading.enumerate())
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        state = beating(return_state=True)
    started = [t for t in state.result() if t not in before]
    assert [t.name for t in started if t.name == prompt_heartbeats.THREAD_NAME] == [
        prompt_heartbeats.THREAD_NAME
    ]
    assert not any(t.is_alive() for t in started if t.name == prompt_heartbeats.THREAD_NAME)
    deadline = time.monotonic() + 30
    beats: list = []
    while not beats and time.monotonic() < deadline:  # events reach the server asynchronously
        beats = asyncio.run(_heartbeats_of(state.state_details.flow_run_id))
        time.sleep(0.2)
    assert len(beats) == 1  # the one beat at the start of a run shorter than the interval

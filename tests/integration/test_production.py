"""Production topology, end to end, selected by configuration only.

PostgreSQL (a throwaway cluster), `prefect server` on it, a `prefect worker` on a process pool,
an external `dask scheduler` with two `dask worker` processes, and moto's S3 server for the
store and the publication. The site pipeline runs through a deployment from prefect.yaml; the
test then checks the run is in PostgreSQL, the tasks ran on the external Dask workers, the S3
outputs equal the embedded default's for the same input (the session's reference run of the
one-patient site, tests/conftest.py), and that a Prefect server restarted mid-run loses
nothing: the next run completes without recomputing finished series.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REFERENCE_SECRET, ReferenceRun
from tests.services import (
    BIN,
    PG_BIN,
    dask_cluster,
    postgres,
    prefect_server,
    prefect_worker,
    stop,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
STAGES = ["ingest", "deidentify", "harmonise", "extract", "publish"]
pytestmark = [pytest.mark.integration, pytest.mark.production, pytest.mark.timeout(1800)]


def _prefect(server, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", *args],
        cwd=REPO,
        env={**os.environ, **server.env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


async def _start_run(api_url: str, name: str, parameters: dict):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(name)
            return await client.create_flow_run_from_deployment(
                deployment.id, parameters=parameters
            )


async def _wait_run(api_url: str, run_id, timeout: float):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with get_client() as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                run = await client.read_flow_run(run_id)
                if run.state and run.state.is_final():
                    break
                await asyncio.sleep(2)
            subflows, parents = [], [run_id]
            while parents:  # every descendant: site-pipeline, its stages, their subflows
                children = await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": parents})
                )
                subflows.extend(children)
                parents = [c.id for c in children]
            ids = [run_id, *[s.id for s in subflows]]
            task_runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
            )
            return run, subflows, task_runs


def _s3_hashes(prefix: str) -> dict[str, str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    return {
        p.removeprefix(prefix).lstrip("/"): hashlib.sha256(fs.cat_file(p)).hexdigest()
        for p in fs.find(prefix)
    }


def _local_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _comparable(hashes: dict[str, str]) -> dict[str, str]:
    """The site's derived outputs (tables, de-identified DICOM, volumes, features)."""
    keep = ("deid/", "harmonised/", "features/", "catalog/series.parquet")
    return {k: v for k, v in hashes.items() if k.startswith(keep) and "/_" not in k}


async def _stage_rows(api_url: str, run_id) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["site-a-pipeline-stages"]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
                )
            )
    assert len(artifacts) == 1
    data = artifacts[0].data
    return json.loads(data) if isinstance(data, str) else data


def _dask_task_prefixes(address: str) -> dict[str, int]:
    from distributed import Client

    def prefixes(dask_scheduler) -> dict[str, int]:
        return {
            name: sum(prefix.state_counts.values())
            for name, prefix in dask_scheduler.task_prefixes.items()
        }

    with Client(address, timeout=30) as client:
        return client.run_on_scheduler(prefixes)


@pytest.mark.skipif(not PG_BIN, reason="PostgreSQL is not installed (apt-get install postgresql)")
def test_production_topology(tmp_path, reference_run: ReferenceRun, s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for bucket in ("prod-store", "prod-publication"):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    services_env = {
        "ONCOFLOW_SITE_SECRET": REFERENCE_SECRET,
        **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")},
    }
    home = tmp_path / "prefect-home"
    home.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    config = tmp_path / "site-a.yaml"
    name = "site-pipeline-scheduled/site-a-nightly"

    with postgres() as pg, dask_cluster(logs, 2, env=services_env) as dask:
        config.write_text(
            yaml.safe_dump(
                {
                    "site": "site-a",
                    "source": str(reference_run.source),
                    "store": "s3://prod-store/stores",
                    "publication": "s3://prod-publication/site-a",
                    "cohort": str(REPO / "deployments/cohorts/demo.yaml"),
                    "radiomics": ["ct"],
                    "dask_address": dask.address,
                }
            )
        )
        params = {"site_config": str(config), "stages": STAGES}
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(prefect_server(home, database_url=pg.url))
            for pool in ("site-a-pool", "site-b-pool"):
                _prefect(server, "work-pool", "create", pool, "--type", "process")
            _prefect(server, "deploy", "--prefect-file", "deployments/prefect.yaml", "--all")
            stack.enter_context(prefect_worker(server, "site-a-pool", home, REPO, services_env))
            first = asyncio.run(_start_run(server.api_url, name, params))
            # restart the Prefect server while the run is past de-identification
            wait_for(
                lambda: fs.exists("prod-store/stores/site-a/deid/series.parquet"),
                600,
                "de-identification output",
            )
            stop(server.proc)
            server = stack.enter_context(
                prefect_server(home, database_url=pg.url, port=server.port)
            )
            first_run, _, _ = asyncio.run(_wait_run(server.api_url, first.id, timeout=900))
            second = asyncio.run(_start_run(server.api_url, name, params))
            run, subflows, task_runs = asyncio.run(
                _wait_run(server.api_url, second.id, timeout=900)
            )
            worker_log = (home / "worker-site-a-pool.log").read_text(errors="replace")
            assert run.state.is_completed(), f"{run.state}\n{worker_log[-4000:]}"
            # the deployment's run holds the report (the stages are its subflows)
            rows = {r["stage"]: r for r in asyncio.run(_stage_rows(server.api_url, run.id))}

            # the runs are in PostgreSQL: through the API, and in the database itself
            assert {s.name.split("-")[0] for s in subflows} >= {
                "ingest",
                "deidentify",
                "harmonise",
                "extract",
                "publish",
            }
            assert len(task_runs) > 0
            count = subprocess.run(
                [
                    str(PG_BIN[-1] / "psql"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(pg.port),
                    "-U",
                    "oncoflow",
                    "-d",
                    "postgres",
                    "-tAc",
                    "select count(*) from flow_run",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            assert int(count) >= 2 + len(subflows)

        # the tasks ran on the external Dask workers: its scheduler saw every stage's tasks
        prefixes = _dask_task_prefixes(dask.address)
        assert prefixes, "no task reached the external Dask scheduler"

    # nothing finished before the restart was recomputed by the next run: ingest and
    # de-identification had finished; if the first run survived the restart, nothing at all
    assert rows["ingest"]["computed"] == 0
    assert rows["deidentify"]["computed"] == 0
    if first_run.state.is_completed():
        assert rows["harmonise"]["computed"] == 0
        assert rows["extract"]["computed"] == 0

    # the S3 outputs equal the embedded default's (local store, local Dask) for the same input
    s3 = _comparable(_s3_hashes("prod-store/stores/site-a"))
    local = _comparable(_local_hashes(reference_run.store / "site-a"))
    assert s3 and s3 == local
    published = _s3_hashes("prod-publication/site-a")
    assert any(k.endswith("manifest.json") for k in published)

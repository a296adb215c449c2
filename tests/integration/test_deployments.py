"""Operations: deploy from prefect.yaml to a real `prefect server`, run through a `prefect worker`.

Starts `prefect server` (SQLite) in a subprocess, creates the sites' process work pools, runs
`prefect deploy --prefect-file deployments/prefect.yaml --all`, starts a worker for site-a,
triggers the nightly deployment on a synthetic site and reads its artifacts back through the API.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.services import BIN, prefect_server, prefect_worker

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


def _prefect(server, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", *args],
        cwd=REPO,
        env={**os.environ, **server.env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


async def _run_and_wait(api_url: str, name: str, parameters: dict, timeout: float):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(name)
            run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                run = await client.read_flow_run(run.id)
                if run.state and run.state.is_final():
                    break
                await asyncio.sleep(2)
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="site-a-"))
            )
            deployments = await client.read_deployments()
            pools = await client.read_work_pools()
            return run, artifacts, deployments, pools


def test_deploy_from_prefect_yaml_and_run_through_a_worker(tmp_path, synth_cohort):
    home = tmp_path / "prefect-home"
    home.mkdir()
    store = tmp_path / "store"
    config = tmp_path / "site-a.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "site": "site-a",
                "source": str(synth_cohort / "site-a"),
                "store": str(store),
                "radiomics": ["ct"],
                "workers": 2,
            }
        )
    )
    with prefect_server(home) as server:
        for site in ("site-a", "site-b"):
            _prefect(server, "work-pool", "create", f"{site}-pool", "--type", "process")
        deployed = _prefect(
            server, "deploy", "--prefect-file", "deployments/prefect.yaml", "--all", timeout=600
        )
        assert "site-a-nightly" in deployed.stdout
        worker_env = {"ONCOFLOW_SITE_SECRET": "deployment-test-secret-0123456789abcdef"}
        with prefect_worker(server, "site-a-pool", home, REPO, worker_env) as worker:
            run, artifacts, deployments, pools = asyncio.run(
                _run_and_wait(
                    server.api_url,
                    "site-pipeline-scheduled/site-a-nightly",
                    # the nightly deployment, shortened to its first two stages to keep CI fast
                    {"site_config": str(config), "stages": ["ingest", "deidentify"]},
                    timeout=600,
                )
            )
            assert worker.poll() is None, "worker died"
    log = (home / "worker-site-a-pool.log").read_text(errors="replace")
    assert run.state.is_completed(), f"{run.state}\n{log[-3000:]}"
    # every deployment of the file exists, with its schedule and pool
    by_name = {d.name: d for d in deployments}
    assert {"site-a-nightly", "site-a-weekly-publish", "site-b-nightly"} <= set(by_name)
    assert by_name["site-a-nightly"].work_pool_name == "site-a-pool"
    assert by_name["site-a-nightly"].schedules[0].schedule.cron == "0 1 * * *"
    assert {p.name for p in pools} >= {"site-a-pool", "site-b-pool"}
    # the run's artifacts are readable through the API
    keys = {a.key for a in artifacts}
    assert "site-a-pipeline-report" in keys
    report = next(a for a in artifacts if a.key == "site-a-pipeline-report").data
    for stage in ("ingest", "deidentify"):
        assert f"| {stage} |" in report
    assert "| harmonise |" not in report
    # the stages wrote their outputs
    assert (store / "site-a" / "catalog" / "series.parquet").exists()
    assert (store / "site-a" / "deid" / "series.parquet").exists()
    assert not (store / "site-a" / "harmonised").exists()

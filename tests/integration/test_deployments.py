"""The operator's path of docs/operations.md and docs/production.md, on a real `prefect server`.

Starts `prefect server` (SQLite), creates site-a's process work pool, deploys site-a's
deployments as the docs do (`prefect deploy --prefect-file deployments/prefect.yaml --name
'site-a-*'`), creates the two blocks `apply.py --blocks` lists (pointing at a local HTTP
endpoint standing in for the hub and the operators' chat) and applies the automations, starts a
worker with the heartbeat the docs set (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30`), then:

* runs the nightly deployment on a synthetic site: it completes, outlasting the silent-run
  window (shortened here from 300 s to 45 s, still 1.5 x the heartbeat, to keep CI short), with
  no Crashed state and no notification; the report, the stage table and the `site:site-a` tag
  are on the deployment's run itself (the run an operator opens), the stages its subflows;
* runs the on-demand form from the site file: the form offers the series and ROIs the nightly
  run harmonised, labels every field, keeps the researcher's run name; a selection with nothing
  to extract ends in the state `Nothing to do` with the reason;
* stops the worker with SIGTERM and checks it exits promptly.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.services import BIN, Inbox, prefect_server, prefect_worker

REPO = Path(__file__).resolve().parents[2]
AUTOMATIONS = REPO / "deployments" / "automations"
WINDOW = 45  # seconds; the shipped silent-run window is 300
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]


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


def _blocks_and_automations(server, inbox: Inbox, tmp_path: Path) -> None:
    """Create exactly the blocks apply.py lists, then apply every automation file."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.blocks.webhook import Webhook
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**os.environ, **server.env}
    needed = subprocess.run(
        [sys.executable, str(AUTOMATIONS / "apply.py"), "--blocks"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert needed == ["custom-webhook/oncoflow-operators", "webhook/oncoflow-hub"]
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        Webhook(method="POST", url=f"{inbox.url}/hub", allow_private_urls=True).save(
            "oncoflow-hub"
        )
        CustomWebhookNotificationBlock(
            name="operators",
            url=f"{inbox.url}/operators",
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
            allow_private_urls=True,
        ).save("oncoflow-operators")
    silent = yaml.safe_load((AUTOMATIONS / "silent-run-crashed.yaml").read_text())
    silent["trigger"]["within"] = WINDOW
    (tmp_path / "silent-run-crashed.yaml").write_text(yaml.safe_dump(silent))
    files = [AUTOMATIONS / "cohort-published.yaml", AUTOMATIONS / "site-pipeline-failed.yaml"]
    files.append(tmp_path / "silent-run-crashed.yaml")
    subprocess.run(
        [sys.executable, str(AUTOMATIONS / "apply.py"), *map(str, files)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )


async def _run(client, name: str, parameters: dict, run_name: str | None, timeout: float):
    deployment = await client.read_deployment_by_name(name)
    run = await client.create_flow_run_from_deployment(
        deployment.id, parameters=parameters, name=run_name
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = await client.read_flow_run(run.id)
        if run.state and run.state.is_final():
            return run
        await asyncio.sleep(2)
    raise AssertionError(f"{name} did not finish in {timeout:.0f} s: {run.state}")


async def _operator_path(api_url: str, config: Path) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out: dict = {}
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with get_client() as client:
            nightly = await _run(
                client,
                "site-pipeline-scheduled/site-a-nightly",
                {"site_config": str(config)},
                None,
                900,
            )
            out["nightly"] = nightly
            out["nightly_artifacts"] = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[nightly.id])
                )
            )
            out["children"] = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[nightly.id])
                )
            )
            out["task_runs"] = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[c.id for c in out["children"]])
                )
            )
            form = await client.read_deployment_by_name("extract-on-demand/site-a-on-demand")
            out["form"] = form.parameter_openapi_schema
            choices = form.parameter_openapi_schema["properties"]["series"]["items"]["enum"]
            out["chosen"] = choices[0]
            out["on_demand"] = await _run(
                client,
                "extract-on-demand/site-a-on-demand",
                {"site_config": str(config), "series": [choices[0]]},
                "lung-texture-study",
                600,
            )
            out["nothing"] = await _run(
                client,
                "extract-on-demand/site-a-on-demand",
                {"site_config": str(config), "preset": "pet"},
                None,
                600,
            )
            out["all_runs"] = await client.read_flow_runs()
    return out


def test_operator_path_deploy_run_form_and_stop(tmp_path, synth_cohort):
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
                "radiomics": ["ct", "mr"],
                "workers": 1,
            }
        )
    )
    inbox = Inbox()
    threading.Thread(target=inbox.serve_forever, daemon=True).start()
    try:
        with prefect_server(home) as server:
            _prefect(server, "work-pool", "create", "site-a-pool", "--type", "process")
            deployed = _prefect(
                server,
                "deploy",
                "--prefect-file",
                "deployments/prefect.yaml",
                "--name",
                "site-a-*",
                timeout=600,
            )
            assert "site-a-nightly" in deployed.stdout and "site-b" not in deployed.stdout
            _blocks_and_automations(server, inbox, tmp_path)
            worker_env = {
                "ONCOFLOW_SITE_SECRET": "deployment-test-secret-0123456789abcdef",
                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
                "ONCOFLOW_DASHBOARD": "1",  # on by default; the test suite turns it off
            }
            with prefect_worker(server, "site-a-pool", home, REPO, worker_env) as worker:
                out = asyncio.run(_operator_path(server.api_url, config))
                assert worker.poll() is None, "worker died"
                time.sleep(3)  # let a (wrong) notification arrive if one was sent
                started = time.monotonic()
                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=30)
                stopped_after = time.monotonic() - started
    finally:
        inbox.shutdown()
        inbox.server_close()
    log = (home / "worker-site-a-pool.log").read_text(errors="replace")
    nightly = out["nightly"]
    assert nightly.state.is_completed(), f"{nightly.state}\n{log[-3000:]}"

    # a healthy run: no Crashed state, no notification. Under load this site's nightly run
    # outlasts the window (heartbeats must then keep the automation quiet); on an idle machine
    # it ends in about 20 s, inside the shortest window Prefect's heartbeat allows (30 s at
    # least, window 45 s), and the automation must stay quiet on the run's end as well.
    print("nightly run:", nightly.total_run_time, "window:", WINDOW, "s")
    crashed = [r.name for r in out["all_runs"] if r.state and r.state.type.value == "CRASHED"]
    assert crashed == []
    assert [path for path, _ in inbox.received if path == "/operators"] == []

    # the run the operator opens: its name, its site tag, its report; the stages its subflows
    assert nightly.name == "site-a-ingest-to-extract"
    assert "site:site-a" in nightly.tags
    keys = {a.key for a in out["nightly_artifacts"]}
    assert {"site-a-pipeline-report", "site-a-pipeline-stages"} <= keys
    report = next(a for a in out["nightly_artifacts"] if a.key == "site-a-pipeline-report").data
    assert "| ingest | files |" in report and "| ingest | series |" in report
    assert "| extract | ROIs |" in report
    # (the mr preset finds no MR ROI on this site: no extract run of its own)
    assert sorted(c.name for c in out["children"]) == [
        "deidentify-site-a",
        "extract-site-a",
        "harmonise-site-a",
        "ingest-site-a",
    ]
    assert not any(c.name.startswith("site-pipeline") for c in out["children"])
    # task runs named by stage, modality (and ROIs) and the end of the pseudonymous key
    names = {t.name for t in out["task_runs"]}
    # (this site's series are small: de-identify and harmonise run them grouped, several
    # to a task named unit-group-<files>)
    unit = r"(harmonise|deid)-(CT|MR|PT|SEG|RTSTRUCT)-[0-9a-z.]{6}|unit-group-\d+"
    assert any(re.fullmatch(r"extract-CT-[^-]+-[0-9a-z.]{6}", n) for n in names), names
    assert all(
        re.fullmatch(unit, n) or n.startswith(("extract-", "ingest-", "parse-")) for n in names
    ), names
    # the report links the run's Dask dashboard
    assert "Dask dashboard of this run" in report and "http://127.0.0.1:" in report

    # the on-demand form: every field labelled, the site's series and ROIs offered
    props = out["form"]["properties"]
    assert props["site_config"]["title"] == "Site file"
    assert props["preset"]["title"] == "Radiomics preset"
    assert all(p.get("title") and "Optional" not in p["title"] for p in props.values())
    assert len(props["series"]["items"]["enum"]) > 1 and props["rois"]["items"]["enum"]
    on_demand = out["on_demand"]
    assert on_demand.state.is_completed(), on_demand.state
    assert on_demand.state.name == "Completed"
    assert on_demand.name == "lung-texture-study"  # the researcher's run name is kept
    assert "site:site-a" in on_demand.tags
    nothing = out["nothing"]
    assert nothing.state.name == "Nothing to do"
    assert nothing.state.message.startswith("nothing to extract")

    # the stages wrote their outputs
    assert (store / "site-a" / "catalog" / "series.parquet").exists()
    assert list((store / "site-a" / "features").glob("*.parquet"))

    # an idle worker stops promptly on SIGTERM
    assert stopped_after < 15, stopped_after

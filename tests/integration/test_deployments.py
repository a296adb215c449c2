"""The operator's path of docs/operations.md and docs/production.md, on a real `prefect server`.

Starts `prefect server` (SQLite), creates site-a's process work pool, deploys site-a's
deployments as the docs do (`prefect deploy --prefect-file deployments/prefect.yaml --name
'site-a-*'`), creates the two blocks `apply.py --blocks` lists (pointing at a local HTTP
endpoint standing in for the hub and the operators' chat) and applies the automations, starts a
worker with the heartbeat the docs set (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30`), then:

* runs the nightly deployment on a synthetic site big enough that the run outlasts the
  silent-run window (shortened here from 300 s to 45 s, 1.5 x the shortest heartbeat Prefect
  allows, 30 s): the window of its first heartbeat expires while it runs, its later heartbeats
  keep it alive, and it completes with no Crashed state and no notification; the report, the
  stage table and the `site:site-a` tag are on the deployment's run itself (the run an
  operator opens), the stages its subflows;
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
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from tests.services import BIN, Inbox, prefect_server, prefect_worker

REPO = Path(__file__).resolve().parents[2]
AUTOMATIONS = REPO / "deployments" / "automations"
WINDOW = 45  # seconds; the shipped silent-run window is 300
#: Patients of the test site: its nightly run (one Dask worker) lasts about 20 s plus 3-4 s per
#: patient beyond two on an idle 2-core machine (12 patients: 54 s since the features table is
#: written in parts), over a minute here: longer than WINDOW plus the server's 5 s
#: proactive-trigger interval after its first heartbeat, with a margin for faster machines.
PATIENTS = 17
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
    return await _wait(client, run, name, timeout)


async def _wait(client, run, name: str, timeout: float):
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
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOrder,
        EventResourceFilter,
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
            out["heartbeats"] = await client.read_events(
                EventFilter(
                    event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                    resource=EventResourceFilter(id=[f"prefect.flow-run.{nightly.id}"]),
                    order=EventOrder.ASC,  # the first heartbeat on the first page
                ),
                limit=50,  # the server's largest page (the client's default, 100, is refused)
            )
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
            robustness = await client.read_deployment_by_name(
                "robustness-on-demand/site-a-robustness"
            )
            out["robustness_form"] = robustness.parameter_openapi_schema
            choices = form.parameter_openapi_schema["properties"]["series"]["items"]["enum"]
            out["chosen"] = choices[0]
            # the researcher's run and one with nothing to extract, at the same time
            out["on_demand"], out["nothing"] = await asyncio.gather(
                _run(
                    client,
                    "extract-on-demand/site-a-on-demand",
                    {"site_config": str(config), "series": [choices[0]]},
                    "lung-texture-study",
                    600,
                ),
                _run(
                    client,
                    "extract-on-demand/site-a-on-demand",
                    {"site_config": str(config), "preset": "pet"},
                    None,
                    600,
                ),
            )
            out["all_runs"] = await client.read_flow_runs()
    return out


def test_operator_path_deploy_run_form_and_stop(tmp_path):
    from tasks.synthetic import generate_cohort

    truth = generate_cohort(tmp_path / "cohort", sites=1, patients=PATIENTS, seed=11)
    home = tmp_path / "prefect-home"
    home.mkdir()
    store = tmp_path / "store"
    config = tmp_path / "site-a.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "site": "site-a",
                "source": str(tmp_path / "cohort" / "site-a"),
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
                "PREFECT_WORKER_QUERY_SECONDS": "2",  # picks a new run up sooner than 10 s
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

    # a healthy run that outlasted the silent-run window: the window opened by its first
    # heartbeat expired (plus the server's 5 s proactive-evaluation interval) while it ran, its
    # later heartbeats kept it alive; no Crashed state, no notification
    beats = sorted(e.occurred for e in out["heartbeats"].events)
    since_first = [round((b - beats[0]).total_seconds()) for b in beats]
    print(f"nightly run: {nightly.total_run_time}, heartbeats at {since_first} s")
    assert len(beats) >= 2, beats
    expired = beats[0] + timedelta(seconds=WINDOW + 5)
    assert nightly.end_time > expired, (
        f"the nightly run ended {nightly.end_time - beats[0]} after its first heartbeat, "
        f"inside the {WINDOW} s window: raise PATIENTS"
    )
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
    # every task run named by stage, modality (and ROIs) and the end of a pseudonymous key;
    # small series run several to a task, named by stage, modalities, count and the first
    # one's key; ingest parses file batches (no modality yet), named by a keyed batch reference
    names = {t.name for t in out["task_runs"]}
    key, mods, roi = r"[0-9a-z.]{6}", r"[A-Z?]+(\+[A-Z?]+)*", r"[a-z0-9_+-]+"
    named = [
        rf"(deid|harmonise)-{mods}-{key}",
        rf"(deid|harmonise)-{mods}-x\d+-{key}",  # grouped
        rf"extract-CT-{roi}-{key}",
        r"parse-b[0-9a-f]{20}",
    ]
    assert [n for n in names if not any(re.fullmatch(p, n) for p in named)] == [], names
    assert any(re.fullmatch(named[1], n) for n in names), names
    assert any(re.fullmatch(named[2], n) for n in names), names
    # never an identifier: no original UID, not even its last digits
    originals = [
        uid
        for patient in truth.sites["site-a"].patients
        for study in patient.studies
        for series in study.series
        for uid in (series.series_instance_uid, study.study_instance_uid)
    ]
    assert not [n for n in names for uid in originals if n.endswith(uid[-6:])], names
    # the report links the run's Dask dashboard
    assert "Dask dashboard of this run" in report and "http://127.0.0.1:" in report

    # the on-demand form: every field labelled, the site's series and ROIs offered
    props = out["form"]["properties"]
    assert props["site_config"]["title"] == "Site file"
    assert props["preset"]["title"] == "Radiomics preset"
    assert all(p.get("title") and "Optional" not in p["title"] for p in props.values())
    assert len(props["series"]["items"]["enum"]) > 1 and props["rois"]["items"]["enum"]
    # the robustness form (same site file) offers the same choices, labelled
    robust = out["robustness_form"]["properties"]
    assert robust["site_config"]["default"] == "deployments/sites/site-a.yaml"
    assert robust["icc_threshold"]["title"] == "ICC threshold"
    assert robust["series"]["items"]["enum"] == props["series"]["items"]["enum"]
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

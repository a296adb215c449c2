"""Automations: applied from deployments/automations/ to a real `prefect server`, then fired.

Starts `prefect server` (SQLite) and a local HTTP endpoint standing in for the hub and for the
operators' chat; creates the Webhook and notification blocks the automation files name, applies
the files with `deployments/automations/apply.py` (twice: the second run updates), reads them
back through the API, then
* emits the `oncoflow.cohort.published` event exactly as the publish flow does, and
* runs `oncoflow run` on a missing source, a real failed `site-pipeline` flow run,
and waits for both automations to call the endpoint. (The third automation, marking runs
whose heartbeats stop Crashed, is only read back: its window is 300 s.) Applying is all or
nothing: with one of the two blocks missing, nothing is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.services import BIN, Inbox, prefect_server

REPO = Path(__file__).resolve().parents[2]
AUTOMATIONS = REPO / "deployments" / "automations"
pytestmark = pytest.mark.integration

ANNOUNCE = """
from flows.publish import _announce
from tasks.cohort.publish import PublishResult
result = PublishResult(site="site-a", cohort="demo-ct", version="v3",
    url="s3://publication/site-a/demo-ct/v3", content_hash="ab" * 32, created=True)
_announce(result, {"series": 7, "patients": 2})
"""


def _run_apply(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(AUTOMATIONS / "apply.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _apply(env: dict[str, str]) -> list[str]:
    done = _run_apply(env)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_automations_apply_and_fire(tmp_path: Path) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path / "prefect-home"
    home.mkdir()
    inbox = Inbox()
    threading.Thread(target=inbox.serve_forever, daemon=True).start()
    try:
        with prefect_server(home) as server:
            env = {**os.environ, **server.env}
            # before the blocks exist, applying fails with one line naming both blocks
            missing = _run_apply(env)
            assert missing.returncode == 2
            assert missing.stderr.strip().startswith("error: ")
            assert "not found on the server" in missing.stderr
            assert "custom-webhook/oncoflow-operators" in missing.stderr
            assert "webhook/oncoflow-hub" in missing.stderr
            assert len(missing.stderr.strip().splitlines()) == 1

            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                hub_id = Webhook(
                    method="POST", url=f"{inbox.url}/hub", allow_private_urls=True
                ).save("oncoflow-hub")
            # with one block still missing, nothing is applied (all or nothing)
            half = _run_apply(env)
            assert half.returncode == 2 and "custom-webhook/oncoflow-operators" in half.stderr
            assert "webhook/oncoflow-hub," not in half.stderr
            with (
                temporary_settings(updates={PREFECT_API_URL: server.api_url}),
                get_client(sync_client=True) as client,
            ):
                assert client.read_automations() == []
            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                ops_id = CustomWebhookNotificationBlock(
                    name="operators",
                    url=f"{inbox.url}/operators",
                    json_data={"subject": "{{subject}}", "body": "{{body}}"},
                    allow_private_urls=True,
                ).save("oncoflow-operators")

            first = _apply(env)
            second = _apply(env)
            assert sorted(line.split()[0] for line in first) == ["created"] * 3
            assert sorted(line.split()[0] for line in second) == ["updated"] * 3
            assert [line.split()[2] for line in first] == [line.split()[2] for line in second]

            with (
                temporary_settings(updates={PREFECT_API_URL: server.api_url}),
                get_client(sync_client=True) as client,
            ):
                automations = {a.name: a for a in client.read_automations()}
            assert sorted(automations) == [
                "oncoflow-cohort-published-notify-hub",
                "oncoflow-mark-silent-runs-crashed",
                "oncoflow-site-pipeline-failed-notify-operators",
            ]
            published = automations["oncoflow-cohort-published-notify-hub"]
            assert published.enabled
            assert published.trigger.expect == {"oncoflow.cohort.published"}
            assert published.actions[0].type == "call-webhook"
            assert published.actions[0].block_document_id == hub_id
            failed = automations["oncoflow-site-pipeline-failed-notify-operators"]
            assert failed.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
            assert failed.actions[0].type == "send-notification"
            assert failed.actions[0].block_document_id == ops_id
            silent = automations["oncoflow-mark-silent-runs-crashed"]
            assert silent.trigger.posture == "Proactive"
            assert silent.trigger.after == {"prefect.flow-run.heartbeat"}
            assert silent.trigger.within.total_seconds() == 300
            assert silent.actions[0].type == "change-flow-run-state"
            assert silent.actions[0].state == "CRASHED"

            # a real failed site-pipeline run (missing source; no Dask cluster is started)
            run = subprocess.Popen(
                [
                    str(BIN / "oncoflow"),
                    "run",
                    str(tmp_path / "no-such-source"),
                    "--site",
                    "site-a",
                    "--store",
                    str(tmp_path / "store"),
                    "--dask-address",
                    "tcp://127.0.0.1:9",
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            # the publish flow's event, emitted by the publish flow's own code
            subprocess.run(
                [sys.executable, "-c", ANNOUNCE], cwd=REPO, env=env, check=True, timeout=120
            )
            hub = json.loads(inbox.wait_for("/hub", timeout=60))
            assert hub == {
                "event": "oncoflow.cohort.published",
                "site": "site-a",
                "cohort": "demo-ct",
                "version": "v3",
                "manifest": "s3://publication/site-a/demo-ct/v3/manifest.json",
                "content_hash": "ab" * 32,
                "series": 7,
                "patients": 2,
            }
            out, _ = run.communicate(timeout=180)
            assert run.returncode == 2, out
            operators = json.loads(inbox.wait_for("/operators", timeout=60))
            assert operators["subject"].startswith("oncoflow: site-pipeline run site-pipeline-")
            assert operators["subject"].endswith(" Failed")
            assert "source not found" in operators["body"]
            assert "\nTags: oncoflow, site:site-a\n" in operators["body"]
            assert "None" not in operators["body"]
            link = operators["body"].strip().splitlines()[-1]
            assert link.startswith(f"{server.api_url.removesuffix('/api')}/runs/flow-run/")
            # one notification per failed run: site-pipeline-scheduled did not run here
            time.sleep(2)
            assert [p for p, _ in inbox.received].count("/operators") == 1
    finally:
        inbox.shutdown()
        inbox.server_close()

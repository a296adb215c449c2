"""The automation files: notification text rendered by Prefect's own template engine, windows
that fit the heartbeat the docs set, and the blocks apply.py needs."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
AUTOMATIONS = REPO / "deployments" / "automations"


def _render(template: str, tags: list[str], ui_url: str | None) -> str:
    from prefect.server.events.jinja_filters import all_filters
    from prefect.server.schemas.core import Flow, FlowRun
    from prefect.server.schemas.states import State, StateType
    from prefect.server.utilities.user_templates import (
        register_user_template_filters,
        render_user_template_sync,
    )
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    register_user_template_filters(all_filters)
    run_id = uuid.uuid4()
    flow_run = FlowRun(
        id=run_id,
        name="site-pipeline-site-a",
        flow_id=uuid.uuid4(),
        tags=tags,
        state=State(type=StateType.FAILED, name="Failed", message="harmonise: 3 of 4 failed"),
        created=datetime.now(UTC),
    )
    context = {"flow_run": flow_run, "flow": Flow(name="site-pipeline")}
    with temporary_settings(updates={PREFECT_UI_URL: ui_url, PREFECT_API_URL: None}):
        return render_user_template_sync(template, context)


def _failure_action() -> dict:
    spec = yaml.safe_load((AUTOMATIONS / "site-pipeline-failed.yaml").read_text())
    return spec["actions"][0]


@pytest.mark.parametrize("ui_url", [None, "https://prefect.site-a.example"])
@pytest.mark.parametrize("tags", [[], ["oncoflow", "site:site-a", "nightly"]])
def test_failure_notification_has_no_empty_fields(tags: list[str], ui_url: str | None) -> None:
    action = _failure_action()
    body = _render(action["body"], tags, ui_url)
    subject = _render(action["subject"], tags, ui_url)
    assert subject == "oncoflow: site-pipeline run site-pipeline-site-a Failed"
    assert "Reason: harmonise: 3 of 4 failed" in body
    assert "None" not in body
    if tags:
        assert "\nTags: nightly, oncoflow, site:site-a\n" in body  # sorted
    else:
        assert "Tags" not in body
    last = body.strip().splitlines()[-1]
    if ui_url:
        assert last.startswith(f"{ui_url}/runs/flow-run/")
    else:
        assert last.startswith("Flow run id ") and "PREFECT_UI_URL" in last


def test_silent_run_window_fits_prefects_default_heartbeat() -> None:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    spec = yaml.safe_load((AUTOMATIONS / "silent-run-crashed.yaml").read_text())
    default = PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() or 180  # None: off here; Prefect's: 180
    assert spec["trigger"]["within"] >= 1.5 * max(default, 180)
    # the docs start workers with 30 s heartbeats: documented where the worker is started
    for doc in ("docs/production.md", "docs/operations.md"):
        assert "PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30" in (REPO / doc).read_text(), doc


def test_apply_lists_the_blocks_and_the_docs_create_exactly_those() -> None:
    done = subprocess.run(
        [sys.executable, str(AUTOMATIONS / "apply.py"), "--blocks"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["custom-webhook/oncoflow-operators", "webhook/oncoflow-hub"]
    ops = (REPO / "docs" / "operations.md").read_text()
    assert "CustomWebhookNotificationBlock as B" in ops and ".save('oncoflow-operators')" in ops
    assert "Webhook(method='POST'" in ops and ".save('oncoflow-hub')" in ops

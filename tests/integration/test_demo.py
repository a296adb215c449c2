"""`oncoflow demo` end to end, as the README's first command runs it, on a smaller cohort.

The cohort is 2 sites x 1 patient (the command's default is 3 x 3): every stage, the hub's
federation across sites, the rerun and the UI are the same code whatever the size, and each
site's pipeline runs the same stages; the size only multiplies the time (this test took a
quarter of the default suite at 3 x 3). `oncoflow demo` at its default size is what
docs/benchmarks.md times.

The demo runs with ``--ui``: it starts its own `prefect server` (database in the demo folder) and
leaves it running; the test checks that server's UI is told its own API, that the runs are listed
through that API, photographs the runs page with headless Chromium when it is installed, reruns
the demo in the same folder (it reuses the server, the synthetic source and the work) and stops
the server by the PID the demo reported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tasks.synthetic import CohortTruth
from tasks.synthetic.scan import searchable_bytes
from tests.services import BIN, free_port

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]
SITES = ("site-a", "site-b")


def _demo(out: Path, port: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.pop("ONCOFLOW_SITE_SECRET", None)  # the demo makes its own and says where
    args = ["demo", "--out", str(out), "--json", "--ui", "--ui-port", str(port)]
    args += ["--sites", str(len(SITES)), "--patients", "1"]
    return subprocess.run(
        [str(BIN / "oncoflow"), *args], env=env, capture_output=True, text=True, timeout=1400
    )


def _pipeline_runs(api: str) -> list[tuple[str, str]]:
    """Names and states of the site-pipeline flow runs, read through the server's API."""
    body = {"flows": {"name": {"any_": ["site-pipeline"]}}}
    runs = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30).json()
    return sorted((r["name"], r["state_type"]) for r in runs)


def _screenshot_script():
    """docs/screenshot.py as a module (its Chromium call and its stop-by-PID)."""
    spec = importlib.util.spec_from_file_location("screenshot", REPO / "docs" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    port = free_port()
    proc = _demo(out, port)
    result = json.loads(proc.stdout) if proc.returncode == 0 else {}
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        # a normal run logs no WARNING, its Dask workers' shutdown included (a worker process
        # takes 4-9 s to exit on a busy machine: "Worker process still alive after 4.0 s")
        assert _warnings(proc.stderr) == []
        _check_first_run(out, result, proc.stderr)
        ui, api = result["ui"], f"{result['ui']}/api"
        assert ui == f"http://127.0.0.1:{port}"
        # the UI is told its own API (not a temporary server's), and the runs are in it
        assert httpx.get(f"{ui}/ui-settings", timeout=10).json()["api_url"] == api
        assert _pipeline_runs(api) == [(f"site-pipeline-{s}", "COMPLETED") for s in SITES]
        assert (out / "prefect" / "prefect.db").is_file()  # the database is in the demo folder
        if shutil.which("chromium"):
            png = tmp_path / "runs.png"
            _screenshot_script().screenshot(f"{ui}/runs", png, tmp_path / "chromium")
            assert png.stat().st_size > 20_000

        # again in the same folder: reuses the server, the source and every stage's work
        again = _demo(out, port)
        assert again.returncode == 0, again.stderr[-3000:]
        assert _warnings(again.stderr) == []
        rerun = json.loads(again.stdout)
        assert rerun["reused"] is True and rerun["ui_pid"] == result["ui_pid"]
        assert "Reusing the synthetic cohort" in again.stderr
        assert "reused: " in again.stderr
        for site, stages in rerun["sites"].items():
            by_stage = {s["stage"]: s for s in stages}
            assert by_stage["ingest"]["computed"] == 0, site
            assert by_stage["deidentify"]["computed"] == 0, site
            assert by_stage["harmonise"]["computed"] == 0, site
            assert by_stage["extract"]["parts_computed"] == 0, site
            assert by_stage["publish"]["counts"] == {"unchanged": 1}, site
        runs = _pipeline_runs(api)
        assert runs == sorted([(f"site-pipeline-{s}", "COMPLETED") for s in SITES] * 2)
    finally:  # the server outlives the demo: stop it by its PID, even when the demo failed
        pid_file = out / "prefect" / "server.pid"
        pid = result.get("ui_pid") or (pid_file.is_file() and pid_file.read_text().strip())
        if pid:
            _stop(int(pid))


def _warnings(stderr: str) -> list[str]:
    """Log lines at WARNING or above in a command's output."""
    level = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")
    return [line for line in stderr.splitlines() if level.search(line)]


def _stop(pid: int) -> None:
    _screenshot_script().stop_pid(pid)
    assert not Path(f"/proc/{pid}").exists()


def _check_first_run(out: Path, result: dict, stderr: str) -> None:
    assert "the demo's own site secret" in stderr
    truth = CohortTruth.load(out / "source" / "truth.json")
    for site, stages in result["sites"].items():
        by_stage = {s["stage"]: s for s in stages}
        assert list(by_stage) == ["ingest", "deidentify", "harmonise", "extract", "publish"]
        quarantined = by_stage["ingest"]["reasons"]
        planted = {f.reason for f in truth.sites[site].faults if f.stage == "ingest"}
        assert set(quarantined) == planted
        assert by_stage["extract"]["counts"].get("ok", 0) > 0
        assert by_stage["publish"]["created"] is True
        version = Path(by_stage["publish"]["url"])
        verify = subprocess.run(
            [str(BIN / "oncoflow"), "verify", str(version)], capture_output=True, text=True
        )
        assert verify.returncode == 0, verify.stderr
        # nothing planted in this site's source appears in what it published
        site_truth = truth.sites[site]
        planted_values = [
            v
            for v in [*site_truth.planted_values]
            + [v for p in site_truth.patients for v in p.planted_values]
            if len(v) >= 6
        ]
        assert len(planted_values) > 100
        for path in version.rglob("*"):
            if path.is_file():
                data = searchable_bytes(path)
                leaked = [v for v in planted_values if v.encode() in data]
                assert not leaked, f"{path.relative_to(out)} holds a planted value"
    catalogue = json.loads((out / "hub" / "catalogue.json").read_text())
    assert catalogue["k"] == 10
    images = sum(1 for _ in (out / "publication").glob("*/demo-ct/v1/images/*.nii.gz"))
    assert images >= len(SITES)
    # the hub shows the published count, or "<k" below k (as with this small cohort)
    total = catalogue["tables"]["modality"]["total"]
    assert total == (images if images >= catalogue["k"] else f"<{catalogue['k']}")

"""Screenshots of the Prefect UI after a real site pipeline run (for docs/operations.md).

Starts ``prefect server`` on a free port with a fresh database (``PREFECT_UI_API_URL`` set, so
the UI talks to this server), runs ``oncoflow run`` on a one-patient synthetic site through
publish against it, finds the ``site-pipeline`` flow run and its report artifact through the
API, and photographs three pages with headless Chromium:

* ``docs/prefect-ui-run.png``: the flow run page (subflow graph, logs);
* ``docs/prefect-ui-artifacts.png``: the flow run's Artifacts tab (the V2 UI keeps the tab in
  the URL; the default UI always opens on Logs);
* ``docs/prefect-ui-report.png``: the run report artifact (stage outcomes and reasons).

With ``--demo`` it instead runs ``oncoflow demo --ui`` (one site, one patient) in a temporary
folder and photographs the UI server's runs page (``docs/prefect-ui-demo-runs.png``), then
stops that server by the PID the demo printed.

Usage (from the repository root; about 2-5 minutes)::

    uv run python docs/screenshot.py [--out docs] [--keep] [--demo]

Everything else is written to a temporary folder, removed at the end unless ``--keep``. The
server is stopped by its pid.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MAX_BYTES = 500_000


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """Run ``prefect server start`` on a free port; yield the environment that points at it."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
    }
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"prefect server did not start; see {home / 'server.log'}")
            time.sleep(0.5)
        yield env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def run_site_pipeline(work: Path, env: dict[str, str]) -> None:
    """Generate a one-patient synthetic site and run every stage on it against the server."""
    from tasks.synthetic import generate_cohort

    generate_cohort(work / "synthetic", sites=1, patients=1, seed=5)
    args = [
        str(BIN / "oncoflow"),
        "run",
        str(work / "synthetic" / "site-a"),
        "--site",
        "site-a",
        "--store",
        str(work / "store"),
        "--params",
        "ct",
        "--cohort",
        str(REPO / "deployments" / "cohorts" / "demo.yaml"),
        "--to",
        str(work / "publication"),
    ]
    secret = env.get("ONCOFLOW_SITE_SECRET") or secrets.token_hex(32)
    subprocess.run(args, cwd=REPO, env={**env, "ONCOFLOW_SITE_SECRET": secret}, check=True)


def find_run(api_url: str) -> tuple[str, str]:
    """Return the ids of the completed ``site-pipeline`` flow run and of its report artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowFilter,
        FlowFilterName,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: api_url}),
        get_client(sync_client=True) as client,
    ):
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["site-pipeline"]))
        )
        run = next(r for r in runs if r.state and r.state.is_completed())
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["site-a-pipeline-report"]))
        )
        report = next(a for a in artifacts if a.flow_run_id == run.id)
    return str(run.id), str(report.id)


def screenshot(url: str, out: Path, profile: Path) -> None:
    """Photograph ``url`` with headless Chromium (1400x1000), shrunk below 500 KB if needed."""
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            "--window-size=1400,1000",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    if out.stat().st_size > MAX_BYTES:
        Image.open(out).convert("RGB").quantize(colors=128).save(out, optimize=True)
    print(f"{out} ({out.stat().st_size // 1024} KB): {url}")


def stop_pid(pid: int, timeout: float = 30) -> None:
    """Stop the process ``pid`` (SIGTERM, then SIGKILL) and wait until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def demo_runs(work: Path, out: Path) -> None:
    """Run ``oncoflow demo --ui`` on one small site and photograph the UI's runs page."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.setdefault("ONCOFLOW_SITE_SECRET", secrets.token_hex(32))
    args = [str(BIN / "oncoflow"), "demo", "--out", str(work / "demo"), "--ui"]
    args += ["--ui-port", str(free_port()), "--sites", "1", "--patients", "1", "--json"]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"oncoflow demo --ui failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout)
    try:
        screenshot(f"{result['ui']}/runs", out / "prefect-ui-demo-runs.png", work / "chromium")
    finally:
        stop_pid(int(result["ui_pid"]))


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline against a fresh server and write the screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="folder for the PNGs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--demo", action="store_true", help="photograph `oncoflow demo --ui`")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="oncoflow-screenshot-"))
    try:
        if args.demo:
            args.out.mkdir(parents=True, exist_ok=True)
            demo_runs(work, args.out)
            return 0
        (work / "prefect").mkdir()
        with prefect_server(work / "prefect") as env:
            run_site_pipeline(work, env)
            api = env["PREFECT_API_URL"]
            ui = env["PREFECT_UI_URL"]
            run_id, report_id = find_run(api)
            profile = work / "chromium"
            args.out.mkdir(parents=True, exist_ok=True)
            screenshot(f"{ui}/runs/flow-run/{run_id}", args.out / "prefect-ui-run.png", profile)
            screenshot(
                f"{ui}/v2/runs/flow-run/{run_id}?tab=Artifacts",
                args.out / "prefect-ui-artifacts.png",
                profile,
            )
            screenshot(
                f"{ui}/artifacts/artifact/{report_id}",
                args.out / "prefect-ui-report.png",
                profile,
            )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

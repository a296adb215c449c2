"""``oncoflow demo``: three synthetic sites end to end, then the hub.

Synthesises a cohort, runs every site's pipeline (ingest → deidentify → harmonise → extract →
publish) on one Dask cluster and one Prefect server, federates the publications, and prints a
summary and where everything is. ``--ui`` first starts ``prefect server`` with its UI and leaves
it running, so the runs can be browsed afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import tags
from rich.console import Console
from rich.table import Table

from flows.runtime import RuntimeOptions, dask_cluster, ensure_prefect_api, pin_native_threads
from tasks.errors import OncoflowError

DEMO_COHORT = Path(__file__).resolve().parent.parent / "deployments" / "cohorts" / "demo.yaml"
UI_PORT = 4200


@dataclass
class DemoResult:
    """What the demo produced: locations and per-site stage summaries."""

    out: str
    source: str
    store: str
    publication: str
    hub: str
    sites: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    federation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    ui: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "out": self.out,
            "source": self.source,
            "store": self.store,
            "publication": self.publication,
            "hub": self.hub,
            "sites": self.sites,
            "federation": self.federation,
            "seconds": round(self.seconds, 1),
            "ui": self.ui,
        }


def start_ui_server(port: int = UI_PORT) -> str:
    """Start ``prefect server start`` in the background (left running) and return its API URL."""
    import httpx

    api = f"http://127.0.0.1:{port}/api"
    try:
        if httpx.get(f"{api}/health", timeout=2).status_code == 200:
            return api  # already running
    except httpx.HTTPError:
        pass
    log = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / "oncoflow-ui.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    prefect = Path(sys.executable).parent / "prefect"
    with open(log, "ab") as fh:
        subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return api
        except httpx.HTTPError:
            time.sleep(0.5)
    raise OncoflowError(f"prefect server did not start on port {port}; see {log}")


def run_demo(
    out: Path,
    sites: int = 3,
    patients: int = 3,
    seed: int = 0,
    runtime: RuntimeOptions | None = None,
    ui: bool = False,
    console: Console | None = None,
) -> DemoResult:
    """Run the demo end to end.

    Parameters
    ----------
    out
        Folder for everything the demo writes (source, store, publication, hub).
    sites, patients, seed
        Size and seed of the synthetic cohort.
    runtime
        Dask workers or an existing scheduler.
    ui
        Start ``prefect server`` with its UI first and leave it running.
    console
        Where progress goes (stderr by default).

    Returns
    -------
    DemoResult
        Locations and summaries.
    """
    from flows.federate import run_federation
    from flows.pipeline import SitePipelineParams, site_pipeline
    from tasks.synthetic import generate_cohort

    console = console or Console(stderr=True)
    runtime = runtime or RuntimeOptions()
    started = time.monotonic()
    out = out.resolve()
    result = DemoResult(
        out=str(out),
        source=str(out / "source"),
        store=str(out / "store"),
        publication=str(out / "publication"),
        hub=str(out / "hub"),
    )
    if not os.environ.get("ONCOFLOW_SITE_SECRET"):
        os.environ["ONCOFLOW_SITE_SECRET"] = secrets.token_hex(32)
        console.print(
            "[yellow]Using a generated demo site secret (kept in memory only): pseudonyms "
            "differ from run to run. Set ONCOFLOW_SITE_SECRET to keep them stable.[/yellow]"
        )
    if ui:
        api = start_ui_server()
        os.environ["PREFECT_API_URL"] = api
        result.ui = api.removesuffix("/api")
    pin_native_threads()
    with console.status("Synthesising the cohort..."):
        truth = generate_cohort(out / "source", sites=sites, patients=patients, seed=seed)
    site_names = sorted(truth.sites)
    console.print(f"Synthetic cohort: {len(site_names)} sites in {result.source}")
    with console.status("Starting Prefect and Dask..."):
        ensure_prefect_api()
        cluster = dask_cluster(runtime)
        cluster.__enter__()
    try:
        for site in site_names:
            with console.status(f"{site}: ingest → deidentify → harmonise → extract → publish"):
                params = SitePipelineParams(
                    source=str(out / "source" / site),
                    site=site,
                    store=result.store,
                    stages=["ingest", "deidentify", "harmonise", "extract", "publish"],
                    params=["ct"],
                    cohort=str(DEMO_COHORT),
                    to=f"{result.publication}/{site}",
                    runtime=runtime,
                )
                with tags("oncoflow", "demo", f"site:{site}"):
                    summary = site_pipeline(params)
            result.sites[site] = summary["stages"]
            console.print(f"{site}: done")
        with console.status("Hub: federating the publications..."):
            result.federation = run_federation(
                [f"{result.publication}/{site}" for site in site_names], result.hub
            )
    finally:
        cluster.__exit__(None, None, None)
    result.seconds = time.monotonic() - started
    return result


def print_demo(result: DemoResult, console: Console | None = None) -> None:
    """Print the demo's summary table and where to look next."""
    console = console or Console()
    table = Table(title="oncoflow demo: ok / quarantined (failed) per stage")
    table.add_column("site")
    stages = ["ingest", "deidentify", "harmonise", "extract", "publish"]
    for stage in stages:
        table.add_column(stage, justify="right")
    for site, summaries in result.sites.items():
        cells = {}
        for s in summaries:
            counts = s.get("counts", {})
            if s["stage"] == "publish":
                cells["publish"] = f"{s.get('version', '')} {next(iter(counts), '')}".strip()
                continue
            cell = f"{counts.get('ok', 0)} / {counts.get('quarantined', 0)}"
            if counts.get("failed"):
                cell += f" ({counts['failed']})"
            cells[s["stage"]] = cell
        table.add_row(site, *[cells.get(stage, "-") for stage in stages])
    console.print(table)
    catalogue_file = Path(result.hub) / "catalogue.json"
    if catalogue_file.exists():
        tables = json.loads(catalogue_file.read_text())["tables"]
        by_modality = ", ".join(f"{k} {v}" for k, v in tables["modality"]["totals"].items())
        console.print(
            f"Hub: {result.federation.get('sources', 0)} site publications; series by modality: "
            f"{by_modality}; patients: {tables['patients']['total']} (per-site cells below "
            f"k={result.federation.get('k')} suppressed)"
        )
    console.print(f"Outputs under {result.out}:")
    console.print(f"  source (synthetic DICOM)  {result.source}")
    console.print(f"  site stores               {result.store}/<site>/")
    console.print(f"  publications              {result.publication}/")
    console.print(f"  hub catalogue             {result.hub}/")
    console.print(f"Finished in {result.seconds:.0f} s.")
    if result.ui:
        console.print(
            f"Prefect UI (left running): {result.ui}; stop it with `pkill -f 'prefect server'`"
        )
    else:
        console.print(
            "See the runs in the Prefect UI: `uv run prefect server start`, then open "
            f"http://127.0.0.1:{UI_PORT} (or run `oncoflow demo --ui`)."
        )

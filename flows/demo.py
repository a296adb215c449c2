"""``oncoflow demo``: three synthetic sites end to end, then the hub.

Synthesises a cohort, runs every site's pipeline (ingest → deidentify → harmonise → extract →
publish) on one Dask cluster and one Prefect server, federates the publications, and prints a
summary and where everything is. Everything, the Prefect database included, is written under
the demo folder; a rerun there reuses the synthetic source and the pipeline's work (``--fresh``
starts over). ``--ui`` first starts (or reuses) ``prefect server`` with its UI, its database in
the demo folder, and leaves it running so the runs can be browsed afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
from prefect import tags
from rich.console import Console
from rich.table import Table

from flows.runtime import RuntimeOptions, dask_cluster, ensure_prefect_api, pin_native_threads
from tasks.errors import OncoflowError
from tasks.synthetic.truth import CohortTruth

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
    ui_pid: int | None = None
    reused: bool = False

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
            "ui_pid": self.ui_pid,
            "reused": self.reused,
        }


#: The file that marks a folder as the demo's own: its settings (never the secret).
MARKER = ".oncoflow-demo.json"
#: The demo's generated site secret (synthetic data only), kept so that a rerun reuses work.
SECRET_FILE = ".demo-site-secret"
#: What the demo writes in its folder; ``--fresh`` removes exactly these.
OWN_ENTRIES = ("source", "store", "publication", "hub", "prefect", "dask", MARKER, SECRET_FILE)


@dataclass(frozen=True)
class UiServer:
    """The demo's ``prefect server`` (API and UI on one port, database in the demo folder)."""

    url: str
    pid: int
    started: bool
    log: str

    @property
    def api(self) -> str:
        """The API URL (``<url>/api``)."""
        return f"{self.url}/api"


def prepare_folder(out: Path, settings: dict[str, Any], fresh: bool) -> str:
    """Make ``out`` ready for a demo run; return ``"new"``, ``"reuse"`` or ``"fresh"``.

    A folder the demo made (it holds :data:`MARKER`) is reused when its synthetic source was
    made with the same ``settings``, else (or with ``fresh``) the demo's own entries are
    removed and made again. Any other non-empty folder is refused: the demo never deletes or
    writes over what it did not create.

    Parameters
    ----------
    out
        The demo folder (resolved).
    settings
        Sites, patients, seed and generator of the synthetic cohort.
    fresh
        Start again even when the source could be reused.

    Raises
    ------
    OncoflowError
        When ``out`` is a file, or a non-empty folder the demo did not create.
    """
    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise OncoflowError(f"--out is a file, not a folder: {out}")
    if not marker.is_file():
        if out.exists() and any(out.iterdir()):
            raise OncoflowError(
                f"{out} is not empty and was not made by `oncoflow demo`; choose another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8")
        return "new"
    try:
        previous = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if not fresh and previous == settings and (out / "source" / "truth.json").is_file():
        return "reuse"
    for name in OWN_ENTRIES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    marker.write_text(json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8")
    return "fresh"


def demo_secret(out: Path) -> str | None:
    """Return the demo's own site secret, made once per demo folder (None when one is set).

    ``ONCOFLOW_SITE_SECRET`` wins. Otherwise a random secret is kept in ``OUT/.demo-site-secret``
    (mode 0600): the data is synthetic, and the same secret gives the same pseudonyms, so a
    rerun reuses the de-identified, harmonised and extracted work.
    """
    if os.environ.get("ONCOFLOW_SITE_SECRET"):
        return None
    path = out / SECRET_FILE
    if path.is_file():
        secret = path.read_text(encoding="utf-8").strip()
        if len(secret) >= 32:
            return secret
    secret = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret)
    return secret


def _ui_settings_api(url: str) -> str | None:
    """Return the API URL a Prefect server gives its UI (``/ui-settings``), None if no server."""
    import httpx

    try:
        if httpx.get(f"{url}/api/health", timeout=2).status_code != 200:
            return None
        return str(httpx.get(f"{url}/ui-settings", timeout=5).json().get("api_url", ""))
    except (httpx.HTTPError, ValueError):
        return None


def start_ui_server(home: Path, port: int = UI_PORT, timeout: float = 180) -> UiServer:
    """Start (or reuse) ``prefect server start`` whose UI and API point at itself.

    The server runs in its own session with its database and log under ``home`` and is left
    running; its environment sets ``PREFECT_API_URL``, ``PREFECT_UI_API_URL`` and
    ``PREFECT_UI_URL`` to its own address (never a temporary server's, inherited).
    A server this demo folder started before is reused when it still answers.

    Parameters
    ----------
    home
        ``PREFECT_HOME`` of the server (database, log, pid file).
    port
        Port on 127.0.0.1.
    timeout
        Seconds to wait for the server to answer.

    Raises
    ------
    OncoflowError
        When the port is taken by another server, or the server does not start.
    """
    url = f"http://127.0.0.1:{port}"
    home.mkdir(parents=True, exist_ok=True)
    pid_file, log = home / "server.pid", home / "server.log"
    answering = _ui_settings_api(url)
    if answering is not None:
        pid = _own_pid(pid_file)
        if pid is None:
            raise OncoflowError(
                f"port {port} has a Prefect server this demo folder did not start; "
                "stop it or choose another --ui-port"
            )
        if answering != f"{url}/api":
            raise OncoflowError(f"the Prefect server on port {port} sends its UI to {answering}")
        return UiServer(url=url, pid=pid, started=False, log=str(log))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": f"{url}/api",
            "PREFECT_UI_API_URL": f"{url}/api",
            "PREFECT_UI_URL": url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
    )
    prefect = Path(sys.executable).parent / "prefect"
    with open(log, "ab") as fh:
        process = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    pid_file.write_text(str(process.pid), encoding="utf-8")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OncoflowError(f"prefect server exited with code {process.returncode}; see {log}")
        if _ui_settings_api(url) == f"{url}/api":
            return UiServer(url=url, pid=process.pid, started=True, log=str(log))
        time.sleep(0.5)
    process.terminate()
    raise OncoflowError(f"prefect server did not answer on port {port} in {timeout:.0f} s: {log}")


def _own_pid(pid_file: Path) -> int | None:
    """Return the pid in ``pid_file`` if that process is still a ``prefect server``."""
    try:
        pid = int(pid_file.read_text(encoding="utf-8").strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"server" in cmdline and any(b"prefect" in a for a in cmdline) else None


def _use_api(url: str) -> None:
    """Point this process (and the Dask workers it starts) at the Prefect API ``url``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = url
    scope = temporary_settings(updates={PREFECT_API_URL: url})
    scope.__enter__()
    _SCOPES.append(scope)  # kept referenced: a dropped scope restores the old settings


_SCOPES: list[Any] = []


def run_demo(
    out: Path,
    sites: int = 3,
    patients: int = 3,
    seed: int = 0,
    runtime: RuntimeOptions | None = None,
    ui: bool = False,
    console: Console | None = None,
    fresh: bool = False,
    ui_port: int = UI_PORT,
) -> DemoResult:
    """Run the demo end to end; a rerun in the same folder reuses its work.

    Parameters
    ----------
    out
        Folder for everything the demo writes (source, store, publication, hub, Prefect).
    sites, patients, seed
        Size and seed of the synthetic cohort.
    runtime
        Dask workers or an existing scheduler.
    ui
        Start (or reuse) ``prefect server`` with its UI on ``ui_port`` and leave it running.
    console
        Where progress goes (stderr by default).
    fresh
        Remove what an earlier demo run wrote in ``out`` and start again.
    ui_port
        Port of the UI server.

    Returns
    -------
    DemoResult
        Locations and summaries.

    Raises
    ------
    OncoflowError
        When ``out`` is not a folder the demo made, or the UI server does not start.
    """
    from flows.federate import run_federation
    from flows.pipeline import SitePipelineParams, site_pipeline
    from tasks.synthetic import generate_cohort
    from tasks.synthetic.cohort import GENERATOR

    console = console or Console(stderr=True)
    runtime = runtime or RuntimeOptions()
    started = time.monotonic()
    out = out.resolve()
    settings = {"sites": sites, "patients": patients, "seed": seed, "generator": GENERATOR}
    mode = prepare_folder(out, settings, fresh)
    result = DemoResult(
        out=str(out),
        source=str(out / "source"),
        store=str(out / "store"),
        publication=str(out / "publication"),
        hub=str(out / "hub"),
        reused=mode == "reuse",
    )
    secret = demo_secret(out)
    if secret is not None:
        os.environ["ONCOFLOW_SITE_SECRET"] = secret
        console.print(
            f"Using the demo's own site secret ({out / SECRET_FILE}, synthetic data only); "
            "set ONCOFLOW_SITE_SECRET to use another."
        )
    if ui:
        server = start_ui_server(out / "prefect", ui_port)
        _use_api(server.api)
        result.ui, result.ui_pid = server.url, server.pid
        state = "started" if server.started else "reusing"
        console.print(f"Prefect UI: {server.url} ({state} server, PID {server.pid})")
    elif not os.environ.get("PREFECT_API_URL"):
        # the temporary server's database lives in the demo folder too
        os.environ["PREFECT_HOME"] = str(out / "prefect")
    pin_native_threads()
    ensure_prefect_api(wait=False)  # boots while the cohort is written
    dask.config.set({"temporary-directory": str(out / "dask")})  # workers' scratch space
    if mode == "reuse":
        truth = CohortTruth.load(out / "source" / "truth.json")
        console.print(f"Reusing the synthetic cohort in {result.source} (--fresh to redo it)")
    else:
        with console.status("Synthesising the cohort..."):
            truth = generate_cohort(out / "source", sites=sites, patients=patients, seed=seed)
        console.print(f"Synthetic cohort: {len(truth.sites)} sites in {result.source}")
    site_names = sorted(truth.sites)
    with console.status("Starting Prefect and Dask..."):
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
            note = reuse_note(summary["stages"])
            console.print(f"{site}: done" + (f" (reused: {note})" if note else ""))
        with console.status("Hub: federating the publications..."):
            result.federation = run_federation(
                [f"{result.publication}/{site}" for site in site_names], result.hub
            )
    finally:
        cluster.__exit__(None, None, None)
    result.seconds = time.monotonic() - started
    return result


def reuse_note(stages: list[dict[str, Any]]) -> str:
    """Say what a site's run reused from an earlier run ("" when it reused nothing).

    Parameters
    ----------
    stages
        The stage summaries of one site's pipeline run (``StageSummary.to_dict()``).
    """
    by_stage = {s["stage"]: s for s in stages}
    parts = []
    for stage, key, what in (
        ("ingest", "reused", "files not parsed again"),
        ("deidentify", "reused", "series de-identified before"),
        ("harmonise", "reused", "series harmonised before"),
        ("extract", "parts_reused", "feature parts"),
    ):
        count = by_stage.get(stage, {}).get(key, 0)
        if count:
            parts.append(f"{count} {what}")
    publish = by_stage.get("publish", {})
    if publish.get("counts", {}).get("unchanged"):
        parts.append(f"publication {publish.get('version', '')} unchanged".replace("  ", " "))
    return ", ".join(parts)


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
    again = "reused the earlier run's work" if result.reused else "run it again to reuse the work"
    console.print(f"Finished in {result.seconds:.0f} s ({again}; --fresh starts over).")
    if result.ui:
        console.print(
            f"Prefect UI (left running): {result.ui}/runs; server PID {result.ui_pid}, "
            f"database in {result.out}/prefect; stop it with `kill {result.ui_pid}`."
        )
    else:
        console.print(
            "See the runs in the Prefect UI: `uv run oncoflow demo --ui` (its server stays up)."
        )

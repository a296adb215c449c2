"""The ``oncoflow`` command line (architecture contract: commands and common options).

Every command prints a short summary (or JSON with ``--json``) and exits 0 when the run
completed, even with quarantined items; otherwise it prints one line ``error: <reason>`` and
exits non-zero. Set ``ONCOFLOW_DEBUG=1`` to get the traceback instead.

Adding a command
----------------
Write a function under ``@command()`` that declares its own options (``Site``, ``Store`` and
the other ``Annotated`` types below are shared), builds its parameter model, calls one runner
and returns what to print (an object with ``to_dict()``, a dict, or None)::

    @command()
    def robustness(site: Site, store: Store, params: Params, runtime: RuntimeOptions) -> Any:
        \"\"\"One line for ``oncoflow --help``.\"\"\"
        from flows.robustness import RobustnessParams, run_robustness

        return run_robustness(RobustnessParams(site=site, store=store, params=params), runtime)

A ``runtime`` parameter gives the command the options every running command shares
(``--workers``, ``--dask-address``) as one :class:`flows.runtime.RuntimeOptions`, and makes the
command start reporting to Prefect early; every command gets ``--json``. Errors: raise
:class:`tasks.errors.OncoflowError` (or let a parameter model's ``ValidationError`` through) for
a mistake the user can fix; :func:`main` prints it as one line.
"""

from __future__ import annotations

import atexit
import functools
import gc
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer
from typer._click import exceptions as click_errors

from flows.runtime import RuntimeOptions

app = typer.Typer(
    name="oncoflow",
    help="Site pipeline for a federated cancer-imaging data space.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Commands that report to Prefect: a temporary server (when no PREFECT_API_URL is set) starts
#: booting before the command imports its stage, instead of after. Filled by :func:`command`.
REPORTING_COMMANDS: set[str] = set()


@app.callback()
def _start_reporting(ctx: typer.Context) -> None:
    """Site pipeline for a federated cancer-imaging data space."""
    if ctx.invoked_subcommand in REPORTING_COMMANDS and "--help" not in sys.argv:
        from flows.runtime import ensure_prefect_api

        ensure_prefect_api(wait=False)


# Options shared by commands (architecture contract).
Site = Annotated[str, typer.Option("--site", help="Site code: lowercase letters, digits, dashes.")]
Store = Annotated[str, typer.Option("--store", help="Site store URL (path, file://, s3://...).")]
FailureRatio = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Fail above this share of failed units.")
]
Workers = Annotated[
    int,
    typer.Option(
        "--workers", min=1, max=256, envvar="ONCOFLOW_WORKERS", help="Dask worker processes."
    ),
]
DaskAddress = Annotated[
    str | None,
    typer.Option(
        "--dask-address",
        envvar="ONCOFLOW_DASK_ADDRESS",
        help="Existing Dask scheduler, tcp://host:port.",
    ),
]
Dashboard = Annotated[
    bool,
    typer.Option(
        "--dashboard/--no-dashboard",
        envvar="ONCOFLOW_DASHBOARD",
        help="Dask dashboard of the LocalCluster (127.0.0.1, a free port; URL printed).",
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]
Params = Annotated[
    str,
    typer.Option("--params", help="pyradiomics parameter file (YAML/JSON) or preset: ct, mr, pet."),
]
SeriesFilter = Annotated[
    list[str] | None, typer.Option("--series", help="Only this series key (repeatable).")
]
RoiFilter = Annotated[
    list[str] | None, typer.Option("--roi", help="Only this ROI name (repeatable).")
]
ModalityFilter = Annotated[
    list[str] | None,
    typer.Option("--modality", help="Only this modality (repeatable; default: the preset's own)."),
]

_SHARED_RUNTIME = [
    inspect.Parameter("workers", inspect.Parameter.KEYWORD_ONLY, default=2, annotation=Workers),
    inspect.Parameter(
        "dask_address", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=DaskAddress
    ),
    inspect.Parameter(
        "dashboard", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=Dashboard
    ),
]
_SHARED_JSON = inspect.Parameter(
    "as_json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonOut
)


def command(
    name: str | None = None, *, reports: bool | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command; its shared options are declared here once.

    Parameters
    ----------
    name
        Command name (default: the function's name).
    reports
        Whether the command reports to Prefect (default: when it takes ``runtime``).

    Returns
    -------
    callable
        The decorator. The function keeps its own signature; the command gets ``--json`` and,
        when the function takes ``runtime``, ``--workers`` and ``--dask-address``. What the
        function returns is printed by :func:`emit` (nothing for None).
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)
        hints = get_type_hints(fn, include_extras=True)
        own = [
            p.replace(annotation=hints[p.name])
            for p in signature.parameters.values()
            if p.name not in ("runtime", "as_json")
        ]
        takes_runtime = "runtime" in signature.parameters
        prints_itself = "as_json" in signature.parameters
        shared = [*(_SHARED_RUNTIME if takes_runtime else []), _SHARED_JSON]

        @functools.wraps(fn)
        def run_command(**values: Any) -> None:
            as_json = values.pop("as_json")
            if takes_runtime:
                values["runtime"] = RuntimeOptions(
                    workers=values.pop("workers"),
                    dask_address=values.pop("dask_address"),
                    dashboard=values.pop("dashboard"),
                )
            if prints_itself:
                values["as_json"] = as_json
            result = fn(**values)
            if result is not None and not prints_itself:
                emit(result, as_json)

        run_command.__annotations__ = {p.name: p.annotation for p in [*own, *shared]}
        run_command.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*own, *shared], return_annotation=None
        )
        command_name = name or fn.__name__.replace("_", "-")
        if reports if reports is not None else takes_runtime:
            REPORTING_COMMANDS.add(command_name)
        app.command(command_name)(run_command)
        return fn

    return register


def emit(summary: Any, as_json: bool) -> None:
    """Print a summary (an object with ``to_dict()`` or a dict) as a table or as JSON."""
    data = summary.to_dict() if hasattr(summary, "to_dict") else summary
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    if isinstance(data.get("stages"), list):  # a pipeline run: one row per stage run
        table = Table(title=f"site {data.get('site', '')}")
        for column in ("stage", "outcomes", "quarantine / failure reasons"):
            table.add_column(column)
        for stage in data["stages"]:
            table.add_row(
                str(stage.get("stage")),
                ", ".join(f"{k} {v}" for k, v in stage.get("counts", {}).items()) or "-",
                ", ".join(f"{k} {v}" for k, v in stage.get("reasons", {}).items()) or "-",
            )
        Console().print(table)
        return
    table = Table(show_header=False, box=None)
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        table.add_row(f"[bold]{key}[/bold]", str(value))
    Console().print(table)


@command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder for the synthetic cohort.")],
    sites: Annotated[int, typer.Option(min=1, max=26, help="Number of sites.")] = 3,
    patients: Annotated[int, typer.Option(min=1, max=500, help="Patients per site.")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> Any:
    """Write a deterministic synthetic multi-site DICOM cohort and its truth.json."""
    from tasks.synthetic import generate_cohort

    truth = generate_cohort(out, sites=sites, patients=patients, seed=seed)
    return {"out": str(out), "sites": len(truth.sites), "truth": str(Path(out) / "truth.json")}


@command()
def ingest(
    source: Annotated[
        str,
        typer.Argument(
            help="Source: DICOM folder, file://, s3://..., dicomweb+http://host:port/dicom-web, "
            "a cases CSV (Image, Mask columns) or a folder of NIfTI/NRRD <case>_image/_mask pairs"
        ),
    ],
    site: Site,
    store: Store,
    runtime: RuntimeOptions,
    modality: Annotated[
        list[str] | None, typer.Option("--modality", help="DICOMweb: modality in study (repeat).")
    ] = None,
    since: Annotated[
        str, typer.Option("--since", help="DICOMweb: 'last' (watermark), 'all' or YYYY-MM-DD.")
    ] = "last",
    until: Annotated[
        str | None, typer.Option("--until", help="DICOMweb: latest study date YYYY-MM-DD.")
    ] = None,
    secret_block: Annotated[
        str | None, typer.Option("--secret-block", help="DICOMweb: Prefect Secret block name.")
    ] = None,
) -> Any:
    """Catalogue the DICOM files under SOURCE into the site's private catalogue.

    A dicomweb+http(s):// SOURCE pulls new studies from a PACS into the site's raw zone first
    (credentials from ONCOFLOW_DICOMWEB_USER/PASSWORD or --secret-block).
    """
    from flows.pipeline import ingest_any
    from tasks.pacs.dicomweb import is_dicomweb_source

    if not is_dicomweb_source(source) and (modality or since != "last" or until or secret_block):
        from tasks.errors import OncoflowError

        raise OncoflowError(
            "--modality, --since, --until and --secret-block apply to dicomweb+ sources only"
        )
    pull = {"modalities": modality or [], "since": since, "until": until}
    return ingest_any(source, site, store, runtime, **pull, secret_block=secret_block)


@command()
def receive(
    runtime: RuntimeOptions,
    site: Site,
    store: Store,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 11112,
    ae_title: Annotated[str, typer.Option("--ae-title", help="Our AE title.")] = "ONCOFLOW",
    allow: Annotated[
        list[str] | None, typer.Option("--allow", help="Calling AE title allowed to send (repeat).")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "0.0.0.0",
    quiet_seconds: Annotated[
        float, typer.Option("--quiet-seconds", min=0.1, help="Ingest a study once quiet this long.")
    ] = 30.0,
    no_ingest: Annotated[
        bool, typer.Option("--no-ingest", help="Only land files in the raw zone.")
    ] = False,
) -> Any:
    """Receive studies over DICOM C-STORE into the site's raw zone and ingest them (a service)."""
    from flows.pacs import run_receiver

    stats = run_receiver(
        store=store,
        site=site,
        port=port,
        ae_title=ae_title,
        allow=allow or [],
        host=host,
        quiet_seconds=quiet_seconds,
        ingest=not no_ingest,
        runtime=runtime,
    )
    return stats


@command()
def harmonise(
    runtime: RuntimeOptions,
    site: Site,
    store: Store,
    config: Annotated[
        str | None,
        typer.Option("--config", help="Harmonisation settings (YAML); default: native spacing."),
    ] = None,
    max_failure_ratio: FailureRatio = 0.1,
) -> Any:
    """Harmonise de-identified series into volumes, masks, QC pictures and provenance."""
    from flows.harmonise import build_params, harmonise

    summary = harmonise(
        build_params(site, store, config, max_failure_ratio),
        runtime=runtime,
    )
    return summary


@command()
def extract(
    runtime: RuntimeOptions,
    site: Site,
    store: Store,
    params: Params,
    series: SeriesFilter = None,
    roi: RoiFilter = None,
    modality: ModalityFilter = None,
    max_failure_ratio: FailureRatio = 0.1,
) -> Any:
    """Extract pyradiomics features of the harmonised images into features/<params-hash>.parquet."""
    from flows.extract import build_params, extract_radiomics

    summary = extract_radiomics(
        build_params(site, store, params, series, roi, max_failure_ratio, modality),
        runtime=runtime,
    )
    return summary


@command()
def robustness(
    runtime: RuntimeOptions,
    site: Site,
    store: Store,
    params: Params,
    series: SeriesFilter = None,
    roi: RoiFilter = None,
    modality: ModalityFilter = None,
    icc_threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Stable when ICC(3,1) >= this.")
    ] = 0.75,
) -> Any:
    """Perturbed replicas and negative controls: features/<params-hash>.robustness.parquet."""
    from flows.robustness import assess_robustness, build_params

    return assess_robustness(
        build_params(site, store, params, series, roi, modality, icc_threshold), runtime=runtime
    )


@command()
def deidentify(
    runtime: RuntimeOptions,
    site: Site,
    store: Store,
    source: Annotated[
        str | None,
        typer.Option("--source", help="Source root (default: the one ingest recorded)."),
    ] = None,
    options: Annotated[
        Path | None,
        typer.Option("--options", help="YAML profile options (pixel cleaning rules, ...)."),
    ] = None,
) -> Any:
    """De-identify the site's catalogued DICOM into deid/ (PS3.15 profile, keyed pseudonyms)."""
    from flows.deidentify import build_params
    from flows.deidentify import deidentify as run_deidentify

    summary = run_deidentify(build_params(site, store, source, options), runtime=runtime)
    return summary


@command("scan-phi")
def scan_phi(
    path: Annotated[
        str, typer.Argument(help="Folder, file or URL to scan (e.g. STORE/SITE/deid).")
    ],
    store: Annotated[
        str | None,
        typer.Option("--store", help="Site store: look for its catalogue's identifiers."),
    ] = None,
    site: Annotated[str | None, typer.Option("--site", help="Site code (with --store).")] = None,
    as_json: JsonOut = False,
) -> None:
    """Scan DICOM and table files for residual identifiers; exit non-zero on any finding."""
    from tasks.deid.scan_phi import scan_target

    findings = scan_target(path, store, site)
    if as_json:
        typer.echo(json.dumps([f.__dict__ for f in findings], indent=2))
    else:
        for finding in findings:
            typer.echo(finding.line())
    if findings:
        from tasks.errors import OncoflowError

        files = len({f.file for f in findings})
        raise OncoflowError(f"scan-phi: {len(findings)} possible identifier(s) in {files} file(s)")
    if not as_json:
        typer.echo("scan-phi: no identifiers found")


@command()
def quarantine(
    site: Site,
    store: Store,
    ref: Annotated[
        str | None,
        typer.Argument(help="Reference from a run's quarantine table (or its first characters)."),
    ] = None,
    as_json: JsonOut = False,
) -> None:
    """Look up quarantined items by the reference a run's report shows (site's host only)."""
    from tasks.errors import OncoflowError
    from tasks.quarantine import lookup
    from tasks.store import SiteStore

    entries = lookup(SiteStore(store, site), ref)
    if ref and not entries:
        raise OncoflowError(f"no quarantined item with reference {ref} at site {site}")
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    typer.echo(f"{len(entries)} quarantined item(s) of {site} (private: items may identify)")
    for e in entries:
        typer.echo(f"{e.ref}  {e.stage}  {e.kind}  {e.reason}\n  detail: {e.detail}")
        typer.echo(f"  item:   {e.item}")


@command()
def run(
    runtime: RuntimeOptions,
    source: Annotated[
        str, typer.Argument(help="Source URL: folder, s3://..., dicomweb+http://...")
    ],
    site: Site,
    store: Store,
    params: Annotated[
        list[str] | None,
        typer.Option("--params", help="Radiomics preset (ct, mr, pet) or parameter file."),
    ] = None,
    cohort: Annotated[str | None, typer.Option("--cohort", help="Cohort spec to publish.")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Publication URL.")] = None,
) -> Any:
    """Run the site pipeline: ingest, deidentify, harmonise, extract (and publish)."""
    from pydantic import ValidationError

    from flows.pipeline import SitePipelineParams, run_pipeline
    from tasks.errors import OncoflowError, validation_message

    if (cohort is None) != (to is None):
        raise OncoflowError("--cohort and --to go together")
    stages = ["ingest", "deidentify", "harmonise"]
    if params:
        stages.append("extract")
    if cohort:
        stages.append("publish")
    try:
        pipeline_params = SitePipelineParams(
            source=source,
            site=site,
            store=store,
            stages=stages,
            params=params or [],
            cohort=cohort,
            to=to,
            runtime=runtime,
        )
    except ValidationError as exc:
        raise OncoflowError(validation_message(exc)) from None
    return run_pipeline(pipeline_params)


@command(reports=False)  # starts its own Prefect server, its database in the demo folder
def demo(
    runtime: RuntimeOptions,
    out: Annotated[Path, typer.Option("--out", help="Folder for everything the demo writes.")] = (
        Path("oncoflow-demo")
    ),
    sites: Annotated[int, typer.Option(min=1, max=26)] = 3,
    patients: Annotated[int, typer.Option(min=1, max=50)] = 3,
    seed: int = 0,
    ui: Annotated[
        bool,
        typer.Option("--ui", help="Start (or reuse) `prefect server` with its UI; left running."),
    ] = False,
    ui_port: Annotated[
        int, typer.Option("--ui-port", min=1, max=65535, help="Port of the --ui server.")
    ] = 4200,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Remove the demo's earlier outputs and start over.")
    ] = False,
    as_json: JsonOut = False,
) -> None:
    """Run three synthetic sites end to end, through publish and the hub (reruns reuse work)."""
    from flows.demo import print_demo, run_demo

    result = run_demo(
        out,
        sites=sites,
        patients=patients,
        seed=seed,
        runtime=runtime,
        ui=ui,
        fresh=fresh,
        ui_port=ui_port,
    )
    if as_json:
        emit(result, True)
    else:
        print_demo(result)


@command()
def publish(
    runtime: RuntimeOptions,
    site: Site,
    store: Store,
    cohort: Annotated[
        str, typer.Option("--cohort", help="Cohort spec (YAML), see deployments/cohorts/.")
    ],
    to: Annotated[str, typer.Option("--to", help="Publication root URL, e.g. s3://bucket/x.")],
) -> Any:
    """Publish a cohort as an immutable, verified version <TO>/<cohort>/v<N>/."""
    from flows.publish import build_params
    from flows.publish import publish as publish_cohort

    result = publish_cohort(build_params(site, store, cohort, to), runtime=runtime)
    return result


@command()
def export(
    site: Site,
    store: Store,
    params: Annotated[
        str | None,
        typer.Option("--params", help="Table: preset, parameter file or params hash (prefix)."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="csv (methods as # lines) or parquet.")] = (
        "csv"
    ),
    out: Annotated[
        Path | None, typer.Option("--out", help="Output file (default: <site>-features.<format>).")
    ] = None,
) -> Any:
    """Write a features table as one flat file with a methods paragraph to paste."""
    from tasks.research.export import export_features
    from tasks.store import SiteStore

    target = out or Path(f"{site}-features.{fmt}")
    return export_features(SiteStore(store, site), target, params, fmt)  # type: ignore[arg-type]


@command()
def verify(
    url: Annotated[str, typer.Argument(help="A published version, or a cohort (all versions).")],
    as_json: JsonOut = False,
) -> None:
    """Check a published version: commit marker, manifest and every checksum."""
    from tasks.cohort.verify import verify_url
    from tasks.errors import OncoflowError

    report = verify_url(url)
    emit(report, as_json)
    if not report.ok:
        raise OncoflowError(f"verification failed: {report.problems[0]}")


@command(reports=True)
def federate(
    sources: Annotated[
        list[str], typer.Argument(help="Site publication URLs (root, cohort or version).")
    ],
    out: Annotated[str, typer.Option("--out", help="Hub output URL.")],
    k: Annotated[int, typer.Option("--k", min=2, help="Counts below k are suppressed.")] = 10,
    no_combat: Annotated[bool, typer.Option("--no-combat", help="Skip federated ComBat.")] = False,
) -> Any:
    """Build the hub catalogue (suppressed counts) and federated ComBat adjustments."""
    from flows.federate import FederateParams
    from flows.federate import federate as federate_hub

    return federate_hub(FederateParams(sources=sources, out=out, k=k, combat=not no_combat))


@command()
def serve(
    site: Site,
    store: Store,
    to: Annotated[str, typer.Option("--to", help="The site's publication root URL.")],
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8765,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    k: Annotated[int, typer.Option("--k", min=2, help="Counts below k are not answered.")] = 10,
    epsilon: Annotated[float, typer.Option("--epsilon", help="Laplace epsilon per query.")] = 1.0,
    rounding: Annotated[int, typer.Option("--rounding", min=1, help="Round to a multiple.")] = 5,
    token_block: Annotated[
        str | None, typer.Option("--token-block", help="Prefect Secret block with the token.")
    ] = None,
) -> None:
    """Answer count queries over the site's published cohorts (GET /counts, bearer token)."""
    from tasks.federation.noise import NoisePolicy
    from tasks.serve.app import serve as run_server
    from tasks.store import SiteStore

    SiteStore(store, site)  # validates the site code and the store URL
    run_server(
        site,
        to,
        host=host,
        port=port,
        policy=NoisePolicy(k=k, epsilon=epsilon, rounding=rounding),
        token_block=token_block,
    )


@command()
def readiness(
    site: Site,
    store: Store,
    to: Annotated[str | None, typer.Option("--to", help="The site's publication root.")] = None,
    endpoint: Annotated[
        str | None,
        typer.Option("--endpoint", envvar="ONCOFLOW_SERVE_URL", help="URL of oncoflow serve."),
    ] = None,
    as_json: JsonOut = False,
) -> None:
    """Report which tier (1 catalogue, 2 queries, 3 processing-ready) the site meets."""
    from tasks.cohort.readiness import TIERS, assess

    report = assess(site, store, to=to, endpoint=endpoint)
    if as_json:
        emit(report.to_dict(), True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"site {site}: tier {report.tier} ({TIERS.get(report.tier, 'none')})")
    for column in ("tier", "requirement", "", "detail"):
        table.add_column(column)
    for item in report.items:
        mark = "[green]yes[/green]" if item.ok else "[red]missing[/red]"
        table.add_row(str(item.tier), item.name, mark, item.detail)
    Console().print(table)


def _quiet_consoles() -> None:
    """Keep Prefect's and Dask's INFO chatter off the terminal (it still reaches the UI)."""
    if os.environ.get("ONCOFLOW_VERBOSE"):
        return
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; turn every error into one line and a non-zero exit code."""
    from flows.runtime import apply_prefect_defaults, quiet_exit_progress

    # Registered first, so it runs after every other exit handler (Prefect's log and event
    # flushes): the interpreter's final collection walks the command's whole heap (Prefect's
    # models, imported modules) to free what the operating system frees anyway, 0.3 s of a
    # fully cached run. Frozen objects are skipped by it; objects are still freed as usual.
    atexit.register(gc.freeze)

    _quiet_consoles()
    apply_prefect_defaults()  # before Prefect is imported, so its settings see them
    quiet_exit_progress()
    if not os.environ.get("ONCOFLOW_DEBUG"):
        from flows.runtime import hide_expected_tracebacks

        hide_expected_tracebacks()
    try:
        app(args=argv, standalone_mode=False)
    except click_errors.NoArgsIsHelpError:
        sys.exit(0)
    except click_errors.ClickException as exc:  # usage errors, invalid option values
        typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code or 2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("ONCOFLOW_DEBUG"):
            raise
        code, line = _one_line(exc)
        typer.echo(f"error: {line}", err=True)
        sys.exit(code)
    sys.exit(0)


def _one_line(exc: Exception) -> tuple[int, str]:
    """Exit code and one line for an error: expected ones (the user can fix) exit with 2."""
    from pydantic import ValidationError

    from tasks.errors import OncoflowError, validation_message

    if isinstance(exc, OncoflowError):
        return 2, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, ValidationError):
        return 2, validation_message(exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return 1, f"{type(exc).__name__}: {first}"


if __name__ == "__main__":
    main()

"""The ``oncoflow`` command line (architecture contract: commands and common options).

Every command prints a short summary (or JSON with ``--json``) and exits 0 when the run
completed, even with quarantined items; otherwise it prints one line ``error: <reason>`` and
exits non-zero. Set ``ONCOFLOW_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer

app = typer.Typer(
    name="oncoflow",
    help="Site pipeline for a federated cancer-imaging data space.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Common options (architecture contract).
Site = Annotated[str, typer.Option("--site", help="Site code: lowercase letters, digits, dashes.")]
Store = Annotated[str, typer.Option("--store", help="Site store URL (path, file://, s3://...).")]
Workers = Annotated[int, typer.Option("--workers", min=1, max=256, help="Dask worker processes.")]
DaskAddress = Annotated[
    str | None, typer.Option("--dask-address", help="Existing Dask scheduler, tcp://host:port.")
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]


def runtime_options(workers: int, dask_address: str | None) -> Any:
    """Build :class:`flows.runtime.RuntimeOptions` from the common CLI options."""
    from flows.runtime import RuntimeOptions

    return RuntimeOptions(workers=workers, dask_address=dask_address)


def emit(summary: Any, as_json: bool) -> None:
    """Print a summary (an object with ``to_dict()`` or a dict) as a table or as JSON."""
    data = summary.to_dict() if hasattr(summary, "to_dict") else summary
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        table.add_row(f"[bold]{key}[/bold]", str(value))
    Console().print(table)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder for the synthetic cohort.")],
    sites: Annotated[int, typer.Option(min=1, max=26, help="Number of sites.")] = 3,
    patients: Annotated[int, typer.Option(min=1, max=500, help="Patients per site.")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    as_json: JsonOut = False,
) -> None:
    """Write a deterministic synthetic multi-site DICOM cohort and its truth.json."""
    from tasks.synthetic import generate_cohort

    truth = generate_cohort(out, sites=sites, patients=patients, seed=seed)
    emit(
        {
            "out": str(out),
            "sites": len(truth.sites),
            "truth": str(Path(out) / "truth.json"),
        },
        as_json,
    )


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="Source URL: folder, file://, s3://...")],
    site: Site,
    store: Store,
    workers: Workers = 2,
    dask_address: DaskAddress = None,
    as_json: JsonOut = False,
) -> None:
    """Catalogue the DICOM files under SOURCE into the site's private catalogue."""
    from flows.ingest import IngestParams, ingest_dicom

    summary = ingest_dicom(
        IngestParams(source=source, site=site, store=store),
        runtime=runtime_options(workers, dask_address),
    )
    emit(summary, as_json)


def _quiet_consoles() -> None:
    """Keep Prefect's and Dask's INFO chatter off the terminal (it still reaches the UI)."""
    if os.environ.get("ONCOFLOW_VERBOSE"):
        return
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; turn every error into one line and a non-zero exit code."""
    _quiet_consoles()
    from tasks.errors import OncoflowError

    try:
        app(args=argv, standalone_mode=False)
    except OncoflowError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except Exception as exc:
        # Typer vendors its own click: recognise usage errors by their interface.
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            if type(exc).__name__ == "NoArgsIsHelpError":
                sys.exit(0)
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code or 2)
        if os.environ.get("ONCOFLOW_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"error: {type(exc).__name__}: {first}", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()

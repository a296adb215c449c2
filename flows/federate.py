"""Flow ``federate-hub``: the hub's catalogue of suppressed counts and federated ComBat.

Reads the committed cohort versions the sites published (manifests and ComBat summaries only;
never a table row), then writes under ``OUT``:

* ``catalogue.json``: counts by site, modality, body part and ROI, with small counts shown as
  ``<k`` and complementary suppression (``tasks.federation.counts``);
* ``combat/<cohort>/<site>.json``: for every cohort that at least two sites published with
  ComBat summary statistics, each site's adjustment (``tasks.federation.combat``), which the
  site applies to its own rows with ``apply_adjustment``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from flows.reporting import artifact_key, markdown_table
from flows.runtime import ensure_prefect_api
from tasks.cohort.publish import REPORT
from tasks.cohort.storage import Retrier, RetryPolicy, put_bytes
from tasks.errors import OncoflowError
from tasks.federation.combat import SiteSummary, estimate
from tasks.federation.counts import SourceCounts, federated_catalogue
from tasks.federation.remote import is_endpoint, queried_rows, query_endpoint
from tasks.federation.report import hub_report
from tasks.federation.sources import PublishedVersion, read_version, version_paths
from tasks.store import open_url, unstrip

CATALOGUE = "catalogue.json"


class FederateParams(BaseModel):
    """One hub run (the Prefect UI form; URLs and settings only)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(
        min_length=1,
        description="Site publication URLs (root, cohort or version) or http(s):// endpoints.",
    )
    out: str = Field(description="Hub output URL (catalogue.json, combat/...).")
    k: int = Field(10, ge=2, le=1000, description="Counts below k are suppressed.")
    combat: bool = Field(True, description="Estimate federated ComBat where summaries exist.")


@task(name="query-site", task_run_name="query-{url}")
def query_site_task(url: str) -> dict[str, Any]:
    """Ask a site's query endpoint for its obfuscated counts."""
    return query_endpoint(url)


@task(name="read-published", task_run_name="read-{url}")
def read_source_task(url: str) -> list[PublishedVersion]:
    """Read the committed versions a source URL names."""
    retry = Retrier(RetryPolicy())
    fs, paths = version_paths(url, retry)
    return [read_version(fs, p, retry) for p in paths]


def _combat(versions: list[PublishedVersion]) -> dict[str, dict[str, Any]]:
    """Per cohort published with summaries by two sites or more: each site's adjustment."""
    by_cohort: dict[str, list[SiteSummary]] = defaultdict(list)
    for v in versions:
        if v.combat_summary is not None:
            by_cohort[str(v.manifest.get("cohort"))].append(SiteSummary.from_dict(v.combat_summary))
    out = {}
    for cohort, summaries in sorted(by_cohort.items()):
        if len(summaries) >= 2:
            out[cohort] = {s: a.to_dict() for s, a in estimate(summaries).items()}
    return out


def _table_markdown(table: dict[str, Any]) -> str:
    columns = table.get("columns", [])
    rows = [
        {"site": r["site"], "cohort": r["cohort"], **r.get("values", {}), "total": r["total"]}
        for r in table["rows"]
    ]
    rows.append({"site": "all", "cohort": "", **table.get("totals", {}), "total": table["total"]})
    return markdown_table(rows, ["site", "cohort", *columns, "total"])


def _read_sources(params: FederateParams) -> tuple[list[PublishedVersion], list[dict[str, Any]]]:
    """Read the published versions and query the endpoints (one task per source).

    Raises
    ------
    OncoflowError
        When the same site's cohort is given twice.
    """
    endpoints = [url for url in params.sources if is_endpoint(url)]
    futures = [read_source_task.submit(url) for url in params.sources if not is_endpoint(url)]
    queried = [f.result() for f in [query_site_task.submit(url) for url in endpoints]]
    versions = [v for f in futures for v in f.result()]
    seen: set[str] = set()
    for v in versions:
        key = f"{v.manifest.get('site')}/{v.manifest.get('cohort')}"
        if key in seen:
            raise OncoflowError(f"{key} is published twice in the inputs: give each once")
        seen.add(key)
    return versions, queried


def _write_combat(
    params: FederateParams, versions: list[PublishedVersion], retry: Retrier
) -> tuple[list[str], dict[str, Any], dict[str, dict[str, float]]]:
    """Write each site's ComBat adjustment and the hub report; return keys, cohorts, effects."""
    combat = _combat(versions) if params.combat else {}
    fs, root = open_url(params.out)
    written: list[str] = []
    for cohort, adjustments in combat.items():
        for site, adjustment in sorted(adjustments.items()):
            key = f"combat/{cohort}/{site}.json"
            blob = json.dumps(adjustment, sort_keys=True).encode()
            retry("writing a ComBat adjustment", put_bytes, fs, f"{root}/{key}", blob)
            written.append(key)
    effects: dict[str, dict[str, float]] = {}
    if combat:
        report, effects = hub_report(versions, combat)
        retry("writing the report", put_bytes, fs, f"{root}/{REPORT}", report.html.encode())
        written.append(REPORT)
        create_markdown_artifact(
            markdown=report.markdown,
            key=artifact_key("hub", "report"),
            description="Site effect before and after federated ComBat (report.html)",
        )
    return written, combat, effects


def _catalogue_markdown(k: int, catalogue: dict[str, Any], queried: list[dict[str, Any]]) -> str:
    """Return the catalogue artifact: one table per dimension, patients, queried sites."""
    sections = [
        f"# Federated catalogue\n\nk = {k}; `<{k}`: a count from 1 to "
        f"{k - 1}; `*`: suppressed to protect a small count; `-`: not shown (the "
        "totals would reveal it)."
    ]
    for name, table in catalogue["tables"].items():
        if name != "patients":
            sections.append(f"## By {name.replace('_', ' ')} ({table['unit']})")
            sections.append(_table_markdown(table))
    if "patients" in catalogue["tables"]:
        patients = catalogue["tables"]["patients"]
        sections.append("## Patients")
        sections.append(
            markdown_table(
                [*patients["rows"], {"site": "all", "cohort": "", "total": patients["total"]}],
                ["site", "cohort", "total"],
            )
        )
    for dim, rows in queried_rows(queried).items() if queried else ():
        sections.append(f"## {dim.replace('_', ' ')}: sites queried over HTTP (noisy counts)")
        sections.append(markdown_table(rows, ["site", "value", "patients", "series"]))
    return "\n\n".join(sections)


@flow(name="federate-hub", flow_run_name="federate-{params.k}", log_prints=False)
def federate_flow(params: FederateParams) -> dict[str, Any]:
    """Build the federated catalogue (and ComBat adjustments) from published versions.

    Returns
    -------
    dict
        Sources read, suppression threshold, output keys, cohorts harmonised with ComBat.
    """
    versions, queried = _read_sources(params)
    sources = [SourceCounts.from_manifest(v.manifest, v.url) for v in versions]
    catalogue = federated_catalogue(sources, k=params.k) if sources or not queried else {}
    catalogue.setdefault("k", params.k)
    catalogue.setdefault("tables", {})
    if queried:
        catalogue["queried"] = queried
    retry = Retrier(RetryPolicy())
    fs, root = open_url(params.out)
    data = (json.dumps(catalogue, indent=2, sort_keys=True) + "\n").encode()
    retry("writing the catalogue", put_bytes, fs, f"{root}/{CATALOGUE}", data)
    written, combat, effects = _write_combat(params, versions, retry)
    create_markdown_artifact(
        markdown=_catalogue_markdown(params.k, catalogue, queried),
        key=artifact_key("hub", "catalogue"),
        description="Federated catalogue with suppressed counts",
    )
    return {
        "stage": "federate",
        "sources": len(sources) + len(queried),
        "k": params.k,
        "out": unstrip(fs, root),
        "written": [CATALOGUE, *written],
        "combat_cohorts": sorted(combat),
        "site_effect": effects,
    }


def federate(params: FederateParams) -> dict[str, Any]:
    """Run the hub flow (what the CLI and tests call); reads are light, no Dask cluster."""
    ensure_prefect_api()
    return federate_flow(params)


def run_federation(sources: list[str], out: str, k: int = 10) -> dict[str, Any]:
    """Federate site publications into ``out`` (the demo's and scripts' entry point)."""
    return federate(FederateParams(sources=sources, out=out, k=k))

"""Which EUCAIM tier a site meets, and what is missing for the next one.

* **Tier 1, catalogue metadata**: a committed cohort version of the site with its
  HealthDCAT-AP record carrying the catalogue's mandatory fields (contact point, publisher
  contact, access body, licence, checksums, ...), the release checks run (``risk-report.json``)
  and the minimum imaging metadata complete;
* **Tier 2, federated queries**: a query endpoint (``oncoflow serve``) that answers, with a
  token, at the URL given;
* **Tier 3, processing-ready data**: harmonised images with ROI masks and a radiomics feature
  table at the site, published with the version (images, masks, ``features.parquet``).

Tiers build on each other: the site meets the highest tier whose items, and those of every
tier below, are all present. Only published objects, the site's de-identified tables and the
endpoint's ``/health`` and ``/policy`` are read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

TIERS = {1: "catalogue metadata", 2: "federated queries", 3: "processing-ready data"}


@dataclass
class Item:
    """One requirement and whether the site meets it."""

    tier: int
    name: str
    ok: bool
    detail: str = ""


@dataclass
class ReadinessReport:
    """The requirements checked, by tier."""

    site: str
    items: list[Item] = field(default_factory=list)

    def add(self, tier: int, name: str, ok: bool, detail: str = "") -> None:
        """Record one requirement."""
        self.items.append(Item(tier, name, ok, detail))

    @property
    def tier(self) -> int:
        """Highest tier met (every item of it and of the tiers below present); 0 if none."""
        met = 0
        for tier in sorted(TIERS):
            if all(i.ok for i in self.items if i.tier == tier):
                met = tier
            else:
                break
        return met

    @property
    def missing(self) -> list[str]:
        """What is missing, tier by tier (``tier N: item (detail)``)."""
        return [
            f"tier {i.tier}: {i.name}" + (f" ({i.detail})" if i.detail else "")
            for i in self.items
            if not i.ok
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable report."""
        return {
            "site": self.site,
            "tier": self.tier,
            "tier_name": TIERS.get(self.tier, "none"),
            "items": [i.__dict__ for i in self.items],
            "missing": self.missing,
        }


#: Properties a catalogue entry must have (HealthDCAT-AP, NON_PUBLIC), as (label, path).
RECORD_FIELDS = (
    ("title", "http://purl.org/dc/terms/title"),
    ("description", "http://purl.org/dc/terms/description"),
    ("contact point", "http://www.w3.org/ns/dcat#contactPoint"),
    ("publisher", "http://purl.org/dc/terms/publisher"),
    ("health data access body", "http://healthdataportal.eu/ns/health#hdab"),
    ("access rights", "http://purl.org/dc/terms/accessRights"),
    ("applicable legislation", "http://data.europa.eu/r5r/applicableLegislation"),
    ("health category", "http://healthdataportal.eu/ns/health#healthCategory"),
    ("keyword", "http://www.w3.org/ns/dcat#keyword"),
    ("distribution", "http://www.w3.org/ns/dcat#distribution"),
    ("provenance", "http://purl.org/dc/terms/provenance"),
)


def _record_problems(ttl: bytes) -> list[str]:
    from rdflib import Graph, URIRef
    from rdflib.namespace import RDF

    g = Graph().parse(data=ttl, format="turtle")
    datasets = list(g.subjects(RDF.type, URIRef("http://www.w3.org/ns/dcat#Dataset")))
    if not datasets:
        return ["no dcat:Dataset"]
    ds = datasets[0]
    missing = [label for label, path in RECORD_FIELDS if (ds, URIRef(path), None) not in g]
    cv = URIRef("http://data.europa.eu/m8g/contactPoint")
    publisher = g.value(ds, URIRef("http://purl.org/dc/terms/publisher"))
    if publisher is not None and (publisher, cv, None) not in g:
        missing.append("publisher contact")
    return missing


def _publication(report: ReadinessReport, site: str, to: str | None) -> dict[str, Any] | None:
    """Check tier 1 on the latest versions the site published; return what tier 3 needs."""
    from tasks.cohort.storage import Retrier, RetryPolicy
    from tasks.errors import OncoflowError
    from tasks.federation.sources import read_checked, read_version, version_paths
    from tasks.store import read_parquet

    if not to:
        report.add(1, "published cohort version", False, "no publication URL given (--to)")
        return None
    retry = Retrier(RetryPolicy(attempts=3))
    try:
        fs, paths = version_paths(to, retry)
    except OncoflowError as exc:
        report.add(1, "published cohort version", False, str(exc))
        return None
    versions = []
    for path in paths:
        version = read_version(fs, path, retry)
        if version.manifest.get("site") == site:
            versions.append((path, version))
    if not versions:
        report.add(1, "published cohort version", False, f"none by site {site} at {to}")
        return None
    names = ", ".join(
        f"{v.manifest.get('cohort')} v{str(v.manifest.get('version', '?')).split('.')[0]}"
        for _, v in versions
    )
    report.add(1, "published cohort version", True, names)
    record_ok, risk_ok, metadata_missing = True, True, []
    found: dict[str, Any] = {"images": 0, "masks": 0, "features": False, "dicom": 0, "seg": 0}
    for path, version in versions:
        sums = {d.get("contentUrl"): d.get("sha256") for d in version.manifest["distribution"]}
        label = f"{version.manifest.get('cohort')}"
        try:
            ttl = retry("reading dcat.ttl", fs.cat_file, f"{path}/dcat.ttl")
        except FileNotFoundError:
            record_ok = False
            report.add(1, f"HealthDCAT-AP record of {label}", False, "dcat.ttl missing")
            continue
        problems = _record_problems(ttl)
        if problems:
            record_ok = False
            report.add(1, f"HealthDCAT-AP record of {label}", False,
                       "missing " + ", ".join(problems))  # fmt: skip
        if "risk-report.json" not in sums:
            risk_ok = False
        else:
            risk = json.loads(
                read_checked(fs, f"{path}/risk-report.json", sums["risk-report.json"], retry)
            )
            metadata_missing += [f"{k} ({n} series)" for k, n in risk["missing_metadata"].items()]
        if "series.parquet" in sums:
            import pyarrow as pa

            data = read_checked(fs, f"{path}/series.parquet", sums["series.parquet"], retry)
            rows = read_parquet(pa.BufferReader(data)).to_pylist()
            found["images"] += sum(1 for r in rows if r.get("image"))
            found["masks"] += sum(1 for r in rows if r.get("masks"))
            found["dicom"] += sum(1 for r in rows if r.get("dicom"))
            found["seg"] += sum(1 for r in rows if r.get("seg_series"))
        found["features"] |= "features.parquet" in sums
    if record_ok:
        report.add(1, "HealthDCAT-AP record with the mandatory fields", True)
    report.add(
        1,
        "release checks (risk-report.json)",
        risk_ok,
        "" if risk_ok else "published before release checks existed: publish again",
    )
    report.add(
        1,
        "minimum imaging metadata complete",
        not metadata_missing,
        "missing " + ", ".join(metadata_missing) if metadata_missing else "",
    )
    return found  # fmt: skip


def _endpoint(report: ReadinessReport, url: str | None, token: str | None) -> None:
    import httpx

    if not url:
        report.add(2, "query endpoint", False, "no endpoint URL given (--endpoint)")
        return
    try:
        health = httpx.get(f"{url.rstrip('/')}/health", timeout=10)
        policy = httpx.get(
            f"{url.rstrip('/')}/policy",
            headers={"Authorization": f"Bearer {token or ''}"},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        report.add(2, "query endpoint", False, f"{url} unreachable ({type(exc).__name__})")
        return
    if health.status_code != 200:
        report.add(2, "query endpoint", False, f"{url}/health answered {health.status_code}")
    elif policy.status_code != 200:
        report.add(2, "query endpoint", False, f"{url}/policy answered {policy.status_code}")
    else:
        body = policy.json()
        report.add(2, "query endpoint", True, f"k = {body['k']}, epsilon = {body['epsilon']}")


def _processing_ready(report: ReadinessReport, store: Any, found: dict[str, Any] | None) -> None:
    from tasks.research.export import feature_tables
    from tasks.store import HARMONISED_SERIES

    harmonised = store.read_table(HARMONISED_SERIES)
    ok = 0 if harmonised is None else sum(
        1 for r in harmonised.select(["status", "image"]).to_pylist()
        if r["status"] in (None, "ok") and r["image"]
    )  # fmt: skip
    report.add(3, "harmonised images at the site", ok > 0,
               f"{ok} series" if ok else "run oncoflow harmonise")  # fmt: skip
    tables = feature_tables(store)  # features/<params-hash>.parquet, folders of parts
    report.add(3, "radiomics feature table at the site", bool(tables),
               f"{len(tables)} table(s)" if tables else "run oncoflow extract")  # fmt: skip
    if found is None:
        report.add(3, "images, masks and features published", False, "no published version")
        return
    published = found["images"] > 0 and found["masks"] > 0 and found["features"]
    detail = f"{found['images']} images, {found['masks']} with masks, features " + (
        "yes" if found["features"] else "no"
    )
    report.add(3, "images, masks and features published", published, detail)


def assess(
    site: str,
    store_url: str,
    to: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> ReadinessReport:
    """Check a site's publication, query endpoint and processing-ready data.

    Parameters
    ----------
    site
        Site code.
    store_url
        The site store.
    to
        The site's publication root (default: none, tier 1 is then missing).
    endpoint
        URL of the site's ``oncoflow serve`` (default: ``ONCOFLOW_SERVE_URL``).
    token
        Its bearer token (default: ``ONCOFLOW_SERVE_TOKEN``).

    Returns
    -------
    ReadinessReport
        Every requirement, the tier met and what is missing.
    """
    from tasks.store import SiteStore

    store = SiteStore(store_url, site)
    report = ReadinessReport(site=site)
    found = _publication(report, site, to)
    _endpoint(
        report,
        endpoint or os.environ.get("ONCOFLOW_SERVE_URL"),
        token or os.environ.get("ONCOFLOW_SERVE_TOKEN"),
    )
    _processing_ready(report, store, found)
    return report

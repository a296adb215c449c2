"""Publish a cohort as an immutable, verified version: ``<TO>/<cohort>/v<N>/``.

Protocol (each step retried on transient storage errors, never on others):

1. *Plan*: select the series, build the tables, and compute the **content hash** (the cohort
   description and every payload file's SHA-256). If the latest committed version has the
   same content hash, stop: republishing the same content makes no new version.
2. *Clean*: delete leftovers of killed runs, i.e. version directories without a commit
   marker and staging prefixes of other content. The staging prefix of *this* content is kept,
   so its objects are reused (after re-hashing) instead of uploaded again.
3. *Gate* (at the site, before any upload): read every planned file from the site store
   (checked against its planned SHA-256), build the tables, the manifest and ``SHA256SUMS`` in
   memory, and run the de-identification leak gate over all of them. Any hit stops the run:
   nothing of this content is uploaded, and a staging prefix of the same content left by an
   earlier run is removed, so the target holds nothing of it.
4. *Stage*: upload exactly the gated bytes (each checked against the SHA-256 the gate saw)
   under ``<TO>/<cohort>/.staging/<content-hash>/``, then the manifest and ``SHA256SUMS``;
   list and re-hash everything staged.
5. *Commit*: copy the staged objects to ``v<N>/`` (server-side on S3), check the copies, then
   create ``v<N>/COMMITTED`` exclusively (conditional PUT): the marker is the last write and
   the only thing that makes a version visible. Finally delete the staging prefix.

A run killed at any point leaves no visible version; the next run resumes from the staged
objects or removes them. A version is never overwritten: the marker is created only if absent
and committed versions are never touched again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa

from tasks.cohort.catalogue import CatalogueSpec
from tasks.cohort.manifest import (
    build_manifest,
    content_hash,
    describe,
    manifest_bytes,
    sha256sums,
)
from tasks.cohort.report import site_report
from tasks.cohort.risk import RISK_REPORT, prepare_selection, report_bytes
from tasks.cohort.select import CohortSelection, PlannedFile, select_cohort
from tasks.cohort.spec import CohortSpec
from tasks.cohort.storage import (
    Retrier,
    RetryPolicy,
    copy_object,
    create_exclusive,
    list_objects,
    put_bytes,
    remove_prefix,
)
from tasks.cohort.verify import (
    MANIFEST,
    MARKER,
    METADATA,
    STAGING,
    SUMS,
    check_objects,
    read_marker,
    sha256_of,
    version_dirs,
)
from tasks.errors import OncoflowError
from tasks.store import SiteStore, open_url, sha256_bytes, table_to_parquet_bytes, unstrip

log = logging.getLogger(__name__)

#: The page to look at (tasks/cohort/report.py).
REPORT = "report.html"
#: Federated ComBat summary statistics of the cohort (when the spec asks for them).
COMBAT_SUMMARY = "combat-summary.json"

#: Called on the staged version; returns one line per residual identifier found (no values).
LeakGate = Callable[[SiteStore, Callable[[str], bytes], list[str]], list[str]]


@dataclass
class PublishPlan:
    """Everything needed to stage and commit one cohort version (no identifiers)."""

    site: str
    cohort: str
    to: str
    digest: str
    description: dict[str, Any]
    files: dict[str, list[PlannedFile]]
    tables: dict[str, bytes]
    schemas: dict[str, pa.Schema]
    staged: dict[str, int] = field(default_factory=dict)
    catalogue: CatalogueSpec = field(default_factory=CatalogueSpec)
    release: dict[str, Any] = field(default_factory=dict)
    #: The report's pictures as markdown, for the run page (not published: report.html is).
    report_markdown: str = ""

    @property
    def staging_key(self) -> str:
        """Cohort-relative staging prefix of this content."""
        return f"{STAGING}/{self.digest[:32]}"

    def payload_sums(self) -> dict[str, str]:
        """``{name: sha256}`` of every payload object (tables and files)."""
        sums = {f.name: f.sha256 for files in self.files.values() for f in files}
        sums.update({name: sha256_bytes(data) for name, data in self.tables.items()})
        return sums


@dataclass
class PublishResult:
    """What a publish run did (safe to log and post: counts, keys and hashes only)."""

    site: str
    cohort: str
    version: str
    url: str
    content_hash: str
    created: bool
    files: int = 0
    uploaded: int = 0
    reused: int = 0
    retries: int = 0
    leak_gate: str = "not-run"
    cleaned: list[str] = field(default_factory=list)
    release: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable summary."""
        return {
            "stage": "publish",
            "site": self.site,
            "cohort": self.cohort,
            "version": self.version,
            "url": self.url,
            "content_hash": self.content_hash,
            "created": self.created,
            "files": self.files,
            "uploaded": self.uploaded,
            "reused": self.reused,
            "retries": self.retries,
            "leak_gate": self.leak_gate,
            "cleaned": self.cleaned,
            "release": self.release,
        }


@dataclass
class CohortState:
    """Committed versions, uncommitted version directories and staging prefixes of a cohort."""

    committed: list[tuple[int, str, dict[str, Any]]]
    pending: list[str]
    staging: list[str]

    @property
    def latest(self) -> tuple[int, str, dict[str, Any]] | None:
        """The highest committed version, if any."""
        return self.committed[-1] if self.committed else None


def cohort_path(to: str, cohort: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path of ``<TO>/<cohort>``."""
    fs, root = open_url(to)
    return fs, f"{root}/{cohort}"


def plan_publication(store: SiteStore, spec: CohortSpec, to: str) -> PublishPlan:
    """Select and prepare the cohort, and compute its tables and content hash.

    The release checks of ``tasks.cohort.risk`` run here; the only writes are the site's
    detailed release report and the publish stage's quarantine rows.

    Parameters
    ----------
    store
        The site store.
    spec
        The cohort spec.
    to
        Publication root URL.

    Returns
    -------
    PublishPlan
        The plan; ``digest`` identifies the content.
    """
    selection: CohortSelection = select_cohort(store, spec)
    selection, release = prepare_selection(store, spec, selection)
    tables = {
        "series.parquet": table_to_parquet_bytes(selection.series),
        RISK_REPORT: report_bytes(release.public()),
    }
    schemas = {"series.parquet": selection.series.schema}
    if selection.features is not None:
        tables["features.parquet"] = table_to_parquet_bytes(
            selection.features, selection.features_metadata
        )
        schemas["features.parquet"] = selection.features.schema
    if spec.combat is not None and selection.features is not None:
        from tasks.federation.combat import cohort_summary

        summary = cohort_summary(
            store.site,
            selection.series,
            selection.features,
            spec.combat.roi,
            spec.combat.categorical,
            spec.combat.continuous,
        )
        tables[COMBAT_SUMMARY] = json.dumps(summary.to_dict(), sort_keys=True).encode()
    description = describe(
        spec, store.site, selection.series, selection.features, selection.features_metadata
    )
    report = site_report(
        store,
        spec.title,
        description["counts"],
        selection.series,
        selection.features,
        selection.features_metadata,
        spec.selection.modality,
    )
    tables[REPORT] = report.html.encode()
    plan = PublishPlan(
        site=store.site,
        cohort=spec.name,
        to=to,
        digest="",
        description=description,
        files=selection.files_by_series,
        tables=tables,
        schemas=schemas,
        catalogue=spec.catalogue,
        release=release.summary(spec.name),
        report_markdown=report.markdown,
    )
    plan.digest = content_hash(description, plan.payload_sums())
    return plan


def cohort_state(fs: fsspec.AbstractFileSystem, path: str, retry: Retrier) -> CohortState:
    """Scan a cohort prefix for committed versions, uncommitted directories and staging."""
    committed, pending = [], []
    for number, vpath in retry("listing versions", version_dirs, fs, path):
        marker = read_marker(fs, vpath, retry)
        if marker is None:
            pending.append(vpath)
        else:
            committed.append((number, vpath, marker))
    fs.invalidate_cache(f"{path}/{STAGING}")
    try:
        staging = [
            p.rstrip("/")
            for p in retry("listing staging", fs.ls, f"{path}/{STAGING}", detail=False)
        ]
    except FileNotFoundError:
        staging = []
    return CohortState(committed=committed, pending=pending, staging=staging)


def prepare_target(plan: PublishPlan, retry: Retrier) -> tuple[PublishResult | None, list[str]]:
    """Stop early when the content is already published; otherwise clean leftovers.

    Returns
    -------
    tuple
        A result when the latest committed version has the same content (nothing to do),
        else None; and the cohort-relative names of the leftovers removed.
    """
    fs, path = cohort_path(plan.to, plan.cohort)
    state = cohort_state(fs, path, retry)
    ours = f"{path}/{plan.staging_key}"
    cleaned = []
    for leftover in state.pending + [s for s in state.staging if s != ours]:
        retry("removing a leftover of an earlier run", remove_prefix, fs, leftover)
        cleaned.append(leftover[len(path) + 1 :])
    latest = state.latest
    if latest is not None and latest[2].get("content_hash") == plan.digest:
        if ours in state.staging:
            retry("removing staging", remove_prefix, fs, ours)
            cleaned.append(plan.staging_key)
        number, vpath, _ = latest
        return (
            PublishResult(
                site=plan.site,
                cohort=plan.cohort,
                version=f"v{number}",
                url=unstrip(fs, vpath),
                content_hash=plan.digest,
                created=False,
                files=len(plan.payload_sums()),
                retries=retry.retries,
                leak_gate="not-run",
                cleaned=cleaned,
                release=plan.release,
            ),
            cleaned,
        )
    plan.staged = retry("listing staged objects", list_objects, fs, ours)
    return None, cleaned


def read_source(store: SiteStore, planned: PlannedFile) -> bytes:
    """Read a planned file from the site store and check it is the planned content.

    Raises
    ------
    OncoflowError
        When the source is missing or its SHA-256 differs from the plan.
    """
    try:
        data = store.read_bytes(planned.source)
    except FileNotFoundError:
        raise OncoflowError(f"{planned.name}: its source file is missing") from None
    if sha256_bytes(data) != planned.sha256:
        raise OncoflowError(f"{planned.name}: source changed since it was planned")
    return data


def stage_files(
    store: SiteStore,
    plan: PublishPlan,
    files: list[PlannedFile],
    retry: Retrier,
) -> tuple[list[str], int]:
    """Upload the files of one series to the staging prefix (reuse verified staged copies).

    Call only after the leak gate passed on these files (:func:`gate_files`): the bytes
    uploaded are checked to have the SHA-256 the gate saw.

    Returns
    -------
    tuple
        Names uploaded, number reused.
    """
    fs, path = cohort_path(plan.to, plan.cohort)
    staging = f"{path}/{plan.staging_key}"
    uploaded: list[str] = []
    reused = 0
    for planned in files:
        dest = f"{staging}/{planned.name}"
        if planned.name in plan.staged and sha256_of(fs, dest, retry) == planned.sha256:
            reused += 1
            continue
        data = read_source(store, planned)
        retry(f"uploading {planned.name}", put_bytes, fs, dest, data)
        uploaded.append(planned.name)
    return uploaded, reused


def default_leak_gate(
    store: SiteStore, read: Callable[[str], bytes], names: list[str]
) -> list[str]:
    """Run the de-identification leak gate over objects of a version before they leave the site.

    Every object (DICOM, NIfTI, tables, manifest) is scanned for the identifying values of the
    site's private catalogue and for identifier patterns (the scanner of
    :mod:`tasks.deid.scan_phi`). Findings name the object and the attribute, never the value.

    Parameters
    ----------
    store
        The site store (its private catalogue gives the identifiers to look for).
    read
        Returns the bytes of an object by name, exactly the bytes that would be uploaded.
    names
        Names of the objects.

    Raises
    ------
    OncoflowError
        When the site has no private catalogue to take identifiers from.
    """
    from tasks.deid.scan_phi import Finding, scan_bytes, store_matcher

    matcher = store_matcher(store)
    findings: set[Finding] = set()
    for name in names:
        for attribute, kind in scan_bytes(name, read(name), matcher):
            findings.add(Finding(name, attribute, kind))
    return [f.line() for f in sorted(findings)]


@dataclass
class GateOutcome:
    """What the leak gate found in some objects of a version, and their sizes in bytes.

    ``findings`` name the object and the attribute, never a value.
    """

    findings: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)


def gate_files(
    store: SiteStore, files: list[PlannedFile], leak_gate: LeakGate = default_leak_gate
) -> GateOutcome:
    """Run the leak gate on planned files, reading them from the site store (nothing uploaded).

    Each file is read and checked against its planned SHA-256, so the bytes scanned are the
    bytes :func:`stage_files` uploads later (it checks the same hash).
    """
    by_name = {f.name: f for f in files}
    sizes: dict[str, int] = {}

    def read(name: str) -> bytes:
        data = read_source(store, by_name[name])
        sizes[name] = len(data)
        return data

    findings = leak_gate(store, read, sorted(by_name))
    for name in sorted(set(by_name) - set(sizes)):
        read(name)  # a gate that skipped a file: its size is still needed for the manifest
    return GateOutcome(findings=list(findings), sizes=sizes)


@dataclass
class SealedVersion:
    """A version's number and in-memory objects (tables, manifest, DCAT, SHA256SUMS)."""

    number: int
    objects: dict[str, bytes]
    sums: dict[str, str]

    @property
    def names(self) -> list[str]:
        """Every object name of the version except the commit marker."""
        return sorted([*self.sums, SUMS])


def seal_version(
    plan: PublishPlan, sizes: dict[str, int], retry: Retrier, date_published: str | None = None
) -> SealedVersion:
    """Build the manifest, DCAT record and ``SHA256SUMS`` of the next version locally.

    Only the target's list of versions is read; nothing is written.

    Parameters
    ----------
    plan
        The publication plan.
    sizes
        Size in bytes of every planned file (from :func:`gate_files`).
    retry
        Retrier for listing the target's versions.
    date_published
        ISO date written in the manifest (default: today).
    """
    fs, path = cohort_path(plan.to, plan.cohort)
    state = cohort_state(fs, path, retry)
    number = (state.latest[0] if state.latest else 0) + 1
    payload = plan.payload_sums()
    all_sizes = {**sizes, **{name: len(data) for name, data in plan.tables.items()}}
    missing = sorted(set(payload) - set(all_sizes))
    if missing:
        raise OncoflowError(f"{missing[0]}: not read by the leak gate")
    manifest = build_manifest(
        plan.description,
        version=number,
        date_published=date_published or dt.date.today().isoformat(),
        files={name: (sha, all_sizes[name]) for name, sha in payload.items()},
        schemas=plan.schemas,
        digest=plan.digest,
        url=unstrip(fs, f"{path}/v{number}"),
    )
    manifest_data = manifest_bytes(manifest)
    previous = unstrip(fs, state.latest[1]) if state.latest else None
    metadata = {
        MANIFEST: manifest_data,
        **dcat_records(manifest, manifest_data, plan.catalogue, all_sizes, previous),
    }
    all_sums = {**payload, **{name: sha256_bytes(data) for name, data in metadata.items()}}
    objects = {**plan.tables, **metadata, SUMS: sha256sums(all_sums)}
    return SealedVersion(number=number, objects=objects, sums=all_sums)


def gate_sealed(
    store: SiteStore, sealed: SealedVersion, leak_gate: LeakGate = default_leak_gate
) -> list[str]:
    """Run the leak gate on a sealed version's in-memory objects (tables, manifest, sums)."""
    return list(leak_gate(store, sealed.objects.__getitem__, sorted(sealed.objects)))


def refuse(plan: PublishPlan, findings: list[str], retry: Retrier) -> OncoflowError:
    """Return the error of a failed gate, after removing any staging of this content.

    Nothing of this content was uploaded by this run; a staging prefix of the same content left
    by an earlier run is removed too, so the target holds nothing of it.
    """
    fs, path = cohort_path(plan.to, plan.cohort)
    retry("removing staging", remove_prefix, fs, f"{path}/{plan.staging_key}")
    return OncoflowError(
        f"leak gate found {len(findings)} residual identifier(s) in cohort {plan.cohort}; "
        f"nothing was published (first: {sorted(findings)[0]})"
    )


def finalize(plan: PublishPlan, sealed: SealedVersion, retry: Retrier) -> PublishResult:
    """Upload the sealed objects, verify the staged version and commit it.

    Call only after the leak gate passed on every object (:func:`gate_files`,
    :func:`gate_sealed`) and every series' files were staged with :func:`stage_files`.
    """
    fs, path = cohort_path(plan.to, plan.cohort)
    staging = f"{path}/{plan.staging_key}"
    for name, data in sorted(plan.tables.items()):
        retry(f"uploading {name}", put_bytes, fs, f"{staging}/{name}", data)
    payload = plan.payload_sums()
    problems, _ = check_objects(fs, staging, payload, retry, allowed_extra=(*METADATA, SUMS))
    if problems:
        raise OncoflowError(f"staged version failed verification: {problems[0]}")
    for name, data in sorted(sealed.objects.items()):
        if name in plan.tables:
            continue
        retry(f"uploading {name}", put_bytes, fs, f"{staging}/{name}", data)
        if sha256_of(fs, f"{staging}/{name}", retry) != sha256_bytes(data):
            raise OncoflowError(f"staged {name} failed verification")

    number = sealed.number
    vpath = f"{path}/v{number}"
    if read_marker(fs, vpath, retry) is not None:
        raise OncoflowError(f"{plan.cohort}/v{number} appeared during publishing: run again")
    names = sealed.names
    for name in names:
        retry(f"committing {name}", copy_object, fs, f"{staging}/{name}", f"{vpath}/{name}")
    copied = retry("listing the new version", list_objects, fs, vpath)
    staged_sizes = retry("listing staged objects", list_objects, fs, staging)
    for name in names:
        if copied.get(name) != staged_sizes.get(name):
            raise OncoflowError(f"v{number}/{name}: copy differs from the staged object")
    sums_data = sealed.objects[SUMS]
    marker = {
        "cohort": plan.cohort,
        "site": plan.site,
        "version": number,
        "content_hash": plan.digest,
        "manifest_sha256": sealed.sums[MANIFEST],
        "sha256sums": hashlib.sha256(sums_data).hexdigest(),
        "files": len(sealed.sums),
    }
    marker_data = json.dumps(marker, sort_keys=True).encode()
    _commit_marker(fs, vpath, marker_data, retry)
    try:
        retry("removing staging", remove_prefix, fs, staging)
    except OncoflowError:
        log.warning("staging of %s left behind; the next publish removes it", plan.cohort)
    return PublishResult(
        site=plan.site,
        cohort=plan.cohort,
        version=f"v{number}",
        url=unstrip(fs, vpath),
        content_hash=plan.digest,
        created=True,
        files=len(sealed.sums),
        retries=retry.retries,
        leak_gate="passed",
        release=plan.release,
    )


def dcat_records(
    manifest: dict[str, Any],
    manifest_data: bytes,
    catalogue: CatalogueSpec,
    sizes: dict[str, int],
    previous: str | None,
) -> dict[str, bytes]:
    """Return the HealthDCAT-AP record of a version as ``{dcat.ttl: ..., dcat.jsonld: ...}``."""
    from tasks.cohort.dcat import DCAT_JSONLD, DCAT_TTL, build_record, record_bytes

    graph = build_record(
        manifest,
        catalogue,
        version_url=str(manifest["url"]),
        previous_url=previous,
        sizes={**sizes, MANIFEST: len(manifest_data)},
        manifest_sha256=sha256_bytes(manifest_data),
    )
    ttl, jsonld = record_bytes(graph)
    return {DCAT_TTL: ttl, DCAT_JSONLD: jsonld}


def _commit_marker(fs: fsspec.AbstractFileSystem, vpath: str, data: bytes, retry: Retrier) -> None:
    """Create the marker exclusively; a marker of ours from a lost response counts as done."""
    try:
        retry("writing the commit marker", create_exclusive, fs, f"{vpath}/{MARKER}", data)
    except FileExistsError:
        fs.invalidate_cache(vpath)
        existing = retry("reading the commit marker", fs.cat_file, f"{vpath}/{MARKER}")
        if existing != data:
            raise OncoflowError(
                f"{vpath.rsplit('/', 1)[-1]} was committed by another run: run publish again"
            ) from None


def publish_cohort(
    store: SiteStore,
    spec: CohortSpec,
    to: str,
    *,
    policy: RetryPolicy | None = None,
    date_published: str | None = None,
    leak_gate: LeakGate = default_leak_gate,
) -> PublishResult:
    """Publish a cohort version in this process (plan, clean, stage, gate, commit).

    Parameters
    ----------
    store
        The site store.
    spec
        The cohort spec.
    to
        Publication root URL (``s3://bucket/prefix``, a folder, ...).
    policy
        Retry policy for transient storage errors.
    date_published
        ISO date written in the manifest (default: today).
    leak_gate
        Scanner of the staged objects (default: the de-identification leak gate).

    Returns
    -------
    PublishResult
        The version and what was done; ``created`` is False when nothing changed.
    """
    retry = Retrier(policy or RetryPolicy())
    plan = plan_publication(store, spec, to)
    done, cleaned = prepare_target(plan, retry)
    if done is not None:
        return done
    # The gate reads every object at the site; the target receives bytes only after it passed.
    files = [f for series in sorted(plan.files) for f in plan.files[series]]
    outcome = gate_files(store, files, leak_gate)
    sealed = seal_version(plan, outcome.sizes, retry, date_published)
    findings = outcome.findings + gate_sealed(store, sealed, leak_gate)
    if findings:
        raise refuse(plan, findings, retry)
    uploaded = reused = 0
    for series in sorted(plan.files):
        names, count = stage_files(store, plan, plan.files[series], retry)
        uploaded += len(names)
        reused += count
    result = finalize(plan, sealed, retry)
    result.uploaded, result.reused, result.cleaned = uploaded, reused, cleaned
    return result

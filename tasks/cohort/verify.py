"""Verify a published cohort version: the commit marker, the manifest and every checksum.

A version ``<TO>/<cohort>/v<N>/`` is *visible* only when its commit marker ``COMMITTED`` is
present; the marker is written last and names the SHA-256 of ``SHA256SUMS`` and of
``manifest.json``, so a verified marker vouches for every object listed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec

from tasks.cohort.manifest import parse_sha256sums
from tasks.cohort.storage import Retrier, RetryPolicy, list_objects
from tasks.errors import OncoflowError
from tasks.store import open_url, unstrip

MARKER = "COMMITTED"
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
#: Metadata objects of a version (listed in ``SHA256SUMS``, not in the manifest's distribution).
METADATA = (MANIFEST, "dcat.ttl", "dcat.jsonld")
VERSION_DIR = re.compile(r"^v([1-9][0-9]{0,8})$")
STAGING = ".staging"


@dataclass
class VerifyReport:
    """Outcome of verifying one or more versions (problems in the order found)."""

    url: str
    versions: list[str] = field(default_factory=list)
    objects: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {
            "url": self.url,
            "ok": self.ok,
            "versions": self.versions,
            "objects": self.objects,
            "problems": self.problems,
        }


def sha256_of(fs: fsspec.AbstractFileSystem, path: str, retry: Retrier) -> str:
    """SHA-256 of one object, streamed in 8 MiB blocks."""

    def _hash() -> str:
        h = hashlib.sha256()
        with fs.open(path, "rb", block_size=8 * 2**20, cache_type="none") as fh:
            while chunk := fh.read(8 * 2**20):
                h.update(chunk)
        return h.hexdigest()

    return retry(f"reading {path.rsplit('/', 1)[-1]}", _hash)


def check_objects(
    fs: fsspec.AbstractFileSystem,
    prefix: str,
    expected: dict[str, str],
    retry: Retrier,
    *,
    allowed_extra: tuple[str, ...] = (),
) -> tuple[list[str], int]:
    """Compare the objects under ``prefix`` with ``{name: sha256}``.

    Returns
    -------
    tuple
        Problems (one line each; missing, unexpected and mismatching objects, in name order)
        and the number of objects hashed.
    """
    listed = retry("listing objects", list_objects, fs, prefix)
    problems = []
    hashed = 0
    for name in sorted(set(expected) | set(listed)):
        if name in allowed_extra:
            continue
        if name not in listed:
            problems.append(f"{name}: missing")
        elif name not in expected:
            problems.append(f"{name}: not listed in {SUMS}")
        else:
            hashed += 1
            if sha256_of(fs, f"{prefix}/{name}", retry) != expected[name]:
                problems.append(f"{name}: checksum mismatch")
    return problems, hashed


def read_marker(
    fs: fsspec.AbstractFileSystem, version_path: str, retry: Retrier
) -> dict[str, Any] | None:
    """Return the parsed commit marker of a version, or None when absent or unreadable."""
    path = f"{version_path}/{MARKER}"
    fs.invalidate_cache(version_path)
    try:
        data = retry("reading the commit marker", fs.cat_file, path)
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(data)
    except ValueError:
        return None
    return marker if isinstance(marker, dict) else None


def verify_version(
    fs: fsspec.AbstractFileSystem, version_path: str, retry: Retrier
) -> tuple[list[str], int]:
    """Verify one version directory; return its problems (first one first) and objects hashed."""
    marker = read_marker(fs, version_path, retry)
    if marker is None:
        return [f"{MARKER}: missing or unreadable (version not committed)"], 0
    for key in ("content_hash", "sha256sums", "manifest_sha256", "version"):
        if key not in marker:
            return [f"{MARKER}: lacks {key}"], 0
    try:
        sums_bytes = retry(f"reading {SUMS}", fs.cat_file, f"{version_path}/{SUMS}")
    except FileNotFoundError:
        return [f"{SUMS}: missing"], 0
    if hashlib.sha256(sums_bytes).hexdigest() != marker["sha256sums"]:
        return [f"{SUMS}: does not match the commit marker"], 0
    try:
        expected = parse_sha256sums(sums_bytes)
    except ValueError as exc:
        return [str(exc)], 0
    if expected.get(MANIFEST) != marker["manifest_sha256"]:
        return [f"{MANIFEST}: checksum differs from the commit marker"], 0
    problems, hashed = check_objects(
        fs, version_path, expected, retry, allowed_extra=(MARKER, SUMS)
    )
    if problems:
        return problems, hashed
    try:
        manifest = json.loads(
            retry("reading the manifest", fs.cat_file, f"{version_path}/{MANIFEST}")
        )
    except ValueError:
        return [f"{MANIFEST}: not valid JSON"], hashed
    problems = manifest_problems(manifest, expected, marker)
    name = version_path.rstrip("/").rsplit("/", 1)[-1]
    match = VERSION_DIR.match(name)
    if match and str(marker["version"]) != match.group(1):
        problems.append(f"{MARKER}: version {marker['version']} does not match {name}")
    return problems, hashed


def manifest_problems(
    manifest: dict[str, Any], sums: dict[str, str], marker: dict[str, Any]
) -> list[str]:
    """Structural checks of a manifest against ``SHA256SUMS`` and the marker."""
    problems = []
    if manifest.get("@type") != "sc:Dataset" or "croissant" not in str(
        manifest.get("conformsTo", "")
    ):
        problems.append(f"{MANIFEST}: not a Croissant dataset")
    if manifest.get("contentHash") != marker["content_hash"]:
        problems.append(f"{MANIFEST}: content hash differs from the commit marker")
    if manifest.get("version") != f"{marker['version']}.0.0":
        problems.append(f"{MANIFEST}: version differs from the commit marker")
    listed = {
        d.get("contentUrl"): d.get("sha256")
        for d in manifest.get("distribution", [])
        if isinstance(d, dict)
    }
    payload = {k: v for k, v in sums.items() if k not in METADATA}
    for name in sorted(set(listed) | set(payload)):
        if listed.get(name) != payload.get(name):
            problems.append(f"{MANIFEST}: distribution entry {name} disagrees with {SUMS}")
            break
    return problems


def version_dirs(fs: fsspec.AbstractFileSystem, cohort_path: str) -> list[tuple[int, str]]:
    """Return ``(number, path)`` of every ``v<N>`` directory under a cohort, sorted by number."""
    fs.invalidate_cache(cohort_path)
    try:
        entries = fs.ls(cohort_path, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = VERSION_DIR.match(name)
        if match:
            out.append((int(match.group(1)), entry.rstrip("/")))
    return sorted(out)


def verify_url(url: str, policy: RetryPolicy | None = None) -> VerifyReport:
    """Verify a version URL, or every committed version under a cohort URL.

    Parameters
    ----------
    url
        ``<TO>/<cohort>/v<N>`` (one version) or ``<TO>/<cohort>`` (all committed versions).
    policy
        Retry policy for transient storage errors.

    Returns
    -------
    VerifyReport
        Problems found, first one first (empty when everything checks out).
    """
    fs, path = open_url(url)
    retry = Retrier(policy or RetryPolicy())
    report = VerifyReport(url=url)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    fs.invalidate_cache(path)
    targets: list[str]
    if VERSION_DIR.match(name) or retry("checking the URL", fs.exists, f"{path}/{MARKER}"):
        targets = [path]
    else:
        versions = version_dirs(fs, path)
        targets = [p for _, p in versions if read_marker(fs, p, retry) is not None]
        if not targets:
            if not retry("checking the URL", fs.exists, path):
                raise OncoflowError(f"nothing at {unstrip(fs, path)}")
            report.problems.append("no committed version found")
            return report
    for target in targets:
        label = target.rsplit("/", 1)[-1]
        report.versions.append(label)
        problems, hashed = verify_version(fs, target, retry)
        report.objects += hashed
        report.problems.extend(f"{label}/{p}" for p in problems)
    return report

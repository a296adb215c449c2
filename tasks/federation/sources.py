"""Find and read the published cohort versions a hub federates (manifests, ComBat summaries).

A source URL may name one version (``<TO>/<cohort>/v3``), a cohort (its latest committed
version is used) or a whole publication root (the latest committed version of every cohort
under it). Only committed versions are read, and every object read is checked against the
checksums the commit marker vouches for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import fsspec

from tasks.cohort.publish import COMBAT_SUMMARY
from tasks.cohort.storage import Retrier
from tasks.cohort.verify import MANIFEST, MARKER, read_marker, version_dirs
from tasks.errors import OncoflowError
from tasks.store import open_url, unstrip


@dataclass
class PublishedVersion:
    """One committed cohort version, as the hub sees it."""

    url: str
    manifest: dict[str, Any]
    combat_summary: dict[str, Any] | None


def _latest(fs: fsspec.AbstractFileSystem, cohort: str, retry: Retrier) -> str | None:
    for _, path in reversed(retry("listing versions", version_dirs, fs, cohort)):
        if read_marker(fs, path, retry) is not None:
            return path
    return None


def version_paths(url: str, retry: Retrier) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Resolve a source URL to the paths of the committed versions to read."""
    fs, path = open_url(url)
    fs.invalidate_cache(path)
    if retry("checking the URL", fs.exists, f"{path}/{MARKER}"):
        return fs, [path]
    latest = _latest(fs, path, retry)
    if latest is not None:
        return fs, [latest]
    found = []
    try:
        children = retry("listing cohorts", fs.ls, path, detail=True)
    except FileNotFoundError:
        children = []
    for child in sorted(c["name"].rstrip("/") for c in children if c["type"] == "directory"):
        latest = _latest(fs, child, retry)
        if latest is not None:
            found.append(latest)
    if not found:
        raise OncoflowError(f"no committed cohort version at {url}")
    return fs, found


def read_checked(fs: fsspec.AbstractFileSystem, path: str, sha256: str, retry: Retrier) -> bytes:
    """Read an object and check it against its SHA-256 (one-line error when it differs)."""
    data = retry(f"reading {path.rsplit('/', 1)[-1]}", fs.cat_file, path)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise OncoflowError(f"{unstrip(fs, path)} does not match its checksum: run verify")
    return data


def read_version(fs: fsspec.AbstractFileSystem, path: str, retry: Retrier) -> PublishedVersion:
    """Read a committed version's manifest (and ComBat summary, if published), checked."""
    marker = read_marker(fs, path, retry)
    if marker is None or "manifest_sha256" not in marker:
        raise OncoflowError(f"{unstrip(fs, path)} is not a committed version")
    manifest = json.loads(read_checked(fs, f"{path}/{MANIFEST}", marker["manifest_sha256"], retry))
    summary = None
    for entry in manifest.get("distribution", []):
        if entry.get("contentUrl") == COMBAT_SUMMARY:
            data = read_checked(fs, f"{path}/{COMBAT_SUMMARY}", entry.get("sha256", ""), retry)
            summary = json.loads(data)
    return PublishedVersion(url=unstrip(fs, path), manifest=manifest, combat_summary=summary)

"""Provenance as data: steps, parameters, input hashes, package versions and content keys.

The content key makes re-runs on unchanged input write nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

#: Format of ``provenance.json``.
SCHEMA = "oncoflow/harmonise-provenance/1"
#: Packages whose versions can change the output.
PACKAGES = ("oncoflow", "SimpleITK", "pydicom", "highdicom", "numpy", "pillow")


@dataclass(frozen=True)
class Step:
    """One processing step.

    Parameters
    ----------
    name
        What was done (``read-series``, ``intensity``, ``rtstruct-mask``, ...).
    parameters
        The settings and measurements needed to replay and check it (JSON-serialisable).
    inputs
        Store keys of the inputs and their SHA-256.
    """

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Return the installed versions of :data:`PACKAGES`."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not-installed"
    return versions


@lru_cache(maxsize=1)
def code_version() -> str:
    """Return ``<oncoflow version>+<hash of the harmonisation sources>``.

    Any change to the code under ``tasks/harmonise`` changes the version, and so the content
    key of every output.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"{package_versions()['oncoflow']}+{digest.hexdigest()[:12]}"


def content_key(inputs: dict[str, str], config_hash: str, version: str) -> str:
    """Return the SHA-256 identifying an output: input hashes, settings and code version.

    Parameters
    ----------
    inputs
        Store key → SHA-256 of every input file.
    config_hash
        Hash of the harmonisation settings.
    version
        Code version (:func:`code_version`).
    """
    doc = {"inputs": dict(sorted(inputs.items())), "config": config_hash, "code": version}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def provenance_json(
    *,
    series: str,
    key: str,
    config: dict[str, Any],
    config_hash: str,
    steps: list[Step],
    outputs: dict[str, Any],
) -> bytes:
    """Serialise the provenance document (deterministic: sorted keys, no timestamps).

    Parameters
    ----------
    series
        Pseudonymous series key.
    key
        Content key (:func:`content_key`).
    config
        The settings as JSON data.
    config_hash
        Their hash.
    steps
        The steps in the order they ran.
    outputs
        Output name → {"key", "sha256", ...}.
    """
    doc = {
        "schema": SCHEMA,
        "series": series,
        "key": key,
        "code_version": code_version(),
        "packages": package_versions(),
        "config": config,
        "config_hash": config_hash,
        "steps": [asdict(s) for s in steps],
        "outputs": outputs,
    }
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()

"""The manifest of a published cohort version: Croissant 1.0 JSON-LD with DCAT-AP fields.

DCAT-AP properties are carried by their schema.org equivalents that Croissant uses (W3C
schema.org/DCAT mapping): ``name`` (dct:title), ``description`` (dct:description),
``publisher`` (dct:publisher: the publishing site), ``license`` (dct:license),
``temporalCoverage`` plus an explicit ``dct:temporal`` period, ``keywords`` (dcat:keyword),
``version`` (dcat:version) and ``datePublished`` (dct:issued). Every file is a ``FileObject``
with its SHA-256. Counts by modality, body part and ROI, and the content hash, are JSON
literals under ``urn:oncoflow:`` terms.

Everything here is built from pseudonymous keys, coded values and counts: no identifier.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from tasks.cohort.spec import CohortSpec
from tasks.radiomics.ibsi import field_description
from tasks.research.methods import manifest_methods

CROISSANT = "http://mlcommons.org/croissant/1.0"

#: The Croissant 1.0 context, plus DCAT and the oncoflow terms.
CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "dcat": "http://www.w3.org/ns/dcat#",
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
    "counts": {"@id": "urn:oncoflow:counts", "@type": "@json"},
    "methods": {"@id": "urn:oncoflow:methods", "@type": "@json"},
    "contentHash": "urn:oncoflow:contentHash",
    "site": "urn:oncoflow:site",
    "cohort": "urn:oncoflow:cohort",
}

ENCODING = {
    ".parquet": "application/x-parquet",
    ".nii.gz": "application/gzip",
    ".dcm": "application/dicom",
    ".json": "application/json",
    ".html": "text/html",
}


def encoding_of(name: str) -> str:
    """MIME type of a published object, from its name."""
    for suffix, mime in ENCODING.items():
        if name.endswith(suffix):
            return mime
    return "application/octet-stream"


def _data_type(arrow_type: pa.DataType) -> tuple[str, bool]:
    repeated = pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
    base = arrow_type.value_type if repeated else arrow_type
    if pa.types.is_integer(base):
        return "sc:Integer", repeated
    if pa.types.is_floating(base):
        return "sc:Float", repeated
    if pa.types.is_boolean(base):
        return "sc:Boolean", repeated
    return "sc:Text", repeated


def record_set(name: str, file_id: str, schema: pa.Schema, description: str) -> dict[str, Any]:
    """Describe a published Parquet table as a Croissant RecordSet (one field per column)."""
    fields = []
    for col in schema:
        dtype, repeated = _data_type(col.type)
        entry: dict[str, Any] = {
            "@type": "cr:Field",
            "@id": f"{name}/{col.name}",
            "name": col.name,
            "dataType": dtype,
            "source": {"fileObject": {"@id": file_id}, "extract": {"column": col.name}},
        }
        if repeated:
            entry["repeated"] = True
        described = field_description(col)
        if described:
            entry["description"] = described
        fields.append(entry)
    return {
        "@type": "cr:RecordSet",
        "@id": name,
        "name": name,
        "description": description,
        "field": fields,
    }


def cohort_counts(series: pa.Table, features: pa.Table | None) -> dict[str, Any]:
    """Count series and patients, overall and by modality, body part and ROI."""
    rows = series.select(["patient", "modality", "body_part", "rois"]).to_pylist()

    def by(key: str) -> dict[str, dict[str, int]]:
        n_series: Counter[str] = Counter()
        patients: dict[str, set[str]] = {}
        for row in rows:
            values = row[key] if key == "rois" else [row[key]]
            for value in sorted(set(values or [])):
                label = value or "UNKNOWN"
                n_series[label] += 1
                patients.setdefault(label, set()).add(row["patient"])
        return {
            "series": dict(sorted(n_series.items())),
            "patients": {k: len(v) for k, v in sorted(patients.items())},
        }

    return {
        "series": len(rows),
        "patients": len({r["patient"] for r in rows}),
        "feature_rows": features.num_rows if features is not None else 0,
        "by_modality": by("modality"),
        "by_body_part": by("body_part"),
        "by_roi": by("rois"),
    }


def temporal_coverage(series: pa.Table) -> tuple[str, str] | None:
    """First and last year of the (shifted) acquisition dates, or None when unknown."""
    years = sorted(
        d[:4] for d in series.column("acquisition_date").to_pylist() if d and d[:4].isdigit()
    )
    return (years[0], years[-1]) if years else None


def describe(
    spec: CohortSpec,
    site: str,
    series: pa.Table,
    features: pa.Table | None,
    features_metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Return the version-independent description of a cohort (part of its content hash).

    With a feature table, ``methods`` holds its parameters (as written and effective),
    versions, units and the harmonisation steps of the published series.
    """
    coverage = temporal_coverage(series)
    methods = manifest_methods(features_metadata or {}, series, features)
    return {
        **({"methods": methods} if methods else {}),
        "cohort": spec.name,
        "title": spec.title,
        "description": spec.description,
        "licence": spec.licence_url,
        "keywords": sorted(set(spec.keywords)),
        "site": site,
        "temporal": list(coverage) if coverage else None,
        "counts": cohort_counts(series, features),
    }


def content_hash(description: Mapping[str, Any], files: Mapping[str, str]) -> str:
    """Hash of what a version contains: its description and every payload file's SHA-256."""
    doc = {"description": description, "files": dict(sorted(files.items()))}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_manifest(
    description: Mapping[str, Any],
    *,
    version: int,
    date_published: str,
    files: Mapping[str, tuple[str, int]],
    schemas: Mapping[str, pa.Schema],
    digest: str,
    url: str | None = None,
) -> dict[str, Any]:
    """Build the Croissant JSON-LD manifest of one version.

    Parameters
    ----------
    description
        Output of :func:`describe`.
    version
        Version number (directory ``v<version>``, Croissant version ``<version>.0.0``).
    date_published
        ISO date of publication.
    files
        ``{name: (sha256, size)}`` of every payload object.
    schemas
        Arrow schemas of the published tables, by object name (``series.parquet``, ...).
    digest
        Content hash (see :func:`content_hash`).
    url
        Public URL of the version, when known.

    Returns
    -------
    dict
        The JSON-LD document.
    """
    site = description["site"]
    distribution = []
    for name, (sha, size) in sorted(files.items()):
        distribution.append(
            {
                "@type": "cr:FileObject",
                "@id": name,
                "name": name,
                "contentUrl": name,
                "contentSize": f"{size} B",
                "encodingFormat": encoding_of(name),
                "sha256": sha,
            }
        )
    record_sets = []
    if "series.parquet" in schemas:
        record_sets.append(
            record_set(
                "series",
                "series.parquet",
                schemas["series.parquet"],
                "One row per published image series (pseudonymous keys).",
            )
        )
    if "features.parquet" in schemas:
        record_sets.append(
            record_set(
                "features",
                "features.parquet",
                schemas["features.parquet"],
                "One row per (series, ROI): pyradiomics features.",
            )
        )
    publisher = {"@type": "sc:Organization", "name": site}
    doc: dict[str, Any] = {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": CROISSANT,
        "name": description["title"],
        "alternateName": description["cohort"],
        "description": description["description"],
        "license": description["licence"],
        "keywords": description["keywords"],
        "version": f"{version}.0.0",
        "datePublished": date_published,
        "publisher": publisher,
        "creator": publisher,
        "citeAs": f"{description['title']} ({site}), version {version}",
        "isAccessibleForFree": True,
        "site": site,
        "cohort": description["cohort"],
        "contentHash": digest,
        "counts": description["counts"],
        **({"methods": description["methods"]} if description.get("methods") else {}),
        "distribution": distribution,
        "recordSet": record_sets,
    }
    if url:
        doc["url"] = url
    if description.get("temporal"):
        first, last = description["temporal"]
        doc["temporalCoverage"] = f"{first}/{last}"
        doc["dct:temporal"] = {
            "@type": "dct:PeriodOfTime",
            "dcat:startDate": f"{first}-01-01",
            "dcat:endDate": f"{last}-12-31",
        }
    return doc


def manifest_bytes(doc: Mapping[str, Any]) -> bytes:
    """Serialise a manifest deterministically."""
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def sha256sums(files: Mapping[str, str]) -> bytes:
    """Render ``SHA256SUMS`` (``sha256sum -c`` format) for ``{name: sha256}``."""
    return "".join(f"{sha}  {name}\n" for name, sha in sorted(files.items())).encode()


def parse_sha256sums(data: bytes) -> dict[str, str]:
    """Parse ``SHA256SUMS``; raise ``ValueError`` naming the first bad line."""
    out: dict[str, str] = {}
    for i, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        sha, sep, name = line.partition("  ")
        if not sep or len(sha) != 64 or not name or name in out:
            raise ValueError(f"SHA256SUMS line {i} is malformed")
        out[name.lstrip("*")] = sha
    return out

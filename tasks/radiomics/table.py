"""The features table ``features/<params-hash>.parquet`` (contract in ``docs/tables.md``).

One row per (series, ROI): key columns, ``status``/``reason``/``detail``, the pyradiomics
feature columns with their names unchanged (float64, null for rows without features), then
``prov_*`` columns. The Parquet metadata records the canonical parameters, their hash and the
package versions. Rows are sorted by (series, roi) and columns follow pyradiomics' order, so the
same inputs and parameters give byte-identical files whatever the number of workers. The table
is a folder of parts written by :mod:`tasks.radiomics.table_writer` (only what changed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import pyarrow as pa

from tasks.radiomics.cache import PYRADIOMICS_VERSION
from tasks.radiomics.extract import RoiUnit
from tasks.radiomics.ibsi import annotate_table
from tasks.radiomics.params import RadiomicsParams, canonical_json
from tasks.store import FEATURES, SiteStore

KEY_COLUMNS = ("site", "patient", "study", "series", "modality", "roi", "params_hash")
STATUS_COLUMNS = ("status", "reason", "detail")
PROV_COLUMNS = ("prov_image_sha256", "prov_mask_sha256", "prov_pyradiomics_version")
#: Columns every row has whatever its status (the rest are feature columns).
FIXED_COLUMNS = (*KEY_COLUMNS, *STATUS_COLUMNS, *PROV_COLUMNS)
VERSIONED_PACKAGES = ("pyradiomics", "SimpleITK", "numpy", "PyWavelets", "scipy")


def features_key(params_hash: str) -> str:
    """Store key of the features table for a parameter hash."""
    return f"{FEATURES}/{params_hash}.parquet"


def recorded_metadata(store: SiteStore, params: RadiomicsParams) -> dict[bytes, bytes]:
    """Return the metadata of the features table of ``params`` if written with this pyradiomics.

    The metadata records the canonical parameters and the package versions; empty when there is
    no such table, or it records other parameters or another pyradiomics version.
    """
    schema = store.table_schema(features_key(params.params_hash()))
    metadata = dict(schema.metadata or {}) if schema is not None else {}
    versions = json.loads(metadata.get(b"oncoflow.versions", b"{}"))
    same = (
        metadata.get(b"oncoflow.params") == params.canonical_json().encode()
        and versions.get("pyradiomics") == PYRADIOMICS_VERSION
    )
    return metadata if same else {}


def written_with(store: SiteStore, params: RadiomicsParams) -> bool:
    """Tell whether the features table of ``params`` was written with them and this pyradiomics.

    The run that wrote it had validated these parameters with pyradiomics' own schema, so a
    rerun need not import pyradiomics to check them again (see :func:`recorded_metadata`).
    """
    return bool(recorded_metadata(store, params))


@dataclass(frozen=True)
class FeatureRow:
    """One row of the features table.

    Parameters
    ----------
    unit
        The (series, ROI).
    status, reason, detail
        Outcome of the unit.
    features
        Feature values in pyradiomics order (empty unless ``status`` is ``ok``).
    """

    unit: RoiUnit
    status: str
    reason: str = ""
    detail: str = ""
    features: dict[str, float] = field(default_factory=dict)


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine feature values."""
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = ""
    out["pyradiomics"] = PYRADIOMICS_VERSION
    return out


def build_features_table(
    site: str, rows: list[FeatureRow], params: RadiomicsParams
) -> tuple[pa.Table, dict[str, str]]:
    """Build the features table and its Parquet metadata.

    Parameters
    ----------
    site
        Site code (``site`` column).
    rows
        One row per (series, ROI), in any order.
    params
        The validated parameters (hash column and metadata).

    Returns
    -------
    tuple
        The table (rows sorted by series then ROI) and the metadata to store with it.
    """
    params_hash = params.params_hash()
    ordered = sorted(rows, key=lambda r: (r.unit.series, r.unit.roi))
    names: dict[str, None] = {}
    for row in ordered:
        for name in row.features:
            names.setdefault(name, None)
    columns: dict[str, pa.Array] = {
        "site": pa.array([site] * len(ordered), pa.string()),
        "patient": pa.array([r.unit.patient for r in ordered], pa.string()),
        "study": pa.array([r.unit.study for r in ordered], pa.string()),
        "series": pa.array([r.unit.series for r in ordered], pa.string()),
        "modality": pa.array([r.unit.modality for r in ordered], pa.string()),
        "roi": pa.array([r.unit.roi for r in ordered], pa.string()),
        "params_hash": pa.array([params_hash] * len(ordered), pa.string()),
        "status": pa.array([r.status for r in ordered], pa.string()),
        "reason": pa.array([r.reason for r in ordered], pa.string()),
        "detail": pa.array([r.detail for r in ordered], pa.string()),
    }
    for name in names:
        columns[name] = pa.array([r.features.get(name) for r in ordered], pa.float64())
    columns["prov_image_sha256"] = pa.array([r.unit.image_sha256 for r in ordered], pa.string())
    columns["prov_mask_sha256"] = pa.array([r.unit.mask_sha256 for r in ordered], pa.string())
    columns["prov_pyradiomics_version"] = pa.array(
        [PYRADIOMICS_VERSION] * len(ordered), pa.string()
    )
    return annotate_table(pa.table(columns), params), table_metadata(params)


def table_metadata(params: RadiomicsParams) -> dict[str, str]:
    """Return the Parquet metadata of a features table of ``params`` (no row needed)."""
    return {
        "oncoflow.table": "features",
        "oncoflow.params_hash": params.params_hash(),
        "oncoflow.params": params.canonical_json(),
        "oncoflow.versions": canonical_json(package_versions()),
    }

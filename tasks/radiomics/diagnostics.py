"""pyradiomics' diagnostics per (series, ROI): cached next to the features, a side table.

Every ``execute`` returns ``diagnostics_*`` values besides the features: the image and mask
geometry before and after resampling (spacing, size), the mask's bounding box, voxel and
connected-volume counts, centre of mass, the image's mean, minimum and maximum, and hashes of
the pixel data. The extraction keeps the ``Image-*`` and ``Mask-*`` groups (the ``Versions``
and ``Configuration`` groups repeat the table's metadata) in the cache at::

    features/_cache/pyradiomics-<version>/<image-sha256>/<mask-sha256>/diagnostics-<hash>.json

(``hash``: the global settings, which alone decide them) and the extract stage writes them as
``features/<params-hash>.diagnostics.parquet`` (a folder of parts, written with the features
table by :mod:`tasks.radiomics.table_writer`): one row per ``ok`` (series, ROI), keys
``series`` and ``roi``, then one column per diagnostic with pyradiomics' name (tuples as lists).
ROIs whose parts were all cached before diagnostics were kept have null diagnostics until their
cache is cleared.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.radiomics.cache import CACHE_PREFIX, NEUTRAL_SETTINGS, PYRADIOMICS_VERSION
from tasks.radiomics.params import RadiomicsParams, hash_json
from tasks.store import FEATURES, SiteStore

#: Diagnostic groups kept per ROI.
KEPT_PREFIXES = ("diagnostics_Image-", "diagnostics_Mask-")


def diagnostics_table_key(params_hash: str) -> str:
    """Store key of the diagnostics side table of a features table."""
    return f"{FEATURES}/{params_hash}.diagnostics.parquet"


def diagnostics_key(image_sha256: str, mask_sha256: str, params: RadiomicsParams) -> str:
    """Cache key of one (image, mask) pair's diagnostics under ``params``' global settings."""
    setting = {k: v for k, v in params.canonical()["setting"].items() if k not in NEUTRAL_SETTINGS}
    digest = hash_json({"pyradiomics": PYRADIOMICS_VERSION, "part": "diagnostics", **setting})
    return f"{CACHE_PREFIX}/{image_sha256}/{mask_sha256}/diagnostics-{digest}.json"


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def kept_diagnostics(result: Mapping[str, Any]) -> dict[str, Any]:
    """Return the per-ROI diagnostics of a pyradiomics result as JSON-compatible values."""
    return {k: _plain(v) for k, v in result.items() if k.startswith(KEPT_PREFIXES)}


def write_diagnostics(
    store: SiteStore,
    image_sha256: str,
    mask_sha256: str,
    params: RadiomicsParams,
    diagnostics: Mapping[str, Any],
) -> bool:
    """Cache one pair's diagnostics (nothing is written when they are empty or unchanged)."""
    if not diagnostics:
        return False
    body = json.dumps(dict(diagnostics), separators=(",", ":"), allow_nan=True).encode()
    return store.write_bytes(diagnostics_key(image_sha256, mask_sha256, params), body)


def diagnostics_table(
    store: SiteStore, rows: Sequence[tuple[str, str, str, str]], params: RadiomicsParams
) -> pa.Table:
    """Build the diagnostics side table.

    Parameters
    ----------
    store
        The site store holding the cache.
    rows
        ``(series, roi, image_sha256, mask_sha256)`` of the ``ok`` rows of the features table.
    params
        The parameters of the features table.

    Returns
    -------
    pa.Table
        Sorted by (series, roi); diagnostics columns in pyradiomics' order, null where missing.
    """
    ordered = sorted(rows)
    keys = {diagnostics_key(i, m, params): (s, r) for s, r, i, m in ordered}
    got = store.read_many(keys)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    names: dict[str, None] = {}
    for key, data in sorted(got.items(), key=lambda kv: keys[kv[0]]):
        found[keys[key]] = json.loads(data)
        names.update(dict.fromkeys(found[keys[key]]))
    columns: dict[str, Any] = {
        "series": pa.array([s for s, _, _, _ in ordered], pa.string()),
        "roi": pa.array([r for _, r, _, _ in ordered], pa.string()),
    }
    for name in names:
        values = [found.get((s, r), {}).get(name) for s, r, _, _ in ordered]
        columns[name] = pa.array(values)
    return pa.table(columns)


def ok_pairs(rows: Sequence[Any]) -> list[tuple[str, str, str, str]]:
    """``(series, roi, image_sha256, mask_sha256)`` of the ``ok`` :class:`FeatureRow` s."""
    return [
        (r.unit.series, r.unit.roi, r.unit.image_sha256, r.unit.mask_sha256)
        for r in rows
        if r.status == "ok"
    ]


def compute_diagnostics(image: Any, mask: Any, params: RadiomicsParams) -> dict[str, Any]:
    """Run pyradiomics' ``execute`` without image types or features: its diagnostics only.

    ``execute`` loads the image and mask with the global settings (normalisation, resampling,
    mask correction, bounding box) before any feature, so the diagnostics equal those of a full
    extraction at a fraction of its cost.
    """
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    extractor = RadiomicsFeatureExtractor(params.canonical())
    extractor.enabledImagetypes = {}
    extractor.enabledFeatures = {}
    extractor.settings["additionalInfo"] = True
    return kept_diagnostics(extractor.execute(image, mask))

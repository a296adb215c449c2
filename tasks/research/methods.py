"""Provenance fit for a methods section: effective settings, versions, harmonisation steps.

The features table's Parquet metadata carries, besides the user's own parameter keys
(``oncoflow.params``):

* ``oncoflow.effective_settings`` — every setting pyradiomics applied, the user's values over
  pyradiomics 3.0.1's defaults, per enabled image type, and the enabled features by class;
* ``oncoflow.versions`` — pyradiomics and the libraries that determine feature values;
* ``oncoflow.harmonisation`` — the harmonisation settings and, per series, the steps applied
  (names and parameters, no input paths);
* ``oncoflow.units`` — intensity unit per modality (``HU``, ``SUVbw``, ``MR-none``, ...).

:func:`methods_text` turns them into a paragraph a researcher can paste. The table is a folder
of parts; its metadata is in the folder's ``_common_metadata`` (the parts carry all but the
harmonisation and units entries). Read them with::

    import json, pyarrow.parquet as pq
    schema = pq.read_schema(f"{path}/_common_metadata")
    meta = {k.decode(): json.loads(v) for k, v in schema.metadata.items()
            if k.startswith(b"oncoflow.") and v[:1] in b"{["}
"""

from __future__ import annotations

import json
import platform
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from tasks.radiomics.params import RadiomicsParams, canonical_json
from tasks.store import HARMONISED, HARMONISED_SERIES, SiteStore

#: Defaults pyradiomics 3.0.1 applies when a setting is absent (``kwargs.get(key, default)``
#: in its feature classes and ``imageoperations``; ``RadiomicsFeatureExtractor`` defaults).
PYRADIOMICS_DEFAULTS: dict[str, Any] = {
    "minimumROIDimensions": 2,
    "minimumROISize": None,
    "geometryTolerance": None,
    "correctMask": False,
    "label": 1,
    "label_channel": 0,
    "binWidth": 25,
    "binCount": None,
    "normalize": False,
    "normalizeScale": 1,
    "removeOutliers": None,
    "resampledPixelSpacing": None,
    "interpolator": "sitkBSpline",
    "padDistance": 5,
    "preCrop": False,
    "distances": [1],
    "force2D": False,
    "force2Ddimension": 0,
    "resegmentRange": None,
    "resegmentMode": "absolute",
    "resegmentShape": False,
    "voxelArrayShift": 0,
    "symmetricalGLCM": True,
    "weightingNorm": None,
    "gldm_a": 0,
}
#: Defaults of the image-type (filter) settings, applied only when that image type is enabled.
FILTER_DEFAULTS: dict[str, dict[str, Any]] = {
    "LoG": {"sigma": []},
    "Wavelet": {"wavelet": "coif1", "start_level": 0, "level": 1},
    "Gradient": {"gradientUseSpacing": True},
    "LBP2D": {"lbp2DRadius": 1, "lbp2DSamples": 8, "lbp2DMethod": "uniform"},
    "LBP3D": {"lbp3DLevels": 2, "lbp3DIcosphereRadius": 1, "lbp3DIcosphereSubdivision": 1},
}
#: Step parameters that are free text or repeat the settings (never copied into the metadata).
DROPPED_STEP_KEYS = frozenset({"ignored_rois", "roi_map"})


def effective_settings(params: RadiomicsParams) -> dict[str, Any]:
    """Return every setting pyradiomics applies: user values over pyradiomics' defaults.

    Parameters
    ----------
    params
        The validated parameters.

    Returns
    -------
    dict
        ``setting`` (global), ``imageType`` (each enabled type with its effective settings,
        filter defaults included), ``featureClass`` (class -> feature names enabled; every
        non-deprecated feature of the class when the file lists none) and ``voxelSetting``.
    """
    from radiomics import getFeatureClasses

    canonical = params.canonical()
    base = {**PYRADIOMICS_DEFAULTS, **canonical["setting"]}
    if "binCount" in canonical["setting"]:
        base["binWidth"] = None  # pyradiomics uses binCount then
    image_types = {}
    for name, overrides in canonical["imageType"].items():
        own = {**FILTER_DEFAULTS.get(name, {}), **base, **overrides}
        image_types[name] = {k: own[k] for k in sorted(own)}
    classes = getFeatureClasses()
    features = {}
    for name, listed in canonical["featureClass"].items():
        feature_class = classes[name]
        every = [
            f for f, deprecated in sorted(feature_class.getFeatureNames().items()) if not deprecated
        ]
        features[name] = list(listed) or every
    return {
        "setting": {k: base[k] for k in sorted(base)},
        "imageType": image_types,
        "featureClass": features,
        "voxelSetting": canonical["voxelSetting"],
    }


def versions() -> dict[str, str]:
    """Versions of pyradiomics, the libraries that determine feature values, oncoflow, Python."""
    from importlib.metadata import PackageNotFoundError, version

    from tasks.radiomics.table import package_versions  # imports pyradiomics: only when needed

    out = dict(package_versions())
    try:
        out["oncoflow"] = version("oncoflow")
    except PackageNotFoundError:
        out["oncoflow"] = ""
    out["python"] = platform.python_version()
    return dict(sorted(out.items()))


def _clean_step(step: Mapping[str, Any]) -> dict[str, Any]:
    parameters = {
        k: v for k, v in (step.get("parameters") or {}).items() if k not in DROPPED_STEP_KEYS
    }
    return {"name": str(step.get("name", "")), "parameters": parameters}


def harmonisation_record(store: SiteStore, series: Iterable[str]) -> dict[str, Any]:
    """Return the harmonisation settings and, per series, the steps applied.

    Parameters
    ----------
    store
        The site store (``harmonised/series.parquet`` metadata, ``provenance.json`` files).
    series
        Pseudonymous series keys.

    Returns
    -------
    dict
        ``config`` (the harmonisation settings), ``code`` (code versions used) and ``series``
        (key -> list of ``{name, parameters}``); input paths and hashes are left out.
    """
    table = store.read_table(HARMONISED_SERIES)
    raw = (table.schema.metadata or {}).get(b"oncoflow.harmonise.config") if table else None
    config = json.loads(raw) if raw else {}
    keys = sorted(set(series))
    paths = {f"{HARMONISED}/{s}/provenance.json": s for s in keys}
    got = store.read_many(paths)
    steps: dict[str, list[dict[str, Any]]] = {}
    code: set[str] = set()
    for path, key in paths.items():
        if path not in got:
            continue
        doc = json.loads(got[path])
        steps[key] = [_clean_step(s) for s in doc.get("steps", [])]
        if doc.get("code_version"):
            code.add(str(doc["code_version"]))
    return {"config": config, "code": sorted(code), "series": steps}


def intensity_units(harmonised: pa.Table | None, series: Iterable[str]) -> dict[str, list[str]]:
    """Return the harmonised intensity labels per modality of the given series."""
    if harmonised is None or "intensity" not in harmonised.column_names:
        return {}
    wanted = set(series)
    units: dict[str, set[str]] = defaultdict(set)
    for row in harmonised.select(["series", "modality", "intensity"]).to_pylist():
        if row["series"] in wanted and row["intensity"]:
            units[row["modality"] or "?"].add(row["intensity"])
    return {m: sorted(v) for m, v in sorted(units.items())}


def methods_metadata(
    store: SiteStore,
    params: RadiomicsParams,
    series: Iterable[str],
    effective_json: str | None = None,
) -> dict[str, str]:
    """Return the methods-section metadata entries of a features table (JSON values).

    Parameters
    ----------
    store
        The site store.
    params
        The parameters the table was extracted with.
    series
        The series with a row in the table.
    effective_json
        The ``oncoflow.effective_settings`` entry when already known (a features table of these
        parameters written with this pyradiomics records it); else computed, which imports
        pyradiomics.
    """
    keys = sorted(set(series))
    return {
        "oncoflow.effective_settings": effective_json or canonical_json(effective_settings(params)),
        "oncoflow.versions": canonical_json(versions()),
        "oncoflow.harmonisation": canonical_json(harmonisation_record(store, keys)),
        "oncoflow.units": canonical_json(
            intensity_units(store.read_table(HARMONISED_SERIES), keys)
        ),
    }


def read_methods(metadata: Mapping[bytes | str, bytes | str] | None) -> dict[str, Any]:
    """Decode the ``oncoflow.*`` JSON entries of a Parquet schema's metadata.

    Parameters
    ----------
    metadata
        ``pyarrow.parquet.read_schema(path).metadata`` (or an already decoded mapping).
    """
    out: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        name = key.decode() if isinstance(key, bytes) else key
        text = value.decode() if isinstance(value, bytes) else value
        if not name.startswith("oncoflow."):
            continue
        try:
            out[name.removeprefix("oncoflow.")] = json.loads(text)
        except ValueError:
            out[name.removeprefix("oncoflow.")] = text
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _step_sentence(steps_by_series: Mapping[str, list[dict[str, Any]]], config: dict) -> str:
    names = Counter(
        name for steps in steps_by_series.values() for name in {s["name"] for s in steps}
    )
    n = len(steps_by_series)
    parts = []
    if config.get("target_spacing"):
        spacing = " x ".join(_fmt(v) for v in config["target_spacing"])
        parts.append(
            f"resampled to {spacing} mm ({config.get('image_interpolator')} interpolation for "
            f"images, {config.get('mask_interpolator')} for masks)"
        )
    else:
        parts.append("kept at their native voxel spacing (no resampling)")
    if config.get("ct_clip"):
        parts.append(
            f"CT clipped to [{_fmt(config['ct_clip'][0])}, {_fmt(config['ct_clip'][1])}] HU"
        )
    if config.get("mr_n4"):
        parts.append("MR corrected for bias field (N4)")
    if config.get("mr_normalisation") == "zscore":
        parts.append("MR z-score normalised within a body mask")
    counted = ", ".join(f"{name} ({count} of {n} series)" for name, count in sorted(names.items()))
    return "; ".join(parts) + (f". Steps recorded per series: {counted}" if counted else "")


def methods_text(meta: Mapping[str, Any], table: pa.Table | None = None) -> str:
    """Return a paragraph describing how the features were computed (for a methods section).

    Parameters
    ----------
    meta
        :func:`read_methods` output of a features table.
    table
        The features table (row counts by status), optional.
    """
    versions_ = meta.get("versions") or {}
    eff = meta.get("effective_settings") or {}
    setting = eff.get("setting") or {}
    lines = []
    libs = ", ".join(
        f"{k} {v}"
        for k, v in sorted(versions_.items())
        if k not in ("pyradiomics", "oncoflow") and v
    )
    lines.append(
        f"Radiomic features were extracted with PyRadiomics {versions_.get('pyradiomics', '?')} "
        f"({libs}) through oncoflow {versions_.get('oncoflow', '?')}."
    )
    harm = meta.get("harmonisation") or {}
    if harm:
        lines.append(
            "Before extraction, images were converted to NIfTI volumes and "
            + _step_sentence(harm.get("series") or {}, harm.get("config") or {})
            + "."
        )
    units = meta.get("units") or {}
    if units:
        lines.append(
            "Intensities: " + "; ".join(f"{m} in {', '.join(u)}" for m, u in units.items()) + "."
        )
    if setting:
        discretisation = (
            f"a fixed bin count of {_fmt(setting['binCount'])}"
            if setting.get("binCount")
            else f"a fixed bin width of {_fmt(setting.get('binWidth'))}"
        )
        resampling = (
            f"resampled to {_fmt(setting['resampledPixelSpacing'])} mm with "
            f"{setting.get('interpolator')}"
            if setting.get("resampledPixelSpacing")
            else "not resampled by PyRadiomics"
        )
        normalisation = (
            f"on (scale {_fmt(setting.get('normalizeScale'))})"
            if setting.get("normalize")
            else "off"
        )
        lines.append(
            f"Grey levels were discretised with {discretisation}; images were {resampling}; "
            f"texture distances {_fmt(setting.get('distances'))}, symmetrical GLCM "
            f"{setting.get('symmetricalGLCM')}, voxel array shift "
            f"{_fmt(setting.get('voxelArrayShift'))}, normalisation {normalisation}, "
            f"re-segmentation range {_fmt(setting.get('resegmentRange'))}, minimum ROI size "
            f"{_fmt(setting.get('minimumROISize') or 'none')} (voxels), minimum ROI dimensions "
            f"{_fmt(setting.get('minimumROIDimensions'))}."
        )
    image_types = eff.get("imageType") or {}
    if image_types:
        described = []
        for name, values in image_types.items():
            if name == "LoG":
                described.append(f"LoG (sigma {_fmt(values.get('sigma'))} mm)")
            elif name == "Wavelet":
                described.append(
                    f"Wavelet ({values.get('wavelet')}, level {_fmt(values.get('level'))})"
                )
            else:
                described.append(name)
        classes = eff.get("featureClass") or {}
        counts = ", ".join(f"{c} ({len(f)})" for c, f in classes.items())
        lines.append(f"Image types: {', '.join(described)}. Feature classes: {counts}.")
    if table is not None and "status" in table.column_names:
        status = Counter(table.column("status").to_pylist())
        from tasks.radiomics.ibsi import FEATURE_COLUMN

        feature_columns = [c for c in table.column_names if FEATURE_COLUMN.match(c)]
        lines.append(
            f"The table holds {table.num_rows} (series, ROI) rows: "
            + ", ".join(f"{v} {k}" for k, v in sorted(status.items()))
            + f"; {len(feature_columns)} feature columns."
        )
    lines.append(f"Parameter hash: {meta.get('params_hash', '?')}.")
    return "\n".join(lines)


def restrict_to_series(metadata: Mapping[str, str], series: Iterable[str]) -> dict[str, str]:
    """Return the metadata with the per-series harmonisation steps of ``series`` only.

    A published table names only the series it publishes.
    """
    out = dict(metadata)
    raw = out.get("oncoflow.harmonisation")
    if raw:
        record = json.loads(raw)
        wanted = set(series)
        record["series"] = {k: v for k, v in record.get("series", {}).items() if k in wanted}
        out["oncoflow.harmonisation"] = canonical_json(record)
    return out


def feature_units(columns: Iterable[str]) -> dict[str, str]:
    """Return the unit token of each pyradiomics feature (``<class>_<feature>``), where known.

    Tokens come from the reviewed IBSI table: ``mm3``, ``mm2``, ``mm``, ``/mm``, ``1``
    (dimensionless), ``I`` (the image's intensity unit, see ``intensity``), ``I2``, ``I2.mm3``.
    """
    from tasks.radiomics.ibsi import FEATURE_COLUMN, load_table

    table = load_table()
    units: dict[str, str] = {}
    for column in columns:
        match = FEATURE_COLUMN.match(column)
        if match is None:
            continue
        entry = table.features.get((match["cls"], match["feature"]))
        if entry is not None and entry.unit:
            units[f"{match['cls']}_{match['feature']}"] = entry.unit
    return dict(sorted(units.items()))


def manifest_methods(
    metadata: Mapping[str, str], series: pa.Table, features: pa.Table | None
) -> dict[str, Any] | None:
    """Return the manifest's ``methods`` block: parameters, versions, units, harmonisation.

    Parameters
    ----------
    metadata
        The published features table's metadata (``oncoflow.*`` keys).
    series
        The published series table (intensity labels per modality).
    features
        The published features table (its feature columns), or None.

    Returns
    -------
    dict or None
        None when the cohort publishes no features.
    """
    if features is None:
        return None
    meta = read_methods(metadata)
    published = series.column("series").to_pylist() if "series" in series.column_names else []
    harmonisation = meta.get("harmonisation") or {}
    per_series = {
        k: v for k, v in (harmonisation.get("series") or {}).items() if k in set(published)
    }
    return {
        "paramsHash": meta.get("params_hash"),
        "parameters": meta.get("params"),
        "effectiveSettings": meta.get("effective_settings"),
        "versions": meta.get("versions"),
        "units": {
            "intensity": intensity_units(series, published),
            "features": feature_units(features.column_names),
            "tokens": "I: the image intensity unit of the modality (see intensity; filtered "
            "image types change its scale); 1: dimensionless",
        },
        "harmonisation": {
            "config": harmonisation.get("config"),
            "code": harmonisation.get("code"),
            "series": per_series,
        },
        "text": methods_text(meta, features),
    }

"""Feature robustness: perturbed replicas (MIRP's scheme) and negative controls (READII's).

For each (series, ROI) the features are computed on

replicas (image perturbations of Zwanenburg et al., "Assessing robustness of radiomic features
by image perturbation", Sci Rep 9:614, 2019, as implemented in MIRP)
    ``original``; ``erode`` / ``dilate``: the mask shrunk / grown by one voxel (MIRP's volume
    adaptation); ``shift-1`` / ``shift-2``: image and mask moved by 1/3 and 2/3 of a voxel on
    every axis (MIRP's sub-voxel translation: the image interpolated linearly, the mask
    interpolated linearly and kept where >= 0.5); ``noise``: Gaussian noise added to the image
    with the standard deviation of the image's own noise, estimated as in MIRP from the finest
    wavelet sub-band (median absolute coefficient / 0.6745, Chang et al. 2000);

negative controls (Kazmierski et al., READII, ``readii.negative_controls``)
    ``shuffled``: the voxel intensities permuted within the ROI (READII's shuffled control,
    region ROI), which keeps every first-order feature and destroys texture (its image is
    cropped to the ROI grown by 20 mm before filtering: :func:`around_roi`); ``random-roi``:
    the ROI moved to a random place in non-tumour tissue (inside the image, not touching the
    ROI grown by one voxel, at least 90 % of its voxels above the 25th percentile of the image
    smoothed over two voxels).

readii (1.39) and mirp (2.7) are not used as libraries: readii requires ``pyradiomics-bhklab``,
which installs a second ``radiomics`` package over the pinned pyradiomics 3.0.1, and mirp
computes its own features (its perturbations are not exposed for pyradiomics images) and would
add ITK and pandas. The schemes above are written with SimpleITK and numpy.

Every variant goes through the content-addressed cache of :mod:`tasks.radiomics.cache`: the
``original`` replica has the extract stage's keys (nothing is computed again), the others are
keyed by a hash of their voxels and geometry, so a rerun computes nothing. The ROIs of one
image are assessed together (:func:`robustness_image`): the shifted and noisy images do not
depend on the mask, so they are made and filtered once for all of them, and every image is
filtered once for all the masks that use it. Seeds are derived from pseudonymous keys (the
series for the noise, the unit for the controls): the same inputs give the same table.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import SimpleITK as sitk

from tasks.radiomics.cache import object_key, plan_parts, read_parts
from tasks.radiomics.extract import (
    InputError,
    RoiUnit,
    features_for_masks,
    read_image,
    result_parts,
    write_missing_parts,
)
from tasks.radiomics.ibsi import FEATURE_COLUMN, describe_column
from tasks.radiomics.params import RadiomicsParams
from tasks.records import Status, UnitResult
from tasks.store import FEATURES, SiteStore

REPLICAS = ("original", "erode", "dilate", "shift-1", "shift-2", "noise")
CONTROLS = ("shuffled", "random-roi")
VARIANTS = REPLICAS + CONTROLS
DEFAULT_ICC_THRESHOLD = 0.75
#: Fraction of a voxel the two translated replicas move on every axis.
SHIFTS = {"shift-1": 1.0 / 3.0, "shift-2": 2.0 / 3.0}
RANDOM_ROI_ATTEMPTS = 500
TISSUE_PERCENTILE = 25.0
TISSUE_FRACTION = 0.9
#: Margin around the ROI of the shuffled control's cropped image (filter support: LoG up to
#: sigma 5 mm, coif1 wavelets), in millimetres.
CONTROL_MARGIN_MM = 20.0


def robustness_key(params_hash: str) -> str:
    """Store key of the robustness table of a parameter hash."""
    return f"{FEATURES}/{params_hash}.robustness.parquet"


def robustness_metadata(params_hash: str, icc_threshold: float) -> dict[str, str]:
    """Return the robustness table's metadata: parameters, threshold, replicas, controls."""
    return {
        "oncoflow.table": "robustness",
        "oncoflow.params_hash": params_hash,
        "oncoflow.icc_threshold": str(icc_threshold),
        "oncoflow.replicas": ",".join(REPLICAS),
        "oncoflow.controls": ",".join(CONTROLS),
    }


def seed_for(unit_key: str, variant: str) -> int:
    """Return a seed derived from the pseudonymous unit key and the variant."""
    return int.from_bytes(hashlib.sha256(f"{unit_key}/{variant}".encode()).digest()[:8], "big")


def voxel_hash(image: sitk.Image) -> str:
    """SHA-256 of an image's voxels, pixel type and geometry (the cache key of a variant)."""
    digest = hashlib.sha256()
    digest.update(image.GetPixelIDTypeAsString().encode())
    for values in (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()):
        digest.update(np.asarray(values, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return digest.hexdigest()


def noise_sd(image: sitk.Image) -> float:
    """Estimate the image noise as MIRP does: median |finest diagonal wavelet band| / 0.6745."""
    import pywt

    array = sitk.GetArrayFromImage(image).astype(np.float64)
    band = pywt.dwtn(array, "coif1")["d" * array.ndim]
    return float(np.median(np.abs(band)) / 0.6745)


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(reference)
    return out


def _translate(image: sitk.Image, fraction: float, interpolator: int) -> sitk.Image:
    offset = [fraction * s for s in image.GetSpacing()]
    transform = sitk.TranslationTransform(image.GetDimension(), offset)
    return sitk.Resample(image, image, transform, interpolator, 0.0, sitk.sitkFloat32)


def translated_image(image: sitk.Image, fraction: float) -> sitk.Image:
    """Move an image by ``fraction`` of a voxel on every axis (linear interpolation)."""
    return _translate(sitk.Cast(image, sitk.sitkFloat32), fraction, sitk.sitkLinear)


def translated_mask(mask: sitk.Image, fraction: float) -> sitk.Image:
    """Move a mask by ``fraction`` of a voxel on every axis (linear, kept where >= 0.5)."""
    soft = _translate(sitk.Cast(mask > 0, sitk.sitkFloat32), fraction, sitk.sitkLinear)
    return sitk.Cast(soft >= 0.5, sitk.sitkUInt8)


def translated(
    image: sitk.Image, mask: sitk.Image, fraction: float
) -> tuple[sitk.Image, sitk.Image]:
    """Move image and mask by ``fraction`` of a voxel on every axis (MIRP's translation)."""
    return translated_image(image, fraction), translated_mask(mask, fraction)


def shuffled_roi(image: sitk.Image, mask: sitk.Image, seed: int) -> sitk.Image:
    """Permute the intensities of the voxels inside the ROI (READII's shuffled ROI control)."""
    array = sitk.GetArrayFromImage(image)
    inside = sitk.GetArrayViewFromImage(mask) > 0
    values = array[inside]
    np.random.default_rng(seed).shuffle(values)
    array[inside] = values
    return _like(array, image)


def around_roi(
    image: sitk.Image, mask: sitk.Image, margin_mm: float = CONTROL_MARGIN_MM
) -> tuple[sitk.Image, sitk.Image]:
    """Crop image and mask to the ROI's bounding box grown by ``margin_mm`` on every side.

    The shuffled control changes the image inside the ROI only, so filtering the whole image
    again for it would mostly recompute what lies far from the ROI; its image is cropped
    first (physical geometry kept), the way pyradiomics' ``preCrop`` does. Filtered values
    near the crop's border differ slightly from a whole-image filter: for a control, not a
    replica. The crop is the whole image when the ROI is empty or the margin reaches every edge.
    """
    array = sitk.GetArrayViewFromImage(mask) > 0
    if not array.any():
        return image, mask
    coords = np.argwhere(array)
    size = np.array(image.GetSize())
    margin = np.ceil(margin_mm / np.array(image.GetSpacing())).astype(int)
    low = np.maximum(coords.min(axis=0)[::-1] - margin, 0)  # numpy (z, y, x) -> ITK (x, y, z)
    high = np.minimum(coords.max(axis=0)[::-1] + margin + 1, size)
    index, extent = [int(v) for v in low], [int(v) for v in high - low]
    if extent == list(size):
        return image, mask
    return (
        sitk.RegionOfInterest(image, extent, index),
        sitk.RegionOfInterest(mask, extent, index),
    )


def random_roi(image: sitk.Image, mask: sitk.Image, seed: int) -> sitk.Image | None:
    """Move the ROI to random non-tumour tissue (READII's idea of a ROI-free control).

    Returns None when no place fits (the control is then missing for this ROI).
    """
    roi = sitk.GetArrayViewFromImage(mask) > 0
    if not roi.any():
        return None
    # tissue: above the 25th percentile of the image smoothed over two voxels (noise ignored)
    sigma = 2.0 * max(image.GetSpacing())
    smooth = sitk.GetArrayFromImage(
        sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma)
    )
    tissue = smooth > np.percentile(smooth, TISSUE_PERCENTILE)
    grown = (
        sitk.GetArrayViewFromImage(sitk.BinaryDilate(sitk.Cast(mask > 0, sitk.sitkUInt8), [1] * 3))
        > 0
    )
    coords = np.argwhere(roi)
    low, high = coords.min(axis=0), coords.max(axis=0)
    shape = np.array(roi.shape)
    rng = np.random.default_rng(seed)
    for _ in range(RANDOM_ROI_ATTEMPTS):
        shift = np.array(
            [rng.integers(-lo, n - hi) for lo, hi, n in zip(low, high, shape, strict=True)]
        )
        moved = coords + shift
        idx = tuple(moved.T)
        if grown[idx].any() or tissue[idx].mean() < TISSUE_FRACTION:
            continue
        out = np.zeros(roi.shape, dtype=np.uint8)
        out[idx] = 1
        return _like(out, mask)
    return None


def make_variant(
    name: str,
    image: sitk.Image,
    mask: sitk.Image,
    unit_key: str,
    shared: dict[str, sitk.Image] | None = None,
    image_key: str = "",
) -> tuple[sitk.Image, sitk.Image] | None:
    """Return the (image, mask) of one replica or control (None when it cannot be made).

    Parameters
    ----------
    name
        The variant (:data:`VARIANTS`).
    image, mask
        The harmonised image and ROI mask.
    unit_key
        Pseudonymous key of the (series, ROI): seeds the shuffled and moved-ROI controls.
    shared
        The mask-independent images (sub-voxel shifts, noise) already made from ``image`` for
        another of its ROIs: they are reused, so every ROI of an image gets the same ones and
        their filters are computed once. Updated.
    image_key
        Pseudonymous key of the image (its series): seeds the noise (default ``unit_key``).
    """
    shared = {} if shared is None else shared
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    if name == "original":
        return image, mask
    if name == "erode":
        return image, sitk.BinaryErode(binary, [1] * image.GetDimension())
    if name == "dilate":
        return image, sitk.BinaryDilate(binary, [1] * image.GetDimension())
    if name in SHIFTS:
        if name not in shared:
            shared[name] = translated_image(image, SHIFTS[name])
        return shared[name], translated_mask(binary, SHIFTS[name])
    if name == "noise":
        if name not in shared:
            rng = np.random.default_rng(seed_for(image_key or unit_key, name))
            array = sitk.GetArrayFromImage(image).astype(np.float32)
            array += rng.normal(0.0, noise_sd(image), size=array.shape).astype(np.float32)
            shared[name] = _like(array, image)
        return shared[name], mask
    if name == "shuffled":
        return around_roi(shuffled_roi(image, binary, seed_for(unit_key, name)), mask)
    if name == "random-roi":
        moved = random_roi(image, binary, seed_for(unit_key, name))
        return None if moved is None else (image, moved)
    raise ValueError(f"unknown variant {name!r}")


@dataclass(frozen=True)
class RobustnessOutcome:
    """What one robustness task returns: cache keys per variant, never feature arrays.

    Parameters
    ----------
    key
        ``<series>/<roi>``.
    status
        ``ok`` (the original replica has features), ``quarantined`` or ``failed``.
    variants
        Cache keys of each variant's parts (variants that could not be made are absent).
    missing
        Variant -> reason for variants without features.
    detail
        Short explanation when not ok.
    computed
        Variants computed now (the others came from the cache).
    error_class
        Exception class name when failed.
    """

    key: str
    status: Status
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    detail: str = ""
    computed: int = 0
    error_class: str = ""

    def unit_result(self) -> UnitResult:
        """Return the outcome as the shared :class:`~tasks.records.UnitResult`."""
        return UnitResult(
            key=self.key,
            status=self.status,
            reason=self.detail if self.status == Status.QUARANTINED else "",
            error_class=self.error_class,
            detail=self.detail,
            computed=self.computed > 0,
        )

    def outcome_row(self) -> dict[str, str]:
        """Return the row the run page shows for a ROI not fully assessed (no identifier)."""
        missing = ", ".join(f"{v}: {r}" for v, r in sorted(self.missing.items()))
        return {
            "roi": self.key,
            "status": str(self.status),
            "detail": self.detail,
            "variants missing": missing,
        }


def robustness_unit(
    store: SiteStore, unit: RoiUnit, params: RadiomicsParams, variants: Sequence[str] = VARIANTS
) -> RobustnessOutcome:
    """Compute (or find in the cache) the features of every variant of one (series, ROI).

    See :func:`robustness_image`, of which this is the one-ROI case.
    """
    return robustness_image(store, [unit], params, variants)[0]


def robustness_image(
    store: SiteStore,
    units: list[RoiUnit],
    params: RadiomicsParams,
    variants: Sequence[str] = VARIANTS,
) -> list[RobustnessOutcome]:
    """Compute (or find in the cache) the features of every variant of ROIs of one image.

    The image is read once; its mask-independent variants (sub-voxel shifts, noise) are made
    once for all its ROIs, and every variant image is filtered once for all the masks that use
    it (the original image for ``original``, ``erode``, ``dilate`` and ``random-roi`` of every
    ROI; each shifted or noisy image for all the ROIs).

    Parameters
    ----------
    store
        The site store (harmonised inputs and the cache).
    units
        ROIs of one image (same ``image`` key and hash).
    params
        Validated pyradiomics parameters.
    variants
        Replicas and controls to compute.

    Returns
    -------
    list of RobustnessOutcome
        One per unit, in the order given: cache keys per variant; ``quarantined`` when the
        original ROI has no features, ``failed`` when an input is missing or altered.

    Raises
    ------
    ValueError
        When the units do not share one image.
    """
    if len({(u.image, u.image_sha256) for u in units}) > 1:
        raise ValueError("robustness_image takes ROIs of one image")
    image, masks, failed = _read(store, units)
    if image is None:
        return [failed[u.key] for u in units]
    parts = plan_parts(params)
    shared: dict[str, sitk.Image] = {}
    hashes: dict[int, str] = {id(image): units[0].image_sha256}
    made: dict[tuple[str, str], tuple[sitk.Image, sitk.Image]] = {}
    keys: dict[tuple[str, str], tuple[str, ...]] = {}
    missing: dict[str, dict[str, str]] = {u.key: {} for u in units}
    for unit in units:
        if unit.key in failed:
            continue
        mask = masks[unit.key]
        for name in variants:
            pair = make_variant(name, image, mask, unit.key, shared, unit.series)
            if pair is None:
                missing[unit.key][name] = "no-room"
                continue
            made[unit.key, name] = pair
            # the unperturbed image and mask keep their file hashes: extract's cache keys
            if id(pair[0]) not in hashes:
                hashes[id(pair[0])] = voxel_hash(pair[0])
            mask_hash = unit.mask_sha256 if pair[1] is mask else voxel_hash(pair[1])
            keys[unit.key, name] = tuple(
                object_key(hashes[id(pair[0])], mask_hash, p) for p in parts
            )
    cached = read_parts(store, [k for ks in keys.values() for k in ks])
    todo = [v for v in keys if any(k not in cached for k in keys[v])]
    groups: dict[int, list[tuple[str, str]]] = {}
    for variant in todo:
        groups.setdefault(id(made[variant][0]), []).append(variant)
    for group in groups.values():
        group_masks = {f"{u}|{n}": made[u, n][1] for u, n in group}
        results = features_for_masks(made[group[0]][0], group_masks, params, parts)
        for unit_key, name in group:
            fresh = result_parts(results[f"{unit_key}|{name}"], parts)
            write_missing_parts(store, parts, keys[unit_key, name], fresh, cached)
    return [failed.get(u.key) or _outcome(u.key, keys, cached, missing[u.key], todo) for u in units]


def _read(
    store: SiteStore, units: list[RoiUnit]
) -> tuple[sitk.Image | None, dict[str, sitk.Image], dict[str, RobustnessOutcome]]:
    """Read the image and the masks of ``units``; a missing or altered input fails its units."""
    import tempfile
    from pathlib import Path

    masks: dict[str, sitk.Image] = {}
    failed: dict[str, RobustnessOutcome] = {}
    with tempfile.TemporaryDirectory(prefix="oncoflow-robustness-") as tmp:
        try:
            image = read_image(store, units[0].image, units[0].image_sha256, Path(tmp) / "i")
        except InputError as exc:
            return None, {}, {u.key: _failed(u.key, exc) for u in units}
        for i, unit in enumerate(units):
            try:
                masks[unit.key] = read_image(
                    store, unit.mask, unit.mask_sha256, Path(tmp) / f"m{i}"
                )
            except InputError as exc:
                failed[unit.key] = _failed(unit.key, exc)
    return image, masks, failed


def _failed(key: str, exc: Exception) -> RobustnessOutcome:
    return RobustnessOutcome(key, Status.FAILED, detail=str(exc), error_class=type(exc).__name__)


def _outcome(
    unit_key: str,
    keys: dict[tuple[str, str], tuple[str, ...]],
    cached: dict[str, Any],
    missing: dict[str, str],
    todo: list[tuple[str, str]],
) -> RobustnessOutcome:
    """Return the outcome of one ROI from the cached parts of its variants."""
    mine = {n: ks for (u, n), ks in keys.items() if u == unit_key}
    for name, ks in mine.items():
        bad = next((cached[k] for k in ks if not cached[k].ok), None)
        if bad is not None:
            missing[name] = bad.reason
    if "original" in missing:
        return RobustnessOutcome(
            unit_key, Status.QUARANTINED, missing=missing, detail=missing["original"]
        )
    ok = {n: ks for n, ks in mine.items() if n not in missing}
    computed = sum(1 for u, _ in todo if u == unit_key)
    return RobustnessOutcome(unit_key, Status.OK, ok, missing, computed=computed)


def icc_3_1(values: np.ndarray) -> float:
    """ICC(3,1) (two-way mixed, consistency, single measurement; Shrout and Fleiss 1979).

    Parameters
    ----------
    values
        Subjects (ROIs) by raters (replicas); rows with a missing value are dropped.

    Returns
    -------
    float
        ``(MSR - MSE) / (MSR + (k - 1) MSE)``; NaN with fewer than two subjects or raters, or
        when every value is the same.
    """
    y = np.asarray(values, dtype=np.float64)
    y = y[np.isfinite(y).all(axis=1)] if y.ndim == 2 else y
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2:
        return math.nan
    n, k = y.shape
    grand = y.mean()
    rows = y.mean(axis=1, keepdims=True)
    cols = y.mean(axis=0, keepdims=True)
    msr = k * ((rows - grand) ** 2).sum() / (n - 1)
    mse = ((y - rows - cols + grand) ** 2).sum() / ((n - 1) * (k - 1))
    denominator = msr + (k - 1) * mse
    if denominator <= 0 or not math.isfinite(denominator):
        return math.nan
    return float((msr - mse) / denominator)


def correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation over the pairs where both values are finite (NaN if undefined)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


ROBUSTNESS_SCHEMA = pa.schema(
    [
        ("feature", pa.string()),
        ("ibsi", pa.string()),
        ("icc", pa.float64()),
        ("stable", pa.bool_()),
        ("corr_shuffled", pa.float64()),
        ("corr_random_roi", pa.float64()),
        ("n_rois", pa.int64()),
    ]
)


def robustness_table(
    values: dict[str, dict[str, dict[str, float]]],
    threshold: float = DEFAULT_ICC_THRESHOLD,
    replicas: Sequence[str] = REPLICAS,
) -> pa.Table:
    """Build the robustness table from feature values of every unit and variant.

    Parameters
    ----------
    values
        unit key -> variant -> feature -> value (units without the original replica ignored).
    threshold
        ``stable`` is ``icc >= threshold``.
    replicas
        Variants entering the ICC.

    Returns
    -------
    pyarrow.Table
        One row per feature (pyradiomics order): ``feature``, ``ibsi``, ``icc``, ``stable``,
        ``corr_shuffled``, ``corr_random_roi`` (Pearson across ROIs between the original and the
        control), ``n_rois`` (ROIs with every replica).
    """
    units = sorted(u for u in values if "original" in values[u])
    features: dict[str, None] = {}
    for unit in units:
        for name in values[unit]["original"]:
            if FEATURE_COLUMN.match(name):
                features.setdefault(name, None)
    rows = []
    for feature in features:
        matrix = np.array(
            [[values[u].get(r, {}).get(feature, math.nan) for r in replicas] for u in units],
            dtype=np.float64,
        ).reshape(len(units), len(replicas))
        icc = icc_3_1(matrix)
        original = [values[u]["original"].get(feature, math.nan) for u in units]
        controls = {
            c: correlation(original, [values[u].get(c, {}).get(feature, math.nan) for u in units])
            for c in CONTROLS
        }
        described = describe_column(feature)
        rows.append(
            {
                "feature": feature,
                "ibsi": described.ibsi if described else "",
                "icc": icc,
                "stable": bool(math.isfinite(icc) and icc >= threshold),
                "corr_shuffled": controls["shuffled"],
                "corr_random_roi": controls["random-roi"],
                "n_rois": int(np.isfinite(matrix).all(axis=1).sum()),
            }
        )
    return pa.Table.from_pylist(rows, schema=ROBUSTNESS_SCHEMA)

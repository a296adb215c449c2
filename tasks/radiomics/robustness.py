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
    region ROI), which keeps every first-order feature and destroys texture; ``random-roi``:
    the ROI moved to a random place in non-tumour tissue (inside the image, not touching the
    ROI grown by one voxel, at least 90 % of its voxels above the 25th percentile of the image
    smoothed over two voxels).

readii (1.39) and mirp (2.7) are not used as libraries: readii requires ``pyradiomics-bhklab``,
which installs a second ``radiomics`` package over the pinned pyradiomics 3.0.1, and mirp
computes its own features (its perturbations are not exposed for pyradiomics images) and would
add ITK and pandas. The schemes above are written with SimpleITK and numpy.

Every variant goes through the content-addressed cache of :mod:`tasks.radiomics.cache`: the
``original`` replica has the extract stage's keys (nothing is computed again), the others are
keyed by a hash of their voxels and geometry, so a rerun computes nothing. Seeds are derived
from the pseudonymous unit key: the same inputs give the same table.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

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


def translated(
    image: sitk.Image, mask: sitk.Image, fraction: float
) -> tuple[sitk.Image, sitk.Image]:
    """Move image and mask by ``fraction`` of a voxel on every axis (MIRP's translation)."""
    moved = _translate(sitk.Cast(image, sitk.sitkFloat32), fraction, sitk.sitkLinear)
    soft = _translate(sitk.Cast(mask > 0, sitk.sitkFloat32), fraction, sitk.sitkLinear)
    return moved, sitk.Cast(soft >= 0.5, sitk.sitkUInt8)


def shuffled_roi(image: sitk.Image, mask: sitk.Image, seed: int) -> sitk.Image:
    """Permute the intensities of the voxels inside the ROI (READII's shuffled ROI control)."""
    array = sitk.GetArrayFromImage(image)
    inside = sitk.GetArrayViewFromImage(mask) > 0
    values = array[inside]
    np.random.default_rng(seed).shuffle(values)
    array[inside] = values
    return _like(array, image)


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
    name: str, image: sitk.Image, mask: sitk.Image, unit_key: str
) -> tuple[sitk.Image, sitk.Image] | None:
    """Return the (image, mask) of one replica or control (None when it cannot be made)."""
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    if name == "original":
        return image, mask
    if name == "erode":
        return image, sitk.BinaryErode(binary, [1] * image.GetDimension())
    if name == "dilate":
        return image, sitk.BinaryDilate(binary, [1] * image.GetDimension())
    if name in SHIFTS:
        return translated(image, binary, SHIFTS[name])
    if name == "noise":
        rng = np.random.default_rng(seed_for(unit_key, name))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        array += rng.normal(0.0, noise_sd(image), size=array.shape).astype(np.float32)
        return _like(array, image), mask
    if name == "shuffled":
        return shuffled_roi(image, binary, seed_for(unit_key, name)), mask
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


def _read(store: SiteStore, unit: RoiUnit) -> tuple[sitk.Image, sitk.Image]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="oncoflow-robustness-") as tmp:
        image = read_image(store, unit.image, unit.image_sha256, Path(tmp) / "i")
        return image, read_image(store, unit.mask, unit.mask_sha256, Path(tmp) / "m")


def robustness_unit(
    store: SiteStore, unit: RoiUnit, params: RadiomicsParams, variants: Sequence[str] = VARIANTS
) -> RobustnessOutcome:
    """Compute (or find in the cache) the features of every variant of one (series, ROI).

    Parameters
    ----------
    store
        The site store (harmonised inputs and the cache).
    unit
        The (series, ROI).
    params
        Validated pyradiomics parameters.
    variants
        Replicas and controls to compute.

    Returns
    -------
    RobustnessOutcome
        Cache keys per variant; ``quarantined`` when the original ROI has no features.
    """
    parts = plan_parts(params)
    try:
        image, mask = _read(store, unit)
    except InputError as exc:
        return RobustnessOutcome(
            unit.key, Status.FAILED, detail=str(exc), error_class=type(exc).__name__
        )
    made: dict[str, tuple[sitk.Image, sitk.Image]] = {}
    keys: dict[str, tuple[str, ...]] = {}
    hashes: dict[str, str] = {}
    missing: dict[str, str] = {}
    for name in variants:
        pair = make_variant(name, image, mask, unit.key)
        if pair is None:
            missing[name] = "no-room"
            continue
        made[name] = pair
        # the unperturbed image and mask keep their file hashes: the extract stage's cache keys
        image_hash = unit.image_sha256 if pair[0] is image else voxel_hash(pair[0])
        mask_hash = unit.mask_sha256 if pair[1] is mask else voxel_hash(pair[1])
        keys[name] = tuple(object_key(image_hash, mask_hash, p) for p in parts)
        hashes[name] = image_hash
    cached = read_parts(store, [k for ks in keys.values() for k in ks])
    todo = [n for n in keys if any(k not in cached for k in keys[n])]
    # variants sharing an image are filtered once (original, erode, dilate, random-roi)
    groups: dict[str, list[str]] = {}
    for name in todo:
        groups.setdefault(hashes[name], []).append(name)
    for names in groups.values():
        group_image = made[names[0]][0]
        results = features_for_masks(group_image, {n: made[n][1] for n in names}, params, parts)
        for name, result in results.items():
            write_missing_parts(store, parts, keys[name], result_parts(result, parts), cached)
    for name, ks in keys.items():
        bad = next((cached[k] for k in ks if not cached[k].ok), None)
        if bad is not None:
            missing[name] = bad.reason
    if "original" in missing:
        return RobustnessOutcome(
            unit.key, Status.QUARANTINED, missing=missing, detail=missing["original"]
        )
    ok = {n: ks for n, ks in keys.items() if n not in missing}
    return RobustnessOutcome(unit.key, Status.OK, ok, missing, computed=len(todo))


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

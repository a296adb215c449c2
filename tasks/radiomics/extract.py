"""Extract pyradiomics features for one (series, ROI), through the content-addressed cache.

The unit of work is one ROI mask of one harmonised image. :func:`extract_roi` looks up the
unit's cached parts (see :mod:`tasks.radiomics.cache`), computes only the missing ones with
``radiomics.featureextractor.RadiomicsFeatureExtractor`` and stores them. A defective ROI
(empty, one voxel, outside the image, too small, misaligned) gives a quarantine outcome with
its reason instead of an exception; an unexpected error gives a failed outcome.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.errors import OncoflowError
from tasks.radiomics.cache import (
    SHAPE_PART,
    CachedPart,
    Part,
    object_key,
    part_for_feature,
    plan_parts,
    read_parts,
    write_part,
)
from tasks.radiomics.diagnostics import compute_diagnostics, diagnostics_key, write_diagnostics
from tasks.radiomics.params import SHAPE_CLASSES, RadiomicsParams
from tasks.radiomics.shared_filters import can_share_filters, features_per_mask, real_value
from tasks.records import Reason, Status, UnitOutcome, UnitResult
from tasks.store import HARMONISED_SERIES, SiteStore, sha256_bytes
from tasks.store_checks import missing_input

if TYPE_CHECKING:  # SimpleITK loads where images are read (planning a run needs none)
    import SimpleITK as sitk

logger = logging.getLogger(__name__)

#: Level of pyradiomics' logger on the workers (default WARNING). Its records reach the Prefect
#: UI as task-run logs (``PREFECT_LOGGING_EXTRA_LOGGERS``); INFO shows pyradiomics' progress
#: (about 100 lines per ROI with the CT preset).
LOG_LEVEL_ENV = "ONCOFLOW_RADIOMICS_LOG_LEVEL"
#: A pyradiomics advisory logged for every image type whenever SumAverage is enabled.
GLCM_ADVISORY = "GLCM is symmetrical, therefore Sum Average"


class _DropGlcmAdvisory(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(GLCM_ADVISORY)


def configure_radiomics_logging() -> None:
    """Set pyradiomics' log level from ``ONCOFLOW_RADIOMICS_LOG_LEVEL`` (default WARNING).

    Also drops pyradiomics' repeated SumAverage advisory, which carries no information.
    """
    level = os.environ.get(LOG_LEVEL_ENV, "WARNING").strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        level = "WARNING"
    logging.getLogger("radiomics").setLevel(level)
    glcm = logging.getLogger("radiomics.glcm")
    if not any(isinstance(f, _DropGlcmAdvisory) for f in glcm.filters):
        glcm.addFilter(_DropGlcmAdvisory())


@dataclass(frozen=True)
class RoiUnit:
    """One (series, ROI) to extract; pseudonymous keys and store keys only.

    Parameters
    ----------
    series, study, patient
        Pseudonymous keys from ``harmonised/series.parquet``.
    modality
        Image modality.
    roi
        Normalised ROI name.
    image, mask
        Store keys of the NIfTI image and mask.
    image_sha256, mask_sha256
        Content hashes recorded by the harmonise stage (the cache key).
    voxels
        Voxels in the image (scheduling: largest first).
    """

    series: str
    study: str
    patient: str
    modality: str
    roi: str
    image: str
    mask: str
    image_sha256: str
    mask_sha256: str
    voxels: int

    @property
    def key(self) -> str:
        """``<series>/<roi>``: the unit's pseudonymous key."""
        return f"{self.series}/{self.roi}"


def plan_units(store: SiteStore) -> list[RoiUnit]:
    """List the (series, ROI) units of the harmonised images, largest images first.

    Parameters
    ----------
    store
        The site store.

    Returns
    -------
    list of RoiUnit
        Sorted by image voxel count (descending), then series and ROI, so the order is stable.

    Raises
    ------
    OncoflowError
        When ``harmonised/series.parquet`` is missing or lacks contract columns.
    """
    table = store.read_table(HARMONISED_SERIES)
    if table is None:
        raise missing_input(store, "harmonised images", "oncoflow harmonise")
    needed = {"series", "image", "image_sha256", "size", "rois", "masks", "mask_sha256", "status"}
    missing = sorted(needed - set(table.column_names))
    if missing:
        raise OncoflowError(f"{HARMONISED_SERIES} lacks columns: {', '.join(missing)}")
    units: list[RoiUnit] = []
    for row in table.to_pylist():
        if row["status"] != str(Status.OK):
            continue
        voxels = int(np.prod(row["size"])) if row["size"] else 0
        for roi, mask, mask_sha in zip(
            row["rois"] or [], row["masks"] or [], row["mask_sha256"] or [], strict=True
        ):
            units.append(
                RoiUnit(
                    series=row["series"],
                    study=row.get("study") or "",
                    patient=row.get("patient") or "",
                    modality=row.get("modality") or "",
                    roi=roi,
                    image=row["image"],
                    mask=mask,
                    image_sha256=row["image_sha256"],
                    mask_sha256=mask_sha,
                    voxels=voxels,
                )
            )
    units.sort(key=lambda u: (-u.voxels, u.series, u.roi))
    return units


def select_units(
    units: list[RoiUnit],
    series: list[str] | None = None,
    rois: list[str] | None = None,
    modalities: list[str] | None = None,
) -> list[RoiUnit]:
    """Keep the units of the given series, ROI names and modalities (empty filter: all).

    ROI names and modalities compare case-insensitively.
    """
    wanted_series, wanted_rois = set(series or []), {r.lower() for r in rois or []}
    wanted_modalities = {m.upper() for m in modalities or []}
    return [
        u
        for u in units
        if (not wanted_series or u.series in wanted_series)
        and (not wanted_rois or u.roi.lower() in wanted_rois)
        and (not wanted_modalities or u.modality.upper() in wanted_modalities)
    ]


def roi_outcome(
    key: str,
    status: Status,
    *,
    reason: str = "",
    detail: str = "",
    error_class: str = "",
    parts: Sequence[str] = (),
    parts_computed: int = 0,
    compute_seconds: float = 0.0,
) -> UnitOutcome:
    """Return the outcome of one (series, ROI): status and cache keys, never feature arrays.

    Parameters
    ----------
    key
        ``<series>/<roi>``.
    status
        ``ok``, ``quarantined`` or ``failed``.
    reason, detail, error_class
        Reason code when quarantined, short explanation, exception class when failed.
    parts
        Store keys of the unit's cached parts (in table column order): the outputs.
    parts_computed
        How many parts were computed now (written to the cache); the others were reused.
    compute_seconds
        CPU seconds this process spent computing the missing parts (0 when all were cached).
    """
    result = UnitResult(
        key,
        status,
        reason=reason,
        error_class=error_class,
        detail=detail,
        outputs=tuple(parts),
        computed=parts_computed > 0,
    )
    return UnitOutcome(result, written=parts_computed, cpu_seconds=compute_seconds)


class Quarantine(Exception):
    """Raised inside this module for a defective ROI; becomes a quarantine outcome."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class InputError(Exception):
    """An input object is missing or differs from its recorded hash; becomes a failed outcome."""


def extract_roi(store: SiteStore, unit: RoiUnit, params: RadiomicsParams) -> UnitOutcome:
    """Extract the features of one (series, ROI), computing only parts missing from the cache.

    Parameters
    ----------
    store
        The site store holding ``harmonised/`` and the cache.
    unit
        The (series, ROI) to extract.
    params
        Validated pyradiomics parameters.

    Returns
    -------
    UnitOutcome
        ``ok`` with the cache keys of every part, ``quarantined`` with a reason for a defective
        ROI, or ``failed`` with the error class for an unexpected error.
    """
    return extract_image_rois(store, [unit], params)[0]


def extract_image_rois(
    store: SiteStore, units: list[RoiUnit], params: RadiomicsParams
) -> list[UnitOutcome]:
    """Extract several ROIs of one image, reading the image and filtering it once.

    Parameters
    ----------
    store
        The site store holding ``harmonised/`` and the cache.
    units
        ROIs of the same image (same ``image`` key and hash).
    params
        Validated pyradiomics parameters.

    Returns
    -------
    list of UnitOutcome
        One per unit, in the order given (see :func:`extract_roi`).

    Raises
    ------
    ValueError
        When the units do not share one image.
    """
    if len({(u.image, u.image_sha256) for u in units}) > 1:
        raise ValueError("extract_image_rois takes ROIs of one image")
    parts = plan_parts(params)
    keys = {u.key: [object_key(u.image_sha256, u.mask_sha256, p) for p in parts] for u in units}
    cached = read_parts(store, [k for ks in keys.values() for k in ks])
    to_compute = [u for u in units if any(k not in cached for k in keys[u.key])]
    computed: dict[str, int] = {}
    cpu = 0.0
    failed: dict[str, UnitOutcome] = {}
    if to_compute:
        started = time.process_time()
        missing = [p for p in parts if any(object_key(u.image_sha256, u.mask_sha256, p)
                                           not in cached for u in to_compute)]  # fmt: skip
        try:
            fresh, errors = compute_image_parts(store, to_compute, params, missing)
        except InputError as exc:
            fresh, errors = {}, {u.key: exc for u in to_compute}
        except Exception as exc:  # unexpected: report, never raise into the flow
            logger.warning("extraction of one image's ROIs failed: %s", type(exc).__name__)
            fresh, errors = {}, {u.key: exc for u in to_compute}
        for key, exc in errors.items():
            failed[key] = roi_outcome(
                key,
                Status.FAILED,
                error_class=type(exc).__name__,
                detail=str(exc) if isinstance(exc, InputError) else _first_line(exc),
            )
        for unit in to_compute:
            computed[unit.key] = write_missing_parts(
                store, parts, keys[unit.key], fresh.get(unit.key, {}), cached
            )
        cpu = round((time.process_time() - started) / len(to_compute), 3)
    outcomes = []
    for unit in units:
        if unit.key in failed:
            outcomes.append(failed[unit.key])
            continue
        done = computed.get(unit.key, 0)
        common = {
            "parts": tuple(keys[unit.key]),
            "parts_computed": done,
            "compute_seconds": cpu if unit.key in computed else 0.0,
        }
        bad = next((cached[k] for k in keys[unit.key] if not cached[k].ok), None)
        if bad is not None:
            outcomes.append(
                roi_outcome(
                    unit.key, Status.QUARANTINED, reason=bad.reason, detail=bad.detail, **common
                )
            )
        else:
            outcomes.append(roi_outcome(unit.key, Status.OK, **common))
    return outcomes


def compute_image_parts(
    store: SiteStore, units: list[RoiUnit], params: RadiomicsParams, missing: list[Part]
) -> tuple[dict[str, dict[Part, CachedPart]], dict[str, Exception]]:
    """Compute the ``missing`` parts of ROIs of one image, each filtered image made once.

    A defective ROI gives every missing part of its own the same quarantine outcome; the
    other ROIs are unaffected. Where filters cannot be shared (resampling, ``preCrop``,
    LBP3D) every ROI gets its own ``execute``.

    Returns
    -------
    tuple
        Parts by unit key, and the units that could not be computed (a mask object missing
        or differing from its hash: :class:`InputError`).

    Raises
    ------
    InputError
        When the image object is missing or differs from its recorded hash.
    """
    errors: dict[str, Exception] = {}
    masks: dict[str, sitk.Image] = {}
    with tempfile.TemporaryDirectory(prefix="oncoflow-radiomics-") as tmp:
        image = read_image(store, units[0].image, units[0].image_sha256, Path(tmp) / "image")
        for i, unit in enumerate(units):
            try:
                masks[unit.key] = read_image(
                    store, unit.mask, unit.mask_sha256, Path(tmp) / f"m{i}"
                )
            except InputError as exc:
                errors[unit.key] = exc
    results = features_for_masks(image, masks, params, missing)
    by_key = {u.key: u for u in units}
    for key, result in results.items():
        unit = by_key[key]
        if isinstance(result, dict) and not store.exists(
            diagnostics_key(unit.image_sha256, unit.mask_sha256, params)
        ):
            found = compute_diagnostics(image, masks[key], params)
            write_diagnostics(store, unit.image_sha256, unit.mask_sha256, params, found)
    fresh = {key: result_parts(result, missing) for key, result in results.items()}
    return fresh, errors


def result_parts(
    result: dict[str, float] | Quarantine | ValueError, parts: list[Part]
) -> dict[Part, CachedPart]:
    """Return the cache parts of one mask's result from :func:`features_for_masks`.

    Features are split by part; a defective mask gives every part its quarantine reason.
    """
    if isinstance(result, Quarantine):
        reason, detail = result.reason, result.detail
    elif isinstance(result, ValueError):
        reason, detail = classify_value_error(result)
    else:
        return split_features(result, parts)
    return {p: CachedPart(p.name, reason=str(reason), detail=detail) for p in parts}


def write_missing_parts(
    store: SiteStore,
    parts: list[Part],
    keys: Sequence[str],
    fresh: dict[Part, CachedPart],
    cached: dict[str, CachedPart],
) -> int:
    """Write the fresh parts whose cache keys are not in ``cached``; return how many.

    ``keys`` are the cache keys of ``parts`` (same order); ``cached`` is updated.
    """
    written = 0
    for part, key in zip(parts, keys, strict=True):
        if part in fresh and key not in cached:
            write_part(store, key, fresh[part])
            cached[key] = fresh[part]
            written += 1
    return written


def features_for_masks(
    image: sitk.Image, masks: dict[str, sitk.Image], params: RadiomicsParams, parts: list[Part]
) -> dict[str, dict[str, float] | Quarantine | ValueError]:
    """Run pyradiomics on one image with several masks, each filtered image made once.

    Returns
    -------
    dict
        By mask key: the features, the :class:`Quarantine` of a defective mask, or the
        ``ValueError`` pyradiomics raised. Where filters cannot be shared every mask gets its
        own ``execute``.
    """
    label = params.setting.label or 1
    results: dict[str, dict[str, float] | Quarantine | ValueError] = {}
    for key, mask in masks.items():
        try:
            check_mask(image, mask, label)
        except Quarantine as q:
            results[key] = q
    valid = {k: m for k, m in masks.items() if k not in results}
    if len(valid) > 1 and can_share_filters(params):
        results.update(features_per_mask(build_extractor(params, parts), image, valid))
    else:
        for key, mask in valid.items():
            try:
                results[key] = run_extractor(image, mask, params, parts)
            except ValueError as exc:
                results[key] = exc
    return results


def read_image(store: SiteStore, key: str, sha256: str, target: Path) -> sitk.Image:
    """Read a harmonised NIfTI image or mask, checking it against its recorded hash.

    Parameters
    ----------
    store
        The site store.
    key, sha256
        Store key and the hash ``harmonised/series.parquet`` records for it.
    target
        Local path (without suffix) of the temporary copy SimpleITK reads.

    Raises
    ------
    InputError
        When the object is missing, differs from its hash or is not a readable NIfTI file.
    """
    import SimpleITK as sitk

    try:
        data = store.read_bytes(key)
    except FileNotFoundError:
        raise InputError(f"{Path(key).name} is missing from the store") from None
    if sha256_bytes(data) != sha256:
        raise InputError(
            f"{Path(key).name} differs from its hash in {HARMONISED_SERIES}: re-run harmonise"
        )
    path = target.with_name(target.name + ".nii.gz")
    path.write_bytes(data)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError("image or mask is not a readable NIfTI file") from None


def check_mask(image: sitk.Image, mask: sitk.Image, label: int) -> None:
    """Quarantine masks pyradiomics cannot use: empty, one voxel, or entirely outside the image.

    Raises
    ------
    Quarantine
        With reason ``empty-mask``, ``one-voxel-mask`` or ``mask-outside-image``.
    """
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(mask)
    if arr.ndim == 4:  # vector mask: pyradiomics uses channel 0 by default
        arr = arr[..., 0]
    where = np.argwhere(arr == label)
    if where.size == 0:
        raise Quarantine(Reason.EMPTY_MASK, f"no voxel with label {label}")
    if len(where) == 1:
        raise Quarantine(Reason.ONE_VOXEL_MASK, "the mask has a single voxel")
    if _same_grid(image, mask):
        return
    lo = where.min(axis=0)[::-1] - 0.5  # numpy (z, y, x) -> ITK (x, y, z)
    hi = where.max(axis=0)[::-1] + 0.5
    corners = [
        image.TransformPhysicalPointToContinuousIndex(
            mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in corner])
        )
        for corner in product(*zip(lo, hi, strict=True))
    ]
    cmin = np.min(corners, axis=0)
    cmax = np.max(corners, axis=0)
    size = np.array(image.GetSize(), dtype=float)
    if np.any(cmax <= -0.5) or np.any(cmin >= size - 0.5):
        raise Quarantine(Reason.MASK_OUTSIDE_IMAGE, "the ROI lies outside the image")


def _same_grid(image: sitk.Image, mask: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        image.GetSize() == mask.GetSize()
        and np.allclose(image.GetSpacing(), mask.GetSpacing(), atol=tol)
        and np.allclose(image.GetOrigin(), mask.GetOrigin(), atol=tol)
        and np.allclose(image.GetDirection(), mask.GetDirection(), atol=tol)
    )


def classify_value_error(exc: ValueError) -> tuple[Reason, str]:
    """Map pyradiomics' ROI-check ``ValueError`` messages to reason codes."""
    text = _first_line(exc)
    low = text.lower()
    if "not present in mask" in low:
        return Reason.EMPTY_MASK, text
    if "1 segmented voxel" in low:
        return Reason.ONE_VOXEL_MASK, text
    if "too few dimensions" in low or "too small" in low:
        return Reason.ROI_TOO_SMALL, text
    if "mismatch" in low or "bounding box calculation" in low:
        return Reason.MASK_GEOMETRY_MISMATCH, text
    return Reason.EXTRACTION_ERROR, text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def build_extractor(params: RadiomicsParams, parts: list[Part] | None = None) -> Any:
    """Return a ``RadiomicsFeatureExtractor`` for ``params`` restricted to ``parts``.

    Parameters
    ----------
    params
        Validated parameters.
    parts
        Parts to compute (None: all). Shape classes are enabled only with the shape part,
        image types only with their own part.
    """
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    configure_radiomics_logging()
    canonical = params.canonical()
    names = {p.name for p in parts} if parts is not None else None
    classes = canonical["featureClass"]
    image_types = canonical["imageType"]
    if names is not None:
        if SHAPE_PART not in names:
            classes = {k: v for k, v in classes.items() if k not in SHAPE_CLASSES}
        image_types = {k: v for k, v in image_types.items() if k in names}
        if not image_types:
            classes = {k: v for k, v in classes.items() if k in SHAPE_CLASSES}
    extractor = RadiomicsFeatureExtractor(canonical)
    extractor.enabledImagetypes = image_types
    extractor.enabledFeatures = classes
    extractor.settings["additionalInfo"] = False
    return extractor


def run_extractor(
    image: sitk.Image, mask: sitk.Image, params: RadiomicsParams, parts: list[Part] | None = None
) -> dict[str, float]:
    """Run pyradiomics on an image and mask; return the features as floats in pyradiomics order."""
    result = build_extractor(params, parts).execute(image, mask)
    return {k: real_value(v) for k, v in result.items() if not k.startswith("diagnostics_")}


def split_features(features: dict[str, float], parts: list[Part]) -> dict[Part, CachedPart]:
    """Split one extraction's features into cache parts by image type (shape separately)."""
    by_name = {p.name: p for p in parts}
    buckets: dict[str, dict[str, float]] = {p.name: {} for p in parts}
    shape_enabled = SHAPE_PART in by_name
    for name, value in features.items():
        part = part_for_feature(name, shape_enabled)
        if part not in buckets:
            raise ValueError(f"feature {name!r} belongs to part {part!r}, which was not requested")
        buckets[part][name] = value
    return {by_name[n]: CachedPart(n, features=f) for n, f in buckets.items()}

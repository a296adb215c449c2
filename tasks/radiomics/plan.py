"""The plan and outputs of an extraction run around its per-image task.

Which units are already settled by the content-addressed cache, how the rest are grouped into
one task per image, the table rows read back from the cache and the stage's quarantine rows.
"""

from __future__ import annotations

from tasks.radiomics.cache import object_key, plan_parts, read_parts
from tasks.radiomics.extract import RoiUnit, roi_outcome
from tasks.radiomics.params import RadiomicsParams
from tasks.radiomics.table import FeatureRow
from tasks.records import Kind, QuarantineRecord, Stage, Status, UnitOutcome
from tasks.store import SiteStore


def group_by_image(units: list[RoiUnit]) -> list[list[RoiUnit]]:
    """Group units by image, keeping the units' order (largest images first).

    Parameters
    ----------
    units
        Units in scheduling order.

    Returns
    -------
    list of list of RoiUnit
        One group per image, in the order of each image's first unit.
    """
    groups: dict[tuple[str, str], list[RoiUnit]] = {}
    for unit in units:
        groups.setdefault((unit.image, unit.image_sha256), []).append(unit)
    return list(groups.values())


def collect_rows(
    store: SiteStore, units: list[RoiUnit], outcomes: dict[str, UnitOutcome]
) -> list[FeatureRow]:
    """Read the cached parts of every finished unit and build table rows.

    An ``ok`` outcome whose parts cannot be found any more is replaced in ``outcomes`` by a
    failed one.
    """
    keys = sorted(
        {k for o in outcomes.values() if o.result.status == Status.OK for k in o.result.outputs}
    )
    parts = read_parts(store, keys)
    rows = []
    for unit in units:
        outcome = outcomes.get(unit.key)
        if outcome is None:
            continue
        features: dict[str, float] = {}
        if outcome.result.status == Status.OK:
            if not all(key in parts for key in outcome.result.outputs):
                # a part vanished between the task and now (pruned cache): report, never guess
                outcome = roi_outcome(
                    unit.key,
                    Status.FAILED,
                    error_class="CacheMiss",
                    detail="a cached result disappeared: re-run the extraction",
                )
                outcomes[unit.key] = outcome
            else:
                for key in outcome.result.outputs:
                    features.update(parts[key].features or {})
        rows.append(
            FeatureRow(
                unit=unit,
                status=str(outcome.result.status),
                reason=outcome.result.reason,
                detail=outcome.result.detail or outcome.result.error_class,
                features=features,
            )
        )
    return rows


def cached_outcomes(
    store: SiteStore, units: list[RoiUnit], params: RadiomicsParams
) -> dict[str, UnitOutcome]:
    """Outcomes of units whose every part is already cached (nothing to compute for them)."""
    parts = plan_parts(params)
    wanted = {u.key: [object_key(u.image_sha256, u.mask_sha256, p) for p in parts] for u in units}
    found = read_parts(store, [k for keys in wanted.values() for k in keys])
    out: dict[str, UnitOutcome] = {}
    for key, keys in wanted.items():
        if not all(k in found for k in keys):
            continue
        bad = next((found[k] for k in keys if not found[k].ok), None)
        status = Status.QUARANTINED if bad else Status.OK
        out[key] = roi_outcome(
            key,
            status,
            reason=bad.reason if bad else "",
            detail=bad.detail if bad else "",
            parts=tuple(keys),
        )
    return out


def quarantine_records(rows: list[FeatureRow]) -> list[QuarantineRecord]:
    """Return the stage's quarantine rows: one per quarantined (series, ROI)."""
    return [
        QuarantineRecord(
            item=r.unit.key, kind=Kind.MASK, stage=Stage.EXTRACT, reason=r.reason, detail=r.detail
        )
        for r in rows
        if r.status == str(Status.QUARANTINED)
    ]


def failed_outcomes(group: list[RoiUnit], exc: BaseException) -> list[UnitOutcome]:
    """Return the outcomes of an image task that raised: each of its ROIs failed."""
    return [roi_outcome(u.key, Status.FAILED, error_class=type(exc).__name__) for u in group]

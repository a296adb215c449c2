"""What to harmonise (from ``deid/series.parquet``) and the ``harmonised/series.parquet`` table."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from tasks.deid.plan import deid_units
from tasks.errors import OncoflowError
from tasks.harmonise.config import HarmoniseConfig
from tasks.harmonise.provenance import code_version
from tasks.harmonise.qc import png_data_uri, quarantined_previews, thumbnail_data_uri
from tasks.harmonise.series import (
    META_COLUMNS,
    SegmentationRef,
    SeriesUnit,
    output_dir,
)
from tasks.records import Kind, QuarantineRecord, Reason, Stage, Status, UnitOutcome, UnitResult
from tasks.store import (
    DEID_DICOM,
    DEID_SERIES,
    HARMONISED,
    HARMONISED_SERIES,
    HARMONISED_UNITS,
    SiteStore,
)
from tasks.store_checks import missing_input
from tasks.table_parts import PartedTable
from tasks.unit_state import UnitState, keyed_digest, plan_reuse

IMAGE_KINDS = ("image", "multiframe", "volume")
SEGMENTATION_KINDS = ("rtstruct", "seg", "label")
#: Segmentation kinds of deid/series.parquet read as label images (``rois``: their ROI name).
LABEL_KINDS = {"label": "nifti"}

#: Schema of ``harmonised/series.parquet`` (contract in docs/tables.md).
SERIES_SCHEMA = pa.schema(
    [
        ("series", pa.string()),
        *[(c, pa.string()) for c in META_COLUMNS],
        ("image", pa.string()),
        ("image_sha256", pa.string()),
        ("size", pa.list_(pa.int64())),
        ("spacing", pa.list_(pa.float64())),
        ("rois", pa.list_(pa.string())),
        ("masks", pa.list_(pa.string())),
        ("mask_sha256", pa.list_(pa.string())),
        ("intensity", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)

DEID_NEEDED = {"series", "kind", "paths", "status", "modality"}


def store_key(path: str) -> str:
    """Return the store key of a ``paths`` entry of ``deid/series.parquet``."""
    path = path.lstrip("/")
    return path if path.startswith(("deid/dicom/", "deid/volumes/")) else f"{DEID_DICOM}/{path}"


def plan_units(store: SiteStore) -> tuple[list[SeriesUnit], list[QuarantineRecord]]:
    """List the image series to harmonise, each with its segmentation objects.

    Parameters
    ----------
    store
        The site store holding ``deid/series.parquet``.

    Returns
    -------
    tuple
        Units sorted by series key, and quarantine records for segmentation objects whose
        referenced image series is not harmonised.

    Raises
    ------
    OncoflowError
        When ``deid/series.parquet`` is missing or lacks contract columns.
    """
    table = store.read_table(DEID_SERIES)
    if table is None:
        raise missing_input(store, "de-identified series", "oncoflow deidentify")
    missing = DEID_NEEDED - set(table.column_names)
    if missing:
        raise OncoflowError(f"{DEID_SERIES} lacks columns: {', '.join(sorted(missing))}")
    rows = [r for r in table.to_pylist() if (r.get("status") or "ok") == "ok"]
    images = {r["series"]: r for r in rows if r.get("kind") in IMAGE_KINDS}
    segs_by_image: dict[str, list[SegmentationRef]] = defaultdict(list)
    records = []
    for row in sorted(rows, key=lambda r: r["series"]):
        if row.get("kind") not in SEGMENTATION_KINDS:
            continue
        ref = SegmentationRef(
            series=row["series"],
            kind=LABEL_KINDS.get(row["kind"], row["kind"]),
            keys=tuple(store_key(p) for p in row.get("paths") or []),
            roi=next(iter(row.get("rois") or []), ""),
        )
        targets = [s for s in row.get("referenced_series") or [] if s in images]
        if not targets:
            records.append(
                QuarantineRecord(
                    row["series"],
                    Kind.SERIES,
                    Stage.HARMONISE,
                    Reason.MISSING_REFERENCED_SERIES,
                    f"{row['kind']} references no harmonisable image series",
                )
            )
        for target in targets:
            segs_by_image[target].append(ref)
    units = []
    for series, row in sorted(images.items()):
        meta = {c: (str(row[c]) if row.get(c) is not None else None) for c in META_COLUMNS}
        units.append(
            SeriesUnit(
                series=series,
                keys=tuple(store_key(p) for p in row.get("paths") or []),
                segmentations=tuple(segs_by_image.get(series, [])),
                meta=meta,
                kind=row.get("kind") or "image",
            )
        )
    return units, records


@dataclass
class HarmonisePlan:
    """The units of a harmonisation run and the outcomes reused from the last run.

    Attributes
    ----------
    units
        Image series to harmonise (series order).
    records
        Quarantine rows of the plan (segmentations without a harmonisable image).
    reused
        Unit index -> outcome of the units unchanged since the last run (no task).
    digests
        Series -> digest of its de-identified inputs' content, settings and code.
    old_rows
        ``harmonised/series.parquet`` of the last run, by series.
    previous
        ``harmonised/units.parquet`` of the last run.
    """

    units: list[SeriesUnit]
    records: list[QuarantineRecord]
    reused: dict[int, UnitOutcome]
    digests: dict[str, str]
    old_rows: dict[str, dict[str, Any]]
    previous: dict[str, tuple[str, dict[str, Any]]]


#: State columns of ``harmonised/units.parquet``: the outputs and the mask quarantine rows.
HARMONISED_UNIT_COLUMNS = pa.schema(
    [
        ("outputs", pa.list_(pa.string())),
        (
            "records",
            pa.list_(pa.struct([(n, pa.string()) for n in ("item", "kind", "reason", "detail")])),
        ),
    ]
)


def harmonised_units(store: SiteStore) -> UnitState:
    """``harmonised/units.parquet``: what the last run knows of each harmonised series."""
    return UnitState(store, HARMONISED_UNITS, HARMONISED_UNIT_COLUMNS)


def plan_harmonise(store: SiteStore, config: HarmoniseConfig) -> HarmonisePlan:
    """Plan a run: :func:`plan_units` and the units unchanged since the last run.

    A unit is reused (no task) when the content of its de-identified series and
    segmentations (recorded by de-identification in ``deid/units.parquet``), its metadata,
    the settings and the harmonisation code are those of the last ``ok`` outcome, and its
    output files are still in the store. Units without a recorded content (volumes) always
    become tasks; the task's own content key then still skips unchanged work.
    """
    units, records = plan_units(store)
    contents = {u: s["content"] for u, (_, s) in deid_units(store).read().items()}
    settings = (config.config_hash(), code_version())

    def digest(unit: SeriesUnit) -> str | None:
        inputs = [unit.series, *(r.series for r in unit.segmentations)]
        if not all(contents.get(s) for s in inputs):
            return None
        return keyed_digest(b"harmonise", asdict(unit), [contents[s] for s in inputs], settings)

    digests = {u.series: d for u in units if (d := digest(u)) is not None}
    previous = harmonised_units(store).read()
    old = store.read_table(HARMONISED_SERIES)
    old_rows = {r["series"]: r for r in old.to_pylist()} if old is not None else {}
    present = set(store.find(HARMONISED)) if previous and store.exists(HARMONISED) else set()

    def reused(unit: SeriesUnit, saved: dict[str, Any]) -> UnitOutcome | None:
        row = old_rows.get(unit.series)
        outputs = tuple(saved["outputs"])
        if row is None or row.get("status") != str(Status.OK) or not set(outputs) <= present:
            return None
        quarantine = tuple(
            QuarantineRecord(
                r["item"], Kind(r["kind"]), Stage.HARMONISE, Reason(r["reason"]), r["detail"]
            )
            for r in saved["records"]
        )
        result = UnitResult(unit.series, Status.OK, outputs=outputs, computed=False)
        return UnitOutcome(result, row, quarantine)

    found = plan_reuse(units, lambda u: digests.get(u.series), lambda u: u.series, previous, reused)
    return HarmonisePlan(units, records, found, digests, old_rows, previous)


def write_tables(
    store: SiteStore, plan: HarmonisePlan, outcomes: list[UnitOutcome], config: HarmoniseConfig
) -> list[str]:
    """Write ``harmonised/series.parquet`` (changed rows only) and ``harmonised/units.parquet``.

    Returns
    -------
    list of str
        Keys of the tables written (unchanged tables are left out).
    """
    table = series_table([o.row for o in outcomes])
    rows = table.to_pylist()
    changed = [i for i, r in enumerate(rows) if plan.old_rows.get(r["series"]) != r]
    gone = sorted(set(plan.old_rows) - {r["series"] for r in rows})
    metadata = {"oncoflow.harmonise.config": json.dumps(config.model_dump(mode="json"))}
    written = []
    if PartedTable(store, HARMONISED_SERIES, ("series",)).update(
        table.take(pa.array(changed, pa.int64())), gone, key="series", metadata=metadata
    ):
        written.append(HARMONISED_SERIES)
    entries = {
        o.result.key: (
            plan.digests[o.result.key],
            {
                "outputs": list(o.result.outputs),
                "records": [
                    {k: v for k, v in r.to_row().items() if k != "stage"} for r in o.quarantine
                ],
            },
        )
        for o in outcomes
        if o.result.status == Status.OK and o.result.key in plan.digests
    }
    if harmonised_units(store).write(entries, plan.previous):
        written.append(HARMONISED_UNITS)
    return written


def series_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build ``harmonised/series.parquet`` from task rows (sorted by series)."""
    ordered = sorted(rows, key=lambda r: r["series"])
    return pa.Table.from_pylist(
        [{f.name: r.get(f.name) for f in SERIES_SCHEMA} for r in ordered], schema=SERIES_SCHEMA
    )


def remove_stale(store: SiteStore, keep: set[str]) -> int:
    """Remove output folders of series that are no longer harmonised; return how many."""
    return store.prune(
        HARMONISED,
        {HARMONISED_SERIES, HARMONISED_UNITS, *(output_dir(s) for s in keep)},
        children=True,
        select=lambda key: not key.rsplit("/", 1)[-1].startswith("_txn."),
    )


def outcome_rows(outcomes: list[UnitOutcome]) -> list[dict[str, Any]]:
    """Return the outcome table of a run: one row per series (last 12 characters of its key)."""
    return [
        {
            "series": o.result.key[-12:],
            "status": str(o.result.status),
            "reason": o.result.reason or o.result.error_class,
            "intensity": o.row["intensity"] or "",
            "rois": ", ".join(o.row["rois"]),
            "size": "x".join(str(v) for v in o.row["size"] or []),
            "spacing": "x".join(f"{v:.3g}" for v in o.row["spacing"] or []),
            "computed": o.result.computed,
        }
        for o in outcomes
    ]


def quarantined_report(store: SiteStore, limit: int = 12) -> str:
    """Markdown: the middle image of each series harmonisation quarantined (de-identified)."""
    previews, total = quarantined_previews(store, limit=limit, size=128)
    if not total:
        return "No series quarantined."
    cells = [
        f"![quarantined]({png_data_uri(p.png)}) `{p.series[-12:]}` {p.modality}, {p.reason}"
        for p in previews
    ]
    return f"{total} series; middle image of the de-identified series.\n\n" + "\n\n".join(cells)


def qc_report(store: SiteStore, outcomes: list[UnitOutcome], limit: int) -> str:
    """Markdown QC report: thumbnails of the first ``limit`` harmonised series, keys of the rest."""
    ok = [o for o in outcomes if o.result.status == Status.OK]
    if not ok:
        return "No harmonised series."
    cells, rest = [], []
    for outcome in ok:
        qc_key = f"{output_dir(outcome.result.key)}/qc.png"
        rois = ", ".join(outcome.row["rois"]) or "no ROI"
        caption = f"`{outcome.result.key[-12:]}` {outcome.row['intensity']}, {rois}"
        if len(cells) < limit:
            try:
                uri = thumbnail_data_uri(store.read_bytes(qc_key), size=96)
            except FileNotFoundError:
                rest.append(f"- {caption}: `{qc_key}` (missing)")
                continue
            cells.append(f"![qc]({uri}) {caption}")
        else:
            rest.append(f"- {caption}: `{qc_key}`")
    text = "Slice through the largest ROI cross-section, mask outlines in colour.\n\n"
    text += "\n\n".join(cells)
    if rest:
        text += "\n\nOther QC pictures (store keys):\n" + "\n".join(rest)
    return text

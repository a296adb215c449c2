"""The private catalogue of a site: merging batch parts, series, quarantine, DuckDB views.

``merge_catalog`` combines the rows of the files parsed in this run (the batch part files) with
the unchanged rows of the existing catalogue, marks deleted files, rebuilds the series and the
ingest quarantine rows, and writes the tables through :class:`tasks.store.SiteStore` (atomic,
deterministic, skipped when unchanged). Rows are sorted by key, so the tables are byte-identical
whatever the number of workers or the order in which batches finished.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from tasks.dicom.headers import INSTANCE_SCHEMA, PARTS_DIR, rows_to_table
from tasks.dicom.listing import STATUS_DELETED, ListingDiff, item_ref
from tasks.dicom.series import build_series, series_table
from tasks.errors import OncoflowError
from tasks.records import Stage
from tasks.refs import site_ref_key
from tasks.store import (
    CATALOG_INSTANCES,
    CATALOG_SERIES,
    QUARANTINE,
    SiteStore,
)

#: Version of the catalogue rules; a change forces a rebuild of series and quarantine.
CATALOG_VERSION = "1"
VERSION_KEY = "oncoflow.catalog_version"


@dataclass
class CatalogState:
    """What the catalogue says about the source, for the incremental diff.

    Attributes
    ----------
    rows
        (path, size, mtime, status) of every catalogued file.
    current
        True when the catalogue, series and quarantine exist and were built by this version.
    """

    rows: list[tuple[str, int, str, str]] = field(default_factory=list)
    current: bool = False


@dataclass
class CatalogCounts:
    """Counts over the catalogue (no identifiers), for summaries and artifacts.

    Attributes
    ----------
    files
        Files by status.
    series
        Series by status.
    series_by_modality
        Modality -> status -> number of series.
    reasons
        Ingest quarantine rows by reason.
    quarantine
        Ingest quarantine rows with opaque item references (``ref``: keyed hash of the item).
    written
        Tables written in this run (unchanged tables are skipped).
    """

    files: dict[str, int] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)
    series_by_modality: dict[str, dict[str, int]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    quarantine: list[dict[str, str]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)


def read_catalog_state(store: SiteStore) -> CatalogState:
    """Read the (path, size, mtime, status) columns of the catalogue and its version."""
    table = store.read_table(CATALOG_INSTANCES, columns=["path", "size", "mtime", "status"])
    if table is None:
        return CatalogState()
    meta = table.schema.metadata or {}
    version = meta.get(VERSION_KEY.encode(), b"").decode()
    cols = [table.column(name).to_pylist() for name in ("path", "size", "mtime", "status")]
    rows = list(zip(*cols, strict=True))
    current = (
        version == CATALOG_VERSION and store.exists(CATALOG_SERIES) and store.exists(QUARANTINE)
    )
    return CatalogState(rows=rows, current=current)


def read_parts(store: SiteStore, parts: Iterable[str]) -> list[dict[str, Any]]:
    """Read the rows of batch part files."""
    rows: list[dict[str, Any]] = []
    for key in parts:
        table = store.read_table(key)
        if table is None:
            raise OncoflowError("a batch part file is missing from the store")
        rows.extend(table.to_pylist())
    return rows


def remove_parts(store: SiteStore) -> None:
    """Delete the batch part files (after a merge, or left over by a crashed run)."""
    store.remove(PARTS_DIR)


def merge_catalog(
    store: SiteStore,
    diff: ListingDiff,
    parsed: Sequence[dict[str, Any]],
    tolerance: float,
    metadata: dict[str, str] | None = None,
) -> CatalogCounts:
    """Merge parsed rows into the catalogue, rebuild series and quarantine, write the tables.

    Parameters
    ----------
    store
        The site store.
    diff
        The listing diff this run was planned from.
    parsed
        Rows of the files parsed in this run. Files that were to be parsed but have no row
        (their batch failed) keep their previous row, if any, so the next run retries them.
    tolerance
        Slice-gap tolerance (fraction of the median gap).
    metadata
        Extra Parquet schema metadata for the catalogue tables (e.g. the SOURCE URL).

    Returns
    -------
    CatalogCounts
        Counts and the tables written.
    """
    old = store.read_table(CATALOG_INSTANCES)
    by_path: dict[str, dict[str, Any]] = {}
    if old is not None:
        deleted = set(diff.deleted)
        for row in old.to_pylist():
            if row["path"] in deleted:
                row.update(status=STATUS_DELETED, reason="", detail="")
            by_path[row["path"]] = row
    for row in parsed:
        by_path[row["path"]] = row

    build = build_series(by_path.values(), tolerance)
    counts = CatalogCounts()
    metadata = {**(metadata or {}), VERSION_KEY: CATALOG_VERSION}
    if store.write_table(CATALOG_INSTANCES, rows_to_table(build.instances), metadata):
        counts.written.append(CATALOG_INSTANCES)
    if store.write_table(CATALOG_SERIES, series_table(build.series), metadata):
        counts.written.append(CATALOG_SERIES)
    if store.replace_quarantine(Stage.INGEST, build.quarantine):
        counts.written.append(QUARANTINE)
    fill_counts(counts, store)
    return counts


def _value_counts(table: pa.Table, column: str) -> dict[str, int]:
    if table.num_rows == 0:
        return {}
    result = pc.value_counts(table.column(column).fill_null(""))
    return dict(
        sorted(
            (str(item["values"]), int(item["counts"]))
            for item in result.to_pylist()  # small: one entry per distinct value
        )
    )


def fill_counts(counts: CatalogCounts, store: SiteStore) -> CatalogCounts:
    """Fill ``counts`` from the tables in the store (reads only a few columns)."""
    columns = store.read_table
    instances = columns(CATALOG_INSTANCES, ["status"])
    if instances is not None:
        counts.files = _value_counts(instances, "status")
    series = columns(CATALOG_SERIES, ["series_key", "modality", "status"])
    if series is not None:
        counts.series = _value_counts(series, "status")
        by_modality: dict[str, Counter[str]] = {}
        for modality, status in zip(
            series.column("modality").fill_null("").to_pylist(),
            series.column("status").to_pylist(),
            strict=True,
        ):
            by_modality.setdefault(modality or "-", Counter())[status] += 1
        counts.series_by_modality = {
            m: dict(sorted(c.items())) for m, c in sorted(by_modality.items())
        }
    rows = store.quarantine_rows(Stage.INGEST)
    key = site_ref_key(store)
    counts.reasons = dict(sorted(Counter(r["reason"] for r in rows).items()))
    counts.quarantine = [
        {
            "ref": item_ref(r["item"], key),
            "kind": r["kind"],
            "reason": r["reason"],
            "detail": r["detail"],
        }
        for r in sorted(rows, key=lambda r: (r["reason"], item_ref(r["item"], key)))
    ]
    return counts


def catalog_views(store: SiteStore) -> dict[str, str]:
    """Return the view names and the URLs of the Parquet files that exist."""
    views = {}
    for name, key in (
        ("instances", CATALOG_INSTANCES),
        ("series", CATALOG_SERIES),
        ("quarantine", QUARANTINE),
    ):
        if store.exists(key):
            views[name] = store.uri(key)
    return views


def connect_catalog(store: SiteStore) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB connection with views over the site's catalogue.

    Views ``instances``, ``series`` and ``quarantine`` read the Parquet files in place (through
    the store's fsspec filesystem for remote stores), so queries always see the current tables.

    Parameters
    ----------
    store
        The site store.

    Returns
    -------
    duckdb.DuckDBPyConnection
        The connection (close it when done).

    Raises
    ------
    OncoflowError
        When the site has no catalogue yet.
    """
    views = catalog_views(store)
    if "instances" not in views:
        raise OncoflowError(f"no catalogue for site {store.site!r} in {store.url}: run ingest")
    con = store.connect_duckdb()
    for name, url in views.items():
        quoted = url.replace("'", "''")
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{quoted}')")
    return con


__all__ = [
    "CATALOG_VERSION",
    "INSTANCE_SCHEMA",
    "CatalogCounts",
    "CatalogState",
    "catalog_views",
    "connect_catalog",
    "fill_counts",
    "merge_catalog",
    "read_catalog_state",
    "read_parts",
    "remove_parts",
]

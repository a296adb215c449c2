"""The features table and its diagnostics written as folders of parts, in proportion to change.

``features/<params-hash>.parquet`` and ``features/<params-hash>.diagnostics.parquet`` are tables
in parts (:mod:`tasks.table_parts`) whose rows are keyed by (series, ROI). A run first compares
every row's key, status and provenance columns with those of the table (a row's feature values
follow from its image and mask hashes under the table's parameters, since the cache is content
addressed) without building anything; then it writes one part with the rows that changed and
rewrites only the parts that held their old rows or rows of ROIs no longer at the site. A run in
which nothing changed builds and writes nothing.

Every part carries the table's parameters, versions and effective settings in its schema
metadata. The entries describing the whole set of rows (``oncoflow.harmonisation``: the steps
of every series; ``oncoflow.units``) change whenever a series arrives, so they are kept, with
every other entry, in the folder's ``_common_metadata`` only: a Parquet file holding the schema
and no row (the name Dask and Spark give it), written in the same transaction as the parts and
returned as the table's metadata by :meth:`SiteStore.read_table` and
:meth:`SiteStore.table_schema`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.radiomics.cache import PYRADIOMICS_VERSION
from tasks.radiomics.diagnostics import diagnostics_table, diagnostics_table_key, ok_pairs
from tasks.radiomics.params import RadiomicsParams
from tasks.radiomics.table import (
    FIXED_COLUMNS,
    FeatureRow,
    build_features_table,
    features_key,
    table_metadata,
)
from tasks.store import COMMON_METADATA, SiteStore, empty_table, parquet_file, read_parquet
from tasks.table_parts import SORT_KEY, PartedTable

#: Rows are keyed and sorted by these columns in both tables.
ROW_KEY = ("series", "roi")
#: Metadata entries about the whole set of rows: in ``_common_metadata`` only, not in parts.
TABLE_WIDE = ("oncoflow.harmonisation", "oncoflow.units")

#: Rows per part of the features table: its rows are some 150 times as wide as a catalogue
#: row (a feature column per pyradiomics feature), so a part holds 1,000 of them (about 10 MB).
PART_ROWS = 1_000

Key = tuple[str, str]


def features_parts(store: SiteStore, params_hash: str) -> PartedTable:
    """Return the features table of a parameter hash as a table in parts."""
    return PartedTable(store, features_key(params_hash), ROW_KEY, PART_ROWS)


def row_values(site: str, params_hash: str, row: FeatureRow) -> tuple[str, ...]:
    """Values of the key, status and provenance columns a row gets (:data:`FIXED_COLUMNS`)."""
    u = row.unit
    values = {
        "site": site,
        "patient": u.patient,
        "study": u.study,
        "series": u.series,
        "modality": u.modality,
        "roi": u.roi,
        "params_hash": params_hash,
        "status": row.status,
        "reason": row.reason,
        "detail": row.detail,
        "prov_image_sha256": u.image_sha256,
        "prov_mask_sha256": u.mask_sha256,
        "prov_pyradiomics_version": PYRADIOMICS_VERSION,
    }
    return tuple(values[c] for c in FIXED_COLUMNS)


def row_index(table: PartedTable, columns: Iterable[str]) -> dict[Key, tuple[str, tuple]] | None:
    """Map each row's (series, ROI) to its part and the values of ``columns``.

    Reads only those columns of each part (no row is built). None when the table is missing,
    still one file, or a part lacks a column: the whole table is then rewritten.
    """
    wanted = list(columns)
    if not table.exists() or table.is_single_file():
        return None
    index: dict[Key, tuple[str, tuple]] = {}
    for part in table.parts():
        with table.store.open(part) as fh:
            parquet = parquet_file(fh)
            if not set(wanted) <= set(parquet.schema_arrow.names):
                return None
            got = parquet.read(columns=wanted, use_threads=False)
        columns_ = [got.column(c).to_pylist() for c in wanted]
        s, r = wanted.index("series"), wanted.index("roi")
        for values in zip(*columns_, strict=True):
            index[(values[s], values[r])] = (part, tuple(values))
    return index


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table | None:
    """Give ``table`` exactly ``schema`` (missing columns null), or None when it cannot.

    None when ``table`` has a column the schema lacks or a value the column type cannot hold:
    the caller rewrites the whole table with the new schema.
    """
    have = set(table.column_names)
    if not have <= set(schema.names):
        return None
    columns = [
        table.column(f.name) if f.name in have else pa.nulls(table.num_rows, f.type) for f in schema
    ]
    try:
        return pa.Table.from_arrays(columns, names=schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        return None


def common_metadata_bytes(schema: pa.Schema, metadata: dict[str, str]) -> bytes:
    """Serialise the ``_common_metadata`` object: ``schema`` with every table entry, no rows."""
    merged = dict(schema.metadata or {})
    merged.update({k.encode(): v.encode() for k, v in metadata.items()})
    sink = io.BytesIO()
    pq.write_metadata(schema.with_metadata(dict(sorted(merged.items()))), sink)
    return sink.getvalue()


def _slices(table: pa.Table, rows: int) -> Iterator[pa.Table]:
    """Cut a table, sorted by (series, ROI), into slices of ``rows`` rows for the parts."""
    if table.num_rows > 1:
        table = table.sort_by([(c, "ascending") for c in ROW_KEY])
    for start in range(0, table.num_rows, rows):
        yield table.slice(start, rows)


def _keys(table: pa.Table) -> list[Key]:
    series, rois = table.column("series").to_pylist(), table.column("roi").to_pylist()
    return list(zip(series, rois, strict=True))


def update_parts(
    table: PartedTable,
    index: dict[Key, tuple[str, tuple]],
    rows: pa.Table,
    drop: Iterable[Key],
    metadata: dict[str, str],
    files: dict[str, bytes] | None = None,
) -> PartsWritten:
    """Replace rows by (series, ROI) in one transaction, rewriting only the parts holding them.

    Parameters
    ----------
    table
        The table in parts.
    index
        Its :func:`row_index`.
    rows
        New and changed rows, with the parts' schema.
    drop
        Keys whose rows leave the table.
    metadata
        Schema metadata every part carries.
    files
        Other objects of the folder written in the same transaction (``_common_metadata``).

    Returns
    -------
    PartsWritten
        Parts added and removed.
    """
    superseded = set(_keys(rows)) | set(drop)
    holding = sorted({index[k][0] for k in superseded if k in index})

    def tables() -> Iterator[pa.Table]:
        yield from _slices(rows, table.part_rows)
        for part in holding:
            with table.store.open(part) as fh:
                old = read_parquet(fh)
            keep = [k not in superseded for k in _keys(old)]
            yield old.filter(pa.array(keep, pa.bool_())).cast(rows.schema)

    added = list(table.chunks(tables(), metadata))
    if not added and len(holding) == len(table.parts()):  # every row left: one empty part
        added = [table.part_bytes(empty_table(rows.schema), metadata)]
    changed = table.replace(added, holding, files)
    table.compact(metadata)
    return PartsWritten(changed, len(added) if changed else 0, len(holding) if changed else 0)


def rewrite_parts(
    table: PartedTable,
    rows: pa.Table,
    metadata: dict[str, str],
    files: dict[str, bytes] | None = None,
) -> PartsWritten:
    """Replace the whole table by ``rows`` in one transaction (identical parts stay)."""
    old = table.parts()
    added = list(table.chunks(_slices(rows, table.part_rows), metadata))
    added = added or [table.part_bytes(rows, metadata)]
    changed = table.replace(added, old, files)
    return PartsWritten(changed, len(added) if changed else 0, len(old) if changed else 0)


@dataclass(frozen=True)
class PartsWritten:
    """What one write of a table in parts did."""

    changed: bool
    added: int = 0
    removed: int = 0


@dataclass
class FeaturesPlan:
    """What a run changes in the features table, decided before building any row.

    Parameters
    ----------
    table
        The features table in parts.
    site
        Site code.
    params
        The parameters of the table.
    rows
        Every row the table is to hold.
    metadata
        Every metadata entry of the table (parts carry all but :data:`TABLE_WIDE`).
    index
        :func:`row_index` of the table (None: the whole table is rewritten).
    changed
        Rows to write (new, or differing from the table's).
    gone
        Keys of rows whose ROI is no longer at the site.
    full
        Whether the whole table is rewritten (no table yet, one file, other parameters or
        versions, a schema the new rows do not fit).
    common_changed
        Whether ``_common_metadata`` differs (table-wide entries only).
    """

    table: PartedTable
    site: str
    params: RadiomicsParams
    rows: list[FeatureRow]
    metadata: dict[str, str]
    index: dict[Key, tuple[str, tuple]] | None
    changed: list[FeatureRow] = field(default_factory=list)
    gone: set[Key] = field(default_factory=set)
    full: bool = False
    common_changed: bool = False
    schema: pa.Schema | None = None

    @property
    def unchanged(self) -> bool:
        """Whether the table already holds exactly these rows and metadata."""
        return not (self.full or self.changed or self.gone or self.common_changed)

    def part_metadata(self) -> dict[str, str]:
        """Return the metadata entries every part carries."""
        return {k: v for k, v in self.metadata.items() if k not in TABLE_WIDE}

    def build(self) -> pa.Table:
        """Build the rows to write (the changed ones, or all when :attr:`full`).

        A changed row that does not fit the parts' schema (a new feature column) turns the
        write into a whole-table rewrite.
        """
        if not self.full:
            built, _ = build_features_table(self.site, self.changed, self.params)
            assert self.schema is not None
            fitted = conform(built, self.schema)
            if fitted is not None:
                return fitted
            self.full = True
        built, _ = build_features_table(self.site, self.rows, self.params)
        return built

    def commit(self, rows: pa.Table) -> PartsWritten:
        """Write :meth:`build`'s rows and ``_common_metadata`` in one transaction."""
        parts_meta = self.part_metadata()
        schema = rows.schema.with_metadata(
            {**(rows.schema.metadata or {}), SORT_KEY.encode(): ",".join(ROW_KEY).encode()}
        )
        files = {COMMON_METADATA: common_metadata_bytes(schema, self.metadata)}
        if self.full or self.index is None:
            return rewrite_parts(self.table, rows, parts_meta, files)
        return update_parts(self.table, self.index, rows, self.gone, parts_meta, files)


def plan_features(
    store: SiteStore,
    site: str,
    rows: list[FeatureRow],
    params: RadiomicsParams,
    metadata: dict[str, str],
) -> FeaturesPlan:
    """Compare the rows and metadata of a run with the features table (reads, builds nothing).

    Parameters
    ----------
    store
        The site store.
    site
        Site code.
    rows
        One row per (series, ROI) the table is to hold.
    params
        The parameters.
    metadata
        Every metadata entry of the table (:func:`build_features_table`'s and the methods
        entries).

    Returns
    -------
    FeaturesPlan
        The rows to write and the keys to drop.
    """
    params_hash = params.params_hash()
    table = features_parts(store, params_hash)
    table.recover()
    plan = FeaturesPlan(table, site, params, rows, metadata, None)
    index = row_index(table, FIXED_COLUMNS)
    schema = table.part_schema() if index is not None else None
    current = dict(schema.metadata or {}) if schema is not None else {}
    same = all(current.get(k.encode()) == v.encode() for k, v in plan.part_metadata().items())
    if index is None or schema is None or not same:
        plan.full = True
        plan.changed = list(rows)
        return plan
    plan.index, plan.schema = index, schema
    wanted = {(r.unit.series, r.unit.roi): r for r in rows}
    plan.changed = [
        r
        for k, r in sorted(wanted.items())
        if k not in index or index[k][1] != row_values(site, params_hash, r)
    ]
    plan.gone = set(index) - set(wanted)
    common = store.table_schema(table.key)
    recorded = dict(common.metadata or {}) if common is not None else {}
    plan.common_changed = any(recorded.get(k.encode()) != v.encode() for k, v in metadata.items())
    return plan


def write_diagnostics_parts(
    store: SiteStore, plan: FeaturesPlan, computed: Iterable[Key] = ()
) -> PartsWritten:
    """Write the diagnostics side table for the rows a features write changes.

    Its rows (one per ``ok`` row of the features table) are rebuilt from the cache for the
    changed rows and the ROIs computed in this run (whose diagnostics may have just been
    cached); rows of ROIs no longer ``ok`` leave. The whole table is rewritten when the features
    table is, or when the new rows do not fit its schema.

    Parameters
    ----------
    store
        The site store.
    plan
        The features table's plan (:func:`plan_features`).
    computed
        (series, ROI) of the units computed in this run.
    """
    params_hash = plan.params.params_hash()
    table = PartedTable(store, diagnostics_table_key(params_hash), ROW_KEY, PART_ROWS)
    table.recover()
    metadata = {"oncoflow.table": "diagnostics", "oncoflow.params_hash": params_hash}
    pairs = ok_pairs(plan.rows)
    index = None if plan.full else row_index(table, ROW_KEY)
    schema = table.part_schema() if index is not None else None
    if index is not None and schema is not None:
        touched = {(r.unit.series, r.unit.roi) for r in plan.changed} | set(computed)
        update = [p for p in pairs if p[:2] in touched or p[:2] not in index]
        drop = set(index) - {p[:2] for p in pairs}
        if not update and not drop:
            return PartsWritten(False)
        fitted = conform(diagnostics_table(store, update, plan.params), schema)
        if fitted is not None:
            return update_parts(table, index, fitted, drop, metadata)
    return rewrite_parts(table, diagnostics_table(store, pairs, plan.params), metadata)


def write_features_table(
    store: SiteStore,
    site: str,
    rows: list[FeatureRow],
    params: RadiomicsParams,
    metadata: dict[str, str] | None = None,
) -> PartsWritten:
    """Write the features table of ``rows`` (changed rows only; nothing when unchanged).

    The arguments are :func:`plan_features`' (``metadata`` by default :func:`table_metadata`'s).
    """
    plan = plan_features(store, site, rows, params, metadata or table_metadata(params))
    if plan.unchanged:
        return PartsWritten(False)
    return plan.commit(plan.build())

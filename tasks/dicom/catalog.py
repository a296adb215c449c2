"""The private catalogue of a site: merging batch parts, series, quarantine, DuckDB views.

``catalog/instances.parquet`` and ``catalog/series.parquet`` are folders of Parquet parts
(:mod:`tasks.table_parts`). ``diff_catalog`` compares a streamed listing (a Parquet file) with
the catalogue in DuckDB and writes the plan of the files to parse; ``merge_catalog`` rebuilds
only the series the parsed and deleted files touch and replaces only the parts that held their
rows, so an increment costs in proportion to what changed and no process holds the whole
catalogue or the whole listing. Rows inside a part are sorted by key and parts are named
by content, so the tables are byte-identical whatever the number of workers or the order in
which batches finished.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.dicom.headers import INSTANCE_SCHEMA, PARTS_DIR, rows_to_table
from tasks.dicom.listing import (
    LISTING_SCHEMA,
    STATUS_DELETED,
    STATUS_OK,
    STATUS_QUARANTINED,
    ListedFile,
    ListingDiff,
    files_from_parquet,
    item_ref,
    write_batches,
)
from tasks.dicom.series import (
    DERIVED_REASONS,
    DUPLICATE_DETAIL,
    SERIES_SCHEMA,
    SeriesBuild,
    build_series,
    series_table,
)
from tasks.errors import OncoflowError
from tasks.quarantine import replace_quarantine_rows, undecodable_record
from tasks.records import Kind, QuarantineRecord, Reason, Stage
from tasks.refs import site_ref_key
from tasks.store import (
    CATALOG_INSTANCES,
    CATALOG_SERIES,
    QUARANTINE,
    QUARANTINE_SORT,
    SiteStore,
    parquet_file,
    read_parquet,
)
from tasks.table_parts import PartedTable, sql_list

#: Version of the catalogue rules; a change forces a rebuild of series and quarantine.
CATALOG_VERSION = "1"
VERSION_KEY = "oncoflow.catalog_version"


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
    series_reasons
        Series not ok, by reason (a file split out of its series is a file row in the
        quarantine table and a series here, so the two are counted apart).
    quarantine
        Ingest quarantine rows with opaque item references (``ref``: keyed hash of the item).
    written
        Tables written in this run (unchanged tables are skipped).
    """

    files: dict[str, int] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)
    series_by_modality: dict[str, dict[str, int]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    series_reasons: dict[str, int] = field(default_factory=dict)
    quarantine: list[dict[str, str]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)


def instance_parts(store: SiteStore) -> PartedTable:
    """``catalog/instances.parquet`` as a folder of parts (rows ordered by path)."""
    return PartedTable(store, CATALOG_INSTANCES, ("path",))


def series_parts(store: SiteStore) -> PartedTable:
    """``catalog/series.parquet`` as a folder of parts (rows ordered by series key)."""
    return PartedTable(store, CATALOG_SERIES, ("series_key",))


def catalog_is_current(store: SiteStore, metadata: dict[str, str] | None = None) -> bool:
    """Return whether the catalogue is current.

    Current: the catalogue, series and quarantine exist, were built by this version of the
    rules and (when given) carry ``metadata``.
    """
    instances = instance_parts(store)
    instances.recover()
    series_parts(store).recover()
    meta = instances.schema_metadata()
    wanted = {**(metadata or {}), VERSION_KEY: CATALOG_VERSION}
    return (
        bool(meta)
        and all(meta.get(k.encode()) == v.encode() for k, v in wanted.items())
        and series_parts(store).exists()
        and store.exists(QUARANTINE)
    )


#: Private work files of an ingest run in the store (removed with the batch parts).
LISTING = f"{PARTS_DIR}/listing.parquet"
PLAN = f"{PARTS_DIR}/plan.parquet"
#: The files whose path is not UTF-8, escaped (:func:`tasks.dicom.listing.escape_name`).
UNDECODABLE = f"{PARTS_DIR}/undecodable.parquet"
GONE = f"{PARTS_DIR}/gone.parquet"
#: Rows of a DuckDB result read at a time while it is written to the store.
RESULT_ROWS = 8192
_GONE_SCHEMA = pa.schema([("path", pa.string())])


def diff_catalog(
    store: SiteStore, listing: str = LISTING, undecodable: str = UNDECODABLE
) -> ListingDiff:
    """Compare a listing with the catalogue in DuckDB; write the plan and the deleted paths.

    Neither the listing nor the catalogue is loaded whole: DuckDB joins the two Parquet
    sources on path (within :data:`MERGE_MEMORY`, spilling beyond it), and its sorted results
    are written to the store's private zone a record batch at a time.

    Parameters
    ----------
    store
        The site store.
    listing
        Store key of the listing (:func:`tasks.dicom.listing.write_listing`).
    undecodable
        Store key of the files listed whose path is not UTF-8 (counted in ``listed`` and
        ``undecodable``, never parsed: see :func:`undecodable_records`).

    Returns
    -------
    ListingDiff
        The counts; ``plan`` (files to parse: new, or another size or change token, or marked
        deleted in the catalogue) and ``gone`` (catalogue paths not yet marked deleted that
        are no longer listed) name the Parquet files written, when not empty.
    """
    instances = instance_parts(store)
    instances.recover()
    diff = diff_files(store, listing, instances.uris())
    bad = _rows_in(store, undecodable)
    return replace(diff, listed=diff.listed + bad, undecodable=bad) if bad else diff


def _rows_in(store: SiteStore, key: str) -> int:
    """Rows of a private Parquet work file of the store (0 when it does not exist)."""
    if not store.exists(key):
        return 0
    with store.open(key) as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def undecodable_records(store: SiteStore, key: str = UNDECODABLE) -> list[QuarantineRecord]:
    """Return the quarantine records of the files whose path is not UTF-8, sorted by item.

    Such a file has no catalogue row (the catalogue's paths are UTF-8 text every later stage
    opens the files by); it is quarantined as ``undecodable-name``, its ``item`` the escaped
    path (:func:`tasks.dicom.listing.escape_name`). The listing finds them again on every
    run, so these rows follow the source: a renamed or removed file's row leaves.

    Parameters
    ----------
    store
        The site store.
    key
        Store key of the escaped listing entries (:func:`tasks.dicom.listing.write_listing`).
    """
    if not store.exists(key):
        return []
    with store.open(key) as fh:
        paths = read_parquet(fh, ["path"]).column("path").to_pylist()
    return [undecodable_record(path) for path in sorted(set(paths))]


def replace_undecodable(store: SiteStore, records: list[QuarantineRecord]) -> bool:
    """Replace the ``undecodable-name`` rows of the quarantine, keeping every other row.

    Returns
    -------
    bool
        True when the table changed (an unchanged source writes nothing).
    """
    wanted = [r.to_row() for r in records]
    rows = store.quarantine_rows(Stage.INGEST)
    if _undecodable_rows(rows) == sorted(wanted, key=_by_item):
        return False  # the nightly case: nothing to rewrite
    return _replace_ingest_quarantine(store, [], set(), records)


def _by_item(row: dict[str, Any]) -> str:
    return row["item"]


def _is_undecodable_file(row: dict[str, Any]) -> bool:
    """Whether a quarantine row is a DICOM source file's ``undecodable-name`` row.

    NIfTI/NRRD ingest (kind ``volume``) keeps its own rows of that reason.
    """
    return row["reason"] == Reason.UNDECODABLE_NAME and row["kind"] == Kind.FILE


def _undecodable_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(filter(_is_undecodable_file, rows), key=_by_item)


def diff_files(store: SiteStore, listing: str, catalogue: Sequence[str]) -> ListingDiff:
    """Diff a listing with catalogue rows; see :func:`diff_catalog`.

    Parameters
    ----------
    store
        The site store (the plan and the deleted paths are written to its private zone).
    listing
        Store key of the listing.
    catalogue
        URLs of Parquet files with the catalogue's path, size, mtime and status columns.
    """
    con = store.connect_duckdb()
    spill = _bound(con)
    try:
        listed_uri = _q(store.uri(listing))
        con.execute(
            f"CREATE TEMP VIEW listed AS SELECT path, size, mtime FROM read_parquet('{listed_uri}')"
        )
        (listed,) = con.execute("SELECT count(*) FROM listed").fetchall()[0]
        if catalogue:
            con.execute(
                "CREATE TEMP VIEW cat AS SELECT path, size, mtime, status FROM "
                f"read_parquet({sql_list(list(catalogue))})"
            )
            _join_in_buckets(con, listed)
            todo, gone_sql = "todo", "SELECT path FROM gone_rows ORDER BY path"
        else:  # a first ingest: every file is new, none deleted
            todo, gone_sql = "(SELECT *, true AS is_new FROM listed)", ""
        # con.sql(...).to_arrow_reader streams the result (con.execute's would copy it whole)
        plan = con.sql(
            f"SELECT path, size, mtime, is_new FROM {todo} ORDER BY path"
        ).to_arrow_reader(RESULT_ROWS)
        new = 0

        def files() -> Iterator[pa.RecordBatch]:
            nonlocal new
            for batch in plan:
                new += pc.sum(batch.column("is_new")).as_py() or 0
                yield batch.select(list(LISTING_SCHEMA.names))

        to_parse = write_batches(store, PLAN, files(), LISTING_SCHEMA)
        gone = con.sql(gone_sql).to_arrow_reader(RESULT_ROWS) if gone_sql else []
        deleted = write_batches(store, GONE, gone, _GONE_SCHEMA)
    finally:
        con.close()
        spill.cleanup()
    return ListingDiff(
        listed=listed,
        new=new,
        changed=to_parse - new,
        deleted=deleted,
        plan=PLAN if to_parse else None,
        gone=GONE if deleted else None,
    )


#: Rows of the listing (or of the catalogue) joined at once: above it, the diff joins the two
#: in buckets of paths (by hash), each within DuckDB's memory limit. 2,000,000 rows join in
#: 64 MB; 20,000,000 at once would need more than 128 MB.
DIFF_BUCKET_ROWS = 2_000_000


def _join_in_buckets(con: duckdb.DuckDBPyConnection, listed: int) -> None:
    """Join the views ``listed`` and ``cat`` one bucket of paths at a time.

    Fills the temporary tables ``todo`` (files to parse, unsorted) and ``gone_rows`` (deleted
    paths). DuckDB's hash join spills, but its partitions grow with the tables; buckets of at most
    :data:`DIFF_BUCKET_ROWS` keep what it holds bounded whatever the archive's size (each
    bucket reads both sources again, which costs far less than listing the source).
    """
    rows = max(listed, con.execute("SELECT count(*) FROM cat").fetchall()[0][0])
    buckets = max(1, math.ceil(rows / DIFF_BUCKET_ROWS))
    con.execute("CREATE TEMP TABLE todo (path VARCHAR, size BIGINT, mtime VARCHAR, is_new BOOLEAN)")
    con.execute("CREATE TEMP TABLE gone_rows (path VARCHAR)")
    deleted = {"deleted": STATUS_DELETED}
    for bucket in range(buckets):
        part = f"WHERE hash(path) % {buckets} = {bucket}"
        con.execute(
            "INSERT INTO todo SELECT l.path, l.size, l.mtime, c.path IS NULL "
            f"OR c.status = $deleted FROM (SELECT * FROM listed {part}) l "
            f"LEFT JOIN (SELECT * FROM cat {part}) c ON c.path = l.path WHERE c.path IS NULL "
            "OR c.status = $deleted OR c.size IS DISTINCT FROM l.size "
            "OR c.mtime IS DISTINCT FROM l.mtime",
            deleted,
        )
        con.execute(
            f"INSERT INTO gone_rows SELECT c.path FROM (SELECT * FROM cat {part}) c "
            f"ANTI JOIN (SELECT path FROM listed {part}) l ON c.path = l.path "
            "WHERE c.status IS DISTINCT FROM $deleted",
            deleted,
        )


def planned_files(store: SiteStore, diff: ListingDiff) -> Iterator[ListedFile]:
    """Yield the files to parse of a diff, sorted by path, reading its plan in pieces."""
    if diff.plan is None:
        return
    with store.open(diff.plan) as fh:
        yield from files_from_parquet(parquet_file(fh))


def deleted_paths(store: SiteStore, diff: ListingDiff) -> Iterator[str]:
    """Yield the paths a diff found deleted, sorted, reading them in pieces."""
    if diff.gone is None:
        return
    with store.open(diff.gone) as fh:
        plan = parquet_file(fh)
        for batch in plan.iter_batches(RESULT_ROWS, columns=["path"], use_threads=False):
            yield from batch.column("path").to_pylist()


@dataclass(frozen=True)
class ParsedParts:
    """The batch part files of this run, read by DuckDB inside the merge (never loaded whole).

    Attributes
    ----------
    keys
        Store-relative keys of the part files.
    """

    keys: tuple[str, ...] = ()


def read_parsed(store: SiteStore, parts: Iterable[str]) -> ParsedParts:
    """Check the batch part files of this run exist and return them for :func:`merge_catalog`.

    Raises
    ------
    OncoflowError
        When a part file is missing.
    """
    keys = tuple(parts)
    if any(not store.exists(key) for key in keys):
        raise OncoflowError("a batch part file is missing from the store")
    return ParsedParts(keys)


#: DuckDB's memory for the merge; beyond it DuckDB spills to a temporary folder. It bounds
#: what a merge adds to the command's peak memory whatever the size of the archive.
MERGE_MEMORY = "64MB"


def _bound(con: duckdb.DuckDBPyConnection) -> tempfile.TemporaryDirectory:
    """Bound a connection's memory: one thread, :data:`MERGE_MEMORY`, then spilling.

    Returns the private temporary folder it spills to, for the caller to clean up.
    """
    spill = tempfile.TemporaryDirectory(prefix="oncoflow-duckdb-")
    con.execute("SET threads TO 1")
    con.execute(f"SET memory_limit = '{MERGE_MEMORY}'")
    con.execute(f"SET temp_directory = '{_q(spill.name)}'")
    con.execute("SET preserve_insertion_order = false")
    return spill


def remove_parts(store: SiteStore) -> None:
    """Delete the batch part files (after a merge, or left over by a crashed run)."""
    store.remove(PARTS_DIR)


#: Rows handed to :func:`build_series` at once (whole series; memory bounded by this).
BUILD_CHUNK_ROWS = 2_000


def merge_catalog(
    store: SiteStore,
    diff: ListingDiff,
    parsed: ParsedParts | pa.Table | Sequence[dict[str, Any]],
    tolerance: float,
    metadata: dict[str, str] | None = None,
    undecodable: list[QuarantineRecord] | None = None,
) -> CatalogCounts:
    """Merge parsed rows into the catalogue, rebuilding only the series they touch.

    The affected rows are the parsed and deleted files, every row of a series one of them
    belongs (or belonged) to, and every row sharing a SOP Instance UID with those (duplicate
    detection), closed under both relations. They are selected with DuckDB over the parts,
    rebuilt by :func:`~tasks.dicom.series.build_series` a few thousand rows at a time, and
    written as new parts; the parts that held superseded rows are replaced, all others are
    left untouched. Without a current catalogue (first run, new rules or new source metadata)
    everything is affected.

    Parameters
    ----------
    store
        The site store.
    diff
        The listing diff this run was planned from.
    parsed
        Rows of the files parsed in this run: their batch part files (:func:`read_parsed`), an
        Arrow table or row dicts. Files that were to be parsed but have no row (their batch
        failed) keep their previous row, if any, so the next run retries them.
    tolerance
        Slice-gap tolerance (fraction of the median gap).
    metadata
        Extra Parquet schema metadata for the catalogue tables (e.g. the SOURCE URL).
    undecodable
        The ``undecodable-name`` rows of this listing (:func:`undecodable_records`), which
        replace the previous ones; None keeps the previous ones.

    Returns
    -------
    CatalogCounts
        Counts and the tables written.
    """
    instances, series = instance_parts(store), series_parts(store)
    everything = not catalog_is_current(store, metadata)
    metadata = {**(metadata or {}), VERSION_KEY: CATALOG_VERSION}
    counts = CatalogCounts()
    con = store.connect_duckdb()
    spill = _bound(con)
    try:
        if isinstance(parsed, ParsedParts) and parsed.keys:
            uris = sql_list([store.uri(k) for k in parsed.keys])
            con.execute(f"CREATE TEMP VIEW fresh AS SELECT * FROM read_parquet({uris})")
        else:
            rows = [] if isinstance(parsed, ParsedParts) else parsed
            fresh = rows if isinstance(rows, pa.Table) else rows_to_table(list(rows))
            con.register("fresh", fresh.cast(INSTANCE_SCHEMA))
        if diff.gone:
            gone = _q(store.uri(diff.gone))
            con.execute(f"CREATE TEMP TABLE gone AS SELECT path FROM read_parquet('{gone}')")
        else:
            con.execute("CREATE TEMP TABLE gone (path VARCHAR)")
        old_uris = instances.uris()
        if old_uris:
            old_sql = f"SELECT * FROM read_parquet({sql_list(old_uris)})"
            con.execute(f"CREATE TEMP VIEW old AS {old_sql}")
        else:
            con.execute("CREATE TEMP VIEW old AS SELECT * FROM fresh LIMIT 0")
        _select_affected(con, everything)
        _mark_duplicates(con)
        paths_before = _parts_holding(con, old_uris, "path", "SELECT path FROM cur")
        series_uris = series.uris()
        series_before = _parts_holding(
            con, series_uris, "series_instance_uid", "SELECT uid FROM a_series"
        )
        old_series_keys = _old_series_keys(con, series_uris)
        built_quarantine: list[QuarantineRecord] = []
        new_series: list[pa.Table] = []

        def instance_tables():
            for build in _builds(con, tolerance):
                built_quarantine.extend(build.quarantine)
                new_series.append(series_table(build.series))
                yield rows_to_table(build.instances)

        def parts_bytes(
            table: PartedTable,
            new: Iterable[pa.Table],
            holding: dict[str, str],
            column: str,
            superseded: str,
            schema: pa.Schema,
        ) -> Iterator[bytes]:
            """Yield the new rows as parts, then each replaced part without its old rows."""
            yield from table.chunks(new, metadata)
            for uri in holding.values():
                kept = con.sql(
                    f"SELECT * FROM read_parquet('{_q(uri)}') WHERE {column} IS NULL "
                    f"OR {column} NOT IN ({superseded})"
                ).to_arrow_table()
                if kept.num_rows:
                    yield table.part_bytes(kept.cast(schema), metadata)

        replaced = parts_bytes(
            instances, instance_tables(), paths_before, "path", "SELECT path FROM cur",
            INSTANCE_SCHEMA,
        )  # fmt: skip
        if instances.replace(replaced, instances.parts() if everything else list(paths_before)):
            counts.written.append(CATALOG_INSTANCES)
        if new_series:
            new_series = [pa.concat_tables(new_series)]
        replaced = parts_bytes(
            series, new_series, series_before, "series_instance_uid", "SELECT uid FROM a_series",
            SERIES_SCHEMA,
        )  # fmt: skip
        if series.replace(replaced, series.parts() if everything else list(series_before)):
            counts.written.append(CATALOG_SERIES)
        affected_items: set[str] | None = None  # everything: all ingest rows are replaced
        if not everything:
            affected_items = set(old_series_keys) | {
                p for (p,) in con.execute("SELECT path FROM cur").fetchall()
            }
            affected_items |= {k for t in new_series for k in t.column("series_key").to_pylist()}
    finally:
        con.close()
        spill.cleanup()
    for table in (instances, series):
        table.compact(metadata)
    if _replace_ingest_quarantine(store, built_quarantine, affected_items, undecodable):
        counts.written.append(QUARANTINE)
    fill_counts(counts, store)
    return counts


def _q(text: str) -> str:
    return text.replace("'", "''")


def _select_affected(con: duckdb.DuckDBPyConnection, everything: bool) -> None:
    """Create ``a_series`` (affected series UIDs) and ``cur`` (the affected rows, updated)."""
    con.execute("CREATE TEMP TABLE touched AS SELECT path FROM fresh UNION SELECT path FROM gone")
    if everything:
        con.execute("CREATE TEMP TABLE affected_old AS SELECT * FROM old")
    else:
        seeds = (
            "SELECT * FROM fresh UNION ALL BY NAME "
            "SELECT * FROM old WHERE path IN (SELECT path FROM touched)"
        )
        con.execute(
            f"CREATE TEMP TABLE a_sop AS SELECT DISTINCT sop_instance_uid AS uid FROM ({seeds}) "
            "WHERE sop_instance_uid IS NOT NULL AND sop_instance_uid <> ''"
        )
        con.execute(
            "CREATE TEMP TABLE a_ser AS SELECT DISTINCT series_instance_uid AS uid FROM "
            f"({seeds}) WHERE series_instance_uid IS NOT NULL"
        )
        for _ in range(50):  # closure: series of shared SOP UIDs, SOP UIDs of those series
            added = con.execute(
                "INSERT INTO a_ser SELECT DISTINCT series_instance_uid FROM old WHERE "
                "sop_instance_uid IN (SELECT uid FROM a_sop) AND series_instance_uid IS NOT "
                "NULL AND series_instance_uid NOT IN (SELECT uid FROM a_ser)"
            ).fetchone()[0]
            added += con.execute(
                "INSERT INTO a_sop SELECT DISTINCT sop_instance_uid FROM old WHERE "
                "series_instance_uid IN (SELECT uid FROM a_ser) AND sop_instance_uid IS NOT "
                "NULL AND sop_instance_uid <> '' AND sop_instance_uid NOT IN "
                "(SELECT uid FROM a_sop)"
            ).fetchone()[0]
            if not added:
                break
        con.execute(
            "CREATE TEMP TABLE affected_old AS SELECT * FROM old WHERE path IN "
            "(SELECT path FROM touched) OR series_instance_uid IN (SELECT uid FROM a_ser) "
            "OR sop_instance_uid IN (SELECT uid FROM a_sop)"
        )
    con.execute(
        "CREATE TEMP TABLE cur AS SELECT * FROM fresh UNION ALL BY NAME "
        "SELECT * REPLACE ("
        f"  CASE WHEN path IN (SELECT path FROM gone) THEN '{STATUS_DELETED}' ELSE status END"
        "   AS status,"
        "  CASE WHEN path IN (SELECT path FROM gone) THEN '' ELSE reason END AS reason,"
        "  CASE WHEN path IN (SELECT path FROM gone) THEN '' ELSE detail END AS detail)"
        " FROM affected_old WHERE path NOT IN (SELECT path FROM fresh)"
    )
    con.execute(
        "CREATE TEMP TABLE a_series AS SELECT DISTINCT series_instance_uid AS uid FROM "
        "affected_old WHERE series_instance_uid IS NOT NULL UNION SELECT DISTINCT "
        "series_instance_uid FROM cur WHERE series_instance_uid IS NOT NULL"
    )


def _mark_duplicates(con: duckdb.DuckDBPyConnection) -> None:
    """Quarantine every affected file whose SOP Instance UID an earlier path has.

    What :func:`~tasks.dicom.series.mark_duplicates` does, over the affected rows.
    """
    derived = ", ".join(f"'{r}'" for r in sorted(DERIVED_REASONS))
    con.execute(
        f"UPDATE cur SET status = '{STATUS_OK}', reason = '', detail = '' "
        f"WHERE status = '{STATUS_QUARANTINED}' AND reason IN ({derived})"
    )
    con.execute(
        f"UPDATE cur SET status = '{STATUS_QUARANTINED}', "
        f"reason = '{Reason.DUPLICATE_INSTANCE}', detail = ? WHERE path IN ("
        "  SELECT path FROM (SELECT path, row_number() OVER (PARTITION BY sop_instance_uid "
        f"  ORDER BY path) AS n FROM cur WHERE status = '{STATUS_OK}' AND sop_instance_uid "
        "  IS NOT NULL AND sop_instance_uid <> '') WHERE n > 1)",
        [DUPLICATE_DETAIL],
    )


def _parts_holding(
    con: duckdb.DuckDBPyConnection, uris: list[str], column: str, keys_sql: str
) -> dict[str, str]:
    """Return part key -> URI of the parts holding a row whose ``column`` is in ``keys_sql``."""
    if not uris:
        return {}
    found = con.execute(
        f"SELECT DISTINCT filename FROM read_parquet({sql_list(uris)}, filename = true) "
        f"WHERE {column} IN ({keys_sql})"
    ).fetchall()
    holding = {f for (f,) in found}
    return {_key_of(u): u for u in uris if u in holding}


def _key_of(uri: str) -> str:
    # part URIs end with <table key>/<part name>; keys are relative to the site root
    marker = "/catalog/"
    return "catalog/" + uri.rsplit(marker, 1)[1]


def _old_series_keys(con: duckdb.DuckDBPyConnection, uris: list[str]) -> list[str]:
    if not uris:
        return []
    return [
        k
        for (k,) in con.execute(
            f"SELECT series_key FROM read_parquet({sql_list(uris)}) WHERE series_instance_uid "
            "IN (SELECT uid FROM a_series)"
        ).fetchall()
    ]


def _builds(con: duckdb.DuckDBPyConnection, tolerance: float) -> Iterator[SeriesBuild]:
    """Build series from the affected rows, whole series at a time, in a fixed order.

    The series (with their row counts) are cut into groups of about :data:`BUILD_CHUNK_ROWS`
    rows and each group is read with its own query, so DuckDB never sorts all affected rows at
    once (that sort, held until the last row was read, grew with the archive).
    """
    order = "ORDER BY series_instance_uid, path"
    nulls = con.sql(
        "SELECT * FROM cur WHERE series_instance_uid IS NULL ORDER BY path"
    ).to_arrow_reader(4096)
    pending: list[dict[str, Any]] = []
    for batch in nulls:  # rows without a series UID: each is its own item
        pending.extend(batch.to_pylist())
        if len(pending) >= BUILD_CHUNK_ROWS:
            yield build_series(pending, tolerance, duplicates_marked=True)
            pending = []
    if pending:
        yield build_series(pending, tolerance, duplicates_marked=True)
    series = con.execute(
        "SELECT series_instance_uid, count(*) FROM cur WHERE series_instance_uid IS NOT NULL "
        "GROUP BY series_instance_uid ORDER BY series_instance_uid"
    ).fetchall()
    for first, last in _series_groups(series, BUILD_CHUNK_ROWS):
        rows = con.sql(
            f"SELECT * FROM cur WHERE series_instance_uid >= '{_q(first)}' "
            f"AND series_instance_uid <= '{_q(last)}' {order}"
        ).to_arrow_table()
        yield build_series(rows.to_pylist(), tolerance, duplicates_marked=True)
        del rows


def _series_groups(counts: Sequence[tuple[str, int]], rows: int) -> Iterator[tuple[str, str]]:
    """Cut sorted (series UID, row count) pairs into (first, last) UID ranges of ~``rows``."""
    first, total = None, 0
    for uid, n in counts:
        if first is None:
            first = uid
        total += n
        if total >= rows:
            yield first, uid
            first, total = None, 0
    if first is not None:
        yield first, counts[-1][0]


def _replace_ingest_quarantine(
    store: SiteStore,
    records: list[QuarantineRecord],
    items: set[str] | None,
    undecodable: list[QuarantineRecord] | None = None,
) -> bool:
    """Replace the ingest rows of the quarantine table.

    All of them (``items`` None) or only those about ``items`` (the affected files and series).
    The ``undecodable-name`` rows are apart (they name no catalogue row): replaced by
    ``undecodable``, or kept when it is None.
    """
    rows = store.quarantine_rows(Stage.INGEST)
    names = _undecodable_rows(rows) if undecodable is None else [r.to_row() for r in undecodable]
    if items is None:  # the NIfTI/NRRD ingest's rows are not this ingest's to drop
        kept = [r for r in rows if r["kind"] == Kind.VOLUME]
    else:
        kept = [r for r in rows if r["item"] not in items and not _is_undecodable_file(r)]
    kept.extend(r.to_row() for r in records)
    return replace_quarantine_rows(store, Stage.INGEST, kept + names)


def fill_counts(counts: CatalogCounts, store: SiteStore) -> CatalogCounts:
    """Fill ``counts`` from the tables in the store (one or two columns read per part)."""
    files: Counter[str] = Counter()
    for table in _column_batches(instance_parts(store), ["status"]):
        files.update(_value_counts(table, "status"))
    rows = store.quarantine_rows(Stage.INGEST)
    # a file whose name is not UTF-8 has a quarantine row and no catalogue row
    undecodable = sum(map(_is_undecodable_file, rows))
    if undecodable:
        files[STATUS_QUARANTINED] += undecodable
    counts.files = dict(sorted(files.items()))
    by_status: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    by_modality: dict[str, Counter[str]] = {}
    for table in _column_batches(series_parts(store), ["modality", "status", "reason"]):
        for (modality, status, reason), n in Counter(
            zip(
                table.column("modality").fill_null("").to_pylist(),
                table.column("status").to_pylist(),
                table.column("reason").fill_null("").to_pylist(),
                strict=True,
            )
        ).items():
            by_status[status] += n
            by_modality.setdefault(modality or "-", Counter())[status] += n
            if status != "ok":
                by_reason[reason or "-"] += n
    counts.series = dict(sorted(by_status.items()))
    counts.series_reasons = dict(sorted(by_reason.items()))
    counts.series_by_modality = {m: dict(sorted(c.items())) for m, c in sorted(by_modality.items())}
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


def _column_batches(table: PartedTable, columns: list[str]) -> Iterator[pa.Table]:
    """Yield the given columns of each part of ``table`` (one part in memory at a time)."""
    for key in table.parts():
        part = table.store.read_table(key, columns)
        if part is not None:
            yield part


def _value_counts(table: pa.Table, column: str) -> dict[str, int]:
    if table.num_rows == 0:
        return {}
    result = pc.value_counts(table.column(column).fill_null(""))
    return {str(item["values"]): int(item["counts"]) for item in result.to_pylist()}


def catalog_views(store: SiteStore) -> dict[str, str]:
    """Return the view names and the URLs of the Parquet files that exist."""
    views = {}
    for name, table in (("instances", instance_parts(store)), ("series", series_parts(store))):
        if table.exists():
            views[name] = table.glob()
    quarantine = PartedTable(store, QUARANTINE, QUARANTINE_SORT)
    if quarantine.exists():
        views["quarantine"] = quarantine.glob()
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
    "ParsedParts",
    "catalog_is_current",
    "catalog_views",
    "connect_catalog",
    "deleted_paths",
    "diff_catalog",
    "diff_files",
    "fill_counts",
    "instance_parts",
    "merge_catalog",
    "planned_files",
    "read_parsed",
    "remove_parts",
    "replace_undecodable",
    "series_parts",
    "undecodable_records",
]

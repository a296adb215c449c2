"""Tables written as a folder of Parquet parts, changed in proportion to what changed.

A parted table keeps its contract path: ``catalog/instances.parquet`` is a folder whose
top-level ``part-<sha256>.parquet`` files are the table, read as one by
``pyarrow.dataset.dataset(folder)`` and by DuckDB's ``read_parquet('<folder>/*.parquet')``.
A change adds parts (the changed rows) and replaces the few parts that held superseded rows;
unchanged parts are never rewritten. Parts are named by their content hash, so the same rows
give the same files whatever the number of workers.

Writing goes through the store's operations (:meth:`SiteStore.stage_bytes`,
:meth:`SiteStore.write_bytes` with an explicit mode, :meth:`SiteStore.move`,
:meth:`SiteStore.remove`) as a small transaction kept beside the table, in
``<parent>/_txn.<name>/``:

1. new parts are staged under ``_txn.<name>/add/`` (invisible to readers);
2. ``_txn.<name>/journal.json`` is written (the commit point: it lists the parts to add and
   the parts to remove);
3. staged parts move into the table folder, replaced parts are removed, the transaction folder
   is removed.

A crash before step 2 leaves a transaction without journal, discarded by the next writer; a
crash after it is rolled forward by the next writer (every step can be repeated). So a killed
merge loses no row and duplicates none once the next run has started.

Why not Delta Lake (delta-rs) or Iceberg: their table is defined by a log, so a plain
``read_parquet('<folder>/*.parquet')`` sees removed files until a vacuum; delta-rs writes
through its own object-store client instead of the site's fsspec filesystem, and its file
names are random (byte-identical outputs are a contract here). Parts here are plain Parquet
written by pyarrow and read by pyarrow.dataset and DuckDB; the only hand-written piece is the
journal above, built on the store's commit operations.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.store import (
    Existing,
    SiteStore,
    empty_table,
    read_parquet,
    sha256_bytes,
    table_to_parquet_bytes,
)

PART_PREFIX = "part-"
#: Rows per part (a first ingest of 2 M instances gives 200 parts). It bounds the memory a
#: writer needs: one part's rows are held, sorted and encoded at a time.
PART_ROWS = 10_000
#: Parts with fewer rows than this are "small" (an increment's part, a part left by removals).
SMALL_PART_ROWS = PART_ROWS // 4
#: Compaction: when a table has more small parts than this, they are merged.
MAX_SMALL_PARTS = 16
#: Schema metadata key naming the sort columns of the table (readers sort by them).
SORT_KEY = "oncoflow.sort_key"


@dataclass(frozen=True)
class PartedTable:
    """One table of the site store kept as a folder of Parquet parts.

    Parameters
    ----------
    store
        The site store.
    key
        The table's contract key (``catalog/instances.parquet``): the folder of parts.
    sort_key
        Columns that order rows inside a part and in :meth:`read`.
    part_rows
        Rows per part (:data:`PART_ROWS`; fewer for wide tables such as the features table).
    """

    store: SiteStore
    key: str
    sort_key: tuple[str, ...]
    part_rows: int = PART_ROWS

    @property
    def txn(self) -> str:
        """Key of the table's transaction folder (beside the table)."""
        parent, _, name = self.key.rpartition("/")
        return f"{parent}/_txn.{name}" if parent else f"_txn.{name}"

    def is_single_file(self) -> bool:
        """Whether the table is still one Parquet file (the layout before parts)."""
        return self.store.is_file(self.key)

    def parts(self) -> list[str]:
        """Keys of the table's parts, sorted (none when the table does not exist)."""
        if self.is_single_file():
            return [self.key]
        return [
            k
            for k in self.store.children(self.key)
            if k.rsplit("/", 1)[-1].startswith(PART_PREFIX) and k.endswith(".parquet")
        ]

    def exists(self) -> bool:
        """Whether the table has at least one part."""
        return bool(self.parts())

    def uris(self) -> list[str]:
        """Full URLs of the parts (for DuckDB's ``read_parquet([...])``)."""
        return [self.store.uri(k) for k in self.parts()]

    def glob(self) -> str:
        """URL pattern matching exactly the parts (DuckDB views that follow later writes)."""
        if self.is_single_file():
            return self.store.uri(self.key)
        return self.store.uri(self.key) + f"/{PART_PREFIX}*.parquet"

    def part_schema(self) -> pa.Schema | None:
        """Return the schema of the first part, with its metadata (None without parts)."""
        parts = self.parts()
        if not parts:
            return None
        with self.store.open(parts[0]) as fh:
            return pq.read_schema(fh)

    def schema_metadata(self) -> dict[bytes, bytes]:
        """Return the table's schema metadata (its first part's; every part carries it)."""
        schema = self.part_schema()
        return dict(schema.metadata or {}) if schema is not None else {}

    def read(self, columns: list[str] | None = None) -> pa.Table | None:
        """Read the whole table (optionally some columns), sorted by :attr:`sort_key`.

        For small tables and tests; large tables are read with DuckDB.
        """
        return self.store.read_table(self.key, columns)

    # --- transactions ------------------------------------------------------------------------

    def recover(self) -> str:
        """Finish or discard a transaction a crashed writer left; return what was done.

        Returns
        -------
        str
            ``"rolled-forward"``, ``"discarded"`` or ``""`` (nothing to do).
        """
        journal_key = f"{self.txn}/journal.json"
        if self.store.exists(journal_key):
            self._roll_forward(json.loads(self.store.read_bytes(journal_key)))
            return "rolled-forward"
        if self.store.exists(self.txn):
            self.store.remove(self.txn)
            return "discarded"
        return ""

    def replace(
        self, add: Iterable[bytes], remove: Sequence[str], files: Mapping[str, bytes] | None = None
    ) -> bool:
        """Add parts and remove parts in one transaction (see the module docstring).

        Parameters
        ----------
        add
            Parquet bytes of the new parts.
        remove
            Keys of parts to remove (parts whose rows were superseded or merged).
        files
            Other objects of the table folder written in the same transaction, by name (such
            as ``_common_metadata``: names starting with ``_`` are not parts, and readers of
            the parts skip them); unchanged ones are not rewritten.

        Returns
        -------
        bool
            True when the table changed (identical parts are neither added nor removed).
        """
        self.recover()
        existing = set(self.parts())
        single = self.is_single_file()
        staged: list[str] = []
        for name, data in sorted((files or {}).items()):
            assert name.startswith("_") and "/" not in name, name
            key = f"{self.key}/{name}"
            if not single and self.store.exists(key) and self.store.read_bytes(key) == data:
                continue
            self.store.stage_bytes(f"{self.txn}/add/{name}", data)
            staged.append(name)
        for data in add:
            name = f"{PART_PREFIX}{sha256_bytes(data)[:32]}.parquet"
            if name in staged:
                continue
            if f"{self.key}/{name}" in existing:
                remove = [r for r in remove if r != f"{self.key}/{name}"]
                continue
            self.store.stage_bytes(f"{self.txn}/add/{name}", data)
            staged.append(name)
        gone = sorted({r.rsplit("/", 1)[-1] for r in remove if r in existing and r != self.key})
        if not staged and not gone and not (single and remove):
            self.store.remove(self.txn)
            return False
        journal = {"add": staged, "remove": gone, "single_file": bool(single and remove)}
        self.store.write_bytes(
            f"{self.txn}/journal.json", json.dumps(journal).encode(), mode=Existing.OVERWRITE
        )
        self._roll_forward(journal)
        return True

    def _roll_forward(self, journal: dict[str, Any]) -> None:
        if journal.get("single_file") and self.is_single_file():
            self.store.remove(self.key)  # the old one-file table, superseded by the parts
        self.store.move(f"{self.txn}/add", self.key, mode=Existing.OVERWRITE, select=_any)
        for name in journal.get("remove", []):
            self.store.remove(f"{self.key}/{name}")
        self.store.remove(self.txn)

    # --- writing -----------------------------------------------------------------------------

    def part_bytes(self, table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
        """Serialise one part: rows sorted by :attr:`sort_key`, table metadata attached."""
        order = [(c, "ascending") for c in self.sort_key]
        if table.num_rows > 1:
            table = table.sort_by(order)
        return table_to_parquet_bytes(
            table, {**(metadata or {}), SORT_KEY: ",".join(self.sort_key)}
        )

    def chunks(
        self, batches: Iterable[pa.Table], metadata: dict[str, str] | None = None
    ) -> Iterator[bytes]:
        """Group tables into parts of about :attr:`part_rows` rows; yield their bytes."""
        pending: list[pa.Table] = []
        rows = 0
        for batch in batches:
            if batch.num_rows == 0:
                continue
            pending.append(batch)
            rows += batch.num_rows
            if rows >= self.part_rows:
                yield self.part_bytes(pa.concat_tables(pending), metadata)
                pending, rows = [], 0
        if pending:
            yield self.part_bytes(pa.concat_tables(pending), metadata)

    def write(self, table: pa.Table, metadata: dict[str, str] | None = None) -> bool:
        """Replace the whole table by ``table`` (for small tables); unchanged parts stay.

        Returns
        -------
        bool
            True when the table changed.
        """
        parts = list(self.chunks([table], metadata)) or [self.part_bytes(table, metadata)]
        return self.replace(parts, self.parts())

    def update(
        self,
        rows: pa.Table,
        drop: Iterable[str] = (),
        *,
        key: str,
        metadata: dict[str, str] | None = None,
    ) -> bool:
        """Replace rows by key in one transaction, rewriting only the parts that held them.

        Rows of the table whose ``key`` is among ``rows``' keys or in ``drop`` leave; ``rows``
        arrive as new parts. Parts holding none of these keys are not touched. When the
        table's metadata differs from ``metadata`` (new settings), every part is rewritten so
        all of them carry it. Small parts are compacted afterwards.

        Parameters
        ----------
        rows
            New and changed rows (pass only rows that differ, or the parts holding them are
            rewritten for nothing).
        drop
            Keys whose rows leave the table.
        key
            The key column (string values, unique in the table).
        metadata
            Schema metadata every part carries.

        Returns
        -------
        bool
            True when the table changed.
        """
        self.recover()
        wanted = {**(metadata or {}), SORT_KEY: ",".join(self.sort_key)}
        current = self.schema_metadata()
        if current and any(current.get(k.encode()) != v.encode() for k, v in wanted.items()):
            return self._rewrite(rows, drop, key, metadata)
        superseded = sorted(set(rows.column(key).to_pylist()) | set(drop))
        if not superseded:
            return self._keep_empty(rows.schema, metadata)
        parts = self.parts()
        maybe, empty = self._may_hold(parts, key, superseded)
        if not maybe and not rows.num_rows and (not empty or empty == parts):
            return self._keep_empty(rows.schema, metadata)  # nothing held, nothing new
        # empty parts leave with the change (an empty table keeps one, see _keep_empty), so
        # the parts never depend on history
        changed = (
            self._replace_holding(rows, maybe, key, superseded, empty, metadata)
            if maybe
            else self.replace(self.chunks([rows], metadata), empty)
        )
        self.compact(metadata)
        return self._keep_empty(rows.schema, metadata) or changed

    def _replace_holding(
        self,
        rows: pa.Table,
        maybe: list[str],
        key: str,
        superseded: list[str],
        empty: list[str],
        metadata: dict[str, str] | None,
    ) -> bool:
        """Add ``rows``; rewrite the parts among ``maybe`` holding a superseded key without it."""
        keys_by_uri = {self.store.uri(k): k for k in maybe}
        con = self.store.connect_duckdb()
        try:
            con.register("superseded", pa.table({"k": pa.array(superseded, pa.string())}))
            holding = _holding(con, list(keys_by_uri), key)

            def parts() -> Iterator[bytes]:
                yield from self.chunks([rows], metadata)
                for uri in holding:
                    kept = con.sql(
                        f"SELECT * FROM read_parquet('{_q(uri)}') "
                        f'WHERE "{key}" NOT IN (SELECT k FROM superseded)'
                    ).to_arrow_table()
                    if kept.num_rows:
                        yield self.part_bytes(kept.cast(rows.schema), metadata)

            return self.replace(parts(), [keys_by_uri[u] for u in holding] + empty)
        finally:
            con.close()

    def _may_hold(
        self, parts: list[str], key: str, superseded: list[str]
    ) -> tuple[list[str], list[str]]:
        """Split parts by their footers: those that may hold a ``superseded`` key, empty ones.

        A part is left out of the first list when the statistics of its ``key`` column show
        every key out of the superseded ones' reach (quarantine parts hold one stage each: a
        stage with nothing quarantined, before and now, reads a few footers, no DuckDB).
        """
        maybe, empty = [], []
        for part in parts:
            with self.store.open(part) as fh:
                meta = pq.read_metadata(fh)
            if meta.num_rows == 0:
                empty.append(part)
            elif any(
                _may_contain(meta.row_group(g), key, superseded) for g in range(meta.num_row_groups)
            ):
                maybe.append(part)
        return maybe, empty

    def _keep_empty(self, schema: pa.Schema, metadata: dict[str, str] | None) -> bool:
        """Give a table left without rows one empty part, so it still exists for readers."""
        if self.parts():
            return False
        return self.replace([self.part_bytes(empty_table(schema), metadata)], [])

    def _rewrite(
        self, rows: pa.Table, drop: Iterable[str], key: str, metadata: dict[str, str] | None
    ) -> bool:
        """Rewrite the whole table with ``rows`` replacing and ``drop`` removing rows by key."""
        superseded = set(rows.column(key).to_pylist()) | set(drop)
        old = self.parts()

        def tables() -> Iterator[pa.Table]:
            yield rows
            for part in old:
                with self.store.open(part) as fh:
                    table = read_parquet(fh)
                mask = pa.array([k not in superseded for k in table.column(key).to_pylist()])
                yield table.filter(mask).cast(rows.schema)

        changed = self.replace(self.chunks(tables(), metadata), old)
        return self._keep_empty(rows.schema, metadata) or changed

    def compact(self, metadata: dict[str, str] | None = None) -> bool:
        """Merge the small parts when they are many (:meth:`compaction`), in one transaction.

        Returns
        -------
        bool
            True when parts were merged.
        """
        adds, removes = self.compaction(metadata)
        return self.replace(adds, removes) if adds else False

    def compaction(self, metadata: dict[str, str] | None = None) -> tuple[list[bytes], list[str]]:
        """Plan a compaction of the table's small parts.

        When the table has more than :data:`MAX_SMALL_PARTS` parts with fewer than a quarter
        of :attr:`part_rows` rows (:data:`SMALL_PART_ROWS` by default), they are merged into
        parts of normal size.

        Returns
        -------
        tuple
            Bytes of the merged parts and keys of the parts they replace (empty when there is
            nothing to compact).
        """
        small = []
        for key in self.parts():
            if key == self.key:
                continue
            with self.store.open(key) as fh:
                if pq.ParquetFile(fh).metadata.num_rows < self.part_rows // 4:
                    small.append(key)
        if len(small) <= MAX_SMALL_PARTS:
            return [], []

        def tables() -> Iterator[pa.Table]:
            for key in small:
                with self.store.open(key) as fh:
                    yield read_parquet(fh)

        return list(self.chunks(tables(), metadata)), small


def _any(_: str) -> bool:
    return True


def _q(text: str) -> str:
    return text.replace("'", "''")


def sql_list(uris: Sequence[str]) -> str:
    """Return a DuckDB list literal of URLs (``read_parquet([...])``)."""
    return "[" + ", ".join(f"'{_q(u)}'" for u in uris) + "]"


def _may_contain(group: Any, key: str, ordered: list[str]) -> bool:
    """Whether a row group's ``key`` statistics leave room for one of ``ordered`` (sorted)."""
    names = [group.column(c).path_in_schema for c in range(group.num_columns)]
    if key not in names:
        return True
    stats = group.column(names.index(key)).statistics
    if stats is None or not stats.has_min_max:
        return True
    low, high = stats.min, stats.max
    if not isinstance(low, str) or not isinstance(high, str):
        return True  # only string keys are compared (every table's key is one)
    first = bisect.bisect_left(ordered, low)
    return first < len(ordered) and ordered[first] <= high


def _holding(con: Any, uris: list[str], key: str) -> list[str]:
    """URIs of the parts holding a row whose ``key`` is in the registered ``superseded``."""
    listed = sql_list(uris)
    found = {
        f
        for (f,) in con.execute(
            f"SELECT DISTINCT filename FROM read_parquet({listed}, filename = true) "
            f'WHERE "{key}" IN (SELECT k FROM superseded)'
        ).fetchall()
    }
    return [u for u in uris if u in found]

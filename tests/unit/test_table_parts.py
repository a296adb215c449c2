"""Tables in parts: one table for pyarrow.dataset and DuckDB, transactions that survive a crash."""

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

import tasks.table_parts as table_parts
from tasks.quarantine import replace_quarantine
from tasks.store import SiteStore
from tasks.table_parts import PartedTable
from tests.kill_switch import KILL_AT_STORE_CALL


def rows(start: int, n: int) -> pa.Table:
    return pa.table({"key": [f"k{i:05d}" for i in range(start, start + n)], "v": list(range(n))})


@pytest.fixture()
def table(tmp_path: Path) -> PartedTable:
    return PartedTable(SiteStore(str(tmp_path / "store"), "site-a"), "t/data.parquet", ("key",))


def keys_seen(table: PartedTable) -> list[str]:
    """Keys as DuckDB reads them through the folder's glob (duplicates kept)."""
    con = duckdb.connect()
    try:
        return [
            k for (k,) in con.execute(f"SELECT key FROM read_parquet('{table.glob()}')").fetchall()
        ]
    finally:
        con.close()


def test_parts_read_as_one_table_and_identical_parts_change_nothing(table):
    first = table.part_bytes(rows(0, 5))
    assert table.replace([first, table.part_bytes(rows(5, 3))], []) is True
    folder = table.store.path(table.key)
    assert ds.dataset(folder, format="parquet").count_rows() == 8
    assert sorted(keys_seen(table)) == [f"k{i:05d}" for i in range(8)]
    assert table.read().column("key").to_pylist() == sorted(keys_seen(table))
    before = table.store.table_files(table.key)
    assert table.replace([first], []) is False  # the same content is already a part
    assert table.store.table_files(table.key) == before
    # replacing a part: its rows leave, the new ones arrive
    (old_first,) = [k for k in table.parts() if before[k] == first]
    assert table.replace([table.part_bytes(rows(0, 2))], [old_first]) is True
    assert sorted(keys_seen(table)) == [f"k{i:05d}" for i in (0, 1, 5, 6, 7)]


class Crash(Exception):
    """Stands for the process being killed at this point."""


def crash_store_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the store's writing operations raise :class:`Crash` at call ``step`` (from 0)."""
    calls = {"n": 0}
    for name in ("stage_bytes", "write_bytes", "move", "remove"):
        real = getattr(SiteStore, name)

        def failing(self, *args, _real=real, **kwargs):
            calls["n"] += 1
            if calls["n"] == step + 1:
                raise Crash()
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(SiteStore, name, failing)


@pytest.mark.parametrize("crash_at", range(6))
def test_a_writer_killed_at_any_step_loses_and_duplicates_no_row(table, monkeypatch, crash_at):
    """The store operations a transaction makes fail at step ``crash_at``; the next writer's
    recovery then leaves either the old rows or the new rows, each exactly once."""
    table.replace([table.part_bytes(rows(0, 4)), table.part_bytes(rows(4, 4))], [])
    old_keys = sorted(keys_seen(table))
    victim = next(k for k in table.parts() if "k00000" in str(table.store.read_table(k)))
    new = [table.part_bytes(rows(0, 2)), table.part_bytes(rows(100, 3))]
    expected_new = sorted([f"k{i:05d}" for i in (0, 1, 4, 5, 6, 7, 100, 101, 102)])

    store = table.store
    crash_store_at(monkeypatch, crash_at)
    try:
        table.replace(new, [victim])
        crashed = False
    except Crash:
        crashed = True
    monkeypatch.undo()
    outcome = PartedTable(store, table.key, table.sort_key).recover()
    seen = sorted(keys_seen(table))
    assert seen in (old_keys, expected_new), (crash_at, crashed, outcome, seen)
    assert len(seen) == len(set(seen))
    assert crashed  # six store operations: two stagings, the journal, a move, two removals
    if crash_at >= 3:  # the journal was written (the commit point): rolled forward
        assert seen == expected_new
    else:  # killed before the commit point: the old table
        assert seen == old_keys
    assert not store.exists(table.txn)


def test_many_small_parts_are_compacted(table, monkeypatch):
    monkeypatch.setattr(table_parts, "MAX_SMALL_PARTS", 4)
    for i in range(6):
        table.replace([table.part_bytes(rows(10 * i, 3))], [])
    assert len(table.parts()) == 6
    adds, removes = table.compaction()
    assert len(adds) == 1 and len(removes) == 6
    table.replace(adds, removes)
    assert len(table.parts()) == 1
    assert sorted(keys_seen(table)) == sorted(
        f"k{10 * i + j:05d}" for i in range(6) for j in range(3)
    )


KILLED_WRITER = (
    KILL_AT_STORE_CALL
    + """
import pyarrow as pa
from tasks.table_parts import PartedTable

store = SiteStore(root, "site-a")
table = PartedTable(store, "t/data.parquet", ("key",))
rows = lambda a, n: pa.table({"key": [f"k{i:05d}" for i in range(a, a + n)], "v": list(range(n))})
victim = next(k for k in table.parts() if "k00000" in str(store.read_table(k)))
table.replace([table.part_bytes(rows(0, 2)), table.part_bytes(rows(100, 3))], [victim])
"""
)


@pytest.mark.parametrize(
    ("operation", "call"), [("stage_bytes", 2), ("move", 1), ("remove", 1), ("remove", 2)]
)
def test_a_writer_killed_with_sigkill_loses_and_duplicates_no_row(tmp_path, operation, call):
    """The writer process is SIGKILLed inside a store operation of the transaction; the next
    writer's recovery leaves the old or the new rows, each exactly once."""
    import subprocess
    import sys

    store = SiteStore(str(tmp_path / "store"), "site-a")
    table = PartedTable(store, "t/data.parquet", ("key",))
    table.replace([table.part_bytes(rows(0, 4)), table.part_bytes(rows(4, 4))], [])
    old = sorted(keys_seen(table))
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "store"), str(call), operation],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    PartedTable(store, table.key, table.sort_key).recover()
    seen = sorted(keys_seen(table))
    new = sorted(f"k{i:05d}" for i in (0, 1, 4, 5, 6, 7, 100, 101, 102))
    assert seen == (old if operation == "stage_bytes" else new)
    assert len(seen) == len(set(seen))


def test_update_replaces_rows_by_key_and_leaves_other_parts(table):
    table.replace([table.part_bytes(rows(0, 4)), table.part_bytes(rows(4, 4))], [])
    before = table.store.table_files(table.key)
    changed = pa.table({"key": ["k00001", "k00009"], "v": [100, 9]})
    assert table.update(changed, ["k00002"], key="key") is True
    got = dict(zip(*table.read().to_pydict().values(), strict=True))
    assert got == {
        "k00000": 0,
        "k00001": 100,
        "k00003": 3,
        **{f"k{i:05d}": i - 4 for i in (4, 5, 6, 7)},
        "k00009": 9,
    }
    after = table.store.table_files(table.key)
    assert sum(1 for k in before if k in after) == 1  # the part of k4..k7 was not rewritten
    assert table.update(changed.slice(0, 0), [], key="key") is False
    assert table.store.table_files(table.key) == after
    # new metadata: every part rewritten and carries it; rows unchanged
    assert table.update(changed.slice(0, 0), [], key="key", metadata={"m": "2"}) is True
    assert table.schema_metadata()[b"m"] == b"2"
    assert dict(zip(*table.read().to_pydict().values(), strict=True)) == got
    # every row removed: one empty part remains, so the table still exists
    assert table.update(changed.slice(0, 0), list(got), key="key", metadata={"m": "2"}) is True
    assert table.exists() and table.read().num_rows == 0


def test_quarantine_in_parts_one_stage_replaced_at_a_time(tmp_path):
    from tasks.records import QuarantineRecord, Reason, Stage

    store = SiteStore(str(tmp_path), "site-a")
    assert replace_quarantine(store, Stage.INGEST, []) is True  # the table exists, empty
    assert store.read_table("quarantine.parquet").num_rows == 0
    ingest = [QuarantineRecord("Ó Briain/ά.dcm", "file", Stage.INGEST, Reason.NOT_DICOM)]
    deid = [QuarantineRecord("s1", "series", Stage.DEIDENTIFY, Reason.DEID_ERROR, "x")]
    assert replace_quarantine(store, Stage.INGEST, ingest) is True
    assert replace_quarantine(store, Stage.DEIDENTIFY, deid) is True
    parts = store.table_files("quarantine.parquet")
    assert len(parts) == 2  # one per stage, the empty part gone
    assert replace_quarantine(store, Stage.DEIDENTIFY, deid) is False
    assert replace_quarantine(store, Stage.INGEST, ingest) is False
    assert store.table_files("quarantine.parquet") == parts
    assert [r["item"] for r in store.quarantine_rows(Stage.INGEST)] == ["Ó Briain/ά.dcm"]
    assert replace_quarantine(store, Stage.INGEST, []) is True
    assert [r["stage"] for r in store.quarantine_rows()] == ["deidentify"]
    deid_part = [k for k in parts if b"deidentify" in parts[k]]
    assert list(store.table_files("quarantine.parquet")) == deid_part
    # a stage with nothing quarantined, before and now: no change, found from the footers alone
    assert replace_quarantine(store, Stage.EXTRACT, []) is False
    assert list(store.table_files("quarantine.parquet")) == deid_part
    quarantine = PartedTable(store, "quarantine.parquet", ("stage",))
    assert quarantine._may_hold(quarantine.parts(), "stage", ["extract", "ingest"]) == ([], [])
    assert quarantine._may_hold(quarantine.parts(), "stage", ["deidentify"]) == (deid_part, [])


def test_parts_that_cannot_hold_a_key_are_told_by_their_footers(table):
    table.replace([table.part_bytes(rows(0, 4)), table.part_bytes(rows(4, 4))], [])
    by_first = {table.store.read_table(k).column("key")[0].as_py(): k for k in table.parts()}
    first, second = by_first["k00000"], by_first["k00004"]
    assert table._may_hold(table.parts(), "key", ["k00002"]) == ([first], [])
    both = sorted([first, second])
    assert table._may_hold(table.parts(), "key", ["k00003", "k00005"]) == (both, [])
    assert table._may_hold(table.parts(), "key", ["a", "k00008", "z"]) == ([], [])
    assert table._may_hold(table.parts(), "v", ["0"]) == (both, [])  # not a string column
    table.update(rows(0, 0), [f"k{i:05d}" for i in range(8)], key="key")  # every row leaves
    (kept,) = table.parts()
    assert table._may_hold(table.parts(), "key", ["k00001"]) == ([], [kept])
    assert table.update(rows(0, 0), ["k00001"], key="key") is False  # the empty part stays
    assert table.update(rows(3, 1), [], key="key") is True  # rows arrive, the empty part goes
    assert kept not in table.parts() and table.read().column("key").to_pylist() == ["k00003"]

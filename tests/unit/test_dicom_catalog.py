"""Merging parsed rows into the catalogue (no Prefect, no Dask: the plain functions)."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.dicom import catalog
from tasks.dicom.catalog import (
    CATALOG_VERSION,
    LISTING,
    catalog_is_current,
    connect_catalog,
    deleted_paths,
    diff_catalog,
    merge_catalog,
    planned_files,
    remove_parts,
)
from tasks.dicom.headers import parse_files
from tasks.dicom.listing import ListingDiff, write_listing
from tasks.errors import OncoflowError
from tasks.store import SiteStore
from tests.dicom_factory import write_series


@dataclass
class Ingest:
    """What one ingest without the runtime found: the diff, the files it planned and deleted."""

    diff: ListingDiff
    to_parse: list[str]
    deleted: list[str]


def _ingest(source, store):
    """Listing, diff, parse of what changed, merge: the flow's steps without the runtime."""
    write_listing(str(source), store, LISTING)
    diff = diff_catalog(store, LISTING)
    files = list(planned_files(store, diff))
    rows = parse_files(str(source), files)
    done = Ingest(diff, [f.path for f in files], list(deleted_paths(store, diff)))
    counts = merge_catalog(store, diff, rows, 0.01, metadata={"source": str(source)})
    remove_parts(store)
    return done, counts


def _bytes(store):
    keys = ("catalog/instances.parquet", "catalog/series.parquet", "quarantine.parquet")
    return {k: store.table_files(k) for k in keys}


@pytest.fixture()
def source(tmp_path):
    write_series(tmp_path / "src" / "p1" / "ct", 4)
    write_series(tmp_path / "src" / "p1" / "gap", 0, offsets=[0, 2.5, 7.5, 10, 12.5])
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    return tmp_path / "src"


def test_first_merge_writes_the_three_tables(tmp_path, source):
    store = SiteStore(str(tmp_path / "store"), "site-a")
    done, counts = _ingest(source, store)
    assert done.diff.new == done.diff.listed == len(done.to_parse) == 10
    assert done.to_parse == sorted(done.to_parse)
    assert counts.files == {"ok": 9, "quarantined": 1}
    assert counts.series == {"ok": 1, "quarantined": 1}
    assert counts.series_by_modality == {"CT": {"ok": 1, "quarantined": 1}}
    assert counts.reasons == {"missing-slice": 1, "not-dicom": 1}
    assert sorted(counts.written) == [
        "catalog/instances.parquet",
        "catalog/series.parquet",
        "quarantine.parquet",
    ]
    # artifact rows: opaque references only
    assert {q["reason"] for q in counts.quarantine} == {"missing-slice", "not-dicom"}
    assert all("notes" not in q["ref"] and len(q["ref"]) == 12 for q in counts.quarantine)
    meta = store.read_table("catalog/series.parquet").schema.metadata
    assert meta[b"oncoflow.catalog_version"] == CATALOG_VERSION.encode()
    assert meta[b"source"] == str(source).encode()
    instances = store.read_table("catalog/instances.parquet")
    assert instances.column("path").to_pylist() == sorted(instances.column("path").to_pylist())


def test_rerun_changes_nothing(tmp_path, source):
    store = SiteStore(str(tmp_path / "store"), "site-a")
    _ingest(source, store)
    before = _bytes(store)
    done, counts = _ingest(source, store)
    assert done.to_parse == [] and done.deleted == [] and done.diff.is_empty
    assert done.diff.unchanged == 10
    assert counts.written == []
    assert _bytes(store) == before
    assert catalog_is_current(store)


def test_deleted_and_changed_files(tmp_path, source):
    store = SiteStore(str(tmp_path / "store"), "site-a")
    _ingest(source, store)
    (source / "p1" / "ct" / "IM0004.dcm").unlink()
    (source / "notes.txt").write_text("changed notes, longer")
    done, counts = _ingest(source, store)
    assert done.deleted == ["p1/ct/IM0004.dcm"] and done.diff.deleted == 1
    assert done.to_parse == ["notes.txt"] and done.diff.changed == 1 and done.diff.new == 0
    assert counts.files == {"deleted": 1, "ok": 8, "quarantined": 1}
    table = store.read_table("catalog/instances.parquet").to_pylist()
    gone = next(r for r in table if r["path"] == "p1/ct/IM0004.dcm")
    assert gone["status"] == "deleted" and gone["sop_instance_uid"]  # the row is kept
    series = store.read_table("catalog/series.parquet").to_pylist()
    ct = next(s for s in series if s["status"] == "ok")
    assert ct["n_instances"] == 3
    # the file comes back: parsed again, ok again
    shutil.copy(source / "p1" / "ct" / "IM0003.dcm", source / "p1" / "ct" / "IM0004.dcm")
    done, counts = _ingest(source, store)
    assert done.to_parse == ["p1/ct/IM0004.dcm"] and done.diff.new == 1
    # a byte copy of IM0003: same SOP Instance UID, so the later path is the duplicate
    assert counts.reasons.get("duplicate-instance") == 1


def test_duckdb_views(tmp_path, source):
    store = SiteStore(str(tmp_path / "store"), "site-a")
    with pytest.raises(OncoflowError, match="run ingest"):
        connect_catalog(store)
    _ingest(source, store)
    con = connect_catalog(store)
    rows = con.execute(
        "SELECT s.status, count(*) AS n, sum(len(s.paths)) AS files "
        "FROM series s GROUP BY s.status ORDER BY s.status"
    ).fetchall()
    assert rows == [("ok", 1, 4), ("quarantined", 1, 5)]
    joined = con.execute(
        "SELECT count(*) FROM instances i JOIN series s "
        "ON i.series_instance_uid = s.series_instance_uid WHERE i.status = 'ok'"
    ).fetchone()
    assert joined == (9,)
    reasons = con.execute("SELECT reason FROM quarantine ORDER BY reason").fetchall()
    assert reasons == [("missing-slice",), ("not-dicom",)]
    con.close()


def _rows(store, key, sort):
    table = store.read_table(key)
    return sorted(table.to_pylist(), key=lambda r: r[sort])


def test_increments_give_the_tables_a_rebuild_from_scratch_gives(tmp_path, source):
    """New series, a deleted file, a changed file and a duplicate added one change at a time:
    only the parts holding affected rows change, and the rows equal a fresh ingest's."""
    store = SiteStore(str(tmp_path / "store"), "site-a")
    _ingest(source, store)
    parts_before = set(store.table_files("catalog/instances.parquet"))
    write_series(source / "p2" / "mr", 3)
    done, counts = _ingest(source, store)
    assert done.diff.new == 3 and done.diff.unchanged == 10
    assert counts.files == {"ok": 12, "quarantined": 1}
    after = set(store.table_files("catalog/instances.parquet"))
    assert parts_before <= after and len(after) == len(parts_before) + 1  # one part added
    (source / "p1" / "ct" / "IM0002.dcm").unlink()
    shutil.copy(source / "p2" / "mr" / "IM0001.dcm", source / "p1" / "copy.dcm")
    (source / "notes.txt").write_text("changed notes, longer")
    _ingest(source, store)

    fresh_store = SiteStore(str(tmp_path / "fresh"), "site-a")
    _ingest(source, fresh_store)
    for key, sort in (
        ("catalog/instances.parquet", "path"),
        ("catalog/series.parquet", "series_key"),
    ):
        mine, rebuilt = _rows(store, key, sort), _rows(fresh_store, key, sort)
        # the deleted file's row stays (status deleted) only in the incremental catalogue
        mine = [r for r in mine if r.get("status") != "deleted"]
        assert mine == rebuilt, key
    quarantine = sorted(store.quarantine_rows(), key=lambda r: (r["item"], r["reason"]))
    rebuilt_q = sorted(fresh_store.quarantine_rows(), key=lambda r: (r["item"], r["reason"]))
    assert quarantine == rebuilt_q
    assert {r["reason"] for r in quarantine} >= {"duplicate-instance", "not-dicom"}


def test_parts_are_read_as_one_table_by_pyarrow_dataset_and_duckdb(tmp_path, source):
    import duckdb
    import pyarrow.dataset as ds

    store = SiteStore(str(tmp_path / "store"), "site-a")
    _ingest(source, store)
    write_series(source / "p2" / "mr", 3)
    _ingest(source, store)
    folder = store.path("catalog/instances.parquet")
    assert len(list(Path(folder).glob("part-*.parquet"))) == 2
    assert ds.dataset(folder, format="parquet").count_rows() == 13
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*) FROM read_parquet('{folder}/*.parquet')").fetchall() == [
        (13,)
    ]
    con.close()


def test_series_built_a_few_at_a_time_give_the_same_tables(tmp_path, source, monkeypatch):
    """The merge reads the affected rows a group of whole series at a time: groups of one row
    (every series alone, the file without a series UID alone) give the same tables."""
    write_series(source / "p2" / "mr", 3)
    store = SiteStore(str(tmp_path / "store"), "site-a")
    _ingest(source, store)
    monkeypatch.setattr(catalog, "BUILD_CHUNK_ROWS", 1)
    small = SiteStore(str(tmp_path / "small"), "site-a")
    _ingest(source, small)
    assert _bytes(small) == _bytes(store)
    assert small.read_table("catalog/series.parquet").num_rows == 3


def test_series_groups_cut_at_series_boundaries():
    counts = [("1.1", 3), ("1.2", 3), ("1.3", 1), ("1.4", 5), ("1.5", 1)]
    assert list(catalog._series_groups(counts, 4)) == [
        ("1.1", "1.2"),
        ("1.3", "1.4"),
        ("1.5", "1.5"),
    ]
    assert list(catalog._series_groups(counts, 100)) == [("1.1", "1.5")]
    assert list(catalog._series_groups([], 4)) == []

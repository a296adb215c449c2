"""Merging parsed rows into the catalogue (no Prefect, no Dask: the plain functions)."""

import shutil

import pyarrow.parquet as pq
import pytest

from tasks.dicom.catalog import (
    CATALOG_VERSION,
    connect_catalog,
    merge_catalog,
    read_catalog_state,
)
from tasks.dicom.headers import parse_files
from tasks.dicom.listing import diff_listing, list_source
from tasks.errors import OncoflowError
from tasks.store import SiteStore
from tests.unit.dicom_samples import write_series


def _ingest(source, store):
    """Listing, diff, parse of what changed, merge: the flow's steps without the runtime."""
    listing = list_source(str(source))
    state = read_catalog_state(store)
    diff = diff_listing(listing, state.rows)
    rows = parse_files(str(source), diff.to_parse)
    counts = merge_catalog(store, diff, rows, 0.01, metadata={"source": str(source)})
    return diff, counts


def _bytes(store):
    keys = ("catalog/instances.parquet", "catalog/series.parquet", "quarantine.parquet")
    return {k: store.read_bytes(k) for k in keys}


@pytest.fixture()
def source(tmp_path):
    write_series(tmp_path / "src" / "p1" / "ct", 4)
    write_series(tmp_path / "src" / "p1" / "gap", 0, offsets=[0, 2.5, 7.5, 10, 12.5])
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    return tmp_path / "src"


def test_first_merge_writes_the_three_tables(tmp_path, source):
    store = SiteStore(str(tmp_path / "store"), "site-a")
    diff, counts = _ingest(source, store)
    assert len(diff.new) == 10
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
    meta = pq.read_schema(store.path("catalog/series.parquet")).metadata
    assert meta[b"oncoflow.catalog_version"] == CATALOG_VERSION.encode()
    assert meta[b"source"] == str(source).encode()
    instances = store.read_table("catalog/instances.parquet")
    assert instances.column("path").to_pylist() == sorted(instances.column("path").to_pylist())


def test_rerun_changes_nothing(tmp_path, source):
    store = SiteStore(str(tmp_path / "store"), "site-a")
    _ingest(source, store)
    before = _bytes(store)
    diff, counts = _ingest(source, store)
    assert diff.to_parse == [] and diff.deleted == []
    assert counts.written == []
    assert _bytes(store) == before
    assert read_catalog_state(store).current


def test_deleted_and_changed_files(tmp_path, source):
    store = SiteStore(str(tmp_path / "store"), "site-a")
    _ingest(source, store)
    (source / "p1" / "ct" / "IM0004.dcm").unlink()
    (source / "notes.txt").write_text("changed notes, longer")
    diff, counts = _ingest(source, store)
    assert diff.deleted == ["p1/ct/IM0004.dcm"]
    assert [f.path for f in diff.changed] == ["notes.txt"]
    assert counts.files == {"deleted": 1, "ok": 8, "quarantined": 1}
    table = store.read_table("catalog/instances.parquet").to_pylist()
    gone = next(r for r in table if r["path"] == "p1/ct/IM0004.dcm")
    assert gone["status"] == "deleted" and gone["sop_instance_uid"]  # the row is kept
    series = store.read_table("catalog/series.parquet").to_pylist()
    ct = next(s for s in series if s["status"] == "ok")
    assert ct["n_instances"] == 3
    # the file comes back: parsed again, ok again
    shutil.copy(source / "p1" / "ct" / "IM0003.dcm", source / "p1" / "ct" / "IM0004.dcm")
    diff, counts = _ingest(source, store)
    assert [f.path for f in diff.new] == ["p1/ct/IM0004.dcm"]
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

import pyarrow as pa
import pytest

from tasks.errors import OncoflowError
from tasks.quarantine import replace_quarantine
from tasks.records import QuarantineRecord, Reason, Stage
from tasks.store import QUARANTINE, Existing, SiteStore, table_to_parquet_bytes


def test_write_table_roundtrip_and_skip_unchanged(tmp_path):
    store = SiteStore(str(tmp_path / "store"), "site-a")
    table = pa.table({"a": [3, 1, 2], "b": ["x", "y", "z"]})
    assert store.write_table("catalog/t.parquet", table, {"prov_version": "1"}) is True
    mtime = (tmp_path / "store/site-a/catalog/t.parquet").stat().st_mtime_ns
    back = store.read_table("catalog/t.parquet")
    assert back.column("a").to_pylist() == [3, 1, 2]
    assert back.schema.metadata[b"prov_version"] == b"1"
    # same content: nothing written, the file is untouched
    assert store.write_table("catalog/t.parquet", table, {"prov_version": "1"}) is False
    assert (tmp_path / "store/site-a/catalog/t.parquet").stat().st_mtime_ns == mtime
    # no temporary objects left behind
    assert sorted(p.name for p in (tmp_path / "store/site-a/catalog").iterdir()) == ["t.parquet"]


def test_parquet_bytes_deterministic():
    table = pa.table({"a": list(range(100))})
    assert table_to_parquet_bytes(table) == table_to_parquet_bytes(table)


@pytest.mark.parametrize("site", ["Site_A", "", "a/b", "x" * 64, "-a"])
def test_bad_site_is_one_line_error(tmp_path, site):
    with pytest.raises(OncoflowError) as err:
        SiteStore(str(tmp_path), site)
    assert "\n" not in str(err.value)


def test_bad_url_is_one_line_error():
    with pytest.raises(OncoflowError, match="unsupported URL"):
        SiteStore("nosuchproto://bucket/x", "site-a")


def test_replace_quarantine_keeps_other_stages(tmp_path):
    store = SiteStore(str(tmp_path), "site-a")
    replace_quarantine(
        store, Stage.INGEST, [QuarantineRecord("b.dcm", "file", Stage.INGEST, Reason.EMPTY_FILE)]
    )
    replace_quarantine(
        store,
        Stage.HARMONISE,
        [QuarantineRecord("s1", "series", Stage.HARMONISE, Reason.EMPTY_MASK, "roi gtv")],
    )
    replace_quarantine(
        store, Stage.INGEST, [QuarantineRecord("c.dcm", "file", Stage.INGEST, Reason.NOT_DICOM)]
    )
    rows = store.read_table(QUARANTINE).to_pylist()
    assert [(r["item"], r["reason"]) for r in rows] == [
        ("s1", "empty-mask"),
        ("c.dcm", "not-dicom"),
    ]


def test_s3_store_roundtrip(s3_bucket):
    store = SiteStore(f"{s3_bucket}/prefix", "site-b")
    assert store.uri("x/y.bin").startswith("s3://")
    assert store.write_bytes("x/y.bin", b"hello") is True
    assert store.write_bytes("x/y.bin", b"hello") is False
    assert store.read_bytes("x/y.bin") == b"hello"
    assert store.children("x") == ["x/y.bin"]
    assert (store.is_file("x/y.bin"), store.is_file("x"), store.is_file("nope")) == (
        True,
        False,
        False,
    )
    store.commit({"x/z.bin": b"z"}, "x/done", b"1")
    assert store.read_many(["x/z.bin", "x/none"]) == {"x/z.bin": b"z"}
    assert store.move("x", "moved") == 3
    assert store.find("") == ["moved/done", "moved/y.bin", "moved/z.bin"]
    assert store.prune("moved", {"moved/done"}) == 2


def test_write_modes(tmp_path):
    store = SiteStore(str(tmp_path), "site-a")
    assert store.write_bytes("k", b"one") is True
    assert store.write_bytes("k", b"two", mode=Existing.SKIP) is False
    assert store.read_bytes("k") == b"one"
    with pytest.raises(FileExistsError):
        store.write_bytes("k", b"two", mode=Existing.FAIL)
    assert store.write_bytes("k", b"one", mode=Existing.OVERWRITE) is True
    assert store.write_bytes("k", b"two") is True
    assert store.read_bytes("k") == b"two"


def test_commit_writes_marker_last_and_prune_keeps_what_is_asked(tmp_path):
    store = SiteStore(str(tmp_path), "site-a")
    store.write_bytes("out/s1/done.json", b"old marker")
    written = store.commit({"out/s1/a": b"A", "out/s1/b": b"B"}, "out/s1/done.json", b"new")
    assert written == ["out/s1/a", "out/s1/b", "out/s1/done.json"]
    assert store.read_bytes("out/s1/done.json") == b"new"
    # unchanged objects are not written again; the marker always is
    assert store.commit({"out/s1/a": b"A"}, "out/s1/done.json", b"new") == ["out/s1/done.json"]
    store.write_bytes("out/s2/a", b"A")
    (tmp_path / "site-a/out/.tmp-123-x").write_bytes(b"partial")
    assert store.prune("out", {"out/s1"}, children=True) == 2
    assert store.children("out") == ["out/s1"]
    assert store.prune("out/s1", {"out/s1/a"}, select=lambda k: k.endswith("/b")) == 1
    assert store.find("out") == ["out/s1/a", "out/s1/done.json"]
    assert store.prune("missing", ()) == 0


def test_move_prefix_replaces_and_selects(tmp_path):
    store = SiteStore(str(tmp_path), "site-a")
    store.write_bytes("final/x/old.dcm", b"old")
    store.stage_bytes("staging/1/a.dcm", b"a")
    store.stage_bytes("staging/1/sub/b.dcm", b"b")
    assert store.move("staging/1", "final/x") == 2
    assert store.find("final") == ["final/x/a.dcm", "final/x/sub/b.dcm"]
    assert not store.exists("staging/1")
    store.stage_bytes("in/s/a.dcm", b"a2")
    store.stage_bytes("in/s/.tmp-9-c.dcm", b"partial")
    moved = store.move("in/s", "final/x", mode=Existing.SKIP, select=lambda r: ".tmp-" not in r)
    assert moved == 0  # a.dcm exists at the destination: kept, the source dropped
    assert store.read_bytes("final/x/a.dcm") == b"a"
    assert store.find("in") == ["in/s/.tmp-9-c.dcm"]


def test_read_many_leaves_out_missing(tmp_path):
    store = SiteStore(str(tmp_path), "site-a")
    store.write_bytes("a", b"1")
    store.write_bytes("d/b", b"2")
    assert store.read_many(["a", "d/b", "nope"]) == {"a": b"1", "d/b": b"2"}
    assert store.read_many(["a"]) == {"a": b"1"}
    assert store.read_many([]) == {}


def test_open_reads_a_prefix_of_an_object(tmp_path):
    store = SiteStore(str(tmp_path), "site-a")
    store.write_bytes("d/obj", b"header" + b"x" * 100_000)
    with store.open("d/obj", block_size=1024) as fh:
        assert fh.read(6) == b"header"


def test_table_schema_of_a_file_and_of_parts(tmp_path):
    import pyarrow.parquet as pq

    store = SiteStore(str(tmp_path), "site-a")
    assert store.table_schema("t.parquet") is None
    store.write_table("t.parquet", pa.table({"a": [1], "b": ["x"]}))
    assert store.table_schema("t.parquet").names == ["a", "b"]
    folder = tmp_path / "site-a" / "p.parquet"
    folder.mkdir(parents=True)
    assert store.table_schema("p.parquet") is None  # a folder without parts yet
    pq.write_table(pa.table({"c": [1.5]}), folder / "part-0001.parquet")
    assert store.table_schema("p.parquet").names == ["c"]


def test_stamps_change_when_an_object_is_rewritten(tmp_path):
    import os

    store = SiteStore(str(tmp_path), "site-a")
    assert store.stamps("t") == {}
    store.write_bytes("t/part-1", b"12")
    store.write_bytes("t/part-2", b"123")
    first = store.stamps("t")
    assert sorted(first) == ["t/part-1", "t/part-2"]
    assert first["t/part-2"].startswith("3:")
    assert store.stamps("t/part-1") == {"t/part-1": first["t/part-1"]}
    path = tmp_path / "site-a" / "t" / "part-1"
    path.write_bytes(b"21")
    os.utime(path, (1_000_000_000, 1_000_000_000))
    assert store.stamps("t")["t/part-1"] != first["t/part-1"]
    assert store.stamps("t")["t/part-2"] == first["t/part-2"]

import pyarrow as pa
import pytest

from tasks.errors import OncoflowError
from tasks.records import QuarantineRecord, Reason, Stage
from tasks.store import QUARANTINE, SiteStore, table_to_parquet_bytes


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
    store.replace_quarantine(
        Stage.INGEST, [QuarantineRecord("b.dcm", "file", Stage.INGEST, Reason.EMPTY_FILE)]
    )
    store.replace_quarantine(
        Stage.HARMONISE,
        [QuarantineRecord("s1", "series", Stage.HARMONISE, Reason.EMPTY_MASK, "roi gtv")],
    )
    store.replace_quarantine(
        Stage.INGEST, [QuarantineRecord("c.dcm", "file", Stage.INGEST, Reason.NOT_DICOM)]
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
    listing = store.fs.ls(store.path("x"), refresh=True)
    assert [p.rsplit("/", 1)[1] for p in listing] == ["y.bin"]

import hashlib
import os
import re

import pytest

from tasks.dicom.listing import (
    ListedFile,
    item_ref,
    list_source,
    make_batches,
    resolve_source,
    write_listing,
)
from tasks.errors import OncoflowError
from tasks.refs import RefKey


def test_list_source_recursive_sorted_with_size_and_mtime(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.dcm").write_bytes(b"xx")
    (tmp_path / "a.dcm").write_bytes(b"x")
    (tmp_path / "empty-dir").mkdir()
    os.utime(tmp_path / "a.dcm", (1_700_000_000.5, 1_700_000_000.5))
    files = list_source(str(tmp_path))
    assert [(f.path, f.size) for f in files] == [("a.dcm", 1), ("b/2.dcm", 2)]
    assert files[0].mtime == "1700000000.500000"
    assert list_source(f"file://{tmp_path}") == files


def test_local_listing_equals_fsspec_find(tmp_path):
    """The os.scandir listing of local folders gives exactly what fsspec's find gives."""
    import fsspec

    from tasks.dicom.listing import _change_token

    (tmp_path / "p1" / "s1").mkdir(parents=True)
    (tmp_path / "p1" / "s1" / "IM1").write_bytes(b"a" * 7)
    (tmp_path / "p1" / "name with space.dcm").write_bytes(b"b" * 3)
    (tmp_path / "zero").write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "target.dcm").write_bytes(b"c" * 11)
    os.symlink(tmp_path / "elsewhere" / "target.dcm", tmp_path / "p1" / "link.dcm")
    os.symlink(tmp_path / "missing", tmp_path / "broken-link")
    os.symlink(tmp_path / "elsewhere", tmp_path / "dir-link")
    os.utime(tmp_path / "zero", (1_600_000_000.25, 1_600_000_000.25))
    fs = fsspec.filesystem("file")
    found = fs.find(str(tmp_path), detail=True, withdirs=False)
    expected = sorted(
        ListedFile(full[len(str(tmp_path)) + 1 :], int(info["size"]), _change_token(info, "file"))
        for full, info in found.items()
    )
    listed = list_source(str(tmp_path))
    assert listed == expected
    sizes = {f.path: f.size for f in listed}
    assert sizes["p1/link.dcm"] == 11 and sizes["broken-link"] == 0 and sizes["zero"] == 0
    assert "dir-link/target.dcm" not in sizes  # a linked folder is not walked into
    assert next(f for f in listed if f.path == "zero").mtime == "1600000000.250000"


def test_single_file_source(tmp_path):
    (tmp_path / "one.dcm").write_bytes(b"abc")
    (f,) = list_source(str(tmp_path / "one.dcm"))
    assert (f.path, f.size) == ("one.dcm", 3)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p / "nope", "source not found"),
        (lambda p: p, "source is empty"),
    ],
)
def test_unusable_sources(tmp_path, make, needle):
    with pytest.raises(OncoflowError, match=needle) as info:
        resolve_source(str(make(tmp_path)))
    assert "\n" not in str(info.value)


def test_source_with_only_empty_folders_has_no_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(OncoflowError, match="no files"):
        list_source(str(tmp_path))


def _write_listing_rows(store, files):
    from tasks.dicom.catalog import LISTING
    from tasks.dicom.listing import LISTING_SCHEMA, files_to_table, write_batches

    write_batches(store, LISTING, files_to_table(files).to_batches(), LISTING_SCHEMA)
    return LISTING


@pytest.mark.parametrize("bucket_rows", [2_000_000, 2])
def test_diff_in_duckdb_against_each_catalogue_status(tmp_path, monkeypatch, bucket_rows):
    """New, changed, unchanged and deleted files: counts, the plan and the deleted paths;
    the same when the catalogue is joined in buckets of paths (here 4 buckets)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.dicom import catalog
    from tasks.dicom.catalog import deleted_paths, diff_files, planned_files
    from tasks.store import SiteStore

    monkeypatch.setattr(catalog, "DIFF_BUCKET_ROWS", bucket_rows)

    catalogue = [
        ("same", 10, "t1", "ok"),
        ("grown", 10, "t1", "quarantined"),
        ("touched", 10, "t1", "ok"),
        ("gone", 10, "t1", "ok"),
        ("gone-before", 10, "t1", "deleted"),
        ("back", 10, "t1", "deleted"),
        ("no-size", None, "t1", "ok"),
        ("no-status", 10, "t1", None),
    ]
    columns = ["path", "size", "mtime", "status"]
    pq.write_table(
        pa.table({c: [row[i] for row in catalogue] for i, c in enumerate(columns)}),
        tmp_path / "catalogue.parquet",
    )
    listing = [
        ListedFile("touched", 10, "t2"),
        ListedFile("new", 1, "t2"),
        ListedFile("same", 10, "t1"),
        ListedFile("grown", 11, "t1"),
        ListedFile("back", 10, "t1"),
        ListedFile("no-size", 10, "t1"),
    ]
    store = SiteStore(str(tmp_path / "store"), "site-a")
    key = _write_listing_rows(store, listing)
    diff = diff_files(store, key, [str(tmp_path / "catalogue.parquet")])
    assert (diff.listed, diff.new, diff.changed, diff.unchanged, diff.deleted) == (6, 2, 3, 1, 2)
    planned = list(planned_files(store, diff))
    assert [f.path for f in planned] == ["back", "grown", "new", "no-size", "touched"]
    assert planned[1] == ListedFile("grown", 11, "t1")  # the listed size and token
    assert list(deleted_paths(store, diff)) == ["gone", "no-status"]
    assert not diff.is_empty

    # nothing changed: no plan, no deleted paths, nothing written
    same = SiteStore(str(tmp_path / "same"), "site-a")
    pq.write_table(
        pa.table({"path": ["same"], "size": [10], "mtime": ["t1"], "status": ["ok"]}),
        tmp_path / "same.parquet",
    )
    key = _write_listing_rows(same, [ListedFile("same", 10, "t1")])
    diff = diff_files(same, key, [str(tmp_path / "same.parquet")])
    assert diff.is_empty and diff.unchanged == 1 and diff.plan is None and diff.gone is None
    assert same.children("catalog/_parts") == ["catalog/_parts/listing.parquet"]

    # no catalogue yet: every file is new
    diff = diff_files(store, _write_listing_rows(store, listing), [])
    assert (diff.new, diff.changed, diff.deleted) == (6, 0, 0)
    assert [f.path for f in planned_files(store, diff)] == sorted(f.path for f in listing)


def _tiny_files(root, n):
    for i in range(n):
        folder = root / f"Παπαδόπουλος-{i % 40:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(folder / f"IM{i:06d}.dcm", os.O_CREAT | os.O_WRONLY, 0o600))


def _traced_peak(work) -> int:
    """Peak of Python-allocated memory (tracemalloc) while ``work`` runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_listing_and_diff_memory_does_not_grow_with_the_number_of_files(tmp_path, monkeypatch):
    """Listing, diff and plan of 20,000 files hold as many Python objects at their peak as
    those of 2,000: one record batch at a time (a small batch here, so that both sources span
    many). Counted by tracemalloc, which load cannot disturb; the same measure sees the
    20,000-entry list of :func:`list_source` grow by megabytes."""
    from tasks.dicom import catalog, listing
    from tasks.dicom.catalog import LISTING, diff_catalog, planned_files
    from tasks.store import SiteStore

    monkeypatch.setattr(listing, "LISTING_ROWS", 500)
    monkeypatch.setattr(catalog, "RESULT_ROWS", 500)
    peaks, lists = {}, {}
    for n in (200, 2_000, 20_000):  # the first warms up imports and caches
        source = tmp_path / f"src-{n}"
        _tiny_files(source, n)
        store = SiteStore(str(tmp_path / f"store-{n}"), "site-a")

        def stream(source=source, store=store, n=n):
            write_listing(str(source), store, LISTING)
            diff = diff_catalog(store, LISTING)
            assert (diff.listed, diff.new) == (n, n)

        peaks[n] = _traced_peak(stream)
        lists[n] = _traced_peak(lambda source=source: list_source(str(source)))
        planned = planned_files(store, diff_catalog(store, LISTING))
        assert sum(1 for _ in planned) == n
    grown = peaks[20_000] - peaks[2_000]
    print("traced peaks (bytes):", peaks, "whole lists:", lists)
    assert grown < 200_000, (peaks, lists)  # bytes, for 18,000 more files
    assert lists[20_000] - lists[2_000] > 18_000 * 100, lists  # a list grows ~200 B a file


def test_listing_excludes_a_prefix_and_comes_in_record_batches(tmp_path, monkeypatch):
    from tasks.dicom import listing

    monkeypatch.setattr(listing, "LISTING_ROWS", 3)
    _tiny_files(tmp_path / "src", 8)
    (tmp_path / "src" / "store" / "site-a").mkdir(parents=True)
    (tmp_path / "src" / "store" / "site-a" / "x.parquet").write_bytes(b"private")
    batches = list(listing.listing_batches(str(tmp_path / "src"), exclude="store/site-a/"))
    assert [b.num_rows for b in batches] == [3, 3, 2]
    paths = [p for b in batches for p in b.column("path").to_pylist()]
    everything = [f.path for f in list_source(str(tmp_path / "src"))]
    assert sorted(paths) == [p for p in everything if not p.startswith("store/")]
    assert len(everything) == 9
    with pytest.raises(OncoflowError, match="source holds no files"):
        list(listing.listing_batches(str(tmp_path / "src" / "store"), exclude="site-a/"))


def test_s3_listing_is_paged_and_leaves_no_listing_cache(s3_bucket, s3_endpoint, monkeypatch):
    """An S3 prefix is listed a page at a time: what ``find`` gives (ETags as change tokens,
    directory markers skipped), without ``find``'s copy of the whole listing in the cache."""
    import s3fs

    from tasks.dicom import listing
    from tasks.dicom.catalog import LISTING, diff_catalog, planned_files
    from tasks.store import SiteStore, open_url

    monkeypatch.setattr(listing, "S3_PAGE", 2)
    monkeypatch.setattr(listing, "LISTING_ROWS", 3)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    bucket = s3_bucket.removeprefix("s3://")
    names = ["Иванова/1.dcm", "Łukasz Żółć/2.dcm", "Seán Ó Briain/a/3.dcm", "Ágnes/4.dcm"]
    for i, name in enumerate(names):
        fs.pipe(f"{bucket}/src/{name}", b"x" * (i + 1))
    fs.pipe(f"{bucket}/src/marker/", b"")  # a directory marker
    fs.pipe(f"{bucket}/other/5.dcm", b"y")  # outside the prefix
    expected = sorted(
        ListedFile(k.split("/src/", 1)[1], v["size"], v["ETag"].strip('"'))
        for k, v in fs.find(f"{bucket}/src", detail=True).items()
        if not k.endswith("/")
    )
    assert [f.path for f in expected] == sorted(names)
    source = f"{s3_bucket}/src"
    source_fs, _ = open_url(source)
    source_fs.invalidate_cache()
    assert list_source(source) == expected
    assert not any(k.startswith(f"{bucket}/src") for k in source_fs.dircache)

    store = SiteStore(f"{s3_bucket}/store", "site-b")  # listing and plan on S3 too
    assert write_listing(source, store, LISTING) == 4
    diff = diff_catalog(store, LISTING)
    assert list(planned_files(store, diff)) == expected
    token = next(f.mtime for f in expected if f.path == names[2])
    assert list_source(f"{source}/{names[2]}") == [ListedFile("3.dcm", 3, token)]


KEY = RefKey(b"k" * 32)


def test_batches_are_stable_and_content_keyed():
    files = [ListedFile(f"f{i:03d}", i, "t") for i in range(10)]
    batches = make_batches(list(reversed(files)), 4, KEY)
    assert [len(b.files) for b in batches] == [4, 4, 2]
    assert [b.files[0].path for b in batches] == ["f000", "f004", "f008"]
    assert [b.key for b in make_batches(files, 4, KEY)] == [b.key for b in batches]
    changed = [*files[:9], ListedFile("f009", 9, "t-new")]
    assert [b.key for b in make_batches(changed, 4, KEY)][:2] == [b.key for b in batches][:2]
    assert make_batches(changed, 4, KEY)[2].key != batches[2].key
    assert all(re.fullmatch(r"b[0-9a-f]{20}", b.key) for b in batches)
    # keyed: another site's key gives other names; no plain hash of the paths
    assert make_batches(files, 4, RefKey(b"x" * 32))[0].key != batches[0].key
    plain = hashlib.sha256("".join(f"{f.path}\t{f.size}\t{f.mtime}\n" for f in files[:4]).encode())
    assert batches[0].key != "b" + plain.hexdigest()[:20]


def test_item_ref_is_opaque_stable_and_keyed():
    path = "MRN-123_Doe/20200101/1/IM0001.dcm"
    ref = item_ref(path, KEY)
    assert len(ref) == 12 and "Doe" not in ref
    assert ref == item_ref(path, KEY) != item_ref(path, RefKey(b"x" * 32))
    assert ref != hashlib.sha256(path.encode()).hexdigest()[:12]


def test_site_ref_key_from_the_secret_or_kept_in_the_store(tmp_path, monkeypatch):
    from tasks.deid.secret import SECRET_ENV
    from tasks.refs import REFERENCE_KEY, site_ref_key
    from tasks.store import SiteStore

    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    store = SiteStore(str(tmp_path / "a"), "site-r")
    first = site_ref_key(store)
    assert len(store.read_bytes(REFERENCE_KEY)) == 32
    monkeypatch.setattr("tasks.refs._KEYS", {})
    assert site_ref_key(store).ref("x") == first.ref("x")  # kept: stable across runs
    monkeypatch.setenv(SECRET_ENV, "s" * 40)
    monkeypatch.setattr("tasks.refs._KEYS", {})
    with_secret = SiteStore(str(tmp_path / "b"), "site-r")
    assert site_ref_key(with_secret).ref("x") != first.ref("x")
    assert not with_secret.exists(REFERENCE_KEY)


def test_batch_size_aims_at_one_task_per_worker_with_a_floor():
    from flows.ingest import batch_size_for

    assert batch_size_for(10_000, 2, 5000) == 5000  # one task per worker
    assert batch_size_for(10_001, 2, 5000) == 5000  # rounded up then capped by the parameter
    assert batch_size_for(40_000, 2, 2500) == 2500  # capped by the parameter
    assert batch_size_for(4_000, 4, 2500) == 1000
    assert batch_size_for(150, 2, 2500) == 100  # never below 100 files per task...
    assert batch_size_for(300, 2, 40) == 40  # ... unless the parameter asks for less
    assert batch_size_for(0, 2, 2500) == 100


def test_plan_read_in_pieces_gives_the_batches_of_the_whole_list(tmp_path):
    """The plan goes through Parquet and is cut while read: same batches, same file lists."""
    from flows.ingest import write_plan_batches
    from tasks.dicom.headers import files_key
    from tasks.dicom.listing import files_from_json, files_to_table
    from tasks.refs import site_ref_key
    from tasks.store import SiteStore

    names = ["Παπαδόπουλος", "Иванова", "Łukasz Żółć", "Ágnes Kovács", "Seán Ó Briain"]
    files = [ListedFile(f"{names[i % 5]}/{i:04d}.dcm", i, f"{i}.5") for i in range(23)]
    store = SiteStore(str(tmp_path / "store"), "site-a")
    store.write_table("catalog/_parts/plan.parquet", files_to_table(sorted(files)))
    refs = write_plan_batches(store, "catalog/_parts/plan.parquet", workers=1, largest=5)
    expected = make_batches(files, 5, site_ref_key(store))
    assert [(r.key, r.files) for r in refs] == [(b.key, len(b.files)) for b in expected]
    for batch in expected:
        assert files_from_json(store.read_bytes(files_key(batch.key))) == list(batch.files)

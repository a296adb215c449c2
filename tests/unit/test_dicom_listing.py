import hashlib
import os
import re

import pytest

from tasks.dicom.listing import (
    ListedFile,
    diff_listing,
    item_ref,
    list_source,
    make_batches,
    resolve_source,
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


def test_diff_listing():
    catalogue = [
        ("same", 10, "t1", "ok"),
        ("grown", 10, "t1", "quarantined"),
        ("touched", 10, "t1", "ok"),
        ("gone", 10, "t1", "ok"),
        ("gone-before", 10, "t1", "deleted"),
        ("back", 10, "t1", "deleted"),
    ]
    listing = [
        ListedFile("back", 10, "t1"),
        ListedFile("grown", 11, "t1"),
        ListedFile("new", 1, "t2"),
        ListedFile("same", 10, "t1"),
        ListedFile("touched", 10, "t2"),
    ]
    diff = diff_listing(listing, catalogue)
    assert [f.path for f in diff.new] == ["back", "new"]
    assert [f.path for f in diff.changed] == ["grown", "touched"]
    assert diff.unchanged == ["same"]
    assert diff.deleted == ["gone"]
    assert [f.path for f in diff.to_parse] == ["back", "grown", "new", "touched"]
    assert not diff.is_empty
    assert diff_listing([ListedFile("same", 10, "t1")], [("same", 10, "t1", "ok")]).is_empty


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

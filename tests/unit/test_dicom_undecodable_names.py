"""File names that are not UTF-8 (legacy Latin-1 / ISO-8859-2 / Windows-1250 / CP1253 exports).

Such a file is listed and quarantined (``undecodable-name``, its item the escaped path) while
every other file ingests normally, and a re-run changes nothing. The ingest's steps run as the
flow runs them (:func:`flows.ingest.catalogue_source`: a small plan is parsed in-process, so no
Prefect server or Dask cluster is needed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from flows.ingest import IngestParams, catalogue_source
from tasks.dicom.catalog import LISTING, UNDECODABLE
from tasks.dicom.ingest_summary import ingest_summary
from tasks.dicom.listing import (
    escape_name,
    is_utf8_name,
    list_source,
    name_bytes,
    write_listing,
)
from tasks.errors import OncoflowError
from tasks.quarantine import UNDECODABLE_DETAIL, lookup
from tasks.store import SiteStore
from tests.dicom_factory import ct_dataset, to_bytes

#: UTF-8 names: one series of five slices, one per name, all must ingest normally.
UTF8_NAMES = [
    "Ó Briain Seán/1.dcm",
    "Ελένη Παππά/2.dcm",
    "Йорданка Петрова/3.dcm",
    "Łucja Wójcik/4.dcm",
    "Gergő Szűcs/5.dcm",
]
#: Names written by legacy tools: (folder bytes, file bytes); the folder of the last is itself
#: not UTF-8 (Latin-1), and one name holds a backslash (escaped as two).
LEGACY = [
    (b"", "Szőke.dcm".encode("iso-8859-2")),
    (b"", "Łukasz Wiśniewski.dcm".encode("cp1250")),
    (b"", "Παπαδόπουλος.dcm".encode("cp1253")),
    (b"", "back\\slash é.dcm".encode("latin-1")),
    ("Kovács Ödön".encode("latin-1"), b"IM0001.dcm"),
]
#: An ASCII file literally named like the escaped form of a legacy name (a real DICOM file).
LOOKALIKE = "Sz\\xf5ke.dcm"


def _slice(series: str, study: str, i: int) -> bytes:
    position = (-10.0, -20.0, 30.0 + 2.5 * i)
    return to_bytes(
        ct_dataset(series_uid=series, study_uid=study, position=position, instance_number=i + 1)
    )


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    study = generate_uid()
    series = generate_uid()
    for i, name in enumerate(UTF8_NAMES):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_slice(series, study, i))
    legacy_series = generate_uid()
    for i, (folder, name) in enumerate(LEGACY):
        assert not is_utf8_name(os.fsdecode(folder + name))
        where = os.path.join(os.fsencode(root), folder) if folder else os.fsencode(root)
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, name), "wb") as fh:
            fh.write(_slice(legacy_series, study, i))
    (root / LOOKALIKE).write_bytes(_slice(generate_uid(), study, 0))
    return root


def _escaped() -> list[str]:
    return sorted(
        escape_name(os.fsdecode(b"/".join(p for p in (folder, name) if p)))
        for folder, name in LEGACY
    )


def _run(source: Path, store: SiteStore, caplog: pytest.LogCaptureFixture):
    params = IngestParams(source=str(source), store=store.url, site=store.site)
    logger = logging.getLogger("test-ingest-names")
    with caplog.at_level(logging.INFO, logger="test-ingest-names"):
        diff, run, counts, timings = catalogue_source(params, store, None, logger)
    return diff, run, counts, ingest_summary(store.site, diff, counts, run, timings)


def _quarantine(store: SiteStore) -> list[tuple[str, str, str, str, str]]:
    """The ingest quarantine rows, read back with pyarrow.dataset (not the store's reader)."""
    table = ds.dataset(store.path("quarantine.parquet"), format="parquet").to_table()
    rows = table.to_pylist()
    return sorted(
        (r["item"], r["kind"], r["stage"], r["reason"], r["detail"])
        for r in rows
        if r["stage"] == "ingest"
    )


def _instances(store: SiteStore) -> dict[str, str]:
    """Catalogue path -> status, read back with DuckDB."""
    glob = store.path("catalog/instances.parquet") + "/*.parquet"
    with duckdb.connect() as con:
        return dict(con.execute(f"SELECT path, status FROM read_parquet('{glob}')").fetchall())


def test_undecodable_names_are_quarantined_and_the_rest_ingests(tmp_path, source, caplog):
    store = SiteStore(str(tmp_path / "store"), "site-names")
    diff, run, counts, summary = _run(source, store, caplog)

    escaped = _escaped()
    assert escaped[0] == "Kov\\xe1cs \\xd6d\\xf6n/IM0001.dcm"  # a folder that is not UTF-8
    assert "back\\\\slash \\xe9.dcm" in escaped  # the name's own backslash doubled
    assert LOOKALIKE in escaped  # same text as the ASCII file: still two rows, two files
    assert diff.listed == len(UTF8_NAMES) + len(LEGACY) + 1
    assert (diff.undecodable, diff.new, diff.unchanged) == (len(LEGACY), len(UTF8_NAMES) + 1, 0)
    assert run.files_parsed == len(UTF8_NAMES) + 1

    # catalogue: every UTF-8 name (and the look-alike ASCII file) ok, no row for legacy names
    assert _instances(store) == {**dict.fromkeys(UTF8_NAMES, "ok"), LOOKALIKE: "ok"}
    # quarantine: one file row per legacy name, with the reason and a one-line fix
    assert _quarantine(store) == [
        (item, "file", "ingest", "undecodable-name", UNDECODABLE_DETAIL) for item in escaped
    ]
    assert "\n" not in UNDECODABLE_DETAIL and "convmv" in UNDECODABLE_DETAIL
    # counts add up: five legacy files quarantined, the series of UTF-8 names is ok
    assert counts.files == {"ok": len(UTF8_NAMES) + 1, "quarantined": len(LEGACY)}
    assert counts.reasons == {"undecodable-name": len(LEGACY)}
    assert counts.series == {"ok": 2}
    assert summary.extra["files_undecodable"] == len(LEGACY)

    # each escaped item gives the file's bytes back, and the operator's lookup finds it by ref
    for item in escaped:
        assert os.path.isfile(os.path.join(os.fsencode(source), name_bytes(item)))
    for shown in counts.quarantine:
        (entry,) = lookup(store, shown["ref"])
        assert entry.item in escaped and entry.reason == "undecodable-name"

    # no name (nor its plain hash) in the artifact rows, the summary or the log
    assert "5 quarantined for a name that is not UTF-8" in caplog.text
    published = repr(counts.quarantine) + repr(summary.to_dict()) + caplog.text
    for item in escaped:
        plain = hashlib.sha256(item.encode()).hexdigest()
        assert item not in published and plain[:12] not in published
    for word in ("Sz", "ukasz", "Kov", "slash", "Briain", "Ελένη", "Gergő", "IM0001"):
        assert word not in published

    # a re-run: nothing parsed, nothing written, the same rows
    before = {k: store.table_files(k) for k in ("quarantine.parquet", "catalog/instances.parquet")}
    diff2, run2, counts2, _ = _run(source, store, caplog)
    assert (diff2.to_parse, diff2.undecodable, run2.files_parsed) == (0, len(LEGACY), 0)
    assert counts2.written == []
    assert counts2.files == counts.files and counts2.quarantine == counts.quarantine
    assert {k: store.table_files(k) for k in before} == before
    assert not store.exists("catalog/_parts")


def test_a_renamed_file_ingests_and_its_quarantine_row_leaves(tmp_path, source, caplog):
    """What the detail tells the operator to do (convmv), then ingest again."""
    store = SiteStore(str(tmp_path / "store"), "site-names")
    _run(source, store, caplog)
    old = os.path.join(os.fsencode(source), "Szőke.dcm".encode("iso-8859-2"))
    os.rename(old, os.path.join(os.fsencode(source), "Szőke.dcm".encode()))
    diff, run, counts, _ = _run(source, store, caplog)
    assert (diff.new, diff.undecodable, run.files_parsed) == (1, len(LEGACY) - 1, 1)
    assert _instances(store)["Szőke.dcm"] == "ok"
    items = [row[0] for row in _quarantine(store)]
    assert len(items) == len(LEGACY) - 1
    assert LOOKALIKE not in items  # the escaped Szőke row left (the ASCII file stays ok)
    assert counts.files == {"ok": len(UTF8_NAMES) + 2, "quarantined": len(LEGACY) - 1}

    # a folder of only legacy names (every file to the quarantine, none to parse) still works
    only = tmp_path / "only"
    os.makedirs(os.path.join(os.fsencode(only), b"\xe9t\xe9"))
    with open(os.path.join(os.fsencode(only), b"\xe9t\xe9", b"a.dcm"), "wb") as fh:
        fh.write(b"x")
    other = SiteStore(str(tmp_path / "store"), "site-only")
    diff, run, counts, _ = _run(only, other, caplog)
    assert (diff.listed, diff.undecodable, diff.to_parse) == (1, 1, 0)
    assert counts.files == {"quarantined": 1}
    assert [row[0] for row in _quarantine(other)] == ["\\xe9t\\xe9/a.dcm"]
    _, _, again, _ = _run(only, other, caplog)
    assert again.written == [] and again.files == {"quarantined": 1}


def test_list_source_without_a_place_for_them_is_one_line_error(tmp_path, source):
    with pytest.raises(OncoflowError, match=r"^a file name under .* is not UTF-8 .*convmv"):
        list_source(str(source))


# surrogate-escaped names as os.scandir gives them: any bytes but "/" and NUL
_NAME_BYTES = st.binary(min_size=1, max_size=24).filter(lambda b: b"/" not in b and b"\0" not in b)


@given(st.lists(_NAME_BYTES, min_size=1, max_size=3))
def test_escaped_names_are_utf8_unique_and_give_the_bytes_back(parts):
    raw = b"/".join(parts)
    name = os.fsdecode(raw)
    escaped = escape_name(name)
    escaped.encode("utf-8")  # valid UTF-8 text, which Arrow and DuckDB take
    assert name_bytes(escaped) == raw
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assert not is_utf8_name(name)
    else:
        assert is_utf8_name(name) and escaped == name.replace("\\", "\\\\")


@settings(max_examples=25)
@given(
    st.lists(
        st.tuples(st.sampled_from([b"", b"d\xe9j\xe0", "Ödön".encode(), b"a\\b"]), _NAME_BYTES),
        min_size=1,
        max_size=6,
        unique=True,
    ).filter(lambda files: all(n not in (b".", b"..") for _, n in files))
)
def test_every_file_is_listed_once_whatever_its_name_bytes(files):
    """Every file on disk is in the listing (UTF-8 names) or in the list for the quarantine
    (escaped), exactly once, and the escaped text gives back its bytes."""
    folders = {folder for folder, _ in files if folder}
    names = {name for _, name in files}
    if folders & names:  # a name both a folder and a file in the same place
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(os.fsencode(tmp), b"src")
        written = set()
        for folder, name in files:
            os.makedirs(os.path.join(root, folder), exist_ok=True)
            path = os.path.join(folder, name) if folder else name
            with open(os.path.join(root, path), "wb") as fh:
                fh.write(name)
            written.add(path)
        store = SiteStore(os.path.join(tmp, "store"), "site-p")
        listed = write_listing(os.fsdecode(root), store, LISTING, undecodable=UNDECODABLE)
        good = pq.read_table(store.path(LISTING)).column("path").to_pylist()
        bad = []
        if os.path.exists(store.path(UNDECODABLE)):
            bad = pq.read_table(store.path(UNDECODABLE)).column("path").to_pylist()
        assert listed == len(written) == len(good) + len(bad)
        found = [p.encode() for p in good] + [name_bytes(p) for p in bad]
        assert sorted(found) == sorted(written)
        assert all(is_utf8_name(p) for p in good)
        assert all(not is_utf8_name(os.fsdecode(name_bytes(p))) for p in bad)

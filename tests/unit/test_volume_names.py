"""NIfTI/NRRD ingest of files whose names are not UTF-8 (legacy code-page exports).

Real NIfTI volumes written with SimpleITK are given names in ISO-8859-2, Windows-1250, CP1253
and Latin-1 bytes, beside Greek, Bulgarian, Polish, Hungarian and Irish UTF-8 names. The
legacy ones must be quarantined (``undecodable-name``, escaped path, never handed to
SimpleITK, which aborts the process on such a path), every other one ingested, read back with
DuckDB and pyarrow.dataset, and a second run must change nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as ds
import pytest
import SimpleITK as sitk

from flows.volumes import catalogue_cases
from tasks.deid.pseudonyms import SiteKeys
from tasks.dicom.catalog import _replace_ingest_quarantine, replace_undecodable
from tasks.dicom.listing import escape_name, name_bytes
from tasks.errors import OncoflowError
from tasks.quarantine import UNDECODABLE_DETAIL, undecodable_record
from tasks.records import Reason, Stage
from tasks.store import SiteStore
from tasks.volumes.cases import cases_from_folder, is_volume_source, list_cases, read_cases_csv
from tasks.volumes.deid import deidentify_volume, plan_volume_jobs
from tasks.volumes.images import nrrd_bytes, read_image_bytes

SITE = "site-v"
SECRET = "volume-names-secret-0123456789-abcdefghijklmnop"
#: Cases named in UTF-8: all must ingest.
UTF8_CASES = ["Ελένη Παππά", "Йорданка Петрова", "Łucja Wójcik", "Gergő Szűcs", "Seán Ó Briain"]
#: Legacy names as bytes: (folder, file); each file is ``<case>_image.nii`` or ``_mask.nii``.
LEGACY = [
    (b"", "Szőke".encode("iso-8859-2")),
    (b"", "Wiśniewski".encode("cp1250")),
    (b"", "Παπαδόπουλος".encode("cp1253")),
    ("Kovács Ödön".encode("latin-1"), b"case1"),  # a legacy folder, ASCII file names
]
#: Escaped items, written by hand for two of them (the rest checked by their bytes).
SZOKE_ITEMS = ["Sz\\xf5ke_image.nii", "Sz\\xf5ke_mask.nii"]
KOVACS_ITEMS = ["Kov\\xe1cs \\xd6d\\xf6n/case1_image.nii", "Kov\\xe1cs \\xd6d\\xf6n/case1_mask.nii"]


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", SECRET)


def _volume(value: int, mask: bool) -> bytes:
    """A real 8x8x4 NIfTI image (or its mask) as bytes, written by SimpleITK."""
    array = np.zeros((4, 8, 8), np.uint8) if mask else np.full((4, 8, 8), value, np.int16)
    if mask:
        array[1:3, 2:6, 2:6] = 1
    else:
        array[1:3, 2:6, 2:6] += np.arange(16, dtype=np.int16).reshape(4, 4)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.nii")
        sitk.WriteImage(image, path)
        return Path(path).read_bytes()


def _write_pair(root: bytes, stem: bytes, value: int) -> list[bytes]:
    paths = []
    for word, mask in ((b"image", False), (b"mask", True)):
        path = os.path.join(root, stem + b"_" + word + b".nii")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:  # a bytes path: SimpleITK cannot be given it
            fh.write(_volume(value, mask))
        paths.append(path)
    return paths


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "cohort"
    for i, case in enumerate(UTF8_CASES):
        _write_pair(os.fsencode(root), case.encode("utf-8"), 100 + i)
    for i, (sub, stem) in enumerate(LEGACY):
        _write_pair(os.path.join(os.fsencode(root), sub) if sub else os.fsencode(root), stem, i)
    lonely = os.path.join(os.fsencode(root), "Ó Súilleabháin_image.nii".encode("latin-1"))
    Path(os.fsdecode(lonely)).write_bytes(_volume(7, False))  # no mask, legacy name
    Path(
        os.fsdecode(os.path.join(os.fsencode(root), "jegyzet ő.txt".encode("iso-8859-2")))
    ).write_text("x")
    return root


def _legacy_bytes() -> set[bytes]:
    out = {"Ó Súilleabháin_image.nii".encode("latin-1")}
    for sub, stem in LEGACY:
        prefix = sub + b"/" if sub else b""
        out |= {prefix + stem + b"_image.nii", prefix + stem + b"_mask.nii"}
    return out


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _quarantine(store_dir: Path) -> list[dict]:
    dataset = ds.dataset(store_dir / SITE / "quarantine.parquet", format="parquet")
    return sorted(dataset.to_table().to_pylist(), key=lambda r: r["item"])


def test_legacy_names_are_quarantined_and_every_other_volume_ingests(folder, tmp_path):
    assert is_volume_source(str(folder))
    store_dir = tmp_path / "store"
    summary = catalogue_cases(str(folder), SITE, str(store_dir))

    catalogue = duckdb.sql(
        "SELECT patient_id, status, image, masks FROM read_parquet(?) ORDER BY patient_id",
        params=[str(store_dir / SITE / "catalog/volumes.parquet")],
    ).fetchall()
    assert [r[0] for r in catalogue] == sorted(UTF8_CASES)
    assert {r[1] for r in catalogue} == {"ok"}
    assert all(Path(r[2]).name.startswith(r[0]) and len(r[3]) == 1 for r in catalogue)

    rows = _quarantine(store_dir)
    items = [r["item"] for r in rows]
    assert {(r["stage"], r["kind"], r["reason"], r["detail"]) for r in rows} == {
        ("ingest", "volume", "undecodable-name", UNDECODABLE_DETAIL)
    }
    assert set(SZOKE_ITEMS + KOVACS_ITEMS) <= set(items)
    assert {name_bytes(item) for item in items} == _legacy_bytes()  # each file once, exact bytes
    assert summary.counts == {"ok": 5, "quarantined": 9}
    assert summary.reasons == {"undecodable-name": 9}
    assert summary.extra["files_undecodable"] == 9 and summary.extra["volumes"] == 5

    # what leaves the private zone: no name, escaped name or plain hash of either
    public = json.dumps(summary.to_dict(), ensure_ascii=False)
    for raw in _legacy_bytes():
        text = os.fsdecode(raw)
        for value in (escape_name(text), raw.decode("latin-1"), text.rsplit("_", 1)[0]):
            for shown in (
                value,
                hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest(),
            ):
                assert shown[:12] not in public
    for case in UTF8_CASES:
        plain = hashlib.sha256(f"{case}_image.nii".encode()).hexdigest()
        assert case not in public and case.split()[0] not in public and plain[:12] not in public

    # de-identification reads only the catalogued (UTF-8) volumes, with SimpleITK
    store = SiteStore(str(store_dir), SITE)
    keys = SiteKeys.derive(SECRET.encode(), SITE)
    outcomes = [deidentify_volume(store, job, keys) for job in plan_volume_jobs(store)]
    assert [o.result.status for o in outcomes] == ["ok"] * 5
    assert all(len(o.result.outputs) == 2 for o in outcomes)


def test_a_second_run_changes_nothing_and_a_renamed_file_ingests(folder, tmp_path):
    store_dir = tmp_path / "store"
    catalogue_cases(str(folder), SITE, str(store_dir))
    before = _snapshot(store_dir)
    again = catalogue_cases(str(folder), SITE, str(store_dir))
    assert _snapshot(store_dir) == before
    assert again.extra["table_written"] is False and again.counts == {"ok": 5, "quarantined": 9}

    # convmv's fix: the ISO-8859-2 pair renamed to UTF-8 ingests, its rows leave
    for word in ("image", "mask"):
        old = os.path.join(
            os.fsencode(folder), "Szőke".encode("iso-8859-2") + f"_{word}.nii".encode()
        )
        os.rename(old, folder / f"Szőke_{word}.nii")
    fixed = catalogue_cases(str(folder), SITE, str(store_dir))
    assert fixed.counts == {"ok": 6, "quarantined": 7}
    items = [r["item"] for r in _quarantine(store_dir)]
    assert not set(SZOKE_ITEMS) & set(items) and len(items) == 7


def test_dicom_ingest_leaves_the_volume_rows_alone(folder, tmp_path):
    store_dir = tmp_path / "store"
    catalogue_cases(str(folder), SITE, str(store_dir))
    before = _quarantine(store_dir)
    # a DICOM ingest of a source without legacy names replaces only its own rows
    store = SiteStore(str(store_dir), SITE)
    replace_undecodable(store, [])
    assert _quarantine(store_dir) == before
    # and so does one that rebuilds all its rows (a first run, a new catalogue version)
    _replace_ingest_quarantine(store, [undecodable_record("IM0001.dcm")], None)
    assert _quarantine(store_dir) == sorted(
        [*before, undecodable_record("IM0001.dcm").to_row()], key=lambda r: r["item"]
    )


def test_cases_csv_with_legacy_cells(tmp_path):
    root = tmp_path / "export"
    for i, case in enumerate(UTF8_CASES):
        _write_pair(os.fsencode(root), case.encode("utf-8"), 100 + i)
    szoke = "Szőke".encode("iso-8859-2")
    wisniewski = "Wiśniewski".encode("cp1250")
    _write_pair(os.fsencode(root), szoke, 1)
    _write_pair(os.fsencode(root), wisniewski, 2)
    lines = [b"Image,Mask,Patient,Modality"]
    lines += [f"{c}_image.nii,{c}_mask.nii,{c},MR".encode() for c in UTF8_CASES]
    lines.append(szoke + b"_image.nii," + szoke + b"_mask.nii,P1,CT")  # a legacy tool's rows
    gergo = "Gergő Szűcs_image.nii".encode("iso-8859-2")  # no such file: never looked up
    lines.append(gergo + ",Gergő Szűcs_mask.nii,P2,CT".encode())
    lines.append("Łucja Wójcik_image.nii,".encode() + wisniewski + b"_mask.nii,P3,CT")
    csv = root / "cases.csv"
    csv.write_bytes(b"\n".join(lines) + b"\n")

    undecodable: list[str] = []
    cases = read_cases_csv(str(csv), undecodable)
    assert sorted(c.patient_id for c in cases) == sorted(UTF8_CASES)
    assert {name_bytes(i) for i in undecodable} == {
        szoke + b"_image.nii", szoke + b"_mask.nii", gergo,
        wisniewski + b"_mask.nii",
    }  # fmt: skip
    # the Wójcik image's own row is kept: only its legacy-named second mask is left out
    wojcik = next(c for c in cases if c.patient_id == "Łucja Wójcik")
    assert [Path(m).name for m in wojcik.masks] == ["Łucja Wójcik_mask.nii"]

    summary = catalogue_cases(str(csv), SITE, str(tmp_path / "store"))
    assert summary.counts == {"ok": 5, "quarantined": 4}
    assert {r["item"] for r in _quarantine(tmp_path / "store")} == set(undecodable)

    with pytest.raises(OncoflowError, match=r"not UTF-8 .*convmv"):
        read_cases_csv(str(csv))  # without a quarantine to go to: one line
    csv.write_bytes(b"Image,Mask,Patient\n" + b"a_image.nii,a_mask.nii," + szoke + b"\n")
    with pytest.raises(OncoflowError, match=r"^cases file cases.csv line 2: Patient is not UTF-8"):
        read_cases_csv(str(csv), [])


def test_one_line_errors_and_a_folder_of_only_legacy_names(tmp_path):
    root = tmp_path / "old"
    _write_pair(os.fsencode(root), "Παπαδόπουλος".encode("cp1253"), 3)
    with pytest.raises(OncoflowError, match=r"^a file name under .* is not UTF-8"):
        cases_from_folder(str(root))
    undecodable: list[str] = []
    assert cases_from_folder(str(root), undecodable) == [] and len(undecodable) == 2
    summary = catalogue_cases(str(root), SITE, str(tmp_path / "store"))
    assert summary.counts == {"quarantined": 2}
    assert duckdb.sql(
        "SELECT count(*) FROM read_parquet(?)",
        params=[str(tmp_path / "store" / SITE / "catalog/volumes.parquet")],
    ).fetchall() == [(0,)]
    bad_source = os.fsdecode(os.path.join(os.fsencode(tmp_path), "Sz\xf5ke".encode("latin-1")))
    with pytest.raises(OncoflowError, match=r"^the source's path is not UTF-8"):
        list_cases(bad_source, [])


def test_simpleitk_never_gets_a_path_that_is_not_utf8(tmp_path, monkeypatch):
    data = _volume(5, False)
    bad = os.fsdecode(os.path.join(os.fsencode(tmp_path), "Wiśniewski".encode("cp1250")))
    os.mkdir(bad)
    monkeypatch.setattr(tempfile, "tempdir", bad)
    with pytest.raises(OncoflowError, match=r"^the temporary folder's path is not UTF-8"):
        read_image_bytes(data, ".nii")  # SimpleITK would abort the process here
    with pytest.raises(OncoflowError, match="TMPDIR"):
        nrrd_bytes(sitk.Image(2, 2, 2, sitk.sitkUInt8))
    monkeypatch.undo()
    assert read_image_bytes(data, ".nii").GetSize() == (8, 8, 4)


def test_a_volume_gone_since_ingest_is_quarantined_at_deidentify(folder, tmp_path):
    store_dir = tmp_path / "store"
    catalogue_cases(str(folder), SITE, str(store_dir))
    store = SiteStore(str(store_dir), SITE)
    jobs = plan_volume_jobs(store)
    os.unlink(jobs[0].image)
    os.unlink(jobs[1].masks[0])
    keys = SiteKeys.derive(SECRET.encode(), SITE)
    image_gone = deidentify_volume(store, jobs[0], keys)
    assert (image_gone.result.status, image_gone.result.reason) == ("quarantined", "missing-file")
    mask_gone = deidentify_volume(store, jobs[1], keys)
    assert mask_gone.result.status == "ok"
    assert [(r.reason, r.detail) for r in mask_gone.quarantine] == [
        (Reason.MISSING_FILE, "mask file not found")
    ]
    assert mask_gone.quarantine[0].stage == Stage.DEIDENTIFY

import os
import struct
import zlib
from functools import partial
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.datadict import keyword_for_tag
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid

from tasks.dicom.headers import (
    HEADER_COLUMNS,
    INSTANCE_COLUMNS,
    parse_batch_to_part,
    parse_files,
    quiet_pydicom,
    read_instance,
    rows_to_table,
)
from tasks.dicom.listing import ListedFile, list_source
from tasks.store import SiteStore
from tests.dicom_factory import ct_dataset, write

OPEN_RB = partial(open, mode="rb")


def _read(path: Path) -> dict:
    listed = ListedFile(path.name, path.stat().st_size, "0")
    with quiet_pydicom():
        return read_instance(OPEN_RB, str(path), listed)


def _ct(tmp_path: Path, name: str = "ct.dcm", **kwargs) -> Path:
    ds = ct_dataset(series_uid=generate_uid(), study_uid=generate_uid(), **kwargs)
    return write(ds, tmp_path / name)


def _expected(ds: pydicom.Dataset, column) -> object:
    """What pydicom's own attribute access gives for a catalogue column."""
    value = ds.get(keyword_for_tag(column.tag))
    if value is None or value == "":
        return None
    if column.kind == "text":
        return "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
    if column.kind == "floats":
        return [float(v) for v in value]
    return int(value) if column.kind == "int" else float(value)


def test_valid_ct_gives_an_ok_row_with_every_column(tmp_path):
    path = _ct(tmp_path, position=(1.5, -2.0, 30.25), instance_number=7)
    row = _read(path)
    assert set(row) == set(INSTANCE_COLUMNS)
    assert row["status"] == "ok" and row["reason"] == ""
    assert row["patient_name"] == "Doe^Jane"
    assert row["image_position"] == [1.5, -2.0, 30.25]
    assert row["image_orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert row["instance_number"] == 7
    assert (row["rows"], row["columns"], row["bits_allocated"]) == (8, 8, 16)
    assert row["image_type"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert row["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
    assert row["rescale_intercept"] == -1024.0
    assert row["frame_positions"] is None


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "JPEG2000.dcm",
        "image_dfl.dcm",
        "rtdose.dcm",
        "liver_1frame.dcm",
        "reportsi.dcm",
        "ExplVR_BigEnd.dcm",
    ],
)
def test_values_match_pydicom_attribute_access(name):
    path = Path(get_testdata_file(name))
    row = _read(path)
    assert row["status"] == "ok", row["detail"]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for column in HEADER_COLUMNS:
        geometry = ("slice_thickness", "pixel_spacing", "image_position", "image_orientation")
        if row["frame_positions"] and column.name in geometry:
            continue  # multi-frame: taken from the functional groups
        assert row[column.name] == _expected(ds, column), column.name


@pytest.mark.parametrize("name", ["chrH31.dcm", "chrFren.dcm", "chrI2.dcm", "chrX2.dcm"])
def test_person_names_in_other_character_sets(name):
    path = Path(get_charset_files(name)[0])
    row = _read(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert row["patient_name"] == str(ds.PatientName)
    assert row["patient_name"] and "\\x" not in row["patient_name"]


def test_empty_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    row = _read(path)
    assert (row["status"], row["reason"]) == ("quarantined", "empty-file")


@pytest.mark.parametrize(
    "content", [b"patient notes\n" * 20, b"\xff\xd8\xff\xe0" + bytes(300), b"DICM" * 10]
)
def test_not_dicom(tmp_path, content):
    path = tmp_path / "x"
    path.write_bytes(content)
    assert _read(path)["reason"] == "not-dicom"


def test_dicomdir():
    path = Path(get_testdata_file("DICOMDIR"))
    row = _read(path)
    assert (row["status"], row["reason"]) == ("quarantined", "dicomdir")
    assert row["patient_name"] is None  # a directory's records are not catalogued


def test_truncated_native_pixel_data(tmp_path):
    path = _ct(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    row = _read(path)
    assert (row["status"], row["reason"]) == ("quarantined", "truncated-file")
    assert row["detail"] == "Pixel Data declares 128 bytes, 118 present"


def test_truncated_encapsulated_pixel_data(tmp_path):
    ds = ct_dataset(series_uid=generate_uid(), study_uid=generate_uid())
    path = write(ds, tmp_path / "rle.dcm", rle=True)
    assert _read(path)["status"] == "ok"
    data = path.read_bytes()
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # sequence delimiter
    for cut in (8, 9, 20):
        path.write_bytes(data[:-cut])
        row = _read(path)
        assert row["reason"] == "truncated-file", (cut, row["detail"])


def test_truncated_inside_the_header(tmp_path):
    path = _ct(tmp_path)
    data = path.read_bytes()
    at = data.index(b"Doe^Jane")
    path.write_bytes(data[: at + 3])
    row = _read(path)
    assert (row["status"], row["reason"]) == ("quarantined", "truncated-file")


def test_image_header_without_pixel_data_is_truncated(tmp_path):
    path = _ct(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"\xe0\x7f\x10\x00")])
    assert _read(path)["reason"] == "truncated-file"


def test_truncated_deflated_file(tmp_path):
    source = Path(get_testdata_file("image_dfl.dcm"))
    data = source.read_bytes()
    path = tmp_path / "dfl.dcm"
    path.write_bytes(data[: len(data) - 200])
    row = _read(path)
    assert (row["status"], row["reason"]) == ("quarantined", "truncated-file")
    assert "deflated" in row["detail"]
    # the untouched file decompresses completely
    assert _read(source)["status"] == "ok"
    assert zlib  # deflate is what the check relies on


def test_pixel_data_written_in_implicit_vr_inside_an_explicit_file():
    # pydicom's sample switches to implicit VR before Pixel Data; the length is still checked
    row = _read(Path(get_testdata_file("SC_rgb_jpeg.dcm")))
    assert row["status"] == "ok", row["detail"]


def test_missing_uids(tmp_path):
    ds = ct_dataset(series_uid=generate_uid(), study_uid=generate_uid())
    del ds.SeriesInstanceUID
    path = write(ds, tmp_path / "nouid.dcm")
    row = _read(path)
    assert (row["status"], row["reason"]) == ("quarantined", "missing-uids")
    assert row["detail"] == "missing series_instance_uid"


def test_invalid_numbers_are_null_not_errors(tmp_path):
    path = _ct(tmp_path)
    data = path.read_bytes()
    # InstanceNumber (0020,0013) IS "1 " -> "x "
    tag = struct.pack("<HH", 0x0020, 0x0013) + b"IS" + struct.pack("<H", 2)
    at = data.index(tag)
    path.write_bytes(data[: at + 8] + b"x " + data[at + 10 :])
    row = _read(path)
    assert row["status"] == "ok"
    assert row["instance_number"] is None


def test_vanished_file_is_a_row_not_an_error(tmp_path):
    listed = ListedFile("gone.dcm", 1000, "0")
    row = read_instance(OPEN_RB, str(tmp_path / "gone.dcm"), listed)
    assert (row["status"], row["reason"]) == ("quarantined", "unreadable-header")


def test_parse_files_reads_nested_folders_in_listing_order(tmp_path):
    _ct(tmp_path / "a" / "b", "1.dcm")
    (tmp_path / "a" / "notes.txt").write_text("hello")
    files = list_source(str(tmp_path))
    rows = parse_files(str(tmp_path), files)
    assert [r["path"] for r in rows] == ["a/b/1.dcm", "a/notes.txt"]
    assert [r["reason"] for r in rows] == ["", "not-dicom"]


def test_batch_part_holds_rows_and_result_holds_counts_only(tmp_path):
    source = tmp_path / "src"
    _ct(source, "1.dcm")
    (source / "2.dcm").write_bytes(b"")
    files = list_source(str(source))
    result = parse_batch_to_part("bkey", files, str(source), str(tmp_path / "store"), "site-x")
    assert result.statuses == {"ok": 1, "quarantined": 1}
    assert result.reasons == {"empty-file": 1}
    assert result.part == "catalog/_parts/bkey.parquet"
    assert "Doe" not in repr(result) and "1.dcm" not in repr(result)
    table = SiteStore(str(tmp_path / "store"), "site-x").read_table(result.part)
    assert table.column("path").to_pylist() == ["1.dcm", "2.dcm"]
    assert table.column("patient_name").to_pylist() == ["Doe^Jane", None]
    assert table.schema == rows_to_table([]).schema


def test_pydicom_warnings_do_not_escape(tmp_path, recwarn):
    path = Path(get_testdata_file("SC_rgb_jpeg.dcm"))  # makes pydicom warn about the VR switch
    files = [ListedFile(path.name, os.path.getsize(path), "0")]
    parse_files(str(path.parent), files)
    assert not [w for w in recwarn if "pydicom" in str(w.filename)]


def _both_readers(data: bytes) -> tuple[dict, dict]:
    import io

    from tasks.dicom.headers import _parse_open_file, empty_row

    listed = ListedFile("f.dcm", len(data), "0")
    with quiet_pydicom():
        return tuple(
            _parse_open_file(io.BytesIO(data), empty_row(listed), len(data), fast=fast)
            for fast in (True, False)
        )


def _corpus() -> list[Path]:
    test_files = Path(get_testdata_file("CT_small.dcm")).parent
    charset_files = Path(get_charset_files("chrH31.dcm")[0]).parent
    paths = [*test_files.glob("*.dcm"), *(test_files / "dicomdirtests").rglob("*")]
    paths += charset_files.glob("*.dcm")
    return sorted(p for p in paths if p.is_file() and p.stat().st_size)


def test_fast_reader_gives_the_same_rows_as_pydicoms_full_reader(tmp_path):
    """The element-generator reader and read_partial agree on every sample file."""
    _ct(tmp_path, "native.dcm")
    write(
        ct_dataset(series_uid=generate_uid(), study_uid=generate_uid()),
        tmp_path / "rle.dcm",
        rle=True,
    )
    write(
        ct_dataset(series_uid=generate_uid(), study_uid=generate_uid()),
        tmp_path / "imp.dcm",
        implicit=True,
    )
    corpus = [*_corpus(), *sorted(tmp_path.glob("*.dcm"))]
    assert len(corpus) > 150
    statuses = set()
    for path in corpus:
        fast, full = _both_readers(path.read_bytes())
        assert fast == full, path.name
        statuses.add(fast["reason"] or "ok")
    assert {"ok", "dicomdir", "not-dicom", "truncated-file", "missing-uids"} <= statuses

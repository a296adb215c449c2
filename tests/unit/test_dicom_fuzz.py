"""Fuzzing the header parser: whatever the bytes, one row with a status and a reason."""

import io
import os
import tempfile
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tasks.dicom.headers import (
    INSTANCE_COLUMNS,
    _parse_open_file,
    empty_row,
    parse_files,
    quiet_pydicom,
    read_instance,
)
from tasks.dicom.listing import ListedFile
from tasks.records import Reason
from tests.dicom_factory import ct_dataset, write

OPEN_RB = partial(open, mode="rb")
REASONS = {str(r) for r in Reason}
FUZZ = settings(
    max_examples=int(os.environ.get("ONCOFLOW_FUZZ_EXAMPLES", "150")),
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _samples() -> dict[str, bytes]:
    """Real files without elements after Pixel Data: every strict prefix is incomplete."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = (("native", {}), ("rle", {"rle": True}), ("implicit", {"implicit": True}))
        for name, kwargs in variants:
            ds = ct_dataset(series_uid=generate_uid(), study_uid=generate_uid())
            out[name] = write(ds, Path(tmp) / f"{name}.dcm", **kwargs).read_bytes()
    for name in ("image_dfl.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "liver_1frame.dcm"):
        out[name] = Path(get_testdata_file(name)).read_bytes()
    return out


SAMPLES = _samples()
NAMES = sorted(SAMPLES)
# The deflate stream of pydicom's sample is followed by 8 bytes that no reader uses.
IGNORED_TAIL = {"image_dfl.dcm": 8}


def _row(data: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".dcm") as fh:
        fh.write(data)
        fh.flush()
        listed = ListedFile("f.dcm", len(data), "0")
        with quiet_pydicom():
            row = read_instance(OPEN_RB, fh.name, listed)
            if data:  # the fast reader and pydicom's full reader reach the same verdict
                full = _parse_open_file(io.BytesIO(data), empty_row(listed), len(data), fast=False)
                assert (row["status"], row["reason"]) == (full["status"], full["reason"])
    assert set(row) == set(INSTANCE_COLUMNS)
    assert row["status"] in ("ok", "quarantined")
    if row["status"] == "quarantined":
        assert row["reason"] in REASONS and row["detail"]
    else:
        assert row["reason"] == "" and row["sop_instance_uid"] and row["series_instance_uid"]
    return row


def test_samples_are_ok():
    for name, data in SAMPLES.items():
        assert _row(data)["status"] == "ok", name


def test_a_file_meta_vr_corruption_gets_one_verdict_from_both_readers():
    """Regression: ``JPEG2000.dcm`` with byte 137 set to 0 (the meta group length's VR ``UL``
    becomes ``U\\0``) was ``ok`` for the fast reader and ``missing-uids`` for the full one."""
    data = bytearray(SAMPLES["JPEG2000.dcm"])
    assert data[136:138] == b"UL"
    data[137] = 0
    row = _row(bytes(data))  # checks that both readers agree
    assert (row["status"], row["reason"]) == ("quarantined", "unreadable-header")


def test_a_deflate_bomb_is_quarantined_by_both_readers(monkeypatch):
    ds = ct_dataset(series_uid=generate_uid(), study_uid=generate_uid(), rows=512, columns=512)
    ds.PixelData = bytes(512 * 512 * 2)  # zeros: 512 KiB deflate to about 1 KiB
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert len(data) < 16 * 1024
    monkeypatch.setenv("ONCOFLOW_MAX_INFLATED_MB", "0")
    row = _row(data)  # checks that both readers agree
    assert (row["status"], row["reason"]) == ("quarantined", "input-too-large")
    assert "0 MiB" in row["detail"]
    monkeypatch.setenv("ONCOFLOW_MAX_INFLATED_MB", "4")
    assert _row(data)["status"] == "ok"


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    _row(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_after_a_dicom_prefix(tail):
    _row(bytes(128) + b"DICM" + tail)


@FUZZ
@given(st.sampled_from(NAMES), st.data())
def test_every_strict_prefix_is_quarantined(name, data):
    full = SAMPLES[name]
    last = len(full) - 1 - IGNORED_TAIL.get(name, 0)
    cut = data.draw(st.integers(min_value=0, max_value=last))
    row = _row(full[:cut])
    assert row["status"] == "quarantined", (name, cut)
    assert row["reason"] in {
        "empty-file",
        "not-dicom",
        "truncated-file",
        "missing-uids",
        "unreadable-header",
    }


@pytest.mark.parametrize("name", NAMES)
def test_prefixes_inside_pixel_data_are_truncated(name):
    full = SAMPLES[name]
    # the last 40 bytes are inside Pixel Data (or the deflate stream) for every sample
    end = len(full) - IGNORED_TAIL.get(name, 0)
    for cut in range(end - 40, end):
        assert _row(full[:cut])["reason"] == "truncated-file", (name, cut)


@FUZZ
@given(
    st.sampled_from(NAMES),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_random_byte_changes(name, changes):
    data = bytearray(SAMPLES[name])
    for at, value in changes:
        data[at % len(data)] = value
    _row(bytes(data))


@FUZZ
@given(st.sampled_from(NAMES), st.data())
def test_random_insertions_and_deletions(name, data):
    full = SAMPLES[name]
    at = data.draw(st.integers(min_value=128, max_value=len(full)))
    removed = data.draw(st.integers(min_value=0, max_value=64))
    inserted = data.draw(st.binary(max_size=64))
    _row(full[:at] + inserted + full[at + removed :])


def test_a_batch_of_garbage_never_raises(tmp_path):
    blobs = [b"", b"x" * 10, bytes(128) + b"DICM" + b"\xff" * 300, SAMPLES["native"][:400]]
    files = []
    for i, blob in enumerate(blobs):
        (tmp_path / f"{i}.dcm").write_bytes(blob)
        files.append(ListedFile(f"{i}.dcm", len(blob), "0"))
    files.append(ListedFile("missing.dcm", 10, "0"))
    rows = parse_files(str(tmp_path), files)
    assert [r["status"] for r in rows] == ["quarantined"] * 5
    assert [r["reason"] for r in rows] == [
        "empty-file",
        "not-dicom",
        rows[2]["reason"],
        "truncated-file",
        "unreadable-header",
    ]

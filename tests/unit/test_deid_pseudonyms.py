"""Keyed pseudonyms, UID remapping and date shifts (tasks.deid.pseudonyms, tasks.deid.secret)."""

from __future__ import annotations

import multiprocessing as mp
from datetime import datetime

import pytest
from pydicom.uid import UID

from tasks.deid.pseudonyms import DateShift, SiteKeys, hkdf_sha256
from tasks.deid.secret import SECRET_BLOCK_ENV, SECRET_ENV, load_site_secret
from tasks.errors import OncoflowError

SECRET = b"unit-test-secret-0123456789-abcdefghij"
OTHER = b"another-secret-0123456789-abcdefghijkl"


def test_hkdf_matches_rfc5869_test_case_1():
    okm = hkdf_sha256(
        bytes.fromhex("0b" * 22),
        info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        salt=bytes.fromhex("000102030405060708090a0b0c"),
        length=42,
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_same_secret_same_outputs_other_secret_unlinkable():
    a, b, c = (
        SiteKeys.derive(SECRET, "site-a"),
        SiteKeys.derive(SECRET, "site-a"),
        SiteKeys.derive(OTHER, "site-a"),
    )
    uid = "1.2.826.0.1.3680043.8.498.123"
    assert a.patient_pseudonym("MRN-1") == b.patient_pseudonym("MRN-1")
    assert a.remap_uid(uid) == b.remap_uid(uid)
    assert a.date_shift("MRN-1") == b.date_shift("MRN-1")
    assert a.key_id == b.key_id != c.key_id
    assert a.patient_pseudonym("MRN-1") != c.patient_pseudonym("MRN-1")
    assert a.remap_uid(uid) != c.remap_uid(uid)
    # per-site keys: the same patient at another site gets another pseudonym
    assert a.patient_pseudonym("MRN-1") != SiteKeys.derive(SECRET, "site-b").patient_pseudonym(
        "MRN-1"
    )
    # different inputs never collide and padding does not matter
    assert a.patient_pseudonym("MRN-1") != a.patient_pseudonym("MRN-2")
    assert a.patient_pseudonym("MRN-1 ") == a.patient_pseudonym("MRN-1")


def test_keys_never_in_repr():
    keys = SiteKeys.derive(SECRET, "site-a")
    text = repr(keys)
    assert keys.patient_key.hex() not in text and "patient_key" not in text
    assert SECRET.decode() not in text


def test_pseudonym_format():
    p = SiteKeys.derive(SECRET, "site-a").patient_pseudonym("MRN-80567361")
    assert len(p) == 26 and p.isalnum() and p.upper() == p


@pytest.mark.parametrize(
    "uid", ["1.2.3", "1.2.840.113619.2.55.3.604688119.969.1268071029.320", "9" * 64]
)
def test_remapped_uids_are_valid_and_new(uid):
    new = SiteKeys.derive(SECRET, "site-a").remap_uid(uid)
    assert new.startswith("2.25.") and len(new) <= 64
    assert UID(new).is_valid
    assert uid not in new
    # the integer is a version-8 UUID
    value = int(new[5:])
    assert (value >> 76) & 0xF == 8


def _in_child(queue):
    keys = SiteKeys.derive(SECRET, "site-a")
    queue.put((keys.patient_pseudonym("MRN-1"), keys.remap_uid("1.2.3"), keys.date_shift("MRN-1")))


def test_stable_across_spawned_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_in_child, args=(queue,))
    proc.start()
    got = queue.get(timeout=60)
    proc.join(30)
    keys = SiteKeys.derive(SECRET, "site-a")
    assert got == (
        keys.patient_pseudonym("MRN-1"),
        keys.remap_uid("1.2.3"),
        keys.date_shift("MRN-1"),
    )


def test_date_shift_window_and_intervals():
    shift = SiteKeys.derive(SECRET, "site-a").date_shift("MRN-1")
    assert 365 <= shift.days < 365 + 3650 and 1 <= shift.seconds < 86400
    # dates alone: intervals in days kept exactly
    d1, d2 = shift.shift_date("20180122"), shift.shift_date("20210315")
    fmt = "%Y%m%d"
    gap = datetime.strptime(d2, fmt) - datetime.strptime(d1, fmt)
    assert gap == datetime(2021, 3, 15) - datetime(2018, 1, 22)
    assert d1 != "20180122"


def test_pairs_and_datetimes_move_as_one_instant():
    shift = DateShift(days=1000, seconds=7200 + 30)
    # 23:00 + 2 h 30 s crosses midnight: the date carries
    date, time = shift.shift_pair("20200101", "230000.123456")
    assert (date, time) == ("20170407", "010030.123456")
    dt = shift.shift_datetime("20200101230000.123456+0100")
    assert dt == "20170407010030.123456"  # UTC offset dropped
    injection = datetime.strptime(shift.shift_datetime("20200101224500"), "%Y%m%d%H%M%S")
    scan = datetime.strptime("".join(shift.shift_pair("20200101", "233000")), "%Y%m%d%H%M%S")
    assert (scan - injection).total_seconds() == 45 * 60
    # precision is kept
    assert shift.shift_time("2300") == "0100"
    assert shift.shift_time("23") == "01"
    assert shift.shift_datetime("2020") == "2017"
    assert shift.shift_datetime("202001") == "201704"
    assert shift.shift_time("12:00:00") == "140030"  # legacy ACR-NEMA format normalised


@pytest.mark.parametrize("bad", ["", "2020-13-01", "20201301", "hello", "20200230"])
def test_unparseable_dates_fail_closed(bad):
    shift = DateShift(days=400, seconds=5)
    assert shift.shift_date(bad) is None


def test_unparseable_times_fail_closed():
    shift = DateShift(days=400, seconds=5)
    assert shift.shift_time("256100") is None
    assert shift.shift_datetime("not a date") is None


def test_secret_from_environment(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "s" * 40)
    assert load_site_secret("site-a") == b"s" * 40


def test_missing_secret_is_one_line_error(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.setenv(SECRET_BLOCK_ENV, "no-such-block-for-tests")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(OncoflowError) as err:
        load_site_secret("site-a")
    message = str(err.value)
    assert "\n" not in message and SECRET_ENV in message


def test_short_secret_rejected(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(OncoflowError, match="too short"):
        load_site_secret("site-a")

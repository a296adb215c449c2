"""The byte-stream rewriter (tasks.deid.rewrite) against the pydicom path of deidentify_instance.

Whenever the rewriter returns, its output must be the pydicom path's, byte for byte, with the
same audit counts, quarantine reason and age; when it refuses a file (anything it does not
handle) the context must be untouched. Checked on real-world files, on the synthetic cohort,
on random headers written by pydicom and on corrupted files.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from pathlib import Path

import data_store
import deid_data
import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from tasks.deid.dataset import DeidContext, quiet_pydicom
from tasks.deid.profile import DeidOptions, PixelCleaningRule
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.rewrite import Unsupported, rewrite_instance
from tasks.deid.series import _deidentify_with_pydicom, _referenced_series, deidentify_instance
from tasks.records import Reason

KEYS = SiteKeys.derive(b"rewrite-test-secret-0123456789-abcdefghij", "site-w")
OPTIONS = {
    "default": DeidOptions(),
    "minimal": DeidOptions(clean_descriptors=False, patient_characteristics=(), safe_private=()),
    "pixel-rule": DeidOptions(
        pixel_rules=(PixelCleaningRule(name="corner", rectangles=((0, 0, 2, 2),)),)
    ),
}


def _context(options: DeidOptions, patient_id: str) -> DeidContext:
    return DeidContext(
        keys=KEYS, options=options, patient_id=patient_id, extra_identifiers=("Qzorvath Smith",)
    )


def _compare(data: bytes, fast_ctx: DeidContext, slow_ctx: DeidContext) -> bool:
    """Run both paths; return True when the rewriter handled the file (and matched)."""
    before = Counter(fast_ctx.audit)
    slow_before = Counter(slow_ctx.audit)
    slow = _deidentify_with_pydicom(data, slow_ctx)
    try:
        with quiet_pydicom():
            fast = rewrite_instance(data, fast_ctx)
    except Unsupported:  # any other exception fails the test
        assert fast_ctx.audit == before, "a refused file changed the audit"
        _deidentify_with_pydicom(data, fast_ctx)  # keep both contexts in step
        return False
    if fast.reason:
        assert slow.reason is Reason(fast.reason) and slow.detail == fast.detail
        assert fast_ctx.audit == before
        return True
    assert slow.reason is None, slow.detail
    assert fast.data == slow.data
    assert fast.age == slow.age
    fast_delta, slow_delta = Counter(fast_ctx.audit), Counter(slow_ctx.audit)
    fast_delta.subtract(before)
    slow_delta.subtract(slow_before)
    assert +fast_delta == +slow_delta
    if not fast.references:
        assert not _referenced_series(slow.dataset, "")
    return True


def _run_series(files: list[tuple[str, bytes]], options: DeidOptions) -> Counter[str]:
    """Compare file by file with one context per series (as the per-series task does)."""
    fast_contexts: dict[str, DeidContext] = {}
    slow_contexts: dict[str, DeidContext] = {}
    outcome: Counter[str] = Counter()
    for series, data in files:
        if series not in fast_contexts:
            fast_contexts[series] = _context(options, series[-12:])
            slow_contexts[series] = _context(options, series[-12:])
        handled = _compare(data, fast_contexts[series], slow_contexts[series])
        outcome["rewritten" if handled else "pydicom"] += 1
    return outcome


def _real_world() -> list[tuple[str, bytes]]:
    files = set((Path(pydicom.data.__file__).parent / "test_files").rglob("*"))
    files |= set((Path(data_store.__file__).parent / "data").rglob("*"))
    files |= set(Path(deid_data.__file__).parent.rglob("*.dcm"))
    return [(str(p.parent), p.read_bytes()) for p in sorted(files) if p.is_file()]


def test_real_world_files_give_the_pydicom_path_bytes():
    outcome = _run_series(_real_world(), DeidOptions())
    assert outcome["rewritten"] >= 200  # de-identified or quarantined without pydicom
    assert outcome["pydicom"] >= 30  # big endian, no file meta, broken files...


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_synthetic_cohort_gives_the_pydicom_path_bytes(synth_cohort: Path, option: str):
    site = synth_cohort / "site-a"
    files = [
        (str(p.parent), p.read_bytes())
        for p in sorted(site.rglob("*"))
        if p.is_file() and p.name != "truth.json"
    ]
    outcome = _run_series(files, OPTIONS[option])
    assert outcome["rewritten"] >= 0.9 * len(files)


def test_dispatch_uses_the_rewriter_and_reads_back_the_dataset(synth_cohort: Path):
    path = next(p for p in sorted((synth_cohort / "site-a").rglob("*.dcm")) if "/2/" in str(p))
    ctx = _context(DeidOptions(), "MRN-1")
    result = deidentify_instance(path.read_bytes(), ctx)
    assert result.parsed is None  # the rewriter built no dataset
    assert result.dataset is not None and result.dataset.PatientIdentityRemoved == "YES"


# -- random headers ---------------------------------------------------------------------------

TEXT = [
    "",
    "CT THORAX",
    "Qzorvath",
    "CT Qzorvath 5mm",
    "A\\B",
    "\\lead",
    "trail \\",
    " spaced ",
    "Müller",
    "Ünïcødé Qzorvath",
    "GTV-1",
    "ISO_IR 100",
]
DATES = ["", "20200102", "2020.01.02", "20201399", "19991231\\20000101", "2020"]
TIMES = ["", "101010", "101010.123", "1010", "25", "101010\\111111", "10:10:10"]
DATETIMES = ["", "20200102101010", "20200102101010.5+0100", "2020", "bad"]
UIDS = ["1.2.3.4", "1.2.3.4\\1.2.3.5", "", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4 "]
NUMBERS = ["", "5", "1.5\\2.5", " 12 ", "+1e3"]
#: (tag, VR, values): public elements of every profile action and value representation.
ELEMENTS = [
    (0x00080008, "CS", ["ORIGINAL\\PRIMARY\\AXIAL", "DERIVED \\SECONDARY", "", "SCREEN SAVE"]),
    (0x00080012, "DA", DATES),
    (0x00080013, "TM", TIMES),
    (0x00080020, "DA", DATES),
    (0x00080021, "DA", DATES),
    (0x00080022, "DA", DATES),
    (0x0008002A, "DT", DATETIMES),
    (0x00080030, "TM", TIMES),
    (0x00080031, "TM", TIMES),
    (0x00080032, "TM", TIMES),
    (0x00080050, "SH", TEXT),
    (0x00080060, "CS", ["CT", "MR", "US", "", "CT\\MR"]),
    (0x00080064, "CS", ["WSD", "DV", ""]),
    (0x00080070, "LO", TEXT),
    (0x00080080, "LO", TEXT),
    (0x00080090, "PN", ["", "Qzorvath^Anna", "Smith^J=Smith^J", "Müller^Hans"]),
    (0x00081010, "SH", TEXT),
    (0x00081030, "LO", TEXT),
    (0x0008103E, "LO", TEXT),
    (0x00081090, "LO", TEXT),
    (0x00100010, "PN", ["Qzorvath^Anna", "", "Müller^Hans"]),
    (0x00100020, "LO", ["MRN-1", "", "ID 2"]),
    (0x00100030, "DA", DATES),
    (0x00100040, "CS", ["F", "M", ""]),
    (0x00101000, "LO", TEXT),
    (0x00101010, "AS", ["063Y", "", "12M"]),
    (0x00101030, "DS", NUMBERS),
    (0x00180015, "CS", ["CHEST", "", "QZORVATH"]),
    (0x00180050, "DS", NUMBERS),
    (0x00181000, "LO", TEXT),
    (0x00181030, "LO", TEXT),
    (0x00200010, "SH", TEXT),
    (0x00200052, "UI", UIDS),
    (0x00204000, "LT", TEXT),
    (0x00280010, "US", [4]),
    (0x00280011, "US", [4]),
    (0x00280106, "US", [0, 7]),  # an ambiguous VR (US or SS) in the dictionary
    (0x00280301, "CS", ["NO", "YES", ""]),
    (0x00321060, "LO", TEXT),
    (0x0040A160, "UT", TEXT),  # TextValue
]
CHARSETS = [None, "ISO_IR 100", "ISO_IR 192", "ISO_IR 100\\ISO 2022 IR 87", ""]


@st.composite
def elements(draw, depth: int = 0) -> Dataset:
    ds = Dataset()
    for tag, vr, values in draw(
        st.lists(st.sampled_from(ELEMENTS), max_size=14, unique_by=lambda e: e[0])
    ):
        value = draw(st.sampled_from(values))
        if draw(st.integers(0, 9)) == 0 and isinstance(value, str):
            ds.add(DataElement(tag, "UN", value.encode("latin-1", "replace")))  # unknown VR
        else:
            ds.add(DataElement(tag, vr, value))
    if depth < 2:
        for tag in draw(
            st.lists(
                st.sampled_from([0x00081032, 0x00081140, 0x00400275, 0x0040A730, 0x00101002]),
                max_size=2,
                unique=True,
            )
        ):
            items = []
            for _ in range(draw(st.integers(0, 2))):
                item = draw(elements(depth=depth + 1))
                if draw(st.booleans()):
                    item.CodingSchemeDesignator = draw(st.sampled_from(["DCM", "99LOCAL", ""]))
                    item.CodeValue = draw(st.sampled_from(["113100", "Qzorvath", ""]))
                    item.CodeMeaning = draw(st.sampled_from(TEXT))
                if draw(st.booleans()):
                    item.ReferencedSOPInstanceUID = draw(st.sampled_from(UIDS))
                item.is_undefined_length_sequence_item = draw(st.booleans())
                items.append(item)
            seq = DataElement(tag, "SQ", Sequence(items))
            seq.is_undefined_length = draw(st.booleans())
            ds.add(seq)
    if draw(st.booleans()):
        block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        block.add_new(0x0C, draw(st.sampled_from(["IS", "DS", "LO"])), "1000")
        block.add_new(0x20, "LO", "Qzorvath")
    if draw(st.booleans()):
        ds.private_block(0x0011, "ACME HIS", create=True).add_new(0x01, "LO", "MRN-1")
    if draw(st.integers(0, 4)) == 0:
        ds.add(DataElement(0x00080000, "UL", 0))  # group length
        ds.add(DataElement(0x60003000, "OW", b"\x00\x01" * 4))  # overlay
    return ds


@st.composite
def files(draw) -> bytes:
    with warnings.catch_warnings(), pydicom_config.disable_value_validation():
        warnings.simplefilter("ignore")
        return _file(draw)


def _file(draw) -> bytes:
    ds = draw(elements())
    charset = draw(st.sampled_from(CHARSETS))
    if charset is not None:
        ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    if draw(st.integers(0, 9)):
        ds.SOPClassUID = CTImageStorage
    if draw(st.integers(0, 9)):
        ds.SOPInstanceUID = draw(st.sampled_from(["1.2.3.4.5", "1.2.3.4.5\\1.2.3.4.6", " "]))
    ds.StudyInstanceUID = "1.2.3.4.6"
    if draw(st.booleans()):
        ds.BitsAllocated, ds.PixelRepresentation = 16, 0
        ds.PixelData = b"\x00\x01" * 16
    syntax = draw(
        st.sampled_from(
            [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
        )
    )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, implicit_vr=syntax == ImplicitVRLittleEndian, enforce_file_format=True)
    except Exception:  # a value pydicom cannot encode in this character set
        return b""
    return buffer.getvalue()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=files(), option=st.sampled_from(sorted(OPTIONS)))
def test_random_headers_give_the_pydicom_path_bytes(data, option):
    _compare(data, _context(OPTIONS[option], "MRN-1"), _context(OPTIONS[option], "MRN-1"))


@pytest.fixture(scope="module")
def sample_files(synth_cohort: Path) -> list[bytes]:
    paths = sorted((synth_cohort / "site-a").rglob("*.dcm"))
    picks = []
    for series in ("/2/", "/5/", "/101/", "/102/"):  # CT, deflated MR, RTSTRUCT, SEG
        picks += [p for p in paths if series in str(p)][:1]
    return [p.read_bytes() for p in picks]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_files_give_the_pydicom_path_bytes_or_are_refused(sample_files, data):
    original = data.draw(st.sampled_from(sample_files))
    corrupted = bytearray(original)
    limit = min(len(corrupted), 4096)
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(128, limit - 1))
        corrupted[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        corrupted = corrupted[: data.draw(st.integers(132, len(corrupted)))]
    _compare(bytes(corrupted), _context(DeidOptions(), "MRN-1"), _context(DeidOptions(), "MRN-1"))


def test_untouched_pixel_data_is_copied_as_raw_bytes(synth_cohort: Path):
    path = next(p for p in sorted((synth_cohort / "site-a").rglob("*.dcm")) if "/2/" in str(p))
    source = dcmread(path)
    with quiet_pydicom():
        out = rewrite_instance(path.read_bytes(), _context(DeidOptions(), "MRN-1"))
    assert dcmread(io.BytesIO(out.data)).PixelData == source.PixelData


def test_delimiter_bytes_inside_a_fragment_do_not_end_the_pixel_data():
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.3.4.5"
    ds.Modality, ds.PatientName, ds.StudyDate = "CT", "Qzorvath^Anna", "20200102"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.SamplesPerPixel = 8, 1
    ds.PixelData = encapsulate([b"\xff\xd8\xfe\xff\xdd\xe0\x00\x00\x00\x00\xff\xd9"])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    handled = _compare(
        buffer.getvalue(), _context(DeidOptions(), "P"), _context(DeidOptions(), "P")
    )
    assert handled
    with quiet_pydicom():
        out = rewrite_instance(buffer.getvalue(), _context(DeidOptions(), "P"))
    assert dcmread(io.BytesIO(out.data)).PixelData == ds.PixelData

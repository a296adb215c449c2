"""The de-identification engine on the multilingual canary corpus and on crafted inputs.

Both engines (the byte-stream rewriter and the pydicom walk) take the same decisions: where the
rewriter handles a file, its bytes and audit equal the pydicom path's. No canary survives in
any byte written under ``deid/``, in the task's result or in its log records; encapsulated
documents, overlay bits, oversized inflation and malformed required attributes are handled.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from tasks.deid.dataset import DeidContext, quiet_pydicom
from tasks.deid.profile import DeidOptions
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.rewrite import Unsupported, rewrite_instance
from tasks.deid.series import SeriesJob, _deidentify_with_pydicom, deidentify_series
from tasks.records import Reason
from tasks.store import SiteStore
from tasks.synthetic.dicom_images import new_dataset
from tests.canaries import CANARIES, CanaryFile, find_canaries, inflated, write_corpus

KEYS = SiteKeys.derive(b"engine-test-secret-0123456789-abcdefghijk", "site-e")
SECRET = "engine-test-secret-0123456789-abcdefghijklmnopqrstuv"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CanaryFile]]:
    root = tmp_path_factory.mktemp("canary-source")
    return root, write_corpus(root)


def _both(data: bytes, options: DeidOptions, patient: str = "P-1"):
    """Run the pydicom path, and the rewriter when it handles the file; check they agree."""
    slow_ctx = DeidContext(keys=KEYS, options=options, patient_id=patient)
    fast_ctx = DeidContext(keys=KEYS, options=options, patient_id=patient)
    slow = _deidentify_with_pydicom(data, slow_ctx)
    try:
        with quiet_pydicom():
            fast = rewrite_instance(data, fast_ctx)
    except Unsupported:
        return slow, slow_ctx, False
    if fast.reason:
        assert slow.reason is Reason(fast.reason) and slow.detail == fast.detail
    else:
        assert slow.reason is None, slow.detail
        assert fast.data == slow.data
        assert fast_ctx.audit == slow_ctx.audit
    return slow, slow_ctx, True


def test_no_canary_survives_either_engine(corpus):
    _, files = corpus
    outcomes: Counter[str] = Counter()
    for file in files:
        result, ctx, fast = _both(file.path.read_bytes(), DeidOptions(), file.patient_id)
        outcomes["rewriter" if fast else "pydicom"] += 1
        if file.kind != "image":
            assert result.reason is Reason.ENCAPSULATED_DOCUMENT, file.path.name
            continue
        assert result.reason is None, (file.path.name, result.reason, result.detail)
        assert find_canaries(inflated(result.data)) == [], file.path.name
        assert find_canaries(repr(sorted(ctx.audit.items())).encode()) == []
        out = dcmread(io.BytesIO(result.data))
        assert out.PatientIdentityRemoved == "YES"
        assert 0x00101030 not in out  # the name typed into PatientWeight
        assert all(elem.tag <= 0x7FE00010 for elem in out)  # nothing after Pixel Data
        assert "StudyDescription" in out and out.StudyDescription == "CT THORAX"
    assert outcomes["rewriter"] >= len(files) // 2  # the fast path is the common one
    assert outcomes["pydicom"] >= 5  # big endian files


def test_audit_counts_every_removal_kind(corpus):
    _, files = corpus
    explicit = next(f for f in files if f.kind == "image" and f.syntax == "explicit")
    implicit = next(f for f in files if f.kind == "image" and f.syntax == "implicit")
    _, ctx, _ = _both(explicit.path.read_bytes(), DeidOptions())
    assert ctx.audit[("PatientWeight", "remove-invalid-vr")] == 1  # written as UT
    assert ctx.audit[("Reference", "remove-retired")] == 1
    assert ctx.audit[("CoefficientsSDVN", "remove-after-pixel-data")] == 1
    assert ctx.audit[("(7FE1,xxxx)", "remove-after-pixel-data")] >= 1
    assert ctx.audit[("(0019,xxxx)", "remove")] >= 1  # text under a safe-private tag
    _, ctx, _ = _both(implicit.path.read_bytes(), DeidOptions())
    assert ctx.audit[("PatientWeight", "remove-invalid-value")] == 1  # a name in a DS


def test_series_task_leaves_no_canary_in_store_result_or_logs(
    corpus, tmp_path, monkeypatch, caplog
):
    root, files = corpus
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", SECRET)
    store_url = str(tmp_path / "store")
    outcomes = []
    with caplog.at_level(logging.DEBUG):
        for file in files:
            ds = dcmread(file.path, stop_before_pixels=True)
            job = SeriesJob(
                series_key=str(ds.SeriesInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                study_instance_uid=str(ds.StudyInstanceUID),
                patient_id=file.patient_id,
                modality=str(ds.Modality),
                kind="image",
                paths=(str(file.path.relative_to(root)),),
            )
            outcomes.append(deidentify_series(job, store_url, "site-a", str(root), DeidOptions()))
    store = SiteStore(store_url, "site-a")
    written = store.find("deid")
    assert len(written) == sum(f.kind == "image" for f in files)
    for key in written:
        assert find_canaries(inflated(store.read_bytes(key))) == [], key
        assert find_canaries(key.encode()) == []
    assert find_canaries(repr(outcomes).encode()) == []
    assert find_canaries(caplog.text.encode()) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    reasons = Counter(o.result.reason for o in outcomes)
    assert reasons[str(Reason.ENCAPSULATED_DOCUMENT)] == 10


# -- crafted inputs ----------------------------------------------------------------------------


def _image(bits_stored: int = 12, signed: bool = False) -> Dataset:
    ds = new_dataset(CTImageStorage, "1.2.826.0.1.3680043.8.498.5551")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4.1", "1.2.3.4.2"
    ds.PatientID, ds.Modality = "P-1", "CT"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    return ds


def _bytes(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_overlay_bits_in_unused_high_bits_are_cleared(syntax):
    ds = _image()
    stored = np.arange(16, dtype=np.uint16) * 200
    ds.PixelData = (stored | 0xF000 * (np.arange(16) % 2).astype(np.uint16)).tobytes()
    result, ctx, fast = _both(_bytes(ds, syntax), DeidOptions())
    assert fast and result.reason is None
    out = dcmread(io.BytesIO(result.data))
    assert np.array_equal(np.frombuffer(out.PixelData, "<u2"), stored)
    assert ctx.audit[("PixelData", "clear-unused-bits")] == 1


def test_signed_pixels_keep_their_sign_extension_and_lose_overlay_bits():
    ds = _image(signed=True)
    values = np.array([-5, 100, -2048, 2047] * 4, dtype=np.int16)
    dirty = values.view(np.uint16).copy()
    dirty[1] |= 0x7000  # overlay bits above a positive value
    ds.PixelData = dirty.tobytes()
    result, _, _ = _both(_bytes(ds), DeidOptions())
    assert np.array_equal(np.frombuffer(dcmread(io.BytesIO(result.data)).PixelData, "<i2"), values)


def test_clean_pixels_are_copied_untouched():
    ds = _image()
    ds.PixelData = (np.arange(16, dtype=np.uint16) * 200).tobytes()
    result, ctx, fast = _both(_bytes(ds), DeidOptions())
    assert fast and dcmread(io.BytesIO(result.data)).PixelData == ds.PixelData
    assert ("PixelData", "clear-unused-bits") not in ctx.audit


def test_overlay_declared_in_compressed_pixels_is_quarantined():
    ds = _image(bits_stored=16)
    ds.PixelData = encapsulate([b"\x00" * 32])
    ds.add(DataElement(0x60000010, "US", 4))  # OverlayRows without OverlayData
    ds.add(DataElement(0x60000102, "US", 15))  # OverlayBitPosition
    result, _, _ = _both(_bytes(ds, RLELossless), DeidOptions())
    assert result.reason is Reason.OVERLAY_IN_PIXEL_DATA


def test_a_deflate_bomb_is_quarantined_before_it_fills_memory():
    ds = _image(bits_stored=16)
    ds.PixelData = b"\x00" * 4 * 2**20  # 4 MiB of zeros deflate to a few KiB
    data = _bytes(ds, DeflatedExplicitVRLittleEndian)
    assert len(data) < 64 * 1024
    result, _, fast = _both(data, DeidOptions(max_inflated_mb=1))
    assert fast and result.reason is Reason.INPUT_TOO_LARGE
    assert "1 MiB" in result.detail
    ok, _, _ = _both(data, DeidOptions(max_inflated_mb=8))
    assert ok.reason is None


def test_a_file_over_the_input_bound_is_quarantined(tmp_path, monkeypatch):
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", SECRET)
    ds = _image(bits_stored=16)
    ds.PixelData = b"\x01" * 2 * 2**20
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.dcm").write_bytes(_bytes(ds))
    job = SeriesJob("1.2.3.4.2", "1.2.3.4.2", "1.2.3.4.1", "P-1", "CT", "image", ("a.dcm",))
    options = DeidOptions(max_input_mb=1)
    source = str(tmp_path / "src")
    outcome = deidentify_series(job, str(tmp_path / "store"), "site-a", source, options)
    assert outcome.result.reason == str(Reason.INPUT_TOO_LARGE)


@pytest.mark.parametrize(
    ("tag", "vr", "value"),
    [
        (0x00280100, "UN", b"\x10\x00"),  # BitsAllocated written as UN
        (0x00280010, "US", b"\x04\x00\x00"),  # Rows: three bytes
        (0x00280004, "CS", b"Monochrome Smith"),  # PhotometricInterpretation
    ],
)
def test_a_malformed_required_attribute_quarantines_the_instance(tag, vr, value):
    ds = _image(bits_stored=16)
    ds.PixelData = b"\x00" * 32
    data = bytearray(_bytes(ds))
    head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    if vr == "UN":
        element = head + b"UN\x00\x00" + len(value).to_bytes(4, "little") + value
    else:
        element = head + vr.encode() + len(value).to_bytes(2, "little") + value
    patched = _patch(bytes(data), tag, element)
    result, _, _ = _both(patched, DeidOptions())
    assert result.reason is Reason.INVALID_ATTRIBUTE, result.detail
    assert keyword_for_tag(tag) in result.detail


def _patch(data: bytes, tag: int, element: bytes) -> bytes:
    """Replace the explicit VR element ``tag`` of a file (after the meta group) by ``element``."""
    marker = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    start = data.index(marker, 132 + 12 + int.from_bytes(data[140:144], "little"))
    length = int.from_bytes(data[start + 6 : start + 8], "little")
    return data[:start] + element + data[start + 8 + length :]


def test_a_document_class_the_site_allowed_keeps_its_document_only():
    stl = "1.2.840.10008.5.1.4.1.1.104.3"
    ds = new_dataset(stl, "1.2.826.0.1.3680043.8.498.7771")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4.1", "1.2.3.4.3"
    ds.PatientName, ds.PatientID, ds.Modality = "Müller^Jürgen", "P-1", "M3D"
    ds.DocumentTitle = "Müller Jürgen"
    ds.EncapsulatedDocument = b"solid phantom\nendsolid phantom \n"  # even length
    data = _bytes(ds)
    assert _both(data, DeidOptions())[0].reason is Reason.ENCAPSULATED_DOCUMENT
    result, _, _ = _both(data, DeidOptions(document_classes=(stl,)))
    assert result.reason is None
    out = dcmread(io.BytesIO(result.data))
    assert out.EncapsulatedDocument == ds.EncapsulatedDocument
    assert find_canaries(result.data) == []  # the title with the name is not kept


def test_patients_without_id_never_share_a_pseudonym_or_shift():
    options = DeidOptions()
    a = DeidContext(keys=KEYS, options=options, patient_id="", fallback_key="1.2.3.1")
    b = DeidContext(keys=KEYS, options=options, patient_id=" ", fallback_key="1.2.3.2")
    a_again = DeidContext(keys=KEYS, options=options, patient_id="", fallback_key="1.2.3.1")
    random_1 = DeidContext(keys=KEYS, options=options, patient_id="")
    random_2 = DeidContext(keys=KEYS, options=options, patient_id="")
    assert len({a.patient, b.patient, random_1.patient, random_2.patient}) == 4
    assert a.patient == a_again.patient and a.shift == a_again.shift
    assert a.shift != b.shift or a.patient != b.patient
    named = DeidContext(keys=KEYS, options=options, patient_id="1.2.3.1")
    assert named.patient != a.patient


def test_the_corpus_names_are_the_ones_planted():
    assert len(CANARIES) >= 16


def test_a_patient_name_in_a_kept_text_attribute_is_cleaned_in_any_charset():
    charsets = (("ISO_IR 100", "latin_1"), ("ISO_IR 192", "utf_8"), ("ISO_IR 126", "iso8859_7"))
    for charset, codec in charsets:
        ds = _image(bits_stored=16)
        ds.SpecificCharacterSet = charset
        name = "Παπαδοπούλου" if codec == "iso8859_7" else "Müller"
        ds.PatientName = f"{name}^Test"
        ds.Manufacturer = f"{name} Medical"  # kept verbatim unless it names the patient
        ds.PixelData = b"\x00" * 32
        result, _, _ = _both(_bytes(ds), DeidOptions())
        out = dcmread(io.BytesIO(result.data))
        assert name not in str(out.get("Manufacturer", "")), charset
        assert find_canaries(result.data, dates=False) == [], charset

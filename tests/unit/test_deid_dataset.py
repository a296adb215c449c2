"""De-identifying one dataset (tasks.deid.dataset, tasks.deid.profile, tasks.deid.pixels)."""

from __future__ import annotations

import io
from datetime import datetime

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from tasks.deid.dataset import DeidContext, deidentify_dataset, encode_dataset
from tasks.deid.descriptors import clean_descriptor
from tasks.deid.profile import (
    Action,
    DeidOptions,
    PixelCleaningRule,
    SafePrivateTag,
    resolve,
    table,
)
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.series import deidentify_instance
from tasks.records import Reason
from tasks.synthetic.identifiers import (
    PatientIdentity,
    SiteIdentity,
    TokenFactory,
    apply_identity,
)

SECRET = b"dataset-test-secret-0123456789-abcdefgh"
KEYS = SiteKeys.derive(SECRET, "site-a")


def _identity(seed: int = 3):
    tokens = TokenFactory(np.random.default_rng(seed))
    site = SiteIdentity.generate(tokens)
    patient = PatientIdentity.generate(tokens, "1.2.826.0.1.3680043.8.498.77")
    study = patient.add_study(tokens, datetime(2019, 3, 4, 9, 15, 30, 123456), "CT THORAX")
    return site, patient, study


def _ct(site, patient, study) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "PACS_" + patient.family[:8].upper()
    ds.preamble = b"TIFF" + patient.family.encode() + b"\x00" * (124 - len(patient.family))
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1001"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1002"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1003"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1004"
    ds.Modality = "CT"
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "SOMATOM Definition AS"
    ds.PatientWeight = "71.5"
    apply_identity(ds, site, patient, study, "CT", study.start, f"Thorax {patient.family}")
    src = Dataset()
    src.ReferencedSOPClassUID = CTImageStorage
    src.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.999"
    ds.SourceImageSequence = Sequence([src])
    ds.add_new(0x60003000, "OW", b"\x01\x00" * 8)  # overlay data
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    return ds


def _run(
    ds: Dataset, patient_id: str, options: DeidOptions | None = None
) -> tuple[Dataset, bytes, DeidContext]:
    ctx = DeidContext(keys=KEYS, options=options or DeidOptions(), patient_id=patient_id)
    deidentify_dataset(ds, ctx)
    data = encode_dataset(ds)
    return dcmread(io.BytesIO(data)), data, ctx


def test_no_planted_value_survives_anywhere_in_the_bytes():
    site, patient, study = _identity()
    ds = _ct(site, patient, study)
    _, data, _ = _run(ds, patient.patient_id)
    planted = patient.planted_values() + site.planted_values()
    low = data.lower()
    leaked = [v for v in planted if v.encode().lower() in low]
    assert leaked == []
    assert data[:128] == b"\x00" * 128 and data[128:132] == b"DICM"


def test_identity_and_bookkeeping_attributes():
    site, patient, study = _identity()
    out, _, ctx = _run(_ct(site, patient, study), patient.patient_id)
    pseudonym = KEYS.patient_pseudonym(patient.patient_id)
    assert out.PatientID == pseudonym and str(out.PatientName) == pseudonym
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert KEYS.key_id in out.DeidentificationMethod
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert {"113100", "113103", "113104", "113105", "113107", "113108", "113109", "113111"} == set(
        codes
    )
    assert all(
        item.CodingSchemeDesignator == "DCM" for item in out.DeidentificationMethodCodeSequence
    )
    # patient characteristics and device identity (no serial, no station) retained
    assert out.PatientSex == patient.sex and out.PatientWeight == 71.5
    assert out.PatientAge == patient.age_at(study.start.date())
    assert out.Manufacturer == "SIEMENS" and out.ManufacturerModelName == "SOMATOM Definition AS"
    assert "DeviceSerialNumber" not in out and "StationName" not in out
    assert out.InstitutionName == "site-a"
    for keyword in (
        "OtherPatientIDsSequence",
        "ReferencedPatientSequence",
        "PatientAddress",
        "EthnicGroup",
        "ImageComments",
        "PatientComments",
        "MilitaryRank",
    ):
        assert keyword not in out, keyword
    assert out.AccessionNumber == "" and out.PatientBirthDate == ""
    # private tags (group 0011 with a nested private SQ) and overlays removed; file meta rebuilt
    assert not any(elem.tag.is_private for elem in out.iterall())
    assert not any(0x6000 <= elem.tag.group <= 0x60FF for elem in out)
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    # descriptors cleaned, not dropped
    assert out.SeriesDescription == "Thorax"
    assert ("SeriesDescription", "clean") in ctx.audit


def test_uids_remapped_consistently_everywhere():
    site, patient, study = _identity()
    out, _, _ = _run(_ct(site, patient, study), patient.patient_id)
    assert out.SOPInstanceUID == KEYS.remap_uid("1.2.826.0.1.3680043.8.498.1001")
    assert out.FrameOfReferenceUID == KEYS.remap_uid("1.2.826.0.1.3680043.8.498.1004")
    ref = out.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == KEYS.remap_uid("1.2.826.0.1.3680043.8.498.999")
    assert ref.ReferencedSOPClassUID == CTImageStorage  # class UIDs kept
    for elem in out.iterall():
        if elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, list) else [elem.value]
            for value in values:
                assert UID(value).is_valid
                # remapped, or a well-known (named) class UID
                assert value.startswith("2.25.") or UID(value).name != value


def test_dates_shifted_with_intervals_kept():
    site, patient, study = _identity()
    ds = _ct(site, patient, study)
    ds.SeriesDate, ds.SeriesTime = "20190304", "101530"
    out, _, _ = _run(ds, patient.patient_id)
    shift = KEYS.date_shift(patient.patient_id)
    assert out.StudyDate != study.date and out.StudyTime != study.time
    assert (out.StudyDate, out.StudyTime) == shift.shift_pair(study.date, study.time)
    fmt = "%Y%m%d%H%M%S.%f"
    before = datetime.strptime("20190304101530.0", fmt) - datetime.strptime(
        study.date + study.time, "%Y%m%d%H%M%S.%f"
    )
    after = datetime.strptime(out.SeriesDate + out.SeriesTime + ".0", fmt) - datetime.strptime(
        out.StudyDate + out.StudyTime, "%Y%m%d%H%M%S.%f"
    )
    assert before == after


def test_safe_private_keeps_only_allow_listed_numbers():
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.3.4"
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "IS", "1000")  # b-value: allowed
    block.add_new(0x10, "LO", "Doe^John")  # not allowed
    other = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    other.add_new(0x10, "OB", b"CSA header with a name")
    out, data, ctx = _run(ds, "P1")
    assert out[0x0019100C].value == 1000 and out[0x00190010].value == "SIEMENS MR HEADER"
    assert 0x00191010 not in out and 0x00290010 not in out and 0x00291010 not in out
    assert b"Doe" not in data and b"CSA header" not in data
    assert ctx.audit[("(0019,xxxx)", "keep")] == 1
    # with the option off (no allow-list) every private element goes
    out, _, _ = _run(ds_copy := _private_only(), "P1", DeidOptions(safe_private=()))
    assert not any(e.tag.is_private for e in out)
    del ds_copy


def _private_only() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.3.4"
    ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", "1000")
    return ds


def test_structured_content_cleaned_in_nested_items():
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", "1.2.3.5"
    ds.PatientName, ds.PatientID = "Qzorvath^Elunda", "MRN-11112222"
    text = Dataset()
    text.ValueType = "TEXT"
    text.TextValue = "Lung nodule right upper lobe, seen by Qzorvath on 20190304"
    person = Dataset()
    person.ValueType = "PNAME"
    person.PersonName = "Qzorvath^Elunda"
    when = Dataset()
    when.ValueType = "DATE"
    when.Date = "20190304"
    uid = Dataset()
    uid.ValueType = "UIDREF"
    uid.UID = "1.2.826.0.1.3680043.8.498.55"
    ds.ContentSequence = Sequence([text, person, when, uid])
    out, data, _ = _run(ds, "MRN-11112222")
    items = out.ContentSequence
    assert items[0].TextValue == "Lung nodule right upper lobe, on"
    assert items[1].PersonName == "ANONYMOUS"
    assert items[2].Date == KEYS.date_shift("MRN-11112222").shift_date("20190304")
    assert KEYS.remap_uid("1.2.826.0.1.3680043.8.498.55") == items[3].UID
    assert b"Qzorvath" not in data and b"20190304" not in data


def test_profile_resolution():
    opts = DeidOptions()
    assert len(table()) > 350
    assert resolve(0x00100010, "PN", opts) is Action.PSEUDONYM
    assert resolve(0x00080050, "SH", opts) is Action.EMPTY
    assert resolve(0x00080020, "DA", opts) is Action.SHIFT
    assert resolve(0x00080018, "UI", opts) is Action.REMAP_UID
    assert resolve(0x00080016, "UI", opts) is Action.KEEP
    assert resolve(0x0008103E, "LO", opts) is Action.CLEAN
    assert resolve(0x0008103E, "LO", DeidOptions(clean_descriptors=False)) is Action.REMOVE
    assert resolve(0x00100040, "CS", opts) is Action.KEEP
    assert resolve(0x00100040, "CS", DeidOptions(patient_characteristics=())) is Action.EMPTY
    assert resolve(0x00102160, "SH", opts) is Action.REMOVE  # ethnic group: not retained
    assert resolve(0x00181000, "LO", opts) is Action.REMOVE  # device serial number
    assert resolve(0x00500020, "LO", opts) is Action.KEEP  # device description
    assert resolve(0x00204000, "LT", opts) is Action.REMOVE  # image comments: free text
    assert resolve(0x00081140, "SQ", opts) is Action.RECURSE  # referenced images: remap inside
    assert resolve(0x04000561, "SQ", opts) is Action.REMOVE  # original attributes
    # not in the table: by VR
    assert resolve(0x00080070, "LO", opts) is Action.KEEP  # Manufacturer
    assert resolve(0x00181250, "SH", opts) is Action.KEEP  # ReceiveCoilName: technical
    assert resolve(0x00201040, "LO", opts) is Action.CLEAN  # PositionReferenceIndicator
    assert resolve(0x00280120, "US or SS", opts) is Action.KEEP
    assert resolve(0x00321064, "SQ", opts) is Action.RECURSE
    assert resolve(0x00400244, "DA", opts) is Action.SHIFT


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("CT THORAX QZORVATH 5mm", "CT THORAX 5mm"),
        ("GTV-1", "GTV-1"),
        ("gtv_2", "gtv_2"),
        ("Tumour 2", "Tumour 2"),
        ("T1 AX post (E. Qzorvath)", "T1 AX post"),
        ("PARENCHYMAL PHASE Sep1999", "PHASE"),
        ("MRN-12345678", ""),
        ("B30f 1.5", "B30f 1.5"),
    ],
)
def test_clean_descriptor(text, cleaned):
    assert clean_descriptor(text) == cleaned


def test_clean_descriptor_removes_identifier_words_even_in_vocabulary():
    assert clean_descriptor("Head CT", frozenset({"head"})) == "CT"


def _sc(burned: bool = True) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.9"
    ds.Modality, ds.Manufacturer = "OT", "ACME"
    ds.PatientID = "MRN-1"
    ds.BurnedInAnnotation = "YES" if burned else "NO"
    ds.Rows, ds.Columns = 8, 10
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.full((8, 10), 200, dtype=np.uint8).tobytes()
    return ds


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_burned_in_series_quarantined_without_rule():
    ctx = DeidContext(keys=KEYS, options=DeidOptions(), patient_id="MRN-1")
    result = deidentify_instance(_bytes(_sc()), ctx)
    assert result.dataset is None and result.reason is Reason.BURNED_IN_ANNOTATION
    assert "MRN" not in result.detail


def test_cleaning_rule_blanks_rectangles():
    rule = PixelCleaningRule(
        name="acme-banner", modality="OT", manufacturer="acme", rectangles=((0, 0, 10, 3),)
    )
    ctx = DeidContext(keys=KEYS, options=DeidOptions(pixel_rules=(rule,)), patient_id="MRN-1")
    result = deidentify_instance(_bytes(_sc()), ctx)
    assert result.dataset is not None and result.reason is None
    out = dcmread(io.BytesIO(result.data))
    pixels = out.pixel_array
    assert (pixels[:3] == 0).all() and (pixels[3:] == 200).all()
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert ctx.audit[("PixelData", "clean:acme-banner")] == 1
    # a rule for another manufacturer does not cover it
    other = PixelCleaningRule(name="x", manufacturer="other", rectangles=((0, 0, 1, 1),))
    ctx2 = DeidContext(keys=KEYS, options=DeidOptions(pixel_rules=(other,)), patient_id="MRN-1")
    assert deidentify_instance(_bytes(_sc()), ctx2).reason is Reason.BURNED_IN_ANNOTATION


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"", Reason.UNREADABLE_HEADER), (b"not dicom at all" * 10, Reason.MISSING_UIDS)],
)
def test_bad_input_gets_a_reason_not_an_exception(payload, reason):
    ctx = DeidContext(keys=KEYS, options=DeidOptions(), patient_id="x")
    result = deidentify_instance(payload, ctx)
    assert result.dataset is None and result.reason in (
        reason,
        Reason.UNREADABLE_HEADER,
        Reason.MISSING_UIDS,
    )


def test_same_input_same_bytes():
    site, patient, study = _identity()
    _, a, _ = _run(_ct(site, patient, study), patient.patient_id)
    _, b, _ = _run(_ct(site, patient, study), patient.patient_id)
    assert a == b
    other = SiteKeys.derive(b"a-completely-different-secret-123456789", "site-a")
    ctx = DeidContext(keys=other, options=DeidOptions(), patient_id=patient.patient_id)
    ds = _ct(site, patient, study)
    deidentify_dataset(ds, ctx)
    assert encode_dataset(ds) != a
    assert ds.PatientID != KEYS.patient_pseudonym(patient.patient_id)


def test_safe_private_tag_model_roundtrip():
    tag = SafePrivateTag(creator="X", group=0x0019, element=0x0C)
    assert DeidOptions(safe_private=(tag,)).safe_private == (tag,)

"""The leak gate (tasks.deid.scan_phi and `oncoflow scan-phi`)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from flows.cli import main
from tasks.deid.dataset import DeidContext, deidentify_dataset, encode_dataset
from tasks.deid.profile import DeidOptions
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.scan_phi import IdentifierMatcher, scan_phi
from tasks.store import CATALOG_INSTANCES, SiteStore

KEYS = SiteKeys.derive(b"scan-test-secret-0123456789-abcdefghijk", "site-s")
NAME, PID, BIRTH = "Qzorvath^Elunda", "MRN-48213977", "19650304"
IDENTIFIERS = [NAME, PID, BIRTH, "1.3.6.1.4.1.99999.7"]


def _source() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.3.6.1.4.1.99999.7"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.3.6.1.4.1.99999.8", "1.3.6.1.4.1.99999.9"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PID, BIRTH
    ds.SeriesDescription = "CT THORAX"
    ds.Modality = "CT"
    return ds


def _clean_bytes() -> bytes:
    ds = _source()
    deidentify_dataset(ds, DeidContext(keys=KEYS, options=DeidOptions(), patient_id=PID))
    return encode_dataset(ds)


def _raw(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "deid"
    (root / "dicom").mkdir(parents=True)
    (root / "dicom" / "00001.dcm").write_bytes(_clean_bytes())
    return root


def test_clean_output_has_no_findings(tree):
    assert scan_phi(str(tree), IDENTIFIERS) == []


def test_findings_name_file_and_attribute_never_the_value(tree):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "2.25.1"
    ds.PatientIdentityRemoved = "YES"
    item = Dataset()
    item.CodeMeaning = f"Staging {NAME.split('^')[0]}"
    item.CodingSchemeDesignator = "99LOCAL"
    ds.ProcedureCodeSequence = Sequence([item])
    ds.private_block(0x0011, "HIS", create=True).add_new(0x01, "LO", "something")
    ds.ImageComments = "born 04.03.1965"
    (tree / "dicom" / "00002.dcm").write_bytes(_raw(ds))
    findings = scan_phi(str(tree), IDENTIFIERS)
    got = {(f.file, f.attribute, f.kind) for f in findings}
    assert ("dicom/00002.dcm", "ProcedureCodeSequence[0].CodeMeaning", "identifier") in got
    assert ("dicom/00002.dcm", "(0011,xxxx)", "private-tag") in got
    assert ("dicom/00002.dcm", "ImageComments", "profile-attribute") in got
    assert all(f.file == "dicom/00002.dcm" for f in findings)
    text = "\n".join(f.line() for f in findings)
    assert "Qzorvath" not in text and "1965" not in text


def test_raw_bytes_and_preamble_are_scanned(tree):
    data = bytearray(_clean_bytes())
    data[0:12] = b"MRN-48213977"
    (tree / "dicom" / "00003.dcm").write_bytes(bytes(data))
    got = {(f.attribute, f.kind) for f in scan_phi(str(tree / "dicom" / "00003.dcm"), IDENTIFIERS)}
    assert ("preamble", "preamble") in got and ("raw-bytes", "identifier") in got


def test_patterns_without_identifiers(tree):
    ds = _source()
    ds.PatientIdentityRemoved = "YES"
    ds.PatientName = ds.PatientID = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    ds.PatientBirthDate = ""
    ds.StudyDescription = "Follow-up Dr Qzorvath 2019-03-04"
    (tree / "dicom" / "00004.dcm").write_bytes(_raw(ds))
    kinds = {(f.attribute, f.kind) for f in scan_phi(str(tree / "dicom" / "00004.dcm"))}
    assert ("StudyDescription", "date-in-text") in kinds
    assert ("SOPInstanceUID", "uid-not-remapped") in kinds


def test_tables_are_scanned(tmp_path):
    pq.write_table(
        pa.table({"series": ["2.25.1"], "note": [f"patient {PID}"], "n": [3]}),
        tmp_path / "series.parquet",
    )
    (tmp_path / "manifest.json").write_text(json.dumps({"a": {"b": [1, NAME.replace("^", " ")]}}))
    (tmp_path / "rows.csv").write_text("series,patient_id\n2.25.1,X\n")
    got = {(f.file, f.attribute, f.kind) for f in scan_phi(str(tmp_path), IDENTIFIERS)}
    assert ("series.parquet", "note", "identifier") in got
    assert ("manifest.json", "a.b[1]", "identifier") in got
    assert ("rows.csv", "patient_id", "private-column") in got
    assert not any(f[1] == "series" for f in got)


def test_matcher_whole_words_only():
    m = IdentifierMatcher(["Doe^John", "MRN-1234567", "1.2.3.4.5", "ab"])
    assert m.found("seen by John Doe") and m.found("doe^john") and m.found("id MRN-1234567.")
    assert m.found("uid 1.2.3.4.5 ref")
    assert not m.found("Doedoe Johnny 1.2.3.4.56 MRN-12345678 abc")


def test_cli_exit_codes_and_store_relative_names(tmp_path, capsys):
    store = SiteStore(str(tmp_path / "store"), "site-s")
    store.write_table(
        CATALOG_INSTANCES,
        pa.table(
            {
                "path": ["a"],
                "patient_id": [PID],
                "patient_name": [NAME],
                "patient_birth_date": [BIRTH],
            }
        ),
    )
    store.write_bytes("deid/dicom/p/s/x/00001.dcm", _clean_bytes())
    with pytest.raises(SystemExit) as exit_ok:
        main(
            ["scan-phi", store.path("deid"), "--store", str(tmp_path / "store"), "--site", "site-s"]
        )
    assert exit_ok.value.code == 0
    leaky = _source()
    store.write_bytes("deid/dicom/p/s/x/00002.dcm", _raw(leaky))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_bad:
        main(
            ["scan-phi", store.path("deid"), "--store", str(tmp_path / "store"), "--site", "site-s"]
        )
    assert exit_bad.value.code != 0
    out = capsys.readouterr()
    assert "deid/dicom/p/s/x/00002.dcm: PatientName: identifier" in out.out
    assert "Qzorvath" not in out.out + out.err and "48213977" not in out.out + out.err
    assert len(out.err.strip().splitlines()) == 1

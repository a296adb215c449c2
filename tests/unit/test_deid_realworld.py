"""Real-world inputs: every file of pydicom's test data, pydicom-data and deid-data.

Each file is de-identified cleanly (and passes the leak gate) or gets a quarantine reason;
nothing raises. Many transfer syntaxes, vendors, malformed files, ultrasound with burned-in text.
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
from pydicom import dcmread

from tasks.deid.dataset import DeidContext
from tasks.deid.profile import DeidOptions
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.scan_phi import IdentifierMatcher, scan_dicom
from tasks.deid.series import deidentify_instance
from tasks.records import Reason

KEYS = SiteKeys.derive(b"real-world-secret-0123456789-abcdefghij", "site-r")
BLOCKING = {
    "identifier",
    "private-tag",
    "uid-not-remapped",
    "person-name",
    "profile-attribute",
    "identity-not-removed",
    "preamble",
    "overlay",
    "unreadable",
}
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "AccessionNumber",
    "PatientBirthDate",
    "ReferringPhysicianName",
    "InstitutionName",
    "StationName",
    "OperatorsName",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)


def _corpus() -> list[Path]:
    """pydicom's bundled test files, the pydicom-data store and deid-data (no network)."""
    files = set((Path(pydicom.data.__file__).parent / "test_files").rglob("*"))
    files |= set((Path(data_store.__file__).parent / "data").rglob("*"))
    files |= set(Path(deid_data.__file__).parent.rglob("*.dcm"))
    return sorted(p for p in files if p.is_file())


CORPUS = _corpus()


def _identifiers(data: bytes) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
            return [str(ds.get(k, "") or "") for k in IDENTIFYING]
    except Exception:
        return []


def test_corpus_is_large_and_varied():
    assert len(CORPUS) > 150
    names = {p.name for p in CORPUS}
    assert {"CT_small.dcm", "MR_truncated.dcm", "no_meta.dcm", "ctbrain1.dcm"} <= names


def test_every_file_is_deidentified_or_quarantined_with_a_reason():
    outcomes: Counter[str] = Counter()
    problems = []
    for path in CORPUS:
        data = path.read_bytes()
        identifiers = _identifiers(data)
        patient_id = identifiers[1] if identifiers else ""
        ctx = DeidContext(keys=KEYS, options=DeidOptions(), patient_id=patient_id)
        result = deidentify_instance(data, ctx)  # must not raise
        if result.dataset is None:
            assert isinstance(result.reason, Reason), path.name
            outcomes[str(result.reason)] += 1
            continue
        outcomes["ok"] += 1
        findings = [
            (attr, kind)
            for attr, kind in scan_dicom(result.data, IdentifierMatcher(identifiers))
            if kind in BLOCKING
        ]
        if findings:
            problems.append((path.name, findings[:3]))
    assert problems == []
    # the corpus exercises every path: clean output, burned-in text, broken and non-DICOM files
    assert outcomes["ok"] >= 50
    assert outcomes[str(Reason.BURNED_IN_ANNOTATION)] >= 50
    assert outcomes[str(Reason.MISSING_UIDS)] + outcomes[str(Reason.UNREADABLE_HEADER)] >= 5


@pytest.mark.parametrize(
    "name", ["GREYSCALE_IMAGE.dcm", "RGB_IMAGE.dcm", "ultrasound-multiframe.dcm"]
)
def test_deid_data_ultrasound_is_quarantined_as_burned_in(name):
    path = next(p for p in CORPUS if p.name == name)
    ctx = DeidContext(keys=KEYS, options=DeidOptions(), patient_id="x")
    result = deidentify_instance(path.read_bytes(), ctx)
    assert result.reason is Reason.BURNED_IN_ANNOTATION


def test_transfer_syntaxes_survive_round_trip():
    syntaxes: set[str] = set()
    for path in CORPUS:
        if not path.name.startswith(
            ("MR_small", "CT_small", "JPEG", "RG", "emri", "693", "MR2_", "rtdose")
        ):
            continue
        ctx = DeidContext(keys=KEYS, options=DeidOptions(), patient_id="x")
        result = deidentify_instance(path.read_bytes(), ctx)
        if result.dataset is None:
            continue
        out = dcmread(io.BytesIO(result.data))
        syntaxes.add(str(out.file_meta.TransferSyntaxUID))
        source = dcmread(path, force=True)
        assert out.PixelData == source.PixelData  # pixels untouched, whatever the encoding
    assert len(syntaxes) >= 6

"""The leak gate flags each canary of the multilingual corpus put back into a de-identified file.

Every image file of the corpus (tests/canaries.py: 17 languages plus CJK and Arabic, four
transfer syntaxes, five character sets) is de-identified by the engine, then each canary is
put back at one place (a descriptor, a private tag, a text VR in a numeric attribute, a nested
PN, retired attributes, file meta, after the pixel data), encoded in the file's declared
character set. The gate, knowing the patient as the private catalogue does, must flag that
place in every case; the findings never carry the value.
"""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tasks.deid.dataset import DeidContext, deidentify_dataset, encode_dataset, quiet_pydicom
from tasks.deid.profile import DeidOptions
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.scan_phi import IdentifierMatcher, scan_bytes
from tests.canaries import CANARIES, CHARSETS, DATES, CanaryFile, inflated, write_corpus

KEYS = SiteKeys.derive(b"corpus-gate-secret-0123456789-abcdefghijklmnop", "site-c")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[CanaryFile, bytes]]:
    """One de-identified image per canary (its first character set)."""
    out, seen = [], set()
    for file in write_corpus(tmp_path_factory.mktemp("corpus")):
        canary = file.canaries[0]
        if file.kind != "image" or canary in seen:
            continue
        seen.add(canary)
        with quiet_pydicom():
            ds = dcmread(io.BytesIO(file.path.read_bytes()), force=True)
            ds.decode()
            ctx = DeidContext(keys=KEYS, options=DeidOptions(), patient_id=file.patient_id)
            out.append((file, encode_dataset(deidentify_dataset(ds, ctx))))
    assert len(out) == len(CANARIES)
    return out


def _put_back(data: bytes, place: str, text: str, codec: str) -> bytes:
    if place == "after-pixel-data":
        return data + b"\x00\x00" + text.encode(codec)
    with quiet_pydicom():
        ds = dcmread(io.BytesIO(data), force=True)
        if place == "descriptor":
            ds.SeriesDescription = f"CT THORAX {text}"
        elif place == "private":
            ds.private_block(0x0011, "HIS", create=True).add_new(0x01, "UN", text.encode(codec))
        elif place == "text-in-numeric":
            ds.add_new(0x00101030, "UT", text)
        elif place == "nested-PN":
            item = Dataset()
            item.PatientName = text
            ds.ReferencedPatientSequence = Sequence([item])
        elif place == "retired":
            ds.add_new(0x00201020, "LO", text)
        elif place == "retired-OW":
            raw = text.encode(codec)
            ds.add_new(0x7FE00020, "OW", raw + b"\x00" * (len(raw) % 2))
        elif place == "file-meta":
            raw = text.encode(codec)
            ds.file_meta.add_new(0x00020100, "UI", "2.25.1")
            ds.file_meta.add_new(0x00020102, "OB", raw + b"\x00" * (len(raw) % 2))
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()


PLACES = {
    "descriptor": "SeriesDescription",
    "private": "(0011,xxxx)",
    "text-in-numeric": "PatientWeight",
    "nested-PN": "ReferencedPatientSequence[0].PatientName",
    "retired": "Reference",
    "retired-OW": "after-pixel-data",  # (7FE0,0020) comes after the pixel data
    "file-meta": "file_meta.PrivateInformation",
    "after-pixel-data": "after-pixel-data",
}


@pytest.mark.parametrize("place", sorted(PLACES))
def test_each_canary_put_back_is_flagged(images, place) -> None:
    missed = []
    for file, clean in images:
        matcher = IdentifierMatcher(file.identifiers)
        before = set(scan_bytes("a.dcm", clean, matcher))
        canary = file.canaries[0]
        codec = CHARSETS[file.charset]
        written = f"{canary.given} {canary.family}"
        after = set(scan_bytes("a.dcm", inflated(_put_back(clean, place, written, codec)), matcher))
        new = after - before
        if (PLACES[place], "identifier") not in new:
            missed.append((canary.language, file.syntax, file.charset, sorted(new)))
        assert written not in "\n".join(f"{a}: {k}" for a, k in after)
    assert missed == []


def test_each_date_form_put_back_is_flagged(images) -> None:
    file, clean = images[0]
    matcher = IdentifierMatcher([*file.identifiers, "20230517", "20210505"])
    for form in DATES:
        data = _put_back(clean, "private", f"scan {form}", "utf-8")
        assert ("(0011,xxxx)", "catalogue-date") in set(scan_bytes("a.dcm", data, matcher)), form


def test_names_in_descriptors_are_flagged_without_a_catalogue(images) -> None:
    """Without --store: a name in a descriptor is a word the vocabulary does not know."""
    missed = []
    for file, clean in images:
        canary = file.canaries[0]
        data = _put_back(clean, "descriptor", canary.family, CHARSETS[file.charset])
        found = set(scan_bytes("a.dcm", data, IdentifierMatcher()))
        if ("SeriesDescription", "non-vocabulary-word") not in found:
            missed.append(canary.language)
    assert missed == []

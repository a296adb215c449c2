"""The leak gate in every European script and in every corner of a DICOM file.

Each canary (a name, an ID or a date of the private catalogue, in the forms people write them)
is put back into a de-identified file at one place; the gate must flag that file, name the
place, and never print the value. The same de-identified file without the canary must pass.
"""

from __future__ import annotations

import io
import struct
import zlib

import pyarrow as pa
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

import tasks.deid.gate_dicom as gate_dicom_module
from tasks.deid.dataset import DeidContext, deidentify_dataset
from tasks.deid.gate_dates import DateMention, find_dates
from tasks.deid.gate_text import variants, words
from tasks.deid.profile import DeidOptions
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.scan_phi import IdentifierMatcher, scan_bytes, scan_phi, store_matcher
from tasks.deid.secret import SECRET_ENV
from tasks.store import CATALOG_INSTANCES, SiteStore

SECRET = "leak-gate-test-secret-0123456789-abcdefghijklmnop"
SITE = "site-g"
KEYS = SiteKeys.derive(SECRET.encode(), SITE)

#: (language, DICOM PN of the catalogue, how the name may come back in a file)
NAMES = [
    ("German", "Müller^Jürgen", "Herr MUELLER Juergen"),
    ("French", "Lefèvre^Hélène", "Helene LEFEVRE"),
    ("Polish", "Wójcik^Łukasz", "wojcik lukasz"),
    ("Czech", "Dvořáková^Jiřina", "DVORAKOVA"),
    ("Hungarian", "Szőke^Erzsébet", "Szoke Erzsebet"),
    ("Romanian", "Ţăranu^Ştefan", "TARANU STEFAN"),
    ("Greek", "Παπαδόπουλος^Γεώργιος", "PAPADOPOULOS G"),
    ("Greek upper", "Καραμανλής^Ευάγγελος", "ΚΑΡΑΜΑΝΛΗΣ"),
    ("Bulgarian", "Иванова^Йорданка", "IVANOVA Y"),
    ("Croatian", "Đurđević^Željka", "Djurdjevic"),
    ("Lithuanian", "Žemaitytė^Gintarė", "ZEMAITYTE"),
    ("Latvian", "Bērziņš^Jānis", "BERZINS J"),
    ("Swedish", "Åström^Björn", "Astrom Bjorn"),
    ("Portuguese", "Gonçalves^João", "GONCALVES JOAO"),
    ("Irish", "Ó Súilleabháin^Séamus", "Seamus O Suilleabhain"),
    ("Chinese", "王^小明", "患者王小明复查"),
    ("Arabic", "الحسيني^مُحَمَّد", "محمد الحسيني"),
]
PID, ACCESSION = "KL-20480917", "ACC7730019"
BIRTH, STUDY_DATE = "19650304", "20230517"
STUDY_UID = "1.2.826.0.1.3680043.10.77.1"
#: The study date as written in free text across Europe.
DATE_FORMS = [
    "17.05.2023", "17/05/2023", "2023-05-17", "2023.05.17.", "17 May 2023", "17. Mai 2023",
    "17 maja 2023", "17 Μαΐου 2023", "17 май 2023 г.", "17 de mayo de 2023", "2023. május 17.",
    "17 Bealtaine 2023", "2023 m. gegužės 17 d.", "17 mai 2023", "20230517",
]  # fmt: skip


def _source(name: str = NAMES[0][1]) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.826.0.1.3680043.10.77.3"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, "1.2.826.0.1.3680043.10.77.2"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, PID, BIRTH
    ds.StudyDate = ds.SeriesDate = STUDY_DATE
    ds.AccessionNumber = ACCESSION
    ds.SeriesDescription = "CT THORAX"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.add_new(0x7FE00010, "OW", b"\x01\x00\x02\x00\x03\x00\x04\x00")
    return ds


def _deidentified(name: str = NAMES[0][1]) -> Dataset:
    ds = _source(name)
    deidentify_dataset(ds, DeidContext(keys=KEYS, options=DeidOptions(), patient_id=PID))
    return ds


def _save(ds: Dataset, syntax=ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _catalogue(tmp_path) -> SiteStore:
    store = SiteStore(str(tmp_path / "store"), SITE)
    rows = [
        {
            "patient_id": PID,
            "patient_name": name,
            "patient_birth_date": BIRTH,
            "accession_number": ACCESSION,
            "study_instance_uid": STUDY_UID,
            "study_date": STUDY_DATE,
            "series_date": STUDY_DATE,
        }
        for _, name, _ in NAMES
    ]
    rows.append(
        {
            **rows[0],
            "patient_id": "OTHER-1",
            "patient_birth_date": "19710812",
            "study_instance_uid": "1.2.826.0.1.3680043.10.78.1",
            "study_date": "20240229",
            "series_date": "20240229",
        }
    )
    store.write_table(CATALOG_INSTANCES, pa.Table.from_pylist(rows))
    return store


@pytest.fixture()
def matcher(tmp_path, monkeypatch) -> IdentifierMatcher:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return store_matcher(_catalogue(tmp_path))


def kinds(data: bytes, m: IdentifierMatcher, name: str = "x.dcm") -> set[tuple[str, str]]:
    return set(scan_bytes(name, data, m))


# --- text -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("language", "name", "written"), NAMES)
def test_each_name_matches_in_the_forms_it_is_written(language, name, written):
    m = IdentifierMatcher([name])
    assert m.found(written), language
    assert not m.found("CT THORAX ABDOMEN 5mm"), language


def test_variants_fold_strip_and_transliterate():
    assert "papadopoulos" in variants(words("Παπαδόπουλος")[0])
    assert "ivanova" in variants(words("ИВАНОВА")[0])
    assert "mueller" in variants(words("Müller")[0]) and "muller" in variants(words("MÜLLER")[0])
    assert words("Μαΐου") == ["μαΐου"]  # folding may decompose: one word, not two


def test_whole_words_and_particles():
    m = IdentifierMatcher(["Ó Súilleabháin^Séamus", "van der Berg^Jan"])
    assert not m.found("O") and not m.found("van der") and not m.found("Jana Bergman")
    assert m.found("Berg") and m.found("SEAMUS")


@pytest.mark.parametrize("text", DATE_FORMS)
def test_each_european_date_form_is_read(text):
    assert DateMention(2023, 5, 17) in find_dates(text)


def test_numbers_that_are_not_dates():
    for text in ("CT 2.5mm", "slice 1.25", "B30f 3.0", "2.25.1234567", "kV 120 mAs 250"):
        assert not any(d.full for d in find_dates(text)), text


# --- DICOM: every place a canary can hide -------------------------------------------------------


def test_clean_deidentified_files_pass(matcher):
    for _, name, _ in NAMES:
        ds = _deidentified(name)
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian):
            assert kinds(_save(ds, syntax), matcher) == set(), (name, syntax)


def _plant_private(ds: Dataset, text: str, vr: str = "LO") -> None:
    block = ds.private_block(0x0011, "HOSPITAL", create=True)
    block.add_new(0x01, vr, text.encode("utf-8") if vr in ("OB", "UN") else text)


PLACES = {
    "private LO": lambda ds, v: _plant_private(ds, v),
    "private UN utf-8": lambda ds, v: _plant_private(ds, v, "UN"),
    "OB in cp1251/iso8859-7/utf-16": lambda ds, v: ds.add_new(
        0x00420011,
        "OB",
        v.encode("utf-16-le")
        + b"\x00"
        + v.encode("cp1251", "ignore")
        + v.encode("iso8859-7", "ignore"),
    ),
    "nested PN": lambda ds, v: (
        setattr(ds, "ReferencedPatientSequence", Sequence([Dataset()]))
        or setattr(ds.ReferencedPatientSequence[0], "PatientName", v)
    ),
    "name as UT in PatientWeight": lambda ds, v: ds.add_new(0x00101030, "UT", v),
    "retired (7FE0,0020) OW": lambda ds, v: ds.add_new(
        0x7FE00020, "OW", (v + " ").encode("utf-8")[: len((v + " ").encode()) // 2 * 2]
    ),
    "ImageComments": lambda ds, v: setattr(ds, "ImageComments", v),
    "ProtocolName": lambda ds, v: setattr(ds, "ProtocolName", v),
}


@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize(("language", "name", "written"), [NAMES[i] for i in (0, 6, 8, 2, 14)])
def test_a_canary_put_back_anywhere_is_flagged(matcher, place, language, name, written):
    ds = _deidentified(name)
    PLACES[place](ds, written)
    found = kinds(_save(ds), matcher)
    assert any(k == "identifier" for _, k in found), (place, language, found)
    lines = "\n".join(f"{a}: {k}" for a, k in found)
    assert written not in lines


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_other_transfer_syntaxes(matcher, syntax):
    ds = _deidentified(NAMES[7][1])
    _plant_private(ds, NAMES[7][2])
    assert ("(0011,xxxx)", "identifier") in kinds(_save(ds, syntax), matcher)


def test_deflated_file_and_inflation_cap(matcher, monkeypatch):
    ds = _deidentified()
    ds.ImageComments = "IVANOVA"
    data = _save(ds, DeflatedExplicitVRLittleEndian)
    assert ("ImageComments", "identifier") in kinds(data, matcher)
    monkeypatch.setattr(gate_dicom_module, "MAX_INFLATED_BYTES", 64)
    assert kinds(data, matcher) == {("file", "too-large")}


def test_bytes_after_pixel_data_and_file_meta(matcher):
    clean = _save(_deidentified())
    found = kinds(clean + b"\x00" * 2 + "Παπαδόπουλος".encode("iso8859-7"), matcher)
    assert ("after-pixel-data", "identifier") in found
    assert ("after-pixel-data", "after-pixel-data") in found
    ds = _deidentified()
    ds.file_meta.SourceApplicationEntityTitle = "WOJCIK"
    assert ("file_meta.SourceApplicationEntityTitle", "identifier") in kinds(_save(ds), matcher)


def test_encapsulated_pdf_stream_is_inflated(matcher):
    ds = _deidentified()
    text = b"BT /F1 12 Tf (Patient: Dvo\xc5\x99\xc3\xa1kov\xc3\xa1 Ji\xc5\x99ina) Tj ET"
    pdf = b"%PDF-1.4\n1 0 obj<<>>stream\n" + zlib.compress(text) + b"\nendstream\n%%EOF"
    ds.add_new(0x00420011, "OB", pdf + b"\x00" * (len(pdf) % 2))
    found = kinds(_save(ds), matcher)
    assert ("EncapsulatedDocument", "identifier") in found
    assert ("EncapsulatedDocument", "encapsulated-document") in found


@pytest.mark.parametrize("form", DATE_FORMS)
def test_a_catalogue_date_in_any_form_is_flagged(matcher, form):
    ds = _deidentified()
    _plant_private(ds, f"scan {form}", "UN")
    assert ("(0011,xxxx)", "catalogue-date") in kinds(_save(ds), matcher)


def test_date_attributes_compared_with_the_files_own_patient(matcher):
    ds = _deidentified()
    shifted = ds.StudyDate
    assert shifted != STUDY_DATE
    ds.AcquisitionDate = STUDY_DATE  # the real date back in a date attribute
    assert ("AcquisitionDate", "catalogue-date") in kinds(_save(ds), matcher)
    ds.AcquisitionDate = "20240229"  # another patient's date: a shifted date may equal it
    assert kinds(_save(ds), matcher) == set()
    ds.SeriesDescription = "CT THORAX 17.05"  # day and month of the real date
    assert ("SeriesDescription", "catalogue-date") in kinds(_save(ds), matcher)


def test_numbers_are_read_for_full_dates_only(matcher):
    ds = _deidentified()
    day_month = f"{int(STUDY_DATE[6:]):d}.{int(STUDY_DATE[4:6]):d}"  # the real day and month
    ds.PatientWeight = day_month  # a decimal number, as a feature value in an SR is
    assert kinds(_save(ds), matcher) == set()
    ds.PatientWeight = STUDY_DATE  # the real date written as a number
    assert ("PatientWeight", "catalogue-date") in kinds(_save(ds), matcher)


def test_an_id_glued_to_text_and_the_accession_number(matcher):
    ds = _deidentified()
    _plant_private(ds, "pat20480917")
    assert ("(0011,xxxx)", "identifier") in kinds(_save(ds), matcher)


# --- without a catalogue: patterns ----------------------------------------------------------


@pytest.mark.parametrize(
    "description",
    ["CT ΠΑΠΑΔΟΠΟΥΛΟΣ", "МРТ ИВАНОВА", "CT THORAX Müller", "Dr. Wójcik CT", "CT 17 maja 2023"],
)
def test_descriptor_words_outside_the_vocabulary_are_flagged_without_a_store(description):
    ds = _deidentified()
    ds.StudyDescription = description
    found = {k for a, k in kinds(_save(ds), IdentifierMatcher()) if a == "StudyDescription"}
    assert found & {"non-vocabulary-word", "honorific-name", "date-in-text"}, description


def test_vocabulary_descriptors_pass_without_a_store():
    ds = _deidentified()
    ds.SeriesDescription = "CT THORAX 5mm B30f"
    assert kinds(_save(ds), IdentifierMatcher()) == set()


def test_findings_never_carry_values(tmp_path, matcher):
    ds = _deidentified()
    _plant_private(ds, "Παπαδόπουλος 17.05.2023")
    (tmp_path / "a.dcm").write_bytes(_save(ds))
    findings = scan_phi(str(tmp_path / "a.dcm"), matcher)
    text = "\n".join(f.line() for f in findings)
    assert findings and "Παπα" not in text and "2023" not in text


def test_nifti_header_is_scanned_not_the_image(matcher):
    header = bytearray(352)
    header[0:4] = struct.pack("<i", 348)
    header[108:112] = struct.pack("<f", 352.0)
    header[148:168] = b"Ivanova".ljust(20, b"\x00")  # descrip
    image = bytes(range(256)) * 64
    assert kinds(bytes(header) + image, matcher, "a.nii") == {("header", "identifier")}
    header[148:168] = b"\x00" * 20
    assert kinds(bytes(header) + image, matcher, "a.nii") == set()

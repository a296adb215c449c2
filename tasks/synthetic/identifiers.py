"""Planted identifiers: distinctive fake PHI in every PS3.15 Annex E attribute that applies.

Every value is a generated token (names like ``Qzorvath^Elunda``, IDs like ``MRN-48213977``)
that is unique in the cohort and not a substring of another, so a raw-byte scan of the output
for a value is a meaningful leak test. Dates are realistic (YYYYMMDD) and times carry
microseconds (``HHMMSS.ffffff``) so that they are distinctive too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "ACME HIS EXPORT 2.1"
NESTED_PRIVATE_GROUP = 0x0013
NESTED_PRIVATE_CREATOR = "ACME HIS CASEFILE"

_ONSETS = ("qz", "v", "kr", "th", "zh", "x", "dr", "ph", "gw", "br", "sk", "y", "m", "l", "n")
_VOWELS = ("o", "a", "e", "u", "i", "ae", "ou", "y")
_CODAS = ("rv", "th", "nd", "x", "l", "rr", "sk", "m", "z", "")


def dicom_date(d: date) -> str:
    """Format a date as DICOM DA."""
    return d.strftime("%Y%m%d")


def dicom_time(t: datetime) -> str:
    """Format a time as DICOM TM with microseconds."""
    return t.strftime("%H%M%S.%f")


class TokenFactory:
    """Generate distinctive tokens, unique across a cohort and never substrings of each other."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self._words: set[str] = set()
        self._word_parts: set[str] = set()  # every substring of 7+ letters of accepted words
        self._numbers: set[str] = set()

    def _accept_word(self, token: str) -> bool:
        low = token.lower()
        parts = {low[i:j] for i in range(len(low)) for j in range(i + 7, len(low) + 1)}
        if low in self._word_parts or parts & self._words:
            return False
        self._words.add(low)
        self._word_parts |= parts
        return True

    def word(self) -> str:
        """Return a pronounceable capitalised word of 7 to 11 letters."""
        while True:
            parts = [
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                for _ in range(3)
            ]
            token = "".join(parts)[:11].capitalize()
            if len(token) >= 7 and self._accept_word(token):
                return token

    def number(self, prefix: str, digits: int = 8) -> str:
        """Return ``prefix`` followed by ``digits`` random digits (first digit non-zero).

        Prefixes differ in letters and digit counts are fixed per prefix, so exact uniqueness
        is enough to keep number tokens from being substrings of one another.
        """
        while True:
            n = int(self.rng.integers(10 ** (digits - 1), 10**digits))
            token = f"{prefix}{n}"
            if token not in self._numbers:
                self._numbers.add(token)
                return token

    def house_number(self) -> int:
        """Return a house number (not distinctive on its own, never registered)."""
        return int(self.rng.integers(1, 400))

    def person(self) -> str:
        """Return a PN value ``Family^Given``."""
        return f"{self.word()}^{self.word()}"


@dataclass
class SiteIdentity:
    """Identifying values shared by all patients of one site."""

    institution: str
    institution_address: str
    department: str
    station_names: dict[str, str]
    device_serials: dict[str, str]
    issuer: str

    @classmethod
    def generate(cls, tokens: TokenFactory) -> SiteIdentity:
        """Draw the values."""
        modalities = ("CT", "MR", "PT", "OT")
        return cls(
            institution=f"{tokens.word()} University Hospital",
            institution_address=f"{tokens.house_number()} {tokens.word()} Road, {tokens.word()}",
            department=f"{tokens.word()} Imaging",
            station_names={m: f"ST{tokens.word()}"[:16] for m in modalities},
            device_serials={m: tokens.number("SN-", 9) for m in modalities},
            issuer=f"{tokens.word()} HIS",
        )

    def common_values(self) -> list[str]:
        """Values written into every file (station names and serials depend on the modality)."""
        return [self.institution, self.institution_address, self.department, self.issuer]

    def planted_values(self) -> list[str]:
        """All values written into the site's files."""
        return [*self.common_values(), *self.station_names.values(), *self.device_serials.values()]


@dataclass
class StudyIdentity:
    """Identifying values of one study."""

    start: datetime
    accession: str
    study_id: str
    requested_procedure_id: str
    scheduled_step_id: str
    performed_step_id: str
    admission_id: str
    description: str
    reading_physician: str
    requesting_physician: str
    performing_physician: str
    operator: str
    placer_order: str
    filler_order: str

    @property
    def date(self) -> str:
        """StudyDate."""
        return dicom_date(self.start)

    @property
    def time(self) -> str:
        """StudyTime."""
        return dicom_time(self.start)

    def planted_values(self) -> list[str]:
        """All values written into files (study date and time included)."""
        return [
            self.date,
            self.time,
            self.accession,
            self.study_id,
            self.requested_procedure_id,
            self.scheduled_step_id,
            self.performed_step_id,
            self.admission_id,
            self.description,
            self.reading_physician,
            self.requesting_physician,
            self.performing_physician,
            self.operator,
            self.placer_order,
            self.filler_order,
        ]


@dataclass
class PatientIdentity:
    """Identifying values of one patient."""

    family: str
    given: str
    patient_id: str
    other_id: str
    universal_entity_id: str
    other_name: str
    birth_name: str
    mother_birth_name: str
    birth_date: date
    sex: str
    address: str
    telephone: str
    military_rank: str
    ethnic_group: str
    occupation: str
    record_locator: str
    country: str
    region: str
    religion: str
    responsible_person: str
    location: str
    referring_physician: str
    referring_address: str
    referring_telephone: str
    physician_of_record: str
    referenced_patient_uid: str
    studies: list[StudyIdentity] = field(default_factory=list)

    @classmethod
    def generate(cls, tokens: TokenFactory, referenced_patient_uid: str) -> PatientIdentity:
        """Draw the patient-level values (studies are added by the caller)."""
        rng = tokens.rng
        birth = date(1940, 1, 1) + timedelta(days=int(rng.integers(0, 35 * 365)))
        return cls(
            family=tokens.word(),
            given=tokens.word(),
            patient_id=tokens.number("MRN-"),
            other_id=tokens.number("INS-"),
            universal_entity_id=tokens.number("UEI-"),
            other_name=tokens.person(),
            birth_name=tokens.person(),
            mother_birth_name=tokens.person(),
            birth_date=birth,
            sex=str(rng.choice(["F", "M"])),
            address=f"{tokens.house_number()} {tokens.word()} Lane, {tokens.word()}",
            telephone=tokens.number("+31 6 "),
            military_rank=f"Major {tokens.word()}",
            ethnic_group=tokens.word(),
            occupation=tokens.word(),
            record_locator=tokens.number("MRL-"),
            country=f"Republic of {tokens.word()}",
            region=f"{tokens.word()} Province",
            religion=tokens.word(),
            responsible_person=tokens.person(),
            location=f"Ward {tokens.word()} bed {tokens.house_number()}",
            referring_physician=tokens.person(),
            referring_address=f"{tokens.house_number()} {tokens.word()} Street",
            referring_telephone=tokens.number("+31 20 "),
            physician_of_record=tokens.person(),
            referenced_patient_uid=referenced_patient_uid,
        )

    def add_study(self, tokens: TokenFactory, start: datetime, modality_text: str) -> StudyIdentity:
        """Draw and append a study starting at ``start``."""
        study = StudyIdentity(
            start=start,
            accession=tokens.number("A", 10),
            study_id=tokens.number("EX", 7),
            requested_procedure_id=tokens.number("RP-", 7),
            scheduled_step_id=tokens.number("SPS-", 7),
            performed_step_id=tokens.number("PPS-", 7),
            admission_id=tokens.number("ADM-", 7),
            description=f"{modality_text} {self.family.upper()}",
            reading_physician=tokens.person(),
            requesting_physician=tokens.person(),
            performing_physician=tokens.person(),
            operator=tokens.person(),
            placer_order=tokens.number("PO-", 9),
            filler_order=tokens.number("FO-", 9),
        )
        self.studies.append(study)
        return study

    @property
    def name(self) -> str:
        """PatientName."""
        return f"{self.family}^{self.given}"

    def age_at(self, when: date) -> str:
        """PatientAge (``063Y``) at ``when``."""
        years = when.year - self.birth_date.year
        if (when.month, when.day) < (self.birth_date.month, self.birth_date.day):
            years -= 1
        return f"{years:03d}Y"

    def free_text(self, study: StudyIdentity) -> str:
        """Return a clinical note mentioning name, ID, birth date and accession."""
        return (
            f"Pt {self.given} {self.family} ({self.patient_id}), "
            f"born {dicom_date(self.birth_date)}, acc {study.accession}; "
            f"referred by Dr {self.referring_physician.split('^')[0]}."
        )

    def planted_values(self) -> list[str]:
        """All patient-level values written into files."""
        values = [
            self.family,
            self.given,
            self.name,
            self.patient_id,
            self.other_id,
            self.universal_entity_id,
            self.other_name,
            self.birth_name,
            self.mother_birth_name,
            dicom_date(self.birth_date),
            self.address,
            self.telephone,
            self.military_rank,
            self.ethnic_group,
            self.occupation,
            self.record_locator,
            self.country,
            self.region,
            self.religion,
            self.responsible_person,
            self.location,
            self.referring_physician,
            self.referring_address,
            self.referring_telephone,
            self.physician_of_record,
            self.referenced_patient_uid,
        ]
        for s in self.studies:
            values += s.planted_values()
        return values


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def apply_identity(
    ds: Dataset,
    site: SiteIdentity,
    patient: PatientIdentity,
    study: StudyIdentity,
    modality: str,
    series_start: datetime,
    series_description: str,
) -> None:
    """Write the patient, study, series, equipment and private identifying attributes.

    Parameters
    ----------
    ds
        Dataset to fill (modified in place).
    site, patient, study
        Identities to plant.
    modality
        Modality key for station name and serial number (``CT``, ``MR``, ``PT``, ``OT``).
    series_start
        Series date and time; acquisition and content times follow it.
    series_description
        SeriesDescription (should contain a name, as operators type them).
    """
    note = patient.free_text(study)
    # Patient module and Patient Study module
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = site.issuer
    ds.PatientBirthDate = dicom_date(patient.birth_date)
    ds.PatientSex = patient.sex
    ds.PatientAge = patient.age_at(study.start.date())
    ds.OtherPatientIDs = patient.other_id
    other = Dataset()
    other.PatientID = patient.other_id
    other.IssuerOfPatientID = f"{site.issuer} insurance"
    qualifier = Dataset()
    qualifier.UniversalEntityID = patient.universal_entity_id
    qualifier.UniversalEntityIDType = "ISO"
    other.IssuerOfPatientIDQualifiersSequence = Sequence([qualifier])
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.OtherPatientNames = patient.other_name
    ds.PatientBirthName = patient.birth_name
    ds.PatientMotherBirthName = patient.mother_birth_name
    ds.PatientAddress = patient.address
    ds.PatientTelephoneNumbers = patient.telephone
    ds.MilitaryRank = patient.military_rank
    ds.EthnicGroup = patient.ethnic_group
    ds.Occupation = patient.occupation
    ds.MedicalRecordLocator = patient.record_locator
    ds.CountryOfResidence = patient.country
    ds.RegionOfResidence = patient.region
    ds.PatientReligiousPreference = patient.religion
    ds.ResponsiblePerson = patient.responsible_person
    ds.ResponsiblePersonRole = "PARENT"
    ds.CurrentPatientLocation = patient.location
    ds.PatientComments = note
    ds.AdditionalPatientHistory = (
        f"History taken from {patient.given} {patient.family} on {study.date}"
    )
    ds.AdmittingDiagnosesDescription = f"Lung mass, {patient.family}, {patient.patient_id}"
    ds.AdmissionID = study.admission_id
    ref_patient = Dataset()
    ref_patient.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.1.4"  # Detached Patient Mgmt (retired)
    ref_patient.ReferencedSOPInstanceUID = patient.referenced_patient_uid
    ds.ReferencedPatientSequence = Sequence([ref_patient])
    # General Study module
    ds.StudyDate = study.date
    ds.StudyTime = study.time
    ds.AccessionNumber = study.accession
    ds.StudyID = study.study_id
    ds.StudyDescription = study.description
    ds.ReferringPhysicianName = patient.referring_physician
    ds.ReferringPhysicianAddress = patient.referring_address
    ds.ReferringPhysicianTelephoneNumbers = patient.referring_telephone
    ds.PhysiciansOfRecord = patient.physician_of_record
    ds.NameOfPhysiciansReadingStudy = study.reading_physician
    ds.RequestingPhysician = study.requesting_physician
    ds.ProcedureCodeSequence = Sequence(
        [_code("PX" + study.accession[-6:], "99LOCAL", f"Thorax staging {patient.family}")]
    )
    # General Series module
    date_text, time_text = dicom_date(series_start), dicom_time(series_start)
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date_text
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time_text
    ds.InstanceCreationDate, ds.InstanceCreationTime = date_text, time_text
    ds.AcquisitionDateTime = date_text + time_text
    ds.SeriesDescription = series_description
    ds.ProtocolName = f"{series_description} ({patient.given[0]}. {patient.family})"
    ds.PerformingPhysicianName = study.performing_physician
    ds.OperatorsName = study.operator
    ds.PerformedProcedureStepID = study.performed_step_id
    ds.PerformedProcedureStepStartDate = study.date
    ds.PerformedProcedureStepStartTime = study.time
    ds.PerformedProcedureStepDescription = f"{study.description} performed"
    request = Dataset()
    request.RequestedProcedureID = study.requested_procedure_id
    request.ScheduledProcedureStepID = study.scheduled_step_id
    request.RequestedProcedureDescription = f"Staging for {patient.family}"
    request.AccessionNumber = study.accession
    request.PlacerOrderNumberImagingServiceRequest = study.placer_order
    request.FillerOrderNumberImagingServiceRequest = study.filler_order
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = site.issuer
    request.IssuerOfAccessionNumberSequence = Sequence([issuer])
    request.RequestedProcedureCodeSequence = Sequence(
        [_code("RPC" + study.requested_procedure_id[-4:], "99LOCAL", f"{patient.name} staging")]
    )
    ds.RequestAttributesSequence = Sequence([request])
    ds.ImageComments = note
    # General Equipment module
    ds.InstitutionName = site.institution
    ds.InstitutionAddress = site.institution_address
    ds.InstitutionalDepartmentName = site.department
    ds.StationName = site.station_names[modality]
    ds.PerformedStationName = site.station_names[modality]
    ds.DeviceSerialNumber = site.device_serials[modality]
    _apply_private(ds, patient, study)


def _apply_private(ds: Dataset, patient: PatientIdentity, study: StudyIdentity) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "PN", patient.name)
    block.add_new(0x02, "LO", patient.patient_id)
    block.add_new(0x03, "LT", f"Exported for {patient.name} by {study.operator}; {study.accession}")
    item = Dataset()
    nested = item.private_block(NESTED_PRIVATE_GROUP, NESTED_PRIVATE_CREATOR, create=True)
    nested.add_new(0x10, "LO", patient.other_id)
    nested.add_new(0x11, "DA", dicom_date(patient.birth_date))
    nested.add_new(0x12, "LT", f"Case file of {patient.given} {patient.family}")
    block.add_new(0x04, "SQ", Sequence([item]))

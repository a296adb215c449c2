"""The answer key of a synthetic cohort (``OUT/truth.json``), for tests only.

Paths are POSIX paths relative to the site folder ``OUT/<site>/`` (the ingest source), so they
compare directly with source-relative paths in quarantine records. All counts are derived from
what was written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tasks.synthetic.profiles import ScannerProfile


class GeometryTruth(BaseModel):
    """Image geometry as SimpleITK reports it (size and spacing in x, y, z order)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    image_orientation_patient: tuple[float, ...]
    slice_offsets_mm: list[float]


class LesionTruth(BaseModel):
    """An ellipsoidal lesion in patient coordinates (LPS, mm)."""

    roi_name: str
    segment_number: int
    centre_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    volume_mm3: float


class LesionSample(BaseModel):
    """A lesion as sampled on one image grid (voxel centres inside the ellipsoid).

    ``mean`` is in the modality's units: HU for CT, stored value for MR, SUVbw for PET.
    ``contours`` is the number of RTSTRUCT contours (RTSTRUCT series only).
    """

    roi_name: str
    voxels: int
    mean: float | None = None
    contours: int | None = None


class SuvTruth(BaseModel):
    """Everything needed to compute SUVbw by hand: SUV = (stored * slope + intercept) * scale."""

    units: str = "BQML"
    weight_kg: float
    injected_dose_bq: float
    half_life_s: float
    injection_datetime: str
    series_datetime: str
    decay_seconds: float
    decay_factor: float
    suv_bw_scale: float
    rescale_slope: float
    rescale_intercept: float


class SeriesTruth(BaseModel):
    """One series as written.

    ``ingest_status`` is the series outcome at ingest; ``expected_stage`` and ``expected_reason``
    name the stage that must quarantine it (None when it should pass every stage).
    ``files`` lists the files carrying this SeriesInstanceUID that ingest should catalogue
    (faulty files of the same series, e.g. a mixed-in localizer, are listed in the faults).
    ``referenced_series_uid`` is the image series a RTSTRUCT/SEG annotates, or the
    single-frame series a multi-frame (``mr-enhanced``) instance was converted from.
    """

    role: str
    kind: Literal["image", "rtstruct", "seg", "secondary"]
    modality: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str | None = None
    series_number: int
    sop_class_uid: str
    transfer_syntax_uid: str
    n_files: int
    files: list[str]
    sop_instance_uids: list[str]
    ingest_status: Literal["ok", "quarantined"]
    expected_stage: str | None = None
    expected_reason: str | None = None
    geometry: GeometryTruth | None = None
    lesions: list[LesionSample] = []
    suv: SuvTruth | None = None
    referenced_series_uid: str | None = None


class StudyTruth(BaseModel):
    """One study."""

    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    days_after_first_study: int
    lesions: list[LesionTruth]
    series: list[SeriesTruth]


class PatientTruth(BaseModel):
    """One patient: identity, planted values, lesions and studies."""

    patient_id: str
    patient_name: str
    sex: str
    birth_date: str
    directory: str
    identifiers: dict[str, str]
    planted_values: list[str]
    lesions: list[LesionTruth]
    studies: list[StudyTruth]


class FaultTruth(BaseModel):
    """A planted fault: which files, which reason, at which stage, for a file or a series."""

    kind: str
    paths: list[str]
    reason: str
    stage: str
    scope: Literal["file", "series"]
    series_instance_uid: str | None = None
    detail: str = ""


class SiteTotals(BaseModel):
    """Counts derived from the written files and the series list.

    ``series_ingest`` and ``series_final`` map modality -> status -> count at ingest and after
    all stages. ``file_outcomes`` maps ingest outcome (``ok`` or a reason) -> number of files.
    """

    files_written: int
    parsable_dicom_files: int
    instances_ok: int
    file_outcomes: dict[str, int]
    series_ingest: dict[str, dict[str, int]]
    series_final: dict[str, dict[str, int]]
    quarantined_series: dict[str, dict[str, int]]


class SiteTruth(BaseModel):
    """One site: profile, site-level planted values, patients, faults and per-file outcomes."""

    site: str
    profile: ScannerProfile
    planted_values: list[str]
    patients: list[PatientTruth]
    faults: list[FaultTruth]
    file_outcomes: dict[str, str]
    totals: SiteTotals

    def series(self) -> Iterator[SeriesTruth]:
        """Every series of every patient of the site."""
        for patient in self.patients:
            for study in patient.studies:
                yield from study.series


class CohortTruth(BaseModel):
    """The answer key of a generated cohort; ``sites`` maps site name to its truth."""

    generator: str
    seed: int
    n_sites: int
    patients_per_site: int
    sites: dict[str, SiteTruth]

    @classmethod
    def load(cls, path: str | Path) -> CohortTruth:
        """Read a ``truth.json`` written by :func:`tasks.synthetic.generate_cohort`."""
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))

    def site(self, name: str) -> SiteTruth:
        """Return the site called ``name`` (KeyError if absent)."""
        return self.sites[name]

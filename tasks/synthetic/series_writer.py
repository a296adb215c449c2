"""Write one series of a synthetic patient and describe it for truth.json."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from tasks.synthetic.dicom_derived import enhanced_mr, rtstruct, segmentation
from tasks.synthetic.dicom_images import (
    ImageSeries,
    SuvParameters,
    add_pet_attributes,
    image_template,
    make_uid,
    quantise,
    slice_datasets,
    write_dataset,
)
from tasks.synthetic.identifiers import (
    PatientIdentity,
    SiteIdentity,
    StudyIdentity,
    apply_identity,
    dicom_date,
    dicom_time,
)
from tasks.synthetic.phantoms import Grid, Lesion, render
from tasks.synthetic.profiles import ScannerProfile
from tasks.synthetic.truth import GeometryTruth, LesionSample, SeriesTruth, SuvTruth


@dataclass
class SiteContext:
    """A site being written: where, how, and every file's expected ingest outcome."""

    seed: int
    index: int
    root: Path
    profile: ScannerProfile
    identity: SiteIdentity
    file_outcomes: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Site name."""
        return self.profile.site

    def rel(self, path: Path) -> str:
        """Site-relative POSIX path."""
        return path.relative_to(self.root).as_posix()

    def record(self, path: Path, outcome: str) -> str:
        """Register a written file and its expected ingest outcome; return its relative path."""
        rel = self.rel(path)
        self.file_outcomes[rel] = outcome
        return rel


@dataclass
class StudyContext:
    """A study being written for one patient."""

    site: SiteContext
    patient_index: int
    patient: PatientIdentity
    study: StudyIdentity
    study_index: int
    directory: Path
    lesions: list[tuple[str, Lesion]]
    study_uid: str
    planted: list[str]

    def uid(self, *parts: object) -> str:
        """Deterministic UID for this study (planted: recorded as an identifier)."""
        value = make_uid(
            self.site.seed, self.site.name, self.patient_index, self.study_index, *parts
        )
        self.planted.append(value)
        return value

    def rng(self, role: str) -> np.random.Generator:
        """Noise generator for one series."""
        key = [self.site.seed, self.site.index, self.patient_index, self.study_index]
        return np.random.default_rng([*key, zlib.crc32(role.encode())])

    def identify(self, ds: Dataset, modality: str, start: datetime, description: str) -> None:
        """Apply the planted identity and remember the series dates/times written."""
        apply_identity(
            ds, self.site.identity, self.patient, self.study, modality, start, description
        )
        self.planted += [
            dicom_date(start),
            dicom_time(start),
            dicom_date(start) + dicom_time(start),
            self.site.identity.station_names[modality],
            self.site.identity.device_serials[modality],
        ]

    def file_name(self, series_number: int, instance_number: int) -> Path:
        """``<study dir>/<SeriesNumber>/IM0001<ext>``."""
        ext = self.site.profile.file_extension
        return self.directory / str(series_number) / f"IM{instance_number:04d}{ext}"


@dataclass
class WrittenSeries:
    """What later steps of the same study need from an image series."""

    truth: SeriesTruth
    grid: Grid
    datasets: list[Dataset]
    paths: list[Path]
    stored: np.ndarray


def _geometry(grid: Grid) -> GeometryTruth:
    geo = grid.sitk_geometry()
    return GeometryTruth(
        size=geo["size"],  # type: ignore[arg-type]
        spacing=geo["spacing"],  # type: ignore[arg-type]
        origin=geo["origin"],  # type: ignore[arg-type]
        direction=geo["direction"],
        image_orientation_patient=grid.orientation,
        slice_offsets_mm=list(grid.offsets),
    )


def _frame_geometry(image: Dataset, grid: Grid) -> GeometryTruth:
    """Geometry of a multi-frame instance in its frame order (the writer may reorder frames)."""
    frames = image.PerFrameFunctionalGroupsSequence
    pos = np.array([f.PlanePositionSequence[0].ImagePositionPatient for f in frames], dtype=float)
    step = pos[1] - pos[0]
    normal = step / np.linalg.norm(step)
    direction = np.stack([grid.row_dir, grid.col_dir, normal], axis=1).ravel()
    return GeometryTruth(
        size=(grid.columns, grid.rows, len(frames)),
        spacing=(
            grid.pixel_spacing[1],
            grid.pixel_spacing[0],
            round(float(np.linalg.norm(step)), 4),
        ),
        origin=tuple(float(v) for v in pos[0]),  # type: ignore[arg-type]
        direction=tuple(round(float(v), 12) + 0.0 for v in direction),
        image_orientation_patient=grid.orientation,
        slice_offsets_mm=[round(float((p - pos[0]) @ normal), 4) for p in pos],
    )


def _suv_truth(suv: SuvParameters, slope: float) -> SuvTruth:
    return SuvTruth(
        weight_kg=suv.weight_kg,
        injected_dose_bq=suv.injected_dose_bq,
        half_life_s=suv.half_life_s,
        injection_datetime=suv.injection.strftime("%Y%m%d%H%M%S.%f"),
        series_datetime=suv.series_start.strftime("%Y%m%d%H%M%S.%f"),
        decay_seconds=(suv.series_start - suv.injection).total_seconds(),
        decay_factor=suv.decay_factor,
        suv_bw_scale=suv.suv_scale,
        rescale_slope=slope,
        rescale_intercept=0.0,
    )


def write_image_series(
    ctx: StudyContext,
    *,
    role: str,
    modality: str,
    grid: Grid,
    series_number: int,
    frame_of_reference_uid: str,
    start: datetime,
    description: str,
    transfer_syntax: str,
    suv: SuvParameters | None = None,
    suv_in_header: bool = True,
    weight_kg: float = 70.0,
    drop_slices: tuple[int, ...] = (),
    ingest_status: str = "ok",
    expected: tuple[str, str] | None = None,
) -> WrittenSeries:
    """Render, write and describe one CT, MR or PET series.

    Parameters
    ----------
    ctx
        Study being written.
    role
        Role of the series in truth.json (``ct``, ``mr``, ``pet``, ``fault-missing-slice``, ...).
    modality
        ``CT``, ``MR`` or ``PT``.
    grid
        Image grid.
    series_number, frame_of_reference_uid, start, description, transfer_syntax
        Series attributes.
    suv
        PET dose and timing (required for PT). ``suv_in_header=False`` omits the isotope module.
    weight_kg
        PatientWeight written in PET headers.
    drop_slices
        Grid slices not written (a missing slice).
    ingest_status, expected
        Expected ingest status, and (stage, reason) of the expected quarantine if any.
    """
    profile = ctx.site.profile
    values = render(grid, modality, [lesion for _, lesion in ctx.lesions], ctx.rng(role))
    if modality == "PT":
        assert suv is not None
        values = values / suv.suv_scale  # SUVbw -> Bq/ml
    signed = profile.ct_signed if modality == "CT" else modality == "PT"
    stored, slope, intercept = quantise(modality, values, signed)
    series_uid = ctx.uid(role, "series")
    model = {"CT": profile.ct_model, "MR": profile.mr_model, "PT": profile.pet_model}[modality]
    spec = ImageSeries(
        modality=modality,
        grid=grid,
        study_uid=ctx.study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        series_number=series_number,
        manufacturer=profile.manufacturer,
        model=model,
        patient_position=profile.patient_position,
        reverse_instance_numbers=profile.reverse_instance_numbers,
    )
    template = image_template(spec, signed, slope, intercept)
    ctx.identify(template, modality, start, description)
    if modality == "PT":
        add_pet_attributes(template, suv if suv_in_header else None, grid.slices, weight_kg)
        if suv is not None and suv_in_header:
            ctx.planted += [
                suv.injection.strftime("%H%M%S.%f"),
                suv.injection.strftime("%Y%m%d%H%M%S.%f"),
            ]
    key = (ctx.site.seed, ctx.site.name, ctx.patient_index, ctx.study_index, role)
    datasets = slice_datasets(template, spec, key)
    paths, files, uids = [], [], []
    for k, ds in enumerate(datasets):
        if k in drop_slices:
            continue
        ctx.planted.append(ds.SOPInstanceUID)
        path = ctx.file_name(series_number, ds.InstanceNumber)
        write_dataset(ds, path, transfer_syntax, stored[k])
        paths.append(path)
        files.append(ctx.site.record(path, "ok"))
        uids.append(ds.SOPInstanceUID)
    kept = [k for k in range(grid.slices) if k not in drop_slices]
    truth = SeriesTruth(
        role=role,
        kind="image",
        modality=modality,
        series_instance_uid=series_uid,
        study_instance_uid=ctx.study_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        series_number=series_number,
        sop_class_uid=str(template.SOPClassUID),
        transfer_syntax_uid=transfer_syntax,
        n_files=len(files),
        files=files,
        sop_instance_uids=uids,
        ingest_status=ingest_status,  # type: ignore[arg-type]
        expected_stage=expected[0] if expected else None,
        expected_reason=expected[1] if expected else None,
        geometry=_geometry(grid) if not drop_slices else None,
        lesions=_samples(
            ctx,
            grid,
            modality,
            stored[kept],
            slope,
            intercept,
            suv if suv_in_header else None,
            kept,
        ),
        suv=_suv_truth(suv, slope) if (suv is not None and suv_in_header) else None,
    )
    return WrittenSeries(truth, grid, [datasets[k] for k in kept], paths, stored)


def _samples(
    ctx: StudyContext,
    grid: Grid,
    modality: str,
    stored: np.ndarray,
    slope: float,
    intercept: float,
    suv: SuvParameters | None,
    kept: list[int],
) -> list[LesionSample]:
    pts = grid.points()[kept]
    real = stored.astype(np.float64) * slope + intercept
    if modality == "PT" and suv is not None:
        real = real * suv.suv_scale
    out = []
    for name, lesion in ctx.lesions:
        inside = lesion.inside(pts)
        mean = float(real[inside].mean()) if inside.any() else None
        out.append(LesionSample(roi_name=name, voxels=int(inside.sum()), mean=mean))
    return out


def write_rtstruct(
    ctx: StudyContext, ct: WrittenSeries, series_number: int, start: datetime
) -> SeriesTruth:
    """Write an RTSTRUCT with the study's lesions contoured on ``ct``."""
    series_uid, sop_uid = ctx.uid("rtstruct", "series"), ctx.uid("rtstruct", "instance")
    ds, counts = rtstruct(
        ct.datasets,
        ct.grid,
        ctx.lesions,
        sop_uid,
        series_uid,
        series_number,
        start,
        interpreter=ctx.study.reading_physician,
    )
    ctx.identify(ds, "CT", start, f"RTSTRUCT GTV {ctx.patient.family}")
    path = ctx.file_name(series_number, 1)
    write_dataset(ds, path, "1.2.840.10008.1.2.1", None)
    rel = ctx.site.record(path, "ok")
    return SeriesTruth(
        role="rtstruct" if ctx.study_index == 0 else "rtstruct-followup",
        kind="rtstruct",
        modality="RTSTRUCT",
        series_instance_uid=series_uid,
        study_instance_uid=ctx.study_uid,
        frame_of_reference_uid=ct.truth.frame_of_reference_uid,
        series_number=series_number,
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        n_files=1,
        files=[rel],
        sop_instance_uids=[sop_uid],
        ingest_status="ok",
        lesions=[
            LesionSample(roi_name=s.roi_name, voxels=s.voxels, contours=counts[s.roi_name])
            for s in ct.truth.lesions
        ],
        referenced_series_uid=ct.truth.series_instance_uid,
    )


def write_seg(
    ctx: StudyContext, ct: WrittenSeries, series_number: int, start: datetime
) -> SeriesTruth:
    """Write a binary DICOM SEG of the study's lesions on ``ct`` (highdicom)."""
    series_uid, sop_uid = ctx.uid("seg", "series"), ctx.uid("seg", "instance")
    pts = ct.grid.points()
    masks = np.stack([lesion.inside(pts) for _, lesion in ctx.lesions], axis=-1)
    seg = segmentation(
        ct.datasets,
        masks,
        [name for name, _ in ctx.lesions],
        sop_uid,
        series_uid,
        series_number,
        start,
        device_serial=ctx.site.identity.device_serials["CT"],
        creator=ctx.study.performing_physician,
    )
    ctx.identify(seg, "CT", start, f"SEG GTV {ctx.patient.family}")
    seg.Modality = "SEG"
    path = ctx.file_name(series_number, 1)
    write_dataset(seg, path, str(seg.file_meta.TransferSyntaxUID), None)
    rel = ctx.site.record(path, "ok")
    return SeriesTruth(
        role="seg" if ctx.study_index == 0 else "seg-followup",
        kind="seg",
        modality="SEG",
        series_instance_uid=series_uid,
        study_instance_uid=ctx.study_uid,
        frame_of_reference_uid=ct.truth.frame_of_reference_uid,
        series_number=series_number,
        sop_class_uid=str(seg.SOPClassUID),
        transfer_syntax_uid=str(seg.file_meta.TransferSyntaxUID),
        n_files=1,
        files=[rel],
        sop_instance_uids=[sop_uid],
        ingest_status="ok",
        lesions=[
            LesionSample(roi_name=name, voxels=int(masks[..., i].sum()))
            for i, (name, _) in enumerate(ctx.lesions)
        ],
        referenced_series_uid=ct.truth.series_instance_uid,
    )


def write_enhanced_mr(
    ctx: StudyContext, mr: WrittenSeries, series_number: int, start: datetime
) -> SeriesTruth:
    """Write ``mr`` again as one multi-frame Legacy Converted Enhanced MR instance."""
    series_uid, sop_uid = ctx.uid("mr-enhanced", "series"), ctx.uid("mr-enhanced", "instance")
    image = enhanced_mr(mr.datasets, mr.stored, sop_uid, series_uid, series_number, start)
    ctx.identify(image, "MR", start, f"T1 AX MF {ctx.patient.given}")
    path = ctx.file_name(series_number, 1)
    write_dataset(image, path, str(image.file_meta.TransferSyntaxUID), None)
    rel = ctx.site.record(path, "ok")
    return mr.truth.model_copy(
        update={
            "role": "mr-enhanced",
            "geometry": _frame_geometry(image, mr.grid),
            "series_instance_uid": series_uid,
            "series_number": series_number,
            "sop_class_uid": str(image.SOPClassUID),
            "transfer_syntax_uid": str(image.file_meta.TransferSyntaxUID),
            "n_files": 1,
            "files": [rel],
            "sop_instance_uids": [sop_uid],
            "referenced_series_uid": mr.truth.series_instance_uid,
        },
        deep=True,
    )

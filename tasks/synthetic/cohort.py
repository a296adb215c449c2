"""Generate a synthetic multi-site DICOM cohort and its answer key (truth.json)."""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from dataclasses import asdict
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from tasks.errors import OncoflowError
from tasks.records import Reason, Stage
from tasks.synthetic import faults
from tasks.synthetic.dicom_images import (
    F18_HALF_LIFE_S,
    SuvParameters,
    burned_in_pixels,
    make_uid,
    quantise,
    secondary_capture,
    write_dataset,
)
from tasks.synthetic.identifiers import (
    PatientIdentity,
    SiteIdentity,
    TokenFactory,
    dicom_date,
)
from tasks.synthetic.phantoms import Grid, Lesion, ds_str, random_lesion, render
from tasks.synthetic.profiles import site_name, site_profile
from tasks.synthetic.series_writer import (
    SiteContext,
    StudyContext,
    WrittenSeries,
    write_enhanced_mr,
    write_image_series,
    write_rtstruct,
    write_seg,
)
from tasks.synthetic.truth import (
    CohortTruth,
    FaultTruth,
    LesionTruth,
    PatientTruth,
    SeriesTruth,
    SiteTotals,
    SiteTruth,
    StudyTruth,
)

GENERATOR = "oncoflow-synthetic/1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# Series numbers
CT, MR, MR_ENHANCED, PET, PET_NO_SUV, RTSTRUCT, SEG = 2, 5, 6, 7, 8, 101, 102
SECONDARY, MISSING_SLICE, IRREGULAR, LOCALIZER, TRUNCATED = 900, 901, 902, 903, 999


def generate_cohort(
    out: str | Path, sites: int = 3, patients: int = 3, seed: int = 0
) -> CohortTruth:
    """Write a deterministic synthetic multi-site DICOM cohort and ``OUT/truth.json``.

    Parameters
    ----------
    out
        Output folder; must be empty or absent.
    sites
        Number of sites (1 to 26), named ``site-a``, ``site-b``, ...
    patients
        Patients per site (at least 1).
    seed
        Random seed: the same (sites, patients, seed) gives byte-identical files.

    Returns
    -------
    CohortTruth
        The answer key, also written to ``OUT/truth.json``.

    Raises
    ------
    OncoflowError
        When the arguments are out of range or ``out`` is not empty.
    """
    root = Path(out)
    if not 1 <= sites <= 26 or patients < 1:
        raise OncoflowError("synth needs 1 to 26 sites and at least 1 patient per site")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise OncoflowError(f"output folder is not empty: {root}")
    tokens = TokenFactory(np.random.default_rng([seed, 0x5EED]))
    site_truths = {
        site_name(index): _generate_site(root, index, patients, seed, tokens)
        for index in range(sites)
    }
    truth = CohortTruth(
        generator=GENERATOR, seed=seed, n_sites=sites, patients_per_site=patients, sites=site_truths
    )
    (root / "truth.json").write_text(truth.model_dump_json(indent=2), encoding="utf-8")
    return truth


def _generate_site(
    root: Path, index: int, patients: int, seed: int, tokens: TokenFactory
) -> SiteTruth:
    name = site_name(index)
    site = SiteContext(
        seed=seed,
        index=index,
        root=root / name,
        profile=site_profile(index),
        identity=SiteIdentity.generate(tokens),
    )
    fault_list: list[FaultTruth] = []
    patient_truths, first_cts = [], []
    for p in range(patients):
        truth, ct = _generate_patient(site, p, patients, tokens, fault_list)
        patient_truths.append(truth)
        first_cts.append(ct)
    _site_files(site, first_cts, patient_truths, fault_list)
    return SiteTruth(
        site=name,
        profile=site.profile,
        planted_values=site.identity.planted_values(),
        patients=patient_truths,
        faults=fault_list,
        file_outcomes=dict(sorted(site.file_outcomes.items())),
        totals=_totals(site, patient_truths),
    )


def _draw_lesions(
    site: SiteContext, p: int, rng: np.random.Generator, z: float
) -> list[tuple[str, Lesion]]:
    n = 1 + (p + site.index + 1) % 2
    sides = (1, -1)[:n]
    return [
        (site.profile.roi_names[i], random_lesion(rng, side, z)) for i, side in enumerate(sides)
    ]


def _lesion_truths(lesions: list[tuple[str, Lesion]]) -> list[LesionTruth]:
    return [
        LesionTruth(
            roi_name=name,
            segment_number=i,
            centre_mm=lesion.centre,
            semi_axes_mm=lesion.semi_axes,
            volume_mm3=lesion.volume_mm3,
        )
        for i, (name, lesion) in enumerate(lesions, start=1)
    ]


def _start_time(rng: np.random.Generator, day: date) -> datetime:
    seconds = int(rng.integers(7 * 3600 + 1800, 15 * 3600))
    micro = int(rng.integers(1, 999_999))
    return datetime(day.year, day.month, day.day) + timedelta(seconds=seconds, microseconds=micro)


def _generate_patient(
    site: SiteContext,
    p: int,
    patients: int,
    tokens: TokenFactory,
    fault_list: list[FaultTruth],
) -> tuple[PatientTruth, WrittenSeries]:
    rng = np.random.default_rng([site.seed, site.index, p, 1])
    identity = PatientIdentity.generate(tokens, make_uid(site.seed, site.name, p, "patient"))
    z_table = round(float(rng.uniform(-250.0, -100.0)), 1)
    lesions = _draw_lesions(site, p, rng, z_table)
    first_day = date(2018, 1, 1) + timedelta(days=int(rng.integers(0, 5 * 365)))
    starts = [_start_time(rng, first_day)]
    if p % 3 == 1:
        follow_up = first_day + timedelta(days=int(rng.integers(60, 200)))
        starts.append(_start_time(rng, follow_up))
    directory = site.root / f"{identity.patient_id}_{identity.family}"
    planted: list[str] = []
    studies: list[StudyTruth] = []
    first_ct: WrittenSeries | None = None
    for s, start in enumerate(starts):
        study_id = identity.add_study(tokens, start, "PET-CT THORAX" if s == 0 else "CT THORAX")
        study_lesions = lesions if s == 0 else [(n, le.scaled(0.8)) for n, le in lesions]
        ctx = StudyContext(
            site=site,
            patient_index=p,
            patient=identity,
            study=study_id,
            study_index=s,
            directory=directory / study_id.date,
            lesions=study_lesions,
            study_uid="",
            planted=planted,
        )
        ctx.study_uid = ctx.uid("study")
        if s == 0:
            series, ct = _baseline_study(ctx, rng, z_table, patients, fault_list)
            first_ct = ct
        else:
            series = _follow_up_study(ctx, z_table)
        studies.append(
            StudyTruth(
                study_instance_uid=ctx.study_uid,
                study_date=study_id.date,
                study_time=study_id.time,
                accession_number=study_id.accession,
                days_after_first_study=(start.date() - first_day).days,
                lesions=_lesion_truths(study_lesions),
                series=series,
            )
        )
    planted = identity.planted_values() + site.identity.common_values() + planted
    identifiers = {
        k: (dicom_date(v) if isinstance(v, date) else str(v))
        for k, v in asdict(identity).items()
        if k != "studies"
    }
    truth = PatientTruth(
        patient_id=identity.patient_id,
        patient_name=identity.name,
        sex=identity.sex,
        birth_date=dicom_date(identity.birth_date),
        directory=site.rel(directory),
        identifiers=identifiers,
        planted_values=list(dict.fromkeys(planted)),
        lesions=_lesion_truths(lesions),
        studies=studies,
    )
    assert first_ct is not None
    return truth, first_ct


def _grids(site: SiteContext, z: float) -> dict[str, Grid]:
    prof = site.profile
    centre = (0.0, 0.0, z)
    return {
        "CT": Grid.centred(
            prof.orientation,
            centre,
            prof.ct_pixel_spacing,
            prof.ct_slice_spacing,
            prof.ct_slices,
            64,
            64,
        ),
        "MR": Grid.centred(
            prof.orientation,
            centre,
            prof.mr_pixel_spacing,
            prof.mr_slice_spacing,
            prof.mr_slices,
            64,
            64,
        ),
        "PT": Grid.centred(
            prof.pet_orientation,
            centre,
            prof.pet_pixel_spacing,
            prof.pet_slice_spacing,
            prof.pet_slices,
            32,
            32,
        ),
    }


def _baseline_study(
    ctx: StudyContext,
    rng: np.random.Generator,
    z: float,
    patients: int,
    fault_list: list[FaultTruth],
) -> tuple[list[SeriesTruth], WrittenSeries]:
    prof, site, p = ctx.site.profile, ctx.site, ctx.patient_index
    grids = _grids(site, z)
    start = ctx.study.start
    injection = start + timedelta(
        minutes=5, seconds=int(rng.integers(0, 600)), microseconds=int(rng.integers(1, 999_999))
    )
    pet_start = injection + timedelta(
        minutes=int(rng.integers(55, 75)),
        seconds=int(rng.integers(0, 60)),
        microseconds=int(rng.integers(1, 999_999)),
    )
    suv = SuvParameters(
        weight_kg=round(float(rng.uniform(55.0, 95.0)), 1),
        injected_dose_bq=float(round(float(rng.uniform(250e6, 400e6)), -5)),
        half_life_s=F18_HALF_LIFE_S,
        injection=injection,
        series_start=pet_start,
    )
    for_ct = ctx.uid("frame-of-reference", "pet-ct")
    for_mr = ctx.uid("frame-of-reference", "mr")
    ct = write_image_series(
        ctx,
        role="ct",
        modality="CT",
        grid=grids["CT"],
        series_number=CT,
        frame_of_reference_uid=for_ct,
        start=pet_start - timedelta(minutes=3),
        description=f"CT AX 5mm {ctx.patient.family}",
        transfer_syntax=prof.ct_transfer_syntax,
    )
    mr = write_image_series(
        ctx,
        role="mr",
        modality="MR",
        grid=grids["MR"],
        series_number=MR,
        frame_of_reference_uid=for_mr,
        start=start + timedelta(hours=2, seconds=17),
        description=f"T1 AX {ctx.patient.given}",
        transfer_syntax=prof.mr_transfer_syntax,
    )
    pet = write_image_series(
        ctx,
        role="pet",
        modality="PT",
        grid=grids["PT"],
        series_number=PET,
        frame_of_reference_uid=for_ct,
        start=pet_start,
        description=f"PET AC WB {ctx.patient.family}",
        transfer_syntax=prof.pet_transfer_syntax,
        suv=suv,
        weight_kg=suv.weight_kg,
    )
    contoured = start + timedelta(days=1, hours=1, seconds=int(rng.integers(0, 3600)))
    series = [
        ct.truth,
        mr.truth,
        pet.truth,
        write_rtstruct(ctx, ct, RTSTRUCT, contoured),
        write_seg(ctx, ct, SEG, contoured + timedelta(minutes=4)),
    ]
    if p == 2 % patients:
        series.append(_pet_without_suv(ctx, grids["PT"], for_ct, suv, fault_list))
    if p == 1 % patients:
        series.append(_secondary_capture(ctx, start + timedelta(minutes=40), fault_list))
    if p == 0:
        series.append(
            write_enhanced_mr(ctx, mr, MR_ENHANCED, start + timedelta(hours=2, minutes=9))
        )
        series += _fault_series(ctx, grids["CT"], for_ct, pet_start, fault_list)
        _file_faults(ctx, ct, fault_list)
    return series, ct


def _follow_up_study(ctx: StudyContext, z: float) -> list[SeriesTruth]:
    prof = ctx.site.profile
    grid = _grids(ctx.site, z)["CT"]
    ct = write_image_series(
        ctx,
        role="ct-followup",
        modality="CT",
        grid=grid,
        series_number=CT,
        frame_of_reference_uid=ctx.uid("frame-of-reference", "ct"),
        start=ctx.study.start + timedelta(minutes=3),
        description=f"CT AX 5mm FU {ctx.patient.family}",
        transfer_syntax=prof.ct_transfer_syntax,
    )
    later = ctx.study.start + timedelta(days=2, minutes=11)
    return [
        ct.truth,
        write_rtstruct(ctx, ct, RTSTRUCT, later),
        write_seg(ctx, ct, SEG, later + timedelta(minutes=2)),
    ]


def _pet_without_suv(
    ctx: StudyContext, grid: Grid, for_uid: str, suv: SuvParameters, fault_list: list[FaultTruth]
) -> SeriesTruth:
    written = write_image_series(
        ctx,
        role="pet-no-suv",
        modality="PT",
        grid=grid,
        series_number=PET_NO_SUV,
        frame_of_reference_uid=for_uid,
        start=suv.series_start + timedelta(minutes=20),
        description=f"PET NAC recon {ctx.patient.family}",
        transfer_syntax=ctx.site.profile.pet_transfer_syntax,
        suv=suv,
        suv_in_header=False,
        weight_kg=suv.weight_kg,
        expected=(str(Stage.HARMONISE), str(Reason.MISSING_SUV_DATA)),
    )
    fault_list.append(
        FaultTruth(
            kind="missing-suv-data",
            paths=written.truth.files,
            reason=str(Reason.MISSING_SUV_DATA),
            stage=str(Stage.HARMONISE),
            scope="series",
            series_instance_uid=written.truth.series_instance_uid,
            detail="PET without RadiopharmaceuticalInformationSequence",
        )
    )
    return written.truth


def _secondary_capture(
    ctx: StudyContext, start: datetime, fault_list: list[FaultTruth]
) -> SeriesTruth:
    series_uid, sop_uid = ctx.uid("secondary", "series"), ctx.uid("secondary", "instance")
    pixels = burned_in_pixels([ctx.patient.name, ctx.patient.patient_id, ctx.study.date])
    ds = secondary_capture(ctx.study_uid, series_uid, sop_uid, SECONDARY, pixels)
    ds.Manufacturer = ctx.site.profile.manufacturer
    ctx.identify(ds, "OT", start, f"Screen save {ctx.patient.family}")
    path = ctx.file_name(SECONDARY, 1)
    write_dataset(ds, path, EXPLICIT_LE, pixels)
    rel = ctx.site.record(path, "ok")
    fault_list.append(
        FaultTruth(
            kind="burned-in-annotation",
            paths=[rel],
            reason=str(Reason.BURNED_IN_ANNOTATION),
            stage=str(Stage.DEIDENTIFY),
            scope="series",
            series_instance_uid=series_uid,
            detail="secondary capture with BurnedInAnnotation YES and text in the pixels",
        )
    )
    return SeriesTruth(
        role="secondary-capture",
        kind="secondary",
        modality="OT",
        series_instance_uid=series_uid,
        study_instance_uid=ctx.study_uid,
        series_number=SECONDARY,
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=EXPLICIT_LE,
        n_files=1,
        files=[rel],
        sop_instance_uids=[sop_uid],
        ingest_status="ok",
        expected_stage=str(Stage.DEIDENTIFY),
        expected_reason=str(Reason.BURNED_IN_ANNOTATION),
    )


def _fault_series(
    ctx: StudyContext, ct_grid: Grid, for_uid: str, start: datetime, fault_list: list[FaultTruth]
) -> list[SeriesTruth]:
    """Extra CT series with geometry faults (10 slices each) plus a localizer mixed into one."""
    small = Grid.centred(
        ct_grid.orientation,
        ct_grid.centre,
        ct_grid.pixel_spacing,
        ct_grid.offsets[1] - ct_grid.offsets[0],
        10,
        ct_grid.rows,
        ct_grid.columns,
    )
    ts = ctx.site.profile.ct_transfer_syntax
    common = {"modality": "CT", "frame_of_reference_uid": for_uid, "transfer_syntax": ts}
    missing = write_image_series(
        ctx,
        role="fault-missing-slice",
        grid=small,
        series_number=MISSING_SLICE,
        start=start + timedelta(minutes=6),
        description="CT recon 2 MISSING",
        drop_slices=(small.slices // 2,),
        ingest_status="quarantined",
        expected=(str(Stage.INGEST), str(Reason.MISSING_SLICE)),
        **common,
    )
    irregular = write_image_series(
        ctx,
        role="fault-inconsistent-spacing",
        grid=faults.irregular_grid(small),
        series_number=IRREGULAR,
        start=start + timedelta(minutes=7),
        description="CT recon 3 IRREGULAR",
        ingest_status="quarantined",
        expected=(str(Stage.INGEST), str(Reason.INCONSISTENT_SPACING)),
        **common,
    )
    with_scout = write_image_series(
        ctx,
        role="ct-with-localizer",
        grid=small,
        series_number=LOCALIZER,
        start=start + timedelta(minutes=8),
        description="CT recon 4",
        **common,
    )
    for written, reason in (
        (missing, Reason.MISSING_SLICE),
        (irregular, Reason.INCONSISTENT_SPACING),
    ):
        fault_list.append(
            FaultTruth(
                kind=str(reason),
                paths=written.truth.files,
                reason=str(reason),
                stage=str(Stage.INGEST),
                scope="series",
                series_instance_uid=written.truth.series_instance_uid,
            )
        )
    scout_path = _write_localizer(ctx, with_scout, start)
    fault_list.append(
        FaultTruth(
            kind="localizer",
            paths=[scout_path],
            reason=str(Reason.LOCALIZER),
            stage=str(Stage.INGEST),
            scope="file",
            series_instance_uid=with_scout.truth.series_instance_uid,
            detail="LOCALIZER image sharing the SeriesInstanceUID; the rest of the series is valid",
        )
    )
    return [missing.truth, irregular.truth, with_scout.truth]


def _write_localizer(ctx: StudyContext, series: WrittenSeries, start: datetime) -> str:
    """Write a scout orthogonal to the series, with its SeriesInstanceUID, as IM0000."""
    grid = faults.localizer_grid(series.grid)
    ds = copy.deepcopy(series.datasets[0])
    uid = ctx.uid("localizer", "instance")
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = 0
    ds.ImageOrientationPatient = [ds_str(v) for v in grid.orientation]
    ds.ImagePositionPatient = [ds_str(v) for v in grid.position(0)]
    ds.SliceLocation = "0"
    values = render(grid, "CT", [le for _, le in ctx.lesions], ctx.rng("localizer"))
    stored, _, _ = quantise("CT", values, ctx.site.profile.ct_signed)
    if "PixelData" in ds:
        del ds.PixelData
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    path = ctx.file_name(LOCALIZER, 0)
    write_dataset(ds, path, ctx.site.profile.ct_transfer_syntax, stored[0])
    return ctx.site.record(path, str(Reason.LOCALIZER))


def _file_faults(ctx: StudyContext, ct: WrittenSeries, fault_list: list[FaultTruth]) -> None:
    """Zero-byte, truncated, duplicate and JPEG files in the first patient's first study."""
    site = ctx.site
    ext = site.profile.file_extension
    empty = ct.paths[0].parent / f"IM{len(ct.paths) + 1:04d}{ext}"
    faults.write_empty(empty)
    source = ct.paths[len(ct.paths) // 2]
    duplicate = source.with_name(source.name + ".bak")
    faults.copy_file(source, duplicate)
    # Truncated: a one-slice recon written in explicit VR, then cut inside its pixel data.
    truncated = ctx.file_name(TRUNCATED, 1)
    ds = ct.datasets[len(ct.datasets) // 2]
    cut = copy.deepcopy(ds)
    for attr, value in (
        ("SOPInstanceUID", ctx.uid("truncated", "instance")),
        ("SeriesInstanceUID", ctx.uid("truncated", "series")),
    ):
        setattr(cut, attr, value)
    cut.file_meta.MediaStorageSOPInstanceUID = cut.SOPInstanceUID
    cut.SeriesNumber = TRUNCATED
    if "PixelData" in cut:
        del cut.PixelData
    write_dataset(cut, truncated, EXPLICIT_LE, ct.stored[len(ct.datasets) // 2])
    declared, kept = faults.write_truncated(truncated, truncated)
    thumb = ctx.directory / "thumbnail.jpg"
    mid = ct.stored[len(ct.datasets) // 2].astype(np.float64)
    faults.write_jpeg(thumb, np.clip((mid - 200) / 8, 0, 255).astype(np.uint8))
    for path, reason, detail in (
        (empty, Reason.EMPTY_FILE, "0 bytes"),
        (truncated, Reason.TRUNCATED_FILE, f"Pixel Data declares {declared} bytes, {kept} present"),
        (duplicate, Reason.DUPLICATE_INSTANCE, f"byte copy of {site.rel(source)}"),
        (thumb, Reason.NOT_DICOM, "JPEG thumbnail"),
    ):
        rel = site.record(path, str(reason))
        fault_list.append(
            FaultTruth(
                kind=str(reason),
                paths=[rel],
                reason=str(reason),
                stage=str(Stage.INGEST),
                scope="file",
                detail=detail,
            )
        )


def _site_files(
    site: SiteContext,
    first_cts: list[WrittenSeries],
    patients: list[PatientTruth],
    fault_list: list[FaultTruth],
) -> None:
    """README.txt and DICOMDIR at the site root."""
    readme = site.root / "README.txt"
    lines = [f"PACS export from {site.identity.institution}", "Patients:"]
    lines += [f"  {p.patient_name} {p.patient_id}" for p in patients]
    faults.write_text(readme, "\n".join(lines) + "\n")
    dicomdir = site.root / "DICOMDIR"
    faults.write_dicomdir(
        dicomdir, [ct.datasets[0] for ct in first_cts], make_uid(site.seed, site.name, "fileset")
    )
    for path, reason, detail in (
        (readme, Reason.NOT_DICOM, "export notes"),
        (dicomdir, Reason.DICOMDIR, "media directory; its references point outside the export"),
    ):
        rel = site.record(path, str(reason))
        fault_list.append(
            FaultTruth(
                kind=str(reason),
                paths=[rel],
                reason=str(reason),
                stage=str(Stage.INGEST),
                scope="file",
                detail=detail,
            )
        )


def _parsable(path: Path) -> bool:
    try:
        pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError):
        return False
    return True


def _totals(site: SiteContext, patients: list[PatientTruth]) -> SiteTotals:
    outcomes = Counter(site.file_outcomes.values())
    ingest: dict[str, Counter[str]] = defaultdict(Counter)
    final: dict[str, Counter[str]] = defaultdict(Counter)
    quarantined: dict[str, Counter[str]] = defaultdict(Counter)
    for patient in patients:
        for study in patient.studies:
            for s in study.series:
                ingest[s.modality][s.ingest_status] += 1
                final[s.modality]["quarantined" if s.expected_reason else "ok"] += 1
                if s.expected_reason:
                    quarantined[str(s.expected_stage)][s.expected_reason] += 1
    return SiteTotals(
        files_written=len(site.file_outcomes),
        parsable_dicom_files=sum(_parsable(site.root / rel) for rel in site.file_outcomes),
        instances_ok=outcomes.get("ok", 0),
        file_outcomes=dict(sorted(outcomes.items())),
        series_ingest={m: dict(sorted(c.items())) for m, c in sorted(ingest.items())},
        series_final={m: dict(sorted(c.items())) for m, c in sorted(final.items())},
        quarantined_series={s: dict(sorted(c.items())) for s, c in sorted(quarantined.items())},
    )

"""De-identify one series of the private catalogue into ``deid/`` (the body of one Dask task).

The task reads the series' source files through the catalogue's ``paths`` and the source root,
checks for burned-in text, de-identifies each instance, and writes
``deid/dicom/<patient>/<study>/<series>/<n>.dcm`` (pseudonymous keys only, ``n`` in slice
order). It returns a :class:`UnitOutcome` holding pseudonymous keys, counts and the
``deid/series.parquet`` row: never a private key, path or value. The site secret is read inside
the task (environment or Prefect Secret block), never passed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tasks.deid.checks import (
    MEGABYTE,
    TooLarge,
    decoded_size,
    inflate_bounded,
    patient_age,
    screen,
)
from tasks.deid.dataset import (
    DeidContext,
    InvalidInstance,
    deidentify_dataset,
    encode_dataset,
    quiet_pydicom,
)
from tasks.deid.pixels import PixelLayoutError, blank_rectangles, clear_unused_bits
from tasks.deid.policy import PIXEL_DATA
from tasks.deid.profile import DeidOptions
from tasks.deid.pseudonyms import SiteKeys, patient_key
from tasks.deid.rewrite import Unsupported, read_meta, rewrite_instance
from tasks.deid.secret import load_site_secret
from tasks.names import task_label
from tasks.records import Reason, Status, UnitOutcome, UnitResult
from tasks.store import DEID_DICOM, SiteStore, open_url

UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class SeriesJob:
    """One series to de-identify (private zone: holds source paths and the original UIDs).

    Passed to the task through Dask only; never a flow parameter, never logged.
    """

    series_key: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    modality: str
    kind: str
    paths: tuple[str, ...]
    extra_identifiers: tuple[str, ...] = ()


def pseudonymous_series_uid(keys: SiteKeys, series_key: str, series_instance_uid: str) -> str:
    """Return the pseudonymous SeriesInstanceUID of a catalogue series.

    A split-out part (``<uid>:localizer``) gets its own UID, from the whole series key, so it
    never collides with the main part.
    """
    return keys.remap_uid(series_key if series_key != series_instance_uid else series_instance_uid)


def instance_key(patient: str, study: str, series: str, index: int) -> str:
    """Store key of the ``index``-th (1-based, slice order) instance of a de-identified series."""
    return f"{DEID_DICOM}/{patient}/{study}/{series}/{index:05d}.dcm"


def _referenced_series(ds: Dataset, own: str) -> set[str]:
    """Series UIDs a SEG (ReferencedSeriesSequence) or RTSTRUCT (nested RT references) points at."""
    found: set[str] = set()
    for item in ds.get("ReferencedSeriesSequence", None) or []:
        found.add(str(item.get("SeriesInstanceUID", "") or ""))
    for frame in ds.get("ReferencedFrameOfReferenceSequence", None) or []:
        for study in frame.get("RTReferencedStudySequence", None) or []:
            for series in study.get("RTReferencedSeriesSequence", None) or []:
                found.add(str(series.get("SeriesInstanceUID", "") or ""))
    return found - {"", own}


def _first_text(ds: Dataset, *keywords: str) -> str:
    for keyword in keywords:
        value = ds.get(keyword)
        if value not in (None, ""):
            return str(value)
    return ""


@dataclass
class InstanceOutcome:
    """One instance after de-identification: the encoded file, or why it cannot be published.

    ``dataset`` is the de-identified dataset: the one the pydicom path built, or the encoded
    file read back on first use when the byte-stream rewriter produced it. ``references`` is
    False only when the file holds no top-level sequence that may reference another series.
    """

    parsed: Dataset | None = None
    reason: Reason | None = None
    detail: str = ""
    age: str = ""
    data: bytes = b""
    references: bool = True

    @property
    def dataset(self) -> Dataset | None:
        """The de-identified dataset, or None when the instance is quarantined."""
        if self.parsed is None and self.reason is None and self.data:
            with quiet_pydicom():
                self.parsed = dcmread(io.BytesIO(self.data))
        return self.parsed


def deidentify_instance(data: bytes, ctx: DeidContext) -> InstanceOutcome:
    """Read, check and de-identify one file's bytes (never raises for bad input).

    Parameters
    ----------
    data
        The file content.
    ctx
        Context of the patient (keys, options, audit counter).

    Returns
    -------
    InstanceOutcome
        The de-identified file, or no dataset and a reason: ``unreadable-header``,
        ``missing-uids``, ``dicomdir``, ``encapsulated-document``, ``burned-in-annotation``
        (no cleaning rule covers it), ``overlay-in-pixel-data``, ``invalid-attribute``,
        ``input-too-large`` or ``deid-error``. Details never hold header values.

    Notes
    -----
    Files go through :func:`tasks.deid.rewrite.rewrite_instance` (the byte-stream rewriter,
    same decisions, same output) when it handles them, else through pydicom: read, check,
    de-identify the dataset, encode. The rewriter hands a file over only by raising its own
    :class:`~tasks.deid.rewrite.Unsupported`; any other exception quarantines the file.
    """
    with quiet_pydicom():
        try:
            fast = rewrite_instance(data, ctx)
        except Unsupported:
            fast = None
        except Exception as exc:  # a defect of the rewriter: never a traceback, never a leak
            return InstanceOutcome(None, Reason.DEID_ERROR, f"rewrite failed: {type(exc).__name__}")
    if fast is not None:
        if fast.reason:
            return InstanceOutcome(None, Reason(fast.reason), fast.detail)
        return InstanceOutcome(age=fast.age, data=fast.data, references=fast.references)
    return _deidentify_with_pydicom(data, ctx)


def _inflation_check(data: bytes, limit: int) -> None:
    """Raise :class:`TooLarge` when a deflated file would inflate beyond ``limit`` bytes."""
    try:
        syntax, offset = read_meta(data)
    except Unsupported:
        return  # pydicom decides; its reader finds no deflated syntax it can read either
    if syntax == DeflatedExplicitVRLittleEndian:
        with contextlib.suppress(zlib.error):
            inflate_bounded(data[offset:], limit)


def _deidentify_with_pydicom(data: bytes, ctx: DeidContext) -> InstanceOutcome:
    """De-identify through pydicom: read, check, de-identify the dataset, encode."""
    stage = "read"
    limit = ctx.options.max_inflated_mb * MEGABYTE
    try:
        with quiet_pydicom():
            try:
                _inflation_check(data, limit)
            except TooLarge as exc:
                return InstanceOutcome(None, Reason.INPUT_TOO_LARGE, str(exc))
            try:
                ds = dcmread(io.BytesIO(data), force=True)
                raws = dict(ds._dict)  # as read: written VRs and values, before any check
                _ = ds.get("SOPInstanceUID")
            except Exception as exc:
                return InstanceOutcome(None, Reason.UNREADABLE_HEADER, type(exc).__name__)
            stage = "pixels"
            pixel = raws.get(PIXEL_DATA)
            compressed = isinstance(pixel, RawDataElement) and pixel.length == UNDEFINED_LENGTH
            screened = screen(ds, raws.keys(), compressed, ctx.options)
            if screened.reason:
                return InstanceOutcome(None, Reason(screened.reason), screened.detail)
            if isinstance(pixel, RawDataElement) and not compressed and pixel.value:
                cleared = clear_unused_bits(
                    pixel.value,
                    int(ds.get("BitsAllocated", 0) or 0),
                    int(ds.get("BitsStored", 0) or 0),
                    int(ds.get("HighBit", 0) or 0),
                    int(ds.get("PixelRepresentation", 0) or 0) == 1,
                    bool(getattr(ds, "original_encoding", (None, True))[1]),
                )
                if cleared is not None:
                    ds.PixelData = cleared
                    ctx.audit[("PixelData", "clear-unused-bits")] += 1
            if screened.rule is not None:
                if decoded_size(ds) > limit:
                    return InstanceOutcome(
                        None, Reason.INPUT_TOO_LARGE, "decoded pixel data over the bound"
                    )
                blank_rectangles(ds, screened.rule)
                ctx.pixels_cleaned = True
                ctx.audit[("PixelData", f"clean:{screened.rule.name}")] += 1
            age = patient_age(ds, ctx.options)
            stage = "deidentify"
            try:
                deidentify_dataset(ds, ctx, raws)
            except InvalidInstance as exc:
                return InstanceOutcome(None, Reason.INVALID_ATTRIBUTE, f"malformed {exc}")
            stage = "encode"
            encoded = encode_dataset(ds)
    except PixelLayoutError as exc:  # unused pixel bits that cannot be cleared
        return InstanceOutcome(None, Reason.OVERLAY_IN_PIXEL_DATA, f"{stage}: {exc}")
    except Exception as exc:
        return InstanceOutcome(None, Reason.DEID_ERROR, f"{stage} failed: {type(exc).__name__}")
    return InstanceOutcome(ds, age=age, data=encoded)


def _describe(
    row: dict[str, Any], ds: Dataset, job: SeriesJob, options: DeidOptions, age: str
) -> None:
    """Fill the EUCAIM minimum-set columns of a series row from its first instance."""
    row["frame_of_reference"] = str(ds.get("FrameOfReferenceUID", "") or "")
    if not row["frame_of_reference"] and job.kind == "rtstruct":
        row["frame_of_reference"] = _rtstruct_frame(ds)
    row["body_part"] = str(ds.get("BodyPartExamined", "") or "")
    row["manufacturer"] = str(ds.get("Manufacturer", "") or "")
    if "PatientSex" in options.patient_characteristics:
        row["sex"] = str(ds.get("PatientSex", "") or "")
    row["acquisition_date"] = _first_text(
        ds, "AcquisitionDate", "SeriesDate", "ContentDate", "StudyDate"
    )
    row["age_at_study"] = age


def deidentify_series(
    job: SeriesJob, store_url: str, site: str, source_url: str, options: DeidOptions
) -> UnitOutcome:
    """De-identify one series and write it under ``deid/dicom/``.

    Parameters
    ----------
    job
        The catalogue series (private).
    store_url, site
        The site store.
    source_url
        fsspec URL of the source root the catalogue's paths are relative to.
    options
        Profile options.

    Returns
    -------
    UnitOutcome
        ``ok`` with the written keys, or ``quarantined`` (burned-in annotation, de-identification
        error) with a reason; never raises for bad input.
    """
    keys = SiteKeys.derive(load_site_secret(site), site)
    key = patient_key(job.patient_id, job.study_instance_uid or job.series_instance_uid)
    patient = keys.patient_pseudonym(key)
    series = pseudonymous_series_uid(keys, job.series_key, job.series_instance_uid)
    study = keys.remap_uid(job.study_instance_uid)
    store = SiteStore(store_url, site)
    row: dict[str, Any] = {
        "series": series,
        "study": study,
        "patient": patient,
        "frame_of_reference": "",
        "modality": job.modality,
        "kind": job.kind,
        "body_part": "",
        "manufacturer": "",
        "sex": "",
        "acquisition_date": "",
        "age_at_study": "",
        "n_instances": 0,
        "paths": [],
        "referenced_series": [],
        "status": str(Status.OK),
        "reason": "",
    }
    override = {}
    if job.series_key != job.series_instance_uid:
        override[job.series_instance_uid] = series
    ctx = DeidContext(
        keys=keys,
        options=options,
        patient_id=key,
        extra_identifiers=job.extra_identifiers,
        series_uid_override=override,
    )
    fs, root = open_url(source_url)
    written: list[str] = []
    outputs: list[str] = []
    referenced: set[str] = set()
    content = hashlib.sha256()
    for index, path in enumerate(job.paths, start=1):
        try:
            data = read_bounded(fs, f"{root}/{path}", options.max_input_mb * MEGABYTE)
        except TooLarge as exc:
            _discard(store, written)
            return _quarantined(row, Reason.INPUT_TOO_LARGE, str(exc))
        except Exception as exc:  # vanished or unreadable source file
            _discard(store, written)
            return _quarantined(row, Reason.DEID_ERROR, f"read failed: {type(exc).__name__}")
        result = deidentify_instance(data, ctx)
        if result.reason is not None or not result.data:
            _discard(store, written)
            return _quarantined(row, result.reason or Reason.DEID_ERROR, result.detail)
        key = instance_key(patient, study, series, index)
        try:
            if store.write_bytes(key, result.data):
                written.append(key)
        except Exception as exc:
            _discard(store, written)
            return _quarantined(row, Reason.DEID_ERROR, f"write failed: {type(exc).__name__}")
        outputs.append(key)
        content.update(hashlib.sha256(result.data).digest())
        if result.references:
            referenced |= _referenced_series(result.dataset, series)
        if index == 1:
            _describe(row, result.dataset, job, options, result.age)
    row["n_instances"] = len(outputs)
    row["paths"] = outputs
    row["referenced_series"] = sorted(referenced)
    audit = tuple(sorted((a, b, n) for (a, b), n in ctx.audit.items()))
    return UnitOutcome(
        UnitResult(key=series, status=Status.OK, outputs=tuple(outputs), computed=bool(written)),
        row=row,
        audit=audit,
        written=len(written),
        content=content.hexdigest(),
    )


def read_bounded(fs: Any, path: str, limit: int) -> bytes:
    """Read a whole file, never more than ``limit`` bytes into memory.

    Raises
    ------
    TooLarge
        When the file holds more than ``limit`` bytes.
    """
    with fs.open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"source file over {limit // MEGABYTE} MiB")
    return data


def _rtstruct_frame(ds: Dataset) -> str:
    for item in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
        uid = item.get("FrameOfReferenceUID")
        if uid:
            return str(uid)
    return ""


def _discard(store: SiteStore, keys: list[str]) -> None:
    """Remove what this attempt wrote, so a failed series leaves no partial output."""
    for key in keys:
        store.remove(key)


def _quarantined(row: dict[str, Any], reason: Reason, detail: str) -> UnitOutcome:
    row = {**row, "status": str(Status.QUARANTINED), "reason": str(reason), "paths": []}
    return UnitOutcome(
        UnitResult(row["series"], Status.QUARANTINED, reason=str(reason), detail=detail), row=row
    )


def _deid_run_name() -> str:
    """Task-run name: ``deid-<modality>-<end of the pseudonymous series UID>``."""
    from prefect.runtime import task_run

    parameters = task_run.get_parameters()
    job, label = parameters.get("job"), str(parameters.get("label", ""))
    return "deid-" + task_label(getattr(job, "modality", ""), label)


@task(
    name="deidentify-series",
    task_run_name=_deid_run_name,
    retries=1,
    retry_delay_seconds=2,
    cache_policy=NO_CACHE,
)
def deidentify_series_task(
    job: SeriesJob, label: str, store_url: str, site: str, source_url: str, options: DeidOptions
) -> UnitOutcome:
    """Prefect task: :func:`deidentify_series` on a Dask worker (``label`` = pseudonymous key).

    The outcome's ``cpu_seconds`` is the CPU the unit itself took (what the orchestration
    share of the stage is measured against).
    """
    started = time.process_time()
    outcome = deidentify_series(job, store_url, site, source_url, options)
    return replace(outcome, cpu_seconds=round(time.process_time() - started, 4))


def counter_from(outcomes: list[UnitOutcome]) -> Counter[tuple[str, str]]:
    """Sum the audit counts of several outcomes."""
    total: Counter[tuple[str, str]] = Counter()
    for outcome in outcomes:
        for attribute, action, count in outcome.audit:
            total[(attribute, action)] += count
    return total

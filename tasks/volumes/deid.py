"""De-identify NIfTI/NRRD cases: header-free copies under pseudonymous keys.

For each ``ok`` row of ``catalog/volumes.parquet`` the image and its masks are read with
SimpleITK and written again from their pixels and geometry only, as gzip NRRD (spacing and
origin as exact decimal text): NIfTI ``descrip``, ``aux_file``, ``intent_name``, ``db_name`` and
NRRD key/value fields are dropped, and file names are never reused. Keys::

    deid/volumes/<series>/image.nrrd
    deid/volumes/<series>/mask-<n>.nrrd      one 0/1 mask per ROI (a label of a mask file)

``<series>`` is a pseudonymous UID (HMAC of the volume's private key); the patient pseudonym is
the HMAC of the CSV's ``Patient`` (or of the volume's key when there is none), made exactly as
for DICOM PatientIDs, so a patient keeps one pseudonym across DICOM and NIfTI. Rows in
``deid/series.parquet``: the image (kind ``volume``) and one per ROI (kind ``label``, its name in
``rois``, the image in ``referenced_series``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.deid.pseudonyms import SiteKeys
from tasks.records import Kind, QuarantineRecord, Reason, Stage, Status, UnitOutcome, UnitResult
from tasks.store import SiteStore, open_url
from tasks.volumes.cases import CATALOG_VOLUMES
from tasks.volumes.images import clean_copy, nrrd_bytes, read_image_bytes, volume_suffix

DEID_VOLUMES = "deid/volumes"


@dataclass(frozen=True)
class VolumeJob:
    """One catalogued volume to de-identify (private: locations and the patient ID)."""

    volume_key: str
    image: str
    masks: tuple[str, ...]
    labels: tuple[int, ...]
    roi_names: tuple[str, ...]
    patient_id: str
    study_id: str
    modality: str


def plan_volume_jobs(store: SiteStore) -> list[VolumeJob]:
    """Return one job per ``ok`` row of ``catalog/volumes.parquet`` (none without the table)."""
    table = store.read_table(CATALOG_VOLUMES)
    if table is None:
        return []
    return [
        VolumeJob(
            volume_key=r["volume_key"],
            image=r["image"],
            masks=tuple(r["masks"] or []),
            labels=tuple(r["labels"] or []),
            roi_names=tuple(r["roi_names"] or []),
            patient_id=r["patient_id"] or "",
            study_id=r["study_id"] or "",
            modality=r["modality"] or "OT",
        )
        for r in sorted(table.to_pylist(), key=lambda r: r["volume_key"])
        if r["status"] == "ok"
    ]


def volume_series_uid(keys: SiteKeys, job: VolumeJob) -> str:
    """Pseudonymous series UID of a volume (HMAC of its private key)."""
    return keys.remap_uid(f"volume.{job.volume_key}")


def _read(location: str) -> tuple[sitk.Image, int]:
    """Read a volume; return it and the number of header metadata fields it carried."""
    fs, path = open_url(location)
    image = read_image_bytes(fs.cat_file(path), volume_suffix(path) or ".nii.gz")
    return image, len(image.GetMetaDataKeys())


class _Rejected(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _scalar_3d(image: sitk.Image, what: str) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise _Rejected(Reason.UNSUPPORTED_IMAGE, f"{what} is not a 3-D scalar volume")


def roi_masks(mask: sitk.Image, label: int, name: str) -> tuple[list[tuple[str, np.ndarray]], str]:
    """Split a label mask into named 0/1 arrays (one per ROI).

    Parameters
    ----------
    mask
        The mask volume.
    label
        The label to use (0: every non-zero label).
    name
        The ROI name from the cases CSV ("" when none).

    Returns
    -------
    tuple
        ``[(roi name, uint8 array)]`` and a problem text when the wanted label has no voxel.
    """
    array = sitk.GetArrayViewFromImage(mask)
    present = [int(v) for v in np.unique(array) if v != 0]
    if label and label not in present:
        listed = ", ".join(map(str, present)) or "none"
        return [], f"label {label} has no voxel (labels present: {listed})"
    wanted = [label] if label else present
    if not wanted:
        return [], "the mask has no labelled voxel"
    out = []
    for value in wanted:
        if name and (label or len(wanted) == 1):
            roi = name
        else:
            roi = f"{name}-{value}" if name else f"label-{value}"
        out.append((roi, (array == value).astype(np.uint8)))
    return out, ""


def deidentify_volume(store: SiteStore, job: VolumeJob, keys: SiteKeys) -> UnitOutcome:
    """Write a volume and its ROI masks under pseudonymous keys, without any header text.

    Returns
    -------
    UnitOutcome
        ``ok`` with the rows and keys, or ``quarantined`` (unreadable, gone since ingest, or
        not a 3-D scalar image); a mask that cannot be used is a quarantine record of its own.
    """
    series = volume_series_uid(keys, job)
    patient_source = job.patient_id or f"volume.{job.volume_key}"
    patient = keys.patient_pseudonym(patient_source)
    study = keys.remap_uid(f"study.{patient_source}.{job.study_id}")
    frame = keys.remap_uid(f"frame.{job.volume_key}")
    base = f"{DEID_VOLUMES}/{series}"
    try:
        try:
            image, fields = _read(job.image)
        except RuntimeError:
            raise _Rejected(
                Reason.UNREADABLE_HEADER, "image cannot be read as NIfTI/NRRD"
            ) from None
        except FileNotFoundError:  # gone since ingest
            raise _Rejected(Reason.MISSING_FILE, "image file not found") from None
        _scalar_3d(image, "image")
    except _Rejected as exc:
        return UnitOutcome(
            UnitResult(series, Status.QUARANTINED, reason=str(exc.reason), detail=exc.detail)
        )
    outputs = {f"{base}/image.nrrd": nrrd_bytes(clean_copy(image))}
    dropped = fields
    problems: list[QuarantineRecord] = []
    rois: list[tuple[str, str]] = []
    cache: dict[str, sitk.Image] = {}
    for index, (location, label, name) in enumerate(
        zip(job.masks, job.labels, job.roi_names, strict=True), start=1
    ):
        item = f"{series}/mask-{index}"
        try:
            if location not in cache:
                try:
                    cache[location], count = _read(location)
                except RuntimeError:
                    raise _Rejected(Reason.UNREADABLE_HEADER, "mask cannot be read") from None
                except FileNotFoundError:
                    raise _Rejected(Reason.MISSING_FILE, "mask file not found") from None
                dropped += count
            mask = cache[location]
            _scalar_3d(mask, "mask")
            found, problem = roi_masks(mask, label, name)
            if problem:
                raise _Rejected(Reason.EMPTY_MASK, problem)
        except _Rejected as exc:
            problems.append(
                QuarantineRecord(item, Kind.MASK, Stage.DEIDENTIFY, exc.reason, exc.detail)
            )
            continue
        for roi, array in found:
            key = f"{base}/mask-{len(rois) + 1}.nrrd"
            outputs[key] = nrrd_bytes(clean_copy(mask, array))
            rois.append((roi, key))
    written = sum(store.write_bytes(k, v) for k, v in outputs.items())
    common = {
        "study": study,
        "patient": patient,
        "frame_of_reference": frame,
        "body_part": None,
        "manufacturer": None,
        "sex": None,
        "acquisition_date": None,
        "age_at_study": None,
        "n_instances": 1,
        "status": "ok",
        "reason": "",
    }
    rows = [
        {
            **common,
            "series": series,
            "modality": job.modality,
            "kind": "volume",
            "paths": [f"{base}/image.nrrd"],
            "referenced_series": [],
            "rois": [],
        }
    ]
    for roi, key in rois:
        rows.append(
            {
                **common,
                "series": keys.remap_uid(f"label.{job.volume_key}.{key}"),
                "modality": "SEG",
                "kind": "label",
                "paths": [key],
                "referenced_series": [series],
                "rois": [roi],
            }
        )
    audit = (
        ("PatientID", "replace", 1),
        ("file-name", "replace", len(outputs)),
        ("header-field", "remove", dropped),
    )
    return UnitOutcome(
        UnitResult(series, Status.OK, outputs=tuple(sorted(outputs)), computed=written > 0),
        row=rows[0],
        quarantine=tuple(problems),
        derived_rows=tuple(rows[1:]),
        audit=audit,
        written=written,
    )


@task(
    name="deidentify-volume",
    task_run_name="deidentify-volume-{label}",
    retries=2,
    retry_delay_seconds=2,
    cache_policy=NO_CACHE,
)
def deidentify_volume_task(job: VolumeJob, label: str, store_url: str, site: str) -> UnitOutcome:
    """Prefect task: de-identify one volume (``label``: its pseudonymous series UID)."""
    from tasks.deid.secret import load_site_secret

    keys = SiteKeys.derive(load_site_secret(site), site)
    return deidentify_volume(SiteStore(store_url, site), job, keys)


def volume_records(outcomes: list[UnitOutcome]) -> list[QuarantineRecord]:
    """Quarantine rows of the volumes: whole volumes that failed or were rejected, and masks."""
    records = []
    for outcome in outcomes:
        if outcome.result.status in (Status.QUARANTINED, Status.FAILED):
            records.append(
                QuarantineRecord(
                    item=outcome.result.key,
                    kind=Kind.VOLUME,
                    stage=Stage.DEIDENTIFY,
                    reason=Reason(outcome.result.reason or str(Reason.DEID_ERROR)),
                    detail=outcome.result.detail or outcome.result.error_class,
                )
            )
        records.extend(outcome.quarantine)
    return records

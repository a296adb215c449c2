"""The per-series unit of work: one image series and its segmentations to ``harmonised/``.

The series is read from the site store, harmonised and written to ``harmonised/<series>/``.

Outputs are keyed by content: the SHA-256 of every input file, the settings hash and the code
version form a key recorded in ``provenance.json``, which is written last. When the recorded
key equals the current one the series is skipped and nothing is written.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

import pydicom
import SimpleITK as sitk
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.harmonise.config import HarmoniseConfig
from tasks.harmonise.intensity import IntensityResult, harmonise_intensity
from tasks.harmonise.masks import (
    Mask,
    MaskProblem,
    MaskSet,
    nifti_mask,
    rtstruct_masks,
    seg_masks,
    unique_rois,
)
from tasks.harmonise.provenance import Step, code_version, content_key, provenance_json
from tasks.harmonise.qc import qc_png
from tasks.harmonise.quarantine import Quarantined
from tasks.harmonise.volume import read_volume, read_volume_file, resample_to_spacing
from tasks.names import task_label
from tasks.records import Kind, QuarantineRecord, Reason, Stage, Status, UnitOutcome, UnitResult
from tasks.store import HARMONISED, SiteStore, sha256_bytes

#: EUCAIM minimum-set columns copied from ``deid/series.parquet``.
META_COLUMNS = (
    "study",
    "patient",
    "modality",
    "body_part",
    "manufacturer",
    "acquisition_date",
    "age_at_study",
    "sex",
)
PROVENANCE = "provenance.json"
KIND_PREFERENCE = {"seg": 0, "rtstruct": 1, "nifti": 2}


@dataclass(frozen=True)
class SegmentationRef:
    """A segmentation object of an image series.

    Parameters
    ----------
    series
        Pseudonymous series key of the segmentation (or a label for NIfTI masks).
    kind
        ``rtstruct``, ``seg`` or ``nifti``.
    keys
        Store keys of its files.
    roi
        ROI name of a NIfTI mask (NIfTI carries none).
    """

    series: str
    kind: str
    keys: tuple[str, ...]
    roi: str = ""


@dataclass(frozen=True)
class SeriesUnit:
    """One image series to harmonise (what a task receives: keys, never data).

    Parameters
    ----------
    series
        Pseudonymous series key.
    keys
        Store keys of the instances.
    segmentations
        Its segmentation objects.
    meta
        EUCAIM minimum-set values from ``deid/series.parquet``.
    kind
        ``image``/``multiframe`` (DICOM instances) or ``volume`` (one NIfTI/NRRD file).
    """

    series: str
    keys: tuple[str, ...]
    segmentations: tuple[SegmentationRef, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)
    kind: str = "image"

    @property
    def label(self) -> str:
        """Readable task-name label: modality and the end of the pseudonymous key.

        For example ``CT-890675`` (the key is a keyed pseudonym, never derived from an
        original UID by a plain hash, so its tail identifies no one).
        """
        return task_label(self.meta.get("modality", ""), self.series)


def output_dir(series: str) -> str:
    """Return the store key of a series' output folder."""
    return f"{HARMONISED}/{series}"


def nifti_bytes(image: sitk.Image) -> bytes:
    """Encode an image as ``.nii.gz`` bytes, deterministically (gzip header time 0).

    SimpleITK writes an uncompressed NIfTI to a temporary file; it is compressed here so the
    gzip header carries no timestamp.
    """
    fd, path = tempfile.mkstemp(suffix=".nii")
    os.close(fd)
    try:
        sitk.WriteImage(image, path, useCompression=False)
        with open(path, "rb") as fh:
            raw = fh.read()
    finally:
        os.unlink(path)
    return gzip.compress(raw, compresslevel=6, mtime=0)


def series_row(unit: SeriesUnit, status: Status, reason: str = "", **values: Any) -> dict[str, Any]:
    """Return the ``harmonised/series.parquet`` row of a unit (empty outputs by default)."""
    row: dict[str, Any] = {"series": unit.series}
    row.update({c: unit.meta.get(c) for c in META_COLUMNS})
    row.update(
        image=None,
        image_sha256=None,
        size=None,
        spacing=None,
        rois=[],
        masks=[],
        mask_sha256=[],
        intensity=None,
        status=str(status),
        reason=reason,
    )
    row.update(values)
    return row


def _mask_record(series: str, problem: MaskProblem) -> QuarantineRecord:
    return QuarantineRecord(
        item=f"{series}/{problem.roi}",
        kind=Kind.MASK,
        stage=Stage.HARMONISE,
        reason=problem.reason,
        detail=problem.detail,
    )


def _read_all(store: SiteStore, keys: list[str]) -> dict[str, bytes]:
    """Read many objects at once (concurrent on object stores)."""
    got = store.read_many(keys)
    missing = [k for k in keys if k not in got]
    if missing:
        raise FileNotFoundError(missing[0])
    return got


def _existing(store: SiteStore, series: str, key: str) -> dict[str, Any] | None:
    """Return the provenance document of a series when its content key equals ``key``."""
    prov_key = f"{output_dir(series)}/{PROVENANCE}"
    try:
        doc = json.loads(store.read_bytes(prov_key))
    except (FileNotFoundError, ValueError):
        return None
    if doc.get("key") != key:
        return None
    # Every recorded output must still be there (a deleted file means: compute again).
    names = {k.rsplit("/", 1)[1] for k in doc.get("outputs", {}).get("keys", [])}
    present = {k.rsplit("/", 1)[1] for k in store.children(output_dir(series))}
    return doc if names <= present else None


def _clear(store: SiteStore, series: str) -> None:
    """Remove a series' outputs (before rewriting them or when it is quarantined)."""
    store.remove(output_dir(series))


def _build_masks(
    unit: SeriesUnit,
    data: dict[str, bytes],
    reference: sitk.Image,
    frame_of_reference: str,
    config: HarmoniseConfig,
    steps: list[Step],
) -> tuple[list[Mask], list[MaskProblem]]:
    masks: list[Mask] = []
    problems: list[MaskProblem] = []
    # SEG first (voxel-exact), then RTSTRUCT, then NIfTI: the first mask of a name is kept.
    refs = sorted(unit.segmentations, key=lambda r: (KIND_PREFERENCE.get(r.kind, 9), r.series))
    for ref in refs:
        hashes = {k: sha256_bytes(data[k]) for k in ref.keys}
        for key in ref.keys:
            try:
                if ref.kind == "rtstruct":
                    try:
                        ds = pydicom.dcmread(io.BytesIO(data[key]))
                    except Exception:
                        raise Quarantined(Reason.UNREADABLE_HEADER, "RTSTRUCT unreadable") from None
                    found = rtstruct_masks(ds, reference, frame_of_reference, config)
                elif ref.kind == "seg":
                    found = seg_masks(data[key], reference, frame_of_reference, config)
                elif ref.kind == "nifti":
                    found = MaskSet(masks=[nifti_mask(data[key], ref.roi, reference, config)])
                else:
                    raise Quarantined(Reason.UNSUPPORTED_IMAGE, f"segmentation kind {ref.kind}")
            except Quarantined as q:
                problems.append(MaskProblem(ref.kind, q.reason, q.detail))
                continue
            masks.extend(found.masks)
            problems.extend(found.problems)
            steps.append(
                Step(
                    name=f"{ref.kind}-masks",
                    parameters={
                        "rois": {m.roi: m.parameters for m in found.masks},
                        "problems": [[p.roi, str(p.reason)] for p in found.problems],
                        "ignored_rois": found.ignored,
                        "roi_map": config.roi_map,
                    },
                    inputs={key: hashes[key]},
                )
            )
    kept, dropped = unique_rois(masks)
    if dropped:
        steps.append(
            Step("select-masks", {"duplicates_dropped": dropped, "kept": [m.roi for m in kept]})
        )
    return kept, problems


def harmonise_series(store: SiteStore, unit: SeriesUnit, config: HarmoniseConfig) -> UnitOutcome:
    """Harmonise one image series and its segmentations into ``harmonised/<series>/``.

    Parameters
    ----------
    store
        The site store (inputs under ``deid/``, outputs under ``harmonised/``).
    unit
        The series: instance keys, segmentation objects and EUCAIM metadata.
    config
        Harmonisation settings.

    Returns
    -------
    UnitOutcome
        Unit result (ok, quarantined with a reason, or failed with an error class), the row of
        ``harmonised/series.parquet`` and quarantine records (the series and/or single masks).
        Bad input never raises; transient store errors (``OSError``) do, so the task retries.
    """
    seg_keys = [k for ref in unit.segmentations for k in ref.keys]
    data = _read_all(store, list(unit.keys) + seg_keys)
    inputs = {k: sha256_bytes(v) for k, v in data.items()}
    config_hash = config.config_hash()
    key = content_key(inputs, config_hash, code_version())
    previous = _existing(store, unit.series, key)
    if previous is not None:
        saved = previous["outputs"]
        records = tuple(
            _mask_record(unit.series, MaskProblem(r, Reason(reason), detail))
            for r, reason, detail in saved.get("mask_problems", [])
        )
        return UnitOutcome(
            UnitResult(unit.series, Status.OK, outputs=tuple(saved["keys"]), computed=False),
            series_row(unit, Status.OK, **saved["row"]),
            records,
        )
    try:
        return _compute(store, unit, config, data, inputs, key)
    except Quarantined as q:
        _clear(store, unit.series)
        record = QuarantineRecord(unit.series, Kind.SERIES, Stage.HARMONISE, q.reason, q.detail)
        return UnitOutcome(
            UnitResult(unit.series, Status.QUARANTINED, reason=str(q.reason), detail=q.detail),
            series_row(unit, Status.QUARANTINED, str(q.reason)),
            (record,),
        )
    except OSError:
        raise
    except Exception as exc:  # unexpected: report, never a traceback in the run
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        return UnitOutcome(
            UnitResult(unit.series, Status.FAILED, error_class=type(exc).__name__, detail=detail),
            series_row(unit, Status.FAILED, type(exc).__name__),
        )


def _compute(
    store: SiteStore,
    unit: SeriesUnit,
    config: HarmoniseConfig,
    data: dict[str, bytes],
    inputs: dict[str, str],
    key: str,
) -> UnitOutcome:
    image_inputs = {k: inputs[k] for k in unit.keys}
    if unit.kind == "volume":
        volume = read_volume_file(data[unit.keys[0]], unit.meta.get("modality") or "OT")
        datasets = [pydicom.Dataset()]  # no DICOM attributes (PET: values kept as given)
    else:
        try:
            datasets = [pydicom.dcmread(io.BytesIO(data[k])) for k in unit.keys]
        except Exception:
            raise Quarantined(Reason.UNREADABLE_HEADER, "an instance cannot be parsed") from None
        volume = read_volume(datasets, config)
    steps = [Step("read-series", volume.parameters, image_inputs)]
    masks, problems = _build_masks(
        unit, data, volume.image, volume.frame_of_reference, config, steps
    )
    image = volume.image
    if config.target_spacing is not None:
        image = resample_to_spacing(image, config.target_spacing, config.image_interpolator)
        kept = []
        for mask in masks:
            resampled = resample_to_spacing(
                mask.image, config.target_spacing, config.mask_interpolator
            )
            if sitk.GetArrayViewFromImage(resampled).any():
                kept.append(Mask(mask.roi, resampled, mask.parameters))
            else:
                problems.append(
                    MaskProblem(mask.roi, Reason.EMPTY_MASK, f"{mask.roi}: empty after resampling")
                )
        masks = kept
        steps.append(
            Step(
                "resample",
                {
                    "spacing": list(config.target_spacing),
                    "image_interpolator": config.image_interpolator,
                    "mask_interpolator": config.mask_interpolator,
                },
            )
        )
    if unit.kind == "volume" and volume.modality == "PT":  # no DICOM attributes for SUV
        intensity = IntensityResult(image, "PT-as-given", {"suv": "not computed: no DICOM"})
    else:
        intensity = harmonise_intensity(image, volume.modality, datasets[0], config)
    image = intensity.image
    steps.append(Step("intensity", {"unit": intensity.intensity, **intensity.parameters}))
    if problems and not masks:
        raise Quarantined(problems[0].reason, problems[0].detail or "no usable mask")

    base = output_dir(unit.series)
    outputs: dict[str, bytes] = {f"{base}/image.nii.gz": nifti_bytes(image)}
    for mask in masks:
        outputs[f"{base}/mask-{mask.roi}.nii.gz"] = nifti_bytes(mask.image)
    outputs[f"{base}/qc.png"] = qc_png(image, masks)
    hashes = {k: sha256_bytes(v) for k, v in outputs.items()}
    mask_keys = [f"{base}/mask-{m.roi}.nii.gz" for m in masks]
    row_values = {
        "image": f"{base}/image.nii.gz",
        "image_sha256": hashes[f"{base}/image.nii.gz"],
        "size": [int(v) for v in image.GetSize()],
        "spacing": [float(v) for v in image.GetSpacing()],
        "rois": [m.roi for m in masks],
        "masks": mask_keys,
        "mask_sha256": [hashes[k] for k in mask_keys],
        "intensity": intensity.intensity,
    }
    prov_key = f"{base}/{PROVENANCE}"
    document = provenance_json(
        series=unit.series,
        key=key,
        config=config.model_dump(mode="json"),
        config_hash=config.config_hash(),
        steps=steps,
        outputs={
            "files": {k.rsplit("/", 1)[1]: v for k, v in sorted(hashes.items())},
            "keys": sorted([*outputs, prov_key]),
            "row": row_values,
            "mask_problems": [[p.roi, str(p.reason), p.detail] for p in problems],
        },
    )
    # Commit: drop the old marker, write the files, remove stale masks, marker last.
    store.prune(
        base, {*outputs, prov_key}, select=lambda k: k.rsplit("/", 1)[1].startswith("mask-")
    )
    store.commit(outputs, prov_key, document)
    records = tuple(_mask_record(unit.series, p) for p in problems)
    return UnitOutcome(
        UnitResult(unit.series, Status.OK, outputs=tuple(sorted([*outputs, prov_key]))),
        series_row(unit, Status.OK, **row_values),
        records,
    )


@task(
    name="harmonise-series",
    task_run_name="harmonise-{unit.label}",
    retries=2,
    retry_delay_seconds=2,
    cache_policy=NO_CACHE,
)
def harmonise_series_task(
    store_url: str, site: str, unit: SeriesUnit, config: HarmoniseConfig
) -> UnitOutcome:
    """Prefect task: harmonise one series on a worker (its native threads pinned by the runtime).

    The outcome's ``cpu_seconds`` is the CPU the unit itself took (process time).
    """
    started = time.process_time()
    outcome = harmonise_series(SiteStore(store_url, site), unit, config)
    return replace(outcome, cpu_seconds=round(time.process_time() - started, 4))

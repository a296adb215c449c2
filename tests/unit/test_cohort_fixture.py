"""A small de-identified site store built directly from the table contract (docs/tables.md).

``build_site`` writes ``deid/series.parquet`` (with tiny real DICOM files under ``deid/dicom``),
``harmonised/series.parquet`` with NIfTI images and masks, and a features table, so cohort and
federation tests do not depend on the upstream stages. The tests in this file check that the
fixture honours the contract.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SegmentationStorage

from tasks.store import SiteStore

PARAMS_HASH = "ab" * 32


@dataclass(frozen=True)
class SeriesSpec:
    """One series of the fixture."""

    modality: str
    body_part: str
    rois: tuple[str, ...]
    date: str = "20210315"
    status: str = "ok"
    patient: int = 0


DEFAULT_SERIES = (
    SeriesSpec("CT", "CHEST", ("gtv", "lung"), "20200110", patient=0),
    SeriesSpec("CT", "CHEST", ("gtv",), "20210520", patient=1),
    SeriesSpec("MR", "BRAIN", ("gtv",), "20220301", patient=2),
    SeriesSpec("PT", "CHEST", (), "20230704", patient=0),
    SeriesSpec("CT", "ABDOMEN", ("liver",), "20190101", status="quarantined", patient=3),
)


def series_uid(site: str, i: int) -> str:
    digest = int(hashlib.sha256(f"{site}-series-{i}".encode()).hexdigest()[:24], 16)
    return f"2.25.{digest}"


def study_uid(site: str, i: int) -> str:
    digest = int(hashlib.sha256(f"{site}-study-{i}".encode()).hexdigest()[:24], 16)
    return f"2.25.{digest}"


def patient_key(site: str, i: int) -> str:
    return hashlib.sha256(f"{site}-patient-{i}".encode()).hexdigest()[:20]


def nifti_bytes(array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> bytes:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.nii.gz"
        sitk.WriteImage(image, str(path), useCompression=True)
        return path.read_bytes()


def dicom_bytes(modality: str, series: str, study: str, index: int, sop_class=CTImageStorage):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = f"{series}.{index + 1}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"{series}.{index + 1}"
    ds.SeriesInstanceUID = series
    ds.StudyInstanceUID = study
    ds.Modality = modality
    ds.PatientIdentityRemoved = "YES"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = (np.arange(16, dtype=np.uint16) + index).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def mrn(site: str, patient: int) -> str:
    """The (private) hospital patient ID of a fixture patient: a canary for leak tests."""
    digits = int(hashlib.sha256(f"{site}-mrn-{patient}".encode()).hexdigest()[:8], 16) % 10**7
    return f"MRN{digits:07d}{patient}"


def catalogue(site: str, series: tuple[SeriesSpec, ...]) -> list[dict]:
    """Private catalogue rows: the identifiers the leak gate searches the published files for."""
    return [
        {
            "path": f"src/{i}/{k}.dcm",
            "status": "ok",
            "patient_id": mrn(site, spec.patient),
            "patient_name": f"Testperson^Canary{spec.patient}x",
            "patient_birth_date": "19600101",
            "accession_number": f"ACC{i:06d}77",
            "sop_instance_uid": f"1.2.826.0.1.3680043.99.{i}.{k}",
            "series_instance_uid": f"1.2.826.0.1.3680043.99.{i}",
            "study_instance_uid": f"1.2.826.0.1.3680043.98.{i}",
        }
        for i, spec in enumerate(series)
        for k in range(2)
    ]


def build_site(
    url: str,
    site: str = "site-a",
    series: tuple[SeriesSpec, ...] = DEFAULT_SERIES,
    seed: int = 0,
    with_seg: bool = True,
) -> SiteStore:
    """Write a de-identified site store following docs/tables.md and return it."""
    store = SiteStore(url, site)
    rng = np.random.default_rng(seed)
    harmonised, deid, features = [], [], []
    for i, spec in enumerate(series):
        uid, study = series_uid(site, i), study_uid(site, i)
        patient = patient_key(site, spec.patient)
        image = rng.integers(0, 500, size=(4, 6, 6)).astype(np.int16)
        image_key = f"harmonised/{uid}/image.nii.gz"
        image_data = nifti_bytes(image)
        store.write_bytes(image_key, image_data)
        masks, mask_sha = [], []
        for j, roi in enumerate(spec.rois):
            mask = np.zeros((4, 6, 6), np.uint8)
            mask[1:3, j : j + 3, 1:4] = 1
            key = f"harmonised/{uid}/mask-{roi}.nii.gz"
            data = nifti_bytes(mask)
            store.write_bytes(key, data)
            masks.append(key)
            mask_sha.append(hashlib.sha256(data).hexdigest())
            features.append(
                {
                    "site": site,
                    "patient": patient,
                    "study": study,
                    "series": uid,
                    "modality": spec.modality,
                    "roi": roi,
                    "params_hash": PARAMS_HASH,
                    "status": spec.status,
                    "reason": "",
                    "detail": "",
                    "original_firstorder_Mean": float(image[mask > 0].mean()),
                    "original_shape_VoxelVolume": float(mask.sum() * 2.0),
                    "wavelet-LLH_glcm_Contrast": float(rng.normal(5, 1)),
                    "diagnostics_Image-original_Hash": "deadbeef",
                    "patient_id": "SHOULD-NOT-BE-PUBLISHED",
                    "prov_pyradiomics_version": "3.0.1",
                }
            )
        harmonised.append(
            {
                "series": uid,
                "study": study,
                "patient": patient,
                "modality": spec.modality,
                "body_part": spec.body_part,
                "manufacturer": "ACME",
                "acquisition_date": spec.date,
                "age_at_study": f"{50 + i:03d}Y",
                "sex": "F" if i % 2 else "M",
                "image": image_key,
                "image_sha256": hashlib.sha256(image_data).hexdigest(),
                "size": [6, 6, 4],
                "spacing": [1.0, 1.0, 2.0],
                "rois": list(spec.rois),
                "masks": masks,
                "mask_sha256": mask_sha,
                "intensity": "HU" if spec.modality == "CT" else "MR-none",
                "status": spec.status,
                "reason": "" if spec.status == "ok" else "gantry-tilt",
            }
        )
        paths = []
        for k in range(2):
            key = f"deid/dicom/{uid}/{k:04d}.dcm"
            store.write_bytes(key, dicom_bytes(spec.modality, uid, study, k))
            paths.append(key)
        deid.append(
            {
                "series": uid,
                "study": study,
                "patient": patient,
                "frame_of_reference": f"{uid}.9",
                "modality": spec.modality,
                "kind": "image",
                "body_part": spec.body_part,
                "manufacturer": "ACME",
                "sex": "F" if i % 2 else "M",
                "acquisition_date": spec.date,
                "age_at_study": f"{50 + i:03d}Y",
                "n_instances": 2,
                "paths": paths,
                "referenced_series": [],
                "status": "ok",
                "reason": "",
            }
        )
        if with_seg and spec.rois:
            seg_uid = series_uid(site, 100 + i)
            key = f"deid/dicom/{seg_uid}/0000.dcm"
            store.write_bytes(key, dicom_bytes("SEG", seg_uid, study, 0, SegmentationStorage))
            deid.append(
                {
                    **deid[-1],
                    "series": seg_uid,
                    "modality": "SEG",
                    "kind": "seg",
                    "n_instances": 1,
                    "paths": [key],
                    "referenced_series": [uid],
                }
            )
    store.write_table("catalog/instances.parquet", pa.Table.from_pylist(catalogue(site, series)))
    store.write_table("harmonised/series.parquet", pa.Table.from_pylist(harmonised))
    store.write_table("deid/series.parquet", pa.Table.from_pylist(deid))
    store.write_table(
        f"features/{PARAMS_HASH}.parquet",
        pa.Table.from_pylist(features),
        metadata={"oncoflow.params_hash": PARAMS_HASH},
    )
    return store


def test_fixture_follows_the_table_contract(tmp_path: Path) -> None:
    store = build_site(str(tmp_path / "store"))
    harmonised = store.read_table("harmonised/series.parquet")
    for column in ("series", "study", "patient", "image", "image_sha256", "rois", "masks"):
        assert column in harmonised.column_names
    row = harmonised.to_pylist()[0]
    data = store.read_bytes(row["image"])
    assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
    image = sitk.ReadImage(str(tmp_path / "store" / "site-a" / row["image"]))
    assert image.GetSize() == (6, 6, 4)
    deid = store.read_table("deid/series.parquet").to_pylist()
    seg = [r for r in deid if r["kind"] == "seg"]
    assert seg and seg[0]["referenced_series"] == [row["series"]]
    ds = pydicom.dcmread(io.BytesIO(store.read_bytes(seg[0]["paths"][0])))
    assert ds.Modality == "SEG"

"""Small real DICOM files written with pydicom, for the ingest tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def ct_dataset(
    *,
    series_uid: str,
    study_uid: str,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    orientation: Sequence[float] = AXIAL,
    instance_number: int = 1,
    sop_uid: str | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    rows: int = 8,
    columns: int = 8,
    pixel_spacing: Sequence[float] = (0.5, 0.5),
    patient_name: str = "Doe^Jane",
    patient_id: str = "PID-0001",
    charset: str | None = None,
) -> Dataset:
    """A small CT image dataset with native 16-bit pixel data."""
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame-of-reference"])
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.PatientAge = "063Y"
    ds.StudyDate = "20200101"
    ds.StudyTime = "101010"
    ds.SeriesDate = "20200101"
    ds.SeriesTime = "101500"
    ds.AcquisitionTime = "101501"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "Scanner 1"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = "thorax"
    ds.ImageType = list(image_type)
    ds.SeriesNumber = 3
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 2.5
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.BurnedInAnnotation = "NO"
    pixels = np.arange(rows * columns, dtype=np.uint16) * 7 + instance_number
    ds.PixelData = pixels.tobytes()
    return ds


def write(ds: Dataset, path: Path, *, rle: bool = False, implicit: bool = False) -> Path:
    """Write ``ds`` as a PS3.10 file (optionally RLE-compressed or implicit VR)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if rle:
        ds.compress(RLELossless)
    if implicit:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path,
    n: int,
    *,
    spacing: float = 2.5,
    offsets: Sequence[float] | None = None,
    orientation: Sequence[float] = AXIAL,
    series_uid: str | None = None,
    study_uid: str | None = None,
    reverse_numbers: bool = False,
) -> list[Path]:
    """Write an image series of ``n`` slices along the normal of ``orientation``."""
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    row = np.asarray(orientation[:3])
    col = np.asarray(orientation[3:])
    normal = np.cross(row, col)
    offsets = list(offsets) if offsets is not None else [i * spacing for i in range(n)]
    paths = []
    for i, offset in enumerate(offsets):
        number = len(offsets) - i if reverse_numbers else i + 1
        position = (np.array([-10.0, -20.0, 30.0]) + offset * normal).round(6)
        ds = ct_dataset(
            series_uid=series_uid,
            study_uid=study_uid,
            position=position.tolist(),
            orientation=orientation,
            instance_number=number,
        )
        paths.append(write(ds, folder / f"IM{i + 1:04d}.dcm"))
    return paths

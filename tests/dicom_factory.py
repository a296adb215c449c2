"""The tests' one DICOM factory, built on tasks/synthetic's dataset, UID and decimal helpers.

* :func:`ct_dataset`, :func:`write`, :func:`write_series`: small CT files for the ingest,
  header and catalogue tests (native 16-bit pixels, optional RLE or implicit VR).
* :func:`make_ct_study`: a tiny CT study as DICOM bytes, for the PACS tests and benchmark.
* :class:`Geometry`, :func:`image_series`, :func:`enhanced_ct`, :func:`add_pet`,
  :func:`rtstruct`, :func:`segmentation` (highdicom): images and masks from an explicit
  geometry, so harmonisation and radiomics tests know the physical position of every voxel.
* :func:`deid_store`: a de-identified store (``deid/dicom`` + ``deid/series.parquet``) as the
  deidentify stage writes it.

Datasets start from :func:`tasks.synthetic.dicom_images.new_dataset`, UIDs come from
:func:`tasks.synthetic.dicom_images.make_uid` and decimal strings from
:func:`tasks.synthetic.phantoms.ds_str`, as in the synthetic cohort; the privacy canaries
(tests/canaries.py) build their files on the same helpers.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    RLELossless,
    RTStructureSetStorage,
    generate_uid,
)

from tasks.synthetic.dicom_derived import image_ref
from tasks.synthetic.dicom_images import SOP_CLASSES, make_uid, new_dataset
from tasks.synthetic.phantoms import ds_str as synthetic_ds_str

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def uid(*parts: object) -> str:
    """A deterministic UID from parts (pydicom's root, as the synthetic cohort's)."""
    return make_uid(*parts)


def ds_str(value: float) -> str:
    """A DS string with up to 6 decimals (exact geometry for the harmonisation tests)."""
    return synthetic_ds_str(value, decimals=6)


def to_bytes(ds: Dataset) -> bytes:
    """Encode a dataset as a DICOM file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- Small CT files (ingest, headers, catalogue, fuzzing).


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
    ds = new_dataset(CTImageStorage, sop_uid, charset=charset)
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


# --- Tiny CT studies as bytes (PACS tests and benchmark).


@dataclass(frozen=True)
class SyntheticStudy:
    """UIDs of one synthetic study (test data only)."""

    patient_id: str
    study_uid: str
    series_uids: tuple[str, ...]
    sop_uids: tuple[str, ...]
    files: tuple[bytes, ...] = field(repr=False)


def make_ct_study(
    patient_id: str,
    *,
    n_series: int = 1,
    n_slices: int = 3,
    size: int = 16,
    study_date: dt.date | None = None,
    seed: int = 0,
) -> SyntheticStudy:
    """A tiny CT study (``n_series`` axial series of ``n_slices`` slices) as DICOM bytes.

    Each file is a :func:`ct_dataset` with consistent geometry and random signed pixels, so the
    normal ingest catalogues its series as ``ok``.
    """
    rng = np.random.default_rng(seed)
    study_uid = generate_uid()
    date = (study_date or dt.date.today()).strftime("%Y%m%d")
    files: list[bytes] = []
    series_uids: list[str] = []
    sop_uids: list[str] = []
    for s in range(n_series):
        series_uid = generate_uid()
        series_uids.append(series_uid)
        for i in range(n_slices):
            ds = ct_dataset(
                series_uid=series_uid,
                study_uid=study_uid,
                position=(0.0, 0.0, float(i) * 2.5),
                instance_number=i + 1,
                rows=size,
                columns=size,
                pixel_spacing=(0.8, 0.8),
                patient_name=f"Test^{patient_id}",
                patient_id=patient_id,
            )
            sop_uids.append(ds.SOPInstanceUID)
            ds.StudyDate = ds.SeriesDate = date
            ds.StudyTime = "120000"
            ds.AccessionNumber = f"A{seed:05d}"
            ds.StudyID = "1"
            ds.SeriesNumber = s + 1
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = 0
            ds.PixelData = rng.integers(-1000, 1000, (size, size), dtype=np.int16).tobytes()
            files.append(to_bytes(ds))
    return SyntheticStudy(patient_id, study_uid, tuple(series_uids), tuple(sop_uids), tuple(files))


# --- Images and masks from an explicit geometry (harmonisation, radiomics, reports).


@dataclass(frozen=True)
class Geometry:
    """An image grid: direction columns (row dir, col dir, normal), spacing (x, y, z), origin."""

    size: tuple[int, int, int]  # x (columns), y (rows), z (planes)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)

    @property
    def matrix(self) -> np.ndarray:
        return np.array(self.direction, dtype=float).reshape(3, 3)

    def position(self, k: int) -> np.ndarray:
        return np.array(self.origin) + self.matrix[:, 2] * self.spacing[2] * k

    def physical(self, ijk: np.ndarray) -> np.ndarray:
        """Physical points of (..., 3) continuous indices (x, y, z)."""
        return np.array(self.origin) + (np.asarray(ijk) * np.array(self.spacing)) @ self.matrix.T

    def points(self) -> np.ndarray:
        """Physical points of all voxel centres, shape (z, y, x, 3)."""
        nx, ny, nz = self.size
        k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
        return self.physical(np.stack([i, j, k], axis=-1).astype(float))


def oblique_direction(angle_deg: float = 20.0, axis: Sequence[float] = (1, 2, 3)) -> tuple:
    """A rotation matrix (row-major tuple) of ``angle_deg`` about ``axis``."""
    a = np.array(axis, dtype=float)
    a /= np.linalg.norm(a)
    t = np.radians(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    r = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)
    return tuple(float(v) for v in r.ravel())


def _base(sop_class: str, sop_uid: str, modality: str) -> Dataset:
    ds = new_dataset(sop_class, sop_uid, charset=None)
    ds.Modality = modality
    ds.PatientID = "P-0001"
    ds.PatientName = "Pseudo^One"
    ds.PatientSex = "F"
    ds.PatientBirthDate = ""
    ds.StudyDate = "20200101"
    ds.StudyTime = "100000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "Synthetic"
    return ds


def image_series(
    values: np.ndarray,
    geometry: Geometry,
    *,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    shear: Sequence[float] = (0.0, 0.0, 0.0),
    series_key: str = "s1",
    frame_of_reference: str | None = None,
    dtype: type = np.int16,
) -> list[Dataset]:
    """Single-frame instances of a volume ``values`` (z, y, x) given in real-world units.

    Stored values are ``round((values - intercept) / slope)``. ``shear`` shifts plane ``k`` by
    ``shear * k * spacing_z`` (gantry tilt). InstanceNumber follows the plane index.
    """
    nz, ny, nx = values.shape
    assert (nx, ny, nz) == geometry.size
    stored = np.rint((values - intercept) / slope).astype(dtype)
    m = geometry.matrix
    series_uid = uid(series_key, "series")
    out = []
    for k in range(nz):
        sop = uid(series_key, k)
        ds = _base(SOP_CLASSES[modality], sop, modality)
        ds.StudyInstanceUID = uid(series_key, "study")
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference or uid(series_key, "for")
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        pos = geometry.position(k) + np.array(shear) * geometry.spacing[2] * k
        ds.ImagePositionPatient = [ds_str(v) for v in pos]
        ds.ImageOrientationPatient = [ds_str(v) for v in (*m[:, 0], *m[:, 1])]
        ds.PixelSpacing = [ds_str(geometry.spacing[1]), ds_str(geometry.spacing[0])]
        ds.SliceThickness = ds_str(geometry.spacing[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if np.issubdtype(dtype, np.signedinteger) else 0
        ds.RescaleSlope = ds_str(slope) if modality != "PT" else f"{slope:.8g}"
        ds.RescaleIntercept = ds_str(intercept)
        ds.PixelData = stored[k].tobytes()
        out.append(ds)
    return out


def enhanced_ct(
    values: np.ndarray,
    geometry: Geometry,
    *,
    slopes: Sequence[float] | None = None,
    intercept: float = -1024.0,
    series_key: str = "mf",
) -> Dataset:
    """An enhanced CT multiframe instance with per-frame positions and per-frame rescale."""
    nz, ny, nx = values.shape
    slopes = list(slopes) if slopes is not None else [1.0] * nz
    m = geometry.matrix
    sop = uid(series_key, "mf")
    ds = _base(EnhancedCTImageStorage, sop, "CT")
    ds.StudyInstanceUID = uid(series_key, "study")
    ds.SeriesInstanceUID = uid(series_key, "series")
    ds.FrameOfReferenceUID = uid(series_key, "for")
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.NumberOfFrames = nz
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [ds_str(v) for v in (*m[:, 0], *m[:, 1])]
    shared.PlaneOrientationSequence = DicomSequence([orient])
    measures = Dataset()
    measures.PixelSpacing = [ds_str(geometry.spacing[1]), ds_str(geometry.spacing[0])]
    measures.SliceThickness = ds_str(geometry.spacing[2])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    stored = np.empty(values.shape, dtype=np.int16)
    # Frames are written in reverse spatial order to exercise sorting.
    for f, k in enumerate(reversed(range(nz))):
        group = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [ds_str(v) for v in geometry.position(k)]
        group.PlanePositionSequence = DicomSequence([pos])
        trans = Dataset()
        trans.RescaleSlope = ds_str(slopes[k])
        trans.RescaleIntercept = ds_str(intercept)
        trans.RescaleType = "HU"
        group.PixelValueTransformationSequence = DicomSequence([trans])
        frames.append(group)
        stored[f] = np.rint((values[k] - intercept) / slopes[k]).astype(np.int16)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = stored.tobytes()
    return ds


def add_pet(
    datasets: list[Dataset],
    *,
    weight_kg: float | None = 75.0,
    dose_bq: float | None = 370e6,
    half_life_s: float = 6586.2,
    injection: str = "20200101093000",
    series_time: str = "103000",
    units: str = "BQML",
    decay_correction: str = "START",
) -> list[Dataset]:
    """Add the PET attributes SUVbw needs (pass None to leave one out)."""
    for ds in datasets:
        ds.SeriesDate = injection[:8]
        ds.SeriesTime = series_time
        ds.AcquisitionDate = injection[:8]
        ds.AcquisitionTime = series_time
        ds.Units = units
        ds.DecayCorrection = decay_correction
        ds.CorrectedImage = ["DECY", "ATTN"]
        if weight_kg is not None:
            ds.PatientWeight = ds_str(weight_kg)
        info = Dataset()
        info.RadiopharmaceuticalStartDateTime = injection
        info.RadiopharmaceuticalStartTime = injection[8:]
        if dose_bq is not None:
            info.RadionuclideTotalDose = ds_str(dose_bq)
        info.RadionuclideHalfLife = ds_str(half_life_s)
        ds.RadiopharmaceuticalInformationSequence = DicomSequence([info])
    return datasets


def sphere_contours(
    geometry: Geometry, centre: Sequence[float], radius: float, n_points: int = 128
) -> list[np.ndarray]:
    """Closed planar contours of a sphere on each image plane it crosses (physical mm)."""
    m = geometry.matrix
    row, col, normal = m[:, 0], m[:, 1], m[:, 2]
    c = np.array(centre, dtype=float)
    contours = []
    for k in range(geometry.size[2]):
        plane_point = geometry.position(k)
        h = float((plane_point - c) @ normal)
        if abs(h) >= radius:
            continue
        r = np.sqrt(radius**2 - h**2)
        t = np.linspace(0, 2 * np.pi, n_points, endpoint=False)
        centre_on_plane = c + h * normal
        pts = centre_on_plane + r * (np.outer(np.cos(t), row) + np.outer(np.sin(t), col))
        contours.append(pts)
    return contours


def rtstruct(
    images: Sequence[Dataset],
    rois: dict[str, list[np.ndarray]],
    *,
    frame_of_reference: str | None = None,
    series_key: str = "rt",
) -> Dataset:
    """An RTSTRUCT with CLOSED_PLANAR contours (physical mm) per ROI name."""
    ref = images[0]
    for_uid = frame_of_reference or ref.FrameOfReferenceUID
    sop = uid(series_key, "rt")
    ds = _base(RTStructureSetStorage, sop, "RTSTRUCT")
    ds.StudyInstanceUID = ref.StudyInstanceUID
    ds.SeriesInstanceUID = uid(series_key, "series")
    ds.SeriesNumber = 9
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "RT"
    ds.StructureSetDate = "20200101"
    ds.StructureSetTime = "120000"
    rfor = Dataset()
    rfor.FrameOfReferenceUID = for_uid
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = ref.StudyInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ref.SeriesInstanceUID
    series.ContourImageSequence = DicomSequence([image_ref(im) for im in images])
    study.RTReferencedSeriesSequence = DicomSequence([series])
    rfor.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([rfor])
    set_rois, contours_seq, observations = [], [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        set_rois.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = [255, 0, 0]
        items = []
        for pts in contours:
            item = Dataset()
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(pts)
            item.ContourData = [ds_str(v) for v in np.asarray(pts).ravel()]
            items.append(item)
        rc.ContourSequence = DicomSequence(items)
        contours_seq.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = "GTV"
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = DicomSequence(set_rois)
    ds.ROIContourSequence = DicomSequence(contours_seq)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds


def segmentation(
    images: Sequence[Dataset], masks: dict[str, np.ndarray], *, series_key: str = "seg"
) -> Dataset:
    """A binary DICOM SEG (highdicom) with one segment per label; masks are (z, y, x) in the
    order of ``images``."""
    descriptions = []
    for number, label in enumerate(masks, start=1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=hd.sr.CodedConcept(
                    "49755003", "SCT", "Morphologically Altered Structure"
                ),
                segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        )
    stack = np.stack([masks[label] for label in masks], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=list(images),
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uid(series_key, "series"),
        series_number=10,
        sop_instance_uid=uid(series_key, "sop"),
        instance_number=1,
        manufacturer="Synthetic",
        manufacturer_model_name="Test",
        software_versions="0",
        device_serial_number="0",
    )
    # highdicom stamps creation date/time: fix them so the file is byte-reproducible.
    for elem in seg.iterall():
        if elem.VR in ("DA", "TM", "DT") and elem.value:
            elem.value = {"DA": "20200101", "TM": "120000", "DT": "20200101120000"}[elem.VR]
        elif elem.keyword == "DimensionOrganizationUID":
            elem.value = uid(series_key, "dimension-organization")
    return seg


# --- A de-identified store (deid/dicom + deid/series.parquet), as the deidentify stage writes it.

DEID_COLUMNS = (
    "series",
    "study",
    "patient",
    "frame_of_reference",
    "modality",
    "kind",
    "body_part",
    "manufacturer",
    "sex",
    "acquisition_date",
    "age_at_study",
    "n_instances",
    "paths",
    "referenced_series",
    "status",
    "reason",
)


def pseudo_uid(*parts: object) -> str:
    """A ``2.25.<int>`` UID like the de-identification stage makes."""
    import hashlib

    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _deidentify(ds: Dataset, patient: str, study: str, series: str, index: int) -> None:
    ds.PatientID = patient
    ds.PatientName = patient
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = pseudo_uid(series, index)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "oncoflow test fixture"


def deid_store(store, cases: dict[str, dict]) -> dict[str, str]:
    """Write de-identified series into ``store`` (a SiteStore) and ``deid/series.parquet``.

    ``cases`` maps a case name to ``{"datasets": [...], "kind": "image", "modality": ...,
    "refs": [case names]}``. UIDs are re-mapped to ``2.25.<int>``; references (SEG source
    images, RTSTRUCT contour images, frame of reference) are kept consistent. Returns case name →
    pseudonymous series key.
    """
    import pyarrow as pa

    keys = {name: pseudo_uid("series", name) for name in cases}
    sop_map: dict[str, str] = {}
    series_map: dict[str, str] = {}
    for name, case in cases.items():
        for i, ds in enumerate(case["datasets"]):
            sop_map[ds.SOPInstanceUID] = pseudo_uid(keys[name], i)
            series_map[ds.SeriesInstanceUID] = keys[name]
    rows = []
    for name, case in cases.items():
        patient = case.get("patient", "PSN-0001")
        study = pseudo_uid("study", patient)
        paths = []
        for i, ds in enumerate(case["datasets"]):
            for elem in ds.iterall():
                if elem.VR == "UI" and isinstance(elem.value, str):
                    if elem.value in sop_map:
                        elem.value = sop_map[elem.value]
                    elif elem.value in series_map:
                        elem.value = series_map[elem.value]
            _deidentify(ds, patient, study, keys[name], i)
            key = f"deid/dicom/{patient}/{keys[name]}/{i:04d}.dcm"
            store.write_bytes(key, to_bytes(ds))
            paths.append(key)
        first = case["datasets"][0]
        rows.append(
            {
                "series": keys[name],
                "study": study,
                "patient": patient,
                "frame_of_reference": str(first.get("FrameOfReferenceUID", "")),
                "modality": case.get("modality", str(first.Modality)),
                "kind": case.get("kind", "image"),
                "body_part": "CHEST",
                "manufacturer": "Synthetic",
                "sex": "F",
                "acquisition_date": "20190312",
                "age_at_study": "061Y",
                "n_instances": len(paths),
                "paths": paths,
                "referenced_series": [keys[r] for r in case.get("refs", [])]
                + list(case.get("raw_refs", [])),
                "status": case.get("status", "ok"),
                "reason": "",
            }
        )
    rows.sort(key=lambda r: r["series"])
    store.write_table("deid/series.parquet", pa.Table.from_pylist(rows))
    return keys

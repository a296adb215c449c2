"""Small DICOM writers for the harmonisation tests: images, PET, enhanced CT, RTSTRUCT, SEG.

Everything is built with pydicom (and highdicom for SEG) from an explicit geometry, so tests
know the exact physical position of every voxel.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    RTStructureSetStorage,
    generate_uid,
)

SOP_CLASS = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "PT": PositronEmissionTomographyImageStorage,
}
ROOT = "1.2.826.0.1.3680043.8.498."


def uid(*parts: object) -> str:
    """A deterministic UID from parts."""
    return generate_uid(prefix=ROOT, entropy_srcs=[str(p) for p in parts])


def ds_str(value: float) -> str:
    """A DS string with up to 6 decimals."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


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
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
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
        ds = _base(SOP_CLASS[modality], sop, modality)
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


def to_bytes(ds: Dataset) -> bytes:
    """Encode a dataset as a DICOM file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


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
    series.ContourImageSequence = DicomSequence([_image_ref(im) for im in images])
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


def _image_ref(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


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

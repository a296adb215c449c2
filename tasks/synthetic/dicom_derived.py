"""Derived objects on a CT series: RT Structure Set (pydicom) and binary DICOM SEG (highdicom)."""

from __future__ import annotations

from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage

from tasks.dicom.uids import replace_generated_uids
from tasks.synthetic.dicom_images import SOFTWARE_VERSION, make_uid, new_dataset
from tasks.synthetic.identifiers import dicom_date, dicom_time
from tasks.synthetic.phantoms import Grid, Lesion, ds_str

STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
COLOURS = (["255", "0", "0"], ["0", "160", "255"])


def image_ref(ds: Dataset) -> Dataset:
    """Return a referenced-image item (SOP Class and Instance UIDs) of ``ds``."""
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return ref


def rtstruct(
    ct_slices: list[Dataset],
    grid: Grid,
    rois: list[tuple[str, Lesion]],
    sop_uid: str,
    series_uid: str,
    series_number: int,
    created: datetime,
    interpreter: str,
) -> tuple[Dataset, dict[str, int]]:
    """Build an RT Structure Set with one closed planar contour per CT slice crossing a lesion.

    Parameters
    ----------
    ct_slices
        CT datasets in grid order (slice ``k`` lies on ``grid.position(k)``).
    grid
        Geometry of the CT.
    rois
        (ROIName, lesion) pairs.
    sop_uid, series_uid, series_number
        Identity of the new instance.
    created
        StructureSetDate/Time.
    interpreter
        ROIInterpreter (a person name: one more planted identifier).

    Returns
    -------
    tuple
        The dataset (without patient/study identity) and the number of contours per ROI.
    """
    ref = ct_slices[0]
    ds = new_dataset(RTStructureSetStorage, sop_uid)
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID = ref.StudyInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.Manufacturer = ref.Manufacturer
    ds.ManufacturerModelName = "Contouring workstation"
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.FrameOfReferenceUID = ref.FrameOfReferenceUID
    ds.StructureSetLabel = "GTV"
    ds.StructureSetName = "Gross tumour volumes"
    ds.StructureSetDate = dicom_date(created)
    ds.StructureSetTime = dicom_time(created)

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = ref.SeriesInstanceUID
    series_ref.ContourImageSequence = Sequence([image_ref(s) for s in ct_slices])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = STUDY_COMPONENT_SOP_CLASS
    study_ref.ReferencedSOPInstanceUID = ref.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    for_ref = Dataset()
    for_ref.FrameOfReferenceUID = ref.FrameOfReferenceUID
    for_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([for_ref])

    roi_items, contour_items, observations, counts = [], [], [], {}
    for number, (name, lesion) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = ref.FrameOfReferenceUID
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        roi_items.append(roi)
        contours = []
        for k, slice_ds in enumerate(ct_slices):
            points = lesion.cross_section(np.array(grid.position(k)), grid.row_dir, grid.col_dir)
            if points is None:
                continue
            contour = Dataset()
            contour.ContourImageSequence = Sequence([image_ref(slice_ds)])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [ds_str(v) for v in points.ravel()]
            contours.append(contour)
        counts[name] = len(contours)
        item = Dataset()
        item.ROIDisplayColor = COLOURS[(number - 1) % len(COLOURS)]
        item.ReferencedROINumber = number
        item.ContourSequence = Sequence(contours)
        contour_items.append(item)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = "GTV"
        obs.ROIInterpreter = interpreter
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(roi_items)
    ds.ROIContourSequence = Sequence(contour_items)
    ds.RTROIObservationsSequence = Sequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    return ds, counts


def _replace_generated_uids(ds: Dataset, uid_parts: tuple[object, ...]) -> None:
    """Replace UIDs highdicom drew at random by deterministic ones (same value, same UID)."""
    replace_generated_uids(ds, lambda n: make_uid(*uid_parts, "hd", n))


def segmentation(
    ct_slices: list[Dataset],
    masks: np.ndarray,
    labels: list[str],
    sop_uid: str,
    series_uid: str,
    series_number: int,
    created: datetime,
    device_serial: str,
    creator: str,
) -> Dataset:
    """Build a BINARY DICOM SEG of the CT with one segment per lesion.

    Parameters
    ----------
    ct_slices
        CT datasets in grid order, matching the first axis of ``masks``.
    masks
        Boolean array (slices, rows, columns, segments).
    labels
        SegmentLabel of each segment (the site's ROI names).
    sop_uid, series_uid, series_number
        Identity of the new instance.
    created
        ContentDate/Time (highdicom would use the wall clock).
    device_serial, creator
        DeviceSerialNumber and ContentCreatorName (planted identifiers).
    """
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, label in enumerate(labels, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=ct_slices,
        pixel_array=masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=ct_slices[0].Manufacturer,
        manufacturer_model_name="Contouring workstation",
        software_versions=SOFTWARE_VERSION,
        device_serial_number=device_serial,
        content_label="GTV",
        content_creator_name=creator,
    )
    _fix_clock_and_uids(seg, sop_uid, created)
    return seg


def _fix_clock_and_uids(ds: Dataset, sop_uid: str, created: datetime) -> None:
    """Overwrite what highdicom takes from the wall clock or draws at random."""
    _replace_generated_uids(ds, (sop_uid,))
    ds.ContentDate = ds.SeriesDate = ds.InstanceCreationDate = dicom_date(created)
    ds.ContentTime = ds.SeriesTime = ds.InstanceCreationTime = dicom_time(created)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S.%f")


def enhanced_mr(
    mr_slices: list[Dataset],
    pixels: np.ndarray,
    sop_uid: str,
    series_uid: str,
    series_number: int,
    created: datetime,
) -> Dataset:
    """Convert single-frame MR slices into one multi-frame instance (highdicom).

    The result is a Legacy Converted Enhanced MR Image: per-frame Plane Position and shared
    Plane Orientation and Pixel Measures functional groups, native pixels.

    Parameters
    ----------
    mr_slices
        MR datasets in grid order; ``pixels`` holds their stored values (slices, rows, columns).
    sop_uid, series_uid, series_number
        Identity of the new instance.
    created
        ContentDate/Time.
    """
    legacy = []
    for ds, frame in zip(mr_slices, pixels, strict=True):
        copy = Dataset()
        copy.update(ds)
        copy.file_meta = FileMetaDataset()
        copy.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if "PixelData" in copy:
            del copy.PixelData
        copy.PixelData = np.ascontiguousarray(frame).tobytes()
        legacy.append(copy)
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    _fix_clock_and_uids(image, sop_uid, created)
    return image

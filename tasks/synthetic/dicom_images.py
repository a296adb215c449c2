"""Single-frame image instances (CT, MR, PET, secondary capture) and the file writer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from tasks.synthetic.phantoms import Grid, ds_str

SOFTWARE_VERSION = "oncoflow-synthetic 1"
F18_HALF_LIFE_S = 6586.2
SOP_CLASSES = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "PT": PositronEmissionTomographyImageStorage,
}


def make_uid(*parts: object) -> str:
    """Deterministic UID from ``parts`` (seed, site, patient, purpose, ...)."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def new_dataset(
    sop_class_uid: str, sop_instance_uid: str, charset: str | None = "ISO_IR 100"
) -> Dataset:
    """Return an empty dataset with SOP common attributes and file meta information.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid
        SOP Class and Instance UIDs (also written in the file meta information).
    charset
        Specific Character Set (None leaves it out: the default repertoire).
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def write_dataset(ds: Dataset, path: Path, transfer_syntax: str, pixels: np.ndarray | None) -> None:
    """Write ``ds`` as a DICOM file in ``transfer_syntax``.

    Parameters
    ----------
    ds
        Dataset with file meta information.
    path
        Target file; parent folders are created.
    transfer_syntax
        Transfer syntax UID. RLE Lossless compresses ``pixels``; Deflated is applied by pydicom.
    pixels
        Pixel array to store (None keeps the dataset's own PixelData, if any).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels is not None and transfer_syntax == RLELossless:
        ds.compress(RLELossless, pixels, generate_instance_uid=False)
    else:
        if pixels is not None:
            ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)


@dataclass(frozen=True)
class SuvParameters:
    """What a reader needs to turn stored PET values into SUVbw."""

    weight_kg: float
    injected_dose_bq: float
    half_life_s: float
    injection: datetime
    series_start: datetime

    @property
    def decay_factor(self) -> float:
        """Fraction of the injected activity left at series start."""
        dt = (self.series_start - self.injection).total_seconds()
        return math.pow(2.0, -dt / self.half_life_s)

    @property
    def suv_scale(self) -> float:
        """SUVbw per Bq/ml: weight [g] / decay-corrected dose [Bq]."""
        return self.weight_kg * 1000.0 / (self.injected_dose_bq * self.decay_factor)


@dataclass
class ImageSeries:
    """Attributes shared by all slices of one image series."""

    modality: str
    grid: Grid
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    series_number: int
    manufacturer: str
    model: str
    patient_position: str
    reverse_instance_numbers: bool = False
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")


def quantise(modality: str, values: np.ndarray, signed: bool) -> tuple[np.ndarray, float, float]:
    """Convert phantom values (HU, MR units, PET Bq/ml) to stored pixels.

    Returns
    -------
    tuple
        (stored array, RescaleSlope, RescaleIntercept). CT: HU = stored - 1024. MR: no rescale.
        PT: Bq/ml = stored * slope, with one slope (6 significant digits) for the series.
    """
    if modality == "CT":
        stored = np.clip(np.rint(values + 1024.0), 0, 4095)
        return stored.astype(np.int16 if signed else np.uint16), 1.0, -1024.0
    if modality == "MR":
        return np.clip(np.rint(values), 0, 4095).astype(np.uint16), 1.0, 0.0
    slope = float(f"{max(float(values.max()), 1.0) / 30000.0:.6g}")
    stored = np.clip(np.rint(values / slope), 0, 32767)
    return stored.astype(np.int16), slope, 0.0


def image_template(spec: ImageSeries, signed: bool, slope: float, intercept: float) -> Dataset:
    """Series-level attributes of a CT, MR or PET slice (identity is applied by the caller)."""
    ds = new_dataset(SOP_CLASSES[spec.modality], "1.2.3")
    ds.ImageType = list(spec.image_type)
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.ManufacturerModelName = spec.model
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.SeriesNumber = spec.series_number
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = spec.patient_position
    ds.BodyPartExamined = "CHEST"
    ds.ImageOrientationPatient = [ds_str(v) for v in spec.grid.orientation]
    ds.PixelSpacing = [ds_str(v) for v in spec.grid.pixel_spacing]
    step = spec.grid.offsets[1] - spec.grid.offsets[0] if spec.grid.slices > 1 else 1.0
    ds.SliceThickness = ds_str(step)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.grid.rows
    ds.Columns = spec.grid.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if spec.modality in ("CT", "MR") and not signed else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = ds_str(intercept)
    ds.RescaleSlope = f"{slope:.6g}" if spec.modality == "PT" else ds_str(slope)
    if spec.modality == "CT":
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.ConvolutionKernel = "B30f"
        ds.WindowCenter, ds.WindowWidth = "-600", "1600"
    elif spec.modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = "3"
        ds.SpacingBetweenSlices = ds_str(step)
        ds.WindowCenter, ds.WindowWidth = "400", "800"
    return ds


def add_pet_attributes(
    ds: Dataset, suv: SuvParameters | None, n_slices: int, weight_kg: float
) -> None:
    """PET Series, PET Isotope and PET Image attributes (isotope omitted when ``suv`` is None)."""
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.Units = "BQML"
    ds.CountsSource = "EMISSION"
    ds.DecayCorrection = "START"
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "CT-based"
    ds.ReconstructionMethod = "OSEM 3i21s"
    ds.NumberOfSlices = n_slices
    ds.FrameReferenceTime = "0"
    ds.ActualFrameDuration = 180000
    ds.DecayFactor = "1"
    ds.PatientWeight = ds_str(weight_kg)
    ds.PatientSize = "1.74"
    if suv is None:
        return
    info = Dataset()
    info.Radiopharmaceutical = "Fluorodeoxyglucose"
    info.RadiopharmaceuticalStartTime = suv.injection.strftime("%H%M%S.%f")
    info.RadiopharmaceuticalStartDateTime = suv.injection.strftime("%Y%m%d%H%M%S.%f")
    info.RadionuclideTotalDose = ds_str(suv.injected_dose_bq)
    info.RadionuclideHalfLife = ds_str(suv.half_life_s)
    info.RadionuclidePositronFraction = "0.9673"
    nuclide = Dataset()
    nuclide.CodeValue, nuclide.CodingSchemeDesignator = "77004003", "SCT"
    nuclide.CodeMeaning = "^18^Fluorine"
    info.RadionuclideCodeSequence = Sequence([nuclide])
    pharm = Dataset()
    pharm.CodeValue, pharm.CodingSchemeDesignator = "35321007", "SCT"
    pharm.CodeMeaning = "Fluorodeoxyglucose F^18^"
    info.RadiopharmaceuticalCodeSequence = Sequence([pharm])
    ds.RadiopharmaceuticalInformationSequence = Sequence([info])


def slice_datasets(
    template: Dataset, spec: ImageSeries, uid_parts: tuple[object, ...]
) -> list[Dataset]:
    """One dataset per slice of ``spec.grid`` (pixels are added when writing).

    Slice ``k`` of the grid gets SOPInstanceUID ``make_uid(*uid_parts, k)``. The slices share
    the template's element objects (copying them dominated the run time), so set per-slice
    values only on elements created per slice.
    """
    out = []
    n = spec.grid.slices
    normal = spec.grid.normal
    shared = Dataset()  # element objects shared by all slices: per-slice ones are added new
    shared.update(template)
    for keyword in ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation"):
        if keyword in shared:
            delattr(shared, keyword)
    for k in range(n):
        ds = Dataset()
        ds.update(shared)
        uid = make_uid(*uid_parts, k)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = template.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = template.file_meta.TransferSyntaxUID
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = n - k if spec.reverse_instance_numbers else k + 1
        pos = spec.grid.position(k)
        ds.ImagePositionPatient = [ds_str(v) for v in pos]
        ds.SliceLocation = ds_str(float(np.dot(pos, normal)))
        if spec.modality == "PT":
            ds.ImageIndex = k + 1
        out.append(ds)
    return out


def burned_in_pixels(lines: list[str], rows: int = 96, columns: int = 192) -> np.ndarray:
    """Return a grey screenshot with ``lines`` of text burned into the pixels (uint8)."""
    image = Image.new("L", (columns, rows), color=20)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=11)
    for i, line in enumerate(lines):
        draw.text((4, 4 + 14 * i), line, fill=235, font=font)
    draw.ellipse((120, 50, 170, 90), outline=180, fill=90)
    return np.asarray(image, dtype=np.uint8)


def secondary_capture(
    study_uid: str, series_uid: str, sop_uid: str, series_number: int, pixels: np.ndarray
) -> Dataset:
    """Return a secondary-capture screenshot declaring BurnedInAnnotation YES."""
    ds = new_dataset(SecondaryCaptureImageStorage, sop_uid)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "YES"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    return ds

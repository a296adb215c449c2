"""Per-site scanner profiles: vendor, geometry, transfer syntaxes, ROI naming, file naming.

Three base profiles differ in every way a multi-site pipeline must absorb. Sites beyond the
third reuse a base profile with shifted pixel spacing, so every site is still distinct.
"""

from __future__ import annotations

from string import ascii_lowercase

from pydantic import BaseModel, ConfigDict
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

AXIAL_HFS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
AXIAL_FFS = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# Rotation about the patient x axis by atan(3/4): exact unit vectors in decimal.
OBLIQUE = (1.0, 0.0, 0.0, 0.0, 0.8, -0.6)


class ScannerProfile(BaseModel):
    """How one site's scanners write DICOM.

    Parameters
    ----------
    site
        Site name (``site-a``, ``site-b``, ...).
    manufacturer, ct_model, mr_model, pet_model
        Equipment module values.
    patient_position
        PatientPosition (HFS, FFS).
    orientation
        ImageOrientationPatient of CT and MR (PET is always axial for the patient position).
    ct_pixel_spacing, mr_pixel_spacing, pet_pixel_spacing
        PixelSpacing as (row spacing, column spacing) in mm.
    ct_slice_spacing, mr_slice_spacing, pet_slice_spacing
        Distance between slice centres in mm (equal to SliceThickness).
    ct_transfer_syntax, mr_transfer_syntax, pet_transfer_syntax
        Transfer syntax UIDs of the image series.
    roi_names
        Names for the first and second lesion (RTSTRUCT ROIName, SEG SegmentLabel).
    file_extension
        Extension of image files (may be empty: PACS exports often have none).
    reverse_instance_numbers
        InstanceNumber runs opposite to the slice normal.
    """

    model_config = ConfigDict(frozen=True)

    site: str
    manufacturer: str
    ct_model: str
    mr_model: str
    pet_model: str
    patient_position: str
    orientation: tuple[float, float, float, float, float, float]
    ct_pixel_spacing: tuple[float, float]
    ct_slice_spacing: float
    ct_slices: int
    mr_pixel_spacing: tuple[float, float]
    mr_slice_spacing: float
    mr_slices: int
    pet_pixel_spacing: tuple[float, float]
    pet_slice_spacing: float
    pet_slices: int
    ct_transfer_syntax: str
    mr_transfer_syntax: str
    pet_transfer_syntax: str
    roi_names: tuple[str, str]
    file_extension: str
    reverse_instance_numbers: bool
    ct_signed: bool

    @property
    def pet_orientation(self) -> tuple[float, float, float, float, float, float]:
        """Axial orientation matching the patient position."""
        return AXIAL_FFS if self.patient_position.startswith("FF") else AXIAL_HFS


_BASE: tuple[dict[str, object], ...] = (
    {
        "manufacturer": "SIEMENS",
        "ct_model": "SOMATOM Definition AS",
        "mr_model": "MAGNETOM Skyra",
        "pet_model": "Biograph mCT",
        "patient_position": "HFS",
        "orientation": AXIAL_HFS,
        "ct_pixel_spacing": (5.5, 5.5),
        "ct_slice_spacing": 5.0,
        "ct_slices": 28,
        "mr_pixel_spacing": (5.5, 5.5),
        "mr_slice_spacing": 6.0,
        "mr_slices": 20,
        "pet_pixel_spacing": (11.0, 11.0),
        "pet_slice_spacing": 7.0,
        "pet_slices": 20,
        "ct_transfer_syntax": ExplicitVRLittleEndian,
        "mr_transfer_syntax": DeflatedExplicitVRLittleEndian,
        "pet_transfer_syntax": ExplicitVRLittleEndian,
        "roi_names": ("GTV-1", "GTV-2"),
        "file_extension": ".dcm",
        "reverse_instance_numbers": False,
        "ct_signed": False,
    },
    {
        "manufacturer": "GE MEDICAL SYSTEMS",
        "ct_model": "Revolution CT",
        "mr_model": "SIGNA Premier",
        "pet_model": "Discovery MI",
        "patient_position": "FFS",
        "orientation": AXIAL_FFS,
        "ct_pixel_spacing": (5.46875, 5.46875),
        "ct_slice_spacing": 5.0,
        "ct_slices": 30,
        "mr_pixel_spacing": (6.0, 6.0),
        "mr_slice_spacing": 6.5,
        "mr_slices": 18,
        "pet_pixel_spacing": (10.9375, 10.9375),
        "pet_slice_spacing": 7.5,
        "pet_slices": 18,
        "ct_transfer_syntax": ImplicitVRLittleEndian,
        "mr_transfer_syntax": ImplicitVRLittleEndian,
        "pet_transfer_syntax": ImplicitVRLittleEndian,
        "roi_names": ("gtv", "gtv_2"),
        "file_extension": "",
        "reverse_instance_numbers": True,
        "ct_signed": True,
    },
    {
        "manufacturer": "Philips",
        "ct_model": "IQon Spectral CT",
        "mr_model": "Ingenia Elition X",
        "pet_model": "Vereos PET/CT",
        "patient_position": "HFS",
        "orientation": OBLIQUE,
        "ct_pixel_spacing": (5.0, 5.0),
        "ct_slice_spacing": 4.0,
        "ct_slices": 32,
        "mr_pixel_spacing": (5.0, 5.5),
        "mr_slice_spacing": 6.0,
        "mr_slices": 20,
        "pet_pixel_spacing": (11.5, 11.5),
        "pet_slice_spacing": 7.0,
        "pet_slices": 20,
        "ct_transfer_syntax": RLELossless,
        "mr_transfer_syntax": RLELossless,
        "pet_transfer_syntax": ExplicitVRLittleEndian,
        "roi_names": ("Tumour", "Tumour 2"),
        "file_extension": ".DCM",
        "reverse_instance_numbers": False,
        "ct_signed": True,
    },
)


def site_name(index: int) -> str:
    """Return the name of the site with 0-based ``index`` (``site-a``, ``site-b``, ...)."""
    if not 0 <= index < len(ascii_lowercase):
        raise ValueError(f"site index must be in 0..25, got {index}")
    return f"site-{ascii_lowercase[index]}"


def site_profile(index: int) -> ScannerProfile:
    """Return the scanner profile of the site with 0-based ``index``.

    Parameters
    ----------
    index
        Site index; profiles repeat every three sites with a finer CT pixel spacing.

    Returns
    -------
    ScannerProfile
        The profile.
    """
    base = dict(_BASE[index % len(_BASE)])
    cycle = index // len(_BASE)
    if cycle:
        row, col = base["ct_pixel_spacing"]  # type: ignore[misc]
        base["ct_pixel_spacing"] = (row - 0.25 * cycle, col - 0.25 * cycle)
    return ScannerProfile(site=site_name(index), **base)  # type: ignore[arg-type]

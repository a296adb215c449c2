"""DICOM image series to a verified SimpleITK volume.

Planes (single-frame instances or frames of an enhanced multiframe instance) are ordered by
their position along the slice normal, never by InstanceNumber. The series is checked for
consistent orientation, matrix and pixel spacing, for duplicate positions, for even slice
spacing within a tolerance (a gap of a whole number of slices is a missing slice) and for a
sheared stack (gantry tilt), which is resampled onto an orthogonal grid or quarantined. Stored
values are rescaled per plane with RescaleSlope/RescaleIntercept. The direction matrix keeps
the (oblique) ImageOrientationPatient; when the stored cosines are not exactly orthonormal the
nearest orthonormal matrix is used and the change is recorded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.harmonise.config import HarmoniseConfig
from tasks.harmonise.quarantine import Quarantined
from tasks.records import Reason

INTERPOLATORS = {
    "bspline": sitk.sitkBSpline,
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "label-gaussian": sitk.sitkLabelGaussian,
}


@dataclass(frozen=True)
class Plane:
    """One image plane: a single-frame instance or one frame of a multiframe instance.

    Parameters
    ----------
    dataset
        Index of the dataset in the series.
    frame
        Frame index for multiframe instances, None for single-frame instances.
    position
        ImagePositionPatient (mm, LPS).
    orientation
        ImageOrientationPatient (row cosines, then column cosines).
    pixel_spacing
        PixelSpacing (spacing between rows, between columns) in mm.
    rows, columns
        Matrix size.
    slope, intercept
        RescaleSlope and RescaleIntercept.
    """

    dataset: int
    frame: int | None
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float


@dataclass
class Volume:
    """A verified volume and what was done to build it.

    Parameters
    ----------
    image
        The volume (x = columns, y = rows, z = planes along the normal), rescaled values.
    frame_of_reference
        FrameOfReferenceUID of the series (pseudonymous after de-identification).
    modality
        DICOM Modality.
    parameters
        What the reading step measured and decided (JSON-serialisable), for provenance.
    """

    image: sitk.Image
    frame_of_reference: str
    modality: str
    parameters: dict[str, Any] = field(default_factory=dict)


def _floats(value: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise Quarantined(Reason.INCONSISTENT_GEOMETRY, f"unreadable {what}") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise Quarantined(Reason.INCONSISTENT_GEOMETRY, f"unreadable {what}")
    return arr


def _first_item(group: Dataset | None, keyword: str) -> Dataset | None:
    if group is None or keyword not in group:
        return None
    seq = group[keyword].value
    return seq[0] if seq else None


def _functional(per_frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """Return the first item of a functional group macro, per-frame first, then shared."""
    return _first_item(per_frame, keyword) or _first_item(shared, keyword)


def planes_of(ds: Dataset, index: int) -> list[Plane]:
    """Return the image planes of one instance.

    Parameters
    ----------
    ds
        A single-frame image, or an enhanced multiframe image with functional groups.
    index
        Index of ``ds`` in its series (kept in each plane).

    Returns
    -------
    list of Plane
        One plane per frame.
    """
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise Quarantined(Reason.UNSUPPORTED_IMAGE, "colour images are not volumes")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise Quarantined(Reason.UNSUPPORTED_IMAGE, "instance without pixel data")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or columns < 1:
        raise Quarantined(Reason.UNSUPPORTED_IMAGE, "empty matrix")
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared_seq = ds.get("SharedFunctionalGroupsSequence")
        shared = shared_seq[0] if shared_seq else None
        planes = []
        for frame, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
            position = _functional(group, shared, "PlanePositionSequence")
            orientation = _functional(group, shared, "PlaneOrientationSequence")
            measures = _functional(group, shared, "PixelMeasuresSequence")
            if position is None or orientation is None or measures is None:
                raise Quarantined(
                    Reason.INCONSISTENT_GEOMETRY, "multiframe without plane position/orientation"
                )
            transform = _functional(group, shared, "PixelValueTransformationSequence")
            planes.append(
                Plane(
                    dataset=index,
                    frame=frame,
                    position=_floats(position.get("ImagePositionPatient"), 3, "position"),
                    orientation=_floats(
                        orientation.get("ImageOrientationPatient"), 6, "orientation"
                    ),
                    pixel_spacing=tuple(_floats(measures.get("PixelSpacing"), 2, "pixel spacing")),
                    rows=rows,
                    columns=columns,
                    slope=float(transform.get("RescaleSlope", 1.0) if transform else 1.0),
                    intercept=float(transform.get("RescaleIntercept", 0.0) if transform else 0.0),
                )
            )
        return planes
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise Quarantined(Reason.UNSUPPORTED_IMAGE, "multiframe without functional groups")
    return [
        Plane(
            dataset=index,
            frame=None,
            position=_floats(ds.get("ImagePositionPatient"), 3, "position"),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6, "orientation"),
            pixel_spacing=tuple(_floats(ds.get("PixelSpacing"), 2, "pixel spacing")),
            rows=rows,
            columns=columns,
            slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
            intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        )
    ]


def orthonormal_direction(orientation: np.ndarray) -> tuple[np.ndarray, float]:
    """Return the direction matrix (columns: row, column, normal) and how much it was corrected.

    Parameters
    ----------
    orientation
        ImageOrientationPatient.

    Returns
    -------
    tuple
        The nearest orthonormal right-handed 3x3 matrix to ``[row, col, row x col]`` (polar
        decomposition), and the largest absolute change of a cosine.
    """
    row, col = orientation[:3], orientation[3:]
    if np.linalg.norm(row) < 0.5 or np.linalg.norm(col) < 0.5:
        raise Quarantined(Reason.INCONSISTENT_GEOMETRY, "degenerate orientation")
    raw = np.column_stack([row, col, np.cross(row, col)])
    u, _, vt = np.linalg.svd(raw)
    direction = u @ vt
    if np.linalg.det(direction) < 0:  # pragma: no cover - row x col is right-handed
        raise Quarantined(Reason.INCONSISTENT_GEOMETRY, "left-handed orientation")
    return direction, float(np.max(np.abs(direction - raw)))


def check_planes(planes: Sequence[Plane], config: HarmoniseConfig) -> None:
    """Check that all planes share orientation, matrix size and pixel spacing."""
    first = planes[0]
    for plane in planes[1:]:
        if np.max(np.abs(plane.orientation - first.orientation)) > config.orientation_tolerance:
            raise Quarantined(Reason.INCONSISTENT_ORIENTATION, "planes differ in orientation")
        if (plane.rows, plane.columns) != (first.rows, first.columns):
            raise Quarantined(Reason.INCONSISTENT_GEOMETRY, "planes differ in matrix size")
        if not np.allclose(plane.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise Quarantined(Reason.INCONSISTENT_GEOMETRY, "planes differ in pixel spacing")


def slice_spacing(offsets: np.ndarray, config: HarmoniseConfig, fallback: float) -> float:
    """Return the slice spacing of sorted offsets along the normal, or quarantine.

    Parameters
    ----------
    offsets
        Plane offsets along the normal, ascending (mm).
    config
        Gives the relative tolerance of a gap.
    fallback
        Spacing used for a single plane.

    Returns
    -------
    float
        The median gap (mm).
    """
    if len(offsets) < 2:
        return fallback
    gaps = np.diff(offsets)
    spacing = float(np.median(gaps))
    if spacing <= 1e-3 or np.min(gaps) <= max(1e-3, 0.01 * spacing):
        raise Quarantined(Reason.DUPLICATE_POSITION, "two planes share a position")
    tol = config.slice_spacing_tolerance
    odd = np.abs(gaps - spacing) > tol * spacing
    if not odd.any():
        return spacing
    multiples = np.rint(gaps[odd] / spacing)
    whole = (multiples >= 2) & (np.abs(gaps[odd] - multiples * spacing) <= tol * spacing)
    if whole.all():
        missing = int(np.sum(multiples - 1))
        raise Quarantined(
            Reason.MISSING_SLICE, f"{missing} plane(s) missing in {int(odd.sum())} gap(s)"
        )
    raise Quarantined(
        Reason.INCONSISTENT_SPACING,
        f"slice gaps range {gaps.min():.3g}-{gaps.max():.3g} mm around {spacing:.3g} mm",
    )


NATIVE_LITTLE_ENDIAN = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def _native_layout(ds: Dataset) -> tuple[np.dtype, int] | None:
    """Return (stored dtype, BitsStored) when the pixel data can be read without decoding."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in NATIVE_LITTLE_ENDIAN:
        return None
    if "PixelData" not in ds or ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        return None
    bits = int(ds.get("BitsAllocated", 0) or 0)
    stored = int(ds.get("BitsStored", bits) or bits)
    if bits not in (8, 16, 32) or not 0 < stored <= bits:
        return None
    kind = "i" if int(ds.get("PixelRepresentation", 0) or 0) == 1 else "u"
    return np.dtype(f"<{kind}{bits // 8}"), stored


def _native_frames(ds: Dataset, layout: tuple[np.dtype, int], plane: Plane) -> np.ndarray | None:
    """View the stored frames of native pixel data as (frames, rows, columns), or None."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    count = frames * plane.rows * plane.columns
    raw = ds.PixelData
    if len(raw) < count * layout[0].itemsize:
        return None
    return np.frombuffer(raw, layout[0], count=count).reshape(frames, plane.rows, plane.columns)


def _fix_bits(values: np.ndarray, stored: int) -> None:
    """In place: keep only the low ``stored`` bits (sign-extended for signed data)."""
    spare = values.dtype.itemsize * 8 - stored
    if spare <= 0:
        return
    if np.issubdtype(values.dtype, np.signedinteger):
        np.left_shift(values, spare, out=values)
        np.right_shift(values, spare, out=values)
    else:
        np.bitwise_and(values, (1 << stored) - 1, out=values)


def _pixels(datasets: Sequence[Dataset], planes: Sequence[Plane]) -> np.ndarray:
    """Stack the stored values of the planes, in the given order, as (planes, rows, columns).

    Uncompressed little-endian data with one layout for the whole series is copied straight
    from the pixel data into the volume; anything else is decoded by pydicom.
    """
    layouts = {_native_layout(datasets[p.dataset]) for p in planes}
    layout = layouts.pop() if len(layouts) == 1 else None
    decoded: dict[int, np.ndarray] = {}
    out = None
    for k, plane in enumerate(planes):
        arr = decoded.get(plane.dataset)
        if arr is None:
            ds = datasets[plane.dataset]
            arr = _native_frames(ds, layout, plane) if layout is not None else None
            if arr is None:
                return _decoded_pixels(datasets, planes)
            decoded[plane.dataset] = arr
        if (plane.frame or 0) >= len(arr):
            raise Quarantined(Reason.UNSUPPORTED_IMAGE, "fewer frames than frame descriptions")
        frame = arr[plane.frame or 0]
        if out is None:
            out = np.empty((len(planes), plane.rows, plane.columns), dtype=frame.dtype)
        out[k] = frame
        if plane.frame is None:
            decoded.pop(plane.dataset, None)
    assert out is not None and layout is not None
    _fix_bits(out, layout[1])
    return out


def _decoded_pixels(datasets: Sequence[Dataset], planes: Sequence[Plane]) -> np.ndarray:
    """Stack the planes' values decoded by pydicom (compressed or unusual layouts)."""
    decoded: dict[int, np.ndarray] = {}
    out = None
    for k, plane in enumerate(planes):
        arr = decoded.get(plane.dataset)
        if arr is None:
            try:
                arr = datasets[plane.dataset].pixel_array
            except Exception as exc:
                raise Quarantined(
                    Reason.UNSUPPORTED_IMAGE, f"pixel data cannot be decoded ({type(exc).__name__})"
                ) from None
            if plane.frame is not None and arr.ndim == 2:
                arr = arr[np.newaxis]
            decoded[plane.dataset] = arr
        frame = arr if plane.frame is None else arr[plane.frame]
        if frame.shape != (plane.rows, plane.columns):
            raise Quarantined(Reason.UNSUPPORTED_IMAGE, "pixel data does not match the matrix")
        if out is None:
            out = np.empty((len(planes), plane.rows, plane.columns), dtype=frame.dtype)
        elif frame.dtype != out.dtype:
            out = out.astype(np.result_type(out.dtype, frame.dtype))
        out[k] = frame
        if plane.frame is None:
            decoded.pop(plane.dataset, None)
    assert out is not None
    return out


def rescale(stored: np.ndarray, planes: Sequence[Plane]) -> np.ndarray:
    """Apply each plane's RescaleSlope/RescaleIntercept.

    Integer slopes and intercepts keep integer values (int16 when they fit, else int32), so CT
    HU equal ``stored * slope + intercept`` exactly; otherwise the result is float32.
    """
    slopes = np.array([p.slope for p in planes], dtype=np.float64)
    intercepts = np.array([p.intercept for p in planes], dtype=np.float64)
    integral = np.all(slopes == np.rint(slopes)) and np.all(intercepts == np.rint(intercepts))
    if integral and np.issubdtype(stored.dtype, np.integer):
        if np.all(slopes == 1) and np.all(intercepts == intercepts[0]):
            shift = int(intercepts[0])
            lo, hi = int(stored.min()) + shift, int(stored.max()) + shift
            i16 = np.iinfo(np.int16)
            if i16.min <= lo and hi <= i16.max and stored.dtype.itemsize <= 2:
                # In place: the stored values fit int16 (checked above), so add in int16.
                # Add in int16 (in place, modulo 2**16): exact because the result fits.
                if stored.dtype in (np.int16, np.uint16):
                    values16 = stored.view(np.int16)
                else:
                    values16 = stored.astype(np.int16)
                values16 += np.int16(shift)
                return values16
            values = stored.astype(np.int32) + shift
        else:
            values = stored.astype(np.int64) * slopes.astype(np.int64)[:, None, None]
            values += intercepts.astype(np.int64)[:, None, None]
        lo, hi = int(values.min()), int(values.max())
        if np.iinfo(np.int16).min <= lo and hi <= np.iinfo(np.int16).max:
            return values.astype(np.int16)
        if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
            return values.astype(np.int32)
    values = stored.astype(np.float64) * slopes[:, None, None] + intercepts[:, None, None]
    return values.astype(np.float32)


def _shear(positions: np.ndarray, offsets: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Return the in-plane displacement per mm along the normal (least squares)."""
    rel = positions - positions[0]
    along = offsets - offsets[0]
    inplane = rel - np.outer(rel @ normal, normal)
    denom = float(along @ along)
    return (along @ inplane) / denom if denom > 0 else np.zeros(3)


def _deshear(image: sitk.Image, shear: np.ndarray, interpolator: int) -> sitk.Image:
    """Resample a sheared stack (stored as if orthogonal) onto an orthogonal grid.

    The stored image places plane ``k`` at ``origin + k*s*normal``; its true position is shifted
    in-plane by ``shear * k*s``. The output grid keeps the direction and spacing, with the
    in-plane lattice of the first plane, enlarged to cover the whole sheared stack.
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin())
    spacing = np.array(image.GetSpacing())
    size = np.array(image.GetSize())
    normal = direction[:, 2]
    corners = []
    for idx in np.ndindex(2, 2, 2):
        ijk = np.array(idx) * (size - 1)
        fake = origin + direction @ (ijk * spacing)
        corners.append(direction.T @ (fake + shear * (ijk[2] * spacing[2]) - origin))
    corners_arr = np.array(corners)
    lo = np.floor(corners_arr.min(axis=0) / spacing + 1e-6)
    hi = np.ceil(corners_arr.max(axis=0) / spacing - 1e-6)
    lo[2], hi[2] = 0, size[2] - 1
    out_size = [int(v) for v in hi - lo + 1]
    out_origin = origin + direction @ (lo * spacing)
    transform = sitk.AffineTransform(3)
    transform.SetCenter(tuple(origin))
    transform.SetMatrix(tuple((np.eye(3) - np.outer(shear, normal)).ravel()))
    pad = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(
        image,
        out_size,
        transform,
        interpolator,
        tuple(out_origin),
        tuple(spacing),
        tuple(direction.ravel()),
        pad,
        image.GetPixelID() if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32,
    )


def read_volume(datasets: Sequence[Dataset], config: HarmoniseConfig) -> Volume:
    """Build a verified volume from the instances of one image series.

    Parameters
    ----------
    datasets
        The instances of the series, in any order (single-frame or enhanced multiframe).
    config
        Tolerances and the gantry-tilt policy.

    Returns
    -------
    Volume
        The volume with rescaled values and its reading parameters.

    Raises
    ------
    Quarantined
        When the series is not one faithful volume (reason code and detail).
    """
    if not datasets:
        raise Quarantined(Reason.UNSUPPORTED_IMAGE, "series without instances")
    planes = [p for i, ds in enumerate(datasets) for p in planes_of(ds, i)]
    check_planes(planes, config)
    direction, ortho_fix = orthonormal_direction(planes[0].orientation)
    if ortho_fix > config.orientation_tolerance:
        raise Quarantined(Reason.INCONSISTENT_ORIENTATION, "direction cosines not orthonormal")
    normal = direction[:, 2]
    offsets_unsorted = np.array([p.position @ normal for p in planes])
    order = np.argsort(offsets_unsorted, kind="stable")
    planes = [planes[i] for i in order]
    offsets = offsets_unsorted[order]
    first_ds = datasets[planes[0].dataset]
    fallback = float(first_ds.get("SpacingBetweenSlices") or first_ds.get("SliceThickness") or 1.0)
    spacing_z = slice_spacing(offsets, config, fallback)
    positions = np.array([p.position for p in planes])
    shear = _shear(positions, offsets, normal)
    residual = positions - positions[0] - np.outer(offsets - offsets[0], normal)
    residual -= np.outer(offsets - offsets[0], shear)
    pixel_spacing = planes[0].pixel_spacing
    if len(planes) > 1 and np.max(np.linalg.norm(residual, axis=1)) > 0.1 * min(pixel_spacing):
        raise Quarantined(Reason.INCONSISTENT_GEOMETRY, "plane positions are not on one line")
    tilt_deg = math.degrees(math.atan(float(np.linalg.norm(shear))))
    tilted = tilt_deg > config.tilt_tolerance_deg
    if tilted and config.gantry_tilt == "quarantine":
        raise Quarantined(Reason.GANTRY_TILT, f"stack sheared by {tilt_deg:.2f} degrees")

    values = rescale(_pixels(datasets, planes), planes)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((pixel_spacing[1], pixel_spacing[0], spacing_z))
    image.SetOrigin(tuple(planes[0].position))
    image.SetDirection(tuple(direction.ravel()))
    if tilted:
        image = _deshear(image, shear, INTERPOLATORS[config.image_interpolator])
    modality = str(first_ds.get("Modality", "") or "")
    parameters = {
        "planes": len(planes),
        "multiframe": planes[0].frame is not None,
        "slice_spacing_mm": round(spacing_z, 6),
        "orthonormalised_by": float(f"{ortho_fix:.3g}"),
        "tilt_deg": round(tilt_deg, 4),
        "tilt_resampled": bool(tilted),
        "rescale": "per-plane slope/intercept",
        "dtype": sitk.GetPixelIDValueAsString(image.GetPixelID()),
    }
    return Volume(
        image=image,
        frame_of_reference=str(first_ds.get("FrameOfReferenceUID", "") or ""),
        modality=modality,
        parameters=parameters,
    )


def resample_to_spacing(
    image: sitk.Image, spacing: Sequence[float], interpolator: str, default: float = 0.0
) -> sitk.Image:
    """Resample an image onto a grid with the same origin and direction and a new spacing.

    Parameters
    ----------
    image
        Image or label mask.
    spacing
        Target spacing (x, y, z) in mm.
    interpolator
        ``bspline`` or ``linear`` for images; ``nearest`` or ``label-gaussian`` for masks.
    default
        Value outside the input.

    Returns
    -------
    sitk.Image
        The resampled image; the physical extent is kept (size rounded up).
    """
    old_spacing = np.array(image.GetSpacing())
    old_size = np.array(image.GetSize())
    new_spacing = np.array(spacing, dtype=float)
    new_size = [max(1, int(v)) for v in np.ceil(old_size * old_spacing / new_spacing - 1e-6)]
    is_label = interpolator in ("nearest", "label-gaussian")
    return sitk.Resample(
        image,
        new_size,
        sitk.Transform(),
        INTERPOLATORS[interpolator],
        image.GetOrigin(),
        tuple(new_spacing),
        image.GetDirection(),
        default,
        image.GetPixelID() if is_label else sitk.sitkFloat32,
    )


def read_volume_file(data: bytes, modality: str) -> Volume:
    """Read a de-identified NIfTI/NRRD volume (non-DICOM cohorts) as the series' volume.

    Geometry is kept as the file gives it: the de-identified copies are NRRD, whose spacing and
    origin are exact decimal text, so the spacing recorded in ``harmonised/series.parquet`` is
    the source's to the last bit (the harmonised ``image.nii.gz`` holds NIfTI's float32 copy).

    Parameters
    ----------
    data
        The file content.
    modality
        The modality the cases CSV gave (``OT`` when none).
    """
    from tasks.harmonise.masks import read_nifti

    image = read_nifti(data)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise Quarantined(Reason.UNSUPPORTED_IMAGE, "volume is not a 3-D scalar image")
    parameters = {
        "source": "nrrd" if data[:4] == b"NRRD" else "nifti",
        "spacing_mm": [float(v) for v in image.GetSpacing()],
        "size": [int(v) for v in image.GetSize()],
        "dtype": sitk.GetPixelIDValueAsString(image.GetPixelID()),
    }
    return Volume(image=image, frame_of_reference="", modality=modality, parameters=parameters)

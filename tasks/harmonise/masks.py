"""Label masks on the image grid from RTSTRUCT, DICOM SEG and NIfTI.

* **RTSTRUCT**: each CLOSED_PLANAR contour is mapped from patient coordinates (mm) to continuous
  voxel indices of the image, assigned to the nearest image plane, and filled by the even-odd
  rule evaluated exactly at the voxel centres (several contours on a plane are combined by XOR,
  which makes inner contours holes).
* **SEG**: read with highdicom; its frames are assembled into a volume from their plane
  positions (``Segmentation.get_volume``) and placed on the image grid by nearest-neighbour
  resampling in physical space (exact when the grids coincide).
* **NIfTI**: placed on the image grid the same way.

ROI names go through the configured regex map; ROIs matching no pattern are ignored, ROIs
sharing a normalised name are merged. A mask that is empty, lies (partly) outside the image,
or whose frame of reference differs from the image's is reported as a problem with a reason.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from tasks.harmonise.config import HarmoniseConfig
from tasks.harmonise.quarantine import Quarantined
from tasks.records import Reason

#: Largest spread of a contour's points across the plane normal, in voxels.
PLANAR_TOLERANCE = 0.25
#: Slack on the image extent when deciding that a point is outside, in voxels.
EXTENT_SLACK = 1e-3


@dataclass
class Mask:
    """A binary mask (uint8, 0/1) on the image grid.

    Parameters
    ----------
    roi
        Normalised ROI name.
    image
        The mask, same geometry as the image.
    parameters
        How it was made (source kind, source ROI numbers, counts), for provenance.
    """

    roi: str
    image: sitk.Image
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MaskProblem:
    """A mask that cannot be used, with its reason code (no source names: they are free text)."""

    roi: str
    reason: Reason
    detail: str


@dataclass
class MaskSet:
    """Masks and problems found in one segmentation object."""

    masks: list[Mask] = field(default_factory=list)
    problems: list[MaskProblem] = field(default_factory=list)
    ignored: int = 0


class Grid:
    """Physical ↔ continuous-index mapping of an image (vectorised)."""

    def __init__(self, image: sitk.Image) -> None:
        self.size = np.array(image.GetSize())
        self.spacing = np.array(image.GetSpacing())
        self.origin = np.array(image.GetOrigin())
        self.direction = np.array(image.GetDirection()).reshape(3, 3)
        self._inverse = np.linalg.inv(self.direction * self.spacing)

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous indices (x, y, z) of physical points (N, 3)."""
        return (np.asarray(points, dtype=float) - self.origin) @ self._inverse.T

    def to_physical(self, indices: np.ndarray) -> np.ndarray:
        """Physical points of continuous indices (N, 3)."""
        return self.origin + (np.asarray(indices, dtype=float) * self.spacing) @ self.direction.T

    def outside(self, indices: np.ndarray) -> np.ndarray:
        """Whether each continuous index lies outside the voxels' extent."""
        lo = -0.5 - EXTENT_SLACK
        hi = self.size - 0.5 + EXTENT_SLACK
        return np.any((indices < lo) | (indices > hi), axis=1)


def fill_polygon(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of a closed polygon, evaluated exactly at pixel centres.

    Parameters
    ----------
    x, y
        Vertex coordinates in continuous pixel indices (column, row); the last vertex connects
        to the first.
    shape
        (rows, columns) of the output.

    Returns
    -------
    numpy.ndarray
        Boolean array; True where the pixel centre ``(i, j)`` is inside the polygon.
    """
    rows, columns = shape
    out = np.zeros(shape, dtype=bool)
    if len(x) < 3:
        return out
    j0 = max(0, int(np.ceil(y.min())))
    j1 = min(rows - 1, int(np.floor(y.max())))
    if j1 < j0:
        return out
    x0, y0 = x, y
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    rows_y = np.arange(j0, j1 + 1, dtype=float)[:, None]
    crosses = (y0[None, :] <= rows_y) != (y1[None, :] <= rows_y)
    dy = np.where(y1 == y0, 1.0, y1 - y0)
    xc = x0[None, :] + (rows_y - y0[None, :]) * ((x1 - x0) / dy)[None, :]
    # A crossing at xc toggles every pixel centre i > xc: first such column is floor(xc) + 1.
    start = np.clip(np.floor(xc) + 1, 0, columns).astype(np.int64)
    toggles = np.zeros((len(rows_y), columns + 1), dtype=np.int32)
    r_idx = np.nonzero(crosses)
    np.add.at(toggles, (r_idx[0], start[r_idx]), 1)
    out[j0 : j1 + 1] = (np.cumsum(toggles[:, :columns], axis=1) % 2).astype(bool)
    return out


def _mask_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    mask = sitk.GetImageFromArray(array.astype(np.uint8))
    mask.CopyInformation(reference)
    return mask


def rasterise_contours(
    contours: list[np.ndarray], reference: sitk.Image
) -> tuple[np.ndarray, dict[str, Any]]:
    """Rasterise closed planar contours (physical mm) onto the grid of ``reference``.

    Parameters
    ----------
    contours
        One (N, 3) array of patient coordinates per contour.
    reference
        The image whose grid the mask is built on.

    Returns
    -------
    tuple
        The mask as a (z, y, x) uint8 array and measurements (points outside, off-plane
        distance) for provenance.

    Raises
    ------
    Quarantined
        When contours are not parallel to the image planes.
    """
    grid = Grid(reference)
    nx, ny, nz = (int(v) for v in grid.size)
    out = np.zeros((nz, ny, nx), dtype=np.uint8)
    planes: dict[int, dict[float, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    n_points = n_outside = 0
    max_offplane = 0.0
    for pts in contours:
        idx = grid.to_index(pts)
        n_points += len(idx)
        n_outside += int(grid.outside(idx).sum())
        k = idx[:, 2]
        if k.max() - k.min() > PLANAR_TOLERANCE:
            raise Quarantined(
                Reason.INCONSISTENT_GEOMETRY, "contours are not parallel to the image planes"
            )
        k_mean = float(k.mean())
        k_slice = round(k_mean)
        max_offplane = max(max_offplane, abs(k_mean - k_slice))
        if 0 <= k_slice < nz:
            planes[k_slice][round(k_mean, 2)].append(idx)
    for k_slice, by_plane in planes.items():
        nearest = min(by_plane, key=lambda p: abs(p - k_slice))
        plane = np.zeros((ny, nx), dtype=bool)
        for idx in by_plane[nearest]:
            plane ^= fill_polygon(idx[:, 0], idx[:, 1], (ny, nx))
        out[k_slice] |= plane
    return out, {
        "points": n_points,
        "points_outside": n_outside,
        "max_offplane_voxels": round(max_offplane, 4),
    }


def group_rois(
    numbered_names: list[tuple[int, str]], config: HarmoniseConfig
) -> tuple[dict[str, list[int]], int]:
    """Map source ROIs (number, name) to output ROI names.

    Names go through the ROI map. With ``roi_duplicates = "number"`` several source ROIs with
    one normalised name become ``<name>``, ``<name>-2``, ... in ROI/segment number order (e.g.
    ``GTV-1``, ``GTV-2`` → ``gtv``, ``gtv-2``); with ``"merge"`` they form one mask.

    Returns
    -------
    tuple
        Output name → source numbers (sorted by name), and the number of unmapped ROIs.
    """
    by_target: dict[str, list[int]] = defaultdict(list)
    ignored = 0
    for number, name in sorted(numbered_names):
        target = config.normalise_roi(name)
        if target is None:
            ignored += 1
        else:
            by_target[target].append(number)
    groups: dict[str, list[int]] = {}
    for target, numbers in by_target.items():
        if config.roi_duplicates == "merge":
            groups[target] = numbers
        else:
            for i, number in enumerate(numbers):
                groups[target if i == 0 else f"{target}-{i + 1}"] = [number]
    return dict(sorted(groups.items())), ignored


def _check_extent(roi: str, outside: int, total: int, config: HarmoniseConfig) -> None:
    if total and outside == total:
        raise Quarantined(Reason.MASK_OUTSIDE_IMAGE, f"{roi}: entirely outside the image")
    if outside and not config.allow_partial_outside:
        raise Quarantined(Reason.MASK_OUTSIDE_IMAGE, f"{roi}: partly outside the image")


def _check_empty(roi: str, array: np.ndarray) -> None:
    if not array.any():
        raise Quarantined(Reason.EMPTY_MASK, f"{roi}: no voxel inside")


def _closed_planar(items: Any) -> list[np.ndarray]:
    """Return the CLOSED_PLANAR contours of a ContourSequence as (N, 3) arrays."""
    contours = []
    for item in items:
        if str(item.get("ContourGeometricType", "")).upper() != "CLOSED_PLANAR":
            continue
        try:
            data = np.array([float(v) for v in item.get("ContourData", [])], dtype=float)
        except (TypeError, ValueError):
            raise Quarantined(Reason.INCONSISTENT_GEOMETRY, "unreadable contour data") from None
        if not np.all(np.isfinite(data)):
            raise Quarantined(Reason.INCONSISTENT_GEOMETRY, "unreadable contour data")
        if data.size >= 9 and data.size % 3 == 0:
            contours.append(data.reshape(-1, 3))
    return contours


def rtstruct_masks(
    ds: Dataset, reference: sitk.Image, frame_of_reference: str, config: HarmoniseConfig
) -> MaskSet:
    """Build the masks of the mapped ROIs of an RTSTRUCT on the image grid.

    Parameters
    ----------
    ds
        The RT Structure Set.
    reference
        The harmonised image (before any resampling to a target spacing).
    frame_of_reference
        FrameOfReferenceUID of the image.
    config
        ROI map and the partial-outside policy.

    Returns
    -------
    MaskSet
        One mask per normalised ROI name, and the problems.
    """
    result = MaskSet()
    roi_for = {
        int(r.ROINumber): str(r.get("ReferencedFrameOfReferenceUID", "") or "")
        for r in ds.get("StructureSetROISequence", [])
    }
    names = {
        int(r.ROINumber): str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])
    }
    contours_by_roi = {
        int(rc.ReferencedROINumber): rc.get("ContourSequence", [])
        for rc in ds.get("ROIContourSequence", [])
    }
    groups, result.ignored = group_rois(sorted(names.items()), config)
    for roi, numbers in groups.items():
        try:
            if any(roi_for.get(n, frame_of_reference) != frame_of_reference for n in numbers):
                raise Quarantined(
                    Reason.FRAME_OF_REFERENCE_MISMATCH, f"{roi}: other frame of reference"
                )
            # Contours of one ROI combine by XOR (holes); ROIs sharing a name by union.
            array = None
            params = {"points": 0, "points_outside": 0, "max_offplane_voxels": 0.0, "contours": 0}
            for n in numbers:
                contours = _closed_planar(contours_by_roi.get(n, []))
                if not contours:
                    continue
                part, measured = rasterise_contours(contours, reference)
                array = part if array is None else array | part
                params["points"] += measured["points"]
                params["points_outside"] += measured["points_outside"]
                params["contours"] += len(contours)
                params["max_offplane_voxels"] = max(
                    params["max_offplane_voxels"], measured["max_offplane_voxels"]
                )
            if array is None:
                raise Quarantined(Reason.EMPTY_MASK, f"{roi}: no closed planar contour")
            _check_extent(roi, params["points_outside"], params["points"], config)
            _check_empty(roi, array)
            params.update(source="rtstruct", roi_numbers=numbers, voxels=int(array.sum()))
            result.masks.append(Mask(roi, _mask_image(array, reference), params))
        except Quarantined as q:
            result.problems.append(MaskProblem(roi, q.reason, q.detail))
    return result


def _volume_to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """Build a SimpleITK image from a (slice, row, column) array and a DICOM affine."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    axes = affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)  # slice, row, column
    unit = axes / spacing
    image.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    image.SetDirection(tuple(np.column_stack([unit[:, 2], unit[:, 1], unit[:, 0]]).ravel()))
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    return image


def place_on_grid(label: sitk.Image, reference: sitk.Image) -> tuple[np.ndarray, int, int]:
    """Nearest-neighbour resample a label image onto ``reference`` in physical space.

    Returns
    -------
    tuple
        The mask as a (z, y, x) uint8 array, the number of labelled voxels of ``label`` whose
        centre lies outside the reference extent, and the number of labelled voxels.
    """
    arr = sitk.GetArrayViewFromImage(label)
    nz = np.argwhere(arr > 0)[:, ::-1].astype(float)  # x, y, z indices
    src = Grid(label)
    outside = int(Grid(reference).outside(Grid(reference).to_index(src.to_physical(nz))).sum())
    binary = sitk.Cast(label > 0, sitk.sitkUInt8)
    placed = sitk.Resample(binary, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(placed).astype(np.uint8), outside, len(nz)


def seg_masks(
    data: bytes | Dataset,
    reference: sitk.Image,
    frame_of_reference: str,
    config: HarmoniseConfig,
) -> MaskSet:
    """Build the masks of the mapped segments of a DICOM SEG on the image grid.

    Parameters
    ----------
    data
        The SEG file content (or a dataset).
    reference
        The harmonised image (before any resampling to a target spacing).
    frame_of_reference
        FrameOfReferenceUID of the image.
    config
        ROI map and the partial-outside policy.

    Returns
    -------
    MaskSet
        One mask per normalised segment label, and the problems.
    """
    result = MaskSet()
    try:
        if isinstance(data, Dataset):
            seg = hd.seg.Segmentation.from_dataset(data, copy=False)
        else:
            seg = hd.seg.segread(io.BytesIO(data))
    except Exception as exc:
        raise Quarantined(
            Reason.UNSUPPORTED_IMAGE, f"segmentation cannot be read ({type(exc).__name__})"
        ) from None
    labels = [
        (int(n), str(seg.get_segment_description(n).segment_label)) for n in seg.segment_numbers
    ]
    groups, result.ignored = group_rois(sorted(labels), config)
    same_for = str(seg.get("FrameOfReferenceUID", "") or "") == frame_of_reference
    for roi, numbers in groups.items():
        try:
            if not same_for:
                raise Quarantined(
                    Reason.FRAME_OF_REFERENCE_MISMATCH, f"{roi}: other frame of reference"
                )
            try:
                volume = seg.get_volume(
                    segment_numbers=numbers, combine_segments=True, relabel=True
                )
            except Exception as exc:
                raise Quarantined(
                    Reason.INCONSISTENT_GEOMETRY,
                    f"{roi}: segmentation frames do not form a volume ({type(exc).__name__})",
                ) from None
            label = _volume_to_sitk((volume.array > 0).astype(np.uint8), volume.affine)
            array, outside, total = place_on_grid(label, reference)
            _check_extent(roi, outside, total, config)
            _check_empty(roi, array)
            params = {
                "source": "seg",
                "segment_numbers": numbers,
                "seg_voxels": total,
                "voxels_outside": outside,
                "voxels": int(array.sum()),
            }
            result.masks.append(Mask(roi, _mask_image(array, reference), params))
        except Quarantined as q:
            result.problems.append(MaskProblem(roi, q.reason, q.detail))
    return result


def read_nifti(data: bytes) -> sitk.Image:
    """Read a NIfTI image (``.nii`` or ``.nii.gz`` content) or an NRRD file with SimpleITK."""
    suffix = ".nrrd" if data[:4] == b"NRRD" else ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
    fd, path = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return sitk.ReadImage(path)
    except RuntimeError:
        raise Quarantined(Reason.UNSUPPORTED_IMAGE, "NIfTI mask cannot be read") from None
    finally:
        os.unlink(path)


def nifti_mask(data: bytes, roi: str, reference: sitk.Image, config: HarmoniseConfig) -> Mask:
    """Place a NIfTI label mask (non-zero = inside) on the image grid.

    Parameters
    ----------
    data
        NIfTI content.
    roi
        The source ROI name; normalised through the ROI map (unmapped names are kept when they
        are already valid normalised names).
    reference
        The harmonised image.
    config
        ROI map and the partial-outside policy.

    Returns
    -------
    Mask
        The mask on the image grid.
    """
    name = config.normalise_roi(roi) or roi
    label = read_nifti(data)
    if label.GetDimension() != 3:
        raise Quarantined(Reason.UNSUPPORTED_IMAGE, f"{name}: NIfTI mask is not 3-D")
    array, outside, total = place_on_grid(label, reference)
    _check_extent(name, outside, total, config)
    _check_empty(name, array)
    params = {"source": "nifti", "voxels_outside": outside, "voxels": int(array.sum())}
    return Mask(name, _mask_image(array, reference), params)


def unique_rois(masks: list[Mask]) -> tuple[list[Mask], int]:
    """Keep the first mask of each ROI name (callers order sources by preference).

    Returns
    -------
    tuple
        Masks sorted by ROI name, and how many later duplicates were dropped.
    """
    kept: dict[str, Mask] = {}
    for mask in masks:
        kept.setdefault(mask.roi, mask)
    return [kept[k] for k in sorted(kept)], len(masks) - len(kept)

"""Masks: RTSTRUCT rasterisation against a known phantom, SEG round trip, NIfTI, problems."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tasks.harmonise.config import HarmoniseConfig
from tasks.harmonise.masks import (
    Mask,
    fill_polygon,
    nifti_mask,
    rtstruct_masks,
    seg_masks,
    unique_rois,
)
from tasks.harmonise.series import nifti_bytes
from tasks.harmonise.volume import read_volume, resample_to_spacing
from tasks.records import Reason
from tests.dicom_factory import (
    Geometry,
    image_series,
    oblique_direction,
    rtstruct,
    segmentation,
    sphere_contours,
    to_bytes,
    uid,
)

CFG = HarmoniseConfig()


def reread(ds):
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def image_of(g: Geometry, key: str = "img"):
    datasets = [reread(ds) for ds in image_series(np.zeros(g.size[::-1]), g, series_key=key)]
    return datasets, read_volume(datasets, CFG)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("oblique", [False, True])
def test_rtstruct_sphere_phantom_dice_and_volume(oblique: bool) -> None:
    direction = oblique_direction(33.0, (2, 1, 1)) if oblique else (1, 0, 0, 0, 1, 0, 0, 0, 1)
    g = Geometry(
        size=(48, 48, 48), spacing=(1.0, 1.0, 1.0), origin=(-24, -23, -22), direction=direction
    )
    datasets, vol = image_of(g)
    centre, radius = g.physical(np.array([23.4, 22.8, 24.1])), 14.0
    rt = reread(rtstruct(datasets, {"GTV-1": sphere_contours(g, centre, radius, n_points=96)}))
    result = rtstruct_masks(rt, vol.image, vol.frame_of_reference, CFG)
    assert not result.problems
    (mask,) = result.masks
    assert mask.roi == "gtv"
    got = sitk.GetArrayFromImage(mask.image).astype(bool)
    truth = np.linalg.norm(g.points() - centre, axis=-1) <= radius
    assert dice(got, truth) >= 0.95
    volume_mm3 = got.sum() * np.prod(g.spacing)
    assert volume_mm3 == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.03)
    # Geometry is the image's, so the mask overlays the image exactly.
    assert mask.image.GetOrigin() == vol.image.GetOrigin()
    assert mask.image.GetDirection() == vol.image.GetDirection()


def test_fill_polygon_pixel_centres_and_holes() -> None:
    # Square with corners at half-pixels: exactly the 4x4 pixels centred 2..5.
    x = np.array([1.5, 5.5, 5.5, 1.5])
    y = np.array([1.5, 1.5, 5.5, 5.5])
    square = fill_polygon(x, y, (8, 8))
    assert square.sum() == 16 and square[2:6, 2:6].all()
    # Right triangle below the diagonal x = y + 0.5: centres with i > j + 0.5, i.e. i > j.
    tri = fill_polygon(np.array([0.5, 8.0, 8.0]), np.array([0.0, 0.0, 7.5]), (8, 8))
    jj, ii = np.mgrid[0:8, 0:8]
    assert np.array_equal(tri, (ii > jj) & (ii >= 1))
    # Vertices outside the matrix are clipped, not wrapped.
    big = fill_polygon(np.array([-5.0, 12.0, 12.0, -5.0]), np.array([-5.0, -5.0, 3.5, 3.5]), (8, 8))
    assert big[:4].all() and not big[4:].any()
    # A ring: two contours on one plane combine by XOR (inner contour is a hole).
    g = Geometry(size=(40, 40, 3), spacing=(1.0, 1.0, 2.0), origin=(-20, -20, 0))
    datasets, vol = image_of(g)
    c = g.physical(np.array([19.8, 19.6, 1.0]))
    outer = sphere_contours(g, c, 15.0)
    inner = sphere_contours(g, c, 7.0)
    rt = reread(rtstruct(datasets, {"GTV": [outer[1], inner[1]]}))
    (mask,) = rtstruct_masks(rt, vol.image, vol.frame_of_reference, CFG).masks
    plane = sitk.GetArrayFromImage(mask.image)[1].astype(bool)
    pts = g.points()[1]
    r = np.linalg.norm(pts - c, axis=-1)
    assert dice(plane, (r <= 15.0) & (r > 7.0)) > 0.97
    assert not plane[20, 20]


def test_roi_map_numbers_merges_and_ignores() -> None:
    g = Geometry(size=(30, 30, 10), spacing=(1.0, 1.0, 2.0), origin=(-15, -15, 0))
    datasets, vol = image_of(g)
    a = sphere_contours(g, g.physical(np.array([8.0, 8.0, 5.0])), 4.0)
    b = sphere_contours(g, g.physical(np.array([20.0, 20.0, 5.0])), 4.0)
    rt = reread(rtstruct(datasets, {"GTV-1": a, "gtv 2": b, "Spinal Cord": a, "Tumour": b}))
    result = rtstruct_masks(rt, vol.image, vol.frame_of_reference, CFG)
    assert result.ignored == 1
    # Three ROIs map to "gtv": one mask each, numbered in ROI-number order.
    assert [m.roi for m in result.masks] == ["gtv", "gtv-2", "gtv-3"]
    assert [m.parameters["roi_numbers"] for m in result.masks] == [[1], [2], [4]]
    first, second = (sitk.GetArrayFromImage(m.image) for m in result.masks[:2])
    assert first[5, 8, 8] == 1 and first[5, 20, 20] == 0 and second[5, 20, 20] == 1
    merged = HarmoniseConfig(roi_duplicates="merge")
    (union,) = rtstruct_masks(rt, vol.image, vol.frame_of_reference, merged).masks
    assert union.roi == "gtv" and union.parameters["roi_numbers"] == [1, 2, 4]
    arr = sitk.GetArrayFromImage(union.image)
    assert arr[5, 8, 8] == 1 and arr[5, 20, 20] == 1  # union, not XOR, across ROIs
    custom = HarmoniseConfig(roi_map={"cord": [r"spinal\s*cord"], "gtv": [r"gtv.*"]})
    names = [m.roi for m in rtstruct_masks(rt, vol.image, vol.frame_of_reference, custom).masks]
    assert names == ["cord", "gtv", "gtv-2"]  # GTV-1, gtv 2 (Tumour is not mapped)


def test_rtstruct_problems_have_reasons() -> None:
    g = Geometry(size=(30, 30, 10), spacing=(1.0, 1.0, 2.0), origin=(-15, -15, 0))
    datasets, vol = image_of(g)
    inside = sphere_contours(g, g.physical(np.array([15.0, 15.0, 5.0])), 4.0)
    far = [c + np.array([0.0, 500.0, 0.0]) for c in inside]
    edge = [c + np.array([12.0, 0.0, 0.0]) for c in inside]  # crosses the x border
    tiny = [np.array([[0.1, 0.1, 10.0], [0.3, 0.1, 10.0], [0.2, 0.3, 10.0]])]  # no voxel centre
    rt = reread(rtstruct(datasets, {"GTV": far, "Tumor": edge, "Lesion": tiny}))
    # Three ROIs merged into one name: the far one makes the merged mask quarantined.
    result = rtstruct_masks(
        rt, vol.image, vol.frame_of_reference, HarmoniseConfig(roi_duplicates="merge")
    )
    assert [(p.roi, p.reason) for p in result.problems] == [("gtv", Reason.MASK_OUTSIDE_IMAGE)]
    separate = HarmoniseConfig(roi_map={"a": ["gtv"], "b": ["tumor"], "c": ["lesion"]})
    result = rtstruct_masks(rt, vol.image, vol.frame_of_reference, separate)
    reasons = {p.roi: (p.reason, p.detail) for p in result.problems}
    assert reasons["a"] == (Reason.MASK_OUTSIDE_IMAGE, "a: entirely outside the image")
    assert reasons["b"] == (Reason.MASK_OUTSIDE_IMAGE, "b: partly outside the image")
    assert reasons["c"][0] == Reason.EMPTY_MASK
    clipped = HarmoniseConfig(roi_map={"b": ["tumor"]}, allow_partial_outside=True)
    (mask,) = rtstruct_masks(rt, vol.image, vol.frame_of_reference, clipped).masks
    assert sitk.GetArrayFromImage(mask.image)[:, :, -1].any()
    other_for = reread(rtstruct(datasets, {"GTV": inside}, frame_of_reference=uid("other")))
    result = rtstruct_masks(other_for, vol.image, vol.frame_of_reference, CFG)
    assert [p.reason for p in result.problems] == [Reason.FRAME_OF_REFERENCE_MISMATCH]
    assert not result.masks


@pytest.mark.parametrize("oblique", [False, True])
def test_seg_round_trip_is_exact(oblique: bool) -> None:
    direction = oblique_direction(21.0, (0, 1, 3)) if oblique else (1, 0, 0, 0, 1, 0, 0, 0, 1)
    g = Geometry(
        size=(24, 20, 14), spacing=(0.7, 0.9, 2.5), origin=(5, -9, 40), direction=direction
    )
    datasets, vol = image_of(g)
    rng = np.random.default_rng(4)
    gtv = np.zeros(g.size[::-1], np.uint8)
    gtv[3:9, 4:15, 6:18] = rng.random((6, 11, 12)) > 0.3
    other = np.zeros_like(gtv)
    other[10:12, 1:5, 1:4] = 1
    # Shuffle the source order: SEG frames are placed by position, not by order.
    order = rng.permutation(len(datasets))
    seg = segmentation([datasets[i] for i in order], {"GTV-1": gtv[order], "Heart": other[order]})
    result = seg_masks(to_bytes(seg), vol.image, vol.frame_of_reference, CFG)
    assert not result.problems and result.ignored == 1
    (mask,) = result.masks
    assert mask.roi == "gtv"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask.image), gtv)
    assert mask.parameters["seg_voxels"] == int(gtv.sum())


def test_seg_frame_of_reference_mismatch() -> None:
    g = Geometry(size=(16, 16, 6), spacing=(1.0, 1.0, 2.0))
    datasets, vol = image_of(g)
    m = np.zeros(g.size[::-1], np.uint8)
    m[2:4, 3:9, 3:9] = 1
    seg = segmentation(datasets, {"Tumour": m})
    result = seg_masks(to_bytes(seg), vol.image, uid("another"), CFG)
    assert [(p.roi, p.reason) for p in result.problems] == [
        ("gtv", Reason.FRAME_OF_REFERENCE_MISMATCH)
    ]
    with pytest.raises(Exception, match="segmentation cannot be read"):
        seg_masks(b"not dicom", vol.image, vol.frame_of_reference, CFG)


def test_nifti_mask_round_trip_and_outside() -> None:
    g = Geometry(
        size=(20, 18, 8), spacing=(1.0, 1.2, 3.0), origin=(0, 0, 0), direction=oblique_direction(10)
    )
    _, vol = image_of(g)
    arr = np.zeros(g.size[::-1], np.uint8)
    arr[2:5, 3:9, 4:11] = 1
    label = sitk.GetImageFromArray(arr)
    label.CopyInformation(vol.image)
    mask = nifti_mask(nifti_bytes(label), "GTV-1", vol.image, CFG)
    assert mask.roi == "gtv"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask.image), arr)
    shifted = sitk.Image(label)
    shifted.SetOrigin(tuple(np.array(label.GetOrigin()) + 300.0))
    with pytest.raises(Exception) as info:
        nifti_mask(nifti_bytes(shifted), "gtv", vol.image, CFG)
    assert info.value.reason == Reason.MASK_OUTSIDE_IMAGE


def test_label_safe_resampling_and_merge() -> None:
    g = Geometry(size=(30, 30, 10), spacing=(1.0, 1.0, 3.0))
    _, vol = image_of(g)
    arr = np.zeros(g.size[::-1], np.uint8)
    arr[3:7, 10:20, 10:20] = 1
    label = sitk.GetImageFromArray(arr)
    label.CopyInformation(vol.image)
    for interpolator in ("nearest", "label-gaussian"):
        out = resample_to_spacing(label, (1.0, 1.0, 1.0), interpolator)
        values = np.unique(sitk.GetArrayFromImage(out))
        assert set(values.tolist()) <= {0, 1}
        assert out.GetPixelID() == sitk.sitkUInt8
        vol_ratio = sitk.GetArrayFromImage(out).sum() * 1.0 / (arr.sum() * 3.0)
        assert vol_ratio == pytest.approx(1.0, rel=0.1)
    a = Mask("gtv", label, {"from": "seg"})
    kept, dropped = unique_rois([Mask("node", label), a, Mask("gtv", label, {"from": "rt"})])
    assert [m.roi for m in kept] == ["gtv", "node"] and dropped == 1
    assert kept[0].parameters == {"from": "seg"}

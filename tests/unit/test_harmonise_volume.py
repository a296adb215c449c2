"""Series → volume: geometry, ordering, missing slices, tilt, multiframe, rescale."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tasks.harmonise.config import HarmoniseConfig
from tasks.harmonise.quarantine import Quarantined
from tasks.harmonise.volume import read_volume, resample_to_spacing
from tasks.records import Reason
from tests.dicom_factory import (
    Geometry,
    enhanced_ct,
    image_series,
    oblique_direction,
    to_bytes,
)

CFG = HarmoniseConfig()


def reread(datasets):
    """Write and read back, as the flow does (DS strings, real file encoding)."""
    return [pydicom.dcmread(io.BytesIO(to_bytes(ds))) for ds in datasets]


def lesion_volume(geometry: Geometry, centre: np.ndarray, radius: float) -> np.ndarray:
    """HU volume: -1000 background with a +300 HU ball, (z, y, x)."""
    inside = np.linalg.norm(geometry.points() - centre, axis=-1) <= radius
    return np.where(inside, 300.0, -1000.0)


def centroid_mm(image: sitk.Image, threshold: float) -> np.ndarray:
    """Physical centroid of the voxels above ``threshold`` (weighted by excess)."""
    arr = sitk.GetArrayFromImage(image).astype(float)
    w = np.clip(arr - threshold, 0, None)
    zyx = np.argwhere(w > 0)
    weights = w[w > 0]
    idx = (zyx[:, ::-1] * weights[:, None]).sum(axis=0) / weights.sum()
    return np.array(image.TransformContinuousIndexToPhysicalPoint(idx.tolist()))


GEOMETRIES = {
    "axial": Geometry(size=(40, 36, 24), spacing=(0.9, 0.9, 2.0), origin=(-18.0, -16.2, -23.0)),
    "oblique": Geometry(
        size=(40, 36, 24),
        spacing=(0.8, 1.1, 1.5),
        origin=(12.5, -40.0, 101.0),
        direction=oblique_direction(27.0, (1, -2, 0.5)),
    ),
    "sagittal": Geometry(
        size=(32, 30, 20),
        spacing=(1.2, 1.2, 2.5),
        origin=(-20.0, -18.0, 40.0),
        direction=(0, 0, -1, 1, 0, 0, 0, -1, 0),
    ),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_lesion_centre_and_grid_preserved(name: str) -> None:
    g = GEOMETRIES[name]
    centre = g.physical(np.array([21.3, 15.6, 11.4]))
    vol = read_volume(reread(image_series(lesion_volume(g, centre, 6.0), g)), CFG)
    image = vol.image
    assert image.GetSize() == g.size
    np.testing.assert_allclose(image.GetSpacing(), g.spacing, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), g.origin, atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), g.direction, atol=1e-5)
    error = np.linalg.norm(centroid_mm(image, 0.0) - centre)
    assert error < 0.5 * min(g.spacing)


def test_planes_stacked_against_the_normal_are_reordered() -> None:
    # Planes written along -(row x column): the volume is re-sorted along the normal.
    g = Geometry(
        size=(30, 28, 16),
        spacing=(1.0, 1.0, 2.0),
        origin=(-15.0, -14.0, 20.0),
        direction=(0, 0, 1, 1, 0, 0, 0, -1, 0),  # left-handed stacking direction
    )
    centre = g.physical(np.array([14.2, 12.7, 9.3]))
    image = read_volume(reread(image_series(lesion_volume(g, centre, 5.0), g)), CFG).image
    assert np.linalg.det(np.array(image.GetDirection()).reshape(3, 3)) == pytest.approx(1.0)
    np.testing.assert_allclose(image.GetOrigin(), g.position(15), atol=1e-5)
    assert np.linalg.norm(centroid_mm(image, 0.0) - centre) < 0.5


@pytest.mark.parametrize("name", ["axial", "oblique"])
def test_lesion_centre_preserved_after_resampling(name: str) -> None:
    g = GEOMETRIES[name]
    centre = g.physical(np.array([20.2, 17.7, 12.1]))
    vol = read_volume(reread(image_series(lesion_volume(g, centre, 6.0), g)), CFG)
    target = (1.0, 1.0, 1.0)
    resampled = resample_to_spacing(vol.image, target, "bspline", default=-1000.0)
    assert resampled.GetSpacing() == target
    np.testing.assert_allclose(resampled.GetDirection(), g.direction, atol=1e-5)
    error = np.linalg.norm(centroid_mm(resampled, -350.0) - centre)
    assert error < 0.5 * min(target)


def test_reversed_and_shuffled_instance_order_give_same_volume() -> None:
    g = GEOMETRIES["oblique"]
    values = np.random.default_rng(3).integers(-1000, 2000, size=g.size[::-1]).astype(float)
    datasets = reread(image_series(values, g))
    reference = read_volume(datasets, CFG).image
    reversed_ds = datasets[::-1]
    for k, ds in enumerate(reversed_ds):  # InstanceNumber now runs against the geometry
        ds.InstanceNumber = k + 1
    shuffled = [datasets[i] for i in np.random.default_rng(5).permutation(len(datasets))]
    for order in (reversed_ds, shuffled):
        other = read_volume(order, CFG).image
        assert np.array_equal(sitk.GetArrayFromImage(other), sitk.GetArrayFromImage(reference))
        assert other.GetOrigin() == reference.GetOrigin()
        assert other.GetDirection() == reference.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reference), values)


def test_missing_slice_is_quarantined() -> None:
    g = GEOMETRIES["axial"]
    datasets = reread(image_series(np.zeros(g.size[::-1]), g))
    del datasets[7]
    with pytest.raises(Quarantined) as info:
        read_volume(datasets, CFG)
    assert info.value.reason == Reason.MISSING_SLICE
    assert "1 plane(s) missing" in info.value.detail


def test_uneven_spacing_and_duplicates_are_quarantined() -> None:
    g = GEOMETRIES["axial"]
    datasets = reread(image_series(np.zeros(g.size[::-1]), g))
    moved = [pydicom.dcmread(io.BytesIO(to_bytes(ds))) for ds in datasets]
    pos = [float(v) for v in moved[5].ImagePositionPatient]
    moved[5].ImagePositionPatient = [pos[0], pos[1], pos[2] + 0.7]  # 2.0 mm gaps → 2.7/1.3
    with pytest.raises(Quarantined) as info:
        read_volume(moved, CFG)
    assert info.value.reason == Reason.INCONSISTENT_SPACING
    with pytest.raises(Quarantined) as info:
        read_volume([*datasets, datasets[3]], CFG)
    assert info.value.reason == Reason.DUPLICATE_POSITION
    # Within tolerance (2 % of the gap): accepted, median spacing kept.
    moved[5].ImagePositionPatient = [pos[0], pos[1], pos[2] + 0.04]
    assert read_volume(moved, CFG).image.GetSpacing()[2] == pytest.approx(2.0)


def test_orientation_mismatch_is_quarantined() -> None:
    g = GEOMETRIES["axial"]
    datasets = reread(image_series(np.zeros(g.size[::-1]), g))
    datasets[2].ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
    with pytest.raises(Quarantined) as info:
        read_volume(datasets, CFG)
    assert info.value.reason == Reason.INCONSISTENT_ORIENTATION


def tilted_series(tilt_deg: float):
    """A CT whose planes are tilted about x while the table moves along z (gantry tilt)."""
    t = np.radians(tilt_deg)
    # Rows along x; columns tilted in the y-z plane; planes stacked along z.
    direction = np.column_stack([[1, 0, 0], [0, np.cos(t), np.sin(t)], [0, -np.sin(t), np.cos(t)]])
    normal_spacing = 2.0 * np.cos(t)  # table step 2 mm along z, projected on the normal
    g = Geometry(
        size=(36, 36, 20),
        spacing=(1.0, 1.0, normal_spacing),
        origin=(-17.5, -17.5, -19.0),
        direction=tuple(direction.ravel()),
    )
    # The true plane k is at origin + k * (0, 0, 2): shear = table step minus normal step.
    shear = (np.array([0.0, 0.0, 2.0]) - normal_spacing * direction[:, 2]) / normal_spacing
    true_points = g.points() + shear * (np.arange(20) * normal_spacing)[:, None, None, None]
    centre = np.array([1.3, -2.2, 0.7])
    inside = np.linalg.norm(true_points - centre, axis=-1) <= 6.0
    values = np.where(inside, 300.0, -1000.0)
    return g, image_series(values, g, shear=tuple(shear)), centre, normal_spacing


def test_gantry_tilt_resampled_keeps_lesion_position() -> None:
    g, datasets, centre, normal_spacing = tilted_series(15.0)
    vol = read_volume(reread(datasets), CFG)
    assert vol.parameters["tilt_resampled"] is True
    assert vol.parameters["tilt_deg"] == pytest.approx(15.0, abs=0.05)
    image = vol.image
    assert image.GetSize()[2] == 20
    assert image.GetSize()[1] > 36  # grown to cover the sheared stack
    np.testing.assert_allclose(image.GetDirection(), g.direction, atol=1e-5)
    assert image.GetSpacing()[2] == pytest.approx(normal_spacing, abs=1e-4)
    error = np.linalg.norm(centroid_mm(image, -350.0) - centre)
    assert error < 0.5 * min(image.GetSpacing())


def test_gantry_tilt_quarantined_when_configured() -> None:
    _, datasets, _, _ = tilted_series(12.0)
    with pytest.raises(Quarantined) as info:
        read_volume(reread(datasets), HarmoniseConfig(gantry_tilt="quarantine"))
    assert info.value.reason == Reason.GANTRY_TILT


def test_ct_hu_exact_against_stored_values() -> None:
    g = GEOMETRIES["axial"]
    rng = np.random.default_rng(1)
    hu = rng.integers(-1024, 3071, size=g.size[::-1]).astype(float)
    datasets = reread(image_series(hu, g, slope=1.0, intercept=-1024.0, dtype=np.uint16))
    image = read_volume(datasets, CFG).image
    assert image.GetPixelID() == sitk.sitkInt16
    stored = np.stack([ds.pixel_array for ds in datasets]).astype(np.int64)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), stored - 1024)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)


def test_enhanced_multiframe_per_frame_rescale_and_order() -> None:
    g = GEOMETRIES["oblique"]
    rng = np.random.default_rng(2)
    hu = rng.integers(-1000, 1500, size=g.size[::-1]).astype(float)
    slopes = [1.0 + 0.5 * (k % 3) for k in range(g.size[2])]
    ds = reread([enhanced_ct(hu, g, slopes=slopes)])[0]
    vol = read_volume([ds], CFG)
    image = vol.image
    assert vol.parameters["multiframe"] is True
    np.testing.assert_allclose(image.GetOrigin(), g.origin, atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), g.direction, atol=1e-5)
    # Frames are stored in reverse order; frame f holds plane k = n-1-f.
    stored = ds.pixel_array[::-1].astype(np.float64)
    expected = stored * np.array(slopes)[:, None, None] - 1024.0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected.astype(np.float32))
    assert np.max(np.abs(sitk.GetArrayFromImage(image) - hu)) <= max(slopes) / 2


def test_unsupported_inputs_are_quarantined() -> None:
    g = GEOMETRIES["axial"]
    datasets = reread(image_series(np.zeros(g.size[::-1]), g))
    del datasets[4].PixelData
    with pytest.raises(Quarantined) as info:
        read_volume(datasets, CFG)
    assert info.value.reason == Reason.UNSUPPORTED_IMAGE
    with pytest.raises(Quarantined):
        read_volume([], CFG)


@pytest.mark.parametrize("signed", [False, True])
def test_bits_stored_below_bits_allocated(signed: bool) -> None:
    g = Geometry(size=(6, 5, 3))
    datasets = image_series(np.zeros((3, 5, 6)), g, intercept=0.0, dtype=np.uint16)
    rng = np.random.default_rng(9)
    expected = []
    for ds in datasets:
        low = rng.integers(0, 4096, size=(5, 6)).astype(np.uint16)
        garbage = rng.integers(0, 16, size=(5, 6)).astype(np.uint16) << 12
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
        ds.PixelData = (low | garbage).tobytes()
        value = low.astype(np.int32)
        if signed:
            value = np.where(value >= 2048, value - 4096, value)
        expected.append(value)
    datasets = reread(datasets)
    image = read_volume(datasets, CFG).image
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.stack(expected))
    # The same values as pydicom's own decoder.
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(image), np.stack([ds.pixel_array for ds in datasets])
    )


def test_compressed_series_decodes_to_the_same_volume() -> None:
    from pydicom.uid import RLELossless

    g = GEOMETRIES["oblique"]
    hu = np.random.default_rng(6).integers(-1024, 3000, size=g.size[::-1]).astype(float)
    native = reread(image_series(hu, g))
    compressed = reread(image_series(hu, g))
    for ds in compressed:
        ds.compress(RLELossless)
    compressed = reread(compressed)
    assert compressed[0].file_meta.TransferSyntaxUID == RLELossless
    a = read_volume(native, CFG).image
    b = read_volume(compressed, CFG).image
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(b), hu)

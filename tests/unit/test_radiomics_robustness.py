"""Robustness: ICC(3,1), replicas and negative controls on real pyradiomics, through the cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from tasks.radiomics.cache import read_parts
from tasks.radiomics.extract import RoiUnit, plan_units
from tasks.radiomics.params import validate_params
from tasks.radiomics.robustness import (
    REPLICAS,
    correlation,
    icc_3_1,
    make_variant,
    random_roi,
    robustness_image,
    robustness_table,
    robustness_unit,
    shuffled_roi,
    translated,
)
from tasks.radiomics.samples import SampleRoi, SampleSeries, series_key, write_harmonised_sample
from tasks.store import SiteStore

PARAMS = validate_params(
    {
        "setting": {"binWidth": 25},
        "featureClass": {"shape": ["VoxelVolume"], "firstorder": ["Mean"], "glcm": ["Correlation"]},
    }
)


def test_icc_reference_and_identical_replicas():
    # Shrout and Fleiss (1979), Table 2: six targets, four judges; ICC(3,1) = 0.71
    ratings = np.array(
        [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    )
    assert icc_3_1(ratings) == pytest.approx(0.7148, abs=1e-4)
    same = np.repeat(np.array([[1.0], [4.0], [2.5], [9.0]]), len(REPLICAS), axis=1)
    assert icc_3_1(same) == 1.0
    assert math.isnan(icc_3_1(np.ones((4, 3))))
    values = {
        f"s{i}/gtv": {r: {"original_firstorder_Mean": float(i * i)} for r in REPLICAS}
        for i in range(5)
    }
    table = robustness_table(values)
    row = table.to_pylist()[0]
    assert row["feature"] == "original_firstorder_Mean" and row["ibsi"] == "Q4LE"
    assert row["icc"] == 1.0 and row["stable"] and row["n_rois"] == 5
    assert math.isnan(row["corr_shuffled"])  # no control computed


def test_variants_geometry():
    noise = np.random.default_rng(1).normal(40, 20, (16, 20, 20))
    noise[:, :, :6] = -1000.0  # air
    image = sitk.GetImageFromArray(noise)
    mask_array = np.zeros((16, 20, 20), np.uint8)
    mask_array[6:10, 8:12, 8:12] = 1
    mask = sitk.GetImageFromArray(mask_array)
    erode = sitk.GetArrayFromImage(make_variant("erode", image, mask, "k")[1])
    dilate = sitk.GetArrayFromImage(make_variant("dilate", image, mask, "k")[1])
    assert erode.sum() == 2 * 2 * 2 and dilate.sum() > mask_array.sum()
    moved_image, moved_mask = translated(image, mask, 1.0 / 3.0)
    # trilinear partial volumes kept from 0.5 (MIRP): corners and edges of the cube drop out
    assert 40 < sitk.GetArrayFromImage(moved_mask).sum() < mask_array.sum()
    shifted = sitk.GetArrayFromImage(moved_image)[1:-1, 1:-1, 1:-1]
    assert not np.allclose(shifted, sitk.GetArrayFromImage(image)[1:-1, 1:-1, 1:-1])
    shuffled = sitk.GetArrayFromImage(shuffled_roi(image, mask, 3))
    original = sitk.GetArrayFromImage(image)
    inside = mask_array > 0
    assert np.array_equal(shuffled[~inside], original[~inside])
    assert sorted(shuffled[inside]) == sorted(original[inside])
    assert not np.array_equal(shuffled[inside], original[inside])
    moved = sitk.GetArrayFromImage(random_roi(image, mask, 5))
    assert moved.sum() == mask_array.sum() and not (moved.astype(bool) & inside).any()
    assert not moved[:, :, :6].any()  # never in air
    noisy = sitk.GetArrayFromImage(make_variant("noise", image, mask, "k")[0])
    tissue = original[:, :, 6:]
    assert 5 < np.std((noisy - original)[:, :, 6:]) < 2 * np.std(tissue)  # the image's noise


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SiteStore:
    """Ten small CT lesions with the same intensities but textures from fine to coarse."""
    site = SiteStore(str(tmp_path_factory.mktemp("robust")), "site-a")
    specs = [
        SampleSeries(series_key(i), "CT", size=(20, 20, 12), rois=(SampleRoi("gtv", 7.0),), seed=i)
        for i in range(10)
    ]
    write_harmonised_sample(site, specs)
    for i, unit in enumerate(plan_units(site)):
        # the lesion's texture: noise smoothed by a width that grows with i, then ranked onto
        # the same intensities, so only the spatial structure differs between ROIs
        image = sitk.ReadImage(site.path(unit.image))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(site.path(unit.mask))) > 0
        rng = np.random.default_rng(100 + i)
        noise = sitk.GetImageFromArray(rng.normal(size=mask.shape))
        smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, 0.3 + 0.25 * i))
        array = sitk.GetArrayFromImage(image).astype(np.int16)
        ranks = np.argsort(np.argsort(smooth[mask]))
        array[mask] = np.sort(np.linspace(-100, 300, mask.sum()).astype(np.int16))[ranks]
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        sitk.WriteImage(out, site.path(unit.image))
    # rewrite hashes after the edit
    from tasks.radiomics.samples import HARMONISED_SCHEMA
    from tasks.store import HARMONISED_SERIES, sha256_bytes

    table = site.read_table(HARMONISED_SERIES).to_pylist()
    for row in table:
        row["image_sha256"] = sha256_bytes(site.read_bytes(row["image"]))
    import pyarrow as pa

    site.write_table(HARMONISED_SERIES, pa.Table.from_pylist(table, schema=HARMONISED_SCHEMA))
    return site


def _values(store: SiteStore, units: list[RoiUnit]) -> dict:
    out = {}
    for unit in units:
        outcome = robustness_unit(store, unit, PARAMS)
        assert outcome.status == "ok", outcome
        parts = read_parts(store, [k for ks in outcome.variants.values() for k in ks])
        out[unit.key] = {
            name: {k: v for key in keys for k, v in (parts[key].features or {}).items()}
            for name, keys in outcome.variants.items()
        }
    return out


def test_controls_on_real_features_and_the_cache(store):
    units = plan_units(store)
    values = _values(store, units)
    table = {r["feature"]: r for r in robustness_table(values).to_pylist()}
    texture = table["original_glcm_Correlation"]
    # shuffling inside the ROI keeps the intensities and the mask: first order and shape unchanged
    for unit in units:
        for name in ("original_firstorder_Mean", "original_shape_VoxelVolume"):
            assert values[unit.key]["shuffled"][name] == values[unit.key]["original"][name]
    originals = [values[u.key]["original"]["original_glcm_Correlation"] for u in units]
    shuffled = [values[u.key]["shuffled"]["original_glcm_Correlation"] for u in units]
    assert np.std(originals) > 0.1 and max(abs(v) for v in shuffled) < 0.2
    assert abs(texture["corr_shuffled"]) < 0.5
    assert texture["corr_random_roi"] is not None and texture["icc"] > 0.5
    assert texture["n_rois"] == len(units)
    # a rerun finds every variant in the cache
    again = robustness_unit(store, units[0], PARAMS)
    assert again.computed == 0 and set(again.variants) == set(values[units[0].key])


def test_correlation_edge_cases():
    assert correlation([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert math.isnan(correlation([1, 2, 3], [5, 5, 5]))
    assert correlation([1, 2, 3, math.nan, 5], [1, 2, 3, 9, 5]) == pytest.approx(1.0)


def test_rois_of_one_image_share_its_shifted_and_noisy_images(tmp_path):
    """Two ROIs of one image: one task, the mask-independent variant images made once."""
    store = SiteStore(str(tmp_path / "store"), "site-a")
    spec = SampleSeries(
        series_key(70),
        "CT",
        size=(24, 24, 12),
        rois=(SampleRoi("gtv", 6.0), SampleRoi("node", 3.5)),
    )
    write_harmonised_sample(store, [spec])
    units = plan_units(store)
    both = robustness_image(store, units, PARAMS)
    assert [o.key for o in both] == [u.key for u in units]
    assert all(o.status == "ok" for o in both)

    def image_hash(outcome, name):
        return outcome.variants[name][0].split("/")[-3]

    for name in ("shift-1", "shift-2", "noise"):  # same image for both ROIs: filtered once
        assert image_hash(both[0], name) == image_hash(both[1], name)
    assert image_hash(both[0], "shuffled") != image_hash(both[1], "shuffled")  # ROI-specific
    # one ROI alone finds the same cache entries: nothing computed, same keys
    alone = robustness_unit(store, units[1], PARAMS)
    assert alone.computed == 0 and alone.variants == both[1].variants

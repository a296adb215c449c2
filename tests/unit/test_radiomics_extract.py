"""One (series, ROI) extraction: equivalence with pyradiomics, defective ROIs, the part cache."""

import math
from pathlib import Path

import pytest
from radiomics.featureextractor import RadiomicsFeatureExtractor

from tasks.radiomics.cache import CACHE_PREFIX, part_for_feature, plan_parts, read_parts
from tasks.radiomics.extract import extract_image_rois, extract_roi, plan_units, select_units
from tasks.radiomics.params import Preset, load_params, validate_params
from tasks.radiomics.samples import (
    SampleRoi,
    SampleSeries,
    series_key,
    write_harmonised_sample,
)
from tasks.records import Reason, Status
from tasks.store import SiteStore

CT = SampleSeries(
    series_key(1),
    "CT",
    size=(36, 36, 16),
    rois=(
        SampleRoi("gtv", 7.0),
        SampleRoi("node", 4.0),
        SampleRoi("empty", kind="empty"),
        SampleRoi("one", kind="one-voxel"),
        SampleRoi("outside", 6.0, kind="outside"),
        SampleRoi("tiny", 1.0, kind="flat"),
        SampleRoi("shifted", 6.0, kind="shifted"),
    ),
    seed=3,
)
DEFECTS = [
    ("empty", Reason.EMPTY_MASK),
    ("one", Reason.ONE_VOXEL_MASK),
    ("outside", Reason.MASK_OUTSIDE_IMAGE),
    ("tiny", Reason.ROI_TOO_SMALL),
    ("shifted", Reason.MASK_GEOMETRY_MISMATCH),
]
MR = SampleSeries(series_key(2), "MR", size=(28, 28, 12), rois=(SampleRoi("gtv", 4.0),), seed=4)


@pytest.fixture()
def store(tmp_path: Path) -> SiteStore:
    store = SiteStore(str(tmp_path / "store"), "site-a")
    write_harmonised_sample(store, [CT, MR])
    return store


def features_of(store: SiteStore, parts: tuple[str, ...]) -> dict[str, float]:
    cached = read_parts(store, list(parts))
    out: dict[str, float] = {}
    for key in parts:
        out.update(cached[key].features or {})
    return out


def unit(store: SiteStore, series: str, roi: str):
    (found,) = select_units(plan_units(store), [series], [roi])
    return found


def assert_same_features(ours: dict[str, float], reference: dict, rel: float = 1e-9) -> None:
    expected = {k: float(v) for k, v in reference.items() if not k.startswith("diagnostics_")}
    assert list(ours) and set(ours) == set(expected)
    for name, value in expected.items():
        got = ours[name]
        if math.isnan(value):
            assert math.isnan(got), name
        else:
            assert abs(got - value) <= rel * max(abs(value), 1e-300), (name, got, value)


@pytest.mark.parametrize(("preset", "spec"), [(Preset.CT, CT), (Preset.MR, MR)])
def test_features_equal_pyradiomics_execute(store, preset, spec):
    """Original + LoG + Wavelet, through the store and the cache, equal a direct execute()."""
    params, _ = load_params(preset.value)
    u = unit(store, spec.series, "gtv")
    outcome = extract_roi(store, u, params)
    assert outcome.result.status == Status.OK, outcome
    ours = features_of(store, outcome.result.outputs)
    # pyradiomics reads the raw preset YAML and the NIfTI files itself
    reference = RadiomicsFeatureExtractor(str(preset.path)).execute(
        store.path(u.image), store.path(u.mask)
    )
    assert_same_features(ours, reference)
    names = set(ours)
    assert any(n.startswith("original_shape_") for n in names)
    assert any(n.startswith("log-sigma-3-0-mm-3D_glcm_") for n in names)
    assert any(n.startswith("wavelet-HHL_glszm_") for n in names)


@pytest.mark.parametrize(("roi", "reason"), DEFECTS)
def test_defective_rois_are_quarantined_with_a_reason(store, roi, reason):
    params, _ = load_params("ct")  # minimumROISize 8: the 4-voxel disc is too small
    outcome = extract_roi(store, unit(store, CT.series, roi), params)
    assert outcome.result.status == Status.QUARANTINED
    assert outcome.result.reason == str(reason)
    assert outcome.result.detail and "\n" not in outcome.result.detail
    # the quarantine outcome is cached too: a rerun computes nothing
    again = extract_roi(store, unit(store, CT.series, roi), params)
    assert (again.result.status, again.result.reason, again.written) == (
        outcome.result.status,
        outcome.result.reason,
        0,
    )


def test_missing_or_changed_input_fails_without_raising(store):
    params = validate_params({"imageType": {"Original": {}}, "setting": {"binWidth": 25}})
    u = unit(store, CT.series, "gtv")
    store.remove(u.mask)
    outcome = extract_roi(store, u, params)
    assert (outcome.result.status, outcome.result.error_class) == (Status.FAILED, "InputError")
    assert "missing" in outcome.result.detail
    v = unit(store, MR.series, "gtv")
    store.write_bytes(v.image, b"not a nifti")
    outcome = extract_roi(store, v, params)
    assert outcome.result.status == Status.FAILED
    assert "re-run harmonise" in outcome.result.detail


def _cache_state(store: SiteStore) -> dict[str, float]:
    return store.modified(CACHE_PREFIX)


def test_rerun_computes_and_writes_nothing_and_a_changed_parameter_recomputes_only_its_part(
    store,
):
    ct, _ = load_params("ct")
    u = unit(store, CT.series, "gtv")
    first = extract_roi(store, u, ct)
    assert first.written == len(plan_parts(ct)) == 4  # shape, LoG, Original, Wavelet
    before = _cache_state(store)
    assert len(before) == 4 + 1  # and pyradiomics' diagnostics of the (image, mask) pair
    assert sum("/diagnostics-" in k for k in before) == 1

    again = extract_roi(store, u, ct)
    assert (again.written, again.reused) == (0, 4)
    assert again.result.outputs == first.result.outputs
    assert _cache_state(store) == before  # nothing rewritten

    canonical = ct.canonical()
    canonical["imageType"]["LoG"] = {"sigma": [1.5]}
    changed = validate_params(canonical)
    third = extract_roi(store, u, changed)
    assert (third.written, third.reused) == (1, 3)
    after = _cache_state(store)
    assert len(after) == 6  # diagnostics depend on the global settings only: not rewritten
    assert {k: v for k, v in after.items() if k in before} == before
    # the mixed cached/new result still equals one direct execute() with the new parameters
    reference = RadiomicsFeatureExtractor(changed.canonical()).execute(
        store.path(u.image), store.path(u.mask)
    )
    assert_same_features(features_of(store, third.result.outputs), reference)
    assert any(
        n.startswith("log-sigma-1-5-mm-3D_") for n in features_of(store, third.result.outputs)
    )


def test_rois_of_one_image_share_filtered_images_with_identical_values(store):
    """Every ROI of a series in one call (filters made once) equals execute() per mask, bit
    for bit; defective ROIs among them are quarantined alone, as they are one by one."""
    params, _ = load_params("ct")
    units = select_units(plan_units(store), [CT.series])
    assert len(units) == len(CT.rois)
    outcomes = {o.result.key: o for o in extract_image_rois(store, units, params)}
    extractor = RadiomicsFeatureExtractor(str(Preset.CT.path))
    for u in units:
        if u.roi not in ("gtv", "node"):
            assert outcomes[u.key].result.status == Status.QUARANTINED
            continue
        assert outcomes[u.key].result.status == Status.OK, outcomes[u.key]
        reference = extractor.execute(store.path(u.image), store.path(u.mask))
        assert_same_features(features_of(store, outcomes[u.key].result.outputs), reference, rel=0.0)
    reasons = {u.roi: outcomes[u.key].result.reason for u in units if u.roi not in ("gtv", "node")}
    assert reasons == {roi: str(reason) for roi, reason in DEFECTS}  # as one by one (below)


def test_parts_follow_feature_names():
    assert part_for_feature("original_shape_Sphericity") == "shape"
    assert part_for_feature("original_shape2D_Perimeter") == "shape"
    assert part_for_feature("original_firstorder_Mean") == "Original"
    assert part_for_feature("log-sigma-1-0-mm-3D_glcm_Idm") == "LoG"
    assert part_for_feature("wavelet-LLH_glcm_Contrast") == "Wavelet"
    assert part_for_feature("wavelet2-HHH_ngtdm_Busyness") == "Wavelet"
    assert part_for_feature("squareroot_firstorder_Mean") == "SquareRoot"
    assert part_for_feature("square_firstorder_Mean") == "Square"
    assert part_for_feature("lbp-3D-m1_firstorder_Mean") == "LBP3D"
    with pytest.raises(ValueError):
        part_for_feature("mystery_firstorder_Mean")


def test_units_are_planned_largest_first(store):
    units = plan_units(store)
    assert [u.voxels for u in units] == sorted((u.voxels for u in units), reverse=True)
    assert len(units) == len(CT.rois) + len(MR.rois)
    assert units[0].series == CT.series  # 36x36x16 > 28x28x12
    assert [u.roi for u in select_units(units, rois=["gtv"])] == ["gtv", "gtv"]
    assert [u.series for u in select_units(units, modalities=["mr"])] == [MR.series]


def test_complex_feature_values_become_their_real_part_without_a_warning():
    import warnings

    import numpy as np

    from tasks.radiomics.shared_filters import real_value

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float() of a complex value warns (ComplexWarning)
        values = [np.complex128(0.25 + 0j), np.array(0.5 + 0j), np.float64(2.0), 3, math.nan]
        got = [real_value(v) for v in values]
    assert got[:4] == [0.25, 0.5, 2.0, 3.0] and math.isnan(got[4])
    assert all(type(v) is float for v in got)

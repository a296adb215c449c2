"""The real chain on the synthetic cohort: ingest → deidentify → harmonise vs truth.json.

Geometry, lesion masks (SEG voxel-exact, RTSTRUCT rasterised), HU and SUVbw values and the
planted harmonise fault (a PET without radiopharmaceutical data) are compared with the answer
key the generator wrote.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flows.deidentify import build_params as deid_params
from flows.deidentify import deidentify
from flows.harmonise import build_params, harmonise
from flows.ingest import IngestParams, ingest_dicom
from flows.runtime import RuntimeOptions, dask_cluster
from tasks.deid.pseudonyms import SiteKeys
from tasks.harmonise.config import HarmoniseConfig
from tasks.harmonise.masks import rtstruct_masks
from tasks.records import Stage
from tasks.store import SiteStore
from tasks.synthetic.truth import CohortTruth

# Ingest + deidentify + harmonise of one synthetic site: minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITE = "site-b"
SECRET = "harmonise-chain-secret-0123456789-abcdefghijklmnopq"


@pytest.fixture(scope="module")
def chain(prefect_api: str, synth_cohort: Path, tmp_path_factory: pytest.TempPathFactory):
    previous = os.environ.get("ONCOFLOW_SITE_SECRET")
    os.environ["ONCOFLOW_SITE_SECRET"] = SECRET
    url = str(tmp_path_factory.mktemp("harmonise-chain"))
    runtime = RuntimeOptions(workers=2)
    try:
        with dask_cluster(runtime):
            ingest_dicom(
                IngestParams(source=str(synth_cohort / SITE), site=SITE, store=url), runtime
            )
            deidentify(deid_params(SITE, url), runtime)
            summary = harmonise(build_params(SITE, url), runtime)
        yield {
            "store": SiteStore(url, SITE),
            "summary": summary,
            "truth": CohortTruth.load(synth_cohort / "truth.json").site(SITE),
            "keys": SiteKeys.derive(SECRET.encode(), SITE),
        }
    finally:
        if previous is None:
            os.environ.pop("ONCOFLOW_SITE_SECRET", None)
        else:
            os.environ["ONCOFLOW_SITE_SECRET"] = previous


def read_image(store: SiteStore, key: str) -> sitk.Image:
    with tempfile.NamedTemporaryFile(suffix=".nii.gz") as fh:
        fh.write(store.read_bytes(key))
        fh.flush()
        return sitk.ReadImage(fh.name)


def corners(origin, spacing, direction, size) -> np.ndarray:
    """Physical positions of the 8 corner voxel centres, sorted."""
    pts = [
        np.array(origin) + direction @ (np.array(idx) * (np.array(size) - 1) * np.array(spacing))
        for idx in np.ndindex(2, 2, 2)
    ]
    return np.array(sorted(map(tuple, np.round(pts, 4))))


def roi_name(name: str, index: int) -> str:
    """Truth lesion names (GTV-1, gtv_2, Tumour 2, ...) → harmonised ROI names."""
    return "gtv" if index == 0 else f"gtv-{index + 1}"


def test_every_image_series_against_truth(chain) -> None:
    store, truth, keys = chain["store"], chain["truth"], chain["keys"]
    rows = {r["series"]: r for r in store.read_table("harmonised/series.parquet").to_pylist()}
    checked = {"ok": 0, "quarantined": 0, "lesions": 0}
    for series in truth.series():
        if series.kind != "image" or series.ingest_status != "ok":
            continue
        if series.expected_stage not in (None, str(Stage.HARMONISE)):
            continue
        row = rows[keys.remap_uid(series.series_instance_uid)]
        if series.expected_stage == str(Stage.HARMONISE):
            assert (row["status"], row["reason"]) == ("quarantined", series.expected_reason)
            checked["quarantined"] += 1
            continue
        assert row["status"] == "ok", (series.role, row["reason"])
        geometry = series.geometry
        image = read_image(store, row["image"])
        assert image.GetSize() == tuple(geometry.size)
        np.testing.assert_allclose(image.GetSpacing(), geometry.spacing, atol=1e-4)
        # Same voxel positions; the stacking axis may be described in the other direction
        # (always row x column here, frame order in the truth of a multiframe instance).
        truth_dir = np.array(geometry.direction).reshape(3, 3)
        ours = np.array(image.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(np.abs(ours.T @ truth_dir), np.eye(3), atol=1e-4)
        np.testing.assert_allclose(
            corners(image.GetOrigin(), image.GetSpacing(), ours, image.GetSize()),
            corners(geometry.origin, geometry.spacing, truth_dir, geometry.size),
            atol=0.01,  # DS strings carry 4 decimals of spacing: 64 x 5e-5 mm
        )
        assert row["intensity"] == {"CT": "HU", "PT": "SUVbw", "MR": "MR-none"}[series.modality]
        checked["ok"] += 1
        values = sitk.GetArrayFromImage(image)
        for i, lesion in enumerate(series.lesions):
            name = roi_name(lesion.roi_name, i)
            if name not in row["rois"]:
                continue  # image series without a segmentation object
            mask = sitk.GetArrayFromImage(
                read_image(store, row["masks"][row["rois"].index(name)])
            ).astype(bool)
            # SEG is preferred and voxel-exact: the truth voxel count and mean are reproduced.
            assert mask.sum() == lesion.voxels, (series.role, name)
            assert values[mask].mean() == pytest.approx(lesion.mean, rel=1e-4, abs=1e-3)
            checked["lesions"] += 1
    assert checked["ok"] >= 5 and checked["quarantined"] >= 1 and checked["lesions"] >= 2


def test_pet_suv_matches_hand_formula(chain) -> None:
    store, truth, keys = chain["store"], chain["truth"], chain["keys"]
    rows = {r["series"]: r for r in store.read_table("harmonised/series.parquet").to_pylist()}
    pets = [s for s in truth.series() if s.suv is not None and s.expected_reason is None]
    assert pets
    for series in pets:
        row = rows[keys.remap_uid(series.series_instance_uid)]
        suv = series.suv
        expected_scale = (
            suv.weight_kg
            * 1000
            / (suv.injected_dose_bq * 2 ** (-suv.decay_seconds / suv.half_life_s))
        )
        assert expected_scale == pytest.approx(suv.suv_bw_scale, rel=1e-9)
        values = sitk.GetArrayFromImage(read_image(store, row["image"]))
        assert values.max() > 1.0  # SUV, not Bq/ml
        for i, lesion in enumerate(series.lesions):
            name = roi_name(lesion.roi_name, i)
            if name in row["rois"]:
                mask = read_image(store, row["masks"][row["rois"].index(name)])
                got = values[sitk.GetArrayFromImage(mask).astype(bool)].mean()
                assert got == pytest.approx(lesion.mean, rel=1e-4)


def test_rtstruct_rasterisation_matches_truth_voxels(chain) -> None:
    """The RTSTRUCT of each CT, rasterised on its image, against the truth voxel sets' size."""
    import pydicom

    store, truth, keys = chain["store"], chain["truth"], chain["keys"]
    deid = {r["series"]: r for r in store.read_table("deid/series.parquet").to_pylist()}
    rows = {r["series"]: r for r in store.read_table("harmonised/series.parquet").to_pylist()}
    compared = 0
    for series in truth.series():
        if series.kind != "rtstruct" or series.referenced_series_uid is None:
            continue
        image_row = rows.get(keys.remap_uid(series.referenced_series_uid))
        if image_row is None or image_row["status"] != "ok":
            continue
        rt_row = deid[keys.remap_uid(series.series_instance_uid)]
        ds = pydicom.dcmread(io.BytesIO(store.read_bytes(rt_row["paths"][0])))
        image = read_image(store, image_row["image"])
        for_uid = deid[image_row["series"]]["frame_of_reference"]
        masks = rtstruct_masks(ds, image, for_uid, HarmoniseConfig())
        assert not masks.problems
        for i, lesion in enumerate(series.lesions):
            got = masks.masks[[m.roi for m in masks.masks].index(roi_name(lesion.roi_name, i))]
            voxels = int(sitk.GetArrayFromImage(got.image).sum())
            assert voxels == pytest.approx(lesion.voxels, rel=0.15, abs=3)
            compared += 1
    assert compared >= 1


def test_summary_and_quarantine(chain) -> None:
    summary, store = chain["summary"], chain["store"]
    assert summary.counts.get("failed", 0) == 0
    assert summary.reasons.get("missing-suv-data", 0) >= 1
    rows = store.quarantine_rows(Stage.HARMONISE)
    assert {r["reason"] for r in rows} <= {"missing-suv-data", "missing-referenced-series"}


def test_multiframe_equals_its_single_frame_source(chain) -> None:
    store, truth, keys = chain["store"], chain["truth"], chain["keys"]
    rows = {r["series"]: r for r in store.read_table("harmonised/series.parquet").to_pylist()}
    pairs = 0
    for series in truth.series():
        if series.role != "mr-enhanced" or series.referenced_series_uid is None:
            continue
        enhanced = read_image(store, rows[keys.remap_uid(series.series_instance_uid)]["image"])
        single = read_image(store, rows[keys.remap_uid(series.referenced_series_uid)]["image"])
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(enhanced), sitk.GetArrayFromImage(single)
        )
        np.testing.assert_allclose(enhanced.GetOrigin(), single.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(enhanced.GetDirection(), single.GetDirection(), atol=1e-6)
        pairs += 1
    assert pairs >= 1

"""The harmonise-series flow on real Prefect + Dask (2 workers) over S3 (moto server mode)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from flows.harmonise import build_params, harmonise
from flows.runtime import RuntimeOptions, dask_cluster
from tasks.deid.plan import deid_units
from tasks.harmonise.plan import plan_harmonise, store_key
from tasks.harmonise.series import nifti_bytes
from tasks.records import Stage
from tasks.store import SiteStore
from tests.unit.test_harmonise_series import cases

pytestmark = pytest.mark.integration

CONTRACT = [
    "series", "study", "patient", "modality", "body_part", "manufacturer", "acquisition_date",
    "age_at_study", "sex", "image", "image_sha256", "size", "spacing", "rois", "masks",
    "mask_sha256", "intensity", "status", "reason",
]  # fmt: skip


async def _artifacts(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def read_nifti(store: SiteStore, key: str) -> sitk.Image:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".nii.gz") as fh:
        fh.write(store.read_bytes(key))
        fh.flush()
        return sitk.ReadImage(fh.name)


def rerun(store: SiteStore, url: str, runtime: RuntimeOptions):
    """Run again on unchanged input; return the objects' modification times before, summary."""
    before = store.modified("harmonised")
    return before, harmonise(build_params("site-h", url), runtime)


def record_deid_contents(store: SiteStore) -> dict[str, str]:
    """Record in ``deid/units.parquet`` what de-identification records for each series: the
    SHA-256 over the SHA-256 of its files in order (the test store is written directly)."""
    contents = {}
    for row in store.read_table("deid/series.parquet").to_pylist():
        digest = hashlib.sha256()
        for path in row["paths"]:
            digest.update(hashlib.sha256(store.read_bytes(store_key(path))).digest())
        contents[row["series"]] = digest.hexdigest()
    entries = {s: (f"d-{c[:8]}", {"audit": [], "content": c}) for s, c in contents.items()}
    deid_units(store).write(entries, {})
    return contents


def test_harmonise_flow_on_s3(prefect_api: str, s3_bucket: str) -> None:
    from tests.dicom_factory import deid_store

    store = SiteStore(s3_bucket, "site-h")
    keys = deid_store(store, cases())
    contents = record_deid_contents(store)

    runtime = RuntimeOptions(workers=2)
    with dask_cluster(runtime):  # one cluster for both runs
        summary = harmonise(build_params("site-h", s3_bucket), runtime)
        before, again = rerun(store, s3_bucket, runtime)
    assert summary.counts == {"ok": 2, "quarantined": 1}
    assert summary.reasons == {"missing-slice": 1}
    assert summary.computed == 2 and summary.extra["masks"] == 2

    table = store.read_table("harmonised/series.parquet")
    assert table.column_names == CONTRACT
    rows = {r["series"]: r for r in table.to_pylist()}
    assert table.column("series").to_pylist() == sorted(rows)
    ct, pet, gap = rows[keys["ct"]], rows[keys["pet"]], rows[keys["gap"]]
    assert (ct["intensity"], ct["rois"], ct["status"]) == ("HU", ["gtv"], "ok")
    assert (pet["intensity"], pet["rois"], pet["age_at_study"]) == ("SUVbw", ["gtv"], "061Y")
    assert (gap["status"], gap["reason"], gap["image"]) == ("quarantined", "missing-slice", None)

    # Outputs read back independently: hashes match, image and mask share the grid.
    image_bytes = store.read_bytes(ct["image"])
    assert hashlib.sha256(image_bytes).hexdigest() == ct["image_sha256"]
    image = read_nifti(store, ct["image"])
    mask = read_nifti(store, ct["masks"][0])
    assert image.GetSize() == tuple(ct["size"]) == mask.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(mask)).tolist()) == {0, 1}
    assert nifti_bytes(image) == image_bytes  # deterministic encoding round trip
    prov = json.loads(store.read_bytes(f"harmonised/{keys['ct']}/provenance.json"))
    assert prov["outputs"]["row"]["image_sha256"] == ct["image_sha256"]
    assert not [k for k in store.find("harmonised") if ".tmp-" in k]

    quarantine = {(r["item"], r["reason"]) for r in store.quarantine_rows(Stage.HARMONISE)}
    assert quarantine == {
        (keys["gap"], "missing-slice"),
        (keys["orphan-rt"], "missing-referenced-series"),
    }

    summary_art = asyncio.run(_artifacts("site-h-harmonise-summary"))
    assert summary_art, "QC report artifact missing"
    markdown = summary_art[0].data
    assert "QC report" in markdown
    # two QC pictures, and the quarantined series' middle image (from its de-identified DICOM)
    assert markdown.count("data:image/png;base64,") == 3
    assert "## Quarantined by harmonisation" in markdown and "missing-slice" in markdown
    for leak in ("Pseudo^One", "P-0001", "PSN-0001", "20190312"):
        assert leak not in markdown
    outcomes = asyncio.run(_artifacts("site-h-harmonise-outcomes"))
    table_rows = json.loads(outcomes[0].data)
    assert sorted(r["status"] for r in table_rows) == ["ok", "ok", "quarantined"]

    # The re-run on unchanged input skipped every series and rewrote nothing.
    assert again.reused == 2 and again.computed == 0
    assert again.tables_written == []
    after = store.modified("harmonised")
    assert after == before
    # ... planned in the flow: the two ok series get no task; a changed input, one task again
    config = build_params("site-h", s3_bucket).config
    plan = plan_harmonise(store, config)
    assert {plan.units[i].series for i in plan.reused} == {keys["ct"], keys["pet"]}
    assert plan.reused[next(iter(plan.reused))].result.computed is False
    state = deid_units(store)
    previous = state.read()
    changed = dict(previous)
    changed[keys["ct"]] = ("d-new", {"audit": [], "content": "0" * 64})
    state.write(changed, previous)
    again_plan = plan_harmonise(store, config)
    assert {again_plan.units[i].series for i in again_plan.reused} == {keys["pet"]}
    assert contents[keys["ct"]] != "0" * 64

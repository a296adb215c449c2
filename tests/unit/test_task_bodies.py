"""Prefect task bodies called through ``.fn()``: what each task does with its arguments, without
a flow run, a Prefect server or a Dask cluster (the flows' integration tests cover those).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from flows.federate import read_source_task
from flows.publish import gate_series_task, stage_series_task
from flows.stage import run_unit_group
from tasks.cohort.publish import cohort_path, plan_publication, publish_cohort
from tasks.cohort.spec import parse_spec
from tasks.records import Status
from tests.unit.test_cohort_fixture import build_site
from tests.unit.test_cohort_publish import FAST, SPEC


def test_unit_group_keeps_order_and_puts_a_units_exception_in_its_place():
    def half(n: int) -> float:
        if n == 0:
            raise ZeroDivisionError("no half of nothing here")
        return n / 2

    out = run_unit_group.fn(6, [(half, (4,)), (half, (0,)), (half, (2,))])
    assert out[0] == 2.0 and out[2] == 1.0
    assert isinstance(out[1], ZeroDivisionError)


@pytest.fixture()
def planned(tmp_path: Path):
    """A site store and the publication plan of its cohort (nothing uploaded yet)."""
    store = build_site(str(tmp_path / "store"))
    plan = plan_publication(store, parse_spec(SPEC), str(tmp_path / "pub"))
    assert len(plan.files) >= 2  # one entry per series
    return store, plan


def test_gate_task_reads_each_planned_file_and_finds_nothing_on_a_clean_site(planned):
    store, plan = planned
    series, files = sorted(plan.files.items())[0]
    outcome = gate_series_task.fn(store.url, store.site, series, files)
    assert outcome.findings == []
    assert sorted(outcome.sizes) == sorted(f.name for f in files)
    for f in files:
        assert outcome.sizes[f.name] == len(store.read_bytes(f.source))


def test_stage_task_uploads_the_series_then_reuses_and_reports_a_missing_source(planned):
    store, plan = planned
    series, files = sorted(plan.files.items())[0]
    result = stage_series_task.fn(store.url, store.site, plan, series, files, FAST)
    assert result.status == Status.OK and result.computed
    assert sorted(result.outputs) == sorted(f.name for f in files)
    fs, path = cohort_path(plan.to, plan.cohort)
    for f in files:  # the staged bytes are the source's bytes
        staged = fs.cat_file(f"{path}/{plan.staging_key}/{f.name}")
        assert staged == store.read_bytes(f.source)

    # staged copies already there (and named in the plan) are reused, not uploaded again
    staged_plan = dataclasses.replace(plan, staged={f.name: 1 for f in files})
    again = stage_series_task.fn(store.url, store.site, staged_plan, series, files, FAST)
    assert again.status == Status.OK and not again.computed and again.outputs == ()

    # a missing source is a failed record with a one-line detail, not an exception
    store.remove(files[0].source)
    failed = stage_series_task.fn(store.url, store.site, plan, series, files, FAST)
    assert failed.status == Status.FAILED
    assert failed.error_class == "OncoflowError"
    assert failed.detail == f"{files[0].name}: its source file is missing"


def test_read_published_task_reads_the_committed_versions(tmp_path: Path):
    store = build_site(str(tmp_path / "store"))
    to = str(tmp_path / "pub")
    publish_cohort(store, parse_spec(SPEC), to, policy=FAST, date_published="2026-01-02")
    versions = read_source_task.fn(to)
    assert len(versions) == 1
    manifest = versions[0].manifest
    assert manifest["cohort"] == "lung"
    assert versions[0].url.rstrip("/").endswith("lung/v1")
    on_disk = json.loads((tmp_path / "pub" / "lung" / "v1" / "manifest.json").read_text())
    assert manifest == on_disk


def test_harmonise_task_writes_what_the_plain_function_writes(tmp_path: Path):
    from tasks.harmonise.config import HarmoniseConfig
    from tasks.harmonise.plan import plan_units
    from tasks.harmonise.series import harmonise_series, harmonise_series_task
    from tasks.store import SiteStore
    from tests.dicom_factory import Geometry, deid_store, image_series

    geometry = Geometry(size=(12, 10, 4), spacing=(1.0, 1.0, 2.0), origin=(-6, -5, -4))
    hu = np.linspace(-900.0, 200.0, 12 * 10 * 4).reshape(4, 10, 12)
    stores = {}
    for name in ("task", "plain"):
        stores[name] = SiteStore(str(tmp_path / name), "site-a")
        deid_store(stores[name], {"ct": {"datasets": image_series(hu, geometry)}})
    (unit,), _ = plan_units(stores["task"])
    config = HarmoniseConfig()
    by_task = harmonise_series_task.fn(stores["task"].url, "site-a", unit, config)
    plain = harmonise_series(stores["plain"], unit, config)
    assert by_task.result.status == Status.OK, by_task.result
    assert by_task.cpu_seconds > 0  # the task measures the CPU of its unit
    assert dataclasses.replace(by_task, cpu_seconds=plain.cpu_seconds) == plain
    written = sorted(stores["task"].find("harmonised"))
    assert written and written == sorted(stores["plain"].find("harmonised"))
    for key in written:
        assert stores["task"].read_bytes(key) == stores["plain"].read_bytes(key)


def test_extract_task_extracts_every_roi_of_its_image(tmp_path: Path):
    from flows.extract import extract_image_task
    from tasks.radiomics.extract import plan_units, select_units
    from tasks.radiomics.params import load_params
    from tasks.radiomics.samples import SampleRoi, SampleSeries, series_key, write_harmonised_sample
    from tasks.store import SiteStore

    store = SiteStore(str(tmp_path / "store"), "site-a")
    spec = SampleSeries(
        series_key(7), "CT", size=(20, 20, 8), rois=(SampleRoi("gtv", 4.0), SampleRoi("node", 3.0))
    )
    write_harmonised_sample(store, [spec])
    units = select_units(plan_units(store), [spec.series])
    params, _ = load_params("ct")
    outcomes = extract_image_task.fn(store.url, "site-a", units, params)
    assert sorted(o.result.key for o in outcomes) == sorted(u.key for u in units)
    assert all(o.result.status == Status.OK for o in outcomes), outcomes
    assert all(o.result.outputs for o in outcomes)
    assert all(store.exists(p) for o in outcomes for p in o.result.outputs)


def test_parse_task_reads_its_file_list_from_the_store(tmp_path: Path):
    from tasks.dicom.headers import parse_batch, write_batch_files
    from tasks.dicom.listing import Batch, list_source
    from tasks.store import SiteStore
    from tests.dicom_factory import write_series

    source = tmp_path / "source"
    write_series(source / "ct", 3)
    (source / "empty.dcm").write_bytes(b"")
    store = SiteStore(str(tmp_path / "store"), "site-x")
    write_batch_files(store, Batch("b1", list_source(str(source))))
    result = parse_batch.fn("b1", str(source), store.url, "site-x")
    assert result.statuses == {"ok": 3, "quarantined": 1}
    assert result.reasons == {"empty-file": 1}
    table = store.read_table(result.part)
    assert sorted(table.column("path").to_pylist()) == sorted(
        [f"ct/IM000{i}.dcm" for i in (1, 2, 3)] + ["empty.dcm"]
    )


def test_deidentify_task_writes_the_series_under_its_pseudonymous_key(tmp_path, monkeypatch):
    from pydicom import dcmread

    from tasks.deid.profile import DeidOptions
    from tasks.deid.series import SeriesJob, deidentify_series_task
    from tasks.store import SiteStore
    from tests.dicom_factory import write_series

    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", "task-body-test-secret-0123456789abcdef")
    source = tmp_path / "source"
    paths = write_series(source / "ct", 2)
    first = dcmread(paths[0])
    job = SeriesJob(
        str(first.SeriesInstanceUID),
        str(first.SeriesInstanceUID),
        str(first.StudyInstanceUID),
        str(first.PatientID),
        "CT",
        "image",
        tuple(p.relative_to(source).as_posix() for p in paths),
    )
    store_url = str(tmp_path / "store")
    outcome = deidentify_series_task.fn(
        job, "label", store_url, "site-a", str(source), DeidOptions()
    )
    assert outcome.result.status == Status.OK, outcome.result
    written = sorted(SiteStore(store_url, "site-a").find("deid/dicom"))
    assert len(written) == 2
    for key in written:
        ds = dcmread(SiteStore(store_url, "site-a").path(key))
        assert ds.PatientID != first.PatientID and "Doe" not in str(ds.PatientName)
        assert ds.SeriesInstanceUID != first.SeriesInstanceUID
        assert ds.SeriesInstanceUID in key


def test_robustness_task_caches_features_of_every_variant(tmp_path: Path):
    from flows.robustness import robustness_task
    from tasks.radiomics.cache import read_parts
    from tasks.radiomics.extract import plan_units
    from tasks.radiomics.samples import SampleRoi, SampleSeries, series_key, write_harmonised_sample
    from tasks.store import SiteStore
    from tests.unit.test_radiomics_robustness import PARAMS

    store = SiteStore(str(tmp_path / "store"), "site-a")
    spec = SampleSeries(series_key(3), "CT", size=(20, 20, 12), rois=(SampleRoi("gtv", 7.0),))
    write_harmonised_sample(store, [spec])
    (unit,) = plan_units(store)
    (outcome,) = robustness_task.fn(store.url, "site-a", [unit], PARAMS)  # one image's ROIs
    assert outcome.status == Status.OK, outcome
    assert len(outcome.variants) > 1  # the original and its perturbations and controls
    keys = [k for ks in outcome.variants.values() for k in ks]
    parts = read_parts(store, keys)
    assert sorted(parts) == sorted(keys)
    assert all(parts[k].features for k in keys)


def test_query_task_without_a_token_is_a_one_line_error(monkeypatch):
    from flows.federate import query_site_task
    from tasks.errors import OncoflowError

    monkeypatch.delenv("ONCOFLOW_SERVE_TOKEN", raising=False)
    with pytest.raises(OncoflowError, match="no token to query the site") as exc:
        query_site_task.fn("http://127.0.0.1:9/site-a")
    assert len(str(exc.value).splitlines()) == 1

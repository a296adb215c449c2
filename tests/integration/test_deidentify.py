"""Flow deidentify-dicom end to end: synthetic cohort, ingest, deidentify on real Prefect + Dask.

Checks what the issue asks to show: no planted value in any byte under ``deid/``, in the flow's
logs (read back through the Prefect API) or in its artifacts; the secret nowhere; referential
integrity (highdicom reads each SEG and matches it to its image series, RTSTRUCT contours
reference existing images); idempotent re-runs; determinism; unlinkability under another secret;
date intervals kept; burned-in screenshots quarantined; the leak gate passes on the output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from collections import defaultdict
from datetime import datetime
from itertools import combinations
from pathlib import Path

import highdicom as hd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pydicom import dcmread

from flows.cli import main
from flows.deidentify import build_params, deidentify
from flows.ingest import IngestParams, ingest_dicom
from flows.runtime import RuntimeOptions, dask_cluster
from tasks.deid.profile import DeidOptions
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.scan_phi import catalogue_identifiers, scan_phi
from tasks.deid.series import SeriesJob, deidentify_series
from tasks.errors import OncoflowError
from tasks.records import Stage
from tasks.store import SiteStore
from tests.services import prefect_records

pytestmark = pytest.mark.integration

SITE = "site-a"
SECRET = "integration-test-secret-0123456789-abcdefghijklmnop"
OTHER_SECRET = "another-integration-secret-9876543210-zyxwvutsrqpon"
CONTRACT = [
    "series", "study", "patient", "frame_of_reference", "modality", "kind", "body_part",
    "manufacturer", "sex", "acquisition_date", "age_at_study", "n_instances", "paths",
    "referenced_series", "status", "reason", "rois",
]  # fmt: skip


def _planted(cohort: Path) -> list[str]:
    truth = json.loads((cohort / "truth.json").read_text())
    sites = truth["sites"]
    site = sites[SITE] if isinstance(sites, dict) else next(s for s in sites if s["site"] == SITE)
    values = set(site["planted_values"])
    for patient in site["patients"]:
        values |= set(patient["planted_values"])
    return sorted(values)


def _files(store: SiteStore, prefix: str) -> dict[str, bytes]:
    return {key: store.read_bytes(key) for key in store.find(prefix)}


@pytest.fixture(scope="module")
def run(
    prefect_api: str, s3_endpoint: str, synth_cohort: Path, tmp_path_factory: pytest.TempPathFactory
):
    """Ingest site-a of the synthetic cohort, de-identify it, again, and once more on S3.

    The S3 store (moto over HTTP) gets a copy of the catalogue; its run shares the Dask cluster.
    """
    import s3fs

    previous = os.environ.get("ONCOFLOW_SITE_SECRET")
    os.environ["ONCOFLOW_SITE_SECRET"] = SECRET
    url = str(tmp_path_factory.mktemp("deid-store"))
    store = SiteStore(url, SITE)
    runtime = RuntimeOptions(workers=2)
    try:
        with dask_cluster(runtime):
            t0 = time.perf_counter()
            ingest_dicom(
                IngestParams(source=str(synth_cohort / SITE), site=SITE, store=url), runtime
            )
            t1 = time.perf_counter()
            first = deidentify(build_params(SITE, url), runtime)
            t2 = time.perf_counter()
            files_first = _files(store, "deid")
            mtimes = store.modified("deid")
            t3 = time.perf_counter()
            second = deidentify(build_params(SITE, url), runtime)
            t4 = time.perf_counter()
            bucket = f"s3://deid-{os.getpid()}"
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket[5:])
            remote = SiteStore(bucket, SITE)
            for key in store.find("catalog"):  # the catalogue's tables, in parts
                remote.write_bytes(key, store.read_bytes(key))
            on_s3 = deidentify(build_params(SITE, bucket), runtime)
            t5 = time.perf_counter()
        print(
            f"\ningest {t1 - t0:.1f}s, deidentify {t2 - t1:.1f}s, re-run {t4 - t3:.1f}s, "
            f"on S3 {t5 - t4:.1f}s"
        )
        yield {
            "store": store,
            "url": url,
            "first": first,
            "second": second,
            "files": files_first,
            "mtimes": mtimes,
            "planted": _planted(synth_cohort),
            "remote": remote,
            "on_s3": on_s3,
        }
    finally:
        if previous is None:
            os.environ.pop("ONCOFLOW_SITE_SECRET", None)
        else:
            os.environ["ONCOFLOW_SITE_SECRET"] = previous


def test_summary_and_tables(run):
    first, store = run["first"], run["store"]
    assert first.counts.get("ok", 0) >= 10 and first.counts.get("failed", 0) == 0
    assert first.reasons.get("burned-in-annotation", 0) >= 1
    table = store.read_table("deid/series.parquet")
    assert table.column_names == CONTRACT
    rows = table.to_pylist()
    assert [r["series"] for r in rows] == sorted(r["series"] for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["kind"] for r in ok} >= {"image", "seg", "rtstruct"}
    for row in ok:
        assert row["n_instances"] == len(row["paths"]) > 0
        assert all(
            p.startswith(f"deid/dicom/{row['patient']}/{row['study']}/{row['series']}/")
            for p in row["paths"]
        )
        assert row["series"].startswith("2.25.") and row["study"].startswith("2.25.")
        assert len(row["acquisition_date"]) == 8 and row["age_at_study"].endswith("Y")
    # every object under deid/dicom belongs to an ok series; nothing else is there
    listed = {k for k in run["files"] if k.startswith("deid/dicom/")}
    assert listed == {p for r in ok for p in r["paths"]}
    audit = {
        (r["attribute"], r["action"]): r["count"]
        for r in store.read_table("deid/audit.parquet").to_pylist()
    }
    assert audit[("PatientName", "pseudonym")] == len(listed)
    assert audit[("SOPInstanceUID", "remap-uid")] == len(listed)
    assert audit[("(0011,xxxx)", "remove")] > 0 and audit[("StudyDate", "shift-date")] > 0
    quarantined = store.quarantine_rows(Stage.DEIDENTIFY)
    assert quarantined and {q["reason"] for q in quarantined} == {"burned-in-annotation"}
    assert all(q["kind"] == "series" for q in quarantined)


def test_no_planted_value_in_any_byte_or_key(run):
    planted = run["planted"]
    assert len(planted) > 100
    leaks = []
    for key, data in run["files"].items():
        low, key_low = data.lower(), key.lower()
        for value in planted:
            v = value.lower()
            if v.encode() in low or v in key_low:
                leaks.append((key, "planted value"))
                break
        assert SECRET.encode() not in data
    assert leaks == []


def test_no_planted_value_or_secret_in_logs_artifacts_parameters(run):
    runs, logs, artifacts, tasks = asyncio.run(prefect_records(["deidentify-dicom"]))
    assert len(runs) >= 2 and logs and artifacts and tasks
    texts = [json.dumps(r.parameters, default=str) + (r.name or "") for r in runs]
    texts += [log.message for log in logs]
    texts += [
        json.dumps(a.data, default=str) + (a.description or "") + (a.key or "") for a in artifacts
    ]
    texts += [t.model_dump_json() for t in tasks]  # names, inputs, cache keys, states
    texts += [r.model_dump_json() for r in runs]
    blob = "\n".join(texts).lower()
    assert "de-identification done" in blob  # the logs were really read back
    assert [v for v in run["planted"] if v.lower() in blob] == []
    assert SECRET.lower() not in blob
    keys = SiteKeys.derive(SECRET.encode(), SITE)
    assert keys.uid_key.hex() not in blob and keys.patient_key.hex() not in blob


def test_rerun_writes_nothing(run):
    second, store = run["second"], run["store"]
    assert second.extra["objects_written"] == 0
    assert second.tables_written == []
    assert second.computed == 0
    assert _files(store, "deid") == run["files"]
    after = store.modified("deid")
    assert after == run["mtimes"]


def test_rerun_plans_no_task_and_a_changed_file_replans_only_its_series(run, tmp_path):
    """The flow reuses every unchanged ``ok`` series without a task; a file whose catalogued
    mtime changed, or a missing output, makes its series (and only it) a task again."""
    from tasks.deid.plan import plan_deid
    from tasks.dicom.catalog import instance_parts

    shutil.copytree(run["store"].path(""), tmp_path / SITE)
    store = SiteStore(str(tmp_path), SITE)
    keys = SiteKeys.derive(SECRET.encode(), SITE)
    catalog = store.read_table("catalog/series.parquet")
    deid = store.read_table("deid/series.parquet").to_pylist()
    ok = {r["series"] for r in deid if r["status"] == "ok"}
    plan = plan_deid(store, catalog, keys, DeidOptions())
    assert len(ok) > 5 and {plan.label[plan.jobs[i].series_key] for i in plan.reused} == ok
    assert all(not o.result.computed and o.audit and o.content for o in plan.reused.values())
    other = DeidOptions(max_input_mb=DeidOptions().max_input_mb + 1)
    assert not plan_deid(store, catalog, keys, other).reused  # other options: all again
    victim = next(i for i in sorted(plan.reused) if len(plan.jobs[i].paths) > 1)
    instances = instance_parts(store)
    table = store.read_table("catalog/instances.parquet")
    row = table.filter(pc.equal(table["path"], plan.jobs[victim].paths[1]))
    row = row.set_column(row.schema.get_field_index("mtime"), "mtime", pa.array(["changed"]))
    meta = {k.decode(): v.decode() for k, v in instances.schema_metadata().items()}
    meta.pop("oncoflow.sort_key")
    assert instances.update(row, key="path", metadata=meta)
    again = plan_deid(store, catalog, keys, DeidOptions())
    assert set(again.reused) == set(plan.reused) - {victim}
    other_ok = next(i for i in sorted(plan.reused) if i != victim)
    store.remove(plan.reused[other_ok].result.outputs[-1])
    last = plan_deid(store, catalog, keys, DeidOptions())
    assert set(last.reused) == set(plan.reused) - {victim, other_ok}


def _jobs(store: SiteStore) -> list[SeriesJob]:
    from tasks.deid.plan import plan_jobs

    return plan_jobs(store.read_table("catalog/series.parquet"))


def test_deterministic_without_dask_and_unlinkable_under_another_secret(run, tmp_path, monkeypatch):
    """The plain task function in this process gives the same bytes; another secret, new ids."""
    store = run["store"]
    source = store.read_table("catalog/series.parquet").schema.metadata[b"source"].decode()
    jobs = [j for j in _jobs(store) if j.kind in ("image", "seg")][:4]
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", SECRET)
    again = SiteStore(str(tmp_path / "same"), SITE)
    for job in jobs:
        outcome = deidentify_series(job, again.url, SITE, source, DeidOptions())
        for key in outcome.result.outputs:
            assert again.read_bytes(key) == run["files"][key]
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", OTHER_SECRET)
    other = SiteStore(str(tmp_path / "other"), SITE)
    mine = {r["series"]: r for r in store.read_table("deid/series.parquet").to_pylist()}
    for job in jobs:
        outcome = deidentify_series(job, other.url, SITE, source, DeidOptions())
        assert outcome.row["series"] not in mine
        assert outcome.row["patient"] not in {r["patient"] for r in mine.values()}
        first_new = dcmread(other.path(outcome.result.outputs[0]))
        assert first_new.StudyDate not in {
            dcmread(store.path(p)).StudyDate for p in mine_paths(mine)
        }


def mine_paths(rows: dict) -> list[str]:
    return [r["paths"][0] for r in rows.values() if r["status"] == "ok"][:6]


def _instances(store: SiteStore, row: dict) -> dict[str, object]:
    return {
        str(dcmread(store.path(p), stop_before_pixels=True).SOPInstanceUID): p for p in row["paths"]
    }


def test_seg_and_rtstruct_still_reference_their_images(run):
    store = run["store"]
    rows = {
        r["series"]: r
        for r in store.read_table("deid/series.parquet").to_pylist()
        if r["status"] == "ok"
    }
    segs = [r for r in rows.values() if r["kind"] == "seg"]
    structs = [r for r in rows.values() if r["kind"] == "rtstruct"]
    assert segs and structs
    for row in segs:
        seg = hd.seg.segread(store.path(row["paths"][0]))
        referenced = [item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence]
        assert referenced == row["referenced_series"]
        image = rows[referenced[0]]
        assert image["kind"] == "image"
        instances = _instances(store, image)
        sources = {uid for _, _, uid in seg.get_source_image_uids()}
        assert sources and sources <= set(instances)
        assert seg.FrameOfReferenceUID == image["frame_of_reference"]
    for row in structs:
        ds = dcmread(store.path(row["paths"][0]))
        image = rows[row["referenced_series"][0]]
        instances = _instances(store, image)
        for frame in ds.ReferencedFrameOfReferenceSequence:
            assert frame.FrameOfReferenceUID == image["frame_of_reference"]
        contours = [
            c.ContourImageSequence[0].ReferencedSOPInstanceUID
            for roi in ds.ROIContourSequence
            for c in roi.ContourSequence
        ]
        assert contours and set(contours) <= set(instances)


def _when(date: str, time: str) -> datetime:
    return datetime.strptime(date + time[:6], "%Y%m%d%H%M%S")


def test_date_intervals_within_a_patient_are_kept(run):
    """Every pair of series instants of a patient keeps its exact interval; dates all moved."""
    store = run["store"]
    keys = SiteKeys.derive(SECRET.encode(), SITE)
    original: dict[str, dict[str, datetime]] = defaultdict(dict)
    for row in store.read_table("catalog/instances.parquet").to_pylist():
        if row["status"] == "ok" and row.get("series_date") and row.get("series_time"):
            series = keys.remap_uid(row["series_instance_uid"])
            original[row["patient_id"]][series] = _when(row["series_date"], row["series_time"])
    shifted: dict[str, dict[str, datetime]] = defaultdict(dict)
    for row in store.read_table("deid/series.parquet").to_pylist():
        if row["status"] == "ok":
            ds = dcmread(store.path(row["paths"][0]), stop_before_pixels=True)
            if "SeriesDate" in ds and "SeriesTime" in ds:
                shifted[row["patient"]][row["series"]] = _when(ds.SeriesDate, ds.SeriesTime)
            assert ds.PatientBirthDate == ""
    compared = 0
    for patient_id, series in original.items():
        mine = shifted[keys.patient_pseudonym(patient_id)]
        common = sorted(set(mine) & set(series))
        assert len(common) >= 3
        for a, b in combinations(common, 2):
            assert mine[b] - mine[a] == series[b] - series[a]
            compared += 1
        assert all(mine[s].date() != series[s].date() for s in common)
    assert compared >= 10


def test_leak_gate_passes_on_output_and_catches_the_private_zone(run, capsys):
    store = run["store"]
    with pytest.raises(SystemExit) as done:
        main(["scan-phi", store.path("deid"), "--store", run["url"], "--site", SITE])
    assert done.value.code == 0, capsys.readouterr().out
    identifiers = catalogue_identifiers(store)
    findings = scan_phi(store.path("catalog"), identifiers, prefix="catalog/")
    tables = {f.file.split("/part-")[0] for f in findings}  # the catalogue is kept in parts
    assert tables == {"catalog/instances.parquet", "catalog/series.parquet"}
    kinds = ("identifier", "private-column", "id-in-text", "catalogue-date")
    assert all(f.kind in kinds for f in findings)


def test_output_files_are_clean_dicom(run):
    for key, data in run["files"].items():
        if not key.endswith(".dcm"):
            continue
        assert data[:128] == b"\x00" * 128 and data[128:132] == b"DICM"
        assert hashlib.sha256(data).hexdigest()  # readable bytes
    sample = next(k for k in run["files"] if k.endswith(".dcm"))
    ds = dcmread(run["store"].path(sample))
    assert ds.PatientIdentityRemoved == "YES"
    assert not any(e.tag.is_private for e in ds.iterall() if not e.tag.is_private_creator)


def test_flow_on_s3_store_gives_the_same_bytes(run):
    """The same catalogue in an S3 store (moto over HTTP): byte-identical objects and tables."""
    remote = run["remote"]
    assert run["on_s3"].counts == run["first"].counts
    assert _files(remote, "deid") == run["files"]
    assert scan_phi(remote.uri("deid"), catalogue_identifiers(remote)) == []


def test_secret_from_a_prefect_secret_block(prefect_api, monkeypatch):
    """Without ONCOFLOW_SITE_SECRET the site secret comes from the Prefect Secret block."""
    from prefect.blocks.system import Secret

    from tasks.deid.secret import default_block_name, load_site_secret

    Secret(value=OTHER_SECRET).save(default_block_name("site-z"), overwrite=True)
    monkeypatch.delenv("ONCOFLOW_SITE_SECRET", raising=False)
    assert load_site_secret("site-z") == OTHER_SECRET.encode()
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET_BLOCK", "no-such-block")
    with pytest.raises(OncoflowError, match="no site secret"):
        load_site_secret("site-z")

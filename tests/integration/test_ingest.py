"""Synth → ingest on real Prefect + Dask LocalCluster: truth, incremental runs, privacy."""

from __future__ import annotations

import hashlib
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from flows.ingest import IngestParams, batch_size_for, ingest_dicom
from flows.runtime import RuntimeOptions, dask_cluster
from tasks.dicom.catalog import connect_catalog
from tasks.records import StageSummary
from tasks.store import SiteStore
from tasks.synthetic.truth import CohortTruth, SiteTruth

pytestmark = pytest.mark.integration

SITE = "site-a"
TABLES = ("catalog/instances.parquet", "catalog/series.parquet", "quarantine.parquet")


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (and the set of paths)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def table_state(store: SiteStore) -> dict[str, tuple[dict[str, bytes], dict[str, str]]]:
    """Bytes and modification times of each catalogue table's files (its parts)."""
    return {key: (store.table_files(key), store.modified(key)) for key in TABLES}


@dataclass
class Ingested:
    source: Path
    store: SiteStore
    truth: SiteTruth
    summary: StageSummary
    hashes: dict[str, str]
    tables: dict[str, tuple[dict[str, bytes], dict[str, str]]]
    one_worker: SiteStore


def run(source: Path, store: SiteStore, workers: int = 2, batch_size: int = 40) -> StageSummary:
    params = IngestParams(
        source=str(source), site=store.site, store=store.url, batch_size=batch_size
    )
    return ingest_dicom(params, RuntimeOptions(workers=workers))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, synth_cohort, prefect_api) -> Iterator[Ingested]:
    root = tmp_path_factory.mktemp("ingest")
    source = root / "source"
    shutil.copytree(synth_cohort / SITE, source)
    hashes = tree_hashes(source)
    truth = CohortTruth.load(synth_cohort / "truth.json").site(SITE)
    # one worker, one batch, its own cluster; then every other run shares one 2-worker cluster
    one_worker = SiteStore(str(root / "one-worker"), SITE)
    single = run(source, one_worker, workers=1, batch_size=100)
    n = truth.totals.files_written
    assert single.extra["batches"] == math.ceil(n / batch_size_for(n, 1, 100)) >= 2
    store = SiteStore(str(root / "store"), SITE)
    with dask_cluster(RuntimeOptions(workers=2)):
        summary = run(source, store)
        yield Ingested(source, store, truth, summary, hashes, table_state(store), one_worker)


def test_summary_counts_match_truth(ingested):
    truth, extra = ingested.truth.totals, ingested.summary.extra
    assert extra["files_listed"] == truth.files_written
    assert extra["files_new"] == extra["files_parsed"] == truth.files_written
    assert extra["files_unchanged"] == extra["files_deleted"] == extra["files_failed"] == 0
    assert extra["batches"] == math.ceil(truth.files_written / 40) > 2
    assert ingested.summary.counts == {
        "ok": truth.instances_ok,
        "quarantined": truth.files_written - truth.instances_ok,
    }
    assert sorted(ingested.summary.tables_written) == sorted(TABLES)
    assert not ingested.store.exists("catalog/_parts")


def test_every_file_has_the_planted_outcome(ingested):
    rows = ingested.store.read_table("catalog/instances.parquet").to_pylist()
    got = {r["path"]: r["reason"] or r["status"] for r in rows}
    assert got == ingested.truth.file_outcomes


def test_series_match_truth(ingested):
    series = ingested.store.read_table("catalog/series.parquet").to_pylist()
    main = [s for s in series if not s["series_key"].endswith(":localizer")]
    by_modality: dict[str, Counter] = {}
    for s in main:
        by_modality.setdefault(s["modality"], Counter())[s["status"]] += 1
    assert {m: dict(c) for m, c in by_modality.items()} == ingested.truth.totals.series_ingest
    rows = {s["series_instance_uid"]: s for s in main}
    for expected in ingested.truth.series():
        row = rows[expected.series_instance_uid]
        assert row["status"] == expected.ingest_status, expected.role
        assert sorted(row["paths"]) == sorted(expected.files), expected.role
        kinds = {expected.kind} | (
            {"multiframe"} if row["n_frames"] > row["n_instances"] else set()
        )
        assert row["kind"] in kinds, expected.role
        if expected.geometry and row["status"] == "ok" and row["n_instances"] > 1:
            assert row["slice_spacing"] == pytest.approx(expected.geometry.spacing[2], abs=1e-3)
            offsets = expected.geometry.slice_offsets_mm
            assert len(row["paths"]) == len(offsets)


def test_every_ingest_fault_is_quarantined_with_its_reason(ingested):
    rows = {(r["item"], r["kind"], r["reason"]) for r in ingested.store.quarantine_rows("ingest")}
    expected = set()
    for fault in ingested.truth.faults:
        if fault.stage != "ingest":
            continue
        if fault.scope == "file":
            expected |= {(path, "file", fault.reason) for path in fault.paths}
        else:
            expected.add((fault.series_instance_uid, "series", fault.reason))
    assert expected <= rows
    assert rows == expected  # nothing else was rejected
    reasons = Counter(r for _, _, r in rows)
    assert ingested.summary.reasons == dict(sorted(reasons.items()))


def test_duckdb_views_answer_queries(ingested):
    con = connect_catalog(ingested.store)
    ct_ok = con.execute(
        "SELECT count(*) FROM series WHERE modality = 'CT' AND status = 'ok' "
        "AND series_key NOT LIKE '%:localizer'"
    ).fetchone()[0]
    assert ct_ok == ingested.truth.totals.series_ingest["CT"]["ok"]
    per_patient = con.execute(
        "SELECT count(DISTINCT patient_id) FROM instances WHERE status = 'ok'"
    ).fetchone()[0]
    assert per_patient == len(ingested.truth.patients)
    con.close()


def test_other_worker_count_and_batch_size_give_identical_tables(ingested):
    for key in TABLES:
        assert ingested.one_worker.table_files(key) == ingested.tables[key][0], key


def test_rerun_parses_nothing_and_writes_nothing(ingested):
    # a killed run's private work files (listing, plan, a batch part) are no input to the next
    stale = ingested.store
    stale.write_bytes("catalog/_parts/listing.parquet", b"truncated by a kill")
    stale.write_bytes("catalog/_parts/plan.parquet", b"")
    stale.write_bytes("catalog/_parts/b0123.parquet", b"half a part")
    summary = run(ingested.source, ingested.store)
    assert not ingested.store.exists("catalog/_parts")
    extra = summary.extra
    assert extra["files_parsed"] == extra["files_new"] == extra["files_changed"] == 0
    assert extra["files_unchanged"] == ingested.truth.totals.files_written
    assert summary.tables_written == [] and extra["batches"] == 0
    assert "startup_seconds" not in extra["timings"]  # no Dask cluster for nothing to parse
    assert table_state(ingested.store) == ingested.tables
    assert summary.counts == ingested.summary.counts
    assert summary.reasons == ingested.summary.reasons


def _copy_series_with_new_uids(files: list[Path], target: Path) -> list[Path]:
    series_uid = generate_uid()
    written = []
    for i, path in enumerate(sorted(files)):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = 77
        out = target / f"IM{i + 1:04d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        written.append(out)
    return written


def test_new_series_parses_only_its_files_then_a_deleted_slice_is_marked(ingested):
    ct = next(s for s in ingested.truth.series() if s.role == "ct")
    new = _copy_series_with_new_uids(
        [ingested.source / f for f in ct.files], ingested.source / "incoming" / "77"
    )
    before = ingested.store.read_table("catalog/instances.parquet").to_pylist()
    summary = run(ingested.source, ingested.store)
    extra = summary.extra
    assert extra["files_new"] == extra["files_parsed"] == len(new)
    assert extra["files_unchanged"] == ingested.truth.totals.files_written
    assert summary.counts["ok"] == ingested.truth.totals.instances_ok + len(new)
    after = ingested.store.read_table("catalog/instances.parquet").to_pylist()
    old_paths = {r["path"] for r in before}
    assert [r for r in after if r["path"] in old_paths] == before
    series = ingested.store.read_table("catalog/series.parquet").to_pylist()
    added = [s for s in series if s["paths"][0].startswith("incoming/")]
    assert len(added) == 1 and added[0]["status"] == "ok"
    assert added[0]["n_instances"] == len(new)

    # delete a middle slice: the file is marked deleted, the series now misses a slice
    middle = new[len(new) // 2]
    middle.unlink()
    summary = run(ingested.source, ingested.store)
    assert summary.extra["files_deleted"] == 1 and summary.extra["files_parsed"] == 0
    assert "startup_seconds" not in summary.extra["timings"]
    rows = {
        r["path"]: r for r in ingested.store.read_table("catalog/instances.parquet").to_pylist()
    }
    gone = rows[middle.relative_to(ingested.source).as_posix()]
    assert gone["status"] == "deleted"
    series = ingested.store.read_table("catalog/series.parquet").to_pylist()
    added = [s for s in series if s["paths"][0].startswith("incoming/")]
    assert [(s["status"], s["reason"]) for s in added] == [("quarantined", "missing-slice")]
    assert summary.counts["deleted"] == 1


def test_a_store_inside_the_source_is_not_listed(tmp_path, prefect_api):
    """The store (with the run's own listing, written while the source is walked) may lie
    inside SOURCE: its files are not listed, on the first run or the next."""
    from tests.dicom_factory import write_series

    source = tmp_path / "source"
    write_series(source / "Ó Briain" / "ct", 3)
    store = SiteStore(str(source / "store"), SITE)
    first = run(source, store)
    assert first.extra["files_listed"] == first.extra["files_parsed"] == 3
    assert first.counts == {"ok": 3}
    again = run(source, store)
    assert again.extra["files_listed"] == again.extra["files_unchanged"] == 3
    assert again.extra["files_parsed"] == 0 and again.tables_written == []
    paths = store.read_table("catalog/instances.parquet").column("path").to_pylist()
    assert all(p.startswith("Ó Briain/ct/") for p in paths)


def test_source_was_never_modified(ingested):
    current = tree_hashes(ingested.source)
    added = {p for p in current if p.startswith("incoming/")}
    assert {p: h for p, h in current.items() if p not in added} == ingested.hashes


def _haystack(site: str, on_dask: bool = True) -> list[str]:
    """Everything Prefect recorded about this site's ingest runs: names, parameters,
    artifacts, logs (``on_dask``: some batches were parsed by Dask tasks)."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    async def collect() -> list[str]:
        await APILogHandler.aflush()
        out: list[str] = []
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    name=FlowRunFilterName(any_=[f"ingest-{site}", f"parse-{site}"])
                )
            )
            ids = [r.id for r in runs]
            assert ids
            out += [f"{r.name} {r.parameters}" for r in runs]
            tasks = await client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids))
            )
            assert any(t.name.startswith("parse-b") for t in tasks) or not on_dask
            out += [t.name for t in tasks]
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
            )
            kinds = {a.type for a in artifacts}
            assert {"markdown", "table", "progress" if on_dask else "table"} <= kinds, kinds
            out += [f"{a.key} {a.description} {a.data}" for a in artifacts]
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids))
            )
            out += [log.message for log in logs]
        return out

    return anyio.run(collect)


def test_prefect_records_no_identifiers(ingested):
    haystack = "\n".join(_haystack(SITE))
    assert "quarantine" in haystack and "missing-slice" in haystack
    planted = set(ingested.truth.planted_values)
    for patient in ingested.truth.patients:
        planted |= set(patient.planted_values) | {patient.patient_id, patient.directory}
        for study in patient.studies:
            for series in study.series:
                planted |= {series.series_instance_uid, series.study_instance_uid}
                planted |= set(series.sop_instance_uids)
    planted |= set(ingested.truth.file_outcomes)  # source paths hold names and MRNs
    leaked = sorted(v for v in planted if len(v) >= 6 and v in haystack)
    assert leaked == []


def test_a_file_name_that_is_not_utf8_is_quarantined_and_the_run_goes_on(tmp_path, prefect_api):
    """A folder named by a legacy tool in ISO-8859-2: its file is quarantined
    (``undecodable-name``) while the others ingest; a re-run writes nothing; Prefect records
    no name, escaped or hashed."""
    import os

    from tasks.dicom.listing import escape_name
    from tests.dicom_factory import write_series

    site = "site-legacy-names"
    source = tmp_path / "source"
    slices = write_series(source / "Ó Briain" / "ct", 3)
    legacy = os.path.join(os.fsencode(source), "Szőke Ödön".encode("iso-8859-2"))
    os.makedirs(legacy)
    with open(os.path.join(legacy, b"IM0001.dcm"), "wb") as fh:
        fh.write(slices[0].read_bytes())
    store = SiteStore(str(tmp_path / "store"), site)
    first = run(source, store)
    assert first.counts == {"ok": 3, "quarantined": 1}
    assert first.reasons == {"undecodable-name": 1}
    assert first.extra["files_listed"] == 4 and first.extra["files_undecodable"] == 1
    item = escape_name(os.fsdecode(b"Sz\xf5ke \xd6d\xf6n/IM0001.dcm"))
    assert [r["item"] for r in store.quarantine_rows()] == [item]
    again = run(source, store)
    assert again.tables_written == [] and again.counts == first.counts
    assert again.extra["files_parsed"] == 0
    haystack = "\n".join(_haystack(site, on_dask=False))
    assert "undecodable-name" in haystack
    plain = hashlib.sha256(item.encode()).hexdigest()
    for value in (item, "Szőke", "Sz\\xf5ke", "Ödön", "Briain", plain[:12]):
        assert value not in haystack, value

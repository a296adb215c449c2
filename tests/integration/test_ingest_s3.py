"""The same ingest with SOURCE and STORE on S3 (moto server mode over HTTP, through s3fs)."""

from __future__ import annotations

from collections import Counter

import pytest
import s3fs

from flows.ingest import IngestParams, ingest_dicom
from flows.runtime import RuntimeOptions
from tasks.dicom.catalog import connect_catalog
from tasks.errors import OncoflowError
from tasks.store import SiteStore
from tasks.synthetic.truth import CohortTruth

pytestmark = pytest.mark.integration

SITE = "site-b"


def _fs(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def _etags(fs: s3fs.S3FileSystem, prefix: str) -> dict[str, str]:
    fs.invalidate_cache()
    return {k: v["ETag"] for k, v in fs.find(prefix, detail=True).items()}


def test_ingest_from_and_to_s3(synth_cohort, s3_bucket, s3_endpoint, prefect_api):
    fs = _fs(s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    fs.put(str(synth_cohort / SITE) + "/", f"{bucket}/exports/{SITE}/", recursive=True)
    before = _etags(fs, f"{bucket}/exports/{SITE}")
    truth = CohortTruth.load(synth_cohort / "truth.json").site(SITE)
    assert len(before) == truth.totals.files_written

    params = IngestParams(
        source=f"{s3_bucket}/exports/{SITE}",
        site=SITE,
        store=f"{s3_bucket}/store",
        batch_size=60,
    )
    summary = ingest_dicom(params, RuntimeOptions(workers=2))
    assert summary.extra["files_parsed"] == truth.totals.files_written
    assert summary.extra["batches"] == 4
    store = SiteStore(params.store, SITE)
    rows = store.read_table("catalog/instances.parquet").to_pylist()
    assert {r["path"]: r["reason"] or r["status"] for r in rows} == truth.file_outcomes
    prefix = f"{bucket}/exports/{SITE}/"
    assert all(r["mtime"] == before[prefix + r["path"]].strip('"') for r in rows)
    series = store.read_table("catalog/series.parquet").to_pylist()
    counts: dict[str, Counter] = {}
    for s in series:
        if not s["series_key"].endswith(":localizer"):
            counts.setdefault(s["modality"], Counter())[s["status"]] += 1
    assert {m: dict(c) for m, c in counts.items()} == truth.totals.series_ingest
    file_faults = [f for f in truth.faults if f.stage == "ingest" and f.scope == "file"]
    faults = {(p, f.reason) for f in file_faults for p in f.paths}
    quarantined = {(r["item"], r["reason"]) for r in store.quarantine_rows("ingest")}
    assert faults <= quarantined

    con = connect_catalog(store)
    assert con.execute("SELECT count(*) FROM instances").fetchone()[0] == len(rows)
    con.close()

    tables = {
        k: store.table_files(k) for k in ("catalog/instances.parquet", "catalog/series.parquet")
    }
    again = ingest_dicom(params, RuntimeOptions(workers=2))
    assert again.extra["files_parsed"] == 0
    assert again.extra["files_unchanged"] == truth.totals.files_written
    assert again.tables_written == []
    assert {k: store.table_files(k) for k in tables} == tables
    assert _etags(fs, f"{bucket}/exports/{SITE}") == before  # SOURCE untouched
    assert not fs.exists(f"{bucket}/store/{SITE}/catalog/_parts")


def test_unusable_s3_urls_are_one_line_errors(s3_bucket, s3_endpoint):
    missing_source = IngestParams(
        source=f"{s3_bucket}/nothing-here", site=SITE, store=f"{s3_bucket}/store"
    )
    with pytest.raises(OncoflowError, match="source") as info:
        ingest_dicom(missing_source)
    assert "\n" not in str(info.value)
    _fs(s3_endpoint).pipe(f"{s3_bucket.removeprefix('s3://')}/src/a.dcm", b"x")
    bad_store = IngestParams(
        source=f"{s3_bucket}/src", site=SITE, store="s3://no-such-bucket-oncoflow/store"
    )
    with pytest.raises(OncoflowError, match="store bucket not found") as info:
        ingest_dicom(bad_store)
    assert "\n" not in str(info.value)

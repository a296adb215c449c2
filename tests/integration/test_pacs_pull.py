"""DICOMweb pull from a real Orthanc (QIDO-RS + WADO-RS) into the raw zone, then the catalogue."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from flows.pacs import PullParams, pull_dicomweb, pull_dicomweb_flow
from flows.runtime import RuntimeOptions
from tasks.errors import OncoflowError, StageFailed
from tasks.pacs.credentials import ENV_PASSWORD, ENV_USER, DicomwebCredentials, load_credentials
from tasks.pacs.dicomweb import (
    RAW_DICOMWEB,
    RAW_STAGING_DICOMWEB,
    STATE_KEY,
    PullState,
    dicomweb_client,
    opaque_key,
    plan_pull,
    study_date_filter,
)
from tasks.refs import RefKey, site_ref_key
from tasks.store import SiteStore
from tests.integration.pacs_support import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    Orthanc,
    SyntheticStudy,
    make_ct_study,
    orthanc_missing_reason,
    orthanc_server,
    restarted,
)
from tests.services import prefect_records

pytestmark = [
    pytest.mark.integration,
    pytest.mark.pacs,
    pytest.mark.skipif(orthanc_missing_reason() is not None, reason=str(orthanc_missing_reason())),
]

SITE = "site-a"


@pytest.fixture(scope="module")
def dask_address(prefect_api: str, s3_endpoint: str) -> Iterator[str]:
    """One Dask cluster for the module; workers inherit the DICOMweb credentials and S3 endpoint."""
    from distributed import LocalCluster

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_USER, ORTHANC_USER)
        patch.setenv(ENV_PASSWORD, ORTHANC_PASSWORD)
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            yield cluster.scheduler_address


@pytest.fixture()
def orthanc() -> Iterator[Orthanc]:
    with orthanc_server() as server:
        yield server


def params(orthanc: Orthanc, store: str, **kw) -> PullParams:
    return PullParams(
        source=f"dicomweb+{orthanc.dicomweb}",
        site=SITE,
        store=store,
        retries=kw.pop("retries", 1),
        retry_delay_seconds=kw.pop("retry_delay_seconds", 0.2),
        **kw,
    )


def raw_files(store: SiteStore) -> dict[str, tuple[int, int]]:
    """Committed raw-zone files → (inode, mtime_ns): changes when a file is rewritten."""
    root = Path(store.path(RAW_DICOMWEB))
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def assert_study_in_raw(store: SiteStore, study: SyntheticStudy) -> None:
    """Every instance of the study is in the raw zone under hashed names, bytes intact."""
    root = Path(store.path(RAW_DICOMWEB)) / opaque_key(study.study_uid, site_ref_key(store))
    found = sorted(root.rglob("*.dcm"))
    assert len(found) == len(study.sop_uids)
    sops = {}
    for path in found:
        ds = pydicom.dcmread(path)
        assert path.parent.name == opaque_key(ds.SeriesInstanceUID, site_ref_key(store))
        assert path.stem == opaque_key(ds.SOPInstanceUID, site_ref_key(store))
        sops[str(ds.SOPInstanceUID)] = ds
    assert set(sops) == set(study.sop_uids)
    original = pydicom.dcmread(pydicom.filebase.DicomBytesIO(study.files[0]))
    pulled = sops[str(original.SOPInstanceUID)]
    assert pulled.PixelData == original.PixelData
    assert pulled.PatientID == original.PatientID


def assert_no_identifiers_in_names(store: SiteStore, studies: list[SyntheticStudy]) -> None:
    names = "\n".join(str(p) for p in Path(store.root).rglob("*"))
    for study in studies:
        for uid in (study.study_uid, *study.series_uids, *study.sop_uids):
            assert uid not in names
        assert study.patient_id not in names.replace(SITE, "")


def catalogued_series(store: SiteStore) -> dict[str, int]:
    table = store.read_table("catalog/series.parquet")
    assert table is not None
    return {
        r["series_instance_uid"]: r["n_instances"] for r in table.to_pylist() if r["status"] == "ok"
    }


def test_pull_everything_then_nothing_then_only_the_new_study(
    orthanc: Orthanc, dask_address: str, tmp_path: Path
) -> None:
    store_url = str(tmp_path / "store")
    store = SiteStore(store_url, SITE)
    runtime = RuntimeOptions(dask_address=dask_address)
    first = [make_ct_study("PAT-1", n_series=2, seed=1), make_ct_study("PAT-2", seed=2)]
    for study in first:
        orthanc.upload(list(study.files))

    summary = pull_dicomweb(params(orthanc, store_url), runtime).to_dict()
    assert summary["studies"] == {"found": 2, "pulled": 2, "skipped": 0, "failed": 0}
    assert summary["series"] == {"pulled": 3, "skipped": 0, "failed": 0}
    assert summary["instances"] == 9
    for study in first:
        assert_study_in_raw(store, study)
    assert_no_identifiers_in_names(store, first)
    assert store.children(RAW_STAGING_DICOMWEB) == []
    state = json.loads(store.read_bytes(STATE_KEY))
    assert len(state["series"]) == 3
    assert state["sources"][orthanc.dicomweb]["failed"] == {}
    expected = {uid: 3 for s in first for uid in s.series_uids}
    assert catalogued_series(store) == expected

    # Pull again: nothing is transferred, no file is rewritten.
    before = raw_files(store)
    summary = pull_dicomweb(params(orthanc, store_url), runtime).to_dict()
    assert summary["studies"] == {"found": 2, "pulled": 0, "skipped": 2, "failed": 0}
    assert summary["instances"] == 0
    assert raw_files(store) == before

    # A new study in the PACS: only it is pulled.
    new = make_ct_study("PAT-3", n_series=1, n_slices=4, seed=3)
    orthanc.upload(list(new.files))
    # group_below=0: a task per series (the first pull shared one task among its 3 series)
    summary = pull_dicomweb(params(orthanc, store_url, group_below=0), runtime).to_dict()
    assert summary["studies"] == {"found": 3, "pulled": 1, "skipped": 2, "failed": 0}
    assert summary["instances"] == 4
    after = raw_files(store)
    assert {k: v for k, v in after.items() if k in before} == before
    assert len(after) == len(before) + 4
    assert_study_in_raw(store, new)
    assert catalogued_series(store) == {**expected, new.series_uids[0]: 4}
    assert_nothing_identifying_in_prefect([*first, new])
    # both kinds of task were read back: a shared one (the first pull: 3 small series on 2
    # workers, two of them in one task) and a series' own, named by modality and key tail
    task_runs = asyncio.run(prefect_records(["pull-dicomweb"]))[3]
    assert any(t.task_key.startswith("run_unit_group") for t in task_runs)
    new_key = opaque_key(new.series_uids[0], site_ref_key(store))
    assert f"pull-CT-{new_key[-6:]}" in {t.name for t in task_runs}


def plain_hashes(value: str) -> list[str]:
    """Plain (unkeyed) hashes of a value as hex, and their 12-digit prefixes."""
    data = value.encode()
    digests = [hashlib.new(name, data).hexdigest() for name in ("md5", "sha1", "sha256")]
    return [*digests, *(d[:12] for d in digests)]


def assert_nothing_identifying_in_prefect(studies: list[SyntheticStudy]) -> None:
    """No UID, patient ID nor a plain hash of one anywhere the Prefect API keeps of the pulls.

    Flow-run names and parameters, logs, artifacts, and for every task run its name, cache
    key, inputs, state message and result record.
    """
    runs, logs, artifacts, tasks = asyncio.run(
        prefect_records(["pull-dicomweb", "pull-dicomweb-series"])
    )
    assert runs and tasks and artifacts
    texts = [json.dumps(r.parameters, default=str) + r.name for r in runs]
    texts += [log.message for log in logs]
    texts += [json.dumps(a.data, default=str) + (a.description or "") for a in artifacts]
    for t in tasks:
        assert t.cache_key is None, t.name  # no input-hash cache key: inputs are not hashed
        assert t.state is not None and t.state.data is None, t.name  # no persisted result
        texts += [t.name, json.dumps(t.task_inputs, default=str), t.state.message or ""]
    blob = "\n".join(texts).lower()
    for study in studies:
        for value in (study.patient_id, study.study_uid, *study.series_uids, *study.sop_uids):
            assert value.lower() not in blob
            for digest in plain_hashes(value):
                assert digest not in blob


def test_pull_into_an_s3_store(orthanc: Orthanc, dask_address: str, s3_bucket: str) -> None:
    study = make_ct_study("PAT-S3", n_series=2, seed=12)
    orthanc.upload(list(study.files))
    store_url = f"{s3_bucket}/store"
    runtime = RuntimeOptions(dask_address=dask_address)
    # the flow as a deployment runs it: not on Dask itself, its pulls in a subflow on `runtime`
    summary = pull_dicomweb_flow(params(orthanc, store_url), runtime)
    assert summary["studies"] == {"found": 1, "pulled": 1, "skipped": 0, "failed": 0}
    store = SiteStore(store_url, SITE)
    keys = store.find(RAW_DICOMWEB)
    assert len(keys) == 6
    pulled = {str(pydicom.dcmread(io.BytesIO(store.read_bytes(k))).SOPInstanceUID): k for k in keys}
    assert set(pulled) == set(study.sop_uids)
    for sop, key in pulled.items():
        assert key.endswith(f"/{opaque_key(sop, site_ref_key(store))}.dcm") and sop not in key
    assert store.find(RAW_STAGING_DICOMWEB) == []
    assert catalogued_series(store) == {uid: 3 for uid in study.series_uids}
    assert_nothing_identifying_in_prefect([study])


def test_orthanc_stopped_mid_pull_then_a_later_run_completes(
    orthanc: Orthanc, dask_address: str, tmp_path: Path
) -> None:
    store_url = str(tmp_path / "store")
    store = SiteStore(store_url, SITE)
    runtime = RuntimeOptions(dask_address=dask_address)
    studies = [make_ct_study(f"PAT-{i}", n_slices=6, size=64, seed=i) for i in range(6)]
    for study in studies:
        orthanc.upload(list(study.files))

    staging = Path(store.path(RAW_STAGING_DICOMWEB))
    stopped = threading.Event()

    def stop_orthanc_when_a_series_starts() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not stopped.is_set():
            if staging.exists() and any(staging.iterdir()):
                orthanc.kill()
                stopped.set()
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=stop_orthanc_when_a_series_starts, daemon=True)
    watcher.start()
    with pytest.raises(StageFailed) as excinfo:
        pull_dicomweb(params(orthanc, store_url, retries=0, ingest=False), runtime)
    watcher.join(5)
    assert stopped.is_set()
    message = str(excinfo.value)
    assert "\n" not in message and "retried on the next run" in message
    for study in studies:
        assert study.study_uid not in message
    # No partial series anywhere: committed series are complete, staging is gone.
    assert not staging.exists() or not any(staging.iterdir())
    committed = PullState.load(store)
    failed = committed.sources[orthanc.dicomweb].failed
    assert failed, "some studies must have failed"
    assert len(committed.series) + len(failed) == len(studies)
    raw = Path(store.path(RAW_DICOMWEB))
    for series_dir in (d for d in raw.glob("*/*") if d.is_dir()) if raw.exists() else []:
        assert len(list(series_dir.glob("*.dcm"))) == 6

    # The PACS is back: the next run pulls exactly the failed studies and completes.
    with restarted(orthanc):
        summary = pull_dicomweb(params(orthanc, store_url), runtime).to_dict()
    assert summary["studies"]["failed"] == 0
    assert summary["studies"]["pulled"] == len(failed)
    for study in studies:
        assert_study_in_raw(store, study)
    assert PullState.load(store).sources[orthanc.dicomweb].failed == {}
    assert catalogued_series(store) == {s.series_uids[0]: 6 for s in studies}


KEY = RefKey(b"k" * 32)


def test_search_filters_watermark_and_failed_study_retry(orthanc: Orthanc) -> None:
    """QIDO filters: modality, date range, the watermark, and failed studies searched by UID."""
    today = dt.date.today()
    old = make_ct_study("PAT-OLD", study_date=today - dt.timedelta(days=400), seed=4)
    recent = make_ct_study("PAT-NEW", study_date=today, seed=5)
    for study in (old, recent):
        orthanc.upload(list(study.files))
    with dicomweb_client(orthanc.dicomweb, DicomwebCredentials(*orthanc.auth)) as client:
        base = orthanc.dicomweb

        def found(state: PullState, modalities: list[str], dates: str | None) -> set[str]:
            return {p.study_uid for p in plan_pull(client, state, base, modalities, dates, key=KEY)}

        empty = PullState()
        assert found(empty, [], None) == {old.study_uid, recent.study_uid}
        assert found(empty, ["MR"], None) == set()
        assert found(empty, ["CT", "MR"], None) == {old.study_uid, recent.study_uid}
        yesterday = (today - dt.timedelta(days=1)).isoformat()
        assert found(empty, [], study_date_filter(yesterday, None, None)) == {recent.study_uid}
        # Watermark: "last" searches from the last successful pull minus the overlap.
        watermark = dt.datetime.now().astimezone().isoformat()
        assert study_date_filter("last", None, None) is None
        dates = study_date_filter("last", None, watermark)
        assert found(empty, [], dates) == {recent.study_uid}
        # A study that failed earlier is searched again by UID even outside the date range.
        state = PullState()
        state.source(base).failed[opaque_key(old.study_uid, KEY)] = {
            "study_uid": old.study_uid,
            "attempts": 1,
            "error": "connection failed",
        }
        assert found(state, [], dates) == {old.study_uid, recent.study_uid}
        # Series already pulled with the same instance count are not planned again.
        state.series[opaque_key(recent.series_uids[0], KEY)] = {"study": "x", "instances": 3}
        plans = {p.study_uid: p for p in plan_pull(client, state, base, [], dates, key=KEY)}
        assert plans[recent.study_uid].up_to_date
        assert len(plans[old.study_uid].jobs) == 1
        # ...but a series whose instance count changed on the server is pulled again.
        state.series[opaque_key(recent.series_uids[0], KEY)]["instances"] = 2
        plans = {p.study_uid: p for p in plan_pull(client, state, base, [], dates, key=KEY)}
        assert len(plans[recent.study_uid].jobs) == 1


def test_wrong_credentials_fail_with_one_clean_line(
    orthanc: Orthanc, dask_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make = make_ct_study("PAT-9", seed=9)
    orthanc.upload(list(make.files))
    monkeypatch.setenv(ENV_USER, ORTHANC_USER)
    monkeypatch.setenv(ENV_PASSWORD, "wrong")
    with pytest.raises(OncoflowError) as excinfo:
        pull_dicomweb(
            params(orthanc, str(tmp_path / "s"), retries=0),
            RuntimeOptions(dask_address=dask_address),
        )
    message = str(excinfo.value)
    assert "HTTP 401" in message and "nothing was pulled" in message
    assert "\n" not in message and "wrong" not in message
    assert not (tmp_path / "s" / SITE / "raw" / "pacs").exists()


def test_credentials_are_not_accepted_in_the_url(tmp_path: Path) -> None:
    with pytest.raises(OncoflowError, match="credentials must not be part"):
        PullParams(
            source="dicomweb+http://user:pw@127.0.0.1:1/dicom-web", site=SITE, store=str(tmp_path)
        )


def test_credentials_from_a_prefect_secret_block(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.blocks.system import Secret

    monkeypatch.delenv(ENV_USER, raising=False)
    monkeypatch.delenv(ENV_PASSWORD, raising=False)
    Secret(value=json.dumps({"user": "pacs-reader", "password": "s3cret"})).save(
        "oncoflow-test-dicomweb", overwrite=True
    )
    creds = load_credentials("oncoflow-test-dicomweb")
    assert (creds.user, creds.password, creds.origin) == ("pacs-reader", "s3cret", "secret-block")
    assert "s3cret" not in repr(creds)
    assert load_credentials(None).origin == "none"
    monkeypatch.setenv(ENV_USER, "env-user")
    monkeypatch.setenv(ENV_PASSWORD, "env-pw")
    assert load_credentials("oncoflow-test-dicomweb").user == "env-user"
    with pytest.raises(OncoflowError, match="could not read the Prefect Secret block"):
        monkeypatch.delenv(ENV_USER)
        load_credentials("no-such-block")


def test_cli_ingest_dicomweb_source(
    orthanc: Orthanc, dask_address: str, prefect_api: str, tmp_path: Path
) -> None:
    study = make_ct_study("PAT-CLI", n_series=1, seed=7)
    orthanc.upload(list(study.files))
    store = tmp_path / "store"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        ENV_USER: ORTHANC_USER,
        ENV_PASSWORD: ORTHANC_PASSWORD,
    }
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "ingest",
        f"dicomweb+{orthanc.dicomweb}",
        "--site",
        SITE,
        "--store",
        str(store),
        "--modality",
        "CT",
        "--since",
        "all",
        "--dask-address",
        dask_address,
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["studies"] == {"found": 1, "pulled": 1, "skipped": 0, "failed": 0}
    assert out["instances"] == 3
    assert study.study_uid not in proc.stdout + proc.stderr
    assert catalogued_series(SiteStore(str(store), SITE)) == {study.series_uids[0]: 3}

"""extract-radiomics against an external ``dask scheduler`` + two ``dask worker`` processes.

* the flow runs on the external cluster given by ``dask_address``;
* determinism: the table is byte-identical with 2 external workers and a 1-worker LocalCluster;
* fault: a worker process killed (SIGKILL) while it executes an extraction → the run completes
  and the table is byte-identical to the undisturbed run's.
"""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from distributed import Client

from flows.extract import build_params, extract_radiomics
from flows.runtime import THREAD_ENV, RuntimeOptions
from tasks.radiomics.cache import CACHE_PREFIX
from tasks.radiomics.samples import SampleRoi, SampleSeries, series_key, write_harmonised_sample
from tasks.store import SiteStore
from tests.services import dask_cluster

pytestmark = pytest.mark.integration

# 8 (series, ROI) units of varied size; Original only keeps each task short.
SPECS = [
    SampleSeries(
        series_key(20 + i),
        "CT",
        size=(40 + 4 * i, 40 + 4 * i, 16),
        rois=(SampleRoi("gtv", 7.0 + i), SampleRoi("node", 4.0)),
        seed=20 + i,
    )
    for i in range(4)
]
PARAMS = '{"setting": {"binWidth": 25}, "imageType": {"Original": {}}}'


@pytest.fixture(scope="module")
def cluster(prefect_api, tmp_path_factory):
    """``dask scheduler`` + 2 single-threaded ``dask worker`` processes (with nannies)."""
    logdir = tmp_path_factory.mktemp("dask-logs")
    with dask_cluster(logdir, n_workers=2, env=THREAD_ENV) as running:
        yield running


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("params") / "original.yaml"
    path.write_text(PARAMS)
    return str(path)


def fresh_store(root: Path) -> SiteStore:
    store = SiteStore(str(root), "site-a")
    write_harmonised_sample(store, SPECS)
    return store


def run(store: SiteStore, params_file: str, runtime: RuntimeOptions) -> tuple[dict, dict]:
    """Run the extraction; return its summary and the table's objects (parts and metadata)."""
    summary = extract_radiomics(build_params("site-a", store.url, params_file), runtime)
    assert summary.counts == {"ok": 8}
    key = summary.extra["table"]
    common = store.read_bytes(f"{key}/_common_metadata")
    return summary.to_dict(), {**store.table_files(key), "_common_metadata": common}


@pytest.fixture(scope="module")
def reference(cluster, params_file, tmp_path_factory) -> dict:
    """The table of an undisturbed run on the two external workers."""
    store = fresh_store(tmp_path_factory.mktemp("reference"))
    with Client(cluster.address, timeout=10) as client:
        before = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
        summary, table = run(store, params_file, RuntimeOptions(dask_address=cluster.address))
        after = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
    assert summary["parts_computed"] == 16
    assert after - before >= 4 * 3  # one task per image went through the external scheduler
    return table


def test_one_and_two_workers_give_byte_identical_tables(reference, params_file, tmp_path):
    _, table = run(fresh_store(tmp_path / "one"), params_file, RuntimeOptions(workers=1))
    assert table == reference


def test_killed_worker_run_completes_with_the_same_table(cluster, reference, params_file, tmp_path):
    store = fresh_store(tmp_path / "fault")
    killed: dict[str, int] = {}
    errors: list[BaseException] = []

    def kill_a_busy_worker() -> None:
        try:
            with Client(cluster.address, timeout=10) as client:
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and not killed:
                    # mid-run: some results are cached already, and a worker is executing one
                    done = store.find(CACHE_PREFIX)
                    if done:
                        pids = client.run(os.getpid)
                        busy = client.run(lambda dask_worker: len(dask_worker.state.executing))
                        for address, n in sorted(busy.items()):
                            if n:
                                os.kill(pids[address], signal.SIGKILL)
                                killed[address] = pids[address]
                                break
                    time.sleep(0.05)
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    summary, table = run(store, params_file, RuntimeOptions(dask_address=cluster.address))
    killer.join(timeout=60)
    assert not errors, errors
    assert killed, "no worker was killed mid-run (the run ended before a kill was possible)"
    assert summary["counts"] == {"ok": 8}
    assert table == reference
    # the nanny restarts the killed worker: the cluster is back to two workers
    with Client(cluster.address, timeout=10) as client:
        client.wait_for_workers(2, timeout=120)
        assert killed.popitem()[1] not in client.run(os.getpid).values()

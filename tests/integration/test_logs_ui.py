"""pyradiomics' log records reach the Prefect API (the UI's run logs) from Dask worker processes.

`flows.runtime` sets ``PREFECT_LOGGING_EXTRA_LOGGERS=radiomics,distributed``, so Prefect attaches
its API handler to pyradiomics' logger in every process, Dask workers included, and records
logged inside a task run carry that task run's id. The level of pyradiomics' logger is
``ONCOFLOW_RADIOMICS_LOG_LEVEL`` (default WARNING); this test sets INFO to see its progress.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flows.extract import build_params, extract_radiomics
from flows.runtime import RuntimeOptions
from tasks.radiomics.extract import GLCM_ADVISORY, LOG_LEVEL_ENV
from tasks.radiomics.samples import SampleRoi, SampleSeries, series_key, write_harmonised_sample
from tasks.store import SiteStore

pytestmark = pytest.mark.integration
SITE = "site-logs"


def _logs_of_extract_run(timeout: float) -> tuple[object, list]:
    """The extract flow run of SITE and its logs (waits for the radiomics records to land)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"extract-{SITE}"]))
        )
        while True:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            )
            if any(log.name.startswith("radiomics") for log in logs):
                return run, logs
            if time.monotonic() > deadline:
                return run, logs
            time.sleep(1)


def test_radiomics_records_reach_the_run_logs(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LOG_LEVEL_ENV, "INFO")  # inherited by the LocalCluster's workers
    store_url = str(tmp_path / "store")
    spec = SampleSeries(series_key(41), "CT", size=(24, 24, 10), rois=(SampleRoi("gtv", 5.0),))
    write_harmonised_sample(SiteStore(store_url, SITE), [spec])
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "setting": {"binWidth": 25, "label": 1},
                "imageType": {"Original": {}},
                "featureClass": {"firstorder": [], "glcm": []},
            }
        )
    )
    summary = extract_radiomics(
        build_params(SITE, store_url, str(params)), RuntimeOptions(workers=1)
    )
    assert summary.counts == {"ok": 1}

    run, logs = _logs_of_extract_run(timeout=60)
    radiomics = [log for log in logs if log.name.startswith("radiomics")]
    assert radiomics, sorted({log.name for log in logs})
    messages = [log.message for log in radiomics]
    assert "Calculating features with label: 1" in messages
    assert "Computing glcm" in messages
    # logged inside the extract task run on a Dask worker: attached to that task run
    assert all(log.flow_run_id == run.id and log.task_run_id is not None for log in radiomics)
    # pyradiomics' repeated SumAverage advisory is dropped
    assert not any(m.startswith(GLCM_ADVISORY) for m in messages)

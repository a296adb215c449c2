"""Start-up guard: the CLI and the extract flow import no heavy package until there is work.

A fully cached ``oncoflow extract`` rerun has nothing to compute; Dask, pyradiomics, SimpleITK,
highdicom and pyarrow.dataset are loaded only on the paths that need them (each costs 0.1-0.4 s
of CPU at start-up). Checked in a fresh interpreter, since this test process has them all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = (
    "dask",
    "distributed",
    "prefect_dask",
    "radiomics",
    "SimpleITK",
    "matplotlib",
    "highdicom",
    "pydicom",
    "pyarrow.dataset",
)


def heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return the heavy modules it left loaded."""
    report = f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    probe = f"import json, sys\n{code}\n{report}"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_cli_and_the_extract_flow_import_no_heavy_package() -> None:
    assert heavy_modules_after("import flows.cli, flows.extract") == []


def test_the_probe_sees_a_heavy_import() -> None:
    assert heavy_modules_after("import flows.cli, SimpleITK") == ["SimpleITK"]


def test_stage_flows_declare_a_dask_runner_built_when_a_run_starts(monkeypatch) -> None:
    from prefect_dask import DaskTaskRunner

    from flows.extract import extract_flow

    monkeypatch.setenv("ONCOFLOW_DASK_ADDRESS", "tcp://127.0.0.1:8786")
    runner = extract_flow.task_runner.duplicate()  # what Prefect enters for a flow run
    assert isinstance(runner, DaskTaskRunner) and runner.address == "tcp://127.0.0.1:8786"
    monkeypatch.delenv("ONCOFLOW_DASK_ADDRESS")
    monkeypatch.setenv("ONCOFLOW_WORKERS", "3")
    runner = extract_flow.task_runner.duplicate()
    assert isinstance(runner, DaskTaskRunner) and runner.address is None
    assert runner.cluster_kwargs["n_workers"] == 3
    assert runner.cluster_kwargs["threads_per_worker"] == 1


def test_a_fully_cached_rerun_imports_no_pyradiomics_nor_pandas_and_writes_nothing(
    tmp_path,
) -> None:
    from flows.extract import _write_outputs, build_params
    from tasks.radiomics.extract import extract_image_rois, plan_units
    from tasks.radiomics.params import load_params
    from tasks.radiomics.plan import collect_rows
    from tasks.radiomics.samples import (
        SampleRoi,
        SampleSeries,
        series_key,
        write_harmonised_sample,
    )
    from tasks.store import SiteStore

    store = SiteStore(str(tmp_path / "store"), "site-a")
    sample = SampleSeries(series_key(1), size=(24, 24, 12), rois=(SampleRoi("gtv", 6.0),))
    write_harmonised_sample(store, [sample])
    params_file = tmp_path / "params.yaml"
    params_file.write_text("setting: {binWidth: 25}\nimageType: {Original: {}}\n")
    params, _ = load_params(str(params_file))
    units = plan_units(store)
    outcomes = {o.result.key: o for o in extract_image_rois(store, units, params)}  # the cache
    plan = (
        "from flows.extract import build_params, select_rois\n"
        "from tasks.radiomics.plan import cached_outcomes\n"
        f"roi = select_rois(build_params('site-a', {store.url!r}, {str(params_file)!r}))\n"
        "assert len(cached_outcomes(roi.store, roi.units, roi.radiomics)) == len(roi.units) == 1"
    )
    # no features table of these parameters yet: pyradiomics' own schema checks them
    assert "radiomics" in heavy_modules_after(plan)
    extract = build_params("site-a", store.url, str(params_file))
    rows = collect_rows(store, units, outcomes)
    assert _write_outputs(store, extract, params, rows, set(outcomes)).written
    # the rest of the rerun: rows from the cache, compared with the table; nothing built
    write = (
        f"{plan}\n"
        "from flows.extract import _write_outputs\n"
        "from tasks.radiomics.plan import collect_rows\n"
        "outcomes = cached_outcomes(roi.store, roi.units, roi.radiomics)\n"
        "rows = collect_rows(roi.store, roi.units, outcomes)\n"
        f"out = _write_outputs(roi.store, build_params('site-a', {store.url!r}, "
        f"{str(params_file)!r}), roi.radiomics, rows, set())\n"
        "assert not out.written and out.rows == 1 and out.feature_columns > 90, out\n"
        "from tasks.quarantine import replace_quarantine\n"
        "from tasks.records import Stage\n"
        "assert not replace_quarantine(roi.store, Stage.EXTRACT, [])  # nothing quarantined\n"
        "assert 'pandas' not in sys.modules, 'pandas imported'"
    )
    from tasks.quarantine import replace_quarantine
    from tasks.records import Stage

    assert replace_quarantine(store, Stage.EXTRACT, [])  # the first run: the table appears
    stamps = {**store.stamps("features"), **store.stamps("quarantine.parquet")}
    assert heavy_modules_after(plan) == []
    assert heavy_modules_after(write) == []
    assert {**store.stamps("features"), **store.stamps("quarantine.parquet")} == stamps

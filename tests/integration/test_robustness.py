"""``oncoflow robustness`` on real Prefect and a real Dask LocalCluster: the table, user errors."""

from __future__ import annotations

import asyncio
import math

import pyarrow.parquet as pq
import pytest

from flows import cli
from flows.robustness import assess_robustness, build_params
from flows.runtime import RuntimeOptions
from tasks.names import KEY_TAIL
from tasks.radiomics.robustness import robustness_key
from tasks.radiomics.samples import SampleRoi, SampleSeries, series_key, write_harmonised_sample
from tasks.store import SiteStore
from tests.services import prefect_records

pytestmark = pytest.mark.integration

PARAMS = '{"setting": {"binWidth": 25}, "featureClass": {"firstorder": [], "glcm": []}}'


def test_robustness_table_and_errors(prefect_api, tmp_path, capsys):
    store = SiteStore(str(tmp_path / "store"), "site-a")
    specs = [
        SampleSeries(
            series_key(40 + i), "CT", size=(24, 24, 12), rois=(SampleRoi("gtv", 5.0 + i),), seed=i
        )
        for i in range(4)
    ]
    write_harmonised_sample(store, specs)
    params_file = tmp_path / "p.json"
    params_file.write_text(PARAMS)
    params = build_params("site-a", str(tmp_path / "store"), str(params_file), icc_threshold=0.8)
    summary = assess_robustness(params, RuntimeOptions(workers=1))
    assert summary.counts == {"ok": 4}
    # every variant is computed (the original too: extract never ran here); random-roi needs room
    assert 4 * 7 <= summary.extra["variants_computed"] <= 4 * 8
    key = robustness_key(summary.extra["params_hash"])
    table = pq.read_table(store.path(key))
    rows = {r["feature"]: r for r in table.to_pylist()}
    assert len(rows) == summary.extra["features"] and "original_glcm_JointEntropy" in rows
    mean = rows["original_firstorder_Mean"]
    assert mean["ibsi"] == "Q4LE" and mean["n_rois"] == 4
    assert -1.0 <= mean["icc"] <= 1.0 and mean["stable"] == (mean["icc"] >= 0.8)
    assert mean["corr_shuffled"] == pytest.approx(1.0)  # shuffling keeps first-order values
    assert all(math.isfinite(r["icc"]) for r in rows.values() if r["n_rois"] == 4)
    assert pq.read_schema(store.path(key)).metadata[b"oncoflow.icc_threshold"] == b"0.8"
    assert summary.tables_written == [key]
    # task runs named by stage, modality, ROI and the end of the pseudonymous series key
    _, _, artifacts, tasks = asyncio.run(prefect_records(["feature-robustness"]))
    assert sorted(t.name for t in tasks) == sorted(
        f"robustness-CT-gtv-{s.series[-KEY_TAIL:]}" for s in specs
    )
    summary_md = next(a.data for a in artifacts if a.key == "site-a-robustness-summary")
    assert "Least stable features" in summary_md and key in summary_md
    # (a rerun computing nothing is tested on the task function: test_radiomics_robustness.py)
    # user mistakes: one line
    with pytest.raises(SystemExit) as exc:
        cli.main(
            [
                "robustness",
                "--site",
                "site-a",
                "--store",
                str(tmp_path / "store"),
                "--params",
                str(params_file),
                "--roi",
                "liver",
            ]
        )
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")

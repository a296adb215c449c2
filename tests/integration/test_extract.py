"""The extract-radiomics flow on real Prefect + a Dask LocalCluster (2 workers) + S3 (moto)."""

import asyncio
import json
import math
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from radiomics.featureextractor import RadiomicsFeatureExtractor

from flows import cli
from flows.extract import build_params, extract_flow, extract_radiomics
from flows.runtime import RuntimeOptions, dask_cluster, task_runner
from tasks.errors import StageFailed
from tasks.radiomics.cache import CACHE_PREFIX
from tasks.radiomics.diagnostics import diagnostics_table_key
from tasks.radiomics.params import load_params
from tasks.radiomics.samples import SampleRoi, SampleSeries, series_key, write_harmonised_sample
from tasks.research.methods import read_methods
from tasks.store import SiteStore

pytestmark = pytest.mark.integration

SPECS = [
    SampleSeries(
        series_key(10),
        "CT",
        size=(32, 32, 14),
        rois=(
            SampleRoi("gtv", 6.0),
            SampleRoi("empty", kind="empty"),
            SampleRoi("one", kind="one-voxel"),
            SampleRoi("outside", 5.0, kind="outside"),
        ),
        seed=1,
    ),
    SampleSeries(series_key(11), "MR", size=(28, 28, 12), rois=(SampleRoi("gtv", 4.0),), seed=2),
    SampleSeries(
        series_key(12),
        "CT",
        size=(36, 36, 16),
        rois=(SampleRoi("gtv", 7.0), SampleRoi("node", 4.0)),
        seed=3,
    ),
]
PARAMS = {
    "setting": {"binWidth": 25, "label": 1},
    "imageType": {"Original": {}, "LoG": {"sigma": [1.0]}},
}


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def read_table(store: SiteStore, key: str):
    """Read a table in parts with DuckDB (not the store's reader), sorted by key."""
    con = store.connect_duckdb()
    try:
        table = con.sql(
            f"SELECT * FROM read_parquet('{store.uri(key)}/*.parquet') ORDER BY series, roi"
        ).to_arrow_table()
    finally:
        con.close()
    if "diagnostics" in key:
        return table
    with store.open(f"{key}/_common_metadata") as fh:  # the table's metadata
        return table.replace_schema_metadata(pq.read_schema(fh).metadata)


def cache_listing(store: SiteStore) -> dict[str, str]:
    return store.modified(CACHE_PREFIX)


async def artifacts_of(flow_run_id):
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def test_extract_flow_on_s3(prefect_api, s3_bucket, tmp_path, capsys):
    store = SiteStore(f"{s3_bucket}/stores", "site-a")
    write_harmonised_sample(store, SPECS)
    params_file = write_yaml(tmp_path / "params.yaml", PARAMS)
    options = RuntimeOptions(workers=2)

    with dask_cluster(options):
        # 1. first run: every unit computed, defective ROIs quarantined with their reason
        state = extract_flow.with_options(task_runner=task_runner(options))(
            build_params("site-a", store.url, params_file), return_state=True
        )
        assert state.is_completed()
        summary = state.result()
        assert summary["counts"] == {"ok": 4, "quarantined": 3}
        assert summary["reasons"] == {
            "empty-mask": 1,
            "mask-outside-image": 1,
            "one-voxel-mask": 1,
        }
        assert summary["parts_computed"] == 7 * 3 and summary["parts_reused"] == 0
        key = summary["table"]
        assert key == f"features/{summary['params_hash']}.parquet"
        table = read_table(store, key)
        rows = table.to_pylist()
        assert [(r["series"], r["roi"]) for r in rows] == sorted(
            (s.series, r.name) for s in SPECS for r in s.rois
        )
        by_key = {(r["series"], r["roi"]): r for r in rows}
        assert by_key[(SPECS[0].series, "empty")]["reason"] == "empty-mask"
        assert by_key[(SPECS[0].series, "empty")]["original_firstorder_Mean"] is None
        assert by_key[(SPECS[1].series, "gtv")]["modality"] == "MR"
        quarantine = {
            (r["item"], r["reason"]) for r in store.quarantine_rows() if r["stage"] == "extract"
        }
        assert quarantine == {
            (f"{SPECS[0].series}/empty", "empty-mask"),
            (f"{SPECS[0].series}/one", "one-voxel-mask"),
            (f"{SPECS[0].series}/outside", "mask-outside-image"),
        }
        # the table's values are pyradiomics' own on the same files
        ok = by_key[(SPECS[2].series, "node")]
        with tempfile.TemporaryDirectory() as tmp:
            image, mask = Path(tmp) / "i.nii.gz", Path(tmp) / "m.nii.gz"
            image.write_bytes(store.read_bytes(f"harmonised/{SPECS[2].series}/image.nii.gz"))
            mask.write_bytes(store.read_bytes(f"harmonised/{SPECS[2].series}/mask-node.nii.gz"))
            reference = RadiomicsFeatureExtractor(PARAMS).execute(str(image), str(mask))
        features = {k: float(v) for k, v in reference.items() if not k.startswith("diagnostics_")}
        assert set(features) <= set(table.column_names)
        for name, value in features.items():
            assert math.isclose(ok[name], value, rel_tol=1e-9) or (
                math.isnan(value) and math.isnan(ok[name])
            ), name
        assert any(c.startswith("log-sigma-1-0-mm-3D_") for c in table.column_names)
        # pyradiomics' per-ROI diagnostics are kept in a side table, its settings in metadata
        diagnostics = read_table(store, diagnostics_table_key(summary["params_hash"])).to_pylist()
        diag = {(r["series"], r["roi"]): r for r in diagnostics}
        assert set(diag) == {k for k, r in by_key.items() if r["status"] == "ok"}
        for name in (
            "Mask-original_VoxelNum",
            "Mask-original_BoundingBox",
            "Image-original_Spacing",
        ):
            want = reference[f"diagnostics_{name}"]
            got = diag[(SPECS[2].series, "node")][f"diagnostics_{name}"]
            assert got == (list(want) if isinstance(want, tuple) else want), name
        methods = read_methods(table.schema.metadata)
        effective = methods["effective_settings"]
        assert effective["setting"]["binWidth"] == 25 and effective["setting"]["padDistance"] == 5
        assert effective["imageType"]["LoG"]["sigma"] == [1.0]
        assert methods["versions"]["pyradiomics"] == "3.0.1"
        kinds = {a.type for a in asyncio.run(artifacts_of(state.state_details.flow_run_id))}
        assert {"markdown", "progress", "table"} <= kinds

        # 2. rerun through the CLI: nothing computed, nothing rewritten
        table_modified = store.modified(key)
        listing = cache_listing(store)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["extract", "--site", "site-a", "--store", store.url,
                      "--params", params_file, "--json"])  # fmt: skip
        assert exit_info.value.code == 0
        again = json.loads(capsys.readouterr().out)
        assert (again["parts_computed"], again["tables_written"]) == (0, [])
        assert again["parts_reused"] == 21
        assert store.modified(key) == table_modified
        assert cache_listing(store) == listing

        # 3. a changed LoG sigma recomputes the LoG part only
        changed = {**PARAMS, "imageType": {"Original": {}, "LoG": {"sigma": [2.0]}}}
        third = extract_radiomics(
            build_params("site-a", store.url, write_yaml(tmp_path / "log2.yaml", changed)),
            options,
        )
        assert (third.extra["parts_computed"], third.extra["parts_reused"]) == (7, 14)
        assert third.extra["table"] != key
        assert any(
            c.startswith("log-sigma-2-0-mm-3D_")
            for c in read_table(store, third.extra["table"]).column_names
        )

        # 4. a series filter computes that series only and keeps the other rows in the table
        fourth = extract_radiomics(
            build_params("site-a", store.url, params_file, series=[SPECS[1].series]), options
        )
        assert fourth.counts == {"ok": 1}
        assert fourth.extra["rows"] == 7 and fourth.tables_written == []

        # 5. an input changed behind harmonise's back fails its unit when it must be computed
        # (new parameters); above the threshold the run's final state is Failed
        store.write_bytes(f"harmonised/{SPECS[1].series}/image.nii.gz", b"changed bytes")
        other = write_yaml(tmp_path / "bw20.yaml", {**PARAMS, "setting": {"binWidth": 20}})
        bad = build_params("site-a", store.url, other, max_failure_ratio=0.0)
        failed = extract_flow.with_options(task_runner=task_runner(options))(bad, return_state=True)
        assert failed.is_failed()
        with pytest.raises(StageFailed, match=r"1 of 7 ROIs failed"):
            failed.result()
        bad_key = f"features/{load_params(other)[0].params_hash()}.parquet"
        rows = {(r["series"], r["roi"]): r for r in read_table(store, bad_key).to_pylist()}
        assert rows[(SPECS[1].series, "gtv")]["status"] == "failed"
        assert rows[(SPECS[2].series, "gtv")]["status"] == "ok"

        # 6. a series gone from the site: its rows leave the table, the diagnostics and the
        # reports; nothing computed
        write_harmonised_sample(store, SPECS[:2])
        sixth = extract_radiomics(build_params("site-a", store.url, params_file), options)
        assert (sixth.extra["rows"], sixth.stale_removed) == (5, 2)
        assert sixth.tables_written == [key] and sixth.extra["parts_computed"] == 0
        rows = read_table(store, key).to_pylist()
        assert sorted((r["series"], r["roi"]) for r in rows) == sorted(
            (s.series, r.name) for s in SPECS[:2] for r in s.rois
        )
        diagnostics = read_table(store, diagnostics_table_key(summary["params_hash"]))
        assert SPECS[2].series not in diagnostics.column("series").to_pylist()
        assert not [k for k in store.find(f"{key[: -len('.parquet')]}.sr") if SPECS[2].series in k]

"""The features table: contract columns, names unchanged, provenance, deterministic bytes."""

import io
import json
import math

import pyarrow.parquet as pq

from tasks.radiomics.extract import RoiUnit
from tasks.radiomics.params import canonical_json, validate_params
from tasks.radiomics.table import (
    KEY_COLUMNS,
    PROV_COLUMNS,
    STATUS_COLUMNS,
    FeatureRow,
    build_features_table,
    features_key,
    written_with,
)
from tasks.store import SiteStore, table_to_parquet_bytes

PARAMS = validate_params({"setting": {"binWidth": 25}, "imageType": {"Original": {}}})


def make_unit(series: str, roi: str) -> RoiUnit:
    return RoiUnit(
        series=series,
        study="2.25.9",
        patient="p-1",
        modality="CT",
        roi=roi,
        image=f"harmonised/{series}/image.nii.gz",
        mask=f"harmonised/{series}/mask-{roi}.nii.gz",
        image_sha256="a" * 64,
        mask_sha256=roi[0] * 64,
        voxels=1000,
    )


ROWS = [
    FeatureRow(
        make_unit("2.25.2", "gtv"),
        "ok",
        features={"original_shape_VoxelVolume": 512.0, "original_firstorder_Mean": 41.25},
    ),
    FeatureRow(make_unit("2.25.1", "empty"), "quarantined", "empty-mask", "no voxel with label 1"),
    FeatureRow(
        make_unit("2.25.1", "gtv"),
        "ok",
        features={"original_shape_VoxelVolume": 100.0, "original_firstorder_Mean": math.nan},
    ),
]


def read_back(table, metadata):
    return pq.read_table(io.BytesIO(table_to_parquet_bytes(table, metadata)))


def test_columns_rows_and_provenance():
    table, metadata = build_features_table("site-a", ROWS, PARAMS)
    back = read_back(table, metadata)
    names = back.column_names
    assert names[: len(KEY_COLUMNS)] == list(KEY_COLUMNS)
    assert names[len(KEY_COLUMNS) : len(KEY_COLUMNS) + 3] == list(STATUS_COLUMNS)
    assert names[-len(PROV_COLUMNS) :] == list(PROV_COLUMNS)
    assert names[10:12] == ["original_shape_VoxelVolume", "original_firstorder_Mean"]
    rows = back.to_pylist()
    assert [(r["series"], r["roi"]) for r in rows] == [
        ("2.25.1", "empty"),
        ("2.25.1", "gtv"),
        ("2.25.2", "gtv"),
    ]
    assert rows[0]["status"] == "quarantined" and rows[0]["reason"] == "empty-mask"
    assert rows[0]["original_shape_VoxelVolume"] is None
    assert math.isnan(rows[1]["original_firstorder_Mean"])  # NaN stays NaN, not null
    assert rows[2]["original_firstorder_Mean"] == 41.25
    assert {r["params_hash"] for r in rows} == {PARAMS.params_hash()}
    assert {r["site"] for r in rows} == {"site-a"}
    assert rows[0]["prov_mask_sha256"] == "e" * 64
    assert rows[0]["prov_pyradiomics_version"] == "3.0.1"
    meta = back.schema.metadata
    assert json.loads(meta[b"oncoflow.params"]) == PARAMS.canonical()
    assert meta[b"oncoflow.params_hash"].decode() == PARAMS.params_hash()
    assert json.loads(meta[b"oncoflow.versions"])["pyradiomics"] == "3.0.1"
    assert features_key(PARAMS.params_hash()) == f"features/{PARAMS.params_hash()}.parquet"


def test_same_rows_in_any_order_give_identical_bytes():
    a = table_to_parquet_bytes(*build_features_table("site-a", ROWS, PARAMS))
    b = table_to_parquet_bytes(*build_features_table("site-a", ROWS[::-1], PARAMS))
    assert a == b
    other = validate_params({"setting": {"binWidth": 20}, "imageType": {"Original": {}}})
    assert table_to_parquet_bytes(*build_features_table("site-a", ROWS, other)) != a


def test_written_with_needs_the_table_of_the_same_parameters_and_pyradiomics(tmp_path):
    store = SiteStore(str(tmp_path), "site-a")
    assert not written_with(store, PARAMS)
    table, metadata = build_features_table("site-a", ROWS, PARAMS)
    key = features_key(PARAMS.params_hash())
    store.write_table(key, table, metadata)
    assert written_with(store, PARAMS)
    other = validate_params({"setting": {"binWidth": 20}, "imageType": {"Original": {}}})
    assert not written_with(store, other)
    versions = json.loads(metadata["oncoflow.versions"])
    store.write_table(key, table, {**metadata, "oncoflow.versions": canonical_json(
        {**versions, "pyradiomics": "2.2.0"}
    )})  # fmt: skip
    assert not written_with(store, PARAMS)
    store.write_table(key, table, {**metadata, "oncoflow.params": other.canonical_json()})
    assert not written_with(store, PARAMS)

"""The Croissant manifest: mlcroissant validates it; DCAT-AP fields and counts are right."""

from __future__ import annotations

import json

import mlcroissant as mlc
import pyarrow as pa
import pytest

from tasks.cohort.manifest import (
    build_manifest,
    content_hash,
    describe,
    parse_sha256sums,
    sha256sums,
)
from tasks.cohort.select import select_cohort
from tasks.cohort.spec import parse_spec
from tests.unit.test_cohort_fixture import PARAMS_HASH, build_site

SPEC = {
    "name": "lung",
    "title": "Lung cohort",
    "description": "Chest imaging",
    "licence": "CC-BY-4.0",
    "keywords": ["lung", "CT"],
    "features": PARAMS_HASH,
}


@pytest.fixture(scope="module")
def selection(tmp_path_factory: pytest.TempPathFactory):
    store = build_site(str(tmp_path_factory.mktemp("store")))
    return select_cohort(store, parse_spec(SPEC))


def manifest_for(selection, version=3):
    spec = parse_spec(SPEC)
    desc = describe(spec, "site-a", selection.series, selection.features)
    files = {f.name: (f.sha256, 100 + i) for i, f in enumerate(selection.files)}
    files["series.parquet"] = ("1" * 64, 10)
    files["features.parquet"] = ("2" * 64, 20)
    schemas = {
        "series.parquet": selection.series.schema,
        "features.parquet": selection.features.schema,
    }
    digest = content_hash(desc, {k: v[0] for k, v in files.items()})
    return desc, build_manifest(
        desc,
        version=version,
        date_published="2026-01-02",
        files=files,
        schemas=schemas,
        digest=digest,
        url="s3://b/lung/v3",
    )


def test_mlcroissant_validates_the_manifest(selection) -> None:
    _, doc = manifest_for(selection)
    dataset = mlc.Dataset(jsonld=json.loads(json.dumps(doc)))
    meta = dataset.metadata
    assert meta.name == "Lung cohort"
    assert meta.version == "3.0.0"
    assert [p.name for p in meta.publisher] == ["site-a"]
    assert meta.license == ["https://spdx.org/licenses/CC-BY-4.0.html"]
    assert sorted(meta.keywords) == ["CT", "lung"]
    assert {rs.name for rs in meta.record_sets} == {"series", "features"}
    names = {fo.name: fo for fo in meta.file_objects}
    assert names["series.parquet"].sha256 == "1" * 64
    assert len(names) == len(selection.files) + 2


def test_dcat_fields_and_counts(selection) -> None:
    _, doc = manifest_for(selection)
    assert doc["temporalCoverage"] == "2020/2023"
    assert doc["dct:temporal"]["dcat:startDate"] == "2020-01-01"
    assert doc["dct:temporal"]["dcat:endDate"] == "2023-12-31"
    counts = doc["counts"]
    assert counts["series"] == 4 and counts["patients"] == 3  # patient 0 has 2 series
    assert counts["by_modality"]["series"] == {"CT": 2, "MR": 1, "PT": 1}
    assert counts["by_modality"]["patients"] == {"CT": 2, "MR": 1, "PT": 1}
    assert counts["by_body_part"]["series"] == {"BRAIN": 1, "CHEST": 3}
    assert counts["by_body_part"]["patients"] == {"BRAIN": 1, "CHEST": 2}
    assert counts["by_roi"]["series"] == {"gtv": 3, "lung": 1}
    assert counts["feature_rows"] == 4


def test_content_hash_ignores_version_but_not_content(selection) -> None:
    desc, v1 = manifest_for(selection, version=1)
    _, v2 = manifest_for(selection, version=2)
    assert v1["contentHash"] == v2["contentHash"]
    changed = {**desc, "title": "Other"}
    assert content_hash(changed, {"a": "0" * 64}) != content_hash(desc, {"a": "0" * 64})
    assert content_hash(desc, {"a": "0" * 64}) != content_hash(desc, {"a": "1" * 64})


def test_sha256sums_round_trip() -> None:
    sums = {"b/x.nii.gz": "a" * 64, "series.parquet": "b" * 64}
    text = sha256sums(sums)
    assert text.decode().splitlines()[0] == f"{'a' * 64}  b/x.nii.gz"
    assert parse_sha256sums(text) == sums
    with pytest.raises(ValueError, match="line 3 is malformed"):
        parse_sha256sums(text + b"zz nope\n")


def test_record_set_types() -> None:
    from tasks.cohort.manifest import record_set

    schema = pa.schema([("a", pa.int64()), ("b", pa.list_(pa.float64())), ("c", pa.string())])
    rs = record_set("t", "t.parquet", schema, "d")
    types = {f["name"]: (f["dataType"], f.get("repeated", False)) for f in rs["field"]}
    assert types == {"a": ("sc:Integer", False), "b": ("sc:Float", True), "c": ("sc:Text", False)}

"""Release preparation: re-identification risk (pyCANON), generalisation, duplicates, faces."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.cohort.publish import publish_cohort
from tasks.cohort.risk import LEVELS, RiskSpec, measure, prepare_release
from tasks.cohort.spec import parse_spec
from tasks.cohort.storage import RetryPolicy
from tasks.errors import OncoflowError
from tests.unit.test_cohort_fixture import PARAMS_HASH, build_site

FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01, seed=1)
SPEC = {
    "name": "all",
    "title": "All",
    "description": "Every series",
    "licence": "CC-BY-4.0",
    "features": PARAMS_HASH,
    "include": {"dicom": True},
}


def row(i: int, age: int, date: str, sex: str = "F", maker: str = "ACME", **kw) -> dict:
    return {
        "series": f"2.25.{1000 + i}",
        "patient": f"p{i}",
        "modality": "CT",
        "body_part": "CHEST",
        "manufacturer": maker,
        "acquisition_date": date,
        "age_at_study": f"{age:03d}Y",
        "sex": sex,
        "rois": ["gtv"],
        "image": f"images/{i}.nii.gz",
        "image_sha256": f"{i:064x}",
        **kw,
    }


def test_a_unique_patient_is_generalised_until_k_is_met() -> None:
    rows = [row(i, 61 + i, f"2021{1 + i:02d}15") for i in range(5)]
    rows.append(row(5, 67, "20210620", maker="Siemens Healthineers"))  # unique manufacturer
    assert measure(rows, LEVELS[0])["k"] == 1  # exact ages and dates: everyone is unique
    assert measure(rows, LEVELS[1])["k"] == 1  # the manufacturer still singles one out
    out, report = prepare_release(rows, RiskSpec(min_k=5))
    assert [lv["k"] for lv in report.levels] == [1, 1, 6]
    assert report.level == 2 and "no manufacturer" in report.generalisation
    assert {r["age_at_study"] for r in out} == {"60-79"}
    assert {r["acquisition_date"] for r in out} == {"2021"}
    assert {r["manufacturer"] for r in out} == {None}
    public = report.public()
    assert public["generalisation"] == report.generalisation and public["levels"][2]["k"] == 6


def test_no_level_reaching_k_refuses_publication() -> None:
    rows = [row(i, 60 + i, "20210101") for i in range(4)] + [row(9, 60, "20210101", sex="M")]
    with pytest.raises(OncoflowError, match=r"re-identification risk too high: k = 1"):
        prepare_release(rows, RiskSpec(min_k=2))
    # l-diversity: every patient in one class has the same ROI set, l = 1
    same = [row(i, 60, "20210101") for i in range(4)]
    with pytest.raises(OncoflowError, match="l = 1"):
        prepare_release(same, RiskSpec(min_k=2, min_l=2))
    out, report = prepare_release(same, RiskSpec(min_k=4))
    assert report.level == 0 and out[0]["age_at_study"] == "060Y"  # nothing generalised


def test_relative_days_and_missing_metadata() -> None:
    rows = [
        row(0, 60, "20200110"),
        {**row(1, 60, "20230704"), "patient": "p0", "manufacturer": None},
        row(2, 70, ""),
    ]
    out, report = prepare_release(rows, RiskSpec())
    days = {r["series"]: r["days_from_first_study"] for r in out}
    expected = (dt.date(2023, 7, 4) - dt.date(2020, 1, 10)).days
    assert days == {"2.25.1000": 0, "2.25.1001": expected, "2.25.1002": None}
    assert report.missing == {"manufacturer": ["2.25.1001"], "acquisition_date": ["2.25.1002"]}


def plant_duplicate(store) -> str:
    """Copy a CT series under new UIDs and another patient (same image content)."""
    table = store.read_table("harmonised/series.parquet").to_pylist()
    source = table[0]
    copy = {**source, "series": "2.25.424242", "study": "2.25.434343", "patient": "pat-new"}
    store.write_table("harmonised/series.parquet", pa.Table.from_pylist([*table, copy]))
    return max(source["series"], copy["series"])  # the first by key is kept


def test_planted_duplicate_is_caught_and_a_head_mr_is_not_published_as_voxels(
    tmp_path: Path,
) -> None:
    store = build_site(str(tmp_path / "store"))
    withheld = plant_duplicate(store)
    result = publish_cohort(store, parse_spec(SPEC), str(tmp_path / "pub"), policy=FAST)
    version = tmp_path / "pub" / "all" / result.version
    series = pq.read_table(version / "series.parquet").to_pylist()
    keys = {r["series"] for r in series}
    assert withheld not in keys and len(keys) == 4
    features = pq.read_table(version / "features.parquet")
    assert withheld not in features.column("series").to_pylist()
    quarantine = store.read_table("quarantine.parquet").to_pylist()
    (dup,) = [q for q in quarantine if q["stage"] == "publish"]
    assert dup["item"] == withheld and dup["reason"] == "duplicate-pixel-data"
    assert "another patient" in dup["detail"]
    # the head MR: a row and features, but no image, mask or DICOM in the version
    (mr,) = [r for r in series if r["modality"] == "MR"]
    assert mr["image"] is None and mr["masks"] == [] and mr["dicom"] == []
    assert mr["series"] in features.column("series").to_pylist()
    files = {str(p.relative_to(version)) for p in version.rglob("*") if p.is_file()}
    assert not [f for f in files if mr["series"] in f]
    ct = next(r for r in series if r["modality"] == "CT")
    assert f"images/{ct['series']}.nii.gz" in files
    report = json.loads((version / "risk-report.json").read_text())
    assert report["withheld"] == {"duplicate-pixel-data": 1}
    assert report["features_only"] == {"head-neck-not-defaced": 1}
    assert report["duplicates_across_patients"] == 1
    assert withheld not in (version / "risk-report.json").read_text()  # counts only
    assert result.release == {"generalisation": "none", "k": 1, "withheld": 1, "features_only": 1,
                              "report": "reports/publish/all-risk.json"}  # fmt: skip
    detail = json.loads(store.read_bytes("reports/publish/all-risk.json"))
    assert detail["withheld_series"] == {"duplicate-pixel-data": [withheld]}
    assert detail["features_only_series"] == {"head-neck-not-defaced": [mr["series"]]}


def test_a_defaced_head_series_keeps_its_voxels(tmp_path: Path) -> None:
    store = build_site(str(tmp_path / "store"))
    table = store.read_table("harmonised/series.parquet").to_pylist()
    flagged = [{**r, "defaced": r["modality"] == "MR"} for r in table]
    store.write_table("harmonised/series.parquet", pa.Table.from_pylist(flagged))
    result = publish_cohort(store, parse_spec(SPEC), str(tmp_path / "pub"), policy=FAST)
    version = tmp_path / "pub" / "all" / result.version
    rows = pq.read_table(version / "series.parquet").to_pylist()
    (mr,) = [r for r in rows if r["modality"] == "MR"]
    assert mr["image"] and (version / mr["image"]).exists()


def test_a_risky_release_publishes_nothing(tmp_path: Path) -> None:
    store = build_site(str(tmp_path / "store"))
    spec = parse_spec({**SPEC, "risk": {"min_k": 3}})
    with pytest.raises(OncoflowError, match="re-identification risk too high"):
        publish_cohort(store, spec, str(tmp_path / "pub"), policy=FAST)
    assert not (tmp_path / "pub").exists() or not list((tmp_path / "pub").rglob("COMMITTED"))

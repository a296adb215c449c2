"""Cohort selection over the de-identified zone: filters, published columns, object names."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.cohort.select import SERIES_SCHEMA, select_cohort
from tasks.cohort.spec import parse_spec
from tasks.errors import OncoflowError
from tests.unit.test_cohort_fixture import PARAMS_HASH, build_site, series_uid

BASE = {"name": "c", "title": "t", "description": "d", "licence": "CC0-1.0"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    return build_site(str(tmp_path_factory.mktemp("store")))


def spec(**kw):
    return parse_spec({**BASE, **kw})


def test_everything_ok_is_selected_quarantined_is_not(store) -> None:
    sel = select_cohort(store, spec())
    uids = sel.series.column("series").to_pylist()
    assert uids == sorted(series_uid("site-a", i) for i in range(4))
    assert series_uid("site-a", 4) not in uids  # quarantined by harmonise
    assert sel.series.schema == SERIES_SCHEMA
    assert sel.features is None


def test_filters(store) -> None:
    ct = select_cohort(store, spec(selection={"modality": ["CT"], "body_part": "chest"}))
    assert set(ct.series.column("modality").to_pylist()) == {"CT"}
    assert ct.series.num_rows == 2
    window = {"date_from": "2021-01-01", "date_to": "2022-12-31"}
    dated = select_cohort(store, spec(selection=window))
    assert sorted(dated.series.column("acquisition_date").to_pylist()) == ["20210520", "20220301"]
    lung = select_cohort(store, spec(selection={"roi": ["lung"]}))
    assert lung.series.num_rows == 1
    assert lung.series.column("rois").to_pylist() == [["lung"]]  # only the asked ROI is shipped
    assert lung.series.column("masks").to_pylist() == [
        [f"masks/{series_uid('site-a', 0)}/lung.nii.gz"]
    ]
    with pytest.raises(OncoflowError, match="selects no series at site site-a"):
        select_cohort(store, spec(selection={"modality": ["US"]}))
    with pytest.raises(OncoflowError, match="site site-a is not in the site list"):
        select_cohort(store, spec(selection={"site": ["site-b"]}))


def test_object_names_are_pseudonymous(store) -> None:
    sel = select_cohort(store, spec(include={"dicom": True}))
    names = [f.name for f in sel.files]
    pattern = re.compile(
        r"^(images/2\.25\.\d+\.nii\.gz|masks/2\.25\.\d+/[a-z0-9_-]+\.nii\.gz|dicom/2\.25\.\d+/\d{5}\.dcm)$"
    )
    assert names and all(pattern.match(n) for n in names), names
    # 4 images, 4 masks, 2 DICOM per series, 1 SEG instance per series with a ROI
    assert sum(n.startswith("images/") for n in names) == 4
    assert sum(n.startswith("masks/") for n in names) == 4
    assert sum(n.startswith("dicom/") for n in names) == 4 * 2 + 3
    rows = {r["series"]: r for r in sel.series.to_pylist()}
    assert rows[series_uid("site-a", 0)]["seg_series"] == [series_uid("site-a", 100)]
    assert rows[series_uid("site-a", 3)]["seg_series"] == []  # no ROI, no SEG
    assert all(len(f.sha256) == 64 for f in sel.files)


def test_features_only_published_columns_and_selected_rows(store) -> None:
    sel = select_cohort(store, spec(features=PARAMS_HASH, selection={"roi": ["gtv"]}))
    table = sel.features
    assert table is not None
    assert "patient_id" not in table.column_names
    assert "diagnostics_Image-original_Hash" not in table.column_names
    assert "status" not in table.column_names
    for col in (
        "site",
        "series",
        "roi",
        "original_firstorder_Mean",
        "wavelet-LLH_glcm_Contrast",
        "prov_pyradiomics_version",
    ):
        assert col in table.column_names
    assert set(table.column("roi").to_pylist()) == {"gtv"}
    assert table.num_rows == 3  # gtv in series 0, 1, 2; the quarantined one is dropped
    assert sel.features_metadata == {"oncoflow.params_hash": PARAMS_HASH}


def test_feature_table_by_preset_name(tmp_path: Path) -> None:
    from tasks.radiomics.params import load_params

    store = build_site(str(tmp_path / "s"))
    with pytest.raises(OncoflowError, match="no feature table for 'ct'"):
        select_cohort(store, spec(features="ct"))
    ct_hash = load_params("ct")[0].params_hash()
    src = store.path(f"features/{PARAMS_HASH}.parquet")
    pq.write_table(pq.read_table(src), store.path(f"features/{ct_hash}.parquet"))
    sel = select_cohort(store, spec(features="ct"))
    assert sel.features is not None and sel.features.num_rows == 4

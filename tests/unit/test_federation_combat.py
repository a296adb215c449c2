"""Federated ComBat equals neuroCombat on the pooled table (3 sites of different sizes)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from neuroCombat import neuroCombat

from tasks.errors import OncoflowError
from tasks.federation.combat import (
    SiteAdjustment,
    SiteSummary,
    apply_adjustment,
    estimate,
    site_summary,
)

FEATURES = [
    "original_firstorder_Mean",
    "original_glcm_Contrast",
    "original_shape_VoxelVolume",
    "wavelet-LLH_firstorder_Energy",
    "original_gldm_DependenceEntropy",
]
SITES = {"site-a": 14, "site-b": 31, "site-c": 52}


def site_tables(seed: int = 7) -> dict[str, pa.Table]:
    rng = np.random.default_rng(seed)
    scales = np.array([40.0, 2.0, 5e3, 1e6, 1.5])
    means = np.array([100.0, 8.0, 3e4, 5e7, 6.0])
    tables = {}
    for i, (site, n) in enumerate(SITES.items()):
        age = rng.integers(35, 85, n).astype(np.float64)  # whole years: exact in float32
        sex = rng.choice(["F", "M"], n)
        shift = rng.normal(0, 0.8, len(FEATURES)) * scales
        stretch = 0.6 + 0.5 * i
        y = (
            means
            + 0.02 * scales * (age[:, None] - 60)
            + np.where(sex == "F", 0.3, 0)[:, None] * scales
            + stretch * rng.normal(0, 1, (n, len(FEATURES))) * scales
            + shift
        )
        cols = {name: y[:, j] for j, name in enumerate(FEATURES)}
        tables[site] = pa.table(
            {"series": [f"2.25.{i}{k}" for k in range(n)], "age": age, "sex": sex.tolist(), **cols}
        )
    return tables


def pooled_combat(tables: dict[str, pa.Table], eb: bool = True) -> dict[str, np.ndarray]:
    order = list(tables)
    dat = np.vstack(
        [np.column_stack([tables[s].column(f).to_numpy() for f in FEATURES]) for s in order]
    ).T
    covars = pd.DataFrame(
        {
            "batch": [s for s in order for _ in range(tables[s].num_rows)],
            "age": np.concatenate([tables[s].column("age").to_numpy() for s in order]),
            "sex": [v for s in order for v in tables[s].column("sex").to_pylist()],
        }
    )
    out = neuroCombat(
        dat=dat,
        covars=covars,
        batch_col="batch",
        categorical_cols=["sex"],
        continuous_cols=["age"],
        eb=eb,
    )["data"]
    result, start = {}, 0
    for s in order:
        n = tables[s].num_rows
        result[s] = out[:, start : start + n].T
        start += n
    return result


def federated(tables: dict[str, pa.Table], eb: bool = True) -> dict[str, np.ndarray]:
    # sites -> hub: summaries only (through JSON, as they travel)
    summaries = [
        SiteSummary.from_dict(
            json.loads(json.dumps(site_summary(site, t, FEATURES, ["sex"], ["age"]).to_dict()))
        )
        for site, t in tables.items()
    ]
    assert all(len(s.ssq) == len(FEATURES) for s in summaries)
    adjustments = estimate(summaries, empirical_bayes=eb)
    out = {}
    for site, table in tables.items():
        adj = SiteAdjustment.from_dict(json.loads(json.dumps(adjustments[site].to_dict())))
        harmonised = apply_adjustment(table, adj)
        assert harmonised.column("series").equals(table.column("series"))
        out[site] = np.column_stack([harmonised.column(f).to_numpy() for f in FEATURES])
    return out


@pytest.mark.parametrize("eb", [True, False], ids=["empirical-bayes", "plain"])
def test_equals_neurocombat_on_the_pooled_table(eb: bool) -> None:
    tables = site_tables()
    expected = pooled_combat(tables, eb)
    got = federated(tables, eb)
    for site in SITES:
        raw = np.column_stack([tables[site].column(f).to_numpy() for f in FEATURES])
        assert not np.allclose(raw, expected[site])  # ComBat changed something
        err = np.abs(got[site] - expected[site])
        assert err.max() < 1e-6, (site, err.max(axis=0))  # features range up to ~5e7


def test_summary_holds_no_row() -> None:
    table = site_tables()["site-a"]
    summary = site_summary("site-a", table, FEATURES, ["sex"], ["age"])
    text = json.dumps(summary.to_dict())
    for value in table.column(FEATURES[0]).to_pylist()[:5]:
        assert repr(value) not in text
    assert summary.columns == ["batch", "cat:sex=F", "cat:sex=M", "num:age"]
    assert summary.n == SITES["site-a"]


def test_a_level_missing_at_one_site_and_errors() -> None:
    tables = site_tables()
    only_m = tables["site-a"].filter(pa.compute.equal(tables["site-a"].column("sex"), "M"))
    tables["site-a"] = only_m
    expected = pooled_combat(tables)
    got = federated(tables)
    for site in SITES:
        assert np.abs(got[site] - expected[site]).max() / np.abs(expected[site]).max() < 1e-9
    with pytest.raises(OncoflowError, match="at least two sites"):
        estimate([site_summary("site-a", tables["site-a"], FEATURES)])
    bad = tables["site-b"].set_column(
        3, FEATURES[0], pa.array([None] * tables["site-b"].num_rows, pa.float64())
    )
    with pytest.raises(OncoflowError, match="missing or infinite"):
        site_summary("site-b", bad, FEATURES)
    confounded = {
        s: t.append_column("scanner", pa.array([s] * t.num_rows)) for s, t in tables.items()
    }
    with pytest.raises(OncoflowError, match="singular"):
        estimate([site_summary(s, t, FEATURES, ["scanner"]) for s, t in confounded.items()])

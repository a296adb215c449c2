"""Deployments name only the site file; the forms built from it label every field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.utilities.callables import parameter_schema

from flows.on_demand import on_demand_extract, on_demand_robustness
from flows.on_demand_form import with_choices
from tasks.radiomics.robustness import DEFAULT_ICC_THRESHOLD

REPO = Path(__file__).resolve().parents[2]


def test_every_deployment_names_only_its_site_file() -> None:
    deployments = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    assert {d["name"].split("-", 2)[-1] for d in deployments} == {
        "nightly",
        "weekly-publish",
        "on-demand",
        "robustness",
    }
    for d in deployments:
        site = d["name"][: len("site-a")]
        assert set(d["parameters"]) <= {"site_config", "stages"}, d["name"]
        assert d["parameters"]["site_config"] == f"deployments/sites/{site}.yaml"
        assert (REPO / d["parameters"]["site_config"]).is_file()
        assert d["work_pool"]["name"] == f"{site}-pool"


@pytest.mark.parametrize("flow", [on_demand_extract, on_demand_robustness])
def test_form_fields_are_labelled(flow) -> None:
    # (Prefect titles a field by its name; the labels go in with the site's choices)
    schema = parameter_schema(flow.fn).model_dump()
    props = with_choices(schema, {"series": ["s1"], "rois": []})["properties"]
    assert props["site_config"]["title"] == "Site file"
    assert all(p.get("title") and "_" not in p["title"] for p in props.values()), props
    assert all(p.get("description") for p in props.values())
    assert props["series"]["items"]["enum"] == ["s1"] and "enum" not in props["rois"]["items"]


def test_robustness_form_default_is_the_flows_threshold() -> None:
    props = parameter_schema(on_demand_robustness.fn).model_dump()["properties"]
    assert props["icc_threshold"]["default"] == DEFAULT_ICC_THRESHOLD

"""Cohort spec validation: examples parse, bad specs give one-line errors."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tasks.cohort.spec import load_spec, parse_spec
from tasks.errors import OncoflowError

EXAMPLES = sorted((Path(__file__).parents[2] / "deployments" / "cohorts").glob("*.yaml"))
BASE = {"name": "lung-ct", "title": "Lung", "description": "d", "licence": "CC-BY-4.0"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_are_valid(path: Path) -> None:
    spec = load_spec(path)
    assert spec.title and spec.licence_url.startswith("https://")


def test_defaults_and_normalisation() -> None:
    spec = parse_spec(
        {
            **BASE,
            "keywords": "lung",
            "selection": {"modality": "ct", "roi": ["GTV"], "date_from": "2020-01-02"},
        }
    )
    assert spec.selection.modality == ["CT"]
    assert spec.selection.roi == ["gtv"]
    assert spec.selection.date_from == dt.date(2020, 1, 2)
    assert spec.keywords == ["lung"]
    assert spec.include.images and spec.include.masks and not spec.include.dicom
    assert spec.licence_url == "https://spdx.org/licenses/CC-BY-4.0.html"
    assert spec.features is None


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"name": "Lung CT"}, "name: must be 1-63 lowercase letters"),
        ({"licence": "GPL-ish"}, "licence: unknown licence 'GPL-ish'"),
        ({"colour": "red"}, "colour: unknown field"),
        ({"selection": {"modalities": ["CT"]}}, "selection.modalities: unknown field"),
        (
            {"selection": {"date_from": "2021-01-01", "date_to": "2020-01-01"}},
            "selection: date_from is after date_to",
        ),
        ({"selection": {"date_from": "yesterday"}}, "selection.date_from:"),
        ({"features": "../../etc/passwd"}, "features: must be a params hash"),
        ({"title": ""}, "title:"),
    ],
)
def test_bad_specs_give_one_line_errors(patch: dict, message: str) -> None:
    with pytest.raises(OncoflowError) as err:
        parse_spec({**BASE, **patch}, origin="x.yaml")
    text = str(err.value)
    assert text.startswith("x.yaml: ")
    assert message in text
    assert "\n" not in text


def test_missing_field_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(OncoflowError, match=r"^spec.yaml: description: required field is missing$"):
        path = tmp_path / "spec.yaml"
        path.write_text("name: a\ntitle: t\nlicence: CC0-1.0\n")
        load_spec(path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(OncoflowError, match=r"^bad.yaml line \d+: not valid YAML$"):
        load_spec(bad)
    with pytest.raises(OncoflowError, match=r"cannot read cohort spec nope\.yaml"):
        load_spec(tmp_path / "nope.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(OncoflowError, match="expected a mapping"):
        load_spec(listy)

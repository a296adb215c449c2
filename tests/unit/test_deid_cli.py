"""`oncoflow deidentify` fails early with one line (no Prefect run) on bad input."""

from __future__ import annotations

import pyarrow as pa
import pytest

from flows.cli import main
from tasks.store import CATALOG_SERIES, SiteStore


def _run(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err.strip()
    return done.value.code, err


def test_missing_catalogue(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", "s" * 40)
    code, err = _run(["deidentify", "--site", "site-a", "--store", str(tmp_path)], capsys)
    assert code == 2 and "has no site 'site-a'" in err and "\n" not in err
    (tmp_path / "site-a").mkdir()
    code, err = _run(["deidentify", "--site", "site-a", "--store", str(tmp_path)], capsys)
    assert code == 2 and err.startswith("error: no catalogue") and "\n" not in err


def _catalogue(tmp_path, source: str) -> None:
    store = SiteStore(str(tmp_path / "store"), "site-a")
    store.write_table(
        CATALOG_SERIES,
        pa.table({"series_key": ["1.2.3"], "status": ["ok"], "paths": [["MRN-1/a.dcm"]]}),
        {"source": source},
    )


def test_missing_source_and_secret(tmp_path, capsys, monkeypatch):
    _catalogue(tmp_path, str(tmp_path / "gone"))
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", "s" * 40)
    argv = ["deidentify", "--site", "site-a", "--store", str(tmp_path / "store")]
    code, err = _run(argv, capsys)
    assert code == 2 and err.startswith("error: source not found") and "\n" not in err
    (tmp_path / "gone").mkdir()
    monkeypatch.delenv("ONCOFLOW_SITE_SECRET")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code, err = _run(argv, capsys)
    assert code == 2 and err.startswith("error: no site secret") and "\n" not in err
    assert "MRN" not in err


def test_catalogue_without_source_metadata(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", "s" * 40)
    store = SiteStore(str(tmp_path / "store"), "site-a")
    store.write_table(CATALOG_SERIES, pa.table({"series_key": ["1.2.3"], "status": ["ok"]}))
    code, err = _run(["deidentify", "--site", "site-a", "--store", str(tmp_path / "store")], capsys)
    assert code == 2 and "does not record its source" in err


def test_options_file(tmp_path):
    from flows.deidentify import build_params
    from tasks.errors import OncoflowError

    good = tmp_path / "options.yaml"
    good.write_text(
        "patient_characteristics: [PatientSex]\n"
        "safe_private: []\n"
        "pixel_rules:\n"
        "  - {name: acme-us, modality: US, manufacturer: acme, rectangles: [[0, 0, 640, 60]]}\n"
    )
    params = build_params("site-a", str(tmp_path), options=good)
    assert params.options.patient_characteristics == ("PatientSex",)
    assert params.options.safe_private == ()
    assert params.options.pixel_rules[0].rectangles == ((0, 0, 640, 60),)
    bad = tmp_path / "bad.yaml"
    bad.write_text("pixel_rule: []\n")
    with pytest.raises(OncoflowError, match="pixel_rule") as err:
        build_params("site-a", str(tmp_path), options=bad)
    assert "\n" not in str(err.value)

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

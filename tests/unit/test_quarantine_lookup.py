"""Quarantine references (keyed, tasks.refs) looked up by `oncoflow quarantine`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.dicom.catalog import CatalogCounts, fill_counts
from tasks.quarantine import lookup, replace_quarantine
from tasks.records import QuarantineRecord, Reason, Stage
from tasks.store import SiteStore

ITEMS = [
    "Παπαδόπουλος_Γιώργος/20210304/IM0001.dcm",
    "Wójcik_Zofia/2020-01-02/thumbnail.jpg",
    "Ó_Súilleabháin_Siobhán/IM0002.dcm",
]


def _store(tmp_path: Path) -> SiteStore:
    store = SiteStore(str(tmp_path / "store"), "site-q")
    records = [QuarantineRecord(i, "file", Stage.INGEST, Reason.NOT_DICOM, "x") for i in ITEMS]
    replace_quarantine(store, Stage.INGEST, records)
    return store


def test_refs_in_the_ingest_table_are_keyed_and_found_by_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", "quarantine-lookup-secret-0123456789abcdef")
    store = _store(tmp_path)
    counts = fill_counts(CatalogCounts(), store)
    shown = {row["ref"] for row in counts.quarantine}
    assert len(shown) == 3 and all(len(ref) == 12 for ref in shown)
    plain = {hashlib.sha256(i.encode()).hexdigest()[:12] for i in ITEMS}
    assert not shown & plain
    assert {e.ref for e in lookup(store)} == shown
    for ref in shown:
        (entry,) = lookup(store, ref)
        assert entry.item in ITEMS and entry.reason == str(Reason.NOT_DICOM)
        assert lookup(store, ref[:6])[0].ref == ref or len(lookup(store, ref[:6])) > 1
    assert fill_counts(CatalogCounts(), store).quarantine == counts.quarantine  # stable
    assert lookup(store, "zzzz") == []


def test_cli_looks_a_reference_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", "quarantine-lookup-secret-0123456789abcdef")
    store = _store(tmp_path)
    ref = fill_counts(CatalogCounts(), store).quarantine[0]["ref"]
    base = [sys.executable, "-m", "flows.cli", "quarantine", "--site", "site-q"]
    base += ["--store", str(tmp_path / "store")]
    found = subprocess.run([*base, ref, "--json"], capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    (row,) = json.loads(found.stdout)
    assert row["ref"] == ref and row["item"] in ITEMS and row["stage"] == "ingest"
    missing = subprocess.run([*base, "000000"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    expected = "error: no quarantined item with reference 000000 at site site-q"
    assert missing.stderr.strip() == expected

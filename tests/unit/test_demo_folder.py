"""The demo's folder rules: reuse its own work, start over on request, refuse foreign folders."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from flows.demo import MARKER, SECRET_FILE, demo_secret, prepare_folder, reuse_note
from tasks.errors import OncoflowError

SETTINGS = {"sites": 1, "patients": 2, "seed": 0, "generator": "oncoflow-synthetic/1"}


def _made_before(out: Path) -> None:
    """What a finished demo run leaves: its marker, a source with truth.json, a store."""
    prepare_folder(out, SETTINGS, fresh=False)
    (out / "source").mkdir()
    (out / "source" / "truth.json").write_text("{}")
    (out / "store" / "site-a").mkdir(parents=True)


def test_new_folder_is_made_and_marked(tmp_path: Path) -> None:
    out = tmp_path / "a" / "demo"
    assert prepare_folder(out, SETTINGS, fresh=False) == "new"
    assert (out / MARKER).is_file()
    # an existing empty folder is also fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_folder(empty, SETTINGS, fresh=False) == "new"


def test_rerun_reuses_and_fresh_removes_only_the_demos_own_entries(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    _made_before(out)
    (out / "notes.txt").write_text("mine")  # something the user put there
    assert prepare_folder(out, SETTINGS, fresh=False) == "reuse"
    assert (out / "store" / "site-a").is_dir()
    assert prepare_folder(out, SETTINGS, fresh=True) == "fresh"
    assert not (out / "store").exists() and not (out / "source").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / MARKER).is_file()


def test_changed_settings_start_over(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    _made_before(out)
    assert prepare_folder(out, {**SETTINGS, "seed": 1}, fresh=False) == "fresh"
    assert not (out / "source").exists()


def test_a_folder_the_demo_did_not_make_is_refused_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "data"
    (foreign / "source").mkdir(parents=True)
    (foreign / "source" / "scan.dcm").write_bytes(b"x")
    with pytest.raises(OncoflowError, match="not made by `oncoflow demo`"):
        prepare_folder(foreign, SETTINGS, fresh=True)
    assert (foreign / "source" / "scan.dcm").read_bytes() == b"x"
    assert not (foreign / MARKER).exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OncoflowError, match="is a file"):
        prepare_folder(a_file, SETTINGS, fresh=False)


def test_demo_secret_is_kept_in_the_folder_unless_one_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ONCOFLOW_SITE_SECRET", raising=False)
    first = demo_secret(tmp_path)
    assert first is not None and len(first) >= 32
    assert demo_secret(tmp_path) == first
    assert stat.S_IMODE(os.stat(tmp_path / SECRET_FILE).st_mode) == 0o600
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", "s" * 40)
    assert demo_secret(tmp_path / "other") is None


def test_reuse_note_says_what_was_reused() -> None:
    stages = [
        {"stage": "ingest", "reused": 228, "computed": 0},
        {"stage": "deidentify", "reused": 16},
        {"stage": "harmonise", "reused": 9},
        {"stage": "extract", "parts_reused": 16},
        {"stage": "publish", "counts": {"unchanged": 1}, "version": "v1"},
    ]
    assert reuse_note(stages) == (
        "228 files not parsed again, 16 series de-identified before, "
        "9 series harmonised before, 16 feature parts, publication v1 unchanged"
    )
    assert reuse_note([{"stage": "ingest", "reused": 0}]) == ""


def test_cli_refuses_a_foreign_folder_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not empty and was not made by `oncoflow demo`; choose another --out"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]

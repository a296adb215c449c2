"""Bad ingest input through the CLI: one line, non-zero exit, no traceback, nothing written."""

import subprocess
import sys

import pytest


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "ingest", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("source", "store", "needle"),
    [
        ("{tmp}/missing", "{tmp}/store", "source not found"),
        ("{tmp}/empty", "{tmp}/store", "source is empty"),
        ("{tmp}/src", "nosuchproto://x/y", "unsupported URL"),
        ("{tmp}/src", "{tmp}/src/a.dcm/store", "store unreachable"),
    ],
)
def test_bad_source_or_store(tmp_path, source, store, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.dcm").write_bytes(b"not dicom")
    proc = _cli(
        source.format(tmp=tmp_path), "--site", "site-a", "--store", store.format(tmp=tmp_path)
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "store").exists()
    assert (tmp_path / "src" / "a.dcm").read_bytes() == b"not dicom"


def test_bad_option(tmp_path):
    proc = _cli(str(tmp_path), "--site", "site-a", "--store", str(tmp_path), "--workers", "0")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--workers" in lines[0]

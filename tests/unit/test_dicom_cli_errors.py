"""Bad ingest input: one line, non-zero exit, no traceback, nothing written."""

import subprocess
import sys

import pytest

from flows.ingest import IngestParams, ingest_dicom
from tasks.errors import OncoflowError


@pytest.fixture()
def tree(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.dcm").write_bytes(b"not dicom")
    return tmp_path


def test_cli_prints_one_line_for_a_missing_source(tree):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ingest", str(tree / "missing"), "--site", "site-a",
         "--store", str(tree / "store")],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: source not found: {tree / 'missing'}"]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tree / "store").exists()


@pytest.mark.parametrize(
    ("source", "store", "needle"),
    [
        ("empty", "{tmp}/store", "source is empty"),
        ("src", "nosuchproto://x/y", "unsupported URL"),
        ("src", "{tmp}/src/a.dcm/store", "store unreachable"),
    ],
)
def test_unusable_source_or_store_is_a_one_line_error(tree, source, store, needle):
    params = IngestParams(source=str(tree / source), site="site-a", store=store.format(tmp=tree))
    with pytest.raises(OncoflowError, match=needle) as info:
        ingest_dicom(params)  # checked before any Prefect server or flow starts
    assert "\n" not in str(info.value)
    assert not (tree / "store").exists()
    assert (tree / "src" / "a.dcm").read_bytes() == b"not dicom"


def test_bad_site_code_is_an_oncoflow_error(tree):
    with pytest.raises(OncoflowError, match="invalid site code"):
        IngestParams(source=str(tree / "src"), site="Site A", store=str(tree / "store"))

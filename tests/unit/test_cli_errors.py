import subprocess
import sys

import pytest

CASES = [
    (["bogus"], "No such command"),
    (["ingest"], "Missing argument"),
    (["synth", "/tmp/x", "--sites", "0"], "--sites"),
    (["ingest", "/nonexistent-source", "--site", "Bad Site", "--store", "/tmp/s"], "site"),
]


@pytest.mark.parametrize(("args", "needle"), CASES)
def test_cli_errors_are_one_line(args, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout

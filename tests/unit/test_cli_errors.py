import os
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


def test_publish_with_a_missing_cohort_spec_prints_one_line_and_a_traceback_with_debug(tmp_path):
    args = ["publish", "--site", "site-a", "--store", str(tmp_path), "--cohort", "missing.yaml"]
    args = [sys.executable, "-m", "flows.cli", *args, "--to", str(tmp_path / "pub")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "missing.yaml" in lines[0]
    env = {**os.environ, "ONCOFLOW_DEBUG": "1"}
    debug = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr


def test_an_error_raised_inside_a_flow_is_one_line(tmp_path):
    args = [sys.executable, "-m", "flows.cli", "federate", str(tmp_path / "none"), "--out"]
    args.append(str(tmp_path / "hub"))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: no committed cohort version")


def test_every_running_command_shares_the_runtime_options():
    from flows.cli import REPORTING_COMMANDS, app

    commands = {c.name: c for c in app.registered_commands}
    for name in REPORTING_COMMANDS - {"federate"}:
        params = commands[name].callback.__signature__.parameters
        assert {"workers", "dask_address", "as_json"} <= set(params), name
    assert {"ingest", "deidentify", "harmonise", "extract", "publish", "run"} <= REPORTING_COMMANDS
    assert "verify" not in REPORTING_COMMANDS

"""The extract flow's parameter form and the CLI's one-line errors (no flow run needed)."""

import json
import subprocess
import sys

import pytest

from flows import cli
from flows.extract import ExtractParams, build_params, extract_flow
from tasks.errors import OncoflowError
from tasks.radiomics.params import Preset


def test_form_offers_presets_as_a_dropdown_and_the_filters():
    schema = json.loads(json.dumps(extract_flow.parameters.model_dump()))
    text = json.dumps(schema)
    assert '"enum": ["ct", "mr", "pet"]' in text
    props = schema["definitions"]["ExtractParams"]["properties"]
    assert {"site", "store", "preset", "params_file", "series", "rois", "max_failure_ratio"} <= set(
        props
    )
    assert all(props[name].get("description") for name in props)


def test_preset_or_file_exactly_one():
    assert build_params("site-a", "/tmp/s", "ct").preset == Preset.CT
    p = build_params("site-a", "/tmp/s", "/some/params.yaml", series=["2.25.1"], rois=["gtv"])
    assert (p.preset, p.params_file, p.series, p.rois) == (
        None,
        "/some/params.yaml",
        ["2.25.1"],
        ["gtv"],
    )
    with pytest.raises(ValueError, match="exactly one"):
        ExtractParams(site="site-a", store="/tmp/s")
    with pytest.raises(ValueError, match="exactly one"):
        ExtractParams(site="site-a", store="/tmp/s", preset="ct", params_file="x.yaml")
    with pytest.raises(OncoflowError, match="invalid site code"):
        build_params("Bad Site", "/tmp/s", "ct")
    with pytest.raises(OncoflowError, match="max_failure_ratio"):
        build_params("site-a", "/tmp/s", "ct", max_failure_ratio=2.0)


def test_cli_rejects_bad_parameters_in_one_line_before_any_work(tmp_path):
    """A real process: one line on stderr, exit code 2, nothing written."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("setting:\n  binWidth: -1\n")
    store = tmp_path / "store"
    args = ["extract", "--site", "site-a", "--store", str(store), "--params", str(bad)]
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: parameter file bad.yaml: setting.binWidth: Input should be greater than 0"
    ]
    assert not store.exists()  # nothing was written


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("setting:\n  binwidth: 25\n", "parameter file bad.yaml: setting.binwidth: unknown key"),
        ("imageType: {LoG: {}}\n", "parameter file bad.yaml: imageType.LoG: needs sigma"),
        (None, "parameter file 'bad.yaml' not found (presets: ct, mr, pet)"),
    ],
)
def test_cli_errors_in_process(tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.yaml"
    if content is not None:
        bad.write_text(content)
    with pytest.raises(SystemExit) as info:
        cli.main(["extract", "--site", "site-a", "--store", str(tmp_path), "--params", str(bad)])
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines

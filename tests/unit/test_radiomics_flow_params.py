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
    fields = {"site", "store", "preset", "params_file", "series", "rois", "modalities"}
    assert fields | {"max_failure_ratio"} <= set(props)
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
    # a preset extracts its own modality unless told otherwise; a file extracts every modality
    assert build_params("site-a", "/tmp/s", "pet").modality_filter() == ["PT"]
    assert p.modality_filter() == []
    assert build_params("site-a", "/tmp/s", "mr", modalities=["mr", "CT"]).modality_filter() == [
        "MR",
        "CT",
    ]
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


def test_no_harmonised_table_or_no_matching_roi_needs_no_services(tmp_path):
    from flows.extract import extract_radiomics
    from flows.runtime import RuntimeOptions
    from tasks.radiomics.samples import SampleRoi, SampleSeries, series_key, write_harmonised_sample
    from tasks.store import SiteStore

    runtime = RuntimeOptions(workers=1)
    with pytest.raises(OncoflowError, match="has no site 'site-a'"):
        extract_radiomics(build_params("site-a", str(tmp_path), "ct"), runtime)
    (tmp_path / "site-a").mkdir()
    with pytest.raises(OncoflowError, match="run `oncoflow harmonise` first"):
        extract_radiomics(build_params("site-a", str(tmp_path), "ct"), runtime)
    store = SiteStore(str(tmp_path), "site-a")
    ct = SampleSeries(series_key(0), "CT", size=(16, 16, 8), rois=(SampleRoi("gtv", 3.0),))
    write_harmonised_sample(store, [ct])
    summary = extract_radiomics(build_params("site-a", str(tmp_path), "mr"), runtime)
    assert summary.counts == {} and summary.extra["rows"] == 0
    assert "nothing to extract" in summary.extra["note"] and "MR" in summary.extra["note"]
    assert not store.exists("features")

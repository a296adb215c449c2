"""Researcher mistakes give one line, a non-zero exit, and what exists (no flow run needed)."""

from pathlib import Path

import pytest
import yaml

from flows import cli
from flows.extract import build_params, extract_radiomics
from flows.runtime import RuntimeOptions
from tasks.radiomics.extract import plan_units
from tasks.radiomics.filters import check_selection
from tasks.radiomics.samples import SampleRoi, SampleSeries, series_key, write_harmonised_sample
from tasks.store import SiteStore

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("errors") / "store"
    store = SiteStore(str(root), "site-a")
    ct = SampleSeries(
        series_key(1), "CT", size=(20, 20, 8), rois=(SampleRoi("gtv", 4.0), SampleRoi("lung", 5.0))
    )
    ct2 = SampleSeries(series_key(2), "CT", size=(20, 20, 8), rois=(SampleRoi("gtv", 3.0),))
    write_harmonised_sample(store, [ct, ct2])
    return str(root)


def one_line_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Run the CLI in this process; return its single stderr line (exit must be non-zero)."""
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code not in (0, None)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def extract_args(store_url: str, *extra: str, params: str = "ct") -> list[str]:
    return ["extract", "--site", "site-a", "--store", store_url, "--params", params, *extra]


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--roi", "tumour"], ["--roi tumour: no ROI of this name", "ROIs: gtv, lung"]),
        (["--roi", "gtvv"], ["did you mean 'gtv'?"]),
        (["--series", "1.2.3"], ["--series 1.2.3: no harmonised series", "2 harmonised series"]),
        (["--modality", "MR"], ["--modality MR: no harmonised series of this modality", "CT 2"]),
        (
            ["--series", series_key(2), "--roi", "lung"],
            ["filters together match no (series, ROI)"],
        ),
    ],
)
def test_filter_matching_nothing_lists_what_exists(store_url, capsys, extra, needles):
    line = one_line_error(capsys, extract_args(store_url, *extra))
    for needle in needles:
        assert needle in line, line


def test_roi_filter_is_case_insensitive(store_url):
    units = plan_units(SiteStore(store_url, "site-a"))
    assert {u.roi for u in check_selection(units, rois=["GTV"])} == {"gtv"}
    assert len(check_selection(units, rois=["GTV", "Lung"])) == 3
    assert {u.modality for u in check_selection(units, modalities=["ct"])} == {"CT"}


def test_preset_modality_alone_is_not_an_error_but_says_what_exists(store_url):
    # the site pipeline runs every preset it was given: an MR preset on a CT site is no error
    summary = extract_radiomics(build_params("site-a", store_url, "mr"), RuntimeOptions())
    assert summary.extra["rows"] == 0
    assert "2 harmonised series (CT 2); ROIs: gtv, lung" in summary.extra["note"]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_label_without_voxels_names_the_labels_present(store_url, tmp_path, capsys):
    params = write(tmp_path / "label2.yaml", "setting:\n  label: 2\n")
    line = one_line_error(capsys, extract_args(store_url, params=params))
    assert "setting.label 2: no harmonised mask has a voxel with this label" in line
    assert "labels present: 1" in line and "gtv, lung" in line


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("setting:\n  binWidth: 25\n  binCount: 32\n", "binWidth and binCount both given"),
        ("setting:\n  resegmentMode: sigma\n", "resegmentMode: has no effect without"),
        ("setting:\n  normalizeScale: 100\n", "normalizeScale: has no effect without normalize"),
        ("imageType:\n  Original: {force2Ddimension: 1}\n", "imageType.Original.force2Ddimension"),
        ("setting:\n  binwidth: 25\n", "setting.binwidth: unknown key (did you mean 'binWidth'?)"),
        (
            "imageType:\n  wavelet: {}\n",
            "imageType.wavelet: unknown name (did you mean 'Wavelet'?)",
        ),
        ("featureClass:\n  glcm: [Contrastt]\n", "did you mean 'Contrast'?"),
        ("settings:\n  binWidth: 25\n", "settings: unknown key (did you mean 'setting'?)"),
    ],
)
def test_conflicting_or_misspelt_settings_are_refused(store_url, tmp_path, capsys, content, needle):
    params = write(tmp_path / "bad.yaml", content)
    assert needle in one_line_error(capsys, extract_args(store_url, params=params))


def test_a_store_without_the_site_says_so(store_url, tmp_path, capsys):
    line = one_line_error(capsys, ["extract", "--site", "site-b", "--store", store_url,
                                   "--params", "ct"])  # fmt: skip
    assert line == f"error: store {store_url} has no site 'site-b' (sites there: site-a)"
    line = one_line_error(capsys, extract_args(str(tmp_path / "stroe")))
    assert line == f"error: store {tmp_path / 'stroe'} does not exist (check --store)"


def spec_file(folder: Path, **fields: object) -> Path:
    doc = {"name": "c", "title": "T", "description": "D", "licence": "CC0-1.0", **fields}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def publish_args(store_url: str, spec: Path, to: Path) -> list[str]:
    return ["publish", "--site", "site-a", "--store", store_url, "--cohort", str(spec),
            "--to", str(to)]  # fmt: skip


def test_cohort_spec_features_takes_a_parameter_file(store_url, tmp_path, capsys):
    from tasks.cohort.select import resolve_feature_table
    from tasks.cohort.spec import load_spec
    from tasks.radiomics.params import load_params

    folder = tmp_path / "specs"
    (folder / "params").mkdir(parents=True)
    write(folder / "params" / "fine.yaml", "setting:\n  binWidth: 10\n")
    spec = load_spec(spec_file(folder, features="params/fine.yaml"))
    assert Path(spec.features).is_absolute()
    # not extracted yet: one line naming the file and the command to run
    line = one_line_error(capsys, publish_args(store_url, folder / "spec.yaml", tmp_path / "pub"))
    assert "has no feature table for 'fine.yaml'" in line and "oncoflow extract" in line
    store = SiteStore(store_url, "site-a")
    expected = load_params(str(folder / "params" / "fine.yaml"))[0].params_hash()
    store.write_bytes(f"features/{expected}.parquet", b"placeholder")
    assert resolve_feature_table(store, spec.features) == f"features/{expected}.parquet"
    store.remove(f"features/{expected}.parquet")


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"features": "params/missing.yaml"}, "features: parameter file 'params/missing.yaml' not"),
        ({"features": "bad.yaml"}, "parameter file bad.yaml: setting.binwidth: unknown key"),
        ({"features": "nosuchpreset"}, "parameter file 'nosuchpreset' not found"),
        ({"selecton": {"modality": ["CT"]}}, "selecton: unknown field (did you mean 'selection'?)"),
        ({"include": {"image": True}}, "include.image: unknown field (did you mean 'images'?)"),
    ],
)
def test_cohort_spec_errors_are_one_line(store_url, tmp_path, capsys, fields, needle):
    write(tmp_path / "bad.yaml", "setting:\n  binwidth: 25\n")
    spec = spec_file(tmp_path, **fields)
    assert needle in one_line_error(capsys, publish_args(store_url, spec, tmp_path / "pub"))
    assert not (tmp_path / "pub").exists()


def test_cohort_descriptions_match_the_shipped_settings():
    """A spec may only promise a common grid when the harmonise settings resample to one."""
    config = yaml.safe_load((DEPLOYMENTS / "harmonise" / "config.yaml").read_text())
    for path in sorted((DEPLOYMENTS / "cohorts").glob("*.yaml")):
        text = yaml.safe_load(path.read_text())["description"].lower()
        claims_grid = any(w in text for w in ("common grid", "resampled", "isotropic"))
        assert not claims_grid or config.get("target_spacing"), path.name


def test_harmonise_config_unknown_key_names_the_nearest(tmp_path):
    from tasks.errors import OncoflowError
    from tasks.harmonise.config import load_config

    bad = tmp_path / "harmonise.yaml"
    bad.write_text("target_spacings: [1, 1, 1]\n")
    with pytest.raises(OncoflowError) as info:
        load_config(bad)
    assert str(info.value).endswith("target_spacings: unknown key (did you mean 'target_spacing'?)")

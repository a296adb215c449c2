"""The hub finds committed versions from root, cohort or version URLs and checks what it reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.cohort.publish import COMBAT_SUMMARY, publish_cohort
from tasks.cohort.spec import parse_spec
from tasks.cohort.storage import Retrier, RetryPolicy
from tasks.errors import OncoflowError
from tasks.federation.combat import age_in_years
from tasks.federation.sources import read_version, version_paths
from tests.unit.test_cohort_fixture import PARAMS_HASH, build_site

SPEC = {
    "name": "lung",
    "title": "Lung",
    "description": "d",
    "licence": "CC0-1.0",
    "features": PARAMS_HASH,
    "combat": {"roi": "gtv", "categorical": ["sex"], "continuous": ["age"]},
}
RETRY = Retrier(RetryPolicy(attempts=2, base_delay=0.0))


@pytest.fixture(scope="module")
def publication(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pub")
    store = build_site(str(tmp_path_factory.mktemp("store")))
    publish_cohort(store, parse_spec(SPEC), str(root))
    publish_cohort(store, parse_spec({**SPEC, "title": "Lung 2"}), str(root))
    publish_cohort(store, parse_spec({**SPEC, "name": "other", "combat": None}), str(root))
    return root


def test_resolution(publication: Path) -> None:
    _, paths = version_paths(str(publication / "lung" / "v1"), RETRY)
    assert [p.rsplit("/", 2)[-2:] for p in paths] == [["lung", "v1"]]
    _, paths = version_paths(str(publication / "lung"), RETRY)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["v2"]  # the latest committed
    _, paths = version_paths(str(publication), RETRY)
    assert sorted(p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in paths) == [
        "lung/v2",
        "other/v1",
    ]
    with pytest.raises(OncoflowError, match="no committed cohort version"):
        version_paths(str(publication / "nothing"), RETRY)


def test_read_version_checks_and_reads_the_combat_summary(publication: Path) -> None:
    fs, [path] = version_paths(str(publication / "lung"), RETRY)
    version = read_version(fs, path, RETRY)
    assert version.manifest["name"] == "Lung 2"
    summary = version.combat_summary
    assert summary is not None and summary["site"] == "site-a"
    assert summary["n"] == 3  # three gtv rows
    assert summary["columns"] == ["batch", "cat:sex=F", "cat:sex=M", "num:age"]
    manifest_names = [d["contentUrl"] for d in version.manifest["distribution"]]
    assert COMBAT_SUMMARY in manifest_names
    # tampering with the summary is caught (its checksum is in the manifest)
    target = Path(path) / COMBAT_SUMMARY
    data = json.loads(target.read_text())
    data["n"] = 99
    target.write_text(json.dumps(data))
    with pytest.raises(OncoflowError, match="does not match its checksum"):
        read_version(fs, path, RETRY)


def test_age_in_years() -> None:
    assert age_in_years("063Y") == 63
    assert age_in_years("018M") == 1.5
    assert age_in_years("") is None and age_in_years("abc") is None

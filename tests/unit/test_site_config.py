"""A site's configuration file is read with the shared site parameters (one-line errors)."""

from pathlib import Path

import pytest

from flows.pipeline import load_site_config
from tasks.errors import OncoflowError

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_site_files_are_valid():
    for path in sorted((ROOT / "deployments" / "sites").glob("*.yaml")):
        config = load_site_config(str(path))
        assert config.site == path.stem
        params = config.pipeline_params(["ingest", "deidentify"])
        assert (params.site, params.store, params.source) == (
            config.site,
            config.store,
            config.source,
        )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("site: Site A\nsource: /data\nstore: /store\n", "invalid site code"),
        ("site: site-a\nsource: /data\n", "invalid site config"),
        ("site: site-a\nsource: /data\nstore: /s\nsecret: x\n", "invalid site config"),
    ],
)
def test_a_bad_site_file_is_one_line(tmp_path, text, needle):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(OncoflowError, match=needle) as info:
        load_site_config(str(path))
    assert "\n" not in str(info.value)

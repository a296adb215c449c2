"""`oncoflow serve` over HTTP: a count, refused requests, and a small cell that is never exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tasks.cohort.publish import publish_cohort
from tasks.cohort.spec import parse_spec
from tasks.cohort.storage import RetryPolicy
from tests.services import BIN, free_port, spawn, stop, wait_for
from tests.unit.test_cohort_fixture import PARAMS_HASH, SeriesSpec, build_site

pytestmark = pytest.mark.integration

TOKEN = "serve-token-" + "x7" * 12  # HTTP headers are ASCII
SECRET = "Πάρος-Пловдив-Győr-Gaillimh-Łęczyca-0123456789"
SERIES = (
    *(SeriesSpec("CT", "CHEST", ("gtv",), f"2021{1 + i % 9:02d}10", patient=i) for i in range(13)),
    SeriesSpec("MR", "BRAIN", ("gtv",), "20220301", patient=13),
)
SPEC = {
    "name": "lung",
    "title": "Lung",
    "description": "Chest CT",
    "licence": "CC-BY-4.0",
    "keywords": ["CT"],
    "features": PARAMS_HASH,
    "catalogue": {
        "publisher": {"name": "Site A", "contact": "mailto:data@site-a.example"},
        "contact": "mailto:data@site-a.example",
        "hdab": {"name": "HDAB", "contact": "https://hdab.example"},
    },
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site store with 14 patients and its published cohort."""
    root = tmp_path_factory.mktemp("serve")
    store = build_site(str(root / "store"), series=SERIES)
    publish_cohort(store, parse_spec(SPEC), str(root / "pub"), policy=RetryPolicy(attempts=2))
    return root


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[str]:
    port = free_port()
    proc = spawn(
        [str(BIN / "oncoflow"), "serve", "--site", "site-a", "--store", str(root / "store"),
         "--to", str(root / "pub"), "--port", str(port)],
        root / "serve.log",
        env={"ONCOFLOW_SERVE_TOKEN": TOKEN, "ONCOFLOW_SITE_SECRET": SECRET},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, 60, "serve", proc)
        yield url
    finally:
        stop(proc)
    log = (root / "serve.log").read_text()
    assert "Traceback" not in log and "WARNING" not in log, log


def get(url: str, path: str, token: str | None = TOKEN, **params) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.get(f"{url}{path}", params=params, headers=headers, timeout=10)


def test_a_count(server: str) -> None:
    r = get(server, "/counts", modality="ct", body_part="Chest")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"body_part": "CHEST", "modality": "CT"}
    # 13 patients, Laplace(1) noise, rounded to 5, never below 10
    assert body["patients"] in (10, 15, 20) and body["series"] % 5 == 0
    # asking again gives the same answer
    assert all(get(server, "/counts", modality="CT", body_part="CHEST").json() == body
               for _ in range(5))  # fmt: skip
    policy = get(server, "/policy").json()
    assert policy["k"] == 10 and policy["budget"]["queries"] > 1


def test_unauthenticated_requests_are_refused(server: str) -> None:
    assert get(server, "/counts", token=None, modality="CT").status_code == 401
    assert get(server, "/counts", token="wrong-" + "y" * 20, modality="CT").status_code == 401
    assert get(server, "/categories", token=None).status_code == 401


def test_a_small_cell_is_never_answered_exactly(server: str) -> None:
    body = get(server, "/counts", modality="MR").json()
    assert body["patients"] == "<10" and body["series"] == "<10"
    # a combination that isolates one patient is a small cell too
    body = get(server, "/counts", modality="CT", age_band="60-69").json()
    assert body["patients"] == "<10"


def test_unknown_fields_and_identifiers_are_refused(server: str) -> None:
    r = get(server, "/counts", scanner="x")
    assert r.status_code == 400 and "unknown field" in r.json()["error"]
    r = get(server, "/counts", patient="P-1")
    assert r.status_code == 400 and "identifiers" in r.json()["error"]
    r = get(server, "/counts", series_uid="1.2.3")
    assert r.status_code == 400 and "identifiers" in r.json()["error"]
    assert sys.executable  # the server ran from this environment (BIN)


def test_the_hub_queries_a_site_over_http(
    server: str, prefect_api: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.federate import run_federation
    from tasks.errors import OncoflowError
    from tasks.federation.remote import query_endpoint

    with pytest.raises(OncoflowError, match="refused the token"):
        query_endpoint(server, token="not-the-token-" + "z" * 10)
    monkeypatch.setenv("ONCOFLOW_SERVE_TOKEN", TOKEN)
    result = run_federation([server], str(tmp_path / "hub"))
    assert result["sources"] == 1
    catalogue = json.loads((tmp_path / "hub" / "catalogue.json").read_text())
    (site,) = catalogue["queried"]
    assert site["site"] == "site-a" and site["patients"] in (10, 15, 20)
    assert site["by"]["modality"]["MR"] == {"patients": "<10", "series": "<10"}
    assert site["by"]["modality"]["CT"]["patients"] in (10, 15, 20)
    # the hub shows what the site answered: the same numbers as a direct query
    direct = get(server, "/counts", modality="CT").json()
    assert site["by"]["modality"]["CT"]["series"] == direct["series"]


def readiness(root: Path, *args: str) -> dict:
    proc = subprocess.run(
        [str(BIN / "oncoflow"), "readiness", "--site", "site-a", "--store", str(root / "store"),
         "--json", *args],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "ONCOFLOW_SERVE_TOKEN": TOKEN},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_readiness_tier_3_where_everything_is_there(server: str, root: Path) -> None:
    report = readiness(root, "--to", str(root / "pub"), "--endpoint", server)
    assert report["tier"] == 3, report["missing"]
    assert report["missing"] == []
    names = {i["name"] for i in report["items"]}
    assert {"query endpoint", "images, masks and features published"} <= names


def test_readiness_names_what_is_missing_without_a_publication(root: Path) -> None:
    from tasks.cohort.readiness import assess

    empty = root / "nothing-published"
    empty.mkdir()
    report = assess("site-a", str(root / "store"), to=str(empty)).to_dict()
    assert report["tier"] == 0
    missing = "\n".join(report["missing"])
    assert "tier 1: published cohort version" in missing
    assert "tier 2: query endpoint (no endpoint URL given (--endpoint))" in missing
    assert "tier 3: images, masks and features published (no published version)" in missing
    # the site's own data is there: harmonised images and features are not missing
    assert "harmonised images" not in missing and "feature table" not in missing


def test_the_token_can_come_from_a_prefect_secret_block(prefect_api: str) -> None:
    from prefect.blocks.system import Secret

    from tasks.errors import OncoflowError
    from tasks.serve.app import load_token

    Secret(value=TOKEN).save("oncoflow-serve-token-test", overwrite=True)
    assert load_token("oncoflow-serve-token-test") == TOKEN
    with pytest.raises(OncoflowError, match="cannot read the Prefect Secret block"):
        load_token("no-such-block")

"""Shared fixtures: one real Prefect server per test session, a real S3 (moto server mode)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.services import free_port

# Hypothesis profiles. "ci" (the default, chosen by tests/run.sh and by a bare pytest run) is
# derandomised: every run draws the same examples, so a test fails or passes the same way on
# every machine and a failure found once is found again. "explore" draws new random examples
# on every run (and more of them): run it by hand to look for new failures, see
# docs/deidentification.md (Testing). Tests' own @settings (max_examples, deadline) still apply.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", derandomize=False, max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Isolate Prefect's home (database, local result storage) for the whole session.
_PREFECT_HOME = tempfile.mkdtemp(prefix="oncoflow-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
# The Dask dashboard costs about a second per LocalCluster start; the tests of the dashboard
# (tests/integration/test_runtime.py, test_deployments.py) turn it on explicitly.
os.environ.setdefault("ONCOFLOW_DASHBOARD", "0")


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """Start one temporary Prefect server for the session (or use PREFECT_API_URL)."""
    from flows.runtime import ensure_prefect_api

    return ensure_prefect_api().url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint: moto's server mode over HTTP on a free loopback port.

    The endpoint and dummy credentials are exported so that s3fs in this process and in Dask
    worker processes started later use it.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """Create a fresh bucket on the moto server and return its ``s3://`` URL."""
    import s3fs

    name = "b-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50]
    name = name.strip("-") + f"-{os.getpid() % 10000}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic cohort (2 sites x 2 patients), generated once per session."""
    from tasks.synthetic import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, sites=2, patients=2, seed=11)
    return out


#: The site secret of the reference run and of the tests compared with it.
REFERENCE_SECRET = "reference-run-secret-0123456789abcdef"
REFERENCE_COHORT_SPEC = Path(__file__).resolve().parents[1] / "deployments/cohorts/demo.yaml"


@pytest.fixture(scope="session")
def one_patient_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-site, one-patient synthetic cohort (every kind of series, edge cases included)."""
    from tasks.synthetic import generate_cohort

    out = tmp_path_factory.mktemp("one-patient-cohort")
    generate_cohort(out, sites=1, patients=1, seed=5)
    return out / "site-a"


@dataclass(frozen=True)
class ReferenceRun:
    """An undisturbed `oncoflow run` of :func:`one_patient_site`, shared by the tests that
    compare another topology's or a recovered run's outputs with it.

    ``store`` is the store URL (a local folder); the run published under ``publication_url``
    and its publication was then moved to ``publication``, so that one other run (the crash
    test's recovered run) can publish at the same URL: a manifest names its own URL.
    """

    source: Path
    store: Path
    publication_url: Path
    publication: Path
    log: Path


@pytest.fixture(scope="session")
def reference_run(
    prefect_api: str, one_patient_site: Path, tmp_path_factory: pytest.TempPathFactory
) -> ReferenceRun:
    """Run ``oncoflow run`` (ct preset, demo cohort, two local workers) once per session."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("reference-run")
    run = ReferenceRun(
        source=one_patient_site,
        store=root / "store",
        publication_url=root / "publication",
        publication=root / "publication-undisturbed",
        log=root / "run.log",
    )
    args = ["run", str(one_patient_site), "--site", "site-a", "--store", str(run.store)]
    args += ["--params", "ct", "--cohort", str(REFERENCE_COHORT_SPEC)]
    args += ["--to", str(run.publication_url), "--workers", "2"]
    env = {**os.environ, "ONCOFLOW_SITE_SECRET": REFERENCE_SECRET}
    with open(run.log, "wb") as log:
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "oncoflow"), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    assert proc.returncode == 0, run.log.read_text(errors="replace")[-3000:]
    run.publication_url.rename(run.publication)
    return run


"""Shared fixtures: one real Prefect server per test session, a real S3 (moto server mode)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
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

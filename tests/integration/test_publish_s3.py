"""Publication to a real S3 protocol server (moto over HTTP through s3fs).

Covers: publish + verify, republish is a no-op, tampering is detected, injected transient S3
failures at 10/50/90 % (never a partial visible version), and a publish process killed with
SIGKILL mid-staging or mid-commit (the next run resumes or cleans).
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import ClassVar

import fsspec
import pytest
import s3fs
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from tasks.cohort.publish import plan_publication, publish_cohort
from tasks.cohort.spec import parse_spec
from tasks.cohort.storage import RetryPolicy
from tasks.cohort.verify import verify_url
from tasks.errors import OncoflowError
from tests.unit.test_cohort_fixture import PARAMS_HASH, build_site

REPO = Path(__file__).resolve().parents[2]
SPEC = {
    "name": "lung",
    "title": "Lung cohort",
    "description": "Chest imaging",
    "licence": "CC-BY-4.0",
    "features": PARAMS_HASH,
}
FAST = RetryPolicy(attempts=6, base_delay=0.001, max_delay=0.02, seed=3)
#: Under injected faults: enough attempts that 50 % usually completes, 90 % usually not.
PATIENT = RetryPolicy(attempts=20, base_delay=0.001, max_delay=0.02, seed=3)


def plain_fs(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def keys(fs: s3fs.S3FileSystem, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(fs.find(prefix))


def injected(method: str) -> OSError:
    error = ClientError(
        {
            "Error": {"Code": "ServiceUnavailable", "Message": "injected fault"},
            "ResponseMetadata": {"HTTPStatusCode": 503},
        },
        method,
    )
    return translate_boto_error(error)


def flaky_class(rate: float, seed: int) -> type[s3fs.S3FileSystem]:
    """An s3fs whose requests fail at ``rate``: half before reaching S3, half after (lost reply)."""
    rng = random.Random(seed)

    class FlakyS3(s3fs.S3FileSystem):
        calls = 0
        faults = 0

        async def _call_s3(self, method, *args, **kwargs):
            FlakyS3.calls += 1
            roll = rng.random()
            if roll < rate / 2:
                FlakyS3.faults += 1
                raise injected(method)
            out = await super()._call_s3(method, *args, **kwargs)
            if roll < rate:
                FlakyS3.faults += 1
                raise injected(method)
            return out

    return FlakyS3


class use_s3_class:  # noqa: N801 - used like a function
    """Register ``cls`` for ``s3://`` URLs for the duration of a ``with`` block."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __enter__(self) -> type:
        fsspec.register_implementation("s3", self.cls, clobber=True)
        return self.cls

    def __exit__(self, *exc: object) -> None:
        fsspec.register_implementation("s3", s3fs.S3FileSystem, clobber=True)


@pytest.fixture(scope="module")
def site_store(tmp_path_factory: pytest.TempPathFactory):
    return build_site(str(tmp_path_factory.mktemp("store")))


def publish(store, to: str, **kw):
    kw.setdefault("policy", FAST)
    return publish_cohort(
        store, parse_spec(kw.pop("spec", SPEC)), to, date_published="2026-01-02", **kw
    )


def test_publish_verify_republish_tamper(site_store, s3_bucket: str, s3_endpoint: str) -> None:
    to = f"{s3_bucket}/pub"
    result = publish(site_store, to)
    assert result.created and result.version == "v1"
    assert result.leak_gate == "passed"
    assert result.url == f"{to}/lung/v1"
    report = verify_url(result.url)
    assert report.ok, report.problems
    fs = plain_fs(s3_endpoint)
    names = keys(fs, to.removeprefix("s3://"))
    assert not [n for n in names if "/.staging/" in n]
    assert names[0].endswith("lung/v1/COMMITTED")

    again = publish(site_store, to)
    assert not again.created and again.version == "v1"
    assert keys(fs, to.removeprefix("s3://")) == names

    # tamper with one object: verify fails, naming it; the CLI exits non-zero
    victim = next(n for n in names if "/masks/" in n)
    fs.pipe_file(victim, b"tampered")
    report = verify_url(result.url)
    name = victim.split("/v1/", 1)[1]
    assert report.problems[0] == f"v1/{name}: checksum mismatch"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "verify", result.url],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ.copy(),
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"v1/{name}: checksum mismatch" in proc.stderr


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_faults_leave_a_complete_version_or_none(
    site_store, s3_bucket: str, s3_endpoint: str, rate: float
) -> None:
    fs = plain_fs(s3_endpoint)
    outcomes = []
    for seed in range(2):
        to = f"{s3_bucket}/faults-{seed}"
        with use_s3_class(flaky_class(rate, seed)) as cls:
            try:
                result = publish(site_store, to, policy=PATIENT)
                outcomes.append("published")
                assert result.created
            except OncoflowError:
                outcomes.append("failed")
            assert cls.faults > 0
        # seen without faults: either a complete verifiable version, or none at all
        report = verify_url(f"{to}/lung") if fs.exists(f"{to}/lung") else None
        if report is not None and report.versions:
            assert report.ok, (rate, seed, report.problems)
            assert report.versions == ["v1"]
        # the next run (no faults) ends with exactly one complete version and no leftovers
        final = publish(site_store, to)
        assert final.version == "v1"
        report = verify_url(f"{to}/lung")
        assert report.ok and report.versions == ["v1"], report.problems
        left = keys(fs, f"{to.removeprefix('s3://')}/lung")
        assert not [k for k in left if "/.staging/" in k], left
    if rate <= 0.5:
        assert "published" in outcomes
    if rate >= 0.9:
        assert outcomes == ["failed", "failed"]


KILL_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import fsspec, s3fs
    from tasks.cohort.publish import plan_publication, publish_cohort
    from tasks.cohort.spec import parse_spec
    from tasks.store import SiteStore

    class SlowS3(s3fs.S3FileSystem):
        async def _call_s3(self, method, *args, **kwargs):
            if method in ("put_object", "copy_object"):
                await asyncio.sleep(0.15)
            return await super()._call_s3(method, *args, **kwargs)

    fsspec.register_implementation("s3", SlowS3, clobber=True)
    store_url, to, features = sys.argv[1:4]
    spec = parse_spec({"name": "lung", "title": "Lung cohort", "description": "Chest imaging",
                       "licence": "CC-BY-4.0", "features": features})
    publish_cohort(SiteStore(store_url, "site-a"), spec, to, date_published="2026-01-02")
    print("finished")
    """
)


@pytest.mark.parametrize("phase", ["staging", "commit"])
def test_killed_publish_is_resumed_or_cleaned(
    site_store, s3_bucket: str, s3_endpoint: str, tmp_path: Path, phase: str
) -> None:
    to = f"{s3_bucket}/killed-{phase}"
    script = tmp_path / "publish_slowly.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), site_store.url, to, PARAMS_HASH],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    fs = plain_fs(s3_endpoint)
    prefix = f"{to.removeprefix('s3://')}/lung"
    marker = ".staging/" if phase == "staging" else "/v1/"
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            fs.invalidate_cache()
            found = [k for k in (fs.find(prefix) if fs.exists(prefix) else []) if marker in k]
            if len(found) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("publish never reached the phase to kill")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # nothing visible
    assert verify_url(f"{to}/lung").problems == ["no committed version found"]
    leftovers = keys(fs, prefix)
    assert leftovers

    result = publish(site_store, to)
    assert result.created and result.version == "v1"
    if phase == "staging":
        assert result.reused >= 1  # staged objects of the killed run were reused
    else:
        assert "v1" in result.cleaned  # the half-copied version was removed, then recommitted
    report = verify_url(f"{to}/lung")
    assert report.ok and report.versions == ["v1"], report.problems
    assert not [k for k in keys(fs, prefix) if "/.staging/" in k]


def test_a_canary_in_a_file_to_publish_fails_the_gate_and_nothing_reaches_s3(
    tmp_path: Path, s3_bucket: str, s3_endpoint: str
) -> None:
    """The gate runs at the site before any upload: a failed gate leaves zero objects."""
    import pydicom

    from tests.unit.test_cohort_fixture import mrn

    store = build_site(str(tmp_path / "store"))
    fs = plain_fs(s3_endpoint)
    to = f"{s3_bucket}/gated"
    spec = {**SPEC, "include": {"dicom": True}}
    key = next(k for k in store.find("deid/dicom") if k.endswith(".dcm"))
    ds = pydicom.dcmread(io.BytesIO(store.read_bytes(key)))
    ds.SeriesDescription = "CT ΘΩΡΑΚΑΣ Παπαδόπουλος"  # a Greek name in a descriptor
    ds.private_block(0x0011, "HIS", create=True).add_new(0x01, "UN", mrn("site-a", 0).encode())
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    store.write_bytes(key, buf.getvalue())
    # an earlier run of the same content left a staged object: it must go too
    plan = plan_publication(store, parse_spec(spec), to)
    fs.pipe_file(f"{to.removeprefix('s3://')}/lung/{plan.staging_key}/left.bin", b"x")

    class Recording(s3fs.S3FileSystem):
        calls: ClassVar[list[str]] = []

        async def _call_s3(self, method, *args, **kwargs):
            Recording.calls.append(str(method))
            return await super()._call_s3(method, *args, **kwargs)

    with use_s3_class(Recording), pytest.raises(OncoflowError) as err:
        publish(store, to, spec=spec)
    writes = [c for c in Recording.calls if "put" in c or "copy" in c or "upload" in c]
    assert Recording.calls and writes == []  # not one byte was sent to the target
    message = str(err.value)
    assert "\n" not in message and message.startswith("leak gate found ")
    assert "nothing was published" in message
    assert mrn("site-a", 0) not in message and "Παπα" not in message
    assert keys(fs, f"{to.removeprefix('s3://')}/lung") == []
    # the same store without the canary publishes
    ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    ds.SeriesDescription = "CT THORAX"
    del ds[0x00110010], ds[0x00111001]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    store.write_bytes(key, buf.getvalue())
    assert publish(store, to, spec=spec).leak_gate == "passed"

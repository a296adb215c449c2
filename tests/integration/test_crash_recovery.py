"""Crash recovery of the whole command: `oncoflow run` killed with SIGKILL, then run again.

`oncoflow run SOURCE ... --params ct --cohort ... --to ...` runs in subprocesses (each in its
own session) on a one-patient synthetic site, against the session's Prefect server:

* the undisturbed run is the session's reference run (tests/conftest.py: the same command into
  its own store; its publication moved aside), shared with the production-topology test;
* a run into store A killed while harmonising: SIGKILL of the leader process first (what the
  kernel's OOM killer does), so its Dask workers must notice and exit by themselves, then of
  the whole process group;
* a run into store A to completion.

After the kill: no process of the killed run is left, every Parquet table in the store reads
whole, and the publication shows no version without a verified commit marker. At the end the
recovered store and publication equal the undisturbed ones, object for object.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.cohort.storage import Retrier, RetryPolicy
from tasks.cohort.verify import MARKER, read_marker, verify_url, verify_version, version_dirs
from tasks.store import TMP_MARK, open_url
from tests.conftest import REFERENCE_COHORT_SPEC, REFERENCE_SECRET, ReferenceRun
from tests.services import BIN

REPO = Path(__file__).resolve().parents[2]
COHORT_SPEC = REFERENCE_COHORT_SPEC
COHORT = "demo-ct"
SITE = "site-a"
TOKEN_VAR = "ONCOFLOW_CRASH_TEST_RUN"
#: Store prefixes compared between the recovered and the undisturbed run.
DERIVED = ("deid/", "harmonised/", "features/", "catalog/series.parquet", "quarantine.parquet")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


class Run:
    """One `oncoflow run` subprocess, tagged so that every process it starts can be found."""

    def __init__(self, source: Path, store: Path, to: Path, log: Path) -> None:
        self.token = uuid.uuid4().hex
        self.log = log
        self.started = time.monotonic()
        args = [
            str(BIN / "oncoflow"),
            "run",
            str(source),
            "--site",
            SITE,
            "--store",
            str(store),
            "--params",
            "ct",
            "--cohort",
            str(COHORT_SPEC),
            "--to",
            str(to),
            "--workers",
            "2",
        ]
        env = {**os.environ, "ONCOFLOW_SITE_SECRET": REFERENCE_SECRET, TOKEN_VAR: self.token}
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                args, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )

    def tail(self, chars: int = 3000) -> str:
        """The end of the run's output (for failure messages)."""
        return self.log.read_text(errors="replace")[-chars:]

    def processes(self) -> dict[int, str]:
        """Live processes carrying this run's token in their environment: pid → command line."""
        needle = f"{TOKEN_VAR}={self.token}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    found[int(entry.name)] = cmd[:200]
        return found

    def wait(self, timeout: float) -> int:
        """Wait for the run to finish; fail the test (and kill the run) after ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            pytest.fail(f"oncoflow run did not finish in {timeout:.0f}s\n{self.tail()}")

    def kill_when(self, ready: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll ``ready()`` every 50 ms and return the run's age when it first holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                code = self.proc.returncode
                pytest.fail(f"the run ended (code {code}) before {what}\n{self.tail()}")
            time.sleep(0.05)
        self.kill_group()
        pytest.fail(f"no {what} after {timeout:.0f}s\n{self.tail()}")

    def kill_group(self) -> None:
        """SIGKILL the run's whole process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def assert_nothing_left(self, timeout: float = 60) -> float:
        """Wait until no process of the run is alive; return the seconds it took."""
        start = time.monotonic()
        left = self.processes()
        while left and time.monotonic() - start < timeout:
            time.sleep(0.25)
            left = self.processes()
        for pid in left:  # clean up before failing, so nothing outlives the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes of the killed run still alive after {timeout:.0f}s: {left}"
        return time.monotonic() - start


def harmonising(store: Path) -> Callable[[], bool]:
    """True once the harmonise stage has started writing series folders."""
    root = store / SITE / "harmonised"
    return lambda: root.is_dir() and any(p.is_dir() for p in root.iterdir())


def derived_objects(store: Path) -> dict[str, str]:
    """SHA-256 of every derived object of the site (no private ``_`` prefixes, no temp keys)."""
    root = store / SITE
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if not path.is_file() or any(p.startswith(("_", TMP_MARK)) for p in parts):
            continue
        if rel.startswith(DERIVED):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_tables_whole(store: Path) -> int:
    """Every Parquet table under the store (temp keys aside) reads completely."""
    tables = [
        p
        for p in (store / SITE).rglob("*.parquet")
        if not any(part.startswith(TMP_MARK) for part in p.parts)
    ]
    for table in tables:
        pq.read_table(table)  # raises on a truncated or half-written file
    return len(tables)


def assert_no_partial_version(to: Path) -> list[str]:
    """Every version directory of the cohort has a commit marker and verifies."""
    fs, root = open_url(str(to / COHORT))
    retry = Retrier(RetryPolicy(attempts=1))
    committed = []
    for _, vpath in version_dirs(fs, root):
        name = vpath.rsplit("/", 1)[-1]
        assert read_marker(fs, vpath, retry) is not None, f"{name} visible without {MARKER}"
        problems, _ = verify_version(fs, vpath, retry)
        assert problems == [], f"{name}: {problems}"
        committed.append(name)
    return committed


def test_killed_run_recovers_to_the_undisturbed_result(
    reference_run: ReferenceRun, tmp_path: Path
) -> None:
    timings: dict[str, float] = {}
    source, store = reference_run.source, tmp_path / "store-a"
    baseline_store, baseline_pub = reference_run.store, reference_run.publication
    pub = reference_run.publication_url  # where the undisturbed run published

    # killed while harmonising: the leader first; its Dask workers must exit by themselves
    killed_pub = tmp_path / "publication-killed"
    killed = Run(source, store, killed_pub, tmp_path / "run-a1.log")
    timings["kill at"] = killed.kill_when(harmonising(store), 900, "harmonised output")
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(timeout=30)
    timings["orphans gone"] = killed.assert_nothing_left()
    killed.kill_group()
    assert not (store / SITE / "harmonised" / "series.parquet").exists()  # mid-stage
    assert assert_tables_whole(store) >= 3  # catalog, quarantine, deid were written before
    assert not (killed_pub / COHORT).exists() or assert_no_partial_version(killed_pub) == []

    # run again to completion, publishing where the undisturbed run did
    t0 = time.monotonic()
    final = Run(source, store, pub, tmp_path / "run-a2.log")
    assert final.wait(900) == 0, final.tail()
    timings["rerun"] = time.monotonic() - t0
    print("crash-recovery timings (s):", {k: round(v, 1) for k, v in timings.items()})

    # the recovered store equals the undisturbed one, object for object
    recovered, undisturbed = derived_objects(store), derived_objects(baseline_store)
    assert any(k.startswith("harmonised/") for k in undisturbed)
    assert any(k.startswith("features/") for k in undisturbed)
    assert sorted(recovered) == sorted(undisturbed)
    differing = [k for k in undisturbed if recovered[k] != undisturbed[k]]
    assert differing == []

    # one committed version, verified, with the same checksums as the undisturbed one
    report = verify_url(str(pub / COHORT))
    assert report.ok, report.problems
    assert report.versions == ["v1"]
    assert (pub / COHORT / "v1" / "SHA256SUMS").read_bytes() == (
        baseline_pub / COHORT / "v1" / "SHA256SUMS"
    ).read_bytes()
    staging = pub / COHORT / ".staging"
    assert not staging.exists() or not any(staging.iterdir())

"""A real Orthanc PACS for tests and benchmarks, and tiny synthetic studies to load into
it (made by tests/dicom_factory.py).

Orthanc (Debian package ``orthanc`` + ``orthanc-dicomweb``) is started from a generated
configuration in a temporary folder on free loopback ports, waited for with a bounded timeout
and stopped by its pid, so a failed test leaves nothing running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.dicom_factory import SyntheticStudy, make_ct_study  # noqa: F401 - for the PACS tests
from tests.services import free_port, spawn, stop, wait_for

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_USER = "oncoflow"
ORTHANC_PASSWORD = "pacs-test-secret"


def orthanc_missing_reason() -> str | None:
    """Return why Orthanc cannot be started here, or None when it can."""
    if not ORTHANC_BIN.exists():
        return (
            "Orthanc is not installed (/usr/sbin/Orthanc missing): "
            "apt-get install -y orthanc orthanc-dicomweb"
        )
    if not DICOMWEB_PLUGIN.exists():
        return (
            f"Orthanc DICOMweb plugin missing ({DICOMWEB_PLUGIN}): apt-get install orthanc-dicomweb"
        )
    return None


@dataclass
class Orthanc:
    """A running Orthanc started by :func:`orthanc_server`."""

    http_port: int
    dicom_port: int
    aet: str
    workdir: Path
    config: dict
    proc: object = field(repr=False)

    @property
    def url(self) -> str:
        """Base HTTP URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """DICOMweb root URL."""
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        """HTTP basic credentials of the test user."""
        return (ORTHANC_USER, ORTHANC_PASSWORD)

    def client(self) -> httpx.Client:
        """An HTTP client for the REST API."""
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=30)

    def upload(self, files: list[bytes]) -> None:
        """Store DICOM files through ``POST /instances``."""
        with self.client() as client:
            for data in files:
                resp = client.post(
                    "/instances", content=data, headers={"Content-Type": "application/dicom"}
                )
                resp.raise_for_status()

    def count(self, level: str = "instances") -> int:
        """Number of stored studies, series or instances."""
        with self.client() as client:
            return len(client.get(f"/{level}").raise_for_status().json())

    def is_running(self) -> bool:
        """Whether the Orthanc process is still alive."""
        return self.proc.poll() is None  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Stop the Orthanc process (SIGTERM, then SIGKILL)."""
        stop(self.proc)  # type: ignore[arg-type]

    def kill(self) -> None:
        """Kill the Orthanc process at once (SIGKILL), as a crash or power loss would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        self.proc.wait(timeout=30)  # type: ignore[attr-defined]


def orthanc_config(
    workdir: Path,
    http_port: int,
    dicom_port: int,
    modalities: dict[str, list] | None = None,
) -> dict:
    """Build an Orthanc configuration: storage in ``workdir``, DICOMweb on, one test user."""
    return {
        "Name": "oncoflow-test-pacs",
        "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
        "HttpThreadsCount": 16,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Ssl": False},
        "DicomModalities": modalities or {},
        "DicomAssociationCloseDelay": 0,
        "StableAge": 1,
        "SaveJobs": False,
    }


@contextlib.contextmanager
def orthanc_server(
    modalities: dict[str, list] | None = None, timeout: float = 60
) -> Iterator[Orthanc]:
    """Start Orthanc on free ports with a generated configuration; stop it by pid on exit.

    Parameters
    ----------
    modalities
        ``DicomModalities`` entries: name -> ``[AET, host, port]`` (C-STORE targets).
    timeout
        Seconds to wait for the REST API to answer.
    """
    reason = orthanc_missing_reason()
    if reason:
        raise RuntimeError(reason)
    workdir = Path(tempfile.mkdtemp(prefix="oncoflow-orthanc-"))
    http_port, dicom_port = free_port(), free_port()
    config = orthanc_config(workdir, http_port, dicom_port, modalities)
    cfg_path = workdir / "orthanc.json"
    cfg_path.write_text(json.dumps(config, indent=2))
    proc = spawn([str(ORTHANC_BIN), str(cfg_path)], workdir / "orthanc.log")
    server = Orthanc(http_port, dicom_port, "ORTHANC", workdir, config, proc)
    try:
        wait_for(
            lambda: (
                httpx.get(f"{server.url}/system", auth=server.auth, timeout=2).status_code == 200
            ),
            timeout,
            "orthanc",
            proc,
        )
        yield server
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def restarted(server: Orthanc, timeout: float = 60) -> Iterator[Orthanc]:
    """Start Orthanc again on the same configuration and storage (after :meth:`Orthanc.stop`)."""
    proc = spawn(
        [str(ORTHANC_BIN), str(server.workdir / "orthanc.json")], server.workdir / "orthanc.log"
    )
    server.proc = proc
    try:
        wait_for(
            lambda: (
                httpx.get(f"{server.url}/system", auth=server.auth, timeout=2).status_code == 200
            ),
            timeout,
            "orthanc (restart)",
            proc,
        )
        yield server
    finally:
        stop(proc)

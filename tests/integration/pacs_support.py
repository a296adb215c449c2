"""A real Orthanc PACS for tests and benchmarks, and tiny synthetic studies to load into it.

Orthanc (Debian package ``orthanc`` + ``orthanc-dicomweb``) is started from a generated
configuration in a temporary folder on free loopback ports, waited for with a bounded timeout
and stopped by its pid, so a failed test leaves nothing running.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

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


@dataclass(frozen=True)
class SyntheticStudy:
    """UIDs of one synthetic study (test data only)."""

    patient_id: str
    study_uid: str
    series_uids: tuple[str, ...]
    sop_uids: tuple[str, ...]
    files: tuple[bytes, ...] = field(repr=False)


def make_ct_study(
    patient_id: str,
    *,
    n_series: int = 1,
    n_slices: int = 3,
    size: int = 16,
    study_date: dt.date | None = None,
    seed: int = 0,
) -> SyntheticStudy:
    """Write a tiny CT study (``n_series`` axial series of ``n_slices`` slices) as DICOM bytes.

    Each file is a valid CT Image Storage instance with consistent geometry, so the normal
    ingest catalogues its series as ``ok``.
    """
    rng = np.random.default_rng(seed)
    study_uid = generate_uid()
    frame_uid = generate_uid()
    date = (study_date or dt.date.today()).strftime("%Y%m%d")
    files: list[bytes] = []
    series_uids: list[str] = []
    sop_uids: list[str] = []
    for s in range(n_series):
        series_uid = generate_uid()
        series_uids.append(series_uid)
        for i in range(n_slices):
            sop_uid = generate_uid()
            sop_uids.append(sop_uid)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.PatientID = patient_id
            ds.PatientName = f"Test^{patient_id}"
            ds.PatientBirthDate = "19600101"
            ds.PatientSex = "O"
            ds.StudyDate = date
            ds.SeriesDate = date
            ds.StudyTime = "120000"
            ds.AccessionNumber = f"A{seed:05d}"
            ds.StudyID = "1"
            ds.Modality = "CT"
            ds.Manufacturer = "oncoflow-test"
            ds.BodyPartExamined = "CHEST"
            ds.SeriesNumber = s + 1
            ds.InstanceNumber = i + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0, 0, float(i) * 2.5]
            ds.SliceThickness = 2.5
            ds.PixelSpacing = [0.8, 0.8]
            ds.Rows = size
            ds.Columns = size
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = 0
            ds.RescaleSlope = 1
            ds.PixelData = rng.integers(-1000, 1000, (size, size), dtype=np.int16).tobytes()
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            files.append(buf.getvalue())
    return SyntheticStudy(patient_id, study_uid, tuple(series_uids), tuple(sop_uids), tuple(files))

"""The C-STORE receiver: storescu and Orthanc send studies, they are catalogued; bad peers fail."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage

from tasks.pacs.dicomweb import opaque_key
from tasks.pacs.receiver import RAW_INCOMING, RAW_RECEIVED, StorageReceiver
from tasks.refs import site_ref_key
from tasks.store import SiteStore
from tests.integration.pacs_support import (
    SyntheticStudy,
    make_ct_study,
    orthanc_missing_reason,
    orthanc_server,
)
from tests.services import free_port, spawn, stop, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.pacs]

SITE = "site-a"
needs_orthanc = pytest.mark.skipif(
    orthanc_missing_reason() is not None, reason=str(orthanc_missing_reason())
)


@pytest.fixture(scope="module")
def dask_address(prefect_api: str) -> Iterator[str]:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture()
def receiver(tmp_path: Path) -> Iterator[StorageReceiver]:
    """An in-process receiver without ingest (quiet studies are only moved)."""
    store = SiteStore(str(tmp_path / "store"), SITE)
    scp = StorageReceiver(
        store, "ONCOFLOW", ["STORESCU"], port=0, host="127.0.0.1", quiet_seconds=0.2
    )
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def catalogued_series(store: SiteStore) -> dict[str, int]:
    table = store.read_table("catalog/series.parquet")
    if table is None:
        return {}
    return {
        r["series_instance_uid"]: r["n_instances"] for r in table.to_pylist() if r["status"] == "ok"
    }


def write_files(study: SyntheticStudy, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, data in enumerate(study.files):
        (folder / f"{i:03d}.dcm").write_bytes(data)
    return folder


def wait_catalogue(
    store: SiteStore, expected: dict[str, int], log: Path, proc: object, sender: str
) -> None:
    """Wait until the catalogue lists exactly ``expected``; on timeout show the receiver's log."""
    try:
        wait_for(lambda: catalogued_series(store) == expected, 300, f"catalogue ({sender})", proc)
    except (TimeoutError, RuntimeError) as exc:
        raise AssertionError(f"{exc}; receiver log:\n{log.read_text()[-4000:]}") from None


def last_json(text: str) -> dict:
    start = text.rindex("\n{\n") + 1
    return json.loads(text[start : text.rindex("}") + 1])


@needs_orthanc
def test_storescu_and_orthanc_cstore_reach_the_catalogue(
    dask_address: str, prefect_api: str, tmp_path: Path
) -> None:
    port = free_port()
    store_url = str(tmp_path / "store")
    store = SiteStore(store_url, SITE)
    log = tmp_path / "receive.log"
    from_storescu = make_ct_study("PAT-SCU", n_series=2, seed=21)
    from_orthanc = make_ct_study("PAT-ORTHANC", n_series=1, n_slices=4, seed=22)
    modalities = {"oncoflow": ["ONCOFLOW", "127.0.0.1", port]}
    with orthanc_server(modalities=modalities) as orthanc:
        proc = spawn(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "receive",
                "--site",
                SITE,
                "--store",
                store_url,
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--ae-title",
                "ONCOFLOW",
                "--allow",
                "STORESCU",
                "--allow",
                orthanc.aet,
                "--quiet-seconds",
                "1",
                "--dask-address",
                dask_address,
                "--json",
            ],
            log,
            {"PREFECT_API_URL": prefect_api},
        )
        try:
            wait_for(lambda: "listening on" in log.read_text(), 120, "oncoflow receive", proc)

            # 1. pynetdicom's storescu sends a folder of files.
            folder = write_files(from_storescu, tmp_path / "outgoing")
            sent = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pynetdicom",
                    "storescu",
                    "127.0.0.1",
                    str(port),
                    str(folder),
                    "-r",
                    "-cx",
                    "-aet",
                    "STORESCU",
                    "-aec",
                    "ONCOFLOW",
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert sent.returncode == 0, sent.stderr[-2000:]
            expected = {uid: 3 for uid in from_storescu.series_uids}
            wait_catalogue(store, expected, log, proc, "storescu")

            # 2. Orthanc sends a study with its C-STORE (the receiver is one of its modalities).
            orthanc.upload(list(from_orthanc.files))
            with orthanc.client() as client:
                found = client.post(
                    "/tools/find",
                    json={
                        "Level": "Study",
                        "Query": {"StudyInstanceUID": from_orthanc.study_uid},
                    },
                ).json()
                assert len(found) == 1
                resp = client.post(
                    "/modalities/oncoflow/store",
                    json={"Resources": found, "Synchronous": True},
                    timeout=120,
                )
                assert resp.status_code == 200, resp.text
            expected[from_orthanc.series_uids[0]] = 4
            wait_catalogue(store, expected, log, proc, "Orthanc")
        finally:
            stop(proc, timeout=300)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    stats = last_json(output)
    assert stats["received"] == len(from_storescu.files) + len(from_orthanc.files)
    assert stats["studies_committed"] == 2 and stats["failed"] == 0
    # Files landed under opaque names; nothing is left in the incoming area.
    received = files_under(Path(store.path(RAW_RECEIVED)))
    assert len(received) == stats["received"]
    assert {p.parent.parent.name for p in received} == {
        opaque_key(from_storescu.study_uid, site_ref_key(store)),
        opaque_key(from_orthanc.study_uid, site_ref_key(store)),
    }
    assert files_under(Path(store.path(RAW_INCOMING))) == []
    names = "\n".join(str(p) for p in received)
    for study in (from_storescu, from_orthanc):
        assert study.study_uid not in names and study.patient_id not in names
        assert study.study_uid not in output and study.patient_id not in output
    # The bytes are the ones sent.
    sent_pixels = {
        pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID: pydicom.dcmread(io.BytesIO(f)).PixelData
        for f in from_storescu.files
    }
    for path in received:
        ds = pydicom.dcmread(path)
        if ds.SOPInstanceUID in sent_pixels:
            assert ds.PixelData == sent_pixels[ds.SOPInstanceUID]


def test_connection_dropped_mid_association_leaves_no_partial_file(
    receiver: StorageReceiver,
) -> None:
    big = make_ct_study("PAT-BIG", n_slices=1, size=512, seed=31)  # ~0.5 MB: ~32 PDUs
    small = make_ct_study("PAT-SMALL", n_slices=1, seed=32)
    sent_pdata = []

    def cut_after_a_few_pdus(event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            sent_pdata.append(1)
            if len(sent_pdata) == 5:
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    ae.network_timeout = ae.dimse_timeout = 5
    assoc = ae.associate(
        "127.0.0.1",
        receiver.bound_port,
        ae_title="ONCOFLOW",
        evt_handlers=[(evt.EVT_PDU_SENT, cut_after_a_few_pdus)],
    )
    assert assoc.is_established
    status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(big.files[0])))
    assert not status  # no success status came back
    assoc.abort()
    root = Path(receiver.store.root)
    wait_for(lambda: files_under(root) == [], 10, "the dropped association's file removed")
    assert receiver.stats.received == 0
    assert receiver.commit_due(force=True) == []

    # The receiver is still serving: a complete transfer lands and is committed.
    ae2 = AE(ae_title="STORESCU")
    ae2.add_requested_context(CTImageStorage)
    assoc = ae2.associate("127.0.0.1", receiver.bound_port, ae_title="ONCOFLOW")
    assert assoc.send_c_store(pydicom.dcmread(io.BytesIO(small.files[0]))).Status == 0
    assoc.release()
    assert receiver.commit_due(force=True) == [
        opaque_key(small.study_uid, site_ref_key(receiver.store))
    ]
    landed = files_under(Path(receiver.store.path(RAW_RECEIVED)))
    assert len(landed) == 1 and landed[0].read_bytes()[128:132] == b"DICM"
    assert pydicom.dcmread(landed[0]).SOPInstanceUID == small.sop_uids[0]


def test_calling_ae_title_not_on_the_allow_list_is_rejected(receiver: StorageReceiver) -> None:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", receiver.bound_port, ae_title="ONCOFLOW")
    assert assoc.is_rejected and not assoc.is_established
    assert receiver.stats.rejected_associations == 1
    assert files_under(Path(receiver.store.root)) == []
    # storescu with a wrong calling AE title gets nothing through either.
    ae = AE(ae_title="STORESCU2")
    ae.add_requested_context(CTImageStorage)
    assert ae.associate("127.0.0.1", receiver.bound_port, ae_title="ONCOFLOW").is_rejected
    assert receiver.stats.received == 0


def test_receive_without_an_allow_list_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    args = ["receive", "--site", SITE, "--store", str(tmp_path / "store"), "--port", "11112"]
    with pytest.raises(SystemExit) as excinfo:
        main(args)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "no calling AE title allowed" in err
    assert not (tmp_path / "store").exists()


def test_study_is_committed_only_after_it_is_quiet(receiver: StorageReceiver) -> None:
    study = make_ct_study("PAT-QUIET", n_slices=3, seed=51)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", receiver.bound_port, ae_title="ONCOFLOW")
    assert assoc.send_c_store(pydicom.dcmread(io.BytesIO(study.files[0]))).Status == 0
    receiver.quiet_seconds = 30
    assert receiver.commit_due() == []  # still arriving
    incoming = files_under(Path(receiver.store.path(RAW_INCOMING)))
    assert len(incoming) == 1
    for data in study.files[1:]:
        assert assoc.send_c_store(pydicom.dcmread(io.BytesIO(data))).Status == 0
    assoc.release()
    receiver.quiet_seconds = 0.2
    committed: list[str] = []
    wait_for(lambda: committed.extend(receiver.commit_due()) or committed, 10, "a quiet study")
    assert committed == [opaque_key(study.study_uid, site_ref_key(receiver.store))]
    assert len(files_under(Path(receiver.store.path(RAW_RECEIVED)))) == 3
    assert files_under(Path(receiver.store.path(RAW_INCOMING))) == []

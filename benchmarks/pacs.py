"""Benchmark: instances per second pulled over DICOMweb from a local Orthanc.

Baseline: a plain dicomweb-client loop, one series after the other: list the study's series
(QIDO-RS), ``retrieve_series`` (WADO-RS, stored transfer syntax), write each instance to a
folder with pydicom. Contender: ``pull-dicomweb`` (search, one Dask task per series, staged
commit, state), with ``ingest`` off so both do the same work. Both pull the same series from
the same Orthanc in the same run; the Dask cluster and the Prefect server are started before
timing (a site keeps them running) and their start-up is printed separately.

Usage::

    uv run python benchmarks/pacs.py [--studies 8] [--series 1] [--slices 100] [--size 512]
                                     [--workers 2] [--repeat 2]

Prints both rates, the phases of the oncoflow run (search, pull, commit) and the ratio
oncoflow/baseline (target >= 1.5 from per-series parallelism), and checks that both pulled the
same instances. Orthanc, the client and the workers share the machine's cores: the ratio is
only meaningful on a machine that is otherwise idle (``uptime`` is printed with the result).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom

from flows.pacs import PullParams, pull_dicomweb
from flows.runtime import RuntimeOptions, dask_cluster, ensure_prefect_api
from tasks.pacs.credentials import ENV_PASSWORD, ENV_USER, DicomwebCredentials
from tasks.pacs.dicomweb import ANY_TRANSFER_SYNTAX, dicomweb_client
from tests.integration.pacs_support import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    Orthanc,
    make_ct_study,
    orthanc_missing_reason,
    orthanc_server,
)


def baseline_pull(orthanc: Orthanc, study_uids: list[str], out: Path) -> int:
    """Pull every series of the studies with a plain dicomweb-client loop; return instances."""
    with dicomweb_client(orthanc.dicomweb, DicomwebCredentials(*orthanc.auth)) as client:
        n = 0
        for study_uid in study_uids:
            for item in client.search_for_series(study_instance_uid=study_uid):
                series_uid = item["0020000E"]["Value"][0]
                for ds in client.retrieve_series(
                    study_uid, series_uid, media_types=ANY_TRANSFER_SYNTAX
                ):
                    buf = io.BytesIO()
                    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
                    (out / f"{ds.SOPInstanceUID}.dcm").write_bytes(buf.getvalue())
                    n += 1
    return n


def _pull_one_series(dicomweb: str, auth: tuple[str, str], job: tuple[str, str], out: str) -> int:
    """Pull one series like :func:`baseline_pull` (run in a process of its own)."""
    study_uid, series_uid = job
    with dicomweb_client(dicomweb, DicomwebCredentials(*auth)) as client:
        n = 0
        for ds in client.retrieve_series(study_uid, series_uid, media_types=ANY_TRANSFER_SYNTAX):
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
            (Path(out) / f"{ds.SOPInstanceUID}.dcm").write_bytes(buf.getvalue())
            n += 1
    return n


def process_pool_pull(
    orthanc: Orthanc, study_uids: list[str], out: Path, pool: ProcessPoolExecutor
) -> int:
    """The ceiling of per-series parallelism here: the baseline's loop body in N processes."""
    with dicomweb_client(orthanc.dicomweb, DicomwebCredentials(*orthanc.auth)) as client:
        jobs = [
            (study_uid, item["0020000E"]["Value"][0])
            for study_uid in study_uids
            for item in client.search_for_series(study_instance_uid=study_uid)
        ]
    pulls = [
        pool.submit(_pull_one_series, orthanc.dicomweb, tuple(orthanc.auth), job, str(out))
        for job in jobs
    ]
    return sum(f.result() for f in pulls)


def sop_uids_in(folder: Path) -> set[str]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in folder.rglob("*.dcm")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--series", type=int, default=1)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    reason = orthanc_missing_reason()
    if reason:
        sys.exit(f"error: {reason}")

    os.environ[ENV_USER], os.environ[ENV_PASSWORD] = ORTHANC_USER, ORTHANC_PASSWORD
    work = Path(tempfile.mkdtemp(prefix="oncoflow-bench-pacs-"))
    try:
        with orthanc_server() as orthanc:
            studies = [
                make_ct_study(
                    f"BENCH-{i}",
                    n_series=args.series,
                    n_slices=args.slices,
                    size=args.size,
                    seed=i,
                )
                for i in range(args.studies)
            ]
            for study in studies:
                orthanc.upload(list(study.files))
            expected = {uid for s in studies for uid in s.sop_uids}
            mb = sum(len(f) for s in studies for f in s.files) / 1e6
            print(
                f"Orthanc: {args.studies} studies x {args.series} series x {args.slices} "
                f"instances of {args.size}x{args.size} ({len(expected)} instances, {mb:.1f} MB)"
            )

            t0 = time.perf_counter()
            ensure_prefect_api()
            t1 = time.perf_counter()
            runtime = RuntimeOptions(workers=args.workers)
            with dask_cluster(runtime) as address:
                t2 = time.perf_counter()
                print(
                    f"start-up (not timed below): Prefect API {t1 - t0:.1f} s, "
                    f"Dask LocalCluster of {args.workers} workers {t2 - t1:.1f} s"
                )
                shared = RuntimeOptions(dask_address=address)
                source = f"dicomweb+{orthanc.dicomweb}"
                # Warm-up: first flow run registers the flows, workers import the modules.
                pull_dicomweb(
                    PullParams(source=source, site="warm", store=str(work / "warm"), ingest=False),
                    shared,
                )
                base_times, flow_times, pool_times = [], [], []
                pool = ProcessPoolExecutor(args.workers)
                pool.submit(int).result()  # processes started before timing
                for r in range(args.repeat):
                    out = work / f"pool-{r}"
                    out.mkdir()
                    t = time.perf_counter()
                    n_pool = process_pool_pull(orthanc, [s.study_uid for s in studies], out, pool)
                    pool_times.append(time.perf_counter() - t)
                    assert n_pool == len(expected) and sop_uids_in(out) == expected
                    shutil.rmtree(out)

                    out = work / f"baseline-{r}"
                    out.mkdir()
                    t = time.perf_counter()
                    n_base = baseline_pull(orthanc, [s.study_uid for s in studies], out)
                    base_times.append(time.perf_counter() - t)
                    assert n_base == len(expected) and sop_uids_in(out) == expected

                    store = work / f"store-{r}"
                    params = PullParams(
                        source=source, site="bench", store=str(store), since="all", ingest=False
                    )
                    t = time.perf_counter()
                    summary = pull_dicomweb(params, shared).to_dict()
                    flow_times.append(time.perf_counter() - t)
                    assert summary["instances"] == len(expected), summary
                    phases = summary["timings"]
                    assert sop_uids_in(store / "bench" / "raw" / "pacs") == expected
                    shutil.rmtree(out)
                    shutil.rmtree(store)
                pool.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(expected)
    base = statistics.median(base_times)
    ours = statistics.median(flow_times)
    print(f"baseline  dicomweb-client loop : {n / base:8.1f} instances/s  (median {base:.2f} s)")
    print(
        f"oncoflow  pull-dicomweb ({args.workers} w) : {n / ours:8.1f} instances/s  "
        f"(median {ours:.2f} s)"
    )
    print(
        "oncoflow phases (last run): "
        + ", ".join(f"{k.removesuffix('_seconds')} {v:.2f} s" for k, v in phases.items())
    )
    ceiling = statistics.median(pool_times)
    print(
        f"ceiling   {args.workers} plain processes : {n / ceiling:8.1f} instances/s  "
        f"(median {ceiling:.2f} s; the baseline's loop, one series per process task)"
    )
    print(f"ratio oncoflow/baseline: {base / ours:.2f}x (target >= 1.5x)")
    print(
        f"ratio plain processes/baseline: {base / ceiling:.2f}x (what per-series parallelism "
        f"gives on this machine, Orthanc included); oncoflow reaches {ceiling / ours:.0%} of it"
    )
    print(f"load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

"""Benchmark: the DICOMweb pull against its ceiling, two plain processes, from a local Orthanc.

Ceiling: two plain Python processes started together, each searching the studies (QIDO-RS)
and pulling half of the series with dicomweb-client (``retrieve_series`` in the stored
transfer syntax, each instance written to a folder with pydicom): per-series parallelism on
2 cores with no orchestration at all. Contender: ``pull-dicomweb`` with ``ingest`` off (search,
the series on Dask, instance lists checked, staged commit, state, run report). Every series
has its own pixel content. Rounds alternate which of the two goes first; the ratio is the
median of the per-round ratios oncoflow/ceiling (target >= 0.9).

Steady state (what a site sees, and the target): the Prefect server and the Dask cluster are
started before timing, the ceiling's processes are started and have imported their modules.
End to end (``--end-to-end``, printed apart): a fresh command starting its own Prefect server
and Dask cluster, against two freshly started plain processes. The benchmark's Prefect server
keeps its database in a fresh ``PREFECT_HOME`` (a site's server has its own).

The orchestration share is what the pull spends outside the transfer: its wall time minus
the search, the commit and the series pulls' own time (listing, retrieval, writing; summed in
the workers, divided by the workers).

Usage::

    uv run python benchmarks/pacs.py [--studies 16] [--series 2] [--slices 100] [--size 512]
                                     [--workers 2] [--repeat 5] [--end-to-end]

Orthanc, the client and the workers share the machine's cores: ``uptime`` is printed with the
result; quote the ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import atexit
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":
    # The site's own Prefect database, as on a site (temporary servers here otherwise share
    # ~/.prefect/prefect.db with every other run on the machine). Set before Prefect is imported.
    if "PREFECT_HOME" not in os.environ:
        os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="oncoflow-bench-prefect-")
        # registered first, so it runs last at exit: after the server has stopped
        atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)

import pydicom

from benchmarks.plain_dicomweb import plain_half
from flows.pacs import PullParams, pull_dicomweb
from flows.runtime import TEMPORARY_API_ENV, RuntimeOptions, dask_cluster, ensure_prefect_api
from tasks.pacs.credentials import ENV_PASSWORD, ENV_USER
from tests.integration.pacs_support import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    Orthanc,
    make_ct_study,
    orthanc_missing_reason,
    orthanc_server,
)

ROOT = Path(__file__).resolve().parents[1]


def ceiling_pull(orthanc: Orthanc, out: Path, pool: ProcessPoolExecutor, parts: int) -> dict:
    """Run :func:`plain_half` in ``parts`` started processes at once; time to the last one."""
    t = time.perf_counter()
    halves = [
        pool.submit(plain_half, orthanc.dicomweb, str(out), part, parts) for part in range(parts)
    ]
    results = [f.result() for f in halves]
    return {
        "wall": time.perf_counter() - t,
        "instances": sum(r["instances"] for r in results),
        "search": max(r["search"] for r in results),
        "transfer": statistics.mean(r["transfer"] for r in results),
    }


def sop_uids_in(folder: Path) -> set[str]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in folder.rglob("*.dcm")
    }


def fresh_env() -> dict[str, str]:
    """The environment of a fresh command: no Prefect server yet (it starts its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", TEMPORARY_API_ENV)}
    return {**env, "PYTHONPATH": str(ROOT)}


def end_to_end(orthanc: Orthanc, work: Path, workers: int) -> tuple[float, float]:
    """Seconds of a fresh ``pull-dicomweb`` command and of two freshly started plain processes."""
    store = work / "e2e-store"
    code = (
        "from flows.pacs import PullParams, pull_dicomweb\n"
        "from flows.runtime import RuntimeOptions\n"
        f"p = PullParams(source='dicomweb+{orthanc.dicomweb}', site='e2e', store={str(store)!r},"
        " since='all', ingest=False)\n"
        f"print(pull_dicomweb(p, RuntimeOptions(workers={workers}, dashboard=False)).to_dict()"
        "['instances'])\n"
    )
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=fresh_env(), check=True, cwd=ROOT)
    ours = time.perf_counter() - t
    shutil.rmtree(store)
    out = work / "e2e-plain"
    out.mkdir()
    plain = [sys.executable, str(ROOT / "benchmarks" / "plain_dicomweb.py"), orthanc.dicomweb]
    t = time.perf_counter()
    procs = [
        subprocess.Popen([*plain, str(out), str(part), str(workers)], env=fresh_env())
        for part in range(workers)
    ]
    if any(p.wait() for p in procs):
        raise SystemExit("error: a plain process failed")
    ceiling = time.perf_counter() - t
    shutil.rmtree(out)
    return ours, ceiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--series", type=int, default=2)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--end-to-end", action="store_true", help="Also time fresh commands.")
    args = parser.parse_args()
    reason = orthanc_missing_reason()
    if reason:
        sys.exit(f"error: {reason}")

    os.environ[ENV_USER], os.environ[ENV_PASSWORD] = ORTHANC_USER, ORTHANC_PASSWORD
    work = Path(tempfile.mkdtemp(prefix="oncoflow-bench-pacs-"))
    rounds: list[dict] = []
    e2e: tuple[float, float] | None = None
    try:
        with orthanc_server() as orthanc:
            expected: set[str] = set()
            nbytes = 0
            for i in range(args.studies):  # own seed per study: every series its own pixels
                study = make_ct_study(
                    f"BENCH-{i}", n_series=args.series, n_slices=args.slices, size=args.size, seed=i
                )
                orthanc.upload(list(study.files))
                expected |= set(study.sop_uids)
                nbytes += sum(len(f) for f in study.files)
            print(
                f"Orthanc: {args.studies} studies x {args.series} series x {args.slices} "
                f"instances of {args.size}x{args.size} ({len(expected)} instances, "
                f"{nbytes / 1e6:.0f} MB)",
                flush=True,
            )

            t0 = time.perf_counter()
            ensure_prefect_api()
            t1 = time.perf_counter()
            runtime = RuntimeOptions(workers=args.workers, dashboard=False)
            with (
                dask_cluster(runtime) as address,
                ProcessPoolExecutor(args.workers, multiprocessing.get_context("spawn")) as pool,
            ):
                t2 = time.perf_counter()
                print(
                    f"start-up (not timed below): Prefect API {t1 - t0:.1f} s, "
                    f"Dask LocalCluster of {args.workers} workers {t2 - t1:.1f} s",
                    flush=True,
                )
                for f in [pool.submit(time.sleep, 0.5) for _ in range(args.workers)]:
                    f.result()  # both processes started (and their modules imported)
                shared = RuntimeOptions(dask_address=address)
                source = f"dicomweb+{orthanc.dicomweb}"
                # warm-up: the first flow run registers the flows, workers import the modules
                pull_dicomweb(
                    PullParams(source=source, site="warm", store=str(work / "warm"), ingest=False),
                    shared,
                )
                shutil.rmtree(work / "warm")
                for r in range(args.repeat):
                    got: dict = {}
                    for who in ("ceiling", "oncoflow") if r % 2 == 0 else ("oncoflow", "ceiling"):
                        out = work / f"{who}-{r}"
                        out.mkdir()
                        if who == "ceiling":
                            got[who] = ceiling_pull(orthanc, out, pool, args.workers)
                            assert got[who]["instances"] == len(expected)
                            assert sop_uids_in(out) == expected
                        else:
                            params = PullParams(
                                source=source, site="bench", store=str(out), since="all",
                                ingest=False,
                            )  # fmt: skip
                            t = time.perf_counter()
                            summary = pull_dicomweb(params, shared).to_dict()
                            got[who] = {"wall": time.perf_counter() - t, **summary["timings"]}
                            assert summary["instances"] == len(expected), summary
                            assert sop_uids_in(out / "bench" / "raw" / "pacs") == expected
                        shutil.rmtree(out)
                    rounds.append(got)
                    c, o = got["ceiling"]["wall"], got["oncoflow"]["wall"]
                    print(
                        f"round {r + 1}: ceiling {c:.2f} s, oncoflow {o:.2f} s: {c / o:.0%} "
                        f"(orchestration {orchestration(got['oncoflow'], args.workers):.2f} s; "
                        f"load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
            if args.end_to_end:  # after the rounds: the fresh command finds a migrated database
                e2e = end_to_end(orthanc, work, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rounds, len(expected), args.workers, e2e)


def orchestration(run: dict, workers: int) -> float:
    """Seconds of a pull outside search, commit and transfer (Prefect, Dask, idle workers)."""
    transfer = run["series_seconds"] / workers
    return run["wall"] - run["search_seconds"] - run["commit_seconds"] - transfer


def report(rounds: list[dict], n: int, workers: int, e2e: tuple[float, float] | None) -> None:
    """Print rates, the ratio, where oncoflow's time goes, and the end-to-end figures."""
    med = statistics.median
    ceiling = med(r["ceiling"]["wall"] for r in rounds)
    ours = med(r["oncoflow"]["wall"] for r in rounds)
    ratios = sorted(r["ceiling"]["wall"] / r["oncoflow"]["wall"] for r in rounds)
    print(f"ceiling   {workers} plain processes : {n / ceiling:7.1f} instances/s ({ceiling:.2f} s)")
    print(f"oncoflow  pull-dicomweb, {workers} w : {n / ours:7.1f} instances/s ({ours:.2f} s)")
    print(
        f"ratio oncoflow/ceiling: median {med(ratios):.0%} of {len(ratios)} rounds "
        f"({', '.join(f'{x:.0%}' for x in ratios)}; target >= 90%)"
    )
    runs = [r["oncoflow"] for r in rounds]
    wall = med(r["wall"] for r in runs)
    transfer = med(r["series_seconds"] for r in runs) / workers
    other = med(orchestration(r, workers) for r in runs)
    print(
        f"oncoflow's {wall:.2f} s (medians): transfer {transfer:.2f} s per worker "
        f"({transfer / wall:.0%}), search {med(r['search_seconds'] for r in runs):.2f} s, "
        f"commit {med(r['commit_seconds'] for r in runs):.2f} s, Prefect/Dask and idle "
        f"workers {other:.2f} s ({med(orchestration(r, workers) / r['wall'] for r in runs):.0%})"
    )
    plain = [r["ceiling"] for r in rounds]
    print(
        f"ceiling's {ceiling:.2f} s (medians): transfer {med(p['transfer'] for p in plain):.2f} s "
        f"per process, search {med(p['search'] for p in plain):.2f} s; per instance "
        f"{1e3 * workers * med(p['transfer'] for p in plain) / n:.2f} ms in a plain process, "
        f"{1e3 * med(r['series_seconds'] for r in runs) / n:.2f} ms in a Dask worker"
    )
    if e2e:
        print(
            f"end to end (fresh command: its own Prefect server and Dask cluster): oncoflow "
            f"{e2e[0]:.2f} s, {workers} fresh plain processes {e2e[1]:.2f} s: {e2e[1] / e2e[0]:.0%}"
        )
    print(f"load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

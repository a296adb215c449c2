"""Benchmark: ``oncoflow extract`` against the pyradiomics CLI on the same ROIs, in one run.

Baseline: ``pyradiomics cases.csv --jobs N -p params.yaml`` (best of N in --jobs, default 1 and
2). Contender: ``oncoflow extract --site bench --store STORE --params ct --workers 2``. Both use
the CT preset (Original + LoG sigma 1/2/3 mm + Wavelet) on the same 16 distinct ROIs of varied
size (8 series x 2 ROIs, or 4 series x 4 ROIs with ``--rois-per-series 4``). ``--sharing`` also
times, in one process, every ROI alone against the ROIs of each image together (each filtered
image made once).

Start-up is measured separately: the pyradiomics CLI on one tiny case, and ``oncoflow extract``
on a fully cached rerun (nothing computed: command, Prefect and flow overhead; such a rerun
starts no Dask cluster, so "excluding start-up" still counts the cluster's start as work), the
median of three.
Both commands are warmed up once first (byte-code, Prefect database). The
script also checks that both produce the same feature values.

Usage::

    uv run python benchmarks/radiomics.py [--scale 1.0] [--jobs 1,2] [--workers 2]
        [--prefect-server] [--oncoflow-first] [--rois-per-series 2|4] [--sharing]

``--prefect-server`` runs oncoflow against a Prefect server started before timing (how a site
runs it) instead of the temporary server each command starts on its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder comes first on sys.path and this file would shadow pyradiomics'
# own ``radiomics`` package
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import contextlib
import csv
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tasks.radiomics.params import Preset
from tasks.radiomics.samples import SampleRoi, SampleSeries, series_key, write_harmonised_sample
from tasks.store import SiteStore

BIN = Path(sys.executable).parent
SITE = "bench"
#: (x, y, z) voxels and the lesion radius in mm; two ROIs per image (lesion + a smaller node).
SIZES = [
    ((112, 112, 56), 22.0),
    ((128, 128, 64), 26.0),
    ((144, 144, 72), 30.0),
    ((160, 160, 80), 34.0),
    ((176, 176, 88), 38.0),
    ((192, 192, 96), 42.0),
    ((208, 208, 104), 46.0),
    ((224, 224, 112), 50.0),
]


#: ROI radii as fractions of the lesion radius, by ROIs per series (every mask distinct).
ROI_FRACTIONS = {2: (1.0, 0.5), 4: (1.0, 0.75, 0.5, 0.3)}


def build_cohort(
    root: Path, scale: float, rois_per_series: int = 2
) -> tuple[SiteStore, list[tuple[str, str]]]:
    """Write the benchmark images under ``root`` and return the store and (image, mask) paths.

    16 ROIs in all: 8 series with 2 ROIs, or with ``rois_per_series=4`` every other size (4
    series) with 4 concentric ROIs each. Every image has its own seed, every mask its own
    radius, so no two ROIs share a cache entry.
    """
    fractions = ROI_FRACTIONS[rois_per_series]
    sizes = SIZES if rois_per_series == 2 else SIZES[1::2]
    specs = []
    for i, (size, radius) in enumerate(sizes):
        scaled = tuple(max(16, round(s * scale)) for s in size)
        specs.append(
            SampleSeries(
                series_key(100 + i),
                "CT",
                size=scaled,  # type: ignore[arg-type]
                spacing=(1.0, 1.0, 2.0),
                rois=tuple(
                    SampleRoi(name, radius * scale * f)
                    for name, f in zip(("gtv", "node", "roi3", "roi4"), fractions, strict=False)
                ),
                seed=100 + i,
            )
        )
    store = SiteStore(str(root), SITE)
    write_harmonised_sample(store, specs)
    cases = [
        (
            store.path(f"harmonised/{s.series}/image.nii.gz"),
            store.path(f"harmonised/{s.series}/mask-{r.name}.nii.gz"),
        )
        for s in specs
        for r in s.rois
    ]
    return store, cases


def sharing_gain(store: SiteStore, rounds: int = 2) -> None:
    """Time, in this process, every ROI alone (``execute`` per mask) against each image's ROIs
    together (filtered images made once), interleaved rounds; print the CPU seconds and ratio.
    """
    import SimpleITK as sitk

    from tasks.radiomics.extract import build_extractor, plan_units, run_extractor
    from tasks.radiomics.params import load_params
    from tasks.radiomics.shared_filters import features_per_mask

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    params, _ = load_params("ct")
    images: dict[str, list] = {}
    for unit in plan_units(store):
        images.setdefault(unit.image, []).append(unit)
    loaded = {
        image: (
            sitk.ReadImage(store.path(image)),
            {u.key: sitk.ReadImage(store.path(u.mask)) for u in units},
        )
        for image, units in images.items()
    }
    alone, together = [], []
    for _ in range(rounds):
        start = time.process_time()
        for image, masks in loaded.values():
            for mask in masks.values():
                run_extractor(image, mask, params)
        alone.append(time.process_time() - start)
        start = time.process_time()
        for image, masks in loaded.values():
            features_per_mask(build_extractor(params), image, masks)
        together.append(time.process_time() - start)
    n = sum(len(m) for _, m in loaded.values())
    print(
        f"filter sharing, {len(loaded)} images x {n // len(loaded)} ROIs, CPU s per round "
        f"(one process): every ROI alone {min(alone):.1f}, ROIs of an image together "
        f"{min(together):.1f} -> {min(alone) / min(together):.2f}x"
    )


def write_cases(path: Path, cases: list[tuple[str, str]]) -> Path:
    """Write a pyradiomics batch CSV (``Image,Mask``)."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image", "Mask"])
        writer.writerows(cases)
    return path


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command and return its wall time (perf_counter) and the completed process.

    Prints the 1-minute load average before and after, since the machine may be shared.
    """
    load_before = os.getloadavg()[0]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)
    name = " ".join(Path(cmd[0]).name.split() + cmd[1:2])
    print(
        f"  [{name}: {elapsed:.1f} s wall, {cpu:.1f} s CPU (its processes), "
        f"load {load_before:.1f} -> {os.getloadavg()[0]:.1f}]"
    )
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return elapsed, proc


def pyradiomics_cli(cases_csv: Path, out: Path, jobs: int, env: dict[str, str]) -> float:
    """Time ``pyradiomics cases.csv --jobs N -p ct.yaml -o out.csv -f csv``."""
    out.unlink(missing_ok=True)
    cmd = [str(BIN / "pyradiomics"), str(cases_csv), "--jobs", str(jobs)]
    cmd += ["-p", str(Preset.CT.path), "-o", str(out), "-f", "csv"]
    return timed(cmd, env)[0]


def oncoflow_extract(store: SiteStore, workers: int, env: dict[str, str]) -> tuple[float, dict]:
    """Time ``oncoflow extract --site bench --store STORE --params ct --workers N --json``."""
    cmd = [str(BIN / "oncoflow"), "extract", "--site", SITE, "--store", store.url]
    cmd += ["--params", "ct", "--workers", str(workers), "--json"]
    elapsed, proc = timed(cmd, env)
    return elapsed, json.loads(proc.stdout)


def max_relative_difference(store: SiteStore, table_key: str, cli_csv: Path) -> float:
    """Largest relative difference between oncoflow's table and the CLI's CSV output."""
    table = store.read_table(table_key).to_pylist()  # a folder of parts
    ours = {(store.path(f"harmonised/{r['series']}/image.nii.gz"), r["roi"]): r for r in table}
    worst = 0.0
    with cli_csv.open() as fh:
        for row in csv.DictReader(fh):
            roi = Path(row["Mask"]).name.removeprefix("mask-").removesuffix(".nii.gz")
            mine = ours[(row["Image"], roi)]
            for name, text in row.items():
                if name in ("Image", "Mask") or name.startswith("diagnostics_"):
                    continue
                ref, got = float(text), mine[name]
                if math.isnan(ref) and math.isnan(got):
                    continue
                worst = max(worst, abs(got - ref) / max(abs(ref), 1e-300))
    return worst


@contextlib.contextmanager
def prefect_server(env: dict[str, str], logfile: Path) -> Iterator[str]:
    """Start ``prefect server start`` on a free port (as a site runs one) and yield its API URL."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with logfile.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"prefect server exited ({proc.returncode}); see {logfile}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise SystemExit("prefect server did not start within 300 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="image size factor")
    parser.add_argument("--jobs", default="1,2", help="pyradiomics --jobs values to try")
    parser.add_argument("--workers", type=int, default=2, help="oncoflow Dask workers")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--rois-per-series",
        type=int,
        choices=sorted(ROI_FRACTIONS),
        default=2,
        help="16 ROIs as 8 series x 2 ROIs, or 4 series x 4 ROIs",
    )
    parser.add_argument(
        "--sharing",
        action="store_true",
        help="also time filter sharing in one process (every ROI alone vs an image's ROIs "
        "together)",
    )
    parser.add_argument(
        "--oncoflow-first", action="store_true", help="time oncoflow before the CLI (order bias)"
    )
    parser.add_argument(
        "--prefect-server",
        action="store_true",
        help="run oncoflow against a running Prefect server (started before timing, as at a "
        "site) instead of a temporary server per command",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="oncoflow-bench-radiomics-"))
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect"),  # own Prefect database, migrated by the warm-up
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    stack = contextlib.ExitStack()
    try:
        if args.prefect_server:
            (work / "prefect").mkdir(parents=True, exist_ok=True)
            env["PREFECT_API_URL"] = stack.enter_context(
                prefect_server(env, work / "prefect-server.log")
            )
        store, cases = build_cohort(work / "store", args.scale, args.rois_per_series)
        cases_csv = write_cases(work / "cases.csv", cases)
        tiny_store, tiny = build_cohort(work / "tiny", 0.2)
        tiny_csv = write_cases(work / "tiny.csv", tiny[:1])
        print(f"{len(cases)} ROIs, images {SIZES[0][0]}..{SIZES[-1][0]} voxels x {args.scale}")
        mode = "running Prefect server" if args.prefect_server else "temporary Prefect server"
        print(f"oncoflow reports to a {mode}")

        # warm-up (not timed): byte-code caches, Prefect database migration
        pyradiomics_cli(tiny_csv, work / "warm.csv", 1, env)
        oncoflow_extract(tiny_store, args.workers, env)

        def run_cli() -> dict[int, float]:
            times = {}
            for jobs in (int(j) for j in args.jobs.split(",")):
                times[jobs] = pyradiomics_cli(cases_csv, work / f"cli-{jobs}.csv", jobs, env)
                print(f"pyradiomics CLI --jobs {jobs}: {times[jobs]:7.1f} s", flush=True)
            return times

        def run_oncoflow() -> tuple[float, dict, float]:
            cold, summary = oncoflow_extract(store, args.workers, env)
            print(f"oncoflow extract --workers {args.workers}: {cold:7.1f} s", flush=True)
            reruns = []
            for _ in range(3):  # short: the median of three
                elapsed, again = oncoflow_extract(store, args.workers, env)
                assert again["parts_computed"] == 0 and again["tables_written"] == []
                reruns.append(elapsed)
            assert summary["counts"] == {"ok": len(cases)}, summary
            print(f"oncoflow fully cached reruns: {', '.join(f'{t:.2f}' for t in reruns)} s")
            return cold, summary, statistics.median(reruns)

        cli_startup = pyradiomics_cli(tiny_csv, work / "tiny-out.csv", 1, env)
        if args.oncoflow_first:
            cold, summary, warm = run_oncoflow()
            cli_times = run_cli()
        else:
            cli_times = run_cli()
            cold, summary, warm = run_oncoflow()
        best_jobs = min(cli_times, key=cli_times.get)
        cli_best = cli_times[best_jobs]
        diff = max_relative_difference(store, summary["table"], work / f"cli-{best_jobs}.csv")

        print()
        print("| run | wall (s) | start-up (s) | work = wall - start-up (s) |")
        print("|---|---|---|---|")
        for jobs, t in sorted(cli_times.items()):
            print(f"| pyradiomics CLI --jobs {jobs} | {t:.1f} | {cli_startup:.1f} | "
                  f"{t - cli_startup:.1f} |")  # fmt: skip
        print(f"| oncoflow extract --workers {args.workers} ({mode}) | {cold:.1f} | {warm:.1f} | "
              f"{cold - warm:.1f} |")  # fmt: skip
        print()
        print(f"start-up: pyradiomics CLI (one tiny case) {cli_startup:.1f} s; "
              f"oncoflow (fully cached rerun, median of 3) {warm:.2f} s")  # fmt: skip
        print(
            f"CPU seconds inside oncoflow's extraction tasks (pyradiomics + I/O): "
            f"{summary['compute_cpu_seconds']:.1f} s"
        )
        print(f"max relative difference oncoflow vs CLI features: {diff:.1e}")
        ratio = cli_best / cold
        work_ratio = (cli_best - cli_startup) / max(cold - warm, 1e-9)
        print(
            f"throughput ratio (baseline: pyradiomics CLI --jobs {best_jobs}, same run, shared "
            f"machine): {ratio:.2f}x end to end (target >= 1.3x), {work_ratio:.2f}x excluding "
            f"start-up (target >= 1.45x)"
        )
        if args.sharing:
            sharing_gain(store)
    finally:
        stack.close()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

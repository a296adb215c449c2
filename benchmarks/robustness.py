"""Benchmark: ``oncoflow robustness`` on the 16-ROI radiomics cohort against ``extract``.

Baseline: ``oncoflow extract --params ct --workers 2`` (cold cache) on the cohort that
``benchmarks/radiomics.py`` builds (8 CT images up to 224x224x112 voxels, 2 ROIs each).
Contender: ``oncoflow robustness --params ct --workers 2`` right after, on the same store: the
``original`` replica comes from extract's cache, the 7 other variants per ROI (erode, dilate,
two sub-voxel shifts, noise, shuffled ROI, random ROI) are computed. Prints both wall times, the
ratio (robustness / extract: the cost of robustness in extract-runs), CPU seconds of each
command's process tree and the load average around each measurement.

Usage::

    uv run python benchmarks/robustness.py [--scale 1.0] [--workers 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
from benchmarks.radiomics import SITE, build_cohort

BIN = Path(sys.executable).parent


def timed(args: list[str]) -> tuple[float, float, float, dict]:
    """Run a command; return wall seconds, children CPU seconds, load average, JSON output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{args[1]} failed: {done.stderr.strip().splitlines()[-1:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, load, json.loads(done.stdout)


def main() -> None:
    """Build the cohort, time extract then robustness, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="image size factor")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oncoflow-robustness-bench-"))
    try:
        _, cases = build_cohort(work / "store", opts.scale)
        common = ["--site", SITE, "--store", str(work / "store"), "--params", "ct"]
        common += ["--workers", str(opts.workers), "--json"]
        oncoflow = str(BIN / "oncoflow")
        print(f"cohort: {len(cases)} ROIs, scale {opts.scale}, workers {opts.workers}")
        e_wall, e_cpu, e_load, _ = timed([oncoflow, "extract", *common])
        print(f"extract (cold):      {e_wall:7.1f} s wall, {e_cpu:7.1f} s CPU, load {e_load:.1f}")
        r_wall, r_cpu, r_load, summary = timed([oncoflow, "robustness", *common])
        print(f"robustness:          {r_wall:7.1f} s wall, {r_cpu:7.1f} s CPU, load {r_load:.1f}")
        extra = summary.get("extra", summary)
        print(
            f"features: {extra.get('features')}, stable (ICC >= 0.75): {extra.get('stable')}, "
            f"variants computed: {extra.get('variants_computed')}"
        )
        print(f"ratio robustness / extract: {r_wall / e_wall:.2f}x wall, {r_cpu / e_cpu:.2f}x CPU")
        print(f"load average after: {os.getloadavg()[0]:.1f} (2 cores, shared machine)")
    finally:
        if opts.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

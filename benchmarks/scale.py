"""Scale: ingest 5,000 and 50,000 instances, an unchanged re-run, a 1 % increment; peak RSS of
every process; deidentify and harmonise grown by 1 %; DuckDB over a 1,000,000-instance catalogue.

Every command runs as ``oncoflow ...`` in a subprocess against one running Prefect server
(``prefect server start``, PREFECT_API_URL exported, as at a site), with ``--workers 2``. While a
command runs, its process tree (the command, the Dask nanny and worker processes) is sampled
every 0.1 s and each process's peak RSS (``VmHWM`` in ``/proc/<pid>/status``, the kernel's own
high-water mark) is kept, by role. Each command's CPU is measured too (its process tree from the
children's resource usage, the Prefect server's from /proc) against the CPU its units took
inside their tasks (the stage summary's ``unit_cpu_seconds``; ingest's batch CPU): the rest is
the orchestration share.

Ingest, for each size N (files: 16x16 CT instances, 100 slices per series, 4 series per
patient, one folder per series, written by ``benchmarks/ingest.py``):

* first ingest into a fresh store;
* unchanged re-run (listing and diff only);
* 1 % increment: N/100 new instances in new series, then ingest again. Its cost is the
  increment's wall time minus the unchanged re-run's (both list the whole source), as a share
  of the first ingest (target <= 10 %);
* before these, the listing, diff and plan of the N files alone in a fresh process: its peak
  RSS growth and its peak of Python-allocated memory (tracemalloc), and that of an in-memory
  list of every file (``list_source``) for comparison; the difference between two sizes over
  the difference in files is the memory per listed file.

Deidentify and harmonise: a cohort of 100 series x 50 slices (5,000 instances) ingested, then
deidentified and harmonised; an unchanged re-run of each; then one more series (1 %) ingested,
deidentified and harmonised. Same cost measure.

Catalogue queries: a catalogue of 1,000,000 instance rows (10,000 series) written in parts
through the same code as ingest's merge, then ``connect_catalog`` (DuckDB views over the parts)
answers a count by modality (target < 1 s) and a series lookup (target < 0.2 s).

Usage::

    uv run python benchmarks/scale.py [--sizes 5000,50000] [--skip-stages] [--skip-queries]
        [--skip-ingest] [--stage-series 100] [--diff-rows 2000000]

``--diff-rows N`` adds the diff alone at archive size: a synthetic listing of N files diffed
with no catalogue and with a catalogue of the same N paths (1 % changed), in a fresh process
(seconds, peak RSS growth).

The machine is shared (2 cores, other work running): every figure is printed with the load
average, and the ratios compare runs made in the same invocation.
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
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.ingest as ingest_bench
from benchmarks.radiomics import prefect_server

BIN = Path(sys.executable).parent
SITE = "bench"


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _role(pid: int) -> str:
    with contextlib.suppress(OSError):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "oncoflow" in cmd and ("ingest" in cmd or "deidentify" in cmd or "harmonise" in cmd):
            return "command"
        if "multiprocessing" in cmd or "spawn" in cmd:
            return "dask-process"
        return cmd.split(" ")[0].rsplit("/", 1)[-1] or "other"
    return "gone"


def _hwm_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM:")


def _status_kib(pid: int | str, field: str) -> int:
    """A memory figure of ``/proc/<pid>/status`` in KiB (``VmHWM:``, ``VmRSS:``), 0 if gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def status(field: str) -> int:
    """A memory figure of this process in KiB."""
    return _status_kib("self", field)


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its waited-for children, from /proc."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _server_pids(port: str) -> list[int]:
    """The Prefect server's processes (``prefect server start ... --port PORT``) and children."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if b"server" in argv and port.encode() in argv:
                    found.append(int(proc.name))
    return sorted({p for pid in found for p in _tree(pid)})


def server_cpu(env: dict[str, str]) -> float:
    """CPU seconds the Prefect server of ``env``'s PREFECT_API_URL has used so far."""
    url = env.get("PREFECT_API_URL", "")
    port = url.rsplit(":", 1)[-1].split("/", 1)[0] if url else ""
    return sum(_cpu_seconds(p) for p in _server_pids(port)) if port else 0.0


def orchestration(summary: dict, unit_cpu: float | None) -> dict:
    """CPU of a command: its process tree, the Prefect server, the units; the share not in units.

    ``unit_cpu`` is the CPU the stage's units took inside their tasks (summed by the stage);
    everything else (flow process: planning, submitting, tables; worker processes outside the
    units: Prefect's task engine, Dask; the Prefect server answering) is orchestration here.
    """
    cpu = summary["_cpu"]
    total = cpu["tree_s"] + cpu["server_s"]
    out = {**cpu, "unit_s": unit_cpu}
    if unit_cpu is not None and total > 0:
        out["orchestration_share"] = round(max(total - unit_cpu, 0.0) / total, 3)
    return out


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, dict, dict[str, float]]:
    """Run an oncoflow command; return wall seconds, its JSON summary and peak RSS (MB) by
    process (``role#n``), sampled while it runs.

    The summary gets ``_cpu``: CPU seconds of the command's process tree (``tree_s``, from the
    children's resource usage, every process of the tree being waited for) and of the Prefect
    server during the run (``server_s``)."""
    import resource

    peaks: dict[int, tuple[str, int]] = {}
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = server_cpu(env)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in _tree(proc.pid):
                hwm = _hwm_kib(pid)
                if hwm:
                    role = peaks.get(pid, (_role(pid), 0))[0]
                    peaks[pid] = (role, max(hwm, peaks.get(pid, ("", 0))[1]))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tree = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cpu = {"tree_s": round(tree, 2), "server_s": round(server_cpu(env) - server_before, 2)}
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.decode()[-3000:]}")
    by_role: dict[str, float] = {}
    for role, kib in sorted(peaks.values(), key=lambda x: (x[0], -x[1])):
        n = sum(1 for r in by_role if r.startswith(role + "#"))
        by_role[f"{role}#{n + 1}"] = round(kib / 1024, 1)
    name = " ".join(cmd[1:2])
    print(f"  [{name}: {wall:.1f} s wall, load {load:.1f} -> {os.getloadavg()[0]:.1f}, "
          f"peak RSS MB {by_role}]", flush=True)  # fmt: skip
    return wall, {**json.loads(out), "_cpu": cpu}, by_role


def oncoflow(stage: str, *args: str) -> list[str]:
    """``oncoflow STAGE ARGS --workers 2 --json``."""
    return [str(BIN / "oncoflow"), stage, *args, "--workers", "2", "--json"]


def write_more(source: Path, first_series: int, n: int, slices: int) -> None:
    """Write ``n`` more instances as new series (numbered from ``first_series``) and patients."""
    base = ingest_bench.template()
    import copy

    from pydicom.uid import generate_uid

    series_uid = study_uid = ""
    for i in range(n):
        slice_index = i % slices
        series_index = first_series + i // slices
        if slice_index == 0:
            series_uid = study_uid = generate_uid()
        ds = copy.copy(base)
        ds.file_meta = copy.copy(base.file_meta)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID = f"Q{series_index:05d}"
        ds.InstanceNumber = slice_index + 1
        ds.ImagePositionPatient = [-20.0, -20.0, 2.5 * slice_index]
        ds.SliceLocation = 2.5 * slice_index
        path = source / f"Q{series_index:05d}" / f"IM{slice_index:04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)


def listing_memory(source: Path, store: Path) -> dict:
    """Memory of the listing, diff and plan of SOURCE in a fresh process (a first ingest's plan:
    every file), without the flow: see :func:`_listing_memory_child`."""
    cmd = [sys.executable, __file__, "--listing-memory", str(source), str(store)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    shutil.rmtree(store, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _listing_memory_child(source: str, store_url: str) -> None:
    """Print the peak RSS growth (``VmHWM`` over the ``VmRSS`` after imports, MB) and the peak
    of Python-allocated memory (tracemalloc, bytes) of write_listing + diff_catalog, and the
    tracemalloc peak of ``list_source`` (every file as a ``ListedFile`` in one list, what the
    listing held before it was streamed)."""
    import tracemalloc

    from tasks.dicom.catalog import LISTING, diff_catalog, remove_parts
    from tasks.dicom.listing import list_source, write_listing
    from tasks.store import SiteStore

    store = SiteStore(store_url, SITE)

    def stream() -> int:
        write_listing(source, store, LISTING)
        listed = diff_catalog(store, LISTING).listed
        remove_parts(store)
        return listed

    rss = status("VmRSS:")
    listed = stream()
    hwm = status("VmHWM:")
    tracemalloc.start()
    stream()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    whole = len(list_source(source))
    listed_whole = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert whole == listed
    print(json.dumps({
        "files": listed, "rss_growth_mb": round((hwm - rss) / 1024, 1),
        "traced_peak_bytes": traced, "list_source_traced_peak_bytes": listed_whole,
    }))  # fmt: skip


def diff_scale(rows: int, work: Path) -> dict:
    """The diff alone at archive size, in a fresh process: see :func:`_diff_scale_child`."""
    cmd = [sys.executable, __file__, "--diff-child", str(rows), str(work / "diff-scale")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    shutil.rmtree(work / "diff-scale", ignore_errors=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"diff of a listing of {rows} files: {figures}", flush=True)
    return figures


def _diff_scale_child(rows: int, folder: str) -> None:
    """Write a synthetic listing of ``rows`` files (the benchmark's folder layout, in reverse
    order) and a catalogue of the same paths (1 % with another size), then time the diff
    against no catalogue (a first ingest: every file planned) and against the catalogue (a
    re-run: 1 % changed); print the seconds and each diff's peak RSS growth over the process
    before it (MB; the kernel's high-water mark is reset before each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.dicom.catalog import LISTING, diff_files, remove_parts
    from tasks.dicom.listing import LISTING_SCHEMA
    from tasks.store import SiteStore

    store = SiteStore(folder, SITE)
    catalogue = str(Path(folder) / "catalogue.parquet")
    with store.open_write(LISTING) as fh, pq.ParquetWriter(fh, LISTING_SCHEMA) as listing:
        cat_schema = LISTING_SCHEMA.append(pa.field("status", pa.string()))
        with pq.ParquetWriter(catalogue, cat_schema) as cat:
            for end in range(rows, 0, -100_000):
                idx = range(end - 1, max(0, end - 100_000) - 1, -1)
                paths = [f"P{i // 400:05d}/S{i // 100:06d}/IM{i % 100:04d}.dcm" for i in idx]
                tokens = ["1700000000.123456"] * len(paths)
                listing.write_table(pa.table([paths, [1234] * len(paths), tokens], LISTING_SCHEMA))
                sizes = [1234 + (i % 100 == 0) for i in idx]
                cat.write_table(pa.table([paths, sizes, tokens, ["ok"] * len(paths)], cat_schema))

    figures = {"rows": rows}
    for name, uris in (("first", []), ("rerun", [catalogue])):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        rss, start = status("VmRSS:"), time.perf_counter()
        diff = diff_files(store, LISTING, uris)
        figures[f"{name}_s"] = round(time.perf_counter() - start, 2)
        figures[f"{name}_rss_growth_mb"] = round((status("VmHWM:") - rss) / 1024, 1)
        figures[f"{name}_planned"] = diff.to_parse
    remove_parts(store)
    print(json.dumps(figures))


def ingest_scale(n: int, work: Path, env: dict[str, str]) -> dict:
    """First ingest, unchanged re-run and 1 % increment of ``n`` instances."""
    source, store = work / f"src-{n}", work / f"store-{n}"
    t = time.perf_counter()
    ingest_bench.write_instances(source, n)
    print(f"{n} instances written in {time.perf_counter() - t:.0f} s", flush=True)
    listing = listing_memory(source, work / f"listing-{n}")
    print(f"listing + diff + plan of {n} files in one process: {listing}", flush=True)
    args = ["ingest", str(source), "--site", SITE, "--store", str(store)]
    first, s1, rss1 = run(oncoflow(*args), env)
    again, s2, _ = run(oncoflow(*args), env)
    assert s2["files_parsed"] == 0 and s2["tables_written"] == []
    write_more(source, 90_000, n // 100, ingest_bench.SLICES_PER_SERIES)
    inc, s3, rss3 = run(oncoflow(*args), env)
    assert s3["files_parsed"] == n // 100, s3
    cost = (inc - again) / first
    share = orchestration(s1, s1.get("timings", {}).get("batch_cpu_seconds_sum"))
    print(
        f"ingest {n}: first {first:.1f} s, unchanged {again:.1f} s, +1 % {inc:.1f} s -> "
        f"increment cost {cost:.1%} of the first ingest (target <= 10 %); merge "
        f"{s1['timings'].get('merge_seconds')} s first, "
        f"{s3['timings'].get('merge_seconds')} s increment; first ingest CPU {share}",
        flush=True,
    )
    shutil.rmtree(source, ignore_errors=True)
    return {
        "instances": n,
        "first_s": round(first, 1),
        "unchanged_s": round(again, 1),
        "increment_s": round(inc, 1),
        "increment_cost_of_first": round(cost, 3),
        "merge_s_first": s1["timings"].get("merge_seconds"),
        "merge_s_increment": s3["timings"].get("merge_seconds"),
        "peak_rss_mb_first": rss1,
        "peak_rss_mb_increment": rss3,
        "cpu_first": share,
        "listing_memory": listing,
    }


def stages_scale(work: Path, env: dict[str, str], series: int = 100) -> dict:
    """Deidentify and harmonise: first run, unchanged re-run, one more series (1 %)."""
    slices = 50
    n = series * slices
    source, store = work / "src-stages", work / "store-stages"
    old = ingest_bench.SLICES_PER_SERIES
    ingest_bench.SLICES_PER_SERIES = slices
    try:
        ingest_bench.write_instances(source, n)
    finally:
        ingest_bench.SLICES_PER_SERIES = old
    site = ["--site", SITE, "--store", str(store)]
    run(oncoflow("ingest", str(source), *site), env)
    out: dict[str, dict] = {}
    times: dict[str, list[float]] = {"deidentify": [], "harmonise": []}
    shares: dict[str, dict] = {}
    for stage in times:
        wall, summary, _ = run(oncoflow(stage, *site), env)
        times[stage].append(wall)
        shares[stage] = orchestration(summary, summary.get("unit_cpu_seconds"))
        wall, summary, _ = run(oncoflow(stage, *site), env)
        times[stage].append(wall)
        assert summary["computed"] == 0, summary
    write_more(source, 95_000, slices, slices)
    run(oncoflow("ingest", str(source), *site), env)
    for stage in times:
        wall, summary, rss = run(oncoflow(stage, *site), env)
        times[stage].append(wall)
        first, again, inc = times[stage]
        cost = (inc - again) / first
        print(
            f"{stage} {n // slices} series: first {first:.1f} s, unchanged {again:.1f} s, "
            f"+1 series (1 %) {inc:.1f} s -> increment cost {cost:.1%} of the first run; "
            f"first run CPU {shares[stage]}",
            flush=True,
        )
        out[stage] = {
            "series": n // slices,
            "first_s": round(first, 1),
            "unchanged_s": round(again, 1),
            "increment_s": round(inc, 1),
            "increment_cost_of_first": round(cost, 3),
            "peak_rss_mb_increment": rss,
            "counts_increment": summary.get("counts"),
            "computed_increment": summary.get("computed"),
            "cpu_first": shares[stage],
        }
    return out


def catalogue_queries(work: Path, instances: int = 1_000_000) -> dict:
    """Write a catalogue of ``instances`` rows in parts; time DuckDB queries over it."""
    import pyarrow as pa

    from tasks.dicom.catalog import connect_catalog, instance_parts, series_parts
    from tasks.dicom.headers import INSTANCE_SCHEMA
    from tasks.dicom.series import SERIES_SCHEMA
    from tasks.store import SiteStore
    from tasks.table_parts import PART_ROWS

    store = SiteStore(str(work / "store-1m"), SITE)
    per_series = 100
    modalities = ["CT", "MR", "PT", "CR", "US"]

    def instance_tables() -> Iterator[pa.Table]:
        for start in range(0, instances, PART_ROWS):
            idx = range(start, min(start + PART_ROWS, instances))
            cols = {
                "path": [f"P{i // 400:05d}/S{i // per_series:06d}/IM{i:07d}.dcm" for i in idx],
                "series_instance_uid": [f"2.25.{i // per_series}" for i in idx],
                "sop_instance_uid": [f"2.25.9{i}" for i in idx],
                "modality": [modalities[(i // per_series) % 5] for i in idx],
                "status": ["ok"] * len(idx),
                "size": [1000] * len(idx),
                "mtime": ["0"] * len(idx),
                "reason": [""] * len(idx),
                "detail": [""] * len(idx),
            }
            arrays = [
                pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(len(idx), f.type)
                for f in INSTANCE_SCHEMA
            ]
            yield pa.Table.from_arrays(arrays, schema=INSTANCE_SCHEMA)

    t = time.perf_counter()
    inst = instance_parts(store)
    inst.replace(inst.chunks(instance_tables()), [])
    n_series = instances // per_series
    series_cols = {
        "series_key": [f"2.25.{s}" for s in range(n_series)],
        "series_instance_uid": [f"2.25.{s}" for s in range(n_series)],
        "modality": [modalities[s % 5] for s in range(n_series)],
        "status": ["ok"] * n_series,
        "n_instances": [per_series] * n_series,
    }
    arrays = [
        pa.array(series_cols[f.name], f.type)
        if f.name in series_cols
        else pa.nulls(n_series, f.type)
        for f in SERIES_SCHEMA
    ]
    ser = series_parts(store)
    ser.replace(ser.chunks([pa.Table.from_arrays(arrays, schema=SERIES_SCHEMA)]), [])
    print(f"catalogue of {instances} instances in {len(inst.parts())} parts written in "
          f"{time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip

    con = connect_catalog(store)
    timings: dict[str, float] = {}
    queries = {
        "count_by_modality": (
            "SELECT modality, count(*) FROM instances GROUP BY modality ORDER BY modality",
            [],
        ),
        "series_lookup": ("SELECT * FROM series WHERE series_instance_uid = ?", ["2.25.4321"]),
        "instances_of_a_series": (
            "SELECT path FROM instances WHERE series_instance_uid = ?",
            ["2.25.4321"],
        ),
    }
    for name, (sql, args) in queries.items():
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            result = con.execute(sql, args).fetchall()
            runs.append(time.perf_counter() - t)
        timings[name] = round(runs[0], 3)
        timings[name + "_best_of_3"] = round(min(runs), 3)
        print(f"  {name}: first {runs[0]:.3f} s, best of 3 {min(runs):.3f} s, "
              f"{len(result)} rows", flush=True)  # fmt: skip
    con.close()
    return {"instances": instances, "parts": len(inst.parts()), "seconds": timings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,50000")
    parser.add_argument("--skip-stages", action="store_true")
    parser.add_argument("--skip-queries", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--stage-series", type=int, default=100, help="series (50 slices each)")
    parser.add_argument(
        "--diff-rows", type=int, default=0, help="also diff a synthetic listing of this many files"
    )
    parser.add_argument("--listing-memory", nargs=2, help=argparse.SUPPRESS)  # the children
    parser.add_argument("--diff-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.listing_memory:
        _listing_memory_child(*args.listing_memory)
        return 0
    if args.diff_child:
        _diff_scale_child(int(args.diff_child[0]), args.diff_child[1])
        return 0
    work = Path(tempfile.mkdtemp(prefix="oncoflow-bench-scale-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect")}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.setdefault("ONCOFLOW_SITE_SECRET", "scale-benchmark-secret-0123456789abcdef")
    env.pop("PREFECT_API_URL", None)
    (work / "prefect").mkdir()
    figures: dict = {"load_average_start": round(os.getloadavg()[0], 1)}
    try:
        if args.diff_rows:
            figures["diff"] = diff_scale(args.diff_rows, work)
        if not args.skip_queries:
            figures["catalogue_queries"] = catalogue_queries(work)
        with prefect_server(env, work / "prefect-server.log") as url:
            env["PREFECT_API_URL"] = url
            if not args.skip_ingest:
                figures["ingest"] = [
                    ingest_scale(int(n), work, env) for n in args.sizes.split(",") if n
                ]
                if len(figures["ingest"]) >= 2:
                    small, large = figures["ingest"][0], figures["ingest"][-1]
                    growth = {
                        role: round(mb - small["peak_rss_mb_first"].get(role, 0.0), 1)
                        for role, mb in large["peak_rss_mb_first"].items()
                    }
                    figures["peak_rss_growth_mb"] = growth
                    print(f"peak RSS growth {small['instances']} -> {large['instances']} "
                          f"instances, MB by process: {growth} (target <= 150)")  # fmt: skip
                    figures["listing_bytes_per_file"] = per_file = {
                        key: round(
                            (large["listing_memory"][key] - small["listing_memory"][key])
                            / (large["instances"] - small["instances"]), 1,
                        )
                        for key in ("traced_peak_bytes", "list_source_traced_peak_bytes")
                    }  # fmt: skip
                    print(f"listing + diff + plan, Python memory per listed file: {per_file}")
            if not args.skip_stages:
                figures["stages"] = stages_scale(work, env, args.stage_series)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures["load_average_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

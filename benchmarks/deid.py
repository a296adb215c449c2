"""De-identification throughput against a plain pydicom read + write loop, in the same run.

Both loops run over the same in-memory files (a synthetic cohort by default): the baseline
parses each file with ``pydicom.dcmread`` and writes it back with ``save_as``; the measured loop
runs :func:`tasks.deid.series.deidentify_instance` (read, burned-in check, full PS3.15 walk of
every nested element, UID remapping, date shifting, descriptor cleaning, write; the byte-stream
rewriter where it applies, else pydicom) and reads the result back where the per-series task
does. Files that the profile quarantines (burned-in screenshots) and files the baseline cannot
read and write (no file meta...) are left out of both loops. Prints files/s of both and the
ratio (target: at least 0.7x the baseline), by wall clock and by CPU time (the CPU-time ratio
is the one to read on a shared, loaded machine), and how many files took the pydicom path.

Usage::

    uv run python benchmarks/deid.py [--source DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from pydicom import dcmread

from tasks.deid.dataset import DeidContext, quiet_pydicom
from tasks.deid.profile import DeidOptions
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.rewrite import rewrite_instance
from tasks.deid.series import deidentify_instance

KEYS = SiteKeys.derive(b"benchmark-secret-0123456789-abcdefghijkl", "site-a")


def baseline(files: list[tuple[str, bytes]]) -> None:
    """Plain pydicom: read every file and write it back."""
    for _series, data in files:
        ds = dcmread(io.BytesIO(data))
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)


def deidentify(files: list[tuple[str, bytes]]) -> None:
    """De-identify every file as the per-series task does.

    One context per series; the de-identified dataset is read back for the first instance of
    each series (series row) and for instances that may reference other series (SEG, RTSTRUCT).
    """
    contexts: dict[str, DeidContext] = {}
    for series, data in files:
        ctx = contexts.get(series)
        first = ctx is None
        if ctx is None:
            ctx = contexts[series] = DeidContext(
                keys=KEYS, options=DeidOptions(), patient_id=series
            )
        result = deidentify_instance(data, ctx)
        assert result.reason is None and result.data
        if first or result.references:
            assert result.dataset is not None


def load(source: Path) -> tuple[list[tuple[str, bytes]], int]:
    """Read (series UID, bytes) of the files under ``source`` that both loops can process.

    Returns the files and how many of them the byte-stream rewriter does not handle.
    """
    files = []
    slow = 0
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        ctx = DeidContext(keys=KEYS, options=DeidOptions(), patient_id="x")
        result = deidentify_instance(data, ctx)
        if result.reason is not None:
            continue
        try:
            baseline([("", data)])
        except Exception:  # the baseline cannot read or write it (no file meta...)
            continue
        try:
            with quiet_pydicom():
                rewrite_instance(
                    data, DeidContext(keys=KEYS, options=DeidOptions(), patient_id="x")
                )
        except Exception:
            slow += 1
        series = str(dcmread(io.BytesIO(data), force=True).get("SeriesInstanceUID", path))
        files.append((series, data))
    return sorted(files, key=lambda f: f[0]), slow


def measure(fn, files: list[tuple[str, bytes]]) -> tuple[float, float]:
    """Wall-clock (``perf_counter``) and CPU (``process_time``) seconds of one pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(files)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    files: list[tuple[str, bytes]], rounds: int
) -> dict[str, list[tuple[float, float]]]:
    """Alternate baseline and de-identification passes, so machine load affects both alike."""
    samples: dict[str, list[tuple[float, float]]] = {"baseline": [], "deid": []}
    for _ in range(rounds):
        samples["baseline"].append(measure(baseline, files))
        samples["deid"].append(measure(deidentify, files))
    return samples


def main() -> None:
    """Run both loops alternately and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="Folder of DICOM files (default: synthetic)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if source is None:
            from tasks.synthetic import generate_cohort

            generate_cohort(Path(tmp) / "cohort", sites=1, patients=2, seed=7)
            source = Path(tmp) / "cohort" / "site-a"
        files, slow = load(source)
    size = sum(len(f) for _, f in files) / 1e6
    samples = interleaved(files, args.rounds)
    print(
        f"files: {len(files)} ({size:.1f} MB, {slow} through the pydicom path), "
        f"rounds: {args.rounds} (median, interleaved)"
    )
    for label, index in (("wall clock", 0), ("CPU time", 1)):
        base = statistics.median(s[index] for s in samples["baseline"])
        deid = statistics.median(s[index] for s in samples["deid"])
        base_rate, deid_rate = len(files) / base, len(files) / deid
        print(
            f"{label:>10}: pydicom read+write {base_rate:7.1f} files/s, "
            f"de-identification {deid_rate:7.1f} files/s, "
            f"ratio {deid_rate / base_rate:.2f}x (target >= 0.7x)"
        )


if __name__ == "__main__":
    main()

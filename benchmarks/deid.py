"""De-identification throughput against a plain pydicom read + write loop, in the same run.

Both loops run over the same in-memory files (a synthetic cohort by default): the baseline
parses each file with ``pydicom.dcmread`` and writes it back with ``save_as``; the measured loop
runs :func:`tasks.deid.series.deidentify_instance` (read, burned-in check, full PS3.15 walk of
every nested element, UID remapping, date shifting, descriptor cleaning, write). Files that the
profile quarantines (burned-in screenshots) are left out of both loops. Prints files/s of both
and the ratio (target: at least 0.7x the baseline), by wall clock and by CPU time (the
CPU-time ratio is the one to read on a shared, loaded machine).

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

from tasks.deid.dataset import DeidContext
from tasks.deid.profile import DeidOptions
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.series import deidentify_instance

KEYS = SiteKeys.derive(b"benchmark-secret-0123456789-abcdefghijkl", "site-a")


def baseline(files: list[tuple[str, bytes]]) -> None:
    """Plain pydicom: read every file and write it back."""
    for _series, data in files:
        ds = dcmread(io.BytesIO(data))
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)


def deidentify(files: list[tuple[str, bytes]]) -> None:
    """De-identify every file, with one context per series as the per-series task does."""
    contexts: dict[str, DeidContext] = {}
    for series, data in files:
        ctx = contexts.get(series)
        if ctx is None:
            ctx = contexts[series] = DeidContext(
                keys=KEYS, options=DeidOptions(), patient_id=series
            )
        result = deidentify_instance(data, ctx)
        assert result.dataset is not None


def load(source: Path) -> list[tuple[str, bytes]]:
    """Read (series UID, bytes) of the files under ``source`` the profile does not quarantine."""
    files = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        ctx = DeidContext(keys=KEYS, options=DeidOptions(), patient_id="x")
        result = deidentify_instance(data, ctx)
        if result.dataset is not None:
            series = str(dcmread(io.BytesIO(data), force=True).get("SeriesInstanceUID", path))
            files.append((series, data))
    return sorted(files, key=lambda f: f[0])


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
        files = load(source)
    size = sum(len(f) for _, f in files) / 1e6
    samples = interleaved(files, args.rounds)
    print(f"files: {len(files)} ({size:.1f} MB), rounds: {args.rounds} (median, interleaved)")
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

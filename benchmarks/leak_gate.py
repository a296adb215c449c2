"""Leak gate throughput on de-identified files, against a plain pydicom read of the same files.

The files are pydicom's test files (and pydicom-data's when installed) de-identified by the
engine, as the publish gate sees them. oncoflow: ``scan_bytes`` with a catalogue matcher of
2,000 UIDs, names in four scripts and dates (every element, binary values in every character
set, bytes after the pixel data). Baseline: ``dcmread`` of the same bytes and a walk over every
element (values converted). CPU time (``time.process_time``), median of ``--rounds``; the ratio
is baseline / gate (higher is better).

    uv run python benchmarks/leak_gate.py --rounds 3
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

from pydicom import dcmread
from pydicom.data import get_testdata_files

from tasks.deid.dataset import DeidContext, deidentify_dataset, encode_dataset, quiet_pydicom
from tasks.deid.profile import DeidOptions
from tasks.deid.pseudonyms import SiteKeys
from tasks.deid.scan_phi import IdentifierMatcher, scan_bytes

KEYS = SiteKeys.derive(b"leak-gate-benchmark-secret-0123456789abcdef", "site-b")
IDENTIFIERS = [
    "Doe^John",
    "Müller^Jürgen",
    "Παπαδόπουλος^Γεώργιος",
    "Иванова^Йорданка",
    "MRN-48213977",
    "19650304",
    "20230517",
    *(f"1.2.826.0.1.3680043.10.{i}" for i in range(2000)),
]


def deidentified_files() -> list[bytes]:
    out = []
    for path in get_testdata_files("*.dcm"):
        try:
            with quiet_pydicom():
                ds = dcmread(path, force=True)
                ds.decode()
                ctx = DeidContext(
                    keys=KEYS, options=DeidOptions(), patient_id=str(ds.get("PatientID", ""))
                )
                out.append(encode_dataset(deidentify_dataset(ds, ctx)))
        except Exception:  # quarantined by the engine: not published, not gated
            continue
    return out


def baseline(files: list[bytes]) -> float:
    start = time.process_time()
    with quiet_pydicom():
        for data in files:
            ds = dcmread(io.BytesIO(data), force=True)
            for elem in ds.iterall():
                _ = elem.value
    return time.process_time() - start


def gate(files: list[bytes], matcher: IdentifierMatcher) -> float:
    start = time.process_time()
    for data in files:
        scan_bytes("a.dcm", data, matcher)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    files = deidentified_files()
    matcher = IdentifierMatcher(IDENTIFIERS)
    per_file = []
    for data in files:
        start = time.process_time()
        scan_bytes("a.dcm", data, matcher)
        per_file.append(time.process_time() - start)
    base, ours = [], []
    for _ in range(args.rounds):
        base.append(baseline(files))
        ours.append(gate(files, matcher))
    b, g = statistics.median(base), statistics.median(ours)
    size = sum(len(d) for d in files) / 1e6
    print(f"files: {len(files)} de-identified, {size:.1f} MB; load {os.getloadavg()[0]:.2f}")
    print(f"baseline (dcmread + every element): {b:.2f} s CPU")
    print(f"leak gate (scan_bytes):             {g:.2f} s CPU")
    print(f"gate per file: median {1000 * statistics.median(per_file):.1f} ms, "
          f"max {1000 * max(per_file):.0f} ms")  # fmt: skip
    print(f"ratio baseline/gate: {b / g:.2f}")


if __name__ == "__main__":
    main()

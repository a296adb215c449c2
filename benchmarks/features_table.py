"""Features table in parts: a run in which nothing, 1 % of the ROIs or 1 % new ROIs changed.

Rows are synthetic (``--rows`` ROIs of 1,130 float features each, as the ``ct`` preset gives),
written through the extract stage's writer (:func:`tasks.radiomics.table_writer.
write_features_table`) into a local store. Measured in one invocation:

* first write of the table;
* an unchanged run: the comparison of the rows with the table (nothing built, nothing written);
* 1 % of the ROIs changed (new masks, new values; scattered over the table);
* 1 % new ROIs (new series);
* the baseline: the whole table built and serialised as the extract stage did before parts.

Usage::

    uv run python benchmarks/features_table.py [--rows 5000]

The machine may be shared: the load average is printed, and the ratios compare runs of the same
invocation.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder comes first on sys.path and this file would shadow pyradiomics'
# own ``radiomics`` package
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import os
import random
import tempfile
import time

from tasks.radiomics.extract import RoiUnit
from tasks.radiomics.params import validate_params
from tasks.radiomics.table import FeatureRow, build_features_table, features_key, table_metadata
from tasks.radiomics.table_writer import plan_features, write_features_table
from tasks.store import SiteStore, table_to_parquet_bytes

PARAMS = validate_params({"setting": {"binWidth": 25}, "imageType": {"Original": {}}})
FEATURES = [f"original_firstorder_F{j:04d}" for j in range(1130)]


def feature_row(i: int, mask: str = "m") -> FeatureRow:
    """One ``ok`` row of ROI ``i`` (its mask hash and values change with ``mask``)."""
    series = f"2.25.{10**6 + i}"
    unit = RoiUnit(
        series=series,
        study="2.25.9",
        patient=f"p-{i // 4}",
        modality="CT",
        roi="gtv",
        image=f"harmonised/{series}/image.nii.gz",
        mask=f"harmonised/{series}/mask-gtv.nii.gz",
        image_sha256=f"{i:064x}",
        mask_sha256=mask * 64,
        voxels=1000,
    )
    rnd = random.Random(f"{i}-{mask}")
    return FeatureRow(unit, "ok", features={name: rnd.random() for name in FEATURES})


def main(argv: list[str] | None = None) -> None:
    """Run the measurements and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000, help="ROIs in the table.")
    args = parser.parse_args(argv)
    n = args.rows
    rows = [feature_row(i) for i in range(n)]
    metadata = table_metadata(PARAMS)
    key = features_key(PARAMS.params_hash())
    print(f"{n} ROIs x {len(FEATURES)} features; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        store = SiteStore(tmp, "site-a")

        def timed(label: str, new_rows: list[FeatureRow]) -> float:
            before = store.table_files(key) if store.exists(key) else {}
            start = time.perf_counter()
            written = write_features_table(store, "site-a", new_rows, PARAMS, metadata)
            elapsed = time.perf_counter() - start
            after = store.table_files(key)
            print(
                f"{label}: {elapsed:.2f} s; parts written {written.added}, replaced "
                f"{written.removed}, untouched {len(set(before) & set(after))} of {len(after)}"
            )
            return elapsed

        timed("first write", rows)
        start = time.perf_counter()
        plan = plan_features(store, "site-a", rows, PARAMS, metadata)
        print(f"unchanged run (compare only): {time.perf_counter() - start:.3f} s, "
              f"nothing to write: {plan.unchanged}")  # fmt: skip
        changed = set(random.Random(1).sample(range(n), n // 100))
        rows = [feature_row(i, "n") if i in changed else r for i, r in enumerate(rows)]
        scattered = timed(f"1 % changed ({len(changed)} ROIs, scattered)", rows)
        rows = rows + [feature_row(n + i) for i in range(n // 100)]
        new = timed(f"1 % new ROIs ({n // 100})", rows)
        start = time.perf_counter()
        table, meta = build_features_table("site-a", rows, PARAMS)
        table_to_parquet_bytes(table, meta)
        whole = time.perf_counter() - start
        print(f"baseline, the whole table built and serialised (before parts): {whole:.2f} s")
        print(f"ratios to the baseline: 1 % changed {scattered / whole:.2f}, "
              f"1 % new {new / whole:.2f}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()

r"""From cases CSVs to a plot of one radiomics feature by site, reading the outputs with DuckDB.

Each site runs the pipeline on its own cases CSV (pyradiomics' batch format) into its own store
folder; the features tables of all sites are then read with one DuckDB query and one feature is
drawn per site and ROI. Without arguments the NIfTI/NRRD test cohort (pyradiomics' sample cases,
``tests/data/volumes``) is split into two sites, MR (brain, breast) and CT (lung)::

    uv run python examples/feature_by_site.py --out work/
    uv run python examples/feature_by_site.py --out work/ --site a=site-a.csv --site b=site-b.csv \\
        --params deployments/radiomics/ct.yaml --feature original_firstorder_Mean

Needs ``ONCOFLOW_SITE_SECRET`` (the pseudonymisation key); the example sets a throw-away one when
it is unset. Writes ``<out>/store/``, ``<out>/features.csv`` and ``<out>/feature-by-site.png``.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "volumes" / "cases.csv"
#: Original image, every feature class, IBSI-style bin width: small and quick.
DEFAULT_PARAMS = """\
setting: {binWidth: 25, label: 1}
imageType: {Original: {}}
featureClass: {shape: [], firstorder: [], glcm: [], glrlm: [], glszm: [], gldm: []}
"""


def split_sample(out: Path) -> dict[str, Path]:
    """Split the sample cases CSV into two sites by modality (absolute paths to the images)."""
    with open(SAMPLE, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    sites: dict[str, Path] = {}
    for site, modality in (("site-mr", "MR"), ("site-ct", "CT")):
        path = out / f"{site}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                if row["Modality"] == modality:
                    for column in ("Image", "Mask"):
                        row[column] = str(SAMPLE.parent / row[column])
                    writer.writerow(row)
        sites[site] = path
    return sites


def run_site(site: str, cases: Path, store: Path, params: Path) -> None:
    """``oncoflow run CASES --site SITE --store STORE --params PARAMS`` (all four stages)."""
    command = ["oncoflow", "run", str(cases), "--site", site, "--store", str(store),
               "--params", str(params), "--workers", "1"]  # fmt: skip
    subprocess.run(command, check=True)


def feature_by_site(store: Path, params: Path, feature: str):
    """Read one feature of every site's features table with DuckDB (a pandas DataFrame).

    The table of a parameter file is ``<store>/<site>/features/<params-hash>.parquet``, a
    folder of Parquet parts; rows with ``status = 'ok'`` carry features.
    """
    import duckdb

    from tasks.radiomics.params import load_params

    params_hash = load_params(str(params))[0].params_hash()
    tables = sorted(store.glob(f"*/features/{params_hash}.parquet"))
    if not tables:
        raise SystemExit(f"no features table for {params} under {store}")
    query = f"""
        SELECT site, modality, roi, "{feature}" AS value
        FROM read_parquet($tables, union_by_name = true)
        WHERE status = 'ok'
        ORDER BY site, roi
    """
    parts = [f"{t}/*.parquet" if t.is_dir() else str(t) for t in tables]
    return duckdb.execute(query, {"tables": parts}).df()


def plot(frame, feature: str, target: Path) -> None:
    """One point per (series, ROI), one column per site, coloured by ROI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted(frame["site"].unique())
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for roi, group in frame.groupby("roi"):
        x = [sites.index(s) for s in group["site"]]
        ax.scatter(x, group["value"], label=roi, alpha=0.8)
    ax.set_xticks(range(len(sites)), sites)
    ax.set_ylabel(feature)
    ax.set_title("one point per (series, ROI)")
    ax.legend(fontsize="small", title="ROI")
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run the sites, query their features with DuckDB, write the CSV and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Working folder.")
    parser.add_argument("--site", action="append", default=[], help="SITE=cases.csv (repeat).")
    parser.add_argument("--params", type=Path, help="pyradiomics parameter file.")
    parser.add_argument("--feature", default="original_shape_VoxelVolume")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ONCOFLOW_SITE_SECRET", "example-only-secret-0123456789abcdefghij")
    params = args.params or args.out / "params.yaml"
    if args.params is None:
        params.write_text(DEFAULT_PARAMS)
    sites = dict(s.split("=", 1) for s in args.site) if args.site else split_sample(args.out)
    store = args.out / "store"
    for site, cases in sorted(sites.items()):
        run_site(site, Path(cases), store, params)
    frame = feature_by_site(store, params, args.feature)
    frame.to_csv(args.out / "features.csv", index=False)
    plot(frame, args.feature, args.out / "feature-by-site.png")
    print(frame.to_string(index=False))
    print(f"wrote {args.out / 'feature-by-site.png'}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

"""Make the report screenshots in docs/: a site's report.html and the hub's, on synthetic data.

Builds, in one process and without Prefect, three synthetic CT sites (harmonised sample images
with QC pictures, one series harmonisation quarantined with its de-identified DICOM, real
pyradiomics features on the Original image, the robustness replicas and controls of one site),
renders the reports with ``tasks/cohort/report.py`` and ``tasks/federation/report.py``, and
screenshots them with headless Chromium.

Usage::

    uv run python docs/report_example.py [--out docs] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.cohort.report import site_report  # noqa: E402
from tasks.federation.combat import cohort_summary, estimate  # noqa: E402
from tasks.federation.report import combat_matrices  # noqa: E402
from tasks.harmonise.masks import Mask  # noqa: E402
from tasks.harmonise.qc import qc_png  # noqa: E402
from tasks.radiomics.cache import read_parts  # noqa: E402
from tasks.radiomics.extract import extract_roi, plan_units  # noqa: E402
from tasks.radiomics.params import validate_params  # noqa: E402
from tasks.radiomics.robustness import robustness_key, robustness_table, robustness_unit  # noqa: E402
from tasks.radiomics.samples import (  # noqa: E402
    HARMONISED_SCHEMA,
    SampleRoi,
    SampleSeries,
    make_image,
    make_mask,
    series_key,
    write_harmonised_sample,
)
from tasks.radiomics.table import FeatureRow, build_features_table  # noqa: E402
from tasks.store import DEID_SERIES, HARMONISED_SERIES, SiteStore  # noqa: E402

PARAMS = validate_params(
    {
        "setting": {"binWidth": 25},
        "featureClass": {
            c: [] for c in ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
        },
    }
)
SITES = {"site-a": (0, 40.0, 1.0), "site-b": (100, 90.0, 1.4), "site-c": (200, 10.0, 0.8)}


def build_site(root: Path, site: str, offset: int, mean: float, scale: float) -> tuple:
    """Harmonised images, QC pictures, features (and robustness for site-a) of one site."""
    from tests.dicom_factory import Geometry, image_series, to_bytes

    store = SiteStore(str(root), site)
    specs = [
        SampleSeries(
            series_key(offset + i),
            "CT",
            size=(48, 48, 20),
            rois=(SampleRoi("gtv", 8.0 + 1.5 * (i % 5)),),
            seed=offset + i,
        )
        for i in range(10)
    ]
    table = write_harmonised_sample(store, specs)
    for spec in specs:
        image = make_image(spec)
        store.write_bytes(
            f"harmonised/{spec.series}/qc.png",
            qc_png(image, [Mask("gtv", make_mask(spec, spec.rois[0], image))]),
        )
    geometry = Geometry(size=(48, 48, 12), spacing=(1.0, 1.0, 2.0), origin=(0, 0, 0))
    z, y, x = np.mgrid[0:12, 0:48, 0:48]
    body = np.where((x - 24) ** 2 + (y - 24) ** 2 < 400, 40.0, -900.0) + 0 * z
    keys = []
    for i, ds in enumerate(image_series(body, geometry, series_key=f"{site}-gap")):
        if i == 6:
            continue  # the missing slice harmonisation rejects
        key = f"deid/dicom/p/{series_key(offset + 99)}/{i:04d}.dcm"
        store.write_bytes(key, to_bytes(ds))
        keys.append(key)
    rows = table.to_pylist()
    gap = dict(
        rows[0], series=series_key(offset + 99), status="quarantined", reason="missing-slice"
    )
    rows.append({**gap, "image": None, "rois": [], "masks": [], "mask_sha256": []})
    store.write_table(HARMONISED_SERIES, pa.Table.from_pylist(rows, schema=HARMONISED_SCHEMA))
    store.write_table(
        DEID_SERIES,
        pa.Table.from_pylist([{"series": gap["series"], "status": "ok", "paths": keys}]),
    )
    feature_rows = []
    for unit in plan_units(store):
        outcome = extract_roi(store, unit, PARAMS)
        values: dict[str, float] = {}
        for part in read_parts(store, list(outcome.result.outputs)).values():
            values.update(part.features or {})
        # a site effect the hub's ComBat has to remove
        values = {k: v * scale + (mean if "firstorder" in k else 0.0) for k, v in values.items()}
        feature_rows.append(FeatureRow(unit, "ok", features=values))
    features, metadata = build_features_table(site, feature_rows, PARAMS)
    if site == "site-a":
        values = {}
        for unit in plan_units(store):
            outcome = robustness_unit(store, unit, PARAMS)
            parts = read_parts(store, [k for ks in outcome.variants.values() for k in ks])
            values[unit.key] = {
                name: {f: v for k in ks for f, v in (parts[k].features or {}).items()}
                for name, ks in outcome.variants.items()
            }
        store.write_table(
            robustness_key(PARAMS.params_hash()),
            robustness_table(values),
            {"oncoflow.icc_threshold": "0.75"},
        )
    series = store.read_table(HARMONISED_SERIES).filter(
        pa.compute.equal(pa.compute.field("status"), "ok")
    )
    return store, series, features, metadata


def screenshot(page: Path, out: Path, height: int) -> None:
    """Screenshot a page with headless Chromium."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={out}", f"--window-size=1280,{height}", page.as_uri()],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip


def main() -> None:
    """Build the example, write the pages and their screenshots."""
    from tasks.cohort.report import (
        Report,
        Section,
        page_markdown,
        pca_figure,
        render_page,
        site_effect,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--keep", action="store_true")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oncoflow-report-example-"))
    try:
        built = {s: build_site(work / "store", s, *v) for s, v in SITES.items()}
        store, series, features, metadata = built["site-a"]
        counts = {
            "series": series.num_rows,
            "patients": series.num_rows,
            "feature_rows": features.num_rows,
            "by_modality": {"series": {"CT": series.num_rows}, "patients": {"CT": series.num_rows}},
            "by_roi": {"series": {"gtv": series.num_rows}, "patients": {"gtv": series.num_rows}},
        }
        report = site_report(store, "Lung CT (example)", counts, series, features, metadata, ["CT"])
        site_page = work / "report.html"
        site_page.write_text(report.html, encoding="utf-8")
        summaries = {s: cohort_summary(s, b[1], b[2], "gtv") for s, b in built.items()}
        adjustments = {s: a.to_dict() for s, a in estimate(list(summaries.values())).items()}
        tables = {s: (b[1], b[2]) for s, b in built.items()}
        before, after = combat_matrices(
            tables, {s: v.to_dict() for s, v in summaries.items()}, adjustments
        )
        effect = site_effect(before, after)
        section = Section(
            "Site effect: lung",
            f"<p>Share of PC1 variance explained by the site: <b>{effect['before']:.2f}</b> "
            f"before federated ComBat, <b>{effect['after']:.2f}</b> after.</p>",
            figures=[pca_figure(before, after)],
        )
        title = "Federated cohorts: site effect and ComBat"
        hub = Report(
            render_page(title, "Example built from synthetic sites.", [section]),
            page_markdown(title, [section]),
        )
        hub_page = work / "hub-report.html"
        hub_page.write_text(hub.html, encoding="utf-8")
        out = Path(opts.out)
        screenshot(site_page, out / "report-site.png", 2600)
        screenshot(hub_page, out / "report-hub.png", 700)
        print(f"site effect on PC1: {effect['before']:.2f} before, {effect['after']:.2f} after")
        print(f"wrote {out / 'report-site.png'} and {out / 'report-hub.png'}")
    finally:
        if opts.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

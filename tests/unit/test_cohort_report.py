"""report.html: sections, de-identified pixels only, self-contained, shown by headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tasks.cohort.report import pca_figure, site_effect, site_report
from tasks.harmonise.masks import Mask
from tasks.harmonise.qc import qc_png
from tasks.radiomics.robustness import REPLICAS, robustness_key, robustness_table
from tasks.radiomics.samples import (
    HARMONISED_SCHEMA,
    SampleRoi,
    SampleSeries,
    make_image,
    make_mask,
    series_key,
    write_harmonised_sample,
)
from tasks.store import DEID_SERIES, HARMONISED_SERIES, SiteStore
from tests.dicom_factory import Geometry, image_series, to_bytes

G = Geometry(size=(16, 16, 6), spacing=(1.0, 1.0, 2.0), origin=(0, 0, 0))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SiteStore:
    """Three harmonised CT series with QC pictures, one series harmonisation quarantined (its
    de-identified DICOM in deid/), one quarantined by de-identification, a robustness table."""
    site = SiteStore(str(tmp_path_factory.mktemp("report")), "site-a")
    specs = [
        SampleSeries(series_key(i), "CT", size=(24, 24, 10), rois=(SampleRoi("gtv", 6.0),), seed=i)
        for i in range(3)
    ]
    table = write_harmonised_sample(site, specs)
    for spec in specs:
        image = make_image(spec)
        mask = make_mask(spec, spec.rois[0], image)
        site.write_bytes(f"harmonised/{spec.series}/qc.png", qc_png(image, [Mask("gtv", mask)]))
    # harmonisation quarantined series 9 (its de-identified DICOM exists) and de-identification
    # quarantined series 8 (nothing under deid/: must never be shown)
    ramp = np.tile(np.linspace(-900, 900, 16), (6, 16, 1))
    keys = []
    for i, ds in enumerate(image_series(ramp, G, series_key="quarantined")):
        key = f"deid/dicom/p/{series_key(9)}/{i:04d}.dcm"
        site.write_bytes(key, to_bytes(ds))
        keys.append(key)
    rows = table.to_pylist()
    extra = dict(rows[0], series=series_key(9), status="quarantined", reason="missing-slice")
    rows.append({**extra, "image": None, "rois": [], "masks": [], "mask_sha256": []})
    rows.append({**extra, "series": series_key(8), "reason": "burned-in-annotation"})
    site.write_table(HARMONISED_SERIES, pa.Table.from_pylist(rows, schema=HARMONISED_SCHEMA))
    deid = [
        {"series": series_key(9), "status": "ok", "paths": keys},
        {"series": series_key(8), "status": "quarantined", "paths": []},
    ]
    site.write_table(DEID_SERIES, pa.Table.from_pylist(deid))
    values = {
        f"{s.series}/gtv": {
            r: {"original_firstorder_Mean": 10.0 * i + j, "original_glcm_Contrast": float(j)}
            for j, r in enumerate(REPLICAS)
        }
        for i, s in enumerate(specs)
    }
    site.write_table(
        robustness_key("a" * 64), robustness_table(values), {"oncoflow.icc_threshold": "0.8"}
    )
    return site


def _features(store: SiteStore) -> pa.Table:
    series = store.read_table(HARMONISED_SERIES).filter(
        pa.compute.equal(pa.compute.field("status"), "ok")
    )
    n = series.num_rows
    return pa.table(
        {
            "series": series.column("series"),
            "roi": ["gtv"] * n,
            "original_shape_MeshVolume": np.linspace(800, 1400, n),
            "original_firstorder_Mean": np.linspace(30, 60, n),
        }
    )


@pytest.fixture(scope="module")
def report(store):
    series = store.read_table(HARMONISED_SERIES).filter(
        pa.compute.equal(pa.compute.field("status"), "ok")
    )
    counts = {
        "series": 3,
        "patients": 3,
        "feature_rows": 3,
        "by_modality": {"series": {"CT": 3}, "patients": {"CT": 3}},
    }
    return site_report(
        store,
        "Lung CT",
        counts,
        series,
        _features(store),
        {"oncoflow.params_hash": "a" * 64},
        ["CT"],
    )


def test_sections_and_no_identifier(report):
    page = report.html
    titles = re.findall(r"<h2[^>]*>([^<]+)</h2>", page)
    assert titles == [
        "Counts",
        "Harmonised series: QC",
        "Series quarantined by harmonisation",
        "Feature distributions per site",
        "Robustness and negative controls",
    ]
    images = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"(?:src|href)=\"(?:https?:|file:|//)", page)
    assert page.count('class="tile"') == 3  # harmonised QC pictures
    assert page.count('class="tile bad"') == 1  # only the series harmonisation quarantined
    assert "missing-slice" in page and "burned-in-annotation" not in page
    assert "2 series; middle image" in page  # both counted, one shown
    assert "Q4LE" in page and "1 of 2 features stable" in page
    assert series_key(0) not in page and series_key(9) not in page and "2.25." not in page
    assert "![qc](data:image/png;base64," in report.markdown


def test_pca_shows_the_site_effect_removed():
    rng = np.random.default_rng(0)
    before = {"site-a": rng.normal(0, 1, (30, 5)), "site-b": rng.normal(3, 1, (30, 5))}
    after = {"site-a": before["site-a"] - 0.0, "site-b": before["site-b"] - 3.0}
    effect = site_effect(before, after)
    assert effect["before"] > 0.8 and effect["after"] < 0.1
    png = pca_figure(before, after)
    assert png.startswith(b"\x89PNG") and pca_figure(before, after) == png  # deterministic


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium is installed by tests/run.sh"
)
def test_headless_chromium_renders_the_page(report, tmp_path: Path):
    page = tmp_path / "report.html"
    page.write_text(report.html, encoding="utf-8")
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    picture = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert picture.shape[:2] == (2400, 1200)
    # the QC tiles' red border and the figures' blue bars were drawn: the images decoded
    red = (
        (abs(picture[..., 0] - 0xC6) < 12)
        & (abs(picture[..., 1] - 0x28) < 12)
        & (abs(picture[..., 2] - 0x28) < 12)
    )
    blue = (
        (abs(picture[..., 0] - 0x1F) < 20)
        & (abs(picture[..., 1] - 0x77) < 20)
        & (abs(picture[..., 2] - 0xB4) < 20)
    )
    assert red.sum() > 200 and blue.sum() > 500

"""``report.html``: a self-contained page to look at, for a published cohort and for the hub.

A site's report shows the cohort's counts, QC pictures of its harmonised series and of the
series harmonisation quarantined (rendered from their de-identified DICOM: a series quarantined
before or by de-identification has no object under ``deid/`` and is never shown), feature
distributions per site and the robustness table when ``oncoflow robustness`` ran. The hub's
report shows the site effect before and after federated ComBat (the first two principal
components of the harmonised features, coloured by site). Figures are matplotlib PNGs inlined
as ``data:`` URIs; the page has no external reference. Text carries counts, coded values, ROI
names and ordinal labels only (never series keys), and the page is byte-identical for the same
inputs (no timestamp), so it takes part in the cohort's content hash.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.store import HARMONISED, SiteStore

#: IBSI-coded features shown as distributions when the table has them (pyradiomics names).
KEY_FEATURES = (
    "original_shape_MeshVolume",
    "original_shape_Sphericity",
    "original_firstorder_Mean",
    "original_firstorder_Entropy",
    "original_glcm_JointEntropy",
    "original_glrlm_ShortRunEmphasis",
    "original_glszm_SmallAreaEmphasis",
    "original_ngtdm_Coarseness",
)
MAX_THUMBNAILS = 24
MAX_QUARANTINED = 12
SITE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:72rem;
color:#1d2330;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d8dce4}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #d8dce4;padding:.2rem .5rem;
font-size:.85rem;text-align:left}th{background:#f2f4f8}.num{text-align:right}
.grid{display:flex;flex-wrap:wrap;gap:.75rem}.tile{width:170px;font-size:.75rem}
.tile img{width:160px;height:auto;border:1px solid #d8dce4;image-rendering:pixelated}
.bad img{border:2px solid #c62828}.note{color:#5a6275;font-size:.85rem}img.fig{max-width:100%}
"""


@dataclass
class Tile:
    """One QC picture with its caption (no identifier)."""

    png: bytes
    caption: str
    key: str = ""


@dataclass
class Section:
    """A titled part of the page: HTML text and figures."""

    title: str
    body: str = ""
    figures: list[bytes] = field(default_factory=list)
    tiles: list[Tile] = field(default_factory=list)
    bad_tiles: bool = False
    summary: str = ""


def data_uri(png: bytes) -> str:
    """Return a PNG as a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig: Any) -> bytes:
    """Render a matplotlib figure to PNG bytes (no software or time metadata) and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> Any:
    # A fresh machine builds matplotlib's font cache at the first import and, when that takes
    # over 5 s, says so as a WARNING: a normal run logs none.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 9})
    return plt


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Render rows as an HTML table (numbers right-aligned, floats with 3 decimals)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            if isinstance(value, float):
                text = "" if not math.isfinite(value) else f"{value:.3f}"
                cells.append(f'<td class="num">{text}</td>')
            elif isinstance(value, bool | np.bool_):
                cells.append(f"<td>{'yes' if value else 'no'}</td>")
            elif isinstance(value, int):
                cells.append(f'<td class="num">{value}</td>')
            else:
                cells.append(f"<td>{html.escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_page(title: str, intro: str, sections: Sequence[Section]) -> str:
    """Assemble the self-contained HTML page."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{intro}</p>',
    ]
    for i, section in enumerate(sections):
        parts.append(f'<h2 id="s{i}">{html.escape(section.title)}</h2>')
        if section.body:
            parts.append(section.body)
        for png in section.figures:
            parts.append(
                f'<p><img class="fig" alt="{html.escape(section.title)}" src="{data_uri(png)}"></p>'
            )
        if section.tiles:
            cls = "tile bad" if section.bad_tiles else "tile"
            tiles = "".join(
                f'<div class="{cls}"><img alt="QC" src="{data_uri(t.png)}"><br>'
                f"{html.escape(t.caption)}</div>"
                for t in section.tiles
            )
            parts.append(f'<div class="grid">{tiles}</div>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- sections ------------------------------------------------------------------------------------


def counts_section(counts: Mapping[str, Any]) -> Section:
    """Series and patients, overall and by modality, body part and ROI."""
    body = [
        f"<p>{counts.get('series', 0)} series of {counts.get('patients', 0)} patients; "
        f"{counts.get('feature_rows', 0)} feature rows.</p>"
    ]
    for key, label in (
        ("by_modality", "modality"),
        ("by_body_part", "body part"),
        ("by_roi", "ROI"),
    ):
        block = counts.get(key) or {}
        series = block.get("series", {})
        rows = [
            {label: name, "series": n, "patients": block.get("patients", {}).get(name, 0)}
            for name, n in sorted(series.items())
        ]
        if rows:
            body.append(html_table(rows, [label, "series", "patients"]))
    return Section("Counts", "".join(body))


def qc_tiles(store: SiteStore, series: pa.Table, limit: int = MAX_THUMBNAILS) -> list[Tile]:
    """QC pictures of harmonised series (``harmonised/<series>/qc.png``), in table order."""
    from tasks.harmonise.qc import thumbnail_data_uri

    tiles = []
    rows = series.select(["series", "modality", "rois"]).to_pylist()
    keys = {r["series"]: f"{HARMONISED}/{r['series']}/qc.png" for r in rows[:limit]}
    found = store.read_many(keys.values())
    for i, row in enumerate(rows[:limit], start=1):
        png = found.get(keys[row["series"]])
        if png is None:
            continue
        thumb = base64.b64decode(thumbnail_data_uri(png, size=160).split(",", 1)[1])
        rois = ", ".join(row["rois"] or []) or "no ROI"
        tiles.append(Tile(thumb, f"series {i}: {row['modality']}, {rois}"))
    return tiles


def quarantined_tiles(
    store: SiteStore, modalities: Sequence[str] = (), limit: int = MAX_QUARANTINED
) -> tuple[list[Tile], int]:
    """Pictures of series harmonisation quarantined, from their de-identified DICOM.

    See :func:`tasks.harmonise.qc.quarantined_previews` (what de-identification quarantined,
    or never saw, is not shown).

    Returns
    -------
    tuple
        The tiles and how many series harmonisation quarantined in all.
    """
    from tasks.harmonise.qc import quarantined_previews

    previews, total = quarantined_previews(store, modalities, limit, size=160)
    tiles = [
        Tile(p.png, f"quarantined {i}: {p.modality}, {p.reason}", p.series)
        for i, p in enumerate(previews, start=1)
    ]
    return tiles, total


def distributions_figure(
    tables: Mapping[str, pa.Table], names: Sequence[str] = KEY_FEATURES
) -> bytes | None:
    """Histograms of key IBSI-coded features, one colour per site (None without features)."""
    from tasks.radiomics.ibsi import describe_column

    present = [n for n in names if any(n in t.column_names for t in tables.values())]
    if not present:
        return None
    plt = _pyplot()
    cols = min(4, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, present, strict=False):
        for colour, (site, table) in zip(SITE_COLOURS * 4, sorted(tables.items()), strict=False):
            if name not in table.column_names:
                continue
            values = np.asarray(table.column(name).to_pylist(), dtype=np.float64)
            values = values[np.isfinite(values)]
            if values.size:
                ax.hist(
                    values,
                    bins=min(20, max(5, values.size // 2)),
                    alpha=0.55,
                    color=colour,
                    label=site,
                )
        described = describe_column(name)
        code = f" ({described.ibsi})" if described and described.ibsi else ""
        ax.set_title(name.removeprefix("original_").replace("_", " ") + code)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def robustness_section(table: pa.Table | None, threshold: str = "0.75") -> Section | None:
    """Show the robustness table: counts, ICC histogram, least and most stable features."""
    if table is None or table.num_rows == 0:
        return None
    rows = table.to_pylist()
    finite = [r for r in rows if r["icc"] is not None and math.isfinite(r["icc"])]
    stable = sum(1 for r in rows if r["stable"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 2.4))
    ax.hist([r["icc"] for r in finite], bins=40, range=(-0.2, 1.0), color="#1f77b4")
    ax.axvline(float(threshold), color="#c62828", linestyle="--", label=f"threshold {threshold}")
    ax.set_xlabel("ICC(3,1) across replicas")
    ax.set_ylabel("features")
    ax.legend(fontsize=7)
    fig.tight_layout()
    ordered = sorted(finite, key=lambda r: r["icc"])
    key = [r for r in rows if r["feature"] in KEY_FEATURES]
    columns = ["feature", "ibsi", "icc", "stable", "corr_shuffled", "corr_random_roi", "n_rois"]
    body = (
        f"<p>{stable} of {len(rows)} features stable (ICC(3,1) &ge; {html.escape(threshold)}) "
        "across the replicas original, erode, dilate, shift-1, shift-2, noise; correlations "
        "with the negative controls (shuffled ROI, ROI moved to other tissue) across ROIs.</p>"
        "<h3>Key IBSI features</h3>"
        + html_table(key, columns)
        + "<h3>Least stable</h3>"
        + html_table(ordered[:10], columns)
        + "<h3>Most stable</h3>"
        + html_table(ordered[::-1][:10], columns)
    )
    return Section(
        "Robustness and negative controls",
        body,
        figures=[figure_png(fig)],
        summary=f"{stable} of {len(rows)} features stable (ICC(3,1) >= {threshold})",
    )


def pca_figure(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> bytes:
    """First two principal components before and after ComBat, one colour per site.

    Parameters
    ----------
    before, after
        Site -> rows x features (the same features everywhere); each panel's components are
        fitted on its own pooled, standardised rows.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, data, title in ((axes[0], before, "before ComBat"), (axes[1], after, "after ComBat")):
        sites = sorted(data)
        pooled = np.vstack([data[s] for s in sites])
        sd = pooled.std(axis=0)
        sd[sd == 0] = 1.0
        z = (pooled - pooled.mean(axis=0)) / sd
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        scores = z @ vt[:2].T
        explained = (s[:2] ** 2) / max((s**2).sum(), 1e-12)
        start = 0
        for colour, site in zip(SITE_COLOURS * 4, sites, strict=False):
            n = len(data[site])
            ax.scatter(scores[start : start + n, 0], scores[start : start + n, 1], s=14, alpha=0.8,
                       color=colour, label=site)  # fmt: skip
            start += n
        ax.set_title(title)
        ax.set_xlabel(f"PC1 ({explained[0]:.0%})")
        ax.set_ylabel(f"PC2 ({explained[1]:.0%})" if len(explained) > 1 else "PC2")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def site_effect(
    before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Share of the variance of PC1 explained by the site (eta squared), before and after."""

    def eta2(data: Mapping[str, np.ndarray]) -> float:
        sites = sorted(data)
        pooled = np.vstack([data[s] for s in sites])
        sd = pooled.std(axis=0)
        sd[sd == 0] = 1.0
        z = (pooled - pooled.mean(axis=0)) / sd
        _, _, vt = np.linalg.svd(z, full_matrices=False)
        pc1 = z @ vt[0]
        labels = np.concatenate([[i] * len(data[s]) for i, s in enumerate(sites)])
        total = ((pc1 - pc1.mean()) ** 2).sum()
        between = sum(
            (labels == i).sum() * (pc1[labels == i].mean() - pc1.mean()) ** 2
            for i in range(len(sites))
        )
        return float(between / total) if total > 0 else math.nan

    return {"before": eta2(before), "after": eta2(after)}


# --- the pages -----------------------------------------------------------------------------------


def page_markdown(title: str, sections: Sequence[Section]) -> str:
    """Render the page's pictures and one-line summaries as markdown (a Prefect artifact)."""
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        if section.summary:
            parts.append(section.summary)
        parts.extend(f"![{section.title}]({data_uri(png)})" for png in section.figures)
        parts.extend(f"![qc]({data_uri(t.png)}) {t.caption}" for t in section.tiles)
    return "\n\n".join(parts)


@dataclass
class Report:
    """A rendered report: the HTML page and its markdown twin for the Prefect UI."""

    html: str
    markdown: str


def site_report(
    store: SiteStore,
    title: str,
    counts: Mapping[str, Any],
    series: pa.Table,
    features: pa.Table | None,
    features_metadata: Mapping[str, str],
    modalities: Sequence[str] = (),
) -> Report:
    """Build a published cohort's report from the site store and the selection.

    Parameters
    ----------
    store
        The site store (harmonised QC pictures, de-identified DICOM, robustness table).
    title
        The cohort's title.
    counts
        The cohort counts of the manifest.
    series, features
        The published tables.
    features_metadata
        The features table's Parquet metadata (its parameter hash names the robustness table).
    modalities
        The cohort's modality filter (quarantined series of other modalities are left out).
    """
    from tasks.radiomics.robustness import robustness_key

    sections = [counts_section(counts)]
    sections[0].summary = f"{counts.get('series', 0)} series, {counts.get('patients', 0)} patients"
    tiles = qc_tiles(store, series)
    sections.append(
        Section(
            "Harmonised series: QC",
            f"<p>{series.num_rows} series; slice through the largest ROI cross-section, mask "
            f"outlines in colour (first {MAX_THUMBNAILS} shown).</p>",
            tiles=tiles,
            summary=f"{len(tiles)} QC pictures",
        )
    )
    rejected, total = quarantined_tiles(store, modalities)
    sections.append(
        Section(
            "Series quarantined by harmonisation",
            f"<p>{total} series; middle image of the de-identified series with the reason. "
            "Series quarantined before or by de-identification are never shown.</p>",
            tiles=rejected,
            bad_tiles=True,
            summary=f"{total} series quarantined by harmonisation",
        )
    )
    if features is not None:
        figure = distributions_figure({store.site: features})
        if figure is not None:
            sections.append(
                Section(
                    "Feature distributions per site",
                    "<p>Key IBSI-coded features of the published rows.</p>",
                    figures=[figure],
                )
            )
    params_hash = features_metadata.get("oncoflow.params_hash", "")
    if params_hash:
        key = robustness_key(params_hash)
        table = store.read_table(key) if store.exists(key) else None
        threshold = "0.75"
        if table is not None:
            threshold = (
                (table.schema.metadata or {}).get(b"oncoflow.icc_threshold", b"0.75").decode()
            )
        section = robustness_section(table, threshold)
        if section is not None:
            sections.append(section)
    intro = (
        f"Site {html.escape(store.site)}. Built from de-identified data only; pictures and "
        "counts as published."
    )
    return Report(render_page(title, intro, sections), page_markdown(title, sections))

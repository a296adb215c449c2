"""The hub's ``report.html``: the site effect before and after federated ComBat.

For every cohort harmonised with ComBat, the hub reads each site's published tables (the rows
its summary was computed from: same ROI, same covariates), applies that site's adjustment, and
plots the first two principal components of the pooled, standardised features before and after,
coloured by site, with the share of PC1's variance the site explains (eta squared). Only
published, de-identified objects are read, each checked against its manifest's SHA-256.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.cohort.report import (
    Report,
    Section,
    html_table,
    page_markdown,
    pca_figure,
    render_page,
    site_effect,
)
from tasks.cohort.storage import Retrier, RetryPolicy
from tasks.errors import OncoflowError
from tasks.federation.combat import SiteAdjustment, apply_adjustment, cohort_rows
from tasks.federation.sources import PublishedVersion, read_checked
from tasks.store import open_url, read_parquet


def combat_matrices(
    tables: Mapping[str, tuple[pa.Table, pa.Table]],
    summaries: Mapping[str, Mapping[str, Any]],
    adjustments: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each site's feature rows before and after its ComBat adjustment.

    Parameters
    ----------
    tables
        Site -> its published (series, features) tables.
    summaries
        Site -> its published ComBat summary (ROI and covariates).
    adjustments
        Site -> the hub's adjustment for it.

    Returns
    -------
    tuple
        Site -> rows x features, before and after (the adjustment's features, in its order).
    """
    before, after = {}, {}
    for site, (series, features) in sorted(tables.items()):
        summary, adjustment = summaries[site], SiteAdjustment.from_dict(adjustments[site])
        rows, _ = cohort_rows(
            series, features, summary["roi"], summary["categorical"], summary["continuous"]
        )
        names = adjustment.features
        before[site] = np.column_stack([rows.column(n).to_numpy() for n in names]).astype(float)
        harmonised = apply_adjustment(rows, adjustment)
        after[site] = np.column_stack([harmonised.column(n).to_numpy() for n in names])
    return before, after


def _read_tables(version: PublishedVersion, retry: Retrier) -> tuple[pa.Table, pa.Table] | None:
    sums = {
        e.get("contentUrl"): e.get("sha256", "") for e in version.manifest.get("distribution", [])
    }
    if "features.parquet" not in sums or "series.parquet" not in sums:
        return None
    fs, path = open_url(version.url)
    out = []
    for name in ("series.parquet", "features.parquet"):
        data = read_checked(fs, f"{path}/{name}", sums[name], retry)
        out.append(read_parquet(pa.BufferReader(data)))
    return out[0], out[1]


def hub_report(
    versions: Sequence[PublishedVersion], combat: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> tuple[Report, dict[str, dict[str, float]]]:
    """Build the hub's report from the versions read and the ComBat adjustments estimated.

    Returns
    -------
    tuple
        The report and, per cohort, the site effect on PC1 before and after.
    """
    retry = Retrier(RetryPolicy())
    sections = []
    effects: dict[str, dict[str, float]] = {}
    for cohort, adjustments in sorted(combat.items()):
        tables, summaries = {}, {}
        for version in versions:
            site = str(version.manifest.get("site"))
            if str(version.manifest.get("cohort")) != cohort or site not in adjustments:
                continue
            summary = version.combat_summary or {}
            read = _read_tables(version, retry) if summary.get("roi") else None
            if read is not None:
                tables[site], summaries[site] = read, summary
        if len(tables) < 2:
            sections.append(
                Section(
                    f"Site effect: {cohort}",
                    "<p>Not shown: fewer than two sites published feature rows with a ComBat "
                    "summary naming its ROI.</p>",
                )
            )
            continue
        try:
            before, after = combat_matrices(tables, summaries, adjustments)
        except (OncoflowError, KeyError, ValueError) as exc:
            text = (
                str(exc).splitlines()[0] if isinstance(exc, OncoflowError) else type(exc).__name__
            )
            sections.append(
                Section(f"Site effect: {cohort}", f"<p>Not shown: {html.escape(text)}.</p>")
            )
            continue
        effect = site_effect(before, after)
        effects[cohort] = effect
        rows = [
            {"site": s, "rows": len(before[s]), "features": before[s].shape[1]}
            for s in sorted(before)
        ]
        roi = next(iter(summaries.values()))["roi"]
        sections.append(
            Section(
                f"Site effect: {cohort}",
                f"<p>ROI {html.escape(roi)}. Share of the variance of the first principal "
                f"component explained by the site: <b>{effect['before']:.2f}</b> before "
                f"federated ComBat, <b>{effect['after']:.2f}</b> after.</p>"
                + html_table(rows, ["site", "rows", "features"]),
                figures=[pca_figure(before, after)],
                summary=f"site share of PC1 variance: {effect['before']:.2f} before, "
                f"{effect['after']:.2f} after ComBat",
            )
        )
    title = "Federated cohorts: site effect and ComBat"
    intro = "Built by the hub from published, de-identified cohort versions."
    return Report(render_page(title, intro, sections), page_markdown(title, sections)), effects

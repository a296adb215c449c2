"""The hub's report: rows before and after each site's ComBat adjustment, site effect on PC1."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tasks.cohort.report import site_effect
from tasks.federation.combat import cohort_summary, estimate
from tasks.federation.report import combat_matrices


def _site(seed: int, shift: float, scale: float, n: int = 25) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(seed)
    keys = [f"2.25.{seed}{i:03d}" for i in range(n)]
    sex = ["F" if i % 2 else "M" for i in range(n)]
    biology = rng.normal(0, 1, (n, 1))  # shared signal
    features = {
        f"original_firstorder_F{j}": (biology[:, 0] * (j + 1) + rng.normal(0, 0.5, n)) * scale
        + shift
        for j in range(4)
    }
    series = pa.table({"series": keys, "sex": sex, "age_at_study": ["060Y"] * n})
    return series, pa.table({"series": keys, "roi": ["gtv"] * n, **features})


def test_combat_removes_the_site_effect_on_pc1():
    tables = {
        "site-a": _site(1, 0.0, 1.0),
        "site-b": _site(2, 6.0, 2.0),
        "site-c": _site(3, -4.0, 0.5),
    }
    summaries = {
        s: cohort_summary(s, series, features, "gtv", ["sex"])
        for s, (series, features) in tables.items()
    }
    assert all(summary.roi == "gtv" for summary in summaries.values())
    adjustments = {s: a.to_dict() for s, a in estimate(list(summaries.values())).items()}
    before, after = combat_matrices(
        tables, {s: v.to_dict() for s, v in summaries.items()}, adjustments
    )
    assert {s: m.shape for s, m in before.items()} == {s: (25, 4) for s in tables}
    np.testing.assert_array_equal(
        before["site-a"][:, 0], tables["site-a"][1].column("original_firstorder_F0").to_numpy()
    )
    effect = site_effect(before, after)
    assert effect["before"] > 0.5 and effect["after"] < 0.05


def test_hub_report_reads_checked_publications(tmp_path):
    import hashlib

    from tasks.federation.report import hub_report
    from tasks.federation.sources import PublishedVersion
    from tasks.store import table_to_parquet_bytes

    versions, summaries = [], []
    for seed, site, shift in ((1, "site-a", 0.0), (2, "site-b", 5.0)):
        series, features = _site(seed, shift, 1.0)
        summary = cohort_summary(site, series, features, "gtv", ["sex"])
        summaries.append(summary)
        folder = tmp_path / site / "lung" / "v1"
        folder.mkdir(parents=True)
        distribution = []
        for name, table in (("series.parquet", series), ("features.parquet", features)):
            data = table_to_parquet_bytes(table)
            (folder / name).write_bytes(data)
            distribution.append({"contentUrl": name, "sha256": hashlib.sha256(data).hexdigest()})
        manifest = {"site": site, "cohort": "lung", "distribution": distribution}
        versions.append(PublishedVersion(str(folder), manifest, summary.to_dict()))
    combat = {"lung": {s: a.to_dict() for s, a in estimate(summaries).items()}}
    report, effects = hub_report(versions, combat)
    assert effects["lung"]["before"] > 0.5 > effects["lung"]["after"]
    assert "Site effect: lung" in report.html
    assert report.html.count("data:image/png;base64,") == 1
    assert "2.25." not in report.html

"""Small-cell and complementary suppression of the hub catalogue, audited by linear programming.

The audit is independent of the implementation: for every released ``<k`` cell it asks scipy's
LP solver for the smallest and largest value consistent with everything published (the counts,
all the sums linking them, ``<k`` cells in 1..k-1 and ``*`` cells at least k). A cell is
protected when at least two whole numbers remain possible.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from tasks.errors import OncoflowError
from tasks.federation.counts import (
    CountSystem,
    SourceCounts,
    build_system,
    federated_catalogue,
    suppress,
)

K = 10


def audit(system: CountSystem, released: dict, k: int = K) -> list[str]:
    """Return the '<k' cells whose value a reader can pin down (empty when all are protected)."""
    hidden = sorted(c for c, v in released.items() if isinstance(v, str))
    if not hidden:
        return []
    index = {c: i for i, c in enumerate(hidden)}
    a_eq, b_eq = [], []
    for parts, total in system.sums:
        row = np.zeros(len(hidden))
        rhs = 0.0
        for cell, sign in [*((p, 1.0) for p in parts), (total, -1.0)]:
            if cell in index:
                row[index[cell]] += sign
            else:
                rhs -= sign * released[cell]
        if row.any():
            a_eq.append(row)
            b_eq.append(rhs)
    bounds = [(1, k - 1) if released[c] == f"<{k}" else (k, None) for c in hidden]
    pinned = []
    for cell in hidden:
        if released[cell] != f"<{k}":
            continue
        c = np.zeros(len(hidden))
        c[index[cell]] = 1.0
        lo = linprog(c, A_eq=a_eq or None, b_eq=b_eq or None, bounds=bounds, method="highs")
        hi = linprog(-c, A_eq=a_eq or None, b_eq=b_eq or None, bounds=bounds, method="highs")
        assert lo.status == 0 and hi.status == 0, (cell, lo.message, hi.message)
        if math.floor(-hi.fun + 1e-6) - math.ceil(lo.fun - 1e-6) < 1:
            pinned.append(cell)
    return pinned


def source(site, modality, body_part=None, roi=None, patients=None, cohort="c"):
    body_part = body_part or {"CHEST": sum(modality.values())}
    roi = roi or {}
    series = sum(modality.values())
    return SourceCounts(
        site=site,
        cohort=cohort,
        version="v1",
        series=series,
        patients=patients if patients is not None else series,
        by={"modality": modality, "body_part": body_part, "roi": roi},
    )


def test_primary_and_complementary_suppression() -> None:
    sources = [
        source("site-a", {"CT": 25, "MR": 3}, patients=20),
        source("site-b", {"CT": 40, "MR": 30}, patients=50),
        source("site-c", {"CT": 12, "MR": 11}, patients=15),
    ]
    cat = federated_catalogue(sources, k=K)
    mod = cat["tables"]["modality"]
    rows = {r["site"]: r for r in mod["rows"]}
    assert rows["site-a"]["values"]["MR"] == "<10"
    # the row of site-a would give MR = total - CT: CT (or the total) is hidden too
    row_hidden = [
        v
        for v in [*rows["site-a"]["values"].values(), rows["site-a"]["total"]]
        if isinstance(v, str)
    ]
    assert len(row_hidden) >= 2
    # the MR column would give site-a = column total - the others: one more is hidden there
    column = [rows[s]["values"]["MR"] for s in rows] + [mod["totals"]["MR"]]
    assert sum(isinstance(v, str) for v in column) >= 2
    assert "*" in [v for r in rows.values() for v in r["values"].values()] + [mod["totals"]["MR"]]
    system, _ = build_system(sorted(sources, key=lambda s: s.site))
    assert audit(system, suppress(system, K)) == []


def test_complementary_case_single_small_cell_in_a_row_with_published_total() -> None:
    # Without complementary suppression, site-a's MR = 28 - 25 = 3 from the row total.
    system = CountSystem()
    for cell, value in {"a.CT": 25, "a.MR": 3, "a": 28}.items():
        system.add(cell, value)
    system.add_sum(["a.CT", "a.MR"], "a")
    released = suppress(system, K)
    assert released["a.MR"] == "<10"
    assert released["a.CT"] == "*"  # the smallest other count in the sum
    assert released["a"] == 28  # the total can stay: two unknowns, one equation
    assert audit(system, released) == []


def test_two_small_cells_that_pin_each_other_get_a_third() -> None:
    # 1 + 1 = 2 would reveal both '<10' cells (each is at least 1).
    system = CountSystem()
    for cell, value in {"x": 1, "y": 1, "z": 30, "t": 32}.items():
        system.add(cell, value)
    system.add_sum(["x", "y", "z"], "t")
    released = suppress(system, K)
    assert released["x"] == released["y"] == "<10"
    assert released["z"] == "*" or released["t"] == "*"
    assert audit(system, released) == []


def test_small_total_is_suppressed_and_zeros_are_published() -> None:
    cat = federated_catalogue(
        [source("site-a", {"CT": 4, "MR": 0}), source("site-b", {"CT": 50, "MR": 20})], k=K
    )
    rows = {r["site"]: r for r in cat["tables"]["modality"]["rows"]}
    assert rows["site-a"]["total"] == "<10"
    assert rows["site-a"]["values"]["MR"] == 0
    for table in cat["tables"].values():
        for row in table["rows"]:
            for value in [*row.get("values", {}).values(), row["total"]]:
                assert isinstance(value, str) or value == 0 or value >= K


def test_no_small_cell_no_suppression() -> None:
    cat = federated_catalogue(
        [source("site-a", {"CT": 25, "MR": 30}), source("site-b", {"CT": 12, "MR": 40})]
    )
    mod = cat["tables"]["modality"]
    assert mod["total"] == 107
    assert [r["values"] for r in mod["rows"]] == [{"CT": 25, "MR": 30}, {"CT": 12, "MR": 40}]


def test_manifest_counts_and_errors() -> None:
    manifest = {
        "site": "site-a",
        "cohort": "lung",
        "version": "2.0.0",
        "name": "Lung",
        "counts": {
            "series": 12,
            "patients": 11,
            "by_modality": {"series": {"CT": 12}, "patients": {"CT": 11}},
            "by_body_part": {"series": {"CHEST": 12}, "patients": {"CHEST": 11}},
            "by_roi": {"series": {"gtv": 12}, "patients": {"gtv": 11}},
        },
    }
    counts = SourceCounts.from_manifest(manifest, "s3://b/lung/v2")
    assert counts.version == "v2" and counts.by["roi"] == {"gtv": 12}
    with pytest.raises(OncoflowError, match="lacks counts"):
        SourceCounts.from_manifest({"site": "x"}, "s3://b/x")
    with pytest.raises(OncoflowError, match="same site/cohort"):
        federated_catalogue([counts, counts])
    with pytest.raises(OncoflowError, match="no published cohort"):
        federated_catalogue([])


counts_strategy = st.integers(min_value=0, max_value=40)


@st.composite
def random_sources(draw):
    n_sites = draw(st.integers(2, 4))
    modalities = ["CT", "MR", "PT"][: draw(st.integers(1, 3))]
    parts = ["CHEST", "BRAIN"]
    rois = ["gtv", "lung"]
    out = []
    for i in range(n_sites):
        mod = {m: draw(counts_strategy) for m in modalities}
        total = sum(mod.values())
        first = draw(st.integers(0, total))
        body = {parts[0]: first, parts[1]: total - first}
        roi = {r: draw(st.integers(0, total)) for r in rois}
        patients = draw(st.integers(min(total, 1), total))
        out.append(source(f"site-{chr(97 + i)}", mod, body, roi, patients))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_sources())
def test_no_small_count_can_be_worked_out(sources) -> None:
    system, _ = build_system(sources)
    released = suppress(system, K)
    for cell, value in released.items():
        assert isinstance(value, str) or value == 0 or value >= K, cell
        if value == "*":
            assert system.values[cell] >= K  # complements are never small or zero
    assert audit(system, released) == []

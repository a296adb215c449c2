"""The hub's suppression holds against a reader who knows the logical bounds between counts.

The audit is independent of the implementation: it reads only the released catalogue (the
tables a reader downloads) and rebuilds the reader's integer program from them with
scipy's ``milp``:

* every released number, fixed; ``<10`` is a whole number in 1..9, ``*`` one of at least 10;
* every sum a reader sees: each row adds up to its total, each column to its column total,
  the column totals and the row totals to the grand total; the row totals of the modality and
  body-part tables are the same number (the site's series), and so are their grand totals;
* the logical bounds: a site's patients never exceed its series (and in total); a site's
  series with an ROI never exceed its series (and per ROI column in total).

Criterion: for every ``<10`` cell the smallest and the largest feasible value differ, so the
reader is left with at least two whole values, all inside 1..9 (never one value). The true
counts are a feasible point (the model is right), so a second feasible value settles it: the
minimum is solved first, the maximum only when the minimum is the true value. Run over 150
seeded random multi-site systems, one in three with a site whose patients are ``<10`` while its
series count is large enough to be shown, and small counts everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp

from tasks.errors import OncoflowError
from tasks.federation.counts import SourceCounts, build_system, federated_catalogue

K = 10
SYSTEMS = 150


class ReaderModel:
    """The reader's integer program over the released catalogue."""

    def __init__(self, catalogue: dict, k: int = K) -> None:
        self.k = k
        self.names: list[str] = []
        self.released: dict[str, int | str] = {}
        self.rows: list[tuple[dict[str, float], float, float]] = []
        tables = catalogue["tables"]
        sites = [f"{r['site']}/{r['cohort']}" for r in tables["modality"]["rows"]]
        for dim in ("modality", "body_part", "roi"):
            table = tables[dim]
            total = "series" if dim != "roi" else "roi-masks"
            for site, row in zip(sites, table["rows"], strict=True):
                cells = [self.var(f"{dim}|{site}|{c}", v) for c, v in row["values"].items()]
                self.equal(cells, self.var(f"{total}|{site}", row["total"]))
                if dim == "roi":
                    for cell in cells:
                        self.at_most(cell, f"series|{site}")
            for c in table["columns"]:
                column = [self.var(f"{dim}|{s}|{c}", None) for s in sites]
                self.equal(column, self.var(f"{dim}|*|{c}", table["totals"][c]))
                if dim == "roi":
                    self.at_most(f"{dim}|*|{c}", "series|*")
            grand = self.var(f"{total}|*", table["total"])
            self.equal([f"{dim}|*|{c}" for c in table["columns"]], grand)
            self.equal([f"{total}|{s}" for s in sites], grand)
        patients = tables["patients"]
        for site, row in zip(sites, patients["rows"], strict=True):
            self.at_most(self.var(f"patients|{site}", row["total"]), f"series|{site}")
        self.equal([f"patients|{s}" for s in sites], self.var("patients|*", patients["total"]))
        self.at_most("patients|*", "series|*")

    def var(self, name: str, value: int | str | None) -> str:
        if name not in self.released:
            self.names.append(name)
            self.released[name] = value
        elif value is not None:
            assert self.released[name] in (None, value), name  # shared totals agree
            self.released[name] = value
        return name

    def equal(self, parts: list[str], total: str) -> None:
        terms = {p: 1.0 for p in parts}
        terms[total] = terms.get(total, 0.0) - 1.0
        self.rows.append((terms, 0.0, 0.0))

    def at_most(self, small: str, large: str) -> None:
        self.rows.append(({small: 1.0, large: -1.0}, -np.inf, 0.0))

    def pinned(self, cell: str, true_value: int) -> bool:
        """Whether the true value is the only feasible one (the true value is feasible)."""
        lo = self.extreme(cell, False)
        assert lo <= true_value, cell
        return lo == true_value and self.extreme(cell, True) == true_value

    def range_of(self, cell: str) -> tuple[int, int]:
        return self.extreme(cell, False), self.extreme(cell, True)

    def extreme(self, cell: str, largest: bool) -> int:
        index = {n: i for i, n in enumerate(self.names)}
        matrix = np.zeros((len(self.rows), len(self.names)))
        for r, (terms, _, _) in enumerate(self.rows):
            for name, coeff in terms.items():
                matrix[r, index[name]] += coeff
        lb, ub = np.zeros(len(self.names)), np.full(len(self.names), np.inf)
        for name, value in self.released.items():
            i = index[name]
            if value == f"<{self.k}":
                lb[i], ub[i] = 1, self.k - 1
            elif value == "*":
                lb[i] = self.k
            elif value == "-":  # withheld: any count, zero included
                pass
            else:
                lb[i] = ub[i] = float(value)
        constraint = LinearConstraint(matrix, [r[1] for r in self.rows], [r[2] for r in self.rows])
        goal = np.zeros(len(self.names))
        goal[index[cell]] = -1.0 if largest else 1.0
        res = milp(goal, constraints=[constraint], integrality=np.ones_like(goal),
                   bounds=Bounds(lb, ub))  # fmt: skip
        assert res.status == 0, (cell, res.message)
        return round(res.x[index[cell]])


def _count(rng: np.random.Generator) -> int:
    """A count: often zero or small, sometimes large."""
    kind = rng.random()
    if kind < 0.2:
        return 0
    if kind < 0.55:
        return int(rng.integers(1, K))
    return int(rng.integers(K, 60))


def random_system(seed: int) -> tuple[list[SourceCounts], dict[str, tuple[int, int]]]:
    """Sources of 2-5 sites; returns the sources and the true (series, patients) per site."""
    rng = np.random.default_rng(seed)
    modalities = ["CT", "MR", "PT"][: int(rng.integers(1, 4))]
    rois = ["gtv", "lung", "liver"][: int(rng.integers(0, 4))]
    sources, truth = [], {}
    for i in range(int(rng.integers(2, 6))):
        by_modality = {m: _count(rng) for m in modalities}
        series = sum(by_modality.values())
        if seed % 3 == 0 and i == 0 and series < K:  # the site of the issue: series shown...
            by_modality[modalities[0]] += K + int(rng.integers(0, 20))
            series = sum(by_modality.values())
        first = int(rng.integers(0, series + 1))
        body = {"CHEST": first, "BRAIN": series - first}
        roi = {r: int(rng.integers(0, series + 1)) for r in rois}
        if seed % 3 == 0 and i == 0:
            patients = int(rng.integers(1, K))  # ...and patients <10
        else:
            patients = int(rng.integers(min(series, 1), series + 1))
        label = f"site-{chr(97 + i)}"
        sources.append(
            SourceCounts(label, "c", "v1", series, patients,
                         {"modality": by_modality, "body_part": body, "roi": roi})
        )  # fmt: skip
        truth[f"{label}/c"] = (series, patients)
    return sources, truth


def test_no_suppressed_cell_is_pinned_by_sums_and_bounds() -> None:
    pinned, audited, issue_sites = [], 0, 0
    for seed in range(SYSTEMS):
        sources, truth = random_system(seed)
        catalogue = federated_catalogue(sources, k=K)
        model = ReaderModel(catalogue)
        patients = {f"{r['site']}/c": r["total"] for r in catalogue["tables"]["patients"]["rows"]}
        series = {f"{r['site']}/c": r["total"] for r in catalogue["tables"]["modality"]["rows"]}
        issue_sites += sum(
            1 for s in truth if patients[s] == f"<{K}" and not isinstance(series[s], str)
        )
        truth = build_system(sources)[0].values  # the raw counts: the known-feasible point
        for cell, value in model.released.items():
            if value != f"<{K}" and not (value == "-" and 0 < truth[cell] < K):
                continue
            audited += 1
            if model.pinned(cell, truth[cell]):
                pinned.append((seed, cell))
    assert pinned == []
    assert audited > 500  # the systems do have many small cells
    assert issue_sites >= 20  # '<10' patients next to a shown series count were audited


def test_the_patients_bound_alone_would_pin_a_cell() -> None:
    """Without the bound in the suppression, a reader pins patients from the series count.

    Site a: 1 series (so 1 patient); shown as '<10' both. Its patients are then 1..1 once the
    reader knows patients <= series and series is pinned by the column: the suppression must
    hide enough that the series count stays a range.
    """
    sources = [
        SourceCounts("site-a", "c", "v1", 3, 2,
                     {"modality": {"CT": 3}, "body_part": {"CHEST": 3}, "roi": {}}),
        SourceCounts("site-b", "c", "v1", 40, 30,
                     {"modality": {"CT": 40}, "body_part": {"CHEST": 40}, "roi": {}}),
    ]  # fmt: skip
    model = ReaderModel(federated_catalogue(sources, k=K))
    for cell, value in model.released.items():
        if value == f"<{K}":
            lo, hi = model.range_of(cell)
            assert hi > lo, cell


def test_inconsistent_manifest_counts_are_one_line_errors() -> None:
    bad = SourceCounts("site-a", "c", "v1", 3, 5,
                       {"modality": {"CT": 3}, "body_part": {"CHEST": 3}, "roi": {}})  # fmt: skip
    with pytest.raises(OncoflowError, match="exceeds"):
        federated_catalogue([bad])


def test_a_small_count_pinned_whatever_is_hidden_is_withheld() -> None:
    """Two sites with one PT series each, a third with none, k=3: the PT column total is 2.

    Every count at least 1, the column total below 3: both PT cells are 1 whatever else is
    hidden. They (and the total) are shown as ``-`` (any count, zero included) instead.
    """
    k = 3
    sources = [
        SourceCounts(f"site-{s}", "c", "v1", sum(m.values()), 1,
                     {"modality": m, "body_part": {"CHEST": sum(m.values())}, "roi": {}})
        for s, m in (
            ("a", {"CT": 2, "PT": 1}), ("b", {"CT": 4, "PT": 1}), ("c", {"CT": 2, "PT": 0})
        )
    ]  # fmt: skip
    catalogue = federated_catalogue(sources, k=k)
    rows = {r["site"]: r["values"] for r in catalogue["tables"]["modality"]["rows"]}
    assert rows["site-a"]["PT"] == rows["site-b"]["PT"] == "-"
    assert rows["site-c"]["PT"] == 0 and "-" in catalogue["legend"]
    model = ReaderModel(catalogue, k)
    truth = build_system(sources)[0].values
    for cell, value in model.released.items():
        if value in (f"<{k}", "-") and 0 < truth[cell] < k:
            assert not model.pinned(cell, truth[cell]), cell

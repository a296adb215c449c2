"""The hub's federated catalogue: counts by site, modality, body part and ROI, with suppression.

The hub reads only published manifests (counts, never rows). Each dimension is a table with
one row per published cohort version (``site/cohort``), one column per category, row totals,
column totals and a grand total. Before release:

* **primary suppression**: every count ``n`` with ``0 < n < k`` (default ``k = 10``) is shown
  as ``<10``;
* **complementary suppression**: every published sum (a row, a column, the totals) that
  contains a suppressed count gets at least one more suppressed count, chosen among the
  smallest counts ``>= k`` and shown as ``*``, until no suppressed count can be worked out from
  the published numbers: not exactly (checked by linear algebra on all sums together, with the
  totals shared between tables counted once) and not by the bounds a reader knows (a ``<10``
  count is 1 to k-1, a ``*`` count at least k), e.g. two ``<10`` cells known to sum to 2.

Zeros are published: a zero is never a small cell. Suppressed values never leave this module.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.errors import OncoflowError

DIMENSIONS = ("modality", "body_part", "roi")
SMALL = "<{k}"
MASKED = "*"


@dataclass(frozen=True)
class SourceCounts:
    """Counts published in one cohort version's manifest."""

    site: str
    cohort: str
    version: str
    series: int
    patients: int
    by: dict[str, dict[str, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Row label: ``site/cohort``."""
        return f"{self.site}/{self.cohort}"

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], url: str = "") -> SourceCounts:
        """Read the counts of a Croissant manifest written by ``oncoflow publish``."""
        try:
            counts = manifest["counts"]
            by = {dim: dict(counts[f"by_{dim}"]["series"]) for dim in DIMENSIONS}
            version = str(manifest["version"]).split(".", 1)[0]
            return cls(
                site=str(manifest["site"]),
                cohort=str(manifest["cohort"]),
                version=f"v{version}",
                series=int(counts["series"]),
                patients=int(counts["patients"]),
                by=by,
                meta={
                    "title": manifest.get("name", ""),
                    "licence": manifest.get("license", ""),
                    "keywords": manifest.get("keywords", []),
                    "temporal": manifest.get("temporalCoverage", ""),
                    "url": url,
                },
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise OncoflowError(f"manifest at {url or 'input'} lacks counts ({exc})") from None


@dataclass
class CountSystem:
    """Published counts and the sums that link them (each sum: cells that add to a total)."""

    values: dict[str, int] = field(default_factory=dict)
    sums: list[tuple[tuple[str, ...], str]] = field(default_factory=list)

    def add(self, cell: str, value: int) -> None:
        """Add a count (a shared cell, e.g. a total used by two tables, must agree)."""
        if cell in self.values and self.values[cell] != value:
            raise OncoflowError(f"inconsistent counts for {cell}")
        self.values[cell] = value

    def add_sum(self, parts: Iterable[str], total: str) -> None:
        """Record that the counts ``parts`` add up to ``total``."""
        parts = tuple(parts)
        if sum(self.values[p] for p in parts) != self.values[total]:
            raise OncoflowError(f"counts do not add up to {total}")
        self.sums.append((parts, total))

    def equations(self) -> list[tuple[str, ...]]:
        """Every sum as the list of its cells (parts and total)."""
        return [(*parts, total) for parts, total in self.sums]


def _protected(system: CountSystem, suppressed: set[str], primary: set[str], k: int) -> list[str]:
    """Return the suppressed primary cells a reader could pin to one value (empty when safe)."""
    unknown = sorted(suppressed)
    if not unknown:
        return []
    index = {c: i for i, c in enumerate(unknown)}
    rows = []
    for parts, total in system.sums:
        coeffs = np.zeros(len(unknown))
        for cell, sign in [*((p, 1.0) for p in parts), (total, -1.0)]:
            if cell in index:
                coeffs[index[cell]] += sign
        if coeffs.any():
            rows.append(coeffs)
    exposed = []
    if rows:
        # a hidden count is determined by the sums iff the null space has no freedom along it
        matrix = np.array(rows)
        _, sing, vt = np.linalg.svd(matrix)
        rank = int((sing > 1e-9 * max(1.0, sing[0])).sum())
        null = vt[rank:].T  # columns span the null space
        for cell in unknown:
            if cell in primary and (null.shape[1] == 0 or np.abs(null[index[cell]]).max() < 1e-9):
                exposed.append(cell)
    # Bounds a reader knows: '<k' counts are 1..k-1, '*' counts at least k, the rest exact.
    # Propagating them through every sum gives valid bounds; a count whose bounds meet is
    # pinned (propagation may miss some pins that only linear programming finds).
    low = {
        c: (1 if c in primary else k) if c in suppressed else v for c, v in system.values.items()
    }
    high = {
        c: (k - 1 if c in primary else math.inf) if c in suppressed else v
        for c, v in system.values.items()
    }
    for _ in range(100):
        changed = False
        for parts, total in system.sums:
            # total = sum(parts); each part = total - sum(other parts)
            lo_sum = sum(low[p] for p in parts)
            hi_sum = sum(high[p] for p in parts)
            if lo_sum > low[total]:
                low[total], changed = lo_sum, True
            if hi_sum < high[total]:
                high[total], changed = hi_sum, True
            for p in parts:
                new_lo = low[total] - (hi_sum - high[p])
                new_hi = high[total] - (lo_sum - low[p])
                if new_lo > low[p]:
                    low[p], changed = new_lo, True
                if new_hi < high[p]:
                    high[p], changed = new_hi, True
        if not changed:
            break
    exposed_set = set(exposed)
    for cell in unknown:
        if cell in primary and cell not in exposed_set and high[cell] <= low[cell]:
            exposed.append(cell)
    return exposed


def suppress(system: CountSystem, k: int = 10) -> dict[str, int | str]:
    """Apply primary and complementary suppression to a system of counts.

    Parameters
    ----------
    system
        Counts and the sums linking them.
    k
        Smallest count released as is (counts 1..k-1 are suppressed).

    Returns
    -------
    dict
        Every cell's released value: the count, ``"<k"`` (small count) or ``"*"``
        (suppressed to protect a small count).
    """
    if k < 2:
        raise OncoflowError("k must be at least 2")
    primary = {c for c, v in system.values.items() if 0 < v < k}
    suppressed = set(primary)
    equations = system.equations()
    for _ in range(10 * len(system.values) + 10):
        changed = False
        for cells in equations:
            hidden = [c for c in cells if c in suppressed]
            if len(hidden) == 1:
                changed |= _add_complement(system, suppressed, cells)
        if changed:
            continue
        exposed = _protected(system, suppressed, primary, k)
        if not exposed:
            break
        cell = exposed[0]
        touching = [cells for cells in equations if cell in cells]
        if not any(_add_complement(system, suppressed, cells) for cells in touching):
            # every count around it is already hidden: hide the next smallest anywhere linked
            linked = {c for cells in touching for c in cells} | set(
                itertools.chain.from_iterable(
                    cells for cells in equations if set(cells) & {c for t in touching for c in t}
                )
            )
            candidates = sorted(
                (system.values[c], c) for c in linked if c not in suppressed and system.values[c]
            )
            if not candidates:
                break
            suppressed.add(candidates[0][1])
    small = SMALL.format(k=k)
    return {
        c: (small if c in primary else MASKED if c in suppressed else v)
        for c, v in system.values.items()
    }


def _add_complement(system: CountSystem, suppressed: set[str], cells: Sequence[str]) -> bool:
    candidates = sorted(
        (system.values[c], c) for c in cells if c not in suppressed and system.values[c] > 0
    )
    if not candidates:
        return False
    suppressed.add(candidates[0][1])
    return True


def build_system(sources: Sequence[SourceCounts]) -> tuple[CountSystem, dict[str, list[str]]]:
    """Lay the sources' counts out as tables linked by their sums.

    Returns
    -------
    tuple
        The system, and the categories (columns) of each dimension.
    """
    system = CountSystem()
    labels = [s.label for s in sources]
    if len(set(labels)) != len(labels):
        raise OncoflowError("two inputs publish the same site/cohort: give each once")
    for s in sources:
        system.add(f"series|{s.label}", s.series)
        system.add(f"patients|{s.label}", s.patients)
    system.add("series|*", sum(s.series for s in sources))
    system.add("patients|*", sum(s.patients for s in sources))
    system.add_sum([f"series|{label}" for label in labels], "series|*")
    system.add_sum([f"patients|{label}" for label in labels], "patients|*")
    columns: dict[str, list[str]] = {}
    for dim in DIMENSIONS:
        cats = sorted({c for s in sources for c in s.by[dim]})
        columns[dim] = cats
        for s in sources:
            for cat in cats:
                system.add(f"{dim}|{s.label}|{cat}", int(s.by[dim].get(cat, 0)))
        for cat in cats:
            system.add(f"{dim}|*|{cat}", sum(int(s.by[dim].get(cat, 0)) for s in sources))
        additive = dim != "roi"  # a series has one modality and body part, several ROIs
        row_total = "series" if additive else "roi-masks"
        if not additive:
            for s in sources:
                system.add(f"roi-masks|{s.label}", sum(int(v) for v in s.by[dim].values()))
            system.add("roi-masks|*", sum(system.values[f"roi-masks|{lab}"] for lab in labels))
            system.add_sum([f"roi-masks|{lab}" for lab in labels], "roi-masks|*")
        for s in sources:
            system.add_sum([f"{dim}|{s.label}|{c}" for c in cats], f"{row_total}|{s.label}")
        for cat in cats:
            system.add_sum([f"{dim}|{lab}|{cat}" for lab in labels], f"{dim}|*|{cat}")
        system.add_sum([f"{dim}|*|{c}" for c in cats], f"{row_total}|*")
    return system, columns


def federated_catalogue(sources: Sequence[SourceCounts], k: int = 10) -> dict[str, Any]:
    """Build the hub's catalogue of suppressed counts from published manifests.

    Parameters
    ----------
    sources
        Counts of each published cohort version (one per site and cohort).
    k
        Suppression threshold.

    Returns
    -------
    dict
        ``sources`` (site, cohort, version, title, licence, ...), and one table per dimension
        plus ``patients``: rows by ``site``/``cohort`` with per-category values and a total,
        column totals and the grand total. Values are counts or ``"<k"``/``"*"`` strings.
    """
    if not sources:
        raise OncoflowError("no published cohort to federate")
    sources = sorted(sources, key=lambda s: (s.site, s.cohort))
    system, columns = build_system(sources)
    released = suppress(system, k)
    tables: dict[str, Any] = {}
    for dim in DIMENSIONS:
        total = "series" if dim != "roi" else "roi-masks"
        tables[dim] = {
            "unit": "series" if dim != "roi" else "series with the ROI",
            "columns": columns[dim],
            "rows": [
                {
                    "site": s.site,
                    "cohort": s.cohort,
                    "values": {c: released[f"{dim}|{s.label}|{c}"] for c in columns[dim]},
                    "total": released[f"{total}|{s.label}"],
                }
                for s in sources
            ],
            "totals": {c: released[f"{dim}|*|{c}"] for c in columns[dim]},
            "total": released[f"{total}|*"],
        }
    tables["patients"] = {
        "unit": "patients",
        "rows": [
            {"site": s.site, "cohort": s.cohort, "total": released[f"patients|{s.label}"]}
            for s in sources
        ],
        "total": released["patients|*"],
    }
    return {
        "k": k,
        "legend": {
            SMALL.format(k=k): f"a count from 1 to {k - 1}",
            MASKED: "suppressed so that a small count cannot be worked out from the totals",
        },
        "sources": [
            {"site": s.site, "cohort": s.cohort, "version": s.version, **s.meta} for s in sources
        ],
        "tables": tables,
    }

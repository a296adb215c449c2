"""The hub's federated catalogue: counts by site, modality, body part and ROI, with suppression.

The hub reads only published manifests (counts, never rows). Each dimension is a table with
one row per published cohort version (``site/cohort``), one column per category, row totals,
column totals and a grand total. Before release:

* **primary suppression**: every count ``n`` with ``0 < n < k`` (default ``k = 10``) is shown
  as ``<10``;
* **complementary suppression**: every published sum (a row, a column, the totals) that
  contains a suppressed count gets at least one more suppressed count, chosen among the
  smallest counts ``>= k`` and shown as ``*``, until no suppressed small count can be worked
  out from the published numbers.

"Worked out" is checked exactly, as a reader would attack it: an integer program
(:func:`scipy.optimize.milp`) over every published number, every sum linking them (the totals
shared between tables counted once), the logical bounds between counts (a cell's patients
cannot exceed its series: ``patients <= series`` per site and in total; a series-with-ROI count
cannot exceed the site's series) and what a reader knows of suppressed counts (a ``<k`` count
is 1 to k-1, a ``*`` count at least k). For each suppressed small count it finds the smallest
and the largest feasible value; the count is protected when at least two whole values remain
(the interval is then a range inside 1..k-1, never one value). Instance counts are not
published by the hub, so ``series <= instances`` adds nothing here.

Zeros are published: a zero is never a small cell. Suppressed values never leave this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from tasks.errors import OncoflowError

DIMENSIONS = ("modality", "body_part", "roi")
SMALL = "<{k}"
MASKED = "*"
#: A count not shown at all (any value, zero included): the last resort when the sums and
#: bounds would pin a small count even with every count hidden.
WITHHELD = "-"


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
    #: ``(small, large)``: the count ``small`` can never exceed the count ``large``.
    bounds: list[tuple[str, str]] = field(default_factory=list)

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

    def add_bound(self, small: str, large: str) -> None:
        """Record that the count ``small`` never exceeds ``large`` (patients and series)."""
        if self.values[small] > self.values[large]:
            raise OncoflowError(f"{small} exceeds {large}")
        self.bounds.append((small, large))

    def equations(self) -> list[tuple[str, ...]]:
        """Every sum as the list of its cells (parts and total)."""
        return [(*parts, total) for parts, total in self.sums]


class ReaderProgram:
    """What a reader can infer from released counts: an integer program over the unknowns.

    The reader knows every released number, every sum and bound of the system, that a ``"<k"``
    count is 1..k-1 and a ``"*"`` count at least k, and that counts are whole numbers.
    """

    def __init__(self, system: CountSystem, released: Mapping[str, int | str], k: int) -> None:
        self.unknown = sorted(c for c, v in released.items() if isinstance(v, str))
        self.index = {c: i for i, c in enumerate(self.unknown)}
        self.released = released
        rows, low, high = [], [], []
        for terms, lo, hi in [
            *(
                ([*((p, 1.0) for p in parts), (total, -1.0)], 0.0, 0.0)
                for parts, total in system.sums
            ),
            *(([(small, 1.0), (large, -1.0)], -np.inf, 0.0) for small, large in system.bounds),
        ]:
            coeffs = np.zeros(len(self.unknown))
            known = 0.0
            for name, sign in terms:
                if name in self.index:
                    coeffs[self.index[name]] += sign
                else:
                    known += sign * int(released[name])
            if coeffs.any():
                rows.append(coeffs)
                low.append(lo - known)
                high.append(hi - known)
        small = SMALL.format(k=k)
        self.constraints = [LinearConstraint(np.array(rows), low, high)] if rows else []
        lowest = {small: 1.0, MASKED: float(k), WITHHELD: 0.0}
        self.bounds = Bounds(
            np.array([lowest[str(released[c])] for c in self.unknown]),
            np.array([k - 1.0 if released[c] == small else np.inf for c in self.unknown]),
        )

    def extreme(self, cell: str, largest: bool) -> int:
        """Return the smallest (or largest) value of ``cell`` consistent with the release."""
        if cell not in self.index:
            return int(self.released[cell])
        goal = np.zeros(len(self.unknown))
        goal[self.index[cell]] = -1.0 if largest else 1.0
        result = milp(
            goal,
            constraints=self.constraints,
            integrality=np.ones(len(self.unknown)),
            bounds=self.bounds,
        )
        if result.status != 0 or result.x is None:
            raise OncoflowError(f"suppression check failed for {cell}: {result.message}")
        return round(float(result.x[self.index[cell]]))

    def range(self, cell: str) -> tuple[int, int]:
        """Return the smallest and largest value of ``cell`` consistent with the release."""
        return self.extreme(cell, False), self.extreme(cell, True)

    def pinned(self, cell: str, value: int) -> bool:
        """Whether ``value`` (the true count) is the only value of ``cell`` a reader can infer.

        The true value is feasible, so one other feasible value settles it: the smallest is
        found first, the largest only when the smallest is the true value.
        """
        return self.extreme(cell, False) == value and self.extreme(cell, True) == value


def _released(
    system: CountSystem,
    suppressed: set[str],
    primary: set[str],
    k: int,
    withheld: frozenset[str] = frozenset(),
) -> dict[str, int | str]:
    small = SMALL.format(k=k)
    return {
        c: (
            WITHHELD
            if c in withheld
            else small
            if c in primary
            else MASKED
            if c in suppressed
            else v
        )
        for c, v in system.values.items()
    }


def _pinned(
    system: CountSystem,
    suppressed: set[str],
    primary: set[str],
    k: int,
    safe: set[str],
    withheld: frozenset[str] = frozenset(),
) -> Iterator[str]:
    """Yield the suppressed small counts a reader could pin to one value.

    Cells found protected are added to ``safe`` and not checked again: hiding more counts only
    widens what a reader can infer, so a protected cell stays protected.
    """
    program = ReaderProgram(system, _released(system, suppressed, primary, k, withheld), k)
    for cell in sorted(primary - safe):
        if program.pinned(cell, system.values[cell]):
            yield cell
        else:
            safe.add(cell)


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
    safe: set[str] = set()
    groups = [*system.equations(), *system.bounds]
    for _ in range(len(system.values) + 10):
        # a sum with one hidden count gives it away: hide one more there first
        changed = False
        for cells in system.equations():
            if sum(c in suppressed for c in cells) == 1:
                changed |= _add_complement(system, suppressed, cells)
        if changed:
            continue
        fixed = exposed = False
        for cell in _pinned(system, suppressed, primary, k, safe):
            exposed = True
            # hide the smallest count of a sum or bound of the pinned count (one per round)
            if any(_add_complement(system, suppressed, g) for g in groups if cell in g):
                fixed = True
                break
        if not exposed:
            return _released(system, suppressed, primary, k)
        if not fixed:
            # every count around it is hidden: hide the smallest count next to a hidden one
            frontier = sorted(
                (system.values[c], c)
                for g in groups
                if suppressed & set(g)
                for c in g
                if c not in suppressed and system.values[c] > 0
            )
            if not frontier:
                break
            suppressed.add(frontier[0][1])
    # Last resort: hide every count, then show pinned small counts (and, if still pinned, every
    # count of their sums and bounds, zeros included) as WITHHELD: any value, no bounds.
    suppressed |= {c for c, v in system.values.items() if v > 0}
    withheld: set[str] = set()
    for _ in range(len(system.values) + 1):
        pinned = set(_pinned(system, suppressed, primary, k, set(), frozenset(withheld)))
        if not pinned:
            return _released(system, suppressed, primary, k, frozenset(withheld))
        fresh = pinned - withheld
        if not fresh:
            fresh = {c for g in groups if pinned & set(g) for c in g} - withheld
        if not fresh:
            break
        withheld |= fresh
    raise OncoflowError("these counts cannot be released without revealing a small count")


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
    for label in [*labels, "*"]:
        system.add_bound(f"patients|{label}", f"series|{label}")
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
            if not additive:  # a site's series with one ROI are some of its series
                for cat in cats:
                    system.add_bound(f"{dim}|{s.label}|{cat}", f"series|{s.label}")
        if not additive:
            for cat in cats:
                system.add_bound(f"{dim}|*|{cat}", "series|*")
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
            WITHHELD: "not shown (any count, zero included): the totals would reveal it",
        },
        "sources": [
            {"site": s.site, "cohort": s.cohort, "version": s.version, **s.meta} for s in sources
        ],
        "tables": tables,
    }

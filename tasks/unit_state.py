"""What a stage knows about its units from the last run: skip unchanged units without a task.

A per-unit stage (deidentify, harmonise) records, for each unit it finished ``ok``, a digest
of everything the unit's output depends on (inputs, settings, code version) and a little state
(audit counts, content digest, quarantine rows of masks). The next run computes the digests in
the flow, from tables only, and reuses the outcome of every unit whose digest is unchanged and
whose outputs are still in the store; only the other units become tasks. An unchanged re-run
therefore submits no task at all, and a 1 % increment submits 1 % of them.

The state is the table ``<stage>/units.parquet`` (a folder of parts, :mod:`tasks.table_parts`):
``unit`` (the pseudonymous unit key), ``digest`` (keyed: no plain hash of anything private) and
the stage's own columns (pseudonymous keys, hashes and counts only, each value in its own cell
so the leak gate reads them as it reads the stage tables). It is written after the stage's own
tables, so a crash in between leaves old digests: those units run again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from tasks.store import SiteStore
from tasks.table_parts import PartedTable

Unit = TypeVar("Unit")
Outcome = TypeVar("Outcome")

UNIT_COLUMNS = [("unit", pa.string()), ("digest", pa.string())]


@lru_cache(maxsize=8)
def code_digest(folder: str) -> str:
    """Return a hash of the sources (``*.py``, ``*.txt``) of a package folder.

    Any change of the code that makes a stage's outputs changes its units' digests.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.suffix in (".py", ".txt"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def keyed_digest(key: bytes, *parts: Any) -> str:
    """Return HMAC-SHA256 (hex, 32 characters) of the JSON of ``parts`` under ``key``."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class UnitState:
    """The ``<stage>/units.parquet`` table of one stage.

    Parameters
    ----------
    store
        The site store.
    key
        The table's key (``deid/units.parquet``).
    columns
        The stage's state columns (besides ``unit`` and ``digest``).
    """

    store: SiteStore
    key: str
    columns: pa.Schema

    @property
    def schema(self) -> pa.Schema:
        """Schema of the table: ``unit``, ``digest`` and the stage's columns."""
        return pa.schema([*UNIT_COLUMNS, *self.columns])

    @property
    def table(self) -> PartedTable:
        """The table in parts (rows ordered by unit)."""
        return PartedTable(self.store, self.key, ("unit",))

    def read(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Return unit -> (digest, state columns) of the last run (empty when there is none)."""
        self.table.recover()
        table = self.store.read_table(self.key)
        if table is None or table.num_rows == 0:
            return {}
        names = self.columns.names
        return {
            row["unit"]: (row["digest"], {n: row[n] for n in names})
            for row in table.select(["unit", "digest", *names]).to_pylist()
        }

    def write(
        self,
        entries: Mapping[str, tuple[str, dict[str, Any]]],
        previous: Mapping[str, tuple[str, dict[str, Any]]],
    ) -> bool:
        """Record this run's units (only the rows that differ from ``previous`` are written).

        Parameters
        ----------
        entries
            Unit -> (digest, state columns) of every unit to remember (units not in it are
            forgotten); the state values as :meth:`read` returns them (lists, dicts).
        previous
            What :meth:`read` returned at the start of the run.

        Returns
        -------
        bool
            True when the table changed.
        """
        changed = sorted(u for u, entry in entries.items() if previous.get(u) != entry)
        rows = pa.Table.from_pylist(
            [{"unit": u, "digest": entries[u][0], **entries[u][1]} for u in changed],
            schema=self.schema,
        )
        return self.table.update(rows, sorted(set(previous) - set(entries)), key="unit")


def plan_reuse(
    units: Sequence[Unit],
    digest: Callable[[Unit], str | None],
    label: Callable[[Unit], str],
    previous: Mapping[str, tuple[str, dict[str, Any]]],
    reuse: Callable[[Unit, dict[str, Any]], Outcome | None],
) -> dict[int, Outcome]:
    """Reuse the outcome of each unit whose digest equals the one recorded last time.

    Parameters
    ----------
    units
        The plan.
    digest
        The unit's digest now (None: unknown, always compute).
    label
        The unit's key in the state table.
    previous
        :meth:`UnitState.read`.
    reuse
        Rebuilds the outcome from the recorded state, or None when it cannot (an output is
        missing, the stage table lost its row): then the unit is computed.

    Returns
    -------
    dict
        Plan index -> reused outcome (for :func:`flows.stage.run_units`).
    """
    reused: dict[int, Outcome] = {}
    for i, unit in enumerate(units):
        now = digest(unit)
        recorded = previous.get(label(unit))
        if now is None or recorded is None or recorded[0] != now:
            continue
        outcome = reuse(unit, recorded[1])
        if outcome is not None:
            reused[i] = outcome
    return reused


#: Files an increment may hold and still be computed in the command's own process.
IN_PROCESS_FILES = 256


def needs_workers(todo_sizes: Sequence[int], planned: int) -> bool:
    """Whether the units left to compute are worth starting Dask workers for.

    Starting a cluster costs seconds of start-up and imports; a nightly increment of at most
    1 % of the units (at least one) and :data:`IN_PROCESS_FILES` files is computed in the
    command's own process instead (as ingest parses a small increment itself).

    Parameters
    ----------
    todo_sizes
        Files of each unit to compute.
    planned
        Units in the plan (computed and reused).
    """
    if not todo_sizes:
        return False
    return len(todo_sizes) > max(1, planned // 100) or sum(todo_sizes) > IN_PROCESS_FILES

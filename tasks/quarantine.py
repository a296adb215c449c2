"""The quarantine table: replacing a stage's rows, and looking items up by reference.

``quarantine.parquet`` is a folder of parts (:mod:`tasks.table_parts`), each holding one
stage's rows sorted, so a stage replaces only its own parts and the same records give the same
bytes. (The store reads it like any table: :meth:`tasks.store.SiteStore.quarantine_rows`.)

Artifacts list quarantined items (source paths, original series UIDs: identifying) by a keyed
reference (:mod:`tasks.refs`: HMAC under the site's reference key, never a plain hash).
``oncoflow quarantine --site S --store URL [REF]`` computes the references of
``quarantine.parquet`` with the same key and prints the matching rows on the site's host.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from tasks.dicom.listing import item_ref
from tasks.records import Kind, QuarantineRecord, Reason, Stage
from tasks.refs import site_ref_key
from tasks.store import QUARANTINE, QUARANTINE_SCHEMA, QUARANTINE_SORT, SiteStore, empty_table
from tasks.table_parts import PartedTable

#: Detail of an ``undecodable-name`` quarantine row (one line, no name in it).
UNDECODABLE_DETAIL = (
    "file name is not UTF-8 (a legacy code page such as Latin-1, ISO-8859-2, Windows-1250 or "
    "CP1253); rename it to UTF-8, e.g. convmv -r -f cp1250 -t utf-8 --notest SOURCE, and ingest "
    "again"
)


def undecodable_record(item: str, kind: Kind = Kind.FILE) -> QuarantineRecord:
    r"""Return the ingest quarantine record of a source file whose name is not UTF-8.

    Parameters
    ----------
    item
        The file's source-relative path escaped with :func:`tasks.dicom.listing.escape_name`
        (``Sz\xf5ke.dcm``).
    kind
        ``file`` for a DICOM source, ``volume`` for a NIfTI/NRRD one.
    """
    return QuarantineRecord(item, kind, Stage.INGEST, Reason.UNDECODABLE_NAME, UNDECODABLE_DETAIL)


def replace_quarantine(store: SiteStore, stage: Stage, records: list[QuarantineRecord]) -> bool:
    """Replace the quarantine rows of one stage, keeping the other stages' rows.

    Returns
    -------
    bool
        True when the table changed.
    """
    return replace_quarantine_rows(store, stage, [r.to_row() for r in records])


def replace_quarantine_rows(store: SiteStore, stage: Stage, rows: list[dict[str, Any]]) -> bool:
    """:func:`replace_quarantine` with rows (``QUARANTINE_SCHEMA`` dicts) of ``stage``.

    Returns
    -------
    bool
        True when the table changed.

    Raises
    ------
    ValueError
        When a row belongs to another stage.
    """
    if any(r["stage"] != str(stage) for r in rows):
        raise ValueError(f"quarantine rows of another stage than {stage}")
    table = (
        pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)
        if rows
        else empty_table(QUARANTINE_SCHEMA)  # converting no values would import pandas
    )
    parted = PartedTable(store, QUARANTINE, QUARANTINE_SORT)
    return parted.update(table, [str(stage)], key="stage")


@dataclass(frozen=True)
class QuarantineEntry:
    """One row of ``quarantine.parquet`` with its reference (private: ``item`` may identify)."""

    ref: str
    stage: str
    kind: str
    reason: str
    detail: str
    item: str

    def to_dict(self) -> dict[str, str]:
        """Return a JSON-serialisable dict."""
        return asdict(self)


def lookup(store: SiteStore, ref: str | None = None) -> list[QuarantineEntry]:
    """Return the quarantine rows of the site (those whose reference starts with ``ref``).

    Parameters
    ----------
    store
        The site's store.
    ref
        A reference from a run's quarantine table, or a prefix of one; None for every row.
    """
    if not store.exists(QUARANTINE):
        return []
    key = site_ref_key(store)
    wanted = (ref or "").strip().lower()
    entries = [
        QuarantineEntry(
            ref=item_ref(row["item"], key),
            stage=row["stage"],
            kind=row["kind"],
            reason=row["reason"],
            detail=row["detail"],
            item=row["item"],
        )
        for row in store.quarantine_rows()
    ]
    return sorted(
        (e for e in entries if e.ref.startswith(wanted)),
        key=lambda e: (e.stage, e.reason, e.ref),
    )

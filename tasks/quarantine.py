"""Looking quarantined items up by the reference a run's artifacts show.

Artifacts list quarantined items (source paths, original series UIDs: identifying) by a keyed
reference (:mod:`tasks.refs`: HMAC under the site's reference key, never a plain hash).
``oncoflow quarantine --site S --store URL [REF]`` computes the references of
``quarantine.parquet`` with the same key and prints the matching rows on the site's host.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tasks.dicom.listing import item_ref
from tasks.refs import site_ref_key
from tasks.store import QUARANTINE, SiteStore


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

"""The de-identification audit: what was done to which attribute, how often — never values."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

AUDIT_SCHEMA = pa.schema(
    [("attribute", pa.string()), ("action", pa.string()), ("count", pa.int64())]
)


def audit_table(counts: Counter[tuple[str, str]]) -> pa.Table:
    """Return ``deid/audit.parquet`` rows sorted by (attribute, action).

    Parameters
    ----------
    counts
        ``(attribute, action) -> count``; attributes are keywords, ``(GGGG,EEEE)`` tags or
        ``(GGGG,xxxx)`` private groups.
    """
    rows = [
        {"attribute": attribute, "action": action, "count": int(count)}
        for (attribute, action), count in sorted(counts.items())
    ]
    return pa.Table.from_pylist(rows, schema=AUDIT_SCHEMA)


def audit_summary_rows(counts: Counter[tuple[str, str]]) -> list[dict[str, object]]:
    """Totals per action (for the run summary artifact)."""
    per_action: Counter[str] = Counter()
    for (_attribute, action), count in counts.items():
        per_action[action] += count
    return [{"action": a, "count": n} for a, n in sorted(per_action.items())]

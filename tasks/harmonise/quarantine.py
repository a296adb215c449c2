"""The exception that turns bad input into a quarantine record with a reason code."""

from __future__ import annotations

from tasks.records import Reason


class Quarantined(Exception):
    """Input that cannot be harmonised faithfully.

    Raised by the per-series helpers and caught by the series task, which records it in
    ``quarantine.parquet`` instead of failing the run.

    Parameters
    ----------
    reason
        Machine-readable reason code.
    detail
        Short explanation without identifying values.
    """

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail

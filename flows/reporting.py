"""What a run shows: Prefect artifacts (markdown summary, tables, progress) and terminal progress.

Every text produced here is built from counts, reason codes and pseudonymous keys only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from tasks.records import StageSummary


def artifact_key(*parts: str) -> str:
    """Return a Prefect artifact key (lowercase letters, digits and dashes)."""
    raw = "-".join(p for p in parts if p).lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in raw).strip("-")


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: list[str]) -> str:
    """Render rows as a GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def summary_markdown(summary: StageSummary, title: str, sections: Mapping[str, str] = {}) -> str:
    """Render a stage summary as markdown: counts by status, then by reason, then extra sections."""
    parts = [f"# {title}", f"Site `{summary.site}`, stage `{summary.stage}`.", "## Outcomes"]
    parts.append(
        markdown_table(
            [{"status": k, "count": v} for k, v in summary.counts.items()], ["status", "count"]
        )
    )
    if summary.reasons:
        parts.append("## Quarantine and failures by reason")
        parts.append(
            markdown_table(
                [{"reason": k, "count": v} for k, v in summary.reasons.items()],
                ["reason", "count"],
            )
        )
    for heading, body in sections.items():
        parts.extend([f"## {heading}", body])
    return "\n\n".join(parts)


def post_summary(summary: StageSummary, title: str, sections: Mapping[str, str] = {}) -> None:
    """Post the markdown summary artifact of a stage run (key ``<site>-<stage>-summary``)."""
    create_markdown_artifact(
        markdown=summary_markdown(summary, title, sections),
        key=artifact_key(summary.site, str(summary.stage), "summary"),
        description=title,
    )


def post_table(site: str, stage: str, name: str, rows: list[dict[str, Any]], title: str) -> None:
    """Post a table artifact (key ``<site>-<stage>-<name>``); an empty table gets one note row."""
    create_table_artifact(
        table=rows or [{"note": "none"}],
        key=artifact_key(site, stage, name),
        description=title,
    )


class Progress:
    """A Prefect progress artifact, updated in place, mirrored on the terminal when it is a TTY.

    Parameters
    ----------
    total
        Number of units expected.
    description
        What is being counted (no identifiers).
    """

    def __init__(self, total: int, description: str) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.description = description
        self._artifact_id = create_progress_artifact(progress=0.0, description=description)
        self._tty = sys.stderr.isatty()

    def advance(self, n: int = 1) -> None:
        """Mark ``n`` more units done."""
        self.done += n
        pct = min(100.0, 100.0 * self.done / self.total)
        if self._artifact_id is not None:
            update_progress_artifact(artifact_id=self._artifact_id, progress=pct)
        if self._tty:
            sys.stderr.write(f"\r{self.description}: {self.done}/{self.total} ({pct:.0f}%)")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()

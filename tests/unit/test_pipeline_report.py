"""The site pipeline's run report: counted units apart, and counts that add up."""

from __future__ import annotations

from flows.pipeline import report_markdown, report_rows
from tasks.records import Stage, StageSummary


def _summaries() -> list[StageSummary]:
    """The stage summaries of one demo site (numbers from a real run)."""
    return [
        StageSummary(
            Stage.INGEST,
            "site-a",
            {"ok": 291, "quarantined": 7},
            {"dicomdir": 1, "localizer": 1, "missing-slice": 1, "not-dicom": 2},
            extra={
                "series": {"ok": 22, "quarantined": 3},
                "reasons_by_kind": {
                    "file": {"dicomdir": 1, "empty-file": 1, "localizer": 1, "not-dicom": 4},
                    "series": {"inconsistent-spacing": 1, "localizer": 1, "missing-slice": 1},
                },
            },
        ),
        StageSummary(
            Stage.DEIDENTIFY, "site-a", {"ok": 21, "quarantined": 1}, {"burned-in-annotation": 1}
        ),
        StageSummary(
            Stage.HARMONISE,
            "site-a",
            {"ok": 12, "quarantined": 1},
            {"missing-suv-data": 1},
            extra={"masks": 6},
        ),
        StageSummary(
            Stage.EXTRACT,
            "site-a",
            {"ok": 6},
            extra={"params": "preset:ct", "modalities": "CT"},
        ),
    ]


def _total(text: str) -> int:
    return sum(int(part.split()[-1]) for part in text.split(", ") if part != "-")


def test_files_and_series_are_reported_apart_and_add_up() -> None:
    rows = report_rows(_summaries())
    assert [(r["stage"], r["counted"]) for r in rows] == [
        ("ingest", "files"),
        ("ingest", "series"),
        ("deidentify", "series"),
        ("harmonise", "image series"),
        ("extract", "ROIs"),
    ]
    files, series = rows[0], rows[1]
    # quarantined files = file-level reasons; quarantined series = series-level reasons
    assert files["outcomes"] == "ok 291, quarantined 7" and _total(files["reasons"]) == 7
    assert series["outcomes"] == "ok 22, quarantined 3" and _total(series["reasons"]) == 3
    harmonise = rows[3]
    assert harmonise["note"].startswith("13 of the 21 de-identified series are images")
    assert "the other 8" in harmonise["note"] and "6 masks" in harmonise["note"]
    assert rows[4]["note"] == "preset:ct; modalities CT"


def test_report_tells_how_to_look_a_reference_up() -> None:
    text = report_markdown("site-a", _summaries())
    assert "| ingest | series | ok 22, quarantined 3 |" in text
    assert "`oncoflow quarantine --site site-a --store STORE REF`" in text

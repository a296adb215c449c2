import pytest

from flows.stage import check_failure_ratio
from tasks.errors import StageFailed
from tasks.records import Stage, StageSummary, Status, UnitResult


def test_summary_counts_reasons_and_round_trip():
    results = [
        UnitResult("a", Status.OK),
        UnitResult("b", Status.QUARANTINED, reason="empty-mask"),
        UnitResult("c", Status.FAILED, error_class="ValueError"),
        UnitResult("d", Status.QUARANTINED, reason="empty-mask"),
        UnitResult("e", Status.OK, computed=False),
    ]
    summary = StageSummary.from_results(
        Stage.HARMONISE, "site-a", results, tables_written=["t.parquet"], masks=3
    )
    assert summary.counts == {"failed": 1, "ok": 2, "quarantined": 2}
    assert summary.reasons == {"empty-mask": 2}
    assert summary.errors == {"ValueError": 1}
    assert (summary.computed, summary.reused) == (1, 1)
    assert summary.failure_ratio == 0.2
    back = StageSummary.from_dict(Stage.HARMONISE, "site-a", summary.to_dict())
    assert back == summary
    assert back.extra == {"masks": 3}
    assert back.tables_written == ["t.parquet"]


def test_failure_ratio_names_the_count_and_error_classes():
    results = [UnitResult("a", Status.OK), UnitResult("b", Status.FAILED, error_class="OSError")]
    summary = StageSummary.from_results(Stage.EXTRACT, "site-a", results)
    check_failure_ratio(summary, 0.5, "ROIs")
    expected = r"^extract: 1 of 2 ROIs failed \(50% > 10%\): OSError=1$"
    with pytest.raises(StageFailed, match=expected):
        check_failure_ratio(summary, 0.1, "ROIs")


def test_quarantine_kind_is_an_enum_and_a_plain_string_in_the_table():
    from tasks.records import Kind, QuarantineRecord, Reason, Stage

    record = QuarantineRecord("s1", "series", Stage.INGEST, Reason.LOCALIZER)
    assert record.kind is Kind.SERIES
    row = record.to_row()
    assert row["kind"] == "series" and type(row["kind"]) is str
    with pytest.raises(ValueError):
        QuarantineRecord("s1", "serie", Stage.INGEST, Reason.LOCALIZER)

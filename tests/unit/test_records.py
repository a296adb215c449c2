from tasks.records import Stage, StageSummary, Status, UnitResult


def test_summary_counts_reasons_and_round_trip():
    results = [
        UnitResult("a", Status.OK),
        UnitResult("b", Status.QUARANTINED, reason="empty-mask"),
        UnitResult("c", Status.FAILED, error_class="ValueError"),
        UnitResult("d", Status.QUARANTINED, reason="empty-mask"),
    ]
    summary = StageSummary.from_results(Stage.HARMONISE, "site-a", results, series_computed=3)
    assert summary.counts == {"failed": 1, "ok": 1, "quarantined": 2}
    assert summary.reasons == {"empty-mask": 2}
    assert summary.failure_ratio == 0.25
    back = StageSummary.from_dict(Stage.HARMONISE, "site-a", summary.to_dict())
    assert back == summary
    assert back.extra == {"series_computed": 3}

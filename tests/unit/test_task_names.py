"""Task-run names: stage, modality, ROIs and the end of a pseudonymous key, nothing else."""

from __future__ import annotations

from tasks.harmonise.series import SeriesUnit
from tasks.names import task_label

KEY = "2.25.204073325942373916405396997460130459818"


def test_label_shows_modality_rois_and_the_key_tail() -> None:
    assert task_label("CT", KEY) == "CT-459818"
    assert task_label("MR", KEY, "gtv+lung left") == "MR-gtv+lung_left-459818"
    assert task_label("", KEY) == "?-459818"
    assert len(task_label("CT", KEY, "r" * 200)) < 50


def test_harmonise_tasks_are_named_by_modality_and_key() -> None:
    unit = SeriesUnit(series=KEY, keys=(), meta={"modality": "PT"})
    assert f"harmonise-{unit.label}" == "harmonise-PT-459818"

"""Task-run names: stage, modality, ROIs and the end of a pseudonymous key, nothing else."""

from __future__ import annotations

from tasks.harmonise.series import SeriesUnit
from tasks.names import group_label, task_label

KEY = "2.25.204073325942373916405396997460130459818"


def test_label_shows_modality_rois_and_the_key_tail() -> None:
    assert task_label("CT", KEY) == "CT-459818"
    assert task_label("MR", KEY, "gtv+lung left") == "MR-gtv+lung_left-459818"
    assert task_label("", KEY) == "?-459818"
    assert len(task_label("CT", KEY, "r" * 200)) < 50


def test_harmonise_tasks_are_named_by_modality_and_key() -> None:
    unit = SeriesUnit(series=KEY, keys=(), meta={"modality": "PT"})
    assert f"harmonise-{unit.label}" == "harmonise-PT-459818"


def test_a_group_is_named_by_its_modalities_count_and_first_key() -> None:
    other = "2.25.99887766554433221100"
    assert group_label([("CT", KEY), ("CT", other)]) == "CT-x2-459818"
    assert group_label([("SR", other), ("CT", KEY), ("", KEY)]) == "?+CT+SR-x3-221100"
    assert group_label([]) == "?-x0"

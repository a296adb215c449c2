import random

import numpy as np
import pytest
from pydicom.uid import generate_uid

from tasks.dicom.headers import parse_files
from tasks.dicom.listing import list_source
from tasks.dicom.series import build_series, check_spacing, slice_normal, slice_offsets
from tests.dicom_factory import ct_dataset, write, write_series

OBLIQUE = (1.0, 0.0, 0.0, 0.0, 0.8, -0.6)


def test_normal_and_offsets_of_an_oblique_plane():
    normal = slice_normal(OBLIQUE)
    assert np.allclose(normal, [0.0, 0.6, 0.8])
    origin = np.array([5.0, -3.0, 2.0])
    positions = [origin + k * 2.5 * normal for k in (0, 1, 2)]
    assert np.allclose(
        slice_offsets(positions, OBLIQUE) - slice_offsets([origin], OBLIQUE), [0, 2.5, 5]
    )


def test_degenerate_orientation():
    with pytest.raises(ValueError):
        slice_normal((1, 0, 0, 1, 0, 0))


@pytest.mark.parametrize(
    ("offsets", "reason", "spacing"),
    [
        ([0, 5, 10, 15, 20], "", 5.0),
        ([20, 0, 10, 5, 15], "", 5.0),  # order does not matter
        ([0, 5.004, 10, 14.996, 20], "", 5.0),  # within 1 % of the median gap
        ([0], "", None),
        ([0, 5, 10, 20, 25, 30], "missing-slice", 5.0),
        ([0, 5, 10, 25, 30, 35, 40, 45, 50], "missing-slice", 5.0),  # two slices in one gap
        ([0, 5, 10, 15, 21.5, 25, 32, 37], "inconsistent-spacing", 5.0),
        ([0, 5, 10, 15, 20, 22.5, 25, 27.5, 30, 32.5], "inconsistent-spacing", 2.5),
        ([0, 5, 5, 10], "duplicate-position", None),
    ],
)
def test_check_spacing(offsets, reason, spacing):
    check = check_spacing(offsets, tolerance=0.01)
    assert check.reason == reason
    assert check.spacing == spacing
    assert bool(check.detail) == bool(reason)


def test_many_missing_slices_are_inconsistent_spacing_not_missing_slices():
    # every other slice gone: gaps alternate 5 and 10 mm
    offsets = [0, 5, 15, 20, 30, 35, 45, 50, 60]
    assert check_spacing(offsets, 0.01).reason == "inconsistent-spacing"


def _rows(folder):
    return parse_files(str(folder), list_source(str(folder)))


def test_series_sorted_along_the_normal_not_by_instance_number(tmp_path):
    write_series(tmp_path / "s", 6, spacing=2.0, orientation=OBLIQUE, reverse_numbers=True)
    build = build_series(_rows(tmp_path))
    (series,) = build.series
    assert series["status"] == "ok"
    assert series["kind"] == "image"
    assert series["slice_spacing"] == pytest.approx(2.0)
    assert series["paths"] == [f"s/IM{i:04d}.dcm" for i in range(1, 7)]
    assert series["n_instances"] == 6 and series["n_frames"] == 6
    assert series["image_orientation"] == list(OBLIQUE)
    assert build.quarantine == []


def test_missing_slice_and_irregular_series_are_quarantined(tmp_path):
    write_series(tmp_path / "missing", 0, offsets=[0, 2.5, 5, 10, 12.5, 15, 17.5])
    write_series(tmp_path / "irregular", 0, offsets=[0, 2.5, 5, 8.25, 10, 12.5, 16, 18.5])
    build = build_series(_rows(tmp_path))
    by_reason = {s["reason"]: s for s in build.series}
    assert set(by_reason) == {"missing-slice", "inconsistent-spacing"}
    assert all(s["status"] == "quarantined" for s in build.series)
    items = {(q.item, q.kind, str(q.reason)) for q in build.quarantine}
    assert items == {(s["series_key"], "series", s["reason"]) for s in build.series}
    # the files themselves are fine
    assert all(r["status"] == "ok" for r in build.instances)


def test_localizer_is_split_out_and_the_rest_stays_ok(tmp_path):
    uid, study = generate_uid(), generate_uid()
    write_series(tmp_path / "s", 5, series_uid=uid, study_uid=study)
    scout = ct_dataset(
        series_uid=uid,
        study_uid=study,
        orientation=(1, 0, 0, 0, 0, -1),
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        instance_number=0,
    )
    write(scout, tmp_path / "s" / "IM0000.dcm")
    build = build_series(_rows(tmp_path))
    keys = {s["series_key"]: s for s in build.series}
    assert set(keys) == {uid, uid + ":localizer"}
    assert keys[uid]["status"] == "ok" and keys[uid]["n_instances"] == 5
    assert keys[uid + ":localizer"]["status"] == "quarantined"
    assert keys[uid + ":localizer"]["paths"] == ["s/IM0000.dcm"]
    scout_row = next(r for r in build.instances if r["path"] == "s/IM0000.dcm")
    assert (scout_row["status"], scout_row["reason"]) == ("quarantined", "localizer")
    assert [(q.item, q.kind, str(q.reason)) for q in build.quarantine] == [
        ("s/IM0000.dcm", "file", "localizer")
    ]


def test_duplicate_instance_keeps_the_first_path(tmp_path):
    paths = write_series(tmp_path / "s", 4)
    (tmp_path / "s" / "IM0002.dcm.bak").write_bytes(paths[1].read_bytes())
    build = build_series(_rows(tmp_path))
    dup = [r for r in build.instances if r["status"] == "quarantined"]
    assert [(r["path"], r["reason"]) for r in dup] == [("s/IM0002.dcm.bak", "duplicate-instance")]
    (series,) = build.series
    assert series["status"] == "ok" and series["n_instances"] == 4


def test_derived_reasons_are_recomputed(tmp_path):
    paths = write_series(tmp_path / "s", 3)
    (tmp_path / "s" / "IM0002.dcm.bak").write_bytes(paths[1].read_bytes())
    first = build_series(_rows(tmp_path))
    # the original disappears: the copy is no longer a duplicate
    remaining = [dict(r) for r in first.instances if r["path"] != "s/IM0002.dcm"]
    second = build_series(remaining)
    copy = next(r for r in second.instances if r["path"] == "s/IM0002.dcm.bak")
    assert (copy["status"], copy["reason"]) == ("ok", "")
    assert second.series[0]["paths"] == ["s/IM0001.dcm", "s/IM0002.dcm.bak", "s/IM0003.dcm"]


def test_orientation_and_size_changes_are_caught(tmp_path):
    uid, study = generate_uid(), generate_uid()
    write_series(tmp_path / "a", 3, series_uid=uid, study_uid=study)
    odd = ct_dataset(series_uid=uid, study_uid=study, position=(0, 0, 50), rows=16, columns=16)
    write(odd, tmp_path / "a" / "IM0009.dcm")
    uid2 = generate_uid()
    write_series(tmp_path / "b", 3, series_uid=uid2, study_uid=study)
    tilted = ct_dataset(
        series_uid=uid2, study_uid=study, position=(0, 0, 60), orientation=(1, 0, 0, 0, 0.8, -0.6)
    )
    write(tilted, tmp_path / "b" / "IM0009.dcm")
    reasons = {s["series_key"]: s["reason"] for s in build_series(_rows(tmp_path)).series}
    assert reasons == {uid: "inconsistent-geometry", uid2: "inconsistent-orientation"}


def test_result_does_not_depend_on_row_order(tmp_path):
    write_series(tmp_path / "a", 5)
    write_series(tmp_path / "b", 0, offsets=[0, 2.5, 7.5, 10])
    rows = _rows(tmp_path)
    reference = build_series(rows)
    shuffled = list(rows)
    random.Random(3).shuffle(shuffled)
    again = build_series(shuffled)
    assert again.series == reference.series
    assert again.instances == reference.instances
    assert again.quarantine == reference.quarantine


def test_kinds_from_sop_class_and_frames():
    def row(path, uid, sop, **extra):
        base = {"status": "ok", "reason": "", "detail": "", "instance_number": 1}
        return {**base, "path": path, "series_instance_uid": uid, "sop_instance_uid": path,
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1." + sop, **extra}  # fmt: skip

    axial = [1, 0, 0, 0, 1, 0]
    rows = [
        row("rt", "1", "481.3"),
        row("seg", "2", "66.4", number_of_frames=4, rows=8),
        row("sc", "3", "7", rows=8),
        row(
            "mf",
            "4",
            "4.1",
            number_of_frames=3,
            rows=8,
            image_orientation=axial,
            frame_positions=[[0, 0, 0], [0, 0, 2], [0, 0, 6]],
        ),
        row("sr", "5", "88.11"),
    ]
    build = build_series(rows)
    kinds = {s["series_key"]: (s["kind"], s["reason"]) for s in build.series}
    assert kinds == {
        "1": ("rtstruct", ""),
        "2": ("seg", ""),
        "3": ("secondary", ""),
        "4": ("multiframe", "inconsistent-spacing"),
        "5": ("other", ""),
    }
    assert next(s for s in build.series if s["series_key"] == "2")["n_frames"] == 4

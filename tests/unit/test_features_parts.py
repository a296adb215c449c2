"""The features table in parts: a run rewrites the parts its changed rows were in, no others."""

import json
import math
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import tasks.radiomics.table_writer as table_writer
from tasks.radiomics.extract import RoiUnit
from tasks.radiomics.params import validate_params
from tasks.radiomics.table import FeatureRow, features_key, table_metadata, written_with
from tasks.radiomics.table_writer import features_parts, plan_features, write_features_table
from tasks.store import SiteStore
from tests.kill_switch import KILL_AT_STORE_CALL
from tests.unit.test_table_parts import Crash, crash_store_at

PARAMS = validate_params({"setting": {"binWidth": 25}, "imageType": {"Original": {}}})
KEY = features_key(PARAMS.params_hash())


def unit(i: int, roi: str = "gtv", mask: str = "m") -> RoiUnit:
    series = f"2.25.{1000 + i}"
    return RoiUnit(
        series=series,
        study="2.25.9",
        patient=f"p-{i % 7}",
        modality="CT",
        roi=roi,
        image=f"harmonised/{series}/image.nii.gz",
        mask=f"harmonised/{series}/mask-{roi}.nii.gz",
        image_sha256=f"{i:064x}",
        mask_sha256=mask * 64,
        voxels=1000,
    )


def row(i: int, mask: str = "m", scale: float = 1.0) -> FeatureRow:
    if i % 50 == 7:  # a few quarantined ROIs: no features, null columns
        return FeatureRow(unit(i, mask=mask), "quarantined", "empty-mask", "no voxel")
    values = {"original_shape_VoxelVolume": 10.0 * i * scale, "original_firstorder_Mean": i / 3}
    return FeatureRow(unit(i, mask=mask), "ok", features=values)


def metadata(series: int) -> dict[str, str]:
    """The table's metadata with a table-wide entry that changes with the series."""
    wide = json.dumps({"series": series})
    return {**table_metadata(PARAMS), "oncoflow.harmonisation": wide, "oncoflow.units": "{}"}


def duck(store: SiteStore, sql: str) -> list[tuple]:
    """Run ``sql`` with ``{T}`` standing for the folder's parts, read by DuckDB itself."""
    con = duckdb.connect()
    try:
        glob = store.uri(KEY) + "/*.parquet"
        return con.execute(sql.replace("{T}", f"read_parquet('{glob}')")).fetchall()
    finally:
        con.close()


@pytest.fixture()
def store(tmp_path: Path, monkeypatch) -> SiteStore:
    monkeypatch.setattr(table_writer, "PART_ROWS", 20)  # 400 rows: 20 parts
    return SiteStore(str(tmp_path / "store"), "site-a")


def test_one_percent_changed_rewrites_only_the_parts_holding_it(store):
    rows = [row(i) for i in range(400)]
    assert write_features_table(store, "site-a", rows, PARAMS, metadata(400)).changed
    before = store.table_files(KEY)
    assert len(before) == 20
    assert duck(store, "SELECT count(*), count(DISTINCT (series, roi)) FROM {T}") == [(400, 400)]

    # an unchanged run: nothing built, nothing written
    plan = plan_features(store, "site-a", rows, PARAMS, metadata(400))
    assert plan.unchanged and not plan.full
    stamps = store.stamps(KEY)
    assert not write_features_table(store, "site-a", rows, PARAMS, metadata(400)).changed
    assert store.stamps(KEY) == stamps

    # 1 % of the ROIs re-segmented (new mask, new values), one ROI gone from the site
    changed = [5, 123, 250, 391]
    new_rows = [row(i, "n", 2.0) if i in changed else row(i) for i in range(400) if i != 300]
    plan = plan_features(store, "site-a", new_rows, PARAMS, metadata(399))
    assert [r.unit.series for r in plan.changed] == [f"2.25.{1000 + i}" for i in changed]
    assert plan.gone == {("2.25.1300", "gtv")}
    holding = {plan.index[(f"2.25.{1000 + i}", "gtv")][0] for i in [*changed, 300]}
    written = plan.commit(plan.build())
    after = store.table_files(KEY)
    untouched = set(before) - holding
    assert (written.removed, len(untouched)) == (len(holding), 20 - len(holding))
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}
    assert set(after) - set(before) and len(set(after) - set(before)) == written.added
    # DuckDB reads every row once, the new values of the changed ROIs, not the gone one
    assert duck(store, "SELECT count(*), count(DISTINCT (series, roi)) FROM {T}") == [(399, 399)]
    got = dict(duck(store, "SELECT series, original_shape_VoxelVolume FROM {T}"))
    assert got["2.25.1123"] == 10.0 * 123 * 2.0 and got["2.25.1124"] == 10.0 * 124
    assert got["2.25.1007"] is None and "2.25.1300" not in got
    # the same as the table written from scratch, read by pyarrow.dataset
    fresh = SiteStore(str(Path(store.url).parent / "fresh"), "site-a")
    write_features_table(fresh, "site-a", new_rows, PARAMS, metadata(399))
    a = ds.dataset(store.path(KEY), format="parquet").to_table().sort_by("series")
    b = ds.dataset(fresh.path(KEY), format="parquet").to_table().sort_by("series")
    assert a.schema == b.schema and a.to_pylist() == b.to_pylist()


def test_table_metadata_lives_in_common_metadata_and_every_part_has_the_parameters(store):
    rows = [row(i) for i in range(45)]
    write_features_table(store, "site-a", rows, PARAMS, metadata(45))
    folder = Path(store.path(KEY))
    parts = sorted(folder.glob("part-*.parquet"))
    assert len(parts) == 3 and (folder / "_common_metadata").is_file()
    for part in parts:  # the parameters in each part, the table-wide entries not
        meta = pq.read_schema(part).metadata
        assert json.loads(meta[b"oncoflow.params"]) == PARAMS.canonical()
        assert b"oncoflow.harmonisation" not in meta
        assert b"ibsi" in pq.read_schema(part).field("original_firstorder_Mean").metadata
    common = pq.read_schema(folder / "_common_metadata")
    assert json.loads(common.metadata[b"oncoflow.harmonisation"]) == {"series": 45}
    assert common.field("original_firstorder_Mean").metadata[b"ibsi"]
    kv = dict(
        duckdb.sql(f"SELECT key, value FROM parquet_kv_metadata('{folder}/_common_metadata')")
        .fetchall()
    )
    assert json.loads(kv[b"oncoflow.harmonisation"]) == {"series": 45}
    assert ds.dataset(folder, format="parquet").count_rows() == 45  # _common_metadata skipped
    # the store's readers return the table's metadata; the pipeline knows its parameters
    assert store.read_table(KEY).schema.metadata[b"oncoflow.harmonisation"] == b'{"series": 45}'
    assert written_with(store, PARAMS)
    # a table-wide entry changes alone: _common_metadata is rewritten, no part
    before = store.table_files(KEY)
    assert write_features_table(store, "site-a", rows, PARAMS, metadata(46)).changed
    assert store.table_files(KEY) == before
    assert b'{"series": 46}' in (folder / "_common_metadata").read_bytes()


def test_a_table_of_one_file_becomes_parts_and_other_versions_rewrite_every_part(store):
    rows = [row(i) for i in range(30)]
    from tasks.radiomics.table import build_features_table

    table, meta = build_features_table("site-a", rows, PARAMS)
    store.write_table(KEY, table, meta)  # the layout before parts
    assert store.is_file(KEY)
    plan = plan_features(store, "site-a", rows, PARAMS, meta)
    assert plan.full
    plan.commit(plan.build())
    assert not store.is_file(KEY) and len(features_parts(store, PARAMS.params_hash()).parts()) == 2
    assert duck(store, "SELECT count(*) FROM {T}") == [(30,)]
    other = {**meta, "oncoflow.versions": json.dumps({"pyradiomics": "3.0.1", "numpy": "0"})}
    before = store.table_files(KEY)
    assert plan_features(store, "site-a", rows, PARAMS, other).full
    write_features_table(store, "site-a", rows, PARAMS, other)
    assert set(store.table_files(KEY)).isdisjoint(before)


@pytest.mark.parametrize("crash_at", range(9))
def test_a_features_write_killed_at_any_step_loses_and_duplicates_no_row(
    store, monkeypatch, crash_at
):
    """Store operations fail at step ``crash_at`` of an incremental write; the next run
    leaves each (series, ROI) exactly once, with its new values."""
    rows = [row(i) for i in range(60)]
    write_features_table(store, "site-a", rows, PARAMS, metadata(60))
    new_rows = [row(i, "n", 3.0) if i in (4, 44) else row(i) for i in range(61) if i != 30]
    crash_store_at(monkeypatch, crash_at)
    with pytest.raises(Crash):
        write_features_table(store, "site-a", new_rows, PARAMS, metadata(61))
    monkeypatch.undo()
    features_parts(store, PARAMS.params_hash()).recover()  # what the next writer does first
    seen = [s for (s,) in duck(store, "SELECT series FROM {T}")]
    before, after = (sorted(r.unit.series for r in rs) for rs in (rows, new_rows))
    assert sorted(seen) in (before, after)  # each row once: the old table or the new one
    write_features_table(store, "site-a", new_rows, PARAMS, metadata(61))  # the next run
    got = dict(duck(store, "SELECT series, original_shape_VoxelVolume FROM {T}"))
    assert sorted(got) == sorted(r.unit.series for r in new_rows)
    assert got["2.25.1044"] == 10.0 * 44 * 3.0 and got["2.25.1045"] == 10.0 * 45
    assert not store.exists(features_parts(store, PARAMS.params_hash()).txn)
    common = pq.read_schema(store.path(KEY) + "/_common_metadata")
    assert json.loads(common.metadata[b"oncoflow.harmonisation"]) == {"series": 61}
    assert not math.isnan(got["2.25.1000"])


def test_diagnostics_follow_the_changed_rows(store):
    from tasks.radiomics.diagnostics import diagnostics_table_key, write_diagnostics
    from tasks.radiomics.table_writer import write_diagnostics_parts

    def cache(rows: list[FeatureRow]) -> None:
        for r in rows:
            voxels = int(r.unit.mask_sha256 == "n" * 64) * 1000 + int(r.unit.series[-3:])
            values = {"diagnostics_Mask-original_VoxelNum": voxels, "diagnostics_Image-x": [1, 2]}
            write_diagnostics(store, r.unit.image_sha256, r.unit.mask_sha256, PARAMS, values)

    def diag(sql: str) -> list[tuple]:
        glob = store.uri(diagnostics_table_key(PARAMS.params_hash())) + "/*.parquet"
        return duckdb.sql(sql.replace("{T}", f"read_parquet('{glob}')")).fetchall()

    rows = [row(i) for i in range(100)]
    cache(rows)
    plan = plan_features(store, "site-a", rows, PARAMS, metadata(100))
    assert write_diagnostics_parts(store, plan).changed
    plan.commit(plan.build())
    assert diag("SELECT count(*) FROM {T}") == [(98,)]  # the ok rows (two quarantined)
    before = store.table_files(diagnostics_table_key(PARAMS.params_hash()))
    assert len(before) == 5
    new_rows = [row(i, "n") if i == 42 else row(i) for i in range(100) if i != 3]
    cache(new_rows)
    plan = plan_features(store, "site-a", new_rows, PARAMS, metadata(99))
    written = write_diagnostics_parts(store, plan)
    assert (written.removed, written.added) == (2, 2)  # the parts of rows 3 and 42
    after = store.table_files(diagnostics_table_key(PARAMS.params_hash()))
    assert len(set(before) & set(after)) == 3  # three parts untouched
    got = dict(diag('SELECT series, "diagnostics_Mask-original_VoxelNum" FROM {T}'))
    assert len(got) == 97 and "2.25.1003" not in got
    assert got["2.25.1042"] == 1042 and got["2.25.1043"] == 43
    plan.commit(plan.build())
    plan = plan_features(store, "site-a", new_rows, PARAMS, metadata(99))
    assert plan.unchanged and not write_diagnostics_parts(store, plan).changed


KILLED_FEATURES_WRITER = (
    KILL_AT_STORE_CALL
    + """
import tasks.radiomics.table_writer as table_writer
from tasks.radiomics.table_writer import write_features_table
from tests.unit.test_features_parts import PARAMS, metadata, row

table_writer.PART_ROWS = 20
new_rows = [row(i, "n", 3.0) if i in (4, 44) else row(i) for i in range(61) if i != 30]
write_features_table(SiteStore(root, "site-a"), "site-a", new_rows, PARAMS, metadata(61))
"""
)


@pytest.mark.parametrize(("operation", "call"), [("stage_bytes", 2), ("move", 1), ("remove", 2)])
def test_a_features_writer_killed_with_sigkill_loses_and_duplicates_no_row(
    store, operation, call
):
    """The writer process is SIGKILLed inside a store operation; the next run's table has every
    (series, ROI) once, with its new values."""
    import subprocess
    import sys

    rows = [row(i) for i in range(60)]
    write_features_table(store, "site-a", rows, PARAMS, metadata(60))
    root = str(Path(store.url))
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_FEATURES_WRITER, root, str(call), operation],
        capture_output=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    new_rows = [row(i, "n", 3.0) if i in (4, 44) else row(i) for i in range(61) if i != 30]
    write_features_table(store, "site-a", new_rows, PARAMS, metadata(61))  # the next run
    seen = [s for (s,) in duck(store, "SELECT series FROM {T}")]
    assert sorted(seen) == sorted(r.unit.series for r in new_rows)
    got = dict(duck(store, "SELECT series, original_shape_VoxelVolume FROM {T}"))
    assert got["2.25.1004"] == 10.0 * 4 * 3.0 and "2.25.1030" not in got

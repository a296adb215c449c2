"""Unit state: recorded digests, outcomes reused without a task, small increments in-process."""

from pathlib import Path

import pyarrow as pa

from tasks.store import SiteStore
from tasks.unit_state import UnitState, needs_workers, plan_reuse

COLUMNS = pa.schema([("outputs", pa.list_(pa.string()))])


def test_state_round_trip_writes_only_changed_rows_and_reuse_follows_digests(tmp_path: Path):
    state = UnitState(SiteStore(str(tmp_path), "site-a"), "stage/units.parquet", COLUMNS)
    assert state.read() == {}
    first = {"2.25.1": ("d1", {"outputs": ["a"]}), "2.25.2": ("d2", {"outputs": ["b", "c"]})}
    assert state.write(first, {}) is True
    assert state.read() == first
    assert state.write(first, state.read()) is False  # nothing changed: nothing written
    units = ["2.25.1", "2.25.2", "2.25.3"]
    digests = {"2.25.1": "d1", "2.25.2": "other", "2.25.3": "d3"}
    reused = plan_reuse(
        units, digests.get, lambda u: u, state.read(), lambda u, saved: (u, saved["outputs"])
    )
    assert reused == {0: ("2.25.1", ["a"])}  # changed digest and unknown unit: computed
    gone = plan_reuse(units, digests.get, lambda u: u, state.read(), lambda u, saved: None)
    assert gone == {}  # an outcome that cannot be rebuilt (output missing): computed
    assert state.write({"2.25.1": first["2.25.1"]}, state.read()) is True
    assert list(state.read()) == ["2.25.1"]


def test_small_increments_need_no_workers():
    assert needs_workers([], 100) is False
    assert needs_workers([50], 101) is False  # one series of 101: in the command's process
    assert needs_workers([50, 50], 101) is True  # more than 1 %
    assert needs_workers([300], 1000) is True  # more files than one group holds
    assert needs_workers([3, 3, 3], 3) is True  # a first run

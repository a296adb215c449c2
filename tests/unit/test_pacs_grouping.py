"""PACS pull units: pseudonymous handles resolved from the private plan, grouping, retries."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle

import pytest

from flows.pacs import series_grouping
from flows.runtime import free_port
from flows.stage import group_units
from tasks.pacs.credentials import ENV_PASSWORD, ENV_TOKEN, ENV_USER
from tasks.pacs.dicomweb import (
    PullError,
    PullJob,
    PullSettings,
    SeriesHandle,
    clean_staging,
    plan_handles,
    pull_series,
    resolve_handle,
    write_plan,
)
from tasks.store import SiteStore

STUDY = "1.2.826.0.1.3680043.8.498.111"


def jobs(counts: list[int | None]) -> list[PullJob]:
    """Planned series with the given instance counts (None: the server gave no count)."""
    return [
        PullJob(f"study{i:02d}", f"{i:032x}", STUDY, f"1.2.826.0.1.3680043.8.498.2{i:02d}", n, "CT")
        for i, n in enumerate(counts)
    ]


def handles(counts: list[int | None]) -> list[SeriesHandle]:
    return [SeriesHandle("plan", j.series_key, j.study_key, j.expected, "CT") for j in jobs(counts)]


def groups(counts: list[int | None], slots: int, below: int = 1000, most: int = 2000):
    units = handles(counts)
    settings = PullSettings("http://pacs", "s", "site-a")
    grouping = series_grouping(units, settings, below, most, slots)
    return group_units([grouping.size(u) for u in units], grouping.small, grouping.per_task)


def test_small_series_are_shared_out_evenly_over_the_workers() -> None:
    # eight series of 100 instances on 2 workers: two tasks of four, as two processes would
    assert groups([100] * 8, slots=2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # uneven sizes: still no more tasks than workers
    assert len(groups([100] * 7 + [50], slots=2)) == 2
    assert len(groups([3, 90, 17, 250, 40, 60, 8], slots=3)) <= 3
    # large series and series of unknown size keep a task of their own
    assert groups([100, 5000, None, 100], slots=1) == [[1], [2], [0, 3]]
    # a group never exceeds group_instances (progress, and a lost worker costs little)
    many = groups([100] * 100, slots=2)
    assert len(many) == 5 and all(len(g) == 20 for g in many)
    # group_below=0: a task per series
    assert groups([100] * 4, slots=2, below=0) == [[0], [1], [2], [3]]


def test_handles_carry_no_uid_and_workers_resolve_them_from_the_private_plan(tmp_path) -> None:
    store = SiteStore(str(tmp_path), "site-a")
    planned = jobs([3, 4])
    key = write_plan(store, planned)
    assert key.startswith("raw/_state/") and STUDY not in key
    assert write_plan(store, planned) != key  # a plan per run: a worker's cache stays right
    units = plan_handles(store, key)
    assert [u.series_key for u in units] == [j.series_key for j in planned]
    for unit in units:  # what Prefect sees of a unit: its fields, repr and pickle
        seen = json.dumps(dataclasses.asdict(unit)) + repr(unit) + str(pickle.dumps(unit))
        assert STUDY not in seen and "1.2.826" not in seen
    assert resolve_handle(units[1], store) == planned[1]
    with pytest.raises(PullError, match="not in the pull's plan"):
        resolve_handle(dataclasses.replace(units[0], series_key="f" * 32), store)
    clean_staging(store)  # a crashed run's plans go with its staging
    assert store.children("raw/_state/plans") == []


def test_a_failing_series_is_retried_alone_with_backoff(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv(ENV_USER, "reader")
    monkeypatch.setenv(ENV_PASSWORD, "secret")
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    store = SiteStore(str(tmp_path), "site-a")
    unit = plan_handles(store, write_plan(store, jobs([3])))[0]
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens: refused at once
    settings = PullSettings(closed, str(tmp_path), "site-a", retries=2, retry_delay=0.01)
    with caplog.at_level(logging.INFO, "tasks.pacs.dicomweb"), pytest.raises(PullError) as exc:
        pull_series(unit, settings)
    assert str(exc.value) == "ConnectionError: connection failed"
    retried = [  # oncoflow's own retry lines (dicomweb-client's retrying library logs too)
        r.getMessage()
        for r in caplog.records
        if r.name == "tasks.pacs.dicomweb" and "retrying" in r.getMessage()
    ]
    assert len(retried) == 2 and "attempt 2 of 3" in retried[1]
    assert STUDY not in caplog.text and "1.2.826" not in caplog.text
    assert store.children("raw/_staging/dicomweb") == []  # each attempt removed its staging

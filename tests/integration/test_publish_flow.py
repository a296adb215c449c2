"""publish-cohort and federate-hub flows on real Prefect + Dask + S3 (moto over HTTP).

Three sites of different sizes publish the same cohort spec (with ComBat summaries); the flow
emits ``oncoflow.cohort.published`` and a link artifact; republishing emits nothing new. The hub
flow writes the suppressed catalogue and ComBat adjustments; applied at each site, they equal
neuroCombat run on the pooled published tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from neuroCombat import neuroCombat
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.cli import main
from flows.federate import FederateParams, federate
from flows.publish import EVENT, PublishParams, publish
from flows.runtime import RuntimeOptions, dask_cluster
from tasks.cohort.publish import publish_cohort
from tasks.cohort.spec import load_spec
from tasks.federation.combat import SiteAdjustment, age_in_years, apply_adjustment
from tests.unit.test_cohort_fixture import DEFAULT_SERIES, PARAMS_HASH, SeriesSpec, build_site, mrn

EXTRA = (
    SeriesSpec("CT", "CHEST", ("gtv",), "20220101", patient=4),
    SeriesSpec("CT", "CHEST", ("gtv",), "20220202", patient=5),
)
SITES = {
    "site-a": DEFAULT_SERIES,
    "site-b": DEFAULT_SERIES + EXTRA,
    "site-c": DEFAULT_SERIES[:3],
}
SPEC = """
name: lung
title: Lung cohort
description: Chest imaging with tumour masks.
licence: CC-BY-4.0
features: {features}
combat:
  roi: gtv
  categorical: [sex]
  continuous: [age]
"""


async def _events(prefix: str) -> list[dict]:
    async with get_client() as client:
        response = await client.request(
            "POST", "/events/filter", json={"filter": {"event": {"prefix": [prefix]}}, "limit": 50}
        )
        return response.json()["events"]


async def _artifacts(key: str):
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def events_emitted_so_far(prefix: str, url_prefix: str, timeout: float = 60.0) -> list[dict]:
    """Events with this name prefix about publications under ``url_prefix``, once every event
    this process emitted before the call has reached the server.

    A barrier event is emitted after them through the same client (events leave in order) and
    polled for with a deadline: when it is readable, so are the events emitted before it.
    """
    from prefect.events import emit_event

    barrier = f"oncoflow.test.barrier-{uuid.uuid4().hex}"
    emit_event("oncoflow.test.barrier", resource={"prefect.resource.id": barrier})
    deadline = time.monotonic() + timeout
    while not any(
        e["resource"]["prefect.resource.id"] == barrier
        for e in asyncio.run(_events("oncoflow.test.barrier"))
    ):
        assert time.monotonic() < deadline, "the barrier event did not reach the server"
        time.sleep(0.25)
    return [
        e
        for e in asyncio.run(_events(prefix))
        if e["payload"].get("url", "").startswith(url_prefix)
    ]


def test_publish_flows_event_artifact_and_hub(
    prefect_api, s3_bucket: str, s3_endpoint: str, tmp_path, capsys
) -> None:
    spec_path = tmp_path / "lung.yaml"
    spec_path.write_text(SPEC.format(features=PARAMS_HASH))
    stores = {
        site: build_site(str(tmp_path / "store"), site, series, seed=i)
        for i, (site, series) in enumerate(SITES.items())
    }
    results = {}
    runtime = RuntimeOptions(workers=2)
    spec = load_spec(spec_path)
    for site in ("site-b", "site-c"):  # in-process: the flow itself is exercised by site-a
        result = publish_cohort(stores[site], spec, f"{s3_bucket}/pub/{site}")
        results[site] = result.to_dict()
    with dask_cluster(runtime):
        params = PublishParams(
            site="site-a",
            store=stores["site-a"].url,
            cohort=str(spec_path),
            to=f"{s3_bucket}/pub/site-a",
        )
        results["site-a"] = publish(params, runtime)
        again = publish(
            PublishParams(
                site="site-a",
                store=stores["site-a"].url,
                cohort=str(spec_path),
                to=f"{s3_bucket}/pub/site-a",
            ),
            runtime,
        )
        # A canary in a table to publish: the flow's gate refuses before any upload.
        canary_store = build_site(str(tmp_path / "canary"), "site-a", SITES["site-a"], seed=0)
        table = canary_store.read_table("harmonised/series.parquet")
        makers = table.column("manufacturer").to_pylist()
        makers[0] = f"ACME for {mrn('site-a', 0)}"
        index = table.column_names.index("manufacturer")
        canary_store.write_table(
            "harmonised/series.parquet", table.set_column(index, "manufacturer", pa.array(makers))
        )
        canary_params = params.model_copy(
            update={"store": canary_store.url, "to": f"{s3_bucket}/refused/site-a"}
        )
        with pytest.raises(Exception, match="leak gate found") as refused:
            publish(canary_params, runtime)
        assert mrn("site-a", 0) not in str(refused.value)
    plain = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    assert plain.find(f"{s3_bucket.removeprefix('s3://')}/refused") == []
    for site, result in results.items():
        assert result["created"] and result["version"] == "v1", result
        assert result["leak_gate"] == "passed"
        assert result["url"] == f"{s3_bucket}/pub/{site}/lung/v1"
    assert not again["created"] and again["version"] == "v1"

    events = events_emitted_so_far("oncoflow.cohort", s3_bucket)
    assert len(events) == 1  # the new version; nothing for the unchanged republish
    assert events[0]["event"] == EVENT
    payload = events[0]["payload"]
    assert payload["site"] == "site-a" and payload["series"] == 4 and payload["version"] == "v1"
    assert payload["manifest"] == f"{s3_bucket}/pub/site-a/lung/v1/manifest.json"
    artifacts = asyncio.run(_artifacts("site-a-publish-lung"))
    assert (artifacts and artifacts[0].type == "markdown") or artifacts[0].type == "link"
    assert any("pub/site-a/lung/v1/manifest.json" in str(a.data) for a in artifacts), [
        a.data for a in artifacts
    ]

    # verify through the CLI entry point: exit code 0
    with pytest.raises(SystemExit) as done:
        main(["verify", f"{s3_bucket}/pub/site-b/lung/v1", "--json"])
    assert done.value.code == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True

    # the hub
    hub = f"{s3_bucket}/hub"
    summary = federate(
        FederateParams(sources=[f"{s3_bucket}/pub/{s}" for s in SITES], out=hub, k=3)
    )
    assert summary["sources"] == 3 and summary["combat_cohorts"] == ["lung"]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    # the hub's report: the site effect on PC1 before and after ComBat
    effect = summary["site_effect"]["lung"]
    assert 0.0 <= effect["after"] <= 1.0 and 0.0 <= effect["before"] <= 1.0
    page = fs.cat_file(f"{hub.removeprefix('s3://')}/report.html").decode()
    assert "Site effect: lung" in page and page.count("data:image/png;base64,") == 1
    for site in SITES:  # every publication carries its report
        assert b"<h2" in fs.cat_file(
            f"{s3_bucket.removeprefix('s3://')}/pub/{site}/lung/v1/report.html"
        )
    catalogue = json.loads(fs.cat_file(f"{hub.removeprefix('s3://')}/catalogue.json"))
    mod = catalogue["tables"]["modality"]
    truth = {
        "site-a": {"CT": 2, "MR": 1, "PT": 1},
        "site-b": {"CT": 4, "MR": 1, "PT": 1},
        "site-c": {"CT": 2, "MR": 1, "PT": 0},
    }
    for row in mod["rows"]:
        for modality, value in row["values"].items():
            count = truth[row["site"]][modality]
            if count in (1, 2):
                assert value in ("<3", "-")  # "-": withheld, the totals would pin it
            else:
                assert value in (count, "*")
    assert mod["total"] in (12, "*")
    for table in catalogue["tables"].values():
        for row in table["rows"]:
            for value in [*row.get("values", {}).values(), row["total"]]:
                assert isinstance(value, str) or value == 0 or value >= 3

    # federated ComBat, applied at each site == neuroCombat on the pooled published tables
    tables, adjusted = {}, {}
    for site in SITES:
        base = f"{s3_bucket.removeprefix('s3://')}/pub/{site}/lung/v1"
        with fs.open(f"{base}/features.parquet") as fh:
            features = pq.read_table(fh)
        with fs.open(f"{base}/series.parquet") as fh:
            series = {r["series"]: r for r in pq.read_table(fh).to_pylist()}
        rows_gtv = features.filter(pa.compute.equal(features.column("roi"), "gtv"))
        keys = rows_gtv.column("series").to_pylist()
        table = rows_gtv.append_column("sex", pa.array([series[k]["sex"] for k in keys]))
        table = table.append_column(
            "age", pa.array([age_in_years(series[k]["age_at_study"]) for k in keys])
        )
        adj = SiteAdjustment.from_dict(
            json.loads(fs.cat_file(f"{hub.removeprefix('s3://')}/combat/lung/{site}.json"))
        )
        tables[site] = table
        adjusted[site] = apply_adjustment(table, adj)
    names = adj.features
    assert "original_firstorder_Mean" in names
    order = list(SITES)
    dat = np.vstack(
        [np.column_stack([tables[s].column(f).to_numpy() for f in names]) for s in order]
    ).T
    covars = pd.DataFrame(
        {
            "batch": [s for s in order for _ in range(tables[s].num_rows)],
            "sex": [v for s in order for v in tables[s].column("sex").to_pylist()],
            "age": [v for s in order for v in tables[s].column("age").to_pylist()],
        }
    )
    with contextlib.redirect_stdout(io.StringIO()):
        pooled = neuroCombat(
            dat=dat,
            covars=covars,
            batch_col="batch",
            categorical_cols=["sex"],
            continuous_cols=["age"],
        )["data"].T
    ours = np.vstack(
        [np.column_stack([adjusted[s].column(f).to_numpy() for f in names]) for s in order]
    )
    assert np.abs(ours - pooled).max() < 1e-6

"""Flow ``ingest-volumes``: a cases CSV or a folder of NIfTI/NRRD pairs into the catalogue.

The cases (see :mod:`tasks.volumes.cases`) go to the private ``catalog/volumes.parquet``;
``deidentify``, ``harmonise`` and ``extract`` then treat them like DICOM series. Listing and
checking the files is cheap, so the flow runs in this process (no Dask). Privacy: the flow's
parameters are URLs and the site code; logs and artifacts hold counts and reason codes only.
A file whose name is not UTF-8 is quarantined as ``undecodable-name`` (its escaped path the
item, as for DICOM) and never opened; its unit is named by a keyed reference.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from prefect import flow

from flows.reporting import post_summary
from tasks.dicom.listing import item_ref
from tasks.quarantine import replace_quarantine, undecodable_record
from tasks.records import Kind, QuarantineRecord, Reason, Stage, StageSummary, Status, UnitResult
from tasks.refs import site_ref_key
from tasks.store import SiteStore
from tasks.volumes.cases import check_case, list_cases, write_catalogue


def catalogue_cases(source: str, site: str, store_url: str) -> StageSummary:
    """List and check the cases of SOURCE and write ``catalog/volumes.parquet``.

    Parameters
    ----------
    source
        A cases CSV or a folder (path or fsspec URL).
    site, store_url
        The site and its store.

    Returns
    -------
    StageSummary
        Cases by status (a file whose name is not UTF-8 counts as one quarantined unit),
        quarantine reasons, masks and modalities.
    """
    store = SiteStore(store_url, site)
    store.check_reachable()
    undecodable: list[str] = []
    cases = [check_case(c) for c in list_cases(source, undecodable)]
    written = write_catalogue(store, source, cases)
    records = [
        QuarantineRecord(
            item=c.volume_key,
            kind=Kind.VOLUME,
            stage=Stage.INGEST,
            reason=Reason(c.reason),
            detail=c.detail,
        )
        for c in cases
        if c.status != "ok"
    ]
    names = [undecodable_record(item, Kind.VOLUME) for item in undecodable]
    others = [r for r in store.quarantine_rows(Stage.INGEST) if r["kind"] != Kind.VOLUME]
    kept = [
        QuarantineRecord(r["item"], r["kind"], Stage.INGEST, Reason(r["reason"]), r["detail"])
        for r in others
    ]
    replace_quarantine(store, Stage.INGEST, [*kept, *records, *names])
    key = site_ref_key(store)  # units by keyed reference: never a name nor its plain hash
    results = [
        UnitResult(item_ref(c.volume_key, key), Status(c.status), reason=c.reason, detail=c.detail)
        for c in cases
    ]
    results.extend(
        UnitResult(item_ref(r.item, key), Status.QUARANTINED, reason=str(r.reason), detail=r.detail)
        for r in names
    )
    return StageSummary.from_results(
        Stage.INGEST,
        site,
        results,
        source_kind="cases CSV" if source.lower().endswith(".csv") else "folder",
        volumes=len(cases),
        files_undecodable=len(undecodable),
        masks=sum(len(c.masks) for c in cases if c.status == "ok"),
        volumes_by_modality=dict(sorted(Counter(c.modality for c in cases).items())),
        table_written=written,
    )


@flow(name="ingest-volumes", flow_run_name="ingest-volumes-{site}", log_prints=False)
def ingest_volumes_flow(source: str, site: str, store: str) -> dict[str, Any]:
    """Catalogue the NIfTI/NRRD cases of SOURCE (see :func:`catalogue_cases`)."""
    summary = catalogue_cases(source, site, store)
    post_summary(
        summary,
        "NIfTI/NRRD ingest",
        {"Note": "Cases are listed by an opaque reference; `catalog/volumes.parquet` is private."},
    )
    return summary.to_dict()


def ingest_volumes(source: str, site: str, store: str) -> StageSummary:
    """Run ``ingest-volumes`` (what the CLI calls) after checking SOURCE in one line."""
    from flows.runtime import ensure_prefect_api

    list_cases(source, [])  # one-line errors before any flow run
    ensure_prefect_api()
    return StageSummary.from_dict(Stage.INGEST, site, ingest_volumes_flow(source, site, store))

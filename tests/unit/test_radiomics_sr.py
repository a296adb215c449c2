"""DICOM SR (TID 1500) of the features: round trip with highdicom and dcmqi, codes, no identifier.

The chain is real: de-identified CT + DICOM SEG (highdicom) -> harmonise -> pyradiomics ->
features table -> reports, read back by highdicom and by dcmqi's ``tid1500reader``.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pydicom
import pytest

from tasks.cohort.select import select_cohort
from tasks.cohort.spec import parse_spec
from tasks.deid.scan_phi import IdentifierMatcher, scan_bytes
from tasks.harmonise.config import HarmoniseConfig
from tasks.harmonise.plan import SERIES_SCHEMA
from tasks.harmonise.plan import plan_units as plan_series
from tasks.harmonise.series import harmonise_series
from tasks.radiomics.cache import read_parts
from tasks.radiomics.extract import extract_roi, plan_units
from tasks.radiomics.ibsi import FEATURE_COLUMN
from tasks.radiomics.params import validate_params
from tasks.radiomics.sr import report_key, reports_prefix, write_reports
from tasks.radiomics.table import FeatureRow, build_features_table, features_key
from tasks.store import HARMONISED_SERIES, SiteStore
from tests.dicom_factory import (
    Geometry,
    deid_store,
    image_series,
    rtstruct,
    segmentation,
    sphere_contours,
)

G = Geometry(size=(24, 24, 10), spacing=(1.0, 1.0, 2.0), origin=(-12, -12, -9))
PARAMS = validate_params(
    {
        "setting": {"binWidth": 25, "sigma": [1.0]},
        "imageType": {"Original": {}, "LoG": {}},
        "featureClass": {"shape": [], "firstorder": [], "glcm": [], "ngtdm": []},
    }
)
#: Identifiers planted in the de-identified headers, outside what a report may copy.
PLANTED = {
    "ReferringPhysicianName": "Παπαδόπουλος^Σπυρίδων",
    "InstitutionName": "Болница Свети Георги Пловдив",
    "OperatorsName": "Wójcik^Małgorzata",
    "PatientBirthDate": "19530417",
    "AccessionNumber": "ACC88231977",
    "StudyID": "Ó Súilleabháin",
    "PatientComments": "Kovácsné Szabó Erzsébet",
}


def _lesion_ct(key: str, seed: int = 7) -> tuple[list, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    points = G.points()
    centre = G.physical(np.array([11.5, 11.5, 4.5]))
    inside = np.linalg.norm(points - centre, axis=-1) <= 6.5
    hu = np.where(
        inside, 60.0 + 40 * rng.normal(size=inside.shape), -700 + 30 * rng.normal(size=inside.shape)
    )
    node = np.linalg.norm(points - (centre + np.array([0, 0, 6.0])), axis=-1) <= 3.5
    images = image_series(hu, G, series_key=key)
    for ds in images:
        ds.SpecificCharacterSet = "ISO_IR 192"
        for keyword, value in PLANTED.items():
            setattr(ds, keyword, value)
    return images, inside.astype(np.uint8), (node & ~inside).astype(np.uint8)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteStore, dict[str, str]]:
    """A site store after harmonise and extract: one SEG-masked CT, one RTSTRUCT-masked CT."""
    store = SiteStore(str(tmp_path_factory.mktemp("sr")), "site-a")
    ct, gtv, node = _lesion_ct("ct")
    seg = segmentation(ct, {"GTV-1": gtv, "Node": node})
    seg.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in PLANTED.items():
        setattr(seg, keyword, value)
    other, _, _ = _lesion_ct("other", seed=8)  # other pixels: not a duplicate at publish
    centre = G.physical(np.array([11.5, 11.5, 4.5]))
    rt = rtstruct(other, {"GTV-1": sphere_contours(G, centre, 6.0, 32)})
    keys = deid_store(
        store,
        {
            "ct": {"datasets": ct},
            "seg": {"datasets": [seg], "kind": "seg", "refs": ["ct"]},
            "other": {"datasets": other, "patient": "PSN-0002"},
            "rt": {"datasets": [rt], "kind": "rtstruct", "refs": ["other"], "patient": "PSN-0002"},
        },
    )
    config = HarmoniseConfig(roi_map={"gtv": ["GTV.*"], "node": ["Node"]})
    units, _ = plan_series(store)
    rows = [harmonise_series(store, u, config).row for u in units]
    store.write_table(HARMONISED_SERIES, pa.Table.from_pylist(rows, schema=SERIES_SCHEMA))
    feature_rows = []
    for unit in plan_units(store):
        outcome = extract_roi(store, unit, PARAMS)
        values: dict[str, float] = {}
        for part in read_parts(store, list(outcome.result.outputs)).values():
            values.update(part.features or {})
        feature_rows.append(FeatureRow(unit, str(outcome.result.status), features=values))
    table, metadata = build_features_table("site-a", feature_rows, PARAMS)
    store.write_table(features_key(PARAMS.params_hash()), table, metadata)
    return store, keys


@pytest.fixture(scope="module")
def reports(site):
    store, _ = site
    table = store.read_table(features_key(PARAMS.params_hash()))
    return table, write_reports(store, table, PARAMS.params_hash())


def _rows(table: pa.Table) -> dict[tuple[str, str], dict]:
    return {(r["series"], r["roi"]): r for r in table.to_pylist()}


def test_reports_written_for_seg_masks_and_skipped_otherwise(site, reports):
    store, keys = site
    table, outcomes = reports
    by_key = {(o.series, o.roi): o for o in outcomes}
    assert by_key[(keys["ct"], "gtv")].status == "written"
    assert by_key[(keys["ct"], "node")].status == "written"
    assert by_key[(keys["other"], "gtv")].status == "skipped"
    assert by_key[(keys["other"], "gtv")].reason == "no-dicom-segmentation"
    again = write_reports(store, table, PARAMS.params_hash())
    assert {o.status for o in again if o.key} == {"unchanged"}


def test_a_run_that_changed_some_rows_writes_and_removes_only_their_reports(site, reports):
    store, keys = site
    table, _ = reports
    params_hash = PARAMS.params_hash()
    gtv, node = (store.path(report_key(params_hash, keys["ct"], r)) for r in ("gtv", "node"))
    stamps = store.modified(reports_prefix(params_hash))
    changed = table.filter(pc.equal(table["roi"], "node"))  # one changed row
    outcomes = write_reports(store, changed, params_hash, removed=[(keys["ct"], "gtv")])
    assert [(o.series, o.roi, o.status) for o in outcomes] == [(keys["ct"], "node", "unchanged")]
    assert not Path(gtv).exists() and Path(node).exists()  # the removed row's report is gone
    left = store.modified(reports_prefix(params_hash))
    assert left == {k: v for k, v in stamps.items() if not k.endswith(f"/{keys['ct']}/gtv.dcm")}
    write_reports(store, table, params_hash)  # the whole table again: as before
    assert Path(gtv).exists()


def test_highdicom_reads_values_codes_and_references(site, reports):
    store, keys = site
    table, _ = reports
    row = _rows(table)[(keys["ct"], "gtv")]
    columns = [c for c in table.column_names if FEATURE_COLUMN.match(c)]
    ds = pydicom.dcmread(store.path(report_key(PARAMS.params_hash(), keys["ct"], "gtv")))
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    deid = store.read_table("deid/series.parquet").to_pylist()
    seg_key = next(r["paths"][0] for r in deid if r["series"] == keys["seg"])
    seg = pydicom.dcmread(store.path(seg_key))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert {g.tracking_identifier for g in groups} == {"gtv original", "gtv log-sigma-1-0-mm-3D"}
    got: dict[str, float] = {}
    for group in groups:
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [1]
        sources = [i.value for i in ref if i.name.meaning == "Source Series for Segmentation"]
        assert sources == [keys["ct"]]
        prefix = group.tracking_identifier.split(" ", 1)[1]
        method = group.method
        assert (method.value if method else "") == ("L6PA" if prefix.startswith("log") else "")
        for m in group.get_measurements():
            meaning = m.name.meaning if m.name.scheme_designator == "99PYRADIOMICS" else None
            got[(prefix, m.name.value, meaning)] = (m.value, m.unit.value)  # type: ignore[index]
    fields = table.schema
    expected = 0
    for column in columns:
        value = row[column]
        if value is None or not math.isfinite(value):
            continue
        expected += 1
        prefix, cls, feature = column.split("_")
        code = fields.field(column).metadata[b"ibsi"].decode()
        key = (
            (prefix, code, None)
            if code
            else next(k for k in got if k[0] == prefix and k[2] == f"{cls}_{feature}")
        )
        assert got[key][0] == pytest.approx(value, rel=1e-12), column
    assert expected == len(got)
    assert got[("original", "RNU0", None)][1] == "mm3"
    assert got[("original", "Q4LE", None)][1] == "[hnsf'U]"
    assert got[("original", "TU9B", None)][1] == "1"


def test_dcmqi_reads_the_same_values(site, reports, tmp_path: Path):
    reader = shutil.which("tid1500reader")  # dcmqi's reader (PyPI dcmqi, in the dev group)
    assert reader, "dcmqi's tid1500reader is not installed"
    store, keys = site
    table, _ = reports
    row = _rows(table)[(keys["ct"], "node")]
    out = tmp_path / "sr.json"
    subprocess.run(
        [
            reader,
            "--inputDICOM",
            store.path(report_key(PARAMS.params_hash(), keys["ct"], "node")),
            "--outputMetadata",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    doc = json.loads(out.read_text())
    groups = doc["Measurements"]
    assert len(groups) == 2
    original = next(g for g in groups if g["TrackingIdentifier"] == "node original")
    assert original["SourceSeriesForImageSegmentation"] == keys["ct"]
    assert original["ReferencedSegment"] == 2
    items = {i["quantity"]["CodeValue"]: float(i["value"]) for i in original["measurementItems"]}
    assert items["RNU0"] == pytest.approx(row["original_shape_MeshVolume"], rel=1e-6)
    assert items["Q4LE"] == pytest.approx(row["original_firstorder_Mean"], rel=1e-6)
    assert items["QCDE"] == pytest.approx(row["original_ngtdm_Coarseness"], rel=1e-6)
    ibsi_in_row = sum(
        1
        for f in table.schema
        if f.name.startswith("original_")
        and (f.metadata or {}).get(b"ibsi")
        and row[f.name] is not None
        and math.isfinite(row[f.name])
    )
    assert (
        sum(
            1
            for i in original["measurementItems"]
            if i["quantity"]["CodingSchemeDesignator"] == "IBSI"
        )
        == ibsi_in_row
    )


def test_no_identifier_in_any_report(site, reports):
    store, _ = site
    _, outcomes = reports
    matcher = IdentifierMatcher([*PLANTED.values(), "Παπαδόπουλος", "Wójcik", "Kovácsné"])
    for outcome in outcomes:
        if not outcome.key:
            continue
        data = store.read_bytes(outcome.key)
        hits = scan_bytes(outcome.key, data, matcher)
        assert hits == [], outcome.key
        ds = pydicom.dcmread(store.path(outcome.key))
        assert ds.PatientID.startswith("PSN-") and str(ds.PatientName) == ds.PatientID
        for value in PLANTED.values():
            assert value.encode("utf-8") not in data


def _spec(**more):
    """A cohort spec publishing the features of the fixture (and ``more``)."""
    return parse_spec(
        {
            "name": "sr-cohort",
            "title": "SR cohort",
            "description": "Reports travel with the features.",
            "licence": "CC-BY-4.0",
            "features": PARAMS.params_hash(),
            **more,
        }
    )


def test_publication_plans_the_reports(site, reports):
    store, keys = site
    spec = _spec()
    selection = select_cohort(store, spec)
    names = {f.name: f for f in selection.files}
    for roi in ("gtv", "node"):
        planned = names[f"sr/{keys['ct']}/{roi}.dcm"]
        assert planned.source == report_key(PARAMS.params_hash(), keys["ct"], roi)
    assert not any(n.startswith(f"sr/{keys['other']}/") for n in names)


def test_leak_gate_keeps_only_reviewed_codes(site, reports):
    store, keys = site
    path = store.path(report_key(PARAMS.params_hash(), keys["ct"], "gtv"))
    ds = pydicom.dcmread(path)
    items = [i for i in ds.iterall() if i.keyword == "ConceptNameCodeSequence"]
    code = next(c[0] for c in items if c[0].CodingSchemeDesignator == "IBSI")
    code.CodeMeaning = "Kovácsné Szabó"  # same scheme, not a reviewed meaning
    buf = io.BytesIO()
    ds.save_as(buf)
    kinds = {
        k for a, k in scan_bytes("x.dcm", buf.getvalue(), IdentifierMatcher([])) if "Code" in a
    }
    assert kinds


def test_rtstruct_roi_gets_its_report_at_publish_through_the_exported_seg(
    site, reports, tmp_path: Path
):
    """The RTSTRUCT ROI: SR written at publish, referencing the SEG the publication exports."""
    from tasks.cohort.risk import prepare_selection

    store, keys = site
    table, _ = reports
    spec = _spec(include={"dicom": True})
    selection, _ = prepare_selection(store, spec, select_cohort(store, spec))
    names = {f.name: f for f in selection.files}
    key = report_key(PARAMS.params_hash(), keys["other"], "gtv")
    assert names[f"sr/{keys['other']}/gtv.dcm"].source == key
    # every published feature row has its report
    published = {(r["series"], r["roi"]) for r in selection.features.to_pylist()}
    assert {n for n in names if n.startswith("sr/")} == {f"sr/{s}/{r}.dcm" for s, r in published}
    (seg_series,) = next(
        r["seg_series"] for r in selection.series.to_pylist() if r["series"] == keys["other"]
    )
    seg = pydicom.dcmread(store.path(names[f"dicom/{seg_series}/00000.dcm"].source))
    assert seg.SegmentSequence[0].SegmentLabel == "gtv"
    row = _rows(table)[(keys["other"], "gtv")]

    # highdicom: the exported SEG's segment, the image series, the table's values
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(store.path(key)))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert {g.tracking_identifier for g in groups} == {"gtv original", "gtv log-sigma-1-0-mm-3D"}
    checked = 0
    for group in groups:
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [1]
        sources = [i.value for i in ref if i.name.meaning == "Source Series for Segmentation"]
        assert sources == [keys["other"]]
        prefix = group.tracking_identifier.split(" ", 1)[1]
        for m in group.get_measurements():
            if m.name.scheme_designator != "IBSI":
                continue
            column = next(
                c
                for c in table.column_names
                if c.startswith(prefix + "_")
                and table.schema.field(c).metadata[b"ibsi"].decode() == m.name.value
            )
            assert m.value == pytest.approx(row[column], rel=1e-12), column
            checked += 1
    assert checked > 20
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}  # fmt: skip
    assert seg.SOPInstanceUID in evidence

    # dcmqi's reader: the same reference and values
    reader = shutil.which("tid1500reader")
    assert reader, "dcmqi's tid1500reader is not installed"
    out = tmp_path / "sr.json"
    subprocess.run([reader, "--inputDICOM", store.path(key), "--outputMetadata", str(out)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    original = next(
        g
        for g in json.loads(out.read_text())["Measurements"]
        if g["TrackingIdentifier"] == "gtv original"
    )
    assert original["SourceSeriesForImageSegmentation"] == keys["other"]
    assert original["ReferencedSegment"] == 1
    assert original["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
    items = {i["quantity"]["CodeValue"]: float(i["value"]) for i in original["measurementItems"]}
    assert items["RNU0"] == pytest.approx(row["original_shape_MeshVolume"], rel=1e-6)
    assert items["Q4LE"] == pytest.approx(row["original_firstorder_Mean"], rel=1e-6)

    # no identifier; a rerun (publish, then extract's reports) leaves the report as it is
    matcher = IdentifierMatcher([*PLANTED.values(), "Παπαδόπουλος", "Wójcik", "Kovácsné"])
    assert scan_bytes(key, store.read_bytes(key), matcher) == []
    before = Path(store.path(key)).stat().st_mtime_ns
    again, _ = prepare_selection(store, spec, select_cohort(store, spec))
    assert {f.name: f.sha256 for f in again.files} == {f.name: f.sha256 for f in selection.files}
    write_reports(store, table, PARAMS.params_hash())
    assert Path(store.path(key)).stat().st_mtime_ns == before


def test_without_dicom_the_report_references_the_seg_kept_in_the_site_store(site, reports):
    """No DICOM published: the SEG is made in the site store only, the report still travels."""
    from tasks.cohort.risk import prepare_selection
    from tasks.cohort.seg_export import EXPORT_PREFIX

    store, keys = site
    store.prune(reports_prefix(PARAMS.params_hash()), [])  # no report from an earlier test
    store.prune(EXPORT_PREFIX, [])
    selection, _ = prepare_selection(store, _spec(), select_cohort(store, _spec()))
    names = {f.name: f for f in selection.files}
    assert not any(n.startswith("dicom/") for n in names)
    key = report_key(PARAMS.params_hash(), keys["other"], "gtv")
    assert names[f"sr/{keys['other']}/gtv.dcm"].source == key
    (seg_key,) = [k for k in store.find(EXPORT_PREFIX) if k.endswith(".dcm")]
    seg = pydicom.dcmread(store.path(seg_key))
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(store.path(key)))
    for group in sr.content.get_volumetric_roi_measurement_groups():
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID

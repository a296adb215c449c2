"""Provenance for a methods section: table metadata read back with pandas, export, manifest."""

import json
import math
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from radiomics.featureextractor import RadiomicsFeatureExtractor

from flows import cli
from tasks.harmonise.provenance import Step, provenance_json
from tasks.radiomics.diagnostics import diagnostics_table, diagnostics_table_key, ok_pairs
from tasks.radiomics.extract import extract_roi, plan_units
from tasks.radiomics.params import validate_params
from tasks.radiomics.samples import SampleRoi, SampleSeries, series_key, write_harmonised_sample
from tasks.radiomics.table import FeatureRow, features_key, table_metadata
from tasks.radiomics.table_writer import write_features_table
from tasks.research.export import export_features
from tasks.research.methods import (
    effective_settings,
    manifest_methods,
    methods_metadata,
    methods_text,
    read_methods,
)
from tasks.store import SiteStore

PARAMS = {
    "setting": {"binWidth": 10, "label": 1},
    "featureClass": {"firstorder": [], "shape": ["VoxelVolume", "Sphericity"]},
}
SERIES = [
    SampleSeries(series_key(1), "CT", size=(20, 20, 8), rois=(SampleRoi("gtv", 4.0),), seed=1),
    SampleSeries(series_key(2), "CT", size=(20, 20, 8), rois=(SampleRoi("gtv", 3.0),), seed=2),
]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory):
    """A features table written the way the extract flow writes it, with provenance files."""
    store = SiteStore(str(tmp_path_factory.mktemp("methods") / "store"), "site-a")
    write_harmonised_sample(store, SERIES)
    for spec in SERIES:  # what harmonise records for every series
        steps = [
            Step("read-series", {"planes": 8, "slice_spacing_mm": 2.0}, {"deid/x.dcm": "ab"}),
            Step("nifti-masks", {"rois": {"gtv": {"voxels": 30}}, "ignored_rois": ["Free text"]}),
            Step("intensity", {"unit": "HU", "clip": None}),
        ]
        doc = provenance_json(
            series=spec.series, key="k", config={}, config_hash="c", steps=steps, outputs={}
        )
        store.write_bytes(f"harmonised/{spec.series}/provenance.json", doc)
    params = validate_params(PARAMS)
    units = plan_units(store)
    rows = []
    for unit in units:
        outcome = extract_roi(store, unit, params)
        features = {}
        for key in outcome.result.outputs:
            features.update(json.loads(store.read_bytes(key))["features"])
        rows.append(FeatureRow(unit, str(outcome.result.status), features=features))
    methods = methods_metadata(store, params, [u.series for u in units])
    metadata = {**table_metadata(params), **methods}
    write_features_table(store, "site-a", rows, params, metadata)  # a folder of parts
    diag_key = diagnostics_table_key(params.params_hash())
    store.write_table(diag_key, diagnostics_table(store, ok_pairs(rows), params))
    return store, params, units


def test_metadata_round_trip_with_pandas(extracted):
    store, params, _ = extracted
    path = store.path(features_key(params.params_hash()))
    frame = pd.read_parquet(path)
    # the documented one-liner: pandas drops Parquet metadata, pyarrow reads the table's own
    meta = {
        k.decode(): v.decode()
        for k, v in pq.read_schema(f"{path}/_common_metadata").metadata.items()
        if k.startswith(b"oncoflow.")
    }
    frame.attrs.update(meta)
    effective = json.loads(frame.attrs["oncoflow.effective_settings"])
    # every setting pyradiomics itself holds for these parameters, with the same value
    reference = RadiomicsFeatureExtractor(params.canonical()).settings
    for key, value in reference.items():
        if key != "additionalInfo":
            assert effective["setting"][key] == value, key
    assert effective["setting"]["binWidth"] == 10 and effective["setting"]["voxelArrayShift"] == 0
    assert effective["featureClass"]["shape"] == ["Sphericity", "VoxelVolume"]
    assert "Entropy" in effective["featureClass"]["firstorder"]
    assert json.loads(frame.attrs["oncoflow.versions"])["pyradiomics"] == "3.0.1"
    harmonisation = json.loads(frame.attrs["oncoflow.harmonisation"])
    steps = harmonisation["series"][SERIES[0].series]
    assert [s["name"] for s in steps] == ["read-series", "nifti-masks", "intensity"]
    assert "ignored_rois" not in json.dumps(harmonisation)  # free text never copied
    assert "deid/x.dcm" not in json.dumps(harmonisation)  # nor input paths
    assert json.loads(frame.attrs["oncoflow.units"]) == {"CT": ["HU"]}
    assert len(frame) == 2 and frame["original_firstorder_Mean"].notna().all()


def test_effective_defaults_are_what_pyradiomics_applies():
    """Omitting binWidth gives the same features as binWidth 25 (the recorded default)."""
    import numpy as np
    import SimpleITK as sitk

    assert effective_settings(validate_params({}))["setting"]["binWidth"] == 25
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray((rng.normal(size=(8, 16, 16)) * 80).astype(np.float32))
    mask_array = np.zeros((8, 16, 16), np.uint8)
    mask_array[2:6, 4:12, 4:12] = 1
    mask = sitk.GetImageFromArray(mask_array)
    base = {"featureClass": {"firstorder": ["Entropy"]}}
    omitted = RadiomicsFeatureExtractor(base).execute(image, mask)
    explicit = RadiomicsFeatureExtractor({**base, "setting": {"binWidth": 25}}).execute(image, mask)
    assert float(omitted["original_firstorder_Entropy"]) == float(
        explicit["original_firstorder_Entropy"]
    )
    with_count = effective_settings(validate_params({"setting": {"binCount": 16}}))
    assert with_count["setting"]["binWidth"] is None and with_count["setting"]["binCount"] == 16


def test_diagnostics_side_table(extracted):
    store, params, units = extracted
    table = pq.read_table(store.path(diagnostics_table_key(params.params_hash())))
    rows = {(r["series"], r["roi"]): r for r in table.to_pylist()}
    assert set(rows) == {(u.series, u.roi) for u in units}
    image = sitk_read(store, units[0].image)
    mask = sitk_read(store, units[0].mask)
    reference = RadiomicsFeatureExtractor(params.canonical()).execute(image, mask)
    row = rows[(units[0].series, units[0].roi)]
    voxels = "diagnostics_Mask-original_VoxelNum"
    assert row[voxels] == reference[voxels]
    assert row["diagnostics_Image-original_Spacing"] == list(
        reference["diagnostics_Image-original_Spacing"]
    )
    names = table.column_names
    assert not any(c.startswith(("diagnostics_Versions", "diagnostics_Config")) for c in names)


def sitk_read(store, key):
    import SimpleITK as sitk

    return sitk.ReadImage(store.path(key))


def test_methods_text_and_csv_export(extracted, tmp_path):
    store, params, _ = extracted
    out = tmp_path / "features.csv"
    result = export_features(store, out)
    assert (result.rows, result.format) == (2, "csv")
    text = out.read_text()
    block = [line[2:] for line in text.splitlines() if line.startswith("# ")]
    paragraph = "\n".join(block)
    assert "PyRadiomics 3.0.1" in paragraph and "fixed bin width of 10" in paragraph
    assert "native voxel spacing" in paragraph and "CT in HU" in paragraph
    assert "read-series (2 of 2 series)" in paragraph
    frame = pd.read_csv(out, comment="#")  # an independent reader of the file
    table = pq.read_table(store.path(features_key(params.params_hash()))).to_pandas()
    assert list(frame["series"]) == list(table["series"])
    for column in ("original_firstorder_Mean", "original_shape_VoxelVolume"):
        for got, want in zip(frame[column], table[column], strict=True):
            assert math.isclose(got, want, rel_tol=1e-12), column
    parquet = export_features(store, tmp_path / "f.parquet", params.params_hash()[:12], "parquet")
    assert parquet.params_hash == params.params_hash()
    meta = pq.read_schema(tmp_path / "f.parquet").metadata
    assert b"fixed bin width of 10" in meta[b"oncoflow.methods_text"]


def test_manifest_methods_block(extracted):
    store, params, units = extracted
    table = store.read_table(features_key(params.params_hash()))
    metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    harmonised = store.read_table("harmonised/series.parquet")
    series = harmonised.filter(pc.equal(harmonised.column("series"), units[0].series))
    block = manifest_methods(metadata, series, table)
    assert block["effectiveSettings"]["setting"]["binWidth"] == 10
    assert block["units"]["intensity"] == {"CT": ["HU"]}
    assert block["units"]["features"]["shape_VoxelVolume"] == "mm3"
    assert block["units"]["features"]["firstorder_Mean"] == "I"
    assert list(block["harmonisation"]["series"]) == [units[0].series]  # published series only
    assert block["text"] == methods_text(read_methods(metadata), table)


def test_export_errors_are_one_line(extracted, tmp_path, capsys):
    store, _, _ = extracted
    args = ["export", "--site", "site-a", "--store", store.url, "--out"]
    with pytest.raises(SystemExit) as info:
        cli.main([*args, str(tmp_path / "missing" / "x.csv")])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: output folder")
    with pytest.raises(SystemExit) as info:
        cli.main(["export", "--site", "site-b", "--store", store.url])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: store {store.url} has no site 'site-b' (sites there: site-a)"
    with pytest.raises(SystemExit) as info:
        cli.main([*args, str(tmp_path / "ok.csv"), "--json"])
    assert info.value.code == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2
    assert Path(tmp_path / "ok.csv").read_text().startswith("# oncoflow features export")

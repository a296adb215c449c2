"""IBSI identifiers on the features table: coverage, reference spot checks, notes, Croissant."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from radiomics.featureextractor import RadiomicsFeatureExtractor

from tasks.cohort.manifest import record_set
from tasks.radiomics.extract import RoiUnit
from tasks.radiomics.ibsi import (
    FEATURE_COLUMN,
    FIXED_BIN_SIZE_NOTE,
    TABLE_FILE,
    describe_column,
    load_table,
    parse_table,
)
from tasks.radiomics.params import validate_params
from tasks.radiomics.samples import SampleRoi, SampleSeries, make_image, make_mask, series_key
from tasks.radiomics.table import FeatureRow, build_features_table
from tasks.store import table_to_parquet_bytes

#: Reference identifiers typed from the IBSI 1 reference manual (arXiv:1612.07003) and IBSI 2
#: (arXiv:2006.05470), independently of the table under test.
REFERENCE = {
    "original_shape_MeshVolume": "RNU0",
    "original_shape_VoxelVolume": "YEKZ",
    "original_shape_Sphericity": "QCFX",
    "original_shape_SurfaceArea": "C0JK",
    "original_shape_Maximum3DDiameter": "L0JK",
    "original_firstorder_Energy": "N8CA",
    "original_firstorder_Mean": "Q4LE",
    "original_firstorder_Kurtosis": "IPH6",
    "original_firstorder_10Percentile": "QG58",
    "original_glcm_JointEntropy": "TU9B",
    "original_glcm_SumSquares": "UR99",
    "original_glcm_MaximumProbability": "GYBY",
    "original_glrlm_ShortRunEmphasis": "22OV",
    "original_glszm_SmallAreaEmphasis": "5QRC",
    "original_gldm_SmallDependenceEmphasis": "SODN",
    "original_ngtdm_Coarseness": "QCDE",
    "original_shape_Maximum2DDiameterSlice": "",
    "original_firstorder_TotalEnergy": "",
    "original_glcm_MCC": "",
}
PARAMS = validate_params(
    {
        "setting": {"binWidth": 25, "voxelArrayShift": 1000, "sigma": [1.0]},
        "imageType": {"Original": {}, "LoG": {}, "Wavelet": {}},
    }
)


@pytest.fixture(scope="module")
def features_file() -> pq.ParquetFile:
    """A features table of real pyradiomics values on a tiny phantom, written and read back."""
    spec = SampleSeries(series_key(1), "CT", size=(20, 20, 10), rois=(SampleRoi("gtv", 6.0),))
    image = make_image(spec)
    mask = make_mask(spec, spec.rois[0], image)
    extractor = RadiomicsFeatureExtractor(PARAMS.canonical())
    values = {
        k: float(v) for k, v in extractor.execute(image, mask).items() if "diagnostics" not in k
    }
    unit = RoiUnit(
        spec.series, spec.study, spec.patient, "CT", "gtv", "i", "m", "a" * 64, "b" * 64, 1
    )
    table, metadata = build_features_table(
        "site-a", [FeatureRow(unit, "ok", features=values)], PARAMS
    )
    return pq.ParquetFile(io.BytesIO(table_to_parquet_bytes(table, metadata)))


def test_codes_cover_original_columns_and_match_the_reference(features_file):
    schema = features_file.schema_arrow
    original = [f for f in schema if f.name.startswith("original_")]
    assert len(original) > 90
    with_code = [f for f in original if (f.metadata or {}).get(b"ibsi")]
    assert len(with_code) / len(original) >= 0.90
    for name, code in REFERENCE.items():
        assert schema.field(name).metadata[b"ibsi"].decode() == code, name
    # every feature column is annotated (empty where IBSI has no identifier); keys are not
    features = [f for f in schema if FEATURE_COLUMN.match(f.name)]
    assert len(features) > 3 * len(original)
    assert all(b"ibsi" in (f.metadata or {}) for f in features)
    assert schema.field("series").metadata is None


def test_filters_and_departures(features_file):
    schema = features_file.schema_arrow
    log = next(f for f in schema if f.name.startswith("log-sigma-") and "JointEntropy" in f.name)
    assert log.metadata[b"ibsi"] == b"TU9B" and log.metadata[b"ibsi_filter"] == b"L6PA"
    wavelet = next(f for f in schema if f.name.startswith("wavelet-") and "_Mean" in f.name)
    assert wavelet.metadata[b"ibsi_filter"] == b"25BO"
    assert schema.field("original_firstorder_Mean").metadata[b"ibsi_filter"] == b""
    assert b"ibsi_note" not in schema.field("original_firstorder_Mean").metadata
    assert b"plus 3" in schema.field("original_firstorder_Kurtosis").metadata[b"ibsi_note"]
    assert b"voxelArrayShift" in schema.field("original_firstorder_Energy").metadata[b"ibsi_note"]
    glcm = schema.field("original_glcm_Contrast").metadata
    assert glcm[b"ibsi_family"] == b"LFYI"
    assert FIXED_BIN_SIZE_NOTE.encode() in glcm[b"ibsi_note"]


def test_bin_count_has_no_fixed_bin_size_note():
    params = validate_params({"setting": {"binCount": 32}})
    described = describe_column("original_glcm_Contrast", params)
    assert described is not None and described.notes == ()
    square = describe_column("square_firstorder_Mean", params)
    assert square is not None and square.ibsi == "Q4LE" and square.filter_code == ""
    assert "without an IBSI identifier" in square.notes[0]
    assert describe_column("prov_image_sha256") is None


def test_croissant_fields_carry_the_codes(features_file):
    rs = record_set("features", "features.parquet", features_file.schema_arrow, "features")
    by_name = {f["name"]: f for f in rs["field"]}
    assert "IBSI RNU0" in by_name["original_shape_MeshVolume"]["description"]
    assert "filter IBSI L6PA" in next(
        v["description"] for k, v in by_name.items() if k.startswith("log-sigma-")
    )
    assert "description" not in by_name["series"]


def test_table_covers_pyradiomics_and_rejects_bad_rows():
    from radiomics import getFeatureClasses

    table = load_table()
    for cls, impl in getFeatureClasses().items():
        for name in impl.getFeatureNames():
            assert (cls, name) in table.features, (cls, name)
    header = TABLE_FILE.read_text().split("kind,class", 1)[0]
    assert "arXiv:1612.07003" in header and "oncoray/mirp" in header
    bad = "kind,class,name,ibsi,ibsi_name,mirp,unit,note\nfeature,glcm,X,TOOLONG,,,1,\n"
    with pytest.raises(ValueError, match="bad identifier"):
        parse_table(bad)

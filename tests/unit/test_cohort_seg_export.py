"""ROI masks exported as DICOM SEG (highdicom), read back with highdicom."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from tasks.cohort.seg_export import SegSettings, build_seg, derived_uid, seg_bytes
from tasks.errors import OncoflowError
from tests.dicom_factory import Geometry, image_series, oblique_direction

GEOMETRY = Geometry(size=(12, 10, 6), spacing=(0.8, 0.9, 2.5), origin=(-5.0, 3.0, 40.0),
                    direction=oblique_direction(15.0))  # fmt: skip


def mask_image(array: np.ndarray, geometry: Geometry = GEOMETRY) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def test_masks_become_segments_on_the_dicom_grid() -> None:
    slices = image_series(np.zeros((6, 10, 12)), GEOMETRY, series_key="ct")
    gtv = np.zeros((6, 10, 12), bool)
    gtv[2:4, 3:7, 4:9] = True
    lung = np.zeros((6, 10, 12), bool)
    lung[1:5, 1:9, 1:11] = True
    shuffled = [slices[i] for i in (3, 0, 5, 1, 4, 2)]  # any instance order
    settings = SegSettings(method="automatic", algorithm="lung-net", algorithm_version="2.1")
    seg = build_seg(shuffled, {"lung": mask_image(lung), "gtv": mask_image(gtv)}, settings,
                    source="RTSTRUCT", series_key="2.25.77")  # fmt: skip
    data = seg_bytes(seg)
    again = build_seg(slices, {"gtv": mask_image(gtv), "lung": mask_image(lung)}, settings,
                      source="RTSTRUCT", series_key="2.25.77")  # fmt: skip
    assert seg_bytes(again) == data  # same input, same bytes
    back = hd.seg.segread(io.BytesIO(data))
    items = list(back.SegmentSequence)
    assert [(int(i.SegmentNumber), i.SegmentLabel) for i in items] == [(1, "gtv"), (2, "lung")]
    assert items[0].SegmentAlgorithmType == "AUTOMATIC"
    assert items[0].SegmentAlgorithmName == "lung-net"
    assert items[0].SegmentDescription == "gtv (automatic, from RTSTRUCT)"
    assert items[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Neoplasm"
    uids = [s.SOPInstanceUID for s in slices]
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2]
    )
    assert pixels.shape == (6, 10, 12, 2)
    assert np.array_equal(pixels[..., 0] > 0, gtv) and np.array_equal(pixels[..., 1] > 0, lung)
    assert back.StudyInstanceUID == slices[0].StudyInstanceUID
    assert back.SeriesInstanceUID.startswith("2.25.")


def test_a_mask_on_another_grid_is_resampled_and_empty_rois_are_refused() -> None:
    slices = image_series(np.zeros((6, 10, 12)), GEOMETRY, series_key="ct")
    fine = Geometry(size=(24, 20, 6), spacing=(0.4, 0.45, 2.5), origin=GEOMETRY.origin,
                    direction=GEOMETRY.direction)  # fmt: skip
    array = np.zeros((6, 20, 24), bool)
    array[2:4, 6:14, 8:18] = True
    seg = build_seg(slices, {"gtv": mask_image(array, fine)}, SegSettings(), source="NIfTI mask",
                    series_key="2.25.78")  # fmt: skip
    item = seg.SegmentSequence[0]
    assert item.SegmentAlgorithmType == "MANUAL" and "SegmentAlgorithmName" not in item
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in slices], segment_numbers=[1]
    )[..., 0]
    assert pixels[2:4, 3:7, 4:9].all() and pixels.sum() == 2 * 4 * 5
    with pytest.raises(OncoflowError, match="no ROI has a voxel"):
        build_seg(slices, {"gtv": mask_image(np.zeros((6, 10, 12)))}, SegSettings(),
                  source="NIfTI mask", series_key="2.25.79")  # fmt: skip
    with pytest.raises(OncoflowError, match="needs its algorithm"):
        SegSettings(method="automatic")


def test_publishing_dicom_exports_the_masks_as_seg(tmp_path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.cohort.publish import publish_cohort
    from tasks.cohort.spec import parse_spec
    from tasks.cohort.storage import RetryPolicy
    from tests.dicom_factory import to_bytes
    from tests.unit.test_cohort_fixture import PARAMS_HASH, build_site

    store = build_site(str(tmp_path / "store"), with_seg=False)
    deid = store.read_table("deid/series.parquet").to_pylist()
    target = next(r for r in deid if r["modality"] == "CT")  # CHEST, rois gtv and lung
    # give that series real geometry: the fixture's NIfTI grid (6 x 6 x 4, spacing 1, 1, 2)
    slices = image_series(np.zeros((4, 6, 6)), Geometry(size=(6, 6, 4), spacing=(1.0, 1.0, 2.0)),
                          series_key="fixture")  # fmt: skip
    paths = []
    pseudonym = "KZXWYTBOIDAMRTGQTSNJQGEABC"  # the form of the engine's patient pseudonyms
    frame_of_reference = derived_uid(target["series"], "for")
    for k, ds in enumerate(slices):
        ds.SeriesInstanceUID, ds.StudyInstanceUID = target["series"], target["study"]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = derived_uid("sop", str(k))
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PatientID, ds.PatientName = pseudonym, pseudonym
        ds.PatientIdentityRemoved, ds.StudyID = "YES", ""
        key = f"deid/dicom/{target['series']}/{k:04d}.dcm"
        store.write_bytes(key, to_bytes(ds))
        paths.append(key)
    rows = [{**r, "paths": paths} if r["series"] == target["series"] else r for r in deid]
    store.write_table("deid/series.parquet", pa.Table.from_pylist(rows))
    spec = parse_spec({"name": "seg", "title": "SEG", "description": "DICOM with SEG",
                       "licence": "CC-BY-4.0", "include": {"dicom": True},
                       "features": PARAMS_HASH,
                       "selection": {"modality": ["CT"]}})  # fmt: skip
    result = publish_cohort(store, spec, str(tmp_path / "pub"),
                            policy=RetryPolicy(attempts=2))  # fmt: skip
    version = tmp_path / "pub" / "seg" / result.version
    series = {r["series"]: r for r in pq.read_table(version / "series.parquet").to_pylist()}
    row = series[target["series"]]
    (seg_series,) = row["seg_series"]
    seg_name = f"dicom/{seg_series}/00000.dcm"
    assert seg_name in row["dicom"]
    seg = hd.seg.segread(version / seg_name)
    assert [i.SegmentLabel for i in seg.SegmentSequence] == ["gtv", "lung"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == target["series"]
    assert seg.PatientID == pseudonym  # copied from the de-identified images
    uids = [s.SOPInstanceUID for s in slices]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    expected = np.zeros((4, 6, 6), bool)
    expected[1:3, 0:3, 1:4] = True  # the fixture's gtv mask (first ROI)
    assert np.array_equal(pixels[..., 0] > 0, expected)
    # the other CT series has DICOM without geometry: no SEG, listed in the release report
    report = json.loads((version / "risk-report.json").read_text())
    assert report["missing_metadata"].get("dicom_seg") == 1
    # each published ROI of the series has its DICOM SR, referencing the exported SEG's
    # segment (the leak gate passed it); the features are the published table's
    features = pq.read_table(version / "features.parquet").to_pylist()
    for number, roi in enumerate(["gtv", "lung"], start=1):
        values = next(r for r in features if (r["series"], r["roi"]) == (target["series"], roi))
        sr = hd.sr.srread(version / "sr" / target["series"] / f"{roi}.dcm")
        got = {}
        for group in sr.content.get_volumetric_roi_measurement_groups():
            ref = group.referenced_segment
            assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
            assert ref.referenced_segment_numbers == [number]
            got.update({(group.tracking_identifier, m.name.value): m.value
                        for m in group.get_measurements()})  # fmt: skip
        assert got == pytest.approx({
            (f"{roi} original", "Q4LE"): values["original_firstorder_Mean"],
            (f"{roi} original", "YEKZ"): values["original_shape_VoxelVolume"],
            (f"{roi} wavelet-LLH", "ACUI"): values["wavelet-LLH_glcm_Contrast"],
        })  # fmt: skip
        assert sr.PatientID == pseudonym
    # the series without a SEG has none
    assert not (version / "sr").joinpath(next(
        r["series"] for r in deid if r["modality"] == "CT" and r["series"] != target["series"]
    )).exists()  # fmt: skip
    # publishing again writes nothing new: same SEG, same reports, same version
    again = publish_cohort(store, spec, str(tmp_path / "pub"), policy=RetryPolicy(attempts=2))
    assert not again.created and again.version == result.version

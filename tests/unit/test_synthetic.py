"""Synthetic cohort generator, checked with independent readers (pydicom, highdicom, SimpleITK)."""

from __future__ import annotations

import hashlib
import math
import struct
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from tasks.errors import OncoflowError
from tasks.records import Reason
from tasks.synthetic import CohortTruth, generate_cohort
from tasks.synthetic.scan import searchable_bytes
from tasks.synthetic.truth import LesionTruth, SeriesTruth, SiteTruth


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CohortTruth]:
    out = tmp_path_factory.mktemp("cohort")
    truth = generate_cohort(out, sites=3, patients=3, seed=0)
    return out, truth


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _image_series(site: SiteTruth) -> list[SeriesTruth]:
    return [s for s in site.series() if s.kind == "image"]


def _inside(points: np.ndarray, lesion: LesionTruth) -> np.ndarray:
    q = (points - np.array(lesion.centre_mm)) / np.array(lesion.semi_axes_mm)
    return (q * q).sum(axis=-1) <= 1.0


def _study_lesions(site: SiteTruth, series: SeriesTruth) -> list[LesionTruth]:
    for patient in site.patients:
        for study in patient.studies:
            if study.study_instance_uid == series.study_instance_uid:
                return study.lesions
    raise AssertionError("series without study")


def test_same_seed_gives_identical_bytes(cohort: tuple[Path, CohortTruth], tmp_path: Path) -> None:
    out, _ = cohort
    generate_cohort(tmp_path / "again", sites=3, patients=3, seed=0)
    first, again = _hashes(out), _hashes(tmp_path / "again")
    assert len(first) > 800
    assert first == again


def test_another_seed_gives_other_data(tmp_path: Path) -> None:
    a = generate_cohort(tmp_path / "a", sites=1, patients=1, seed=1)
    b = generate_cohort(tmp_path / "b", sites=1, patients=1, seed=2)
    ha, hb = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert not set(ha.values()) & set(hb.values()) - {hashlib.sha256(b"").hexdigest()}
    pa, pb = a.site("site-a").patients[0], b.site("site-a").patients[0]
    assert not set(pa.planted_values) & set(pb.planted_values)
    assert pa.lesions[0].centre_mm != pb.lesions[0].centre_mm


def test_refuses_a_non_empty_output_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(OncoflowError):
        generate_cohort(tmp_path, sites=1, patients=1)


def test_truth_round_trips_and_accounts_for_every_file(cohort: tuple[Path, CohortTruth]) -> None:
    out, truth = cohort
    assert CohortTruth.load(out / "truth.json") == truth
    assert list(truth.sites) == ["site-a", "site-b", "site-c"]
    assert all(truth.site(name).site == name for name in truth.sites)
    for site in truth.sites.values():
        on_disk = {
            p.relative_to(out / site.site).as_posix()
            for p in (out / site.site).rglob("*")
            if p.is_file()
        }
        assert on_disk == set(site.file_outcomes)
        assert site.totals.files_written == len(on_disk)
        listed = [f for s in site.series() for f in s.files]
        assert len(listed) == len(set(listed))
        assert {f for f, o in site.file_outcomes.items() if o == "ok"} == set(listed)
        assert site.totals.instances_ok == len(listed)
        assert sum(s.n_files for s in site.series()) == len(listed)
        assert len(site.patients) == 3
        assert any(len(p.studies) == 2 for p in site.patients)
        assert any(len(p.lesions) == 2 for p in site.patients)


def test_every_file_reads_back_with_pydicom(cohort: tuple[Path, CohortTruth]) -> None:
    out, truth = cohort
    seen_ts = set()
    for site in truth.sites.values():
        for series in site.series():
            for rel, uid in zip(series.files, series.sop_instance_uids, strict=True):
                ds = pydicom.dcmread(out / site.site / rel)
                assert ds.SeriesInstanceUID == series.series_instance_uid
                assert ds.StudyInstanceUID == series.study_instance_uid
                assert ds.SOPInstanceUID == uid
                assert ds.Modality == series.modality
                assert ds.file_meta.TransferSyntaxUID == series.transfer_syntax_uid
                seen_ts.add(ds.file_meta.TransferSyntaxUID)
                if series.kind == "image":
                    arr = ds.pixel_array
                    frames = (ds.NumberOfFrames,) if "NumberOfFrames" in ds else ()
                    assert arr.shape == (*frames, ds.Rows, ds.Columns)
                    if series.geometry:
                        assert arr.shape[-2:] == series.geometry.size[1::-1]
                    assert arr.std() > 0
    assert {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        RLELossless,
        DeflatedExplicitVRLittleEndian,
    } <= seen_ts


def _sitk_read(out: Path, site: SiteTruth, series: SeriesTruth) -> sitk.Image:
    paths = [out / site.site / f for f in series.files]
    if len(paths) == 1:  # multi-frame
        return sitk.ReadImage(str(paths[0]))
    normal = np.cross(*np.reshape(series.geometry.image_orientation_patient, (2, 3)))

    def along(p: Path) -> float:
        return float(
            np.dot(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient, normal)
        )

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in sorted(paths, key=along)])
    return reader.Execute()


def _physical_points(image: sitk.Image) -> np.ndarray:
    size = image.GetSize()
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), axis=-1).reshape(
        -1, 3
    )
    direction = np.array(image.GetDirection()).reshape(3, 3)
    pts = np.array(image.GetOrigin()) + (idx * np.array(image.GetSpacing())) @ direction.T
    # back to numpy (z, y, x) order of sitk.GetArrayFromImage
    return pts.reshape(*size, 3).transpose(2, 1, 0, 3)


def test_image_volumes_match_truth_geometry_and_lesions_in_simpleitk(
    cohort: tuple[Path, CohortTruth],
) -> None:
    out, truth = cohort
    checked = 0
    for site in truth.sites.values():
        for series in _image_series(site):
            if series.geometry is None or series.ingest_status != "ok":
                continue
            image = _sitk_read(out, site, series)
            geo = series.geometry
            assert image.GetSize() == geo.size
            np.testing.assert_allclose(image.GetSpacing(), geo.spacing, atol=1e-3)
            np.testing.assert_allclose(image.GetOrigin(), geo.origin, atol=1e-3)
            np.testing.assert_allclose(image.GetDirection(), geo.direction, atol=1e-6)
            values = sitk.GetArrayFromImage(image).astype(np.float64)
            pts = _physical_points(image)
            if series.suv is not None:
                values = values * series.suv.suv_bw_scale
            for sample, lesion in zip(series.lesions, _study_lesions(site, series), strict=True):
                inside = _inside(pts, lesion)
                assert sample.roi_name == lesion.roi_name
                assert int(inside.sum()) == sample.voxels > 0
                assert values[inside].mean() == pytest.approx(sample.mean, rel=1e-4, abs=1e-3)
                if series.modality == "CT":
                    assert values[inside].std() > 20.0  # textured, not a flat blob
                    assert values[inside].mean() > values[~inside].mean() + 200.0
            checked += 1
    assert checked >= 3 * 9


def test_pet_suv_is_computable_by_hand_from_the_headers(cohort: tuple[Path, CohortTruth]) -> None:
    out, truth = cohort
    for site in truth.sites.values():
        for series in site.series():
            if series.role != "pet":
                continue
            ds = pydicom.dcmread(out / site.site / series.files[0])
            assert ds.Units == "BQML" and ds.DecayCorrection == "START"
            assert {"DECY", "ATTN"} <= set(ds.CorrectedImage)
            info = ds.RadiopharmaceuticalInformationSequence[0]
            injected = datetime.strptime(info.RadiopharmaceuticalStartDateTime, "%Y%m%d%H%M%S.%f")
            started = datetime.strptime(ds.SeriesDate + ds.SeriesTime, "%Y%m%d%H%M%S.%f")
            assert ds.AcquisitionTime == ds.SeriesTime
            decay = 2 ** (-(started - injected).total_seconds() / float(info.RadionuclideHalfLife))
            scale = float(ds.PatientWeight) * 1000 / (float(info.RadionuclideTotalDose) * decay)
            assert scale == pytest.approx(series.suv.suv_bw_scale, rel=1e-9)
            assert float(ds.RescaleSlope) == pytest.approx(series.suv.rescale_slope)
            stored = np.stack(
                [pydicom.dcmread(out / site.site / f).pixel_array for f in series.files]
            )
            suv = stored.astype(float) * float(ds.RescaleSlope) * scale
            assert suv.min() >= 0.0 and 3.0 < suv.max() < 15.0  # lesion uptake on a ~SUV 1 body
            assert np.median(suv) < 1.5


def test_seg_reads_with_highdicom_and_matches_the_lesions(cohort: tuple[Path, CohortTruth]) -> None:
    out, truth = cohort
    for site in truth.sites.values():
        uids = {s.series_instance_uid: s for s in site.series()}
        for series in site.series():
            if series.kind != "seg":
                continue
            seg = hd.seg.segread(out / site.site / series.files[0])
            ct = uids[series.referenced_series_uid]
            assert seg.SegmentationType == "BINARY"
            labels = [d.SegmentLabel for d in seg.SegmentSequence]
            assert labels == [s.roi_name for s in series.lesions]
            assert set(labels) <= set(site.profile.roi_names)
            referenced = {
                r.ReferencedSOPInstanceUID
                for s in seg.ReferencedSeriesSequence
                for r in s.ReferencedInstanceSequence
            }
            assert referenced <= set(ct.sop_instance_uids)
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=ct.sop_instance_uids,
                segment_numbers=list(range(1, len(labels) + 1)),
            )
            counts = pixels.reshape(-1, len(labels)).sum(axis=0)
            assert counts.tolist() == [s.voxels for s in series.lesions]
            assert seg.ContentDate == seg.SeriesDate  # no wall-clock date left by highdicom


def test_rtstruct_contours_lie_on_the_lesion_surface(cohort: tuple[Path, CohortTruth]) -> None:
    out, truth = cohort
    for site in truth.sites.values():
        uids = {s.series_instance_uid: s for s in site.series()}
        for series in site.series():
            if series.kind != "rtstruct":
                continue
            ds = pydicom.dcmread(out / site.site / series.files[0])
            ct = uids[series.referenced_series_uid]
            lesions = {le.roi_name: le for le in _study_lesions(site, series)}
            names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
            slices = {}
            for rel in ct.files:
                sl = pydicom.dcmread(out / site.site / rel, stop_before_pixels=True)
                slices[sl.SOPInstanceUID] = np.array(sl.ImagePositionPatient, dtype=float)
            normal = np.cross(*np.reshape(ct.geometry.image_orientation_patient, (2, 3)))
            voxel = min(ct.geometry.spacing)
            for roi, sample in zip(ds.ROIContourSequence, series.lesions, strict=True):
                lesion = lesions[names[roi.ReferencedROINumber]]
                assert names[roi.ReferencedROINumber] == sample.roi_name
                assert len(roi.ContourSequence) == sample.contours > 0
                for contour in roi.ContourSequence:
                    pts = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
                    q = (pts - np.array(lesion.centre_mm)) / np.array(lesion.semi_axes_mm)
                    distance = np.abs(np.sqrt((q * q).sum(axis=1)) - 1) * min(lesion.semi_axes_mm)
                    assert distance.max() < voxel
                    origin = slices[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
                    assert np.abs((pts - origin) @ normal).max() < 1e-3


def test_every_planted_value_is_in_that_patients_bytes_and_only_there(
    cohort: tuple[Path, CohortTruth],
) -> None:
    out, truth = cohort
    blobs = {}
    for site in truth.sites.values():
        for patient in site.patients:
            folder = out / site.site / patient.directory
            blobs[patient.patient_id] = b"\0".join(
                searchable_bytes(p) for p in sorted(folder.rglob("*")) if p.is_file()
            )
    for site in truth.sites.values():
        for patient in site.patients:
            blob = blobs[patient.patient_id]
            missing = [v for v in patient.planted_values if v.encode("latin-1") not in blob]
            assert missing == []
            assert len(patient.planted_values) > 100
            assert {patient.patient_name, patient.patient_id, patient.birth_date} <= set(
                patient.planted_values
            )
            others = [b for pid, b in blobs.items() if pid != patient.patient_id]
            for value in (
                patient.patient_id,
                patient.patient_name,
                patient.identifiers["family"],
                patient.identifiers["other_id"],
            ):
                assert not any(value.encode() in b for b in others)


def test_identifiers_sit_in_nested_sequences_and_private_blocks(
    cohort: tuple[Path, CohortTruth],
) -> None:
    out, truth = cohort
    site = truth.site("site-a")
    patient = site.patients[0]
    ds = pydicom.dcmread(out / site.site / patient.studies[0].series[0].files[0])
    other = ds.OtherPatientIDsSequence[0]
    assert (
        other.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID
        == patient.identifiers["universal_entity_id"]
    )
    request = ds.RequestAttributesSequence[0]
    assert request.RequestedProcedureID and request.ScheduledProcedureStepID
    assert patient.patient_name in request.RequestedProcedureCodeSequence[0].CodeMeaning
    block = ds.private_block(0x0011, "ACME HIS EXPORT 2.1")
    assert block[0x02].value == patient.patient_id
    nested = block[0x04].value[0].private_block(0x0013, "ACME HIS CASEFILE")
    assert nested[0x10].value == patient.identifiers["other_id"]
    for keyword in (
        "PatientAddress",
        "MilitaryRank",
        "EthnicGroup",
        "AccessionNumber",
        "StationName",
        "DeviceSerialNumber",
        "OperatorsName",
        "PerformingPhysicianName",
        "ImageComments",
        "InstitutionName",
        "ReferringPhysicianTelephoneNumbers",
        "PatientMotherBirthName",
    ):
        assert str(ds.data_element(keyword).value)
    assert patient.identifiers["family"] in ds.ImageComments


def test_planted_faults_are_what_truth_says(cohort: tuple[Path, CohortTruth]) -> None:
    out, truth = cohort
    for site in truth.sites.values():
        root = out / site.site
        kinds = {f.reason for f in site.faults}
        assert {
            r.value
            for r in (
                Reason.EMPTY_FILE,
                Reason.TRUNCATED_FILE,
                Reason.NOT_DICOM,
                Reason.DICOMDIR,
                Reason.DUPLICATE_INSTANCE,
                Reason.MISSING_SLICE,
                Reason.INCONSISTENT_SPACING,
                Reason.LOCALIZER,
                Reason.BURNED_IN_ANNOTATION,
                Reason.MISSING_SUV_DATA,
            )
        } == kinds
        for fault in site.faults:
            path = root / fault.paths[0]
            if fault.reason == Reason.EMPTY_FILE:
                assert path.stat().st_size == 0
            elif fault.reason == Reason.TRUNCATED_FILE:
                data = path.read_bytes()
                at = data.rindex(b"\xe0\x7f\x10\x00OW")
                (declared,) = struct.unpack("<I", data[at + 8 : at + 12])
                assert len(data) - (at + 12) < declared
                header = pydicom.dcmread(path, stop_before_pixels=True)
                assert header.Modality == "CT"
            elif fault.reason == Reason.NOT_DICOM:
                with pytest.raises(InvalidDicomError):
                    pydicom.dcmread(path)
            elif fault.reason == Reason.DICOMDIR:
                assert (
                    pydicom.dcmread(path).file_meta.MediaStorageSOPClassUID
                    == "1.2.840.10008.1.3.10"
                )
            elif fault.reason == Reason.DUPLICATE_INSTANCE:
                original = fault.detail.removeprefix("byte copy of ")
                assert path.read_bytes() == (root / original).read_bytes()
                assert site.file_outcomes[original] == "ok" and original < fault.paths[0]
            elif fault.reason == Reason.LOCALIZER:
                ds = pydicom.dcmread(path)
                assert (
                    "LOCALIZER" in ds.ImageType
                    and ds.SeriesInstanceUID == fault.series_instance_uid
                )
                series = next(
                    s for s in site.series() if s.series_instance_uid == fault.series_instance_uid
                )
                normal = np.cross(*np.reshape(series.geometry.image_orientation_patient, (2, 3)))
                scout_normal = np.cross(
                    *np.reshape(np.array(ds.ImageOrientationPatient, float), (2, 3))
                )
                assert abs(float(normal @ scout_normal)) < 1e-6
                assert series.ingest_status == "ok" and fault.paths[0] not in series.files
            elif fault.reason in (Reason.MISSING_SLICE, Reason.INCONSISTENT_SPACING):
                positions = sorted(
                    float(
                        np.dot(
                            pydicom.dcmread(root / p, stop_before_pixels=True).ImagePositionPatient,
                            normal,
                        )
                    )
                    for p in fault.paths
                    for normal in [
                        np.cross(
                            *np.reshape(
                                np.array(
                                    pydicom.dcmread(
                                        root / p, stop_before_pixels=True
                                    ).ImageOrientationPatient,
                                    float,
                                ),
                                (2, 3),
                            )
                        )
                    ]
                )
                gaps = np.diff(positions)
                step = float(np.median(gaps))
                if fault.reason == Reason.MISSING_SLICE:
                    assert sorted(np.round(gaps / step, 3).tolist()).count(2.0) == 1
                    assert np.allclose(sorted(gaps)[:-1], step)
                else:
                    assert gaps.max() - gaps.min() > 0.5 * step
                    assert not np.any(np.isclose(gaps, 2 * step))
            elif fault.reason == Reason.MISSING_SUV_DATA:
                ds = pydicom.dcmread(path)
                assert ds.Modality == "PT" and "RadiopharmaceuticalInformationSequence" not in ds
            elif fault.reason == Reason.BURNED_IN_ANNOTATION:
                ds = pydicom.dcmread(path)
                assert ds.BurnedInAnnotation == "YES"
                assert (ds.pixel_array > 200).sum() > 100  # text burned into the pixels


def test_site_profiles_differ_and_counts_are_derived(cohort: tuple[Path, CohortTruth]) -> None:
    _, truth = cohort
    profiles = [s.profile for s in truth.sites.values()]
    assert len({p.roi_names for p in profiles}) == 3
    assert len({p.manufacturer for p in profiles}) == 3
    oblique = [p for p in profiles if any(0 < abs(v) < 1 for v in p.orientation)]
    assert len(oblique) == 1
    assert math.isclose(np.linalg.norm(oblique[0].orientation[3:]), 1.0)
    for site in truth.sites.values():
        series = list(site.series())
        assert sum(site.totals.series_ingest["CT"].values()) == sum(
            s.modality == "CT" for s in series
        )
        assert site.totals.series_ingest["CT"]["quarantined"] == 2
        assert site.totals.quarantined_series["harmonise"] == {"missing-suv-data": 1}
        assert site.totals.quarantined_series["deidentify"] == {"burned-in-annotation": 1}
        assert (
            site.totals.parsable_dicom_files == site.totals.files_written - 3
        )  # empty + 2 not-DICOM
        assert sum(site.totals.file_outcomes.values()) == site.totals.files_written


def test_enhanced_multiframe_mr_matches_its_single_frame_series(
    cohort: tuple[Path, CohortTruth],
) -> None:
    out, truth = cohort
    for site in truth.sites.values():
        by_uid = {s.series_instance_uid: s for s in site.series()}
        enhanced = [s for s in site.series() if s.role == "mr-enhanced"]
        assert len(enhanced) == 1
        mf = pydicom.dcmread(out / site.site / enhanced[0].files[0])
        source = by_uid[enhanced[0].referenced_series_uid]
        shared = mf.SharedFunctionalGroupsSequence[0]
        assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [
            source.geometry.spacing[1],
            source.geometry.spacing[0],
        ]
        assert [
            float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient
        ] == list(source.geometry.image_orientation_patient)
        frames = {
            tuple(np.round(f.PlanePositionSequence[0].ImagePositionPatient, 3)): mf.pixel_array[i]
            for i, f in enumerate(mf.PerFrameFunctionalGroupsSequence)
        }
        assert int(mf.NumberOfFrames) == len(frames) == source.n_files
        for rel in source.files:
            single = pydicom.dcmread(out / site.site / rel)
            key = tuple(np.round(np.array(single.ImagePositionPatient, dtype=float), 3))
            assert np.array_equal(frames[key], single.pixel_array)

"""Intensities: CT clipping, PET SUVbw (hand-computed), MR normalisation and N4."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tasks.harmonise.config import HarmoniseConfig
from tasks.harmonise.intensity import body_mask, harmonise_intensity, suv_factor
from tasks.harmonise.quarantine import Quarantined
from tasks.harmonise.volume import read_volume
from tasks.records import Reason
from tests.dicom_factory import Geometry, add_pet, image_series, to_bytes

CFG = HarmoniseConfig()
G = Geometry(size=(16, 12, 6), spacing=(4.0, 4.0, 3.0), origin=(-30.0, -22.0, 0.0))


def pet(**kwargs) -> list[pydicom.Dataset]:
    """A PET series holding 10,000 Bq/ml in a block, 1,000 elsewhere (slope 0.5)."""
    values = np.full(G.size[::-1], 1000.0)
    values[2:4, 4:8, 5:10] = 10000.0
    datasets = image_series(values, G, modality="PT", slope=0.5, intercept=0.0)
    datasets = add_pet(datasets, **kwargs)
    return [pydicom.dcmread(io.BytesIO(to_bytes(ds))) for ds in datasets]


def test_suvbw_hand_computed() -> None:
    # Hand calculation: uptake 09:30:00 → 10:30:00 = 3600 s; F-18 half-life 6586.2 s.
    # decay = 2^(-3600/6586.2) = 0.684632920; decayed dose = 370e6 * 0.684632920 = 253.314 MBq
    # SUVbw factor = 75,000 g / 253,314,180 Bq = 2.960750e-4 ml/Bq; 10,000 Bq/ml → 2.960750.
    datasets = pet()
    factor = suv_factor(datasets[0])
    assert factor.uptake_s == 3600.0
    assert factor.factor == pytest.approx(2.960750161e-4, rel=1e-9)
    vol = read_volume(datasets, CFG)
    out = harmonise_intensity(vol.image, "PT", datasets[0], CFG)
    assert out.intensity == "SUVbw"
    arr = sitk.GetArrayFromImage(out.image)
    assert arr[3, 5, 6] == pytest.approx(2.960750, rel=1e-6)
    assert arr[0, 0, 0] == pytest.approx(0.2960750, rel=1e-6)
    assert out.parameters["weight_kg"] == 75.0


def test_suvbw_injection_time_only_and_previous_day() -> None:
    # No RadiopharmaceuticalStartDateTime: the TM is taken on the series date.
    datasets = pet(series_time="110000")
    for ds in datasets:
        del ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime
    assert suv_factor(datasets[0]).factor == pytest.approx(3.578268067e-4, rel=1e-9)
    # Injected 23:50 the day before a 00:20 scan: 30 min uptake, not a negative time.
    datasets = pet(injection="20200101235000", series_time="002000")
    for ds in datasets:
        del ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime
    assert suv_factor(datasets[0]).uptake_s == 1800.0


def test_suv_admin_decay_and_gml_units() -> None:
    factor = suv_factor(pet(decay_correction="ADMIN")[0])
    assert factor.uptake_s == 0.0
    assert factor.factor == pytest.approx(75000 / 370e6, rel=1e-12)
    assert suv_factor(pet(units="GML")[0]).factor == 1.0


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"weight_kg": None}, Reason.MISSING_SUV_DATA),
        ({"dose_bq": None}, Reason.MISSING_SUV_DATA),
        ({"injection": "20200101113000"}, Reason.MISSING_SUV_DATA),  # after the scan
        ({"units": "CNTS"}, Reason.BAD_UNITS),
        ({"decay_correction": "NONE"}, Reason.BAD_UNITS),
    ],
)
def test_missing_or_unusable_suv_data_is_quarantined(kwargs, reason) -> None:
    with pytest.raises(Quarantined) as info:
        suv_factor(pet(**kwargs)[0])
    assert info.value.reason == reason


def test_missing_radiopharmaceutical_sequence() -> None:
    ds = pet()[0]
    del ds.RadiopharmaceuticalInformationSequence
    with pytest.raises(Quarantined) as info:
        suv_factor(ds)
    assert info.value.reason == Reason.MISSING_SUV_DATA


def test_ct_clip() -> None:
    image = sitk.GetImageFromArray(np.array([[[-3000, -1000, 0, 2000, 5000]]], dtype=np.int16))
    out = harmonise_intensity(
        image, "CT", pydicom.Dataset(), HarmoniseConfig(ct_clip=(-1000, 3000))
    )
    assert sitk.GetArrayFromImage(out.image).ravel().tolist() == [-1000, -1000, 0, 2000, 3000]
    unchanged = harmonise_intensity(image, "CT", pydicom.Dataset(), CFG)
    assert unchanged.image is image and unchanged.intensity == "HU"


def mr_phantom(bias: bool) -> sitk.Image:
    """A 'body' ellipsoid of 400 ± noise on a dark background, optionally with a smooth bias."""
    z, y, x = np.mgrid[0:20, 0:48, 0:48].astype(float)
    body = ((x - 24) / 20) ** 2 + ((y - 24) / 16) ** 2 + ((z - 10) / 9) ** 2 <= 1
    rng = np.random.default_rng(0)
    arr = np.where(body, 400.0, 5.0) + rng.normal(0, 10, body.shape)
    if bias:
        arr *= 1.0 + 0.4 * (x - 24) / 24
    image = sitk.GetImageFromArray(arr.astype(np.float32))
    image.SetSpacing((2.0, 2.0, 3.0))
    return image


def test_mr_zscore_in_body_mask() -> None:
    image = mr_phantom(bias=False)
    mask = sitk.GetArrayFromImage(body_mask(image)).astype(bool)
    assert 0.2 < mask.mean() < 0.6
    out = harmonise_intensity(
        image, "MR", pydicom.Dataset(), HarmoniseConfig(mr_normalisation="zscore")
    )
    assert out.intensity == "MR-zscore"
    values = sitk.GetArrayFromImage(out.image)[mask]
    assert values.mean() == pytest.approx(0.0, abs=1e-5)
    assert values.std() == pytest.approx(1.0, abs=1e-4)
    none = harmonise_intensity(image, "MR", pydicom.Dataset(), CFG)
    assert none.intensity == "MR-none" and none.image is image


def test_mr_n4_reduces_bias() -> None:
    image = mr_phantom(bias=True)
    mask = sitk.GetArrayFromImage(body_mask(image)).astype(bool)
    before = sitk.GetArrayFromImage(image)[mask]
    out = harmonise_intensity(image, "MR", pydicom.Dataset(), HarmoniseConfig(mr_n4=True))
    after = sitk.GetArrayFromImage(out.image)[mask]
    assert out.intensity == "MR-n4"
    assert after.std() / after.mean() < 0.6 * (before.std() / before.mean())

"""Per-modality intensities: CT in HU, PET in SUVbw, MR unchanged or z-scored in a body mask.

SUVbw follows the vendor-neutral QIBA/UPICT recipe: activity concentration in Bq/ml times body
weight in grams, divided by the injected dose decayed from injection to the time the image
values are decay-corrected to (series start for ``DecayCorrection = START``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import SimpleITK as sitk
from pydicom.dataset import Dataset

from tasks.harmonise.config import HarmoniseConfig
from tasks.harmonise.quarantine import Quarantined
from tasks.records import Reason

#: Longest plausible time from injection to scan start.
MAX_UPTAKE = timedelta(hours=12)


@dataclass(frozen=True)
class SuvFactor:
    """The factor from PET Bq/ml to SUVbw and the values it came from (no identifiers).

    Parameters
    ----------
    factor
        SUVbw per stored unit.
    units
        PET Units of the stored values.
    decay_correction
        DecayCorrection of the stored values.
    uptake_s
        Seconds from injection to the reference time (0 when not decayed).
    weight_kg, dose_bq, half_life_s
        Inputs of the formula.
    """

    factor: float
    units: str
    decay_correction: str
    uptake_s: float
    weight_kg: float
    dose_bq: float
    half_life_s: float

    def parameters(self) -> dict[str, Any]:
        """Return the JSON-serialisable parameters for provenance."""
        return {
            "factor": float(f"{self.factor:.10g}"),
            "units": self.units,
            "decay_correction": self.decay_correction,
            "uptake_s": round(self.uptake_s, 3),
            "weight_kg": self.weight_kg,
            "dose_bq": self.dose_bq,
            "half_life_s": self.half_life_s,
        }


def _dicom_datetime(date: str, time: str) -> datetime | None:
    """Parse a DICOM DA + TM (or a DT when ``time`` is empty) into a naive datetime."""
    text = (date + time).strip()
    if "+" in text[8:] or "-" in text[8:]:  # drop a UTC offset
        text = text[:8] + text[8:].replace("+", "-").split("-")[0]
    if not text:
        return None
    main, _, frac = text.partition(".")
    fmt = {8: "%Y%m%d", 10: "%Y%m%d%H", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}.get(len(main))
    if fmt is None:
        return None
    try:
        value = datetime.strptime(main, fmt)
    except ValueError:
        return None
    if frac.isdigit():
        value += timedelta(microseconds=int(frac[:6].ljust(6, "0")))
    return value


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def suv_factor(ds: Dataset) -> SuvFactor:
    """Compute the Bq/ml → SUVbw factor of a PET series from one of its instances.

    Parameters
    ----------
    ds
        A PET instance (all instances of a series share these attributes).

    Returns
    -------
    SuvFactor
        The factor and its inputs.

    Raises
    ------
    Quarantined
        ``missing-suv-data`` when weight, dose, half-life or times are missing or implausible;
        ``bad-units`` for units or decay-correction modes that cannot be converted.
    """
    units = str(ds.get("Units", "") or "").upper()
    decay = str(ds.get("DecayCorrection", "") or "").upper()
    if units not in ("BQML", "GML"):
        raise Quarantined(Reason.BAD_UNITS, f"PET units {units or 'missing'} are not BQML")
    weight = _positive(ds.get("PatientWeight"))
    if units == "GML":  # already SUVbw
        return SuvFactor(1.0, units, decay, 0.0, weight or 0.0, 0.0, 0.0)
    if weight is None:
        raise Quarantined(Reason.MISSING_SUV_DATA, "patient weight missing")
    info_seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not info_seq:
        raise Quarantined(Reason.MISSING_SUV_DATA, "radiopharmaceutical information missing")
    info = info_seq[0]
    dose = _positive(info.get("RadionuclideTotalDose"))
    half_life = _positive(info.get("RadionuclideHalfLife"))
    if dose is None:
        raise Quarantined(Reason.MISSING_SUV_DATA, "injected dose missing")
    if half_life is None:
        raise Quarantined(Reason.MISSING_SUV_DATA, "radionuclide half-life missing")
    if decay == "ADMIN":
        uptake = 0.0
    elif decay == "START":
        uptake = _uptake_seconds(ds, info)
    else:
        raise Quarantined(Reason.BAD_UNITS, f"decay correction {decay or 'missing'} unsupported")
    decayed = dose * math.pow(2.0, -uptake / half_life)
    factor = weight * 1000.0 / decayed
    return SuvFactor(factor, units, decay, uptake, weight, dose, half_life)


def _uptake_seconds(ds: Dataset, info: Dataset) -> float:
    """Seconds from injection to series start (the reference of START decay correction)."""
    series_date = str(ds.get("SeriesDate", "") or ds.get("AcquisitionDate", "") or "")
    series_time = str(ds.get("SeriesTime", "") or "")
    start = _dicom_datetime(series_date, series_time) if series_date and series_time else None
    if start is None:
        raise Quarantined(Reason.MISSING_SUV_DATA, "series date/time missing")
    injected = _dicom_datetime(str(info.get("RadiopharmaceuticalStartDateTime", "") or ""), "")
    if injected is None:
        time = str(info.get("RadiopharmaceuticalStartTime", "") or "")
        injected = _dicom_datetime(series_date, time) if time else None
        if injected is not None and injected > start:  # injected the day before
            injected -= timedelta(days=1)
    if injected is None:
        raise Quarantined(Reason.MISSING_SUV_DATA, "injection time missing")
    uptake = start - injected
    if uptake < timedelta(0) or uptake > MAX_UPTAKE:
        raise Quarantined(Reason.MISSING_SUV_DATA, "implausible time from injection to scan")
    return uptake.total_seconds()


def body_mask(image: sitk.Image) -> sitk.Image:
    """Return an automatic body mask: Otsu foreground, largest component, holes filled."""
    smooth = sitk.Cast(image, sitk.sitkFloat32)
    fg = sitk.OtsuThreshold(smooth, 0, 1)
    components = sitk.ConnectedComponent(fg)
    largest = sitk.RelabelComponent(components, sortByObjectSize=True) == 1
    return sitk.BinaryFillhole(largest)


def n4_correct(image: sitk.Image, mask: sitk.Image, shrink: int = 2) -> sitk.Image:
    """N4 bias-field correction, fitted on a shrunk image and applied at full resolution."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    shrink_factors = [shrink if s > 4 * shrink else 1 for s in image.GetSize()]
    small = sitk.Shrink(image, shrink_factors)
    small_mask = sitk.Shrink(mask, shrink_factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([20, 20, 20])
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(image)
    return image / sitk.Exp(log_bias)


@dataclass
class IntensityResult:
    """The image with harmonised intensities, its unit label and the step parameters."""

    image: sitk.Image
    intensity: str
    parameters: dict[str, Any]


def harmonise_intensity(
    image: sitk.Image, modality: str, ds: Dataset, config: HarmoniseConfig
) -> IntensityResult:
    """Convert rescaled values to the harmonised intensity of the modality.

    Parameters
    ----------
    image
        Volume with RescaleSlope/Intercept applied (CT: HU, PET: Units).
    modality
        DICOM Modality (``CT``, ``PT``, ``MR``; others are kept as they are).
    ds
        One instance of the series (PET attributes).
    config
        CT clip, MR normalisation and N4.

    Returns
    -------
    IntensityResult
        Image, intensity label (``HU``, ``SUVbw``, ``MR-none``, ``MR-zscore``, ``MR-n4-...``)
        and parameters.
    """
    if modality == "CT":
        if config.ct_clip is None:
            return IntensityResult(image, "HU", {"clip": None})
        low, high = config.ct_clip
        clipped = sitk.Clamp(image, image.GetPixelID(), low, high)
        return IntensityResult(clipped, "HU", {"clip": [low, high]})
    if modality == "PT":
        suv = suv_factor(ds)
        out = sitk.Cast(image, sitk.sitkFloat32) * suv.factor
        return IntensityResult(out, "SUVbw", suv.parameters())
    if modality == "MR":
        params: dict[str, Any] = {"normalisation": config.mr_normalisation, "n4": config.mr_n4}
        label = "MR"
        out = image
        mask = None
        if config.mr_n4 or config.mr_normalisation == "zscore":
            mask = body_mask(image)
            params["body_voxels"] = int(sitk.GetArrayViewFromImage(mask).sum())
        if config.mr_n4:
            assert mask is not None
            out = n4_correct(out, mask)
            label += "-n4"
        if config.mr_normalisation == "zscore":
            assert mask is not None
            values = sitk.GetArrayViewFromImage(out)[sitk.GetArrayViewFromImage(mask) > 0]
            mean, std = float(values.mean()), float(values.std())
            if not std > 0:
                raise Quarantined(Reason.UNSUPPORTED_IMAGE, "constant MR image")
            out = (sitk.Cast(out, sitk.sitkFloat32) - mean) / std
            params.update(mean=round(mean, 6), std=round(std, 6))
            label += "-zscore"
        else:
            label += "-none" if not config.mr_n4 else ""
        return IntensityResult(out, label, params)
    return IntensityResult(image, modality or "unknown", {})

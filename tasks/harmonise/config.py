"""Harmonisation settings: one pydantic model, loadable from YAML, hashed into every output key."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.errors import OncoflowError, did_you_mean

#: Default ROI-name map: normalised name → case-insensitive regular expressions (full match).
DEFAULT_ROI_MAP: dict[str, list[str]] = {
    "gtv": [
        r"gtv([ _-]?\d+)?",
        r"gtv[ _-]?(p|primary|t|tumou?r)",
        r"tumou?r([ _-]?\d+)?",
        r"lesion([ _-]?\d+)?",
    ],
}


class HarmoniseConfig(BaseModel):
    """How series become volumes, intensities and masks (no identifiers: safe as a parameter)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_spacing: tuple[float, float, float] | None = Field(
        None,
        title="Target spacing (mm)",
        description="Resample to this x, y, z spacing; empty keeps the native spacing.",
        json_schema_extra={"position": 0},
    )
    image_interpolator: Literal["bspline", "linear"] = Field(
        "bspline",
        title="Image interpolator",
        description="Interpolator for images when resampling (B-spline by default).",
        json_schema_extra={"position": 1},
    )
    mask_interpolator: Literal["nearest", "label-gaussian"] = Field(
        "nearest",
        title="Mask interpolator",
        description="Label-safe interpolator for masks when resampling.",
        json_schema_extra={"position": 2},
    )
    slice_spacing_tolerance: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        title="Slice spacing tolerance",
        description="Largest relative deviation of a slice gap from the median gap.",
        json_schema_extra={"position": 3},
    )
    orientation_tolerance: float = Field(
        1e-3,
        gt=0,
        le=0.05,
        title="Orientation tolerance",
        description="Largest difference between direction cosines of slices of one series.",
        json_schema_extra={"position": 4},
    )
    gantry_tilt: Literal["resample", "quarantine"] = Field(
        "resample",
        title="Gantry tilt",
        description="Resample sheared (gantry-tilted) stacks onto an orthogonal grid, "
        "or quarantine them.",
        json_schema_extra={"position": 5},
    )
    tilt_tolerance_deg: float = Field(
        0.05,
        ge=0,
        le=5,
        title="Tilt tolerance (degrees)",
        description="Shear angles up to this are treated as no tilt.",
        json_schema_extra={"position": 6},
    )
    ct_clip: tuple[float, float] | None = Field(
        None,
        title="CT clip (HU)",
        description="Clip CT values to [low, high] HU; empty keeps all values.",
        json_schema_extra={"position": 7},
    )
    mr_normalisation: Literal["none", "zscore"] = Field(
        "none",
        title="MR normalisation",
        description="none, or z-score within an automatic body mask.",
        json_schema_extra={"position": 8},
    )
    mr_n4: bool = Field(
        False,
        title="MR N4 bias-field correction",
        description="Apply N4 bias-field correction to MR before normalisation.",
        json_schema_extra={"position": 9},
    )
    roi_map: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_ROI_MAP.items()},
        title="ROI name map",
        description="Normalised ROI name → regular expressions (case-insensitive, full match). "
        "ROIs matching none are ignored.",
        json_schema_extra={"position": 10},
    )
    roi_duplicates: Literal["number", "merge"] = Field(
        "number",
        title="Several ROIs with one name",
        description="number: GTV-1, GTV-2 become gtv, gtv-2 (one mask per lesion); "
        "merge: one mask, their union.",
        json_schema_extra={"position": 11},
    )
    allow_partial_outside: bool = Field(
        False,
        title="Allow masks partly outside the image",
        description="Keep (clipped) masks that extend beyond the image; otherwise quarantine.",
        json_schema_extra={"position": 12},
    )

    @field_validator("target_spacing")
    @classmethod
    def _positive_spacing(
        cls, value: tuple[float, float, float] | None
    ) -> tuple[float, float, float] | None:
        if value is not None and min(value) <= 0:
            raise ValueError("target spacing must be positive")
        return value

    @field_validator("ct_clip")
    @classmethod
    def _ordered_clip(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] >= value[1]:
            raise ValueError("ct_clip must be [low, high] with low < high")
        return value

    @field_validator("roi_map")
    @classmethod
    def _valid_roi_map(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, patterns in value.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", name):
                raise ValueError(f"ROI name {name!r}: use lowercase letters, digits and dashes")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"ROI pattern {pattern!r}: {exc}") from None
        return value

    def config_hash(self) -> str:
        """Return the SHA-256 of the canonical JSON of the settings (first 16 hex digits)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def normalise_roi(self, name: str) -> str | None:
        """Return the normalised ROI name for a source name, or None when no pattern matches.

        Examples
        --------
        >>> HarmoniseConfig().normalise_roi("GTV-1")
        'gtv'
        >>> HarmoniseConfig().normalise_roi("Spinal cord") is None
        True
        """
        text = " ".join(name.strip().split())
        for target, patterns in self.roi_map.items():
            if any(re.fullmatch(p, text, flags=re.IGNORECASE) for p in patterns):
                return target
        return None


def load_config(path: str | Path | None) -> HarmoniseConfig:
    """Load settings from a YAML file (None gives the defaults), with a one-line error.

    Parameters
    ----------
    path
        YAML file whose top-level keys are :class:`HarmoniseConfig` fields.

    Returns
    -------
    HarmoniseConfig
        The validated settings.
    """
    if path is None:
        return HarmoniseConfig()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise OncoflowError(f"cannot read harmonise config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise OncoflowError(f"harmonise config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise OncoflowError(f"harmonise config {path}: expected a mapping of settings")
    try:
        return HarmoniseConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            hint = did_you_mean(str(first["loc"][-1]), HarmoniseConfig.model_fields)
            message = f"unknown key{hint}"
        raise OncoflowError(f"harmonise config {path}: {where}: {message}") from None

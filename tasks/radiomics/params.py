# ruff: noqa: N815  (field names are pyradiomics' own parameter keys, camelCase on purpose)
"""A strict model of the pyradiomics parameter file, validated before any work starts.

pyradiomics validates parameter files with a schema (``radiomics/schemas/paramSchema.yaml``);
this model mirrors that schema with pydantic, stricter: an unknown key, a wrong type or an
impossible value (a negative bin width, an unknown wavelet, LoG without sigma, ...) is a one-line
:class:`~tasks.errors.OncoflowError` naming the key, e.g.
``parameter file ct.yaml: setting.binWidth: Input should be greater than 0``.

The validated model has a canonical form (sorted keys, normalised empty values) whose SHA-256 is
the *params hash* naming the features table ``features/<params-hash>.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.errors import OncoflowError, did_you_mean

#: Folder holding the shipped presets (``deployments/radiomics/<name>.yaml``).
PRESET_DIR = Path(__file__).resolve().parents[2] / "deployments" / "radiomics"

#: Feature classes computed on the mask alone (once per ROI, not per image type).
SHAPE_CLASSES = ("shape", "shape2D")


class Preset(StrEnum):
    """Parameter presets shipped in ``deployments/radiomics/`` (one YAML file each)."""

    CT = "ct"
    MR = "mr"
    PET = "pet"

    @property
    def path(self) -> Path:
        """The preset's YAML file."""
        return PRESET_DIR / f"{self.value}.yaml"

    @property
    def modality(self) -> str:
        """The DICOM modality the preset is made for (``CT``, ``MR``, ``PT``)."""
        return {"ct": "CT", "mr": "MR", "pet": "PT"}[self.value]


class ImageType(StrEnum):
    """Image types (filters) pyradiomics 3.0.1 provides."""

    ORIGINAL = "Original"
    LOG = "LoG"
    WAVELET = "Wavelet"
    SQUARE = "Square"
    SQUARE_ROOT = "SquareRoot"
    LOGARITHM = "Logarithm"
    EXPONENTIAL = "Exponential"
    GRADIENT = "Gradient"
    LBP2D = "LBP2D"
    LBP3D = "LBP3D"


class FeatureClass(StrEnum):
    """Feature classes pyradiomics 3.0.1 provides."""

    FIRSTORDER = "firstorder"
    SHAPE = "shape"
    SHAPE2D = "shape2D"
    GLCM = "glcm"
    GLRLM = "glrlm"
    GLSZM = "glszm"
    GLDM = "gldm"
    NGTDM = "ngtdm"


Interpolator = Literal[
    "sitkNearestNeighbor",
    "sitkLinear",
    "sitkBSpline",
    "sitkGaussian",
    "sitkLabelGaussian",
    "sitkHammingWindowedSinc",
    "sitkCosineWindowedSinc",
    "sitkWelchWindowedSinc",
    "sitkLanczosWindowedSinc",
    "sitkBlackmanWindowedSinc",
]

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


def _discrete_wavelets() -> set[str]:
    import pywt

    return set(pywt.wavelist(kind="discrete"))


class Settings(BaseModel):
    """The ``setting`` section (also the per-image-type overrides under ``imageType``).

    Keys and ranges follow pyradiomics' ``paramSchema.yaml``; every key is optional.
    """

    model_config = _STRICT

    minimumROIDimensions: int | None = Field(None, ge=1, le=3)
    minimumROISize: int | None = Field(None, gt=0)
    geometryTolerance: float | None = Field(None, gt=0)
    correctMask: bool | None = None
    additionalInfo: bool | None = None
    label: int | None = Field(None, gt=0)
    label_channel: int | None = Field(None, ge=0)
    binWidth: float | None = Field(None, gt=0)
    binCount: int | None = Field(None, gt=0)
    normalize: bool | None = None
    normalizeScale: float | None = Field(None, gt=0)
    removeOutliers: float | None = Field(None, gt=0)
    resampledPixelSpacing: list[float] | None = Field(None, min_length=2, max_length=3)
    interpolator: Interpolator | int | None = None
    padDistance: int | None = Field(None, ge=0)
    distances: list[int] | None = Field(None, min_length=1)
    force2D: bool | None = None
    force2Ddimension: int | None = Field(None, ge=0, le=2)
    resegmentRange: list[float] | None = Field(None, min_length=1, max_length=2)
    resegmentMode: Literal["absolute", "relative", "sigma"] | None = None
    resegmentShape: bool | None = None
    preCrop: bool | None = None
    # int | float keeps ``1`` apart from ``1.0``: pyradiomics names LoG features after the
    # spelling (``log-sigma-1-mm-3D`` versus ``log-sigma-1-0-mm-3D``).
    sigma: list[int | float] | None = Field(None, min_length=1)
    start_level: int | None = Field(None, ge=0)
    level: int | None = Field(None, gt=0)
    wavelet: str | None = None
    gradientUseSpacing: bool | None = None
    lbp2DRadius: float | None = Field(None, gt=0)
    lbp2DSamples: int | None = Field(None, ge=1)
    lbp2DMethod: Literal["default", "ror", "uniform", "var"] | None = None
    lbp3DLevels: int | None = Field(None, ge=1)
    lbp3DIcosphereRadius: float | None = Field(None, gt=0)
    lbp3DIcosphereSubdivision: int | None = Field(None, ge=0)
    voxelArrayShift: int | None = None
    symmetricalGLCM: bool | None = None
    weightingNorm: Literal["euclidean", "manhattan", "infinity", "no_weighting"] | None = None
    gldm_a: int | None = Field(None, ge=0)

    @field_validator("resampledPixelSpacing")
    @classmethod
    def _spacing_non_negative(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(v < 0 for v in value):
            raise ValueError("spacings must be >= 0 (0 keeps the original spacing)")
        return value

    @field_validator("distances")
    @classmethod
    def _distances_positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError("distances must be > 0")
        return value

    @field_validator("sigma")
    @classmethod
    def _sigma_positive(cls, value: list[int | float] | None) -> list[int | float] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError("sigma values must be > 0")
        return value

    @field_validator("interpolator")
    @classmethod
    def _interpolator_range(cls, value: str | int | None) -> str | int | None:
        if isinstance(value, int) and not 1 <= value <= 10:
            raise ValueError("interpolator code must be in 1-10")
        return value

    @field_validator("wavelet")
    @classmethod
    def _wavelet_known(cls, value: str | None) -> str | None:
        if value is not None and value not in _discrete_wavelets():
            raise ValueError(f"unknown wavelet {value!r} (see pywt.wavelist(kind='discrete'))")
        return value

    @model_validator(mode="after")
    def _ranges_consistent(self) -> Settings:
        rng = self.resegmentRange
        if rng is not None and len(rng) == 2 and rng[0] >= rng[1]:
            raise ValueError("resegmentRange: lower bound must be below the upper bound")
        return self


#: Settings that act only together with another one: (setting, the setting it needs).
_NEEDS: tuple[tuple[str, str], ...] = (
    ("resegmentMode", "resegmentRange"),
    ("resegmentShape", "resegmentRange"),
    ("normalizeScale", "normalize"),
    ("removeOutliers", "normalize"),
    ("force2Ddimension", "force2D"),
)


def settings_conflict(where: str, settings: Settings | None, base: Settings | None) -> str:
    """Return a one-line description of contradictory settings, or ``""``.

    Parameters
    ----------
    where
        Section name for the message (``setting`` or ``imageType.<name>``).
    settings
        The section's own settings (an image type's overrides, or the ``setting`` section).
    base
        The ``setting`` section the overrides apply on top of (None for ``setting`` itself).

    Notes
    -----
    pyradiomics silently ignores ``binWidth`` when ``binCount`` is given in the same section,
    and ignores ``resegmentMode``/``resegmentShape`` without ``resegmentRange``,
    ``normalizeScale``/``removeOutliers`` without ``normalize: true`` and ``force2Ddimension``
    without ``force2D: true``; a file relying on them would not compute what it says.
    """
    if settings is None:
        return ""
    own = settings.model_dump(exclude_none=True)
    if "binWidth" in own and "binCount" in own:
        return (
            f"{where}: binWidth and binCount both given (pyradiomics would ignore binWidth): "
            "keep one"
        )
    effective = {**(base.model_dump(exclude_none=True) if base else {}), **own}
    for key, needed in _NEEDS:
        if key in own and not effective.get(needed):
            value = "true" if needed in ("normalize", "force2D") else "a value"
            return f"{where}.{key}: has no effect without {needed} ({value}): remove it or set both"
    return ""


class VoxelSettings(BaseModel):
    """The ``voxelSetting`` section (voxel-based extraction; validated and hashed)."""

    model_config = _STRICT

    kernelRadius: int | None = Field(None, gt=0)
    maskedKernel: bool | None = None
    initValue: float | None = None
    voxelBatch: int | None = Field(None, gt=0)


class RadiomicsParams(BaseModel):
    """A validated pyradiomics parameter file.

    Parameters
    ----------
    setting
        Settings applied to every image type.
    imageType
        Enabled image types, each with its own setting overrides (empty: ``Original`` only,
        as in pyradiomics).
    featureClass
        Enabled feature classes, each with a list of feature names (empty list: all features;
        empty mapping: every class, as in pyradiomics).
    voxelSetting
        Voxel-based extraction settings.
    """

    model_config = _STRICT

    setting: Settings = Field(default_factory=Settings)
    imageType: dict[ImageType, Settings | None] = Field(default_factory=dict)
    featureClass: dict[FeatureClass, list[str] | None] = Field(default_factory=dict)
    voxelSetting: VoxelSettings = Field(default_factory=VoxelSettings)

    @model_validator(mode="after")
    def _features_and_filters(self) -> RadiomicsParams:
        listed = {name: features for name, features in self.featureClass.items() if features}
        if listed:  # pyradiomics knows the feature names (imported only when names are listed)
            from radiomics import getFeatureClasses

            classes = getFeatureClasses()
        for name, features in listed.items():
            known = set(classes[str(name)].getFeatureNames())
            unknown = sorted(set(features or []) - known)
            if unknown:
                raise ValueError(
                    f"featureClass.{name}: unknown features {unknown}"
                    + did_you_mean(unknown[0], known)
                )
        for name, overrides in self.imageType.items():
            if name == ImageType.LOG:
                sigma = (overrides.sigma if overrides else None) or self.setting.sigma
                if not sigma:
                    raise ValueError("imageType.LoG: needs sigma (in setting or under LoG)")
        problem = settings_conflict("setting", self.setting, None)
        for name, overrides in self.imageType.items():
            problem = problem or settings_conflict(f"imageType.{name}", overrides, self.setting)
        if problem:
            raise ValueError(problem)
        return self

    # -- canonical form -------------------------------------------------------------------

    def enabled_image_types(self) -> dict[str, dict[str, Any]]:
        """Image types with their overrides as plain dicts, sorted by name."""
        types = self.imageType or {ImageType.ORIGINAL: None}
        return {str(k): _plain(v) for k, v in sorted(types.items(), key=lambda kv: str(kv[0]))}

    def enabled_feature_classes(self) -> dict[str, list[str]]:
        """Feature classes with sorted, de-duplicated feature lists (``[]``: all features).

        An empty ``featureClass`` means every class, as in pyradiomics.
        """
        classes = self.featureClass or {c: [] for c in FeatureClass}
        return {
            str(k): sorted(set(v or []))
            for k, v in sorted(classes.items(), key=lambda kv: str(kv[0]))
        }

    def canonical(self) -> dict[str, Any]:
        """Return the parameters as a plain dict: sorted keys, explicit defaults for empty sections.

        Two files that differ only in key order, comments, ``null`` versus ``{}`` or int versus
        float spellings give the same canonical dict, hence the same hash and the same table.
        """
        return {
            "featureClass": self.enabled_feature_classes(),
            "imageType": self.enabled_image_types(),
            "setting": _plain(self.setting),
            "voxelSetting": _plain(self.voxelSetting),
        }

    def params_hash(self) -> str:
        """SHA-256 of the canonical JSON of the validated parameters."""
        return hash_json(self.canonical())

    def canonical_json(self) -> str:
        """Return the canonical form as compact JSON with sorted keys."""
        return canonical_json(self.canonical())


def _plain(model: BaseModel | None) -> dict[str, Any]:
    """Return the keys a user set (non-null), as JSON-compatible values."""
    if model is None:
        return {}
    return model.model_dump(mode="json", exclude_none=True)


def canonical_json(data: Any) -> str:
    """Compact JSON with sorted keys (the form hashed everywhere in this package)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def hash_json(data: Any) -> str:
    """SHA-256 hex digest of :func:`canonical_json` of ``data``."""
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-"))]
    # pydantic reports union members ("list[float]", "int", ...) in the location: drop them.
    parts = [p for p in parts if "[" not in p and p not in {"int", "str", "float", "bool"}]
    return ".".join(parts)


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """Return the keys accepted where an unknown key was found (for the did-you-mean hint)."""
    if len(loc) <= 1:
        return list(RadiomicsParams.model_fields)
    if loc[0] == "voxelSetting":
        return list(VoxelSettings.model_fields)
    return list(Settings.model_fields)


def _message(exc: ValidationError) -> str:
    seen: list[str] = []
    for err in exc.errors(include_url=False):
        loc = _location(tuple(err["loc"]))
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(str(err["loc"][-1]), _known_keys(err["loc"]))
        elif err["type"] == "enum" and loc in {"imageType", "featureClass"}:
            msg = f"unknown name {err.get('input')!r}"
        text = f"{loc}: {msg}" if loc else msg
        if text not in seen:
            seen.append(text)
    return "; ".join(seen[:3]) + (f" (+{len(seen) - 3} more)" if len(seen) > 3 else "")


def validate_params(
    data: Any, source: str = "parameters", pyradiomics_check: bool = True
) -> RadiomicsParams:
    """Validate a parsed parameter mapping.

    Parameters
    ----------
    data
        The parsed YAML/JSON content.
    source
        Name used in error messages (a file name or preset name, never a full private path).
    pyradiomics_check
        Also run pyradiomics' own schema (:func:`check_with_pyradiomics`); the caller that
        turns it off runs it where needed.

    Returns
    -------
    RadiomicsParams
        The validated parameters.

    Raises
    ------
    OncoflowError
        One line naming the offending key(s).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise OncoflowError(f"parameter file {source}: expected a mapping at the top level")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise OncoflowError(f"parameter file {source}: non-text key {bad_keys[0]!r}")
    for section in ("imageType", "featureClass"):
        value = data.get(section)
        if isinstance(value, dict):
            allowed = {str(m) for m in (ImageType if section == "imageType" else FeatureClass)}
            unknown = [str(k) for k in value if str(k) not in allowed]
            if unknown:
                hint = (
                    did_you_mean(unknown[0], allowed) or f" (known: {', '.join(sorted(allowed))})"
                )
                raise OncoflowError(
                    f"parameter file {source}: {section}.{unknown[0]}: unknown name{hint}"
                )
    try:
        # Strict mode keeps types honest; enum keys arrive as text, so validate from JSON-like
        # python with the enum keys converted first.
        prepared = dict(data)
        for section, enum in (("imageType", ImageType), ("featureClass", FeatureClass)):
            if isinstance(prepared.get(section), dict):
                prepared[section] = {enum(str(k)): v for k, v in prepared[section].items()}
        params = RadiomicsParams.model_validate(prepared)
    except ValidationError as exc:
        raise OncoflowError(f"parameter file {source}: {_message(exc)}") from None
    if pyradiomics_check:
        check_with_pyradiomics(params, source)
    return params


def check_with_pyradiomics(params: RadiomicsParams, source: str) -> None:
    """Run pyradiomics' own schema on the canonical form as a second line of defence.

    Raises
    ------
    OncoflowError
        One line with pyradiomics' first complaint.
    """
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    for name in ("pykwalify", "pykwalify.core", "radiomics"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        RadiomicsFeatureExtractor(params.canonical())
    except Exception as exc:  # pykwalify SchemaError, ValueError, TypeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OncoflowError(f"parameter file {source}: rejected by pyradiomics: {first}") from None


def load_params(spec: str, pyradiomics_check: bool = True) -> tuple[RadiomicsParams, str]:
    """Load and validate a parameter file or a preset.

    Parameters
    ----------
    spec
        A preset name (``ct``, ``mr``, ``pet``), or a path / fsspec URL of a YAML or JSON
        pyradiomics parameter file. An existing file wins over a preset of the same name.
    pyradiomics_check
        Also run pyradiomics' own schema (see :func:`validate_params`).

    Returns
    -------
    tuple
        The validated parameters and a short source label (``preset:ct`` or the file name).
    """
    from tasks.store import open_url

    spec = (spec or "").strip()
    if not spec:
        raise OncoflowError("no radiomics parameters: give a preset (ct, mr, pet) or a file")
    is_url = "://" in spec
    if not is_url and not Path(spec).exists() and spec.lower() in {p.value for p in Preset}:
        preset = Preset(spec.lower())
        return load_params_file(str(preset.path), f"preset:{preset.value}", pyradiomics_check)
    fs, path = open_url(spec)
    if not fs.exists(path):
        presets = ", ".join(p.value for p in Preset)
        raise OncoflowError(f"parameter file {Path(path).name!r} not found (presets: {presets})")
    return load_params_file(spec, Path(path).name, pyradiomics_check)


def load_params_file(
    url: str, label: str, pyradiomics_check: bool = True
) -> tuple[RadiomicsParams, str]:
    """Read, parse and validate one parameter file (YAML or JSON) at a path or fsspec URL."""
    from tasks.store import open_url

    fs, path = open_url(url)
    try:
        text = fs.cat_file(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OncoflowError(f"parameter file {label}: cannot read: {type(exc).__name__}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise OncoflowError(f"parameter file {label}: not valid YAML/JSON{where}") from None
    return validate_params(data, label, pyradiomics_check), label

"""Cohort specifications: the YAML file that says which series a site publishes, and how.

Example (``deployments/cohorts/lung-ct.yaml``)::

    name: lung-ct
    title: Lung CT with tumour segmentation
    description: Chest CT series with a GTV mask and radiomics features.
    licence: CC-BY-4.0
    keywords: [lung, CT, radiomics]
    selection:
      modality: [CT]
      body_part: [CHEST]
      date_from: "2010-01-01"
      date_to: "2030-12-31"
      roi: [gtv]
      site: [site-a]
    features: ct               # a params hash, a preset name or a parameter file (path
                               # relative to this file); omit for no features
    include:
      images: true
      masks: true
      dicom: false              # de-identified DICOM and the DICOM SEG that reference it
    combat:                     # optional: publish ComBat summary statistics (no rows)
      roi: gtv
      categorical: [sex]
      continuous: [age]
    catalogue:                  # optional: HealthDCAT-AP record settings (tasks.cohort.catalogue)
      publisher: {name: Site A Hospital, contact: "mailto:data@site-a.example"}
      contact: "mailto:data@site-a.example"
      hdab: {name: Health Data Access Body, contact: "https://hdab.example"}
    risk:                       # optional: re-identification risk gate (tasks.cohort.risk)
      min_k: 5                  # refuse to publish below k = 5 after generalisation
      min_l: 1

Dates are compared with the *shifted* acquisition dates of the de-identified catalogue.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.cohort.catalogue import CatalogueSpec, RiskSpec
from tasks.errors import OncoflowError, did_you_mean

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
PARAMS_HASH = re.compile(r"^[0-9a-f]{64}$")
PRESET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
PARAMS_SUFFIXES = (".yaml", ".yml", ".json")

#: Short licence identifiers mapped to their SPDX URL (others must be given as a URL).
LICENCES = {
    "CC-BY-4.0": "https://spdx.org/licenses/CC-BY-4.0.html",
    "CC-BY-SA-4.0": "https://spdx.org/licenses/CC-BY-SA-4.0.html",
    "CC-BY-NC-4.0": "https://spdx.org/licenses/CC-BY-NC-4.0.html",
    "CC-BY-NC-SA-4.0": "https://spdx.org/licenses/CC-BY-NC-SA-4.0.html",
    "CC-BY-NC-ND-4.0": "https://spdx.org/licenses/CC-BY-NC-ND-4.0.html",
    "CC0-1.0": "https://spdx.org/licenses/CC0-1.0.html",
    "ODbL-1.0": "https://spdx.org/licenses/ODbL-1.0.html",
}


def _as_list(value: Any) -> Any:
    """Accept a single string where a list is expected."""
    return [value] if isinstance(value, str) else value


class Selection(BaseModel):
    """Which de-identified, harmonised series enter the cohort (every filter is optional)."""

    model_config = ConfigDict(extra="forbid")

    modality: list[str] = Field(default_factory=list, description="DICOM modalities, e.g. CT.")
    body_part: list[str] = Field(
        default_factory=list, description="Body parts (BodyPartExamined), e.g. CHEST."
    )
    date_from: dt.date | None = Field(None, description="First shifted acquisition date.")
    date_to: dt.date | None = Field(None, description="Last shifted acquisition date.")
    roi: list[str] = Field(
        default_factory=list,
        description="Keep series with at least one of these ROIs; only these masks are shipped.",
    )
    site: list[str] = Field(default_factory=list, description="Sites allowed to publish this.")

    @field_validator("modality", "body_part", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        value = _as_list(value) or []
        return [str(x).upper() for x in value] if isinstance(value, list) else value

    @field_validator("roi", "site", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        value = _as_list(value) or []
        return [str(x).lower() for x in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _dates_in_order(self) -> Selection:
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError("date_from is after date_to")
        return self


class Include(BaseModel):
    """What files the published version carries besides the tables."""

    model_config = ConfigDict(extra="forbid")

    images: bool = Field(True, description="Harmonised images (NIfTI).")
    masks: bool = Field(True, description="ROI masks (NIfTI).")
    dicom: bool = Field(False, description="De-identified DICOM and referencing DICOM SEG.")
    seg_from_masks: bool = Field(
        True, description="With dicom: export the masks of series without a SEG as DICOM SEG."
    )
    annotation_method: str = Field(
        "manual", description="How the masks were made: manual, semiautomatic, automatic."
    )
    annotation_algorithm: str | None = Field(
        None, description="Name of the segmentation algorithm (semi-automatic, automatic)."
    )


class CombatSpec(BaseModel):
    """Publish the summary statistics federated ComBat needs (no rows) for one ROI."""

    model_config = ConfigDict(extra="forbid")

    roi: str = Field(description="ROI whose feature rows are summarised, e.g. gtv.")
    categorical: list[str] = Field(
        default_factory=list, description="Categorical covariates to preserve, e.g. sex."
    )
    continuous: list[str] = Field(
        default_factory=list, description="Continuous covariates to preserve, e.g. age."
    )

    @field_validator("roi")
    @classmethod
    def _roi(cls, value: str) -> str:
        return value.lower()


class CohortSpec(BaseModel):
    """A validated cohort specification (see the module docstring for the YAML form)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Slug used in object names: lowercase letters, digits, dashes.")
    title: str = Field(min_length=1, max_length=200, description="Human title (dct:title).")
    description: str = Field(min_length=1, description="What the cohort is (dct:description).")
    licence: str = Field(description="SPDX identifier (e.g. CC-BY-4.0) or licence URL.")
    keywords: list[str] = Field(default_factory=list, description="dcat:keyword values.")
    selection: Selection = Field(default_factory=Selection)
    features: str | None = Field(
        None,
        description="Feature table: a params hash, a preset name, or a pyradiomics parameter "
        "file (a path relative to the spec file); None: no features.",
    )
    include: Include = Field(default_factory=Include)
    combat: CombatSpec | None = Field(
        None, description="Also publish ComBat summary statistics (needs a feature table)."
    )
    catalogue: CatalogueSpec = Field(
        default_factory=CatalogueSpec,
        description="HealthDCAT-AP settings: publisher, contact, access body, access rights.",
    )
    risk: RiskSpec = Field(
        default_factory=RiskSpec,
        description="Release checks: minimum k-anonymity and l-diversity, generalisation.",
    )

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not SLUG.match(value):
            raise ValueError("must be 1-63 lowercase letters, digits and dashes")
        return value

    @field_validator("licence")
    @classmethod
    def _licence(cls, value: str) -> str:
        if value in LICENCES or value.startswith(("https://", "http://")):
            return value
        known = ", ".join(sorted(LICENCES))
        raise ValueError(f"unknown licence {value!r}: use one of {known} or a URL")

    @field_validator("keywords", mode="before")
    @classmethod
    def _keywords(cls, value: Any) -> Any:
        return _as_list(value) or []

    @field_validator("features")
    @classmethod
    def _features(cls, value: str | None) -> str | None:
        if value is not None and not (
            PARAMS_HASH.match(value) or PRESET.match(value) or is_params_file(value)
        ):
            raise ValueError(
                "must be a params hash (hex), a preset name or a parameter file (.yaml, .json)"
            )
        return value

    @model_validator(mode="after")
    def _combat_needs_features(self) -> CohortSpec:
        if self.combat is not None and self.features is None:
            raise ValueError("combat needs a feature table (features)")
        return self

    @property
    def licence_url(self) -> str:
        """The licence as a URL (SPDX page for short identifiers)."""
        return LICENCES.get(self.licence, self.licence)


def is_params_file(value: str) -> bool:
    """Whether a ``features`` value names a parameter file (by its suffix)."""
    return Path(value).suffix.lower() in PARAMS_SUFFIXES


def _resolve_features(spec: CohortSpec, folder: Path, origin: str) -> CohortSpec:
    """Make a ``features`` parameter file absolute (relative to the spec's folder) and check it.

    Raises
    ------
    OncoflowError
        One line when the file is missing or is not a valid parameter file.
    """
    value = spec.features
    if value is None or PARAMS_HASH.match(value) or not is_params_file(value):
        return spec
    from tasks.radiomics.params import load_params_file

    path = Path(value) if Path(value).is_absolute() else folder / value
    if not path.is_file():
        raise OncoflowError(f"{origin}: features: parameter file {value!r} not found")
    load_params_file(str(path), Path(value).name)  # one-line error when invalid
    return spec.model_copy(update={"features": str(path.resolve())})


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Return the field names of the spec section at ``loc`` (for the did-you-mean hint)."""
    model: type[BaseModel] = CohortSpec
    for part in loc:
        field_info = model.model_fields.get(str(part))
        inner = getattr(field_info, "annotation", None) if field_info else None
        candidates = [a for a in getattr(inner, "__args__", (inner,)) if isinstance(a, type)]
        nested = [a for a in candidates if issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "spec"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field" + did_you_mean(str(err["loc"][-1]), _fields_at(err["loc"][:-1]))
    elif err["type"] == "missing":
        msg = "required field is missing"
    return f"{where}: {msg}"


def parse_spec(data: Any, origin: str = "cohort spec") -> CohortSpec:
    """Validate a cohort spec given as a mapping.

    Parameters
    ----------
    data
        The parsed YAML document.
    origin
        Where it came from, for the error message.

    Returns
    -------
    CohortSpec
        The validated spec.

    Raises
    ------
    OncoflowError
        One line naming the first invalid field.
    """
    if not isinstance(data, dict):
        raise OncoflowError(f"{origin}: expected a mapping at the top level")
    try:
        return CohortSpec.model_validate(data)
    except ValidationError as exc:
        raise OncoflowError(f"{origin}: {_first_error(exc)}") from None


def load_spec(path: str | Path) -> CohortSpec:
    """Read and validate a cohort spec YAML file (one-line error when unreadable or invalid)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OncoflowError(f"cannot read cohort spec {path.name}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise OncoflowError(f"{path.name}{where}: not valid YAML") from None
    return _resolve_features(parse_spec(data, origin=path.name), path.parent, path.name)

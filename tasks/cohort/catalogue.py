"""Catalogue and release settings of a cohort (the ``catalogue`` and ``risk`` spec blocks).

Who publishes it, whom to contact, who grants access; and the release checks' minimum k and l
(``RiskSpec``, see :mod:`tasks.cohort.risk`).

The ``catalogue`` block of a cohort spec (see :mod:`tasks.cohort.spec`)::

    catalogue:
      publisher: {name: Site A University Hospital, contact: "mailto:data@site-a.example"}
      contact: "mailto:data@site-a.example"
      hdab: {name: National Health Data Access Body, contact: "https://hdab.example"}
      access_rights: NON_PUBLIC        # PUBLIC, NON_PUBLIC or RESTRICTED
      health_category: [EHRS]          # HealthData@EU health categories
      k: 10                            # counts below k are left out of the record

Every field is optional; a HealthDCAT-AP record made without the contact details fails
validation, and ``oncoflow readiness`` names what is missing.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

ACCESS_RIGHTS = ("PUBLIC", "NON_PUBLIC", "RESTRICTED")
CONTACT = re.compile(r"^(mailto:[^@\s]+@[^@\s]+|https?://\S+)$")


class Agent(BaseModel):
    """An organisation named in the record (publisher, data access body)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="Organisation name.")
    contact: str = Field(description="mailto: address or https:// contact page.")

    @field_validator("contact")
    @classmethod
    def _contact(cls, value: str) -> str:
        if not CONTACT.match(value):
            raise ValueError("must be a mailto: address or an http(s):// page")
        return value


class CatalogueSpec(BaseModel):
    """Catalogue settings of a cohort (the ``catalogue`` block of the cohort spec)."""

    model_config = ConfigDict(extra="forbid")

    publisher: Agent | None = Field(
        None, description="The site as publisher (name, contact); default name: the site code."
    )
    contact: str | None = Field(None, description="Dataset contact point: mailto: or https://.")
    hdab: Agent | None = Field(None, description="Health data access body for this dataset.")
    access_rights: str = Field("NON_PUBLIC", description="PUBLIC, NON_PUBLIC or RESTRICTED.")
    health_category: list[str] = Field(
        default_factory=lambda: ["EHRS"], description="HealthData@EU health categories."
    )
    dataset_type: str = Field("PERSONAL_DATA", description="EU dataset-type code.")
    k: int = Field(10, ge=2, le=1000, description="Counts below k are left out of the record.")

    @field_validator("contact")
    @classmethod
    def _contact(cls, value: str | None) -> str | None:
        if value is not None and not CONTACT.match(value):
            raise ValueError("must be a mailto: address or an http(s):// page")
        return value

    @field_validator("access_rights")
    @classmethod
    def _rights(cls, value: str) -> str:
        if value not in ACCESS_RIGHTS:
            raise ValueError(f"must be one of {', '.join(ACCESS_RIGHTS)}")
        return value


class RiskSpec(BaseModel):
    """Release checks of a cohort (the ``risk`` block of the cohort spec)."""

    model_config = ConfigDict(extra="forbid")

    min_k: int = Field(
        1, ge=1, le=1000, description="Smallest k-anonymity allowed (1: report only)."
    )
    min_l: int = Field(1, ge=1, le=100, description="Smallest l-diversity allowed.")
    generalise: bool = Field(True, description="Generalise quasi-identifiers until k is met.")

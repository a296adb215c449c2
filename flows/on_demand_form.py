"""The on-demand deployment's form: its labelled fields and the site's choices in it.

After every nightly run (and with ``python -m flows.on_demand SITE_FILE``) the form's series and
ROI fields offer the site's harmonised series keys (pseudonymous) and ROI names as choices.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

FLOW_NAME = "extract-on-demand"
#: At most this many series keys are offered as choices.
MAX_CHOICES = 500

#: The form's fields: every one has a label (``title``) and a description.
SITE_FILE = Field(
    "deployments/sites/site-a.yaml",
    title="Site file",
    description="The site's file in the repository (store, site code); set by the deployment.",
)
PRESET = Field(
    "ct", title="Radiomics preset", description="Parameter preset (deployments/radiomics/)."
)
SERIES = Field(
    default=[],
    title="Series (pseudonymous keys)",
    description="Only these series; empty: every harmonised series of the preset's modality. "
    "The choices are the site's harmonised series after the last nightly run.",
)
ROIS = Field(default=[], title="ROIs", description="Only these ROIs; empty: every ROI.")
MODALITIES = Field(
    default=[],
    title="Modalities",
    description="Only these modalities; empty: the preset's own.",
)
FAILURE_RATIO = Field(
    0.1,
    ge=0.0,
    le=1.0,
    title="Failure threshold",
    description="Fail the run above this share of ROIs failing with an error.",
)


def form_choices(store_url: str, site: str) -> dict[str, list[str]]:
    """Return the site's harmonised series keys and ROI names (pseudonymous, no identifiers)."""
    from tasks.radiomics.extract import plan_units
    from tasks.store import SiteStore

    units = plan_units(SiteStore(store_url, site))
    series = list(dict.fromkeys(u.series for u in units))[:MAX_CHOICES]
    return {"series": sorted(series), "rois": sorted({u.roi for u in units})}


def offer_form_choices(site: str, store_url: str, deployment: str | None = None) -> bool:
    """Put the site's series and ROIs as choices into its on-demand deployment's form.

    Parameters
    ----------
    site, store_url
        The site and its store (read: ``harmonised/series.parquet``).
    deployment
        ``<flow>/<deployment>``; default ``extract-on-demand/<site>-on-demand``.

    Returns
    -------
    bool
        True when the deployment exists and its form was updated.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    name = deployment or f"{FLOW_NAME}/{site}-on-demand"
    choices = form_choices(store_url, site)
    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return False
        schema = with_choices(found.parameter_openapi_schema or {}, choices)
        response = client._client.patch(  # only the schema is changed
            f"/deployments/{found.id}", json={"parameter_openapi_schema": schema}
        )
        response.raise_for_status()
    return True


#: Labels of the form's fields (Prefect titles a field by its parameter name).
TITLES = {
    "site_config": SITE_FILE.title,
    "preset": PRESET.title,
    "series": SERIES.title,
    "rois": ROIS.title,
    "modalities": MODALITIES.title,
    "max_failure_ratio": FAILURE_RATIO.title,
}


def with_choices(schema: dict[str, Any], choices: dict[str, list[str]]) -> dict[str, Any]:
    """Return ``schema`` with the form's labels, and list fields restricted to ``choices``."""
    schema = {**schema, "properties": dict(schema.get("properties", {}))}
    for name, prop in list(schema["properties"].items()):
        prop = {**prop, "title": TITLES.get(name, prop.get("title", name))}
        values = choices.get(name)
        if values is not None:
            prop["items"] = {"type": "string", **({"enum": values} if values else {})}
        schema["properties"][name] = prop
    return schema

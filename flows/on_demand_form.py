"""The on-demand deployment's form: its labelled fields and the site's choices in it.

After every nightly run (and with ``python -m flows.on_demand SITE_FILE``) the form's series and
ROI fields offer the site's harmonised series keys (pseudonymous) and ROI names as choices.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

FLOW_NAME = "extract-on-demand"
ROBUSTNESS_FLOW_NAME = "robustness-on-demand"
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

#: The robustness form's ICC threshold (tasks.radiomics.robustness.DEFAULT_ICC_THRESHOLD).
ICC_THRESHOLD = Field(
    0.75,
    ge=0.0,
    le=1.0,
    title="ICC threshold",
    description="A feature is stable when its ICC(3,1) across perturbed replicas is at least "
    "this.",
)


def form_choices(store_url: str, site: str) -> dict[str, list[str]]:
    """Return the site's harmonised series keys and ROI names (pseudonymous, no identifiers)."""
    from tasks.radiomics.extract import plan_units
    from tasks.store import SiteStore

    units = plan_units(SiteStore(store_url, site))
    series = list(dict.fromkeys(u.series for u in units))[:MAX_CHOICES]
    return {"series": sorted(series), "rois": sorted({u.roi for u in units})}


def offer_form_choices(site: str, store_url: str, deployment: str | None = None) -> bool:
    """Put the site's series and ROIs as choices into its on-demand deployments' forms.

    Parameters
    ----------
    site, store_url
        The site and its store (read: ``harmonised/series.parquet``).
    deployment
        ``<flow>/<deployment>``; default both forms of the site:
        ``extract-on-demand/<site>-on-demand`` and ``robustness-on-demand/<site>-robustness``.

    Returns
    -------
    bool
        True when the extraction form (or ``deployment``) exists and was updated.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    names = [deployment] if deployment else [f"{FLOW_NAME}/{site}-on-demand"]
    if not deployment:
        names.append(f"{ROBUSTNESS_FLOW_NAME}/{site}-robustness")
    choices = form_choices(store_url, site)
    updated = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                found = client.read_deployment_by_name(name)
            except ObjectNotFound:
                updated.append(False)
                continue
            schema = with_choices(found.parameter_openapi_schema or {}, choices)
            response = client._client.patch(  # only the schema is changed
                f"/deployments/{found.id}", json={"parameter_openapi_schema": schema}
            )
            response.raise_for_status()
            updated.append(True)
    return updated[0]


#: Labels of the form's fields (Prefect titles a field by its parameter name).
TITLES = {
    "site_config": SITE_FILE.title,
    "preset": PRESET.title,
    "series": SERIES.title,
    "rois": ROIS.title,
    "modalities": MODALITIES.title,
    "max_failure_ratio": FAILURE_RATIO.title,
    "icc_threshold": ICC_THRESHOLD.title,
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

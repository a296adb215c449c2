"""Researchers' on-demand radiomics: the ``<site>-on-demand`` deployment's form.

The deployment names only the site's file (``deployments/sites/<site>.yaml``, the one place for
a site's values: store, credentials from the worker's environment); the form asks for the
preset, the series, ROIs and modalities. The run keeps the name the researcher gives it in the
UI (this flow sets none). After every nightly run the form's series and ROI fields offer the
site's harmonised series keys (pseudonymous) and ROI names as choices
(:func:`offer_form_choices`). A run whose choices select nothing ends in the state
``Nothing to do`` with the reason, not a plain ``Completed``.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.states import Completed, State
from pydantic import Field

from flows.runtime import default_task_runner

FLOW_NAME = "extract-on-demand"
ModalityName = Literal["CT", "MR", "PT"]
#: At most this many series keys are offered as choices (newest harmonised first).
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
    default_factory=list,
    title="Series (pseudonymous keys)",
    description="Only these series; empty: every harmonised series of the preset's modality. "
    "The choices are the site's harmonised series after the last nightly run.",
)
ROIS = Field(default_factory=list, title="ROIs", description="Only these ROIs; empty: every ROI.")
MODALITIES = Field(
    default_factory=list,
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


@flow(name=FLOW_NAME, log_prints=False, task_runner=default_task_runner())
def on_demand_extract(
    site_config: str = SITE_FILE,
    preset: Literal["ct", "mr", "pet"] = PRESET,
    series: list[str] = SERIES,
    rois: list[str] = ROIS,
    modalities: list[ModalityName] = MODALITIES,
    max_failure_ratio: float = FAILURE_RATIO,
) -> dict[str, Any] | State:
    """Extract features for a researcher's selection at one site, from the site's file.

    Returns
    -------
    dict or State
        The extract stage summary, or a ``Nothing to do`` state whose message says why.
    """
    from flows.extract import ExtractParams, extract_flow
    from flows.pipeline import check_store, load_site_config, tag_current_run

    config = load_site_config(site_config)
    tag_current_run(f"site:{config.site}")
    check_store(config)
    params = ExtractParams(
        site=config.site,
        store=config.store,
        preset=preset,
        series=list(series),
        rois=list(rois),
        modalities=list(modalities) or None,
        max_failure_ratio=max_failure_ratio,
    )
    summary = extract_flow.fn(params)
    note = summary.get("note")
    if note:
        get_run_logger().info("%s", note)
        return Completed(name="Nothing to do", message=str(note), data=summary)
    return summary


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


def main(argv: list[str] | None = None) -> int:
    """Offer the choices now: ``python -m flows.on_demand deployments/sites/<site>.yaml``."""
    import sys

    from flows.pipeline import load_site_config
    from tasks.errors import OncoflowError

    args = sys.argv[1:] if argv is None else argv
    try:
        config = load_site_config(args[0] if args else "deployments/sites/site-a.yaml")
        done = offer_form_choices(config.site, config.store)
    except OncoflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not done:
        print(f"error: no deployment {FLOW_NAME}/{config.site}-on-demand", file=sys.stderr)
        return 2
    choices = form_choices(config.store, config.site)
    print(f"{config.site}-on-demand: {len(choices['series'])} series, {len(choices['rois'])} ROIs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

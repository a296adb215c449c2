"""Researchers' on-demand radiomics: the ``<site>-on-demand`` deployment's form.

(And the ``<site>-robustness`` deployment's, :func:`on_demand_robustness`, the same way.)

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

from flows.on_demand_form import (
    FAILURE_RATIO,
    FLOW_NAME,
    ICC_THRESHOLD,
    MODALITIES,
    PRESET,
    ROBUSTNESS_FLOW_NAME,
    ROIS,
    SERIES,
    SITE_FILE,
    form_choices,
    offer_form_choices,
)
from flows.runtime import default_task_runner

ModalityName = Literal["CT", "MR", "PT"]


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
    from flows.pipeline import open_site_run

    config = open_site_run(site_config)
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


@flow(name=ROBUSTNESS_FLOW_NAME, log_prints=False, task_runner=default_task_runner())
def on_demand_robustness(
    site_config: str = SITE_FILE,
    preset: Literal["ct", "mr", "pet"] = PRESET,
    series: list[str] = SERIES,
    rois: list[str] = ROIS,
    modalities: list[ModalityName] = MODALITIES,
    icc_threshold: float = ICC_THRESHOLD,
) -> dict[str, Any]:
    """Assess feature robustness for a selection at one site, from the site's file.

    The ``<site>-robustness`` deployment's form: the store and site come from the site file,
    like the on-demand extraction's (``flows/robustness.py`` does the work).

    Returns
    -------
    dict
        The robustness stage summary.
    """
    from flows.pipeline import open_site_run
    from flows.robustness import build_params, robustness_flow

    config = open_site_run(site_config)
    params = build_params(
        config.site,
        config.store,
        preset,
        list(series) or None,
        list(rois) or None,
        list(modalities) or None,
        icc_threshold,
    )
    return robustness_flow.fn(params)


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

"""The hub's client of site query endpoints (``oncoflow serve``): obfuscated counts over HTTP.

A federation source that is an ``http(s)://`` URL is a site's query endpoint rather than a
publication: the hub asks it for the values of each dimension, then for the count of every
value (and the overall count). The answers are already obfuscated by the site (suppression,
noise, rounding), so they are shown as given: noisy counts do not add up, and the hub does not
make them.
"""

from __future__ import annotations

import os
from typing import Any

from tasks.errors import OncoflowError

#: Environment variable holding the bearer token the hub sends to site endpoints.
TOKEN_ENV = "ONCOFLOW_SERVE_TOKEN"
DIMENSIONS = ("modality", "body_part", "roi")


def is_endpoint(url: str) -> bool:
    """Whether a federation source is a site query endpoint (http or https URL)."""
    return url.strip().lower().startswith(("http://", "https://"))


def _get(client: Any, url: str, path: str, params: dict[str, str] | None = None) -> Any:
    import httpx

    try:
        response = client.get(f"{url.rstrip('/')}{path}", params=params or {})
    except httpx.HTTPError as exc:
        raise OncoflowError(f"{url}: site endpoint unreachable ({type(exc).__name__})") from None
    if response.status_code == 401:
        raise OncoflowError(f"{url}: the site refused the token (set {TOKEN_ENV})")
    if response.status_code != 200:
        try:
            reason = response.json().get("error", "")
        except ValueError:
            reason = ""
        raise OncoflowError(f"{url}: HTTP {response.status_code} {reason}".strip())
    return response.json()


def query_endpoint(url: str, token: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Ask one site endpoint for its counts overall and by modality, body part and ROI.

    Parameters
    ----------
    url
        Base URL of the site's ``oncoflow serve``.
    token
        Bearer token (default: ``ONCOFLOW_SERVE_TOKEN``).
    timeout
        Seconds per request.

    Returns
    -------
    dict
        ``site``, ``url``, ``policy``, ``patients``/``series`` overall and ``by`` dimension
        and value; every count as the site answered it (a number or ``"<k"``).
    """
    import httpx

    token = token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise OncoflowError(f"{url}: no token to query the site (set {TOKEN_ENV})")
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(headers=headers, timeout=timeout) as client:
        categories = _get(client, url, "/categories")
        overall = _get(client, url, "/counts")
        by: dict[str, dict[str, dict[str, Any]]] = {}
        for dim in DIMENSIONS:
            by[dim] = {}
            for value in categories["categories"].get(dim, []):
                answer = _get(client, url, "/counts", {dim: value})
                by[dim][value] = {"patients": answer["patients"], "series": answer["series"]}
    return {
        "site": overall["site"],
        "url": url,
        "policy": overall["policy"],
        "patients": overall["patients"],
        "series": overall["series"],
        "by": by,
    }


def queried_rows(queried: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows (site, value, patients, series) of the sites queried over HTTP, by dimension."""
    return {
        dim: [
            {"site": q["site"], "value": value, **answer}
            for q in queried
            for value, answer in q["by"][dim].items()
        ]
        for dim in DIMENSIONS
    }

"""The site's pseudonymisation secret: from the environment or a Prefect Secret block.

The secret is read where it is used (the flow process and each Dask worker's task), never
passed as a flow or task parameter, never logged, never returned. Only a ``key_id`` derived
from it (see :mod:`tasks.deid.pseudonyms`) may be shown.
"""

from __future__ import annotations

import os

from tasks.errors import OncoflowError

#: Environment variable holding the site secret (at least :data:`MIN_LENGTH` characters).
SECRET_ENV = "ONCOFLOW_SITE_SECRET"
#: Environment variable naming a Prefect Secret block that holds the secret instead.
SECRET_BLOCK_ENV = "ONCOFLOW_SITE_SECRET_BLOCK"
MIN_LENGTH = 32


def default_block_name(site: str) -> str:
    """Name of the Prefect Secret block looked up when the environment holds no secret."""
    return f"oncoflow-site-secret-{site}"


def _from_block(name: str) -> str | None:
    if not os.environ.get("PREFECT_API_URL"):
        return None  # no Prefect server configured: no block to read (and no slow fallback)
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name, validate=False).get()
    except Exception:  # missing block, no API, wrong type: all mean "no secret here"
        return None
    return str(value) if value else None


def load_site_secret(site: str) -> bytes:
    """Return the site secret as bytes, or raise a one-line :class:`OncoflowError`.

    Looks at ``ONCOFLOW_SITE_SECRET`` first, then (when ``PREFECT_API_URL`` is set, as it is
    inside every flow run) at the Prefect Secret block named by ``ONCOFLOW_SITE_SECRET_BLOCK``
    (default ``oncoflow-site-secret-<site>``).

    Parameters
    ----------
    site
        Site code (selects the default block name).

    Returns
    -------
    bytes
        The secret, UTF-8 encoded.
    """
    value = os.environ.get(SECRET_ENV, "")
    source = SECRET_ENV
    if not value:
        block = os.environ.get(SECRET_BLOCK_ENV) or default_block_name(site)
        value = _from_block(block) or ""
        source = f"Prefect Secret block {block!r}"
        if not value:
            raise OncoflowError(
                f"no site secret: set {SECRET_ENV} or create the Prefect Secret block "
                f"{block!r} (at least {MIN_LENGTH} random characters)"
            )
    if len(value) < MIN_LENGTH:
        raise OncoflowError(
            f"site secret from {source} is too short (need {MIN_LENGTH}+ characters)"
        )
    return value.encode("utf-8")

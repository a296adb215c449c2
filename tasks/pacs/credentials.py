"""DICOMweb credentials: from the environment or a Prefect Secret block, never from parameters.

Lookup order:

1. ``ONCOFLOW_DICOMWEB_TOKEN`` (a bearer token), or ``ONCOFLOW_DICOMWEB_USER`` and
   ``ONCOFLOW_DICOMWEB_PASSWORD`` (HTTP basic);
2. a Prefect ``Secret`` block whose *name* is given (the name is not secret); its value is
   ``{"user": ..., "password": ...}``, ``{"token": ...}`` or the string ``user:password``;
3. otherwise anonymous access.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import requests

from tasks.errors import OncoflowError

ENV_USER = "ONCOFLOW_DICOMWEB_USER"
ENV_PASSWORD = "ONCOFLOW_DICOMWEB_PASSWORD"
ENV_TOKEN = "ONCOFLOW_DICOMWEB_TOKEN"


@dataclass(frozen=True)
class DicomwebCredentials:
    """HTTP credentials for a DICOMweb server (values hidden from ``repr``).

    Parameters
    ----------
    user, password
        HTTP basic credentials.
    token
        Bearer token (used instead of basic credentials when set).
    origin
        Where the credentials came from (``environment``, ``secret-block``, ``none``).
    """

    user: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    origin: str = "none"

    def session(self) -> requests.Session:
        """Return a ``requests`` session that authenticates with these credentials."""
        session = requests.Session()
        if self.token:
            session.headers["Authorization"] = f"Bearer {self.token}"
        elif self.user:
            session.auth = (self.user, self.password)
        return session


def _from_mapping(value: object, origin: str) -> DicomwebCredentials:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = json.loads(text)
        elif ":" in text:
            user, password = text.split(":", 1)
            return DicomwebCredentials(user=user, password=password, origin=origin)
        else:
            return DicomwebCredentials(token=text, origin=origin)
    if isinstance(value, dict):
        token = str(value.get("token") or "")
        user = str(value.get("user") or value.get("username") or "")
        password = str(value.get("password") or "")
        if token or user:
            return DicomwebCredentials(user=user, password=password, token=token, origin=origin)
    raise OncoflowError(
        "DICOMweb secret block has an unknown shape: expected "
        '{"user": ..., "password": ...}, {"token": ...} or "user:password"'
    )


def load_credentials(secret_block: str | None = None) -> DicomwebCredentials:
    """Return DICOMweb credentials from the environment or a Prefect Secret block.

    Parameters
    ----------
    secret_block
        Name of a Prefect ``Secret`` block to read when the environment has no credentials.

    Returns
    -------
    DicomwebCredentials
        Credentials; ``origin == "none"`` for anonymous access.
    """
    token = os.environ.get(ENV_TOKEN, "")
    user = os.environ.get(ENV_USER, "")
    if token or user:
        password = os.environ.get(ENV_PASSWORD, "")
        if user and not password and not token:
            raise OncoflowError(f"{ENV_USER} is set but {ENV_PASSWORD} is not")
        return DicomwebCredentials(user=user, password=password, token=token, origin="environment")
    if secret_block:
        try:
            from prefect.blocks.system import Secret

            value = Secret.load(secret_block).get()
        except Exception as exc:
            raise OncoflowError(
                f"could not read the Prefect Secret block {secret_block!r}: {type(exc).__name__}"
            ) from None
        return _from_mapping(value, "secret-block")
    return DicomwebCredentials()

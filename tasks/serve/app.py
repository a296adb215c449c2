"""A read-only HTTP API answering count queries over the site's published cohorts.

``GET /counts?modality=CT&body_part=CHEST&age_band=60-69`` returns the obfuscated number of
patients and series (see :mod:`tasks.federation.query`); ``GET /categories`` the values each
field takes; ``GET /policy`` k, epsilon, rounding and the release's worst-case privacy budget;
``GET /health`` (no token) that the service is up. Every other route needs
``Authorization: Bearer <token>``; a missing or wrong token gets 401, a refused query 400 with a
one-line reason. Nothing is written, and the log lines name no query values.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tasks.errors import OncoflowError
from tasks.federation.noise import NoisePolicy
from tasks.federation.query import SiteCounts, parse_query

TOKEN_ENV = "ONCOFLOW_SERVE_TOKEN"
MIN_TOKEN = 16


@dataclass(frozen=True)
class ServeSettings:
    """What the endpoint answers with (no secret is ever sent)."""

    counts: SiteCounts
    policy: NoisePolicy
    secret: bytes
    token: str
    series_cap: int = 10


def load_token(block: str | None = None) -> str:
    """Read the bearer token from ``ONCOFLOW_SERVE_TOKEN`` or the named Prefect Secret block.

    Raises
    ------
    OncoflowError
        When there is no token, or it is shorter than 16 characters.
    """
    if block:
        try:
            from prefect.blocks.system import Secret

            token = str(Secret.load(block, validate=False).get())
        except Exception as exc:
            raise OncoflowError(
                f"cannot read the Prefect Secret block {block!r} ({type(exc).__name__})"
            ) from None
    else:
        token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise OncoflowError(f"no token: set {TOKEN_ENV} or give --token-block")
    if len(token) < MIN_TOKEN:
        raise OncoflowError(f"the token is too short (at least {MIN_TOKEN} characters)")
    return token


def create_app(settings: ServeSettings) -> FastAPI:
    """Build the FastAPI application of one site."""
    app = FastAPI(
        title=f"oncoflow counts: {settings.counts.site}",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    bearer = HTTPBearer(auto_error=False)

    def authorised(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        given = (creds.credentials if creds is not None else "").encode()
        if not hmac.compare_digest(given, settings.token.encode()):
            raise HTTPException(
                status_code=401,
                detail="a valid bearer token is required",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.exception_handler(OncoflowError)
    async def _refused(_: Request, exc: OncoflowError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": str(exc)})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "site": settings.counts.site}

    @app.get("/counts", dependencies=[Depends(authorised)])
    def counts(request: Request) -> dict[str, Any]:
        params = {k: request.query_params.getlist(k) for k in request.query_params}
        query = parse_query(params)
        return settings.counts.answer(
            query, settings.policy, settings.secret, series_cap=settings.series_cap
        )

    @app.get("/categories", dependencies=[Depends(authorised)])
    def categories() -> dict[str, Any]:
        return {"site": settings.counts.site, "categories": settings.counts.categories()}

    @app.get("/policy", dependencies=[Depends(authorised)])
    def policy() -> dict[str, Any]:
        return {
            "site": settings.counts.site,
            "k": settings.policy.k,
            "epsilon": settings.policy.epsilon,
            "rounding": settings.policy.rounding,
            "series_sensitivity": settings.series_cap,
            "releases": len(settings.counts.releases),
            "budget": settings.counts.budget(settings.policy),
        }

    return app


def serve(
    site: str,
    to: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    policy: NoisePolicy | None = None,
    series_cap: int = 10,
    token_block: str | None = None,
) -> None:
    """Load the site's published cohorts and answer count queries until interrupted.

    Parameters
    ----------
    site
        Site code (its published versions are answered; its secret keys the noise).
    to
        Publication root URL of the site.
    host, port
        Where to listen.
    policy
        k, epsilon and rounding (default: k = 10, epsilon = 1, rounding = 5).
    series_cap
        Sensitivity of series counts (the most series one patient adds).
    token_block
        Prefect Secret block holding the bearer token (default: ``ONCOFLOW_SERVE_TOKEN``).
    """
    import uvicorn

    from tasks.deid.secret import load_site_secret
    from tasks.federation.query import load_site_counts

    token = load_token(token_block)
    secret = load_site_secret(site)
    counts = load_site_counts(site, to)
    settings = ServeSettings(
        counts=counts,
        policy=policy or NoisePolicy(),
        secret=secret,
        token=token,
        series_cap=series_cap,
    )
    uvicorn.run(
        create_app(settings), host=host, port=port, access_log=False, log_level="warning"
    )

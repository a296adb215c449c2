"""Errors that reach the operator as one line, never as a traceback."""

from __future__ import annotations

from pydantic import ValidationError


class OncoflowError(Exception):
    """A problem the user can fix: bad input, bad option, unreachable source.

    The CLI prints ``error: <message>`` and exits with status 2. The message must
    be one line and must not contain identifiers (patient names, IDs, UIDs).
    """


class StageFailed(OncoflowError):
    """A stage failed wholesale or crossed its failure-ratio threshold."""


def validation_message(exc: ValidationError) -> str:
    """Return the first error of a pydantic validation as one line: ``field.path: message``."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg

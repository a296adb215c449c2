"""Errors that reach the operator as one line, never as a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

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


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest of ``choices`` to ``word``, else ``""``.

    Parameters
    ----------
    word
        The unknown name the user wrote.
    choices
        The names that would have been accepted.

    Examples
    --------
    >>> did_you_mean("binwidth", ["binWidth", "binCount"])
    " (did you mean 'binWidth'?)"
    """
    options = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(str(word).lower(), list(options), n=1, cutoff=0.6)
    return f" (did you mean {options[found[0]]!r}?)" if found else ""

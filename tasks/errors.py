"""Errors that reach the operator as one line, never as a traceback."""

from __future__ import annotations


class OncoflowError(Exception):
    """A problem the user can fix: bad input, bad option, unreachable source.

    The CLI prints ``error: <message>`` and exits with status 2. The message must
    be one line and must not contain identifiers (patient names, IDs, UIDs).
    """


class StageFailed(OncoflowError):
    """A stage failed wholesale or crossed its failure-ratio threshold."""

"""Why a stage's input table is missing, in one line: no store, no such site, or a stage to run.

A mistyped ``--store`` or ``--site`` used to read as "run the earlier stage first"; these
helpers look at what the store holds and say which of the three it is.
"""

from __future__ import annotations

from tasks.errors import OncoflowError
from tasks.store import SiteStore


def missing_input(store: SiteStore, what: str, earlier: str) -> OncoflowError:
    """Return the error for a missing stage input, naming the actual cause.

    Parameters
    ----------
    store
        The site store.
    what
        The missing input, e.g. ``"harmonised images"``.
    earlier
        The command that makes it, e.g. ``"oncoflow harmonise"``.

    Returns
    -------
    OncoflowError
        ``store URL does not exist``, ``store URL has no site 'x' (sites there: ...)``, or
        ``no <what> for site 'x': run `<earlier>` first``.
    """
    sites = store.sites()
    if sites is None:
        return OncoflowError(f"store {store.url} does not exist (check --store)")
    if store.site not in sites:
        listed = ", ".join(sites) if sites else "none"
        return OncoflowError(
            f"store {store.url} has no site {store.site!r} (sites there: {listed})"
        )
    return OncoflowError(f"no {what} for site {store.site!r}: run `{earlier}` first")

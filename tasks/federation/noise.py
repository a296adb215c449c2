"""Obfuscated counts: k-suppression, then Laplace noise and rounding (the EUCAIM policy).

A count answered outside the site goes through three steps:

1. **suppression**: a true count from 1 to ``k - 1`` is never answered, only ``"<k"`` (a zero is
   answered as 0: an empty cell is not a small cell);
2. **noise**: Laplace noise of scale ``sensitivity / epsilon`` is added. The noise is derived
   deterministically from the query, the dataset version and the site secret (HMAC-SHA256), so
   asking the same question again gives the same answer and averaging repeated answers learns
   nothing more; a new dataset version, or another site, draws new noise;
3. **rounding** to the nearest multiple of ``rounding``, and never below the smallest multiple
   that is at least ``k``: a number answered is never a small cell, and never reveals whether
   the true count was just above ``k``.

Privacy budget: each *distinct* query answered on a release spends ``epsilon`` (repeats spend
nothing, their answer is fixed); :func:`release_budget` bounds the total for a release by the
number of distinct queries its categories allow.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from tasks.errors import OncoflowError


@dataclass(frozen=True)
class NoisePolicy:
    """How a site obfuscates the counts it answers.

    Parameters
    ----------
    k
        Smallest count answered as a number (1..k-1 are answered ``"<k"``).
    epsilon
        Laplace privacy parameter per distinct query (smaller: more noise).
    rounding
        Answers are multiples of this.
    sensitivity
        Largest change one individual makes to the count (1 for patient counts; the cap on
        series per patient for series counts).
    """

    k: int = 10
    epsilon: float = 1.0
    rounding: int = 5
    sensitivity: float = 1.0

    def __post_init__(self) -> None:
        if self.k < 2:
            raise OncoflowError("k must be at least 2")
        if not (0 < self.epsilon <= 100):
            raise OncoflowError("epsilon must be in (0, 100]")
        if self.rounding < 1:
            raise OncoflowError("rounding must be at least 1")
        if self.sensitivity <= 0:
            raise OncoflowError("sensitivity must be positive")

    @property
    def scale(self) -> float:
        """Laplace scale ``b = sensitivity / epsilon``."""
        return self.sensitivity / self.epsilon

    @property
    def floor(self) -> int:
        """Smallest number ever answered: the first multiple of ``rounding`` that is >= k."""
        return self.rounding * math.ceil(self.k / self.rounding)


def canonical_query(query: Mapping[str, object]) -> str:
    """Serialise a query so that equal questions give equal strings (keys and lists sorted)."""
    norm = {
        str(k): sorted(str(x) for x in v) if isinstance(v, list | tuple | set) else str(v)
        for k, v in query.items()
    }
    return json.dumps(norm, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def uniform(secret: bytes, *parts: str) -> float:
    """Derive a number in (0, 1) from the secret and the parts with HMAC-SHA256."""
    mac = hmac.new(secret, "\x1f".join(parts).encode(), hashlib.sha256).digest()
    return (int.from_bytes(mac[:8], "big") + 0.5) / 2**64


def laplace_noise(scale: float, u: float) -> float:
    """Laplace(0, scale) sample from a uniform ``u`` in (0, 1) (inverse CDF)."""
    centred = u - 0.5
    return -scale * math.copysign(1.0, centred) * math.log(1.0 - 2.0 * abs(centred))


def round_to(value: float, multiple: int) -> int:
    """Round to the nearest multiple (halves away from zero)."""
    return int(multiple * math.floor(value / multiple + 0.5))


def obfuscate(
    true_count: int,
    policy: NoisePolicy,
    *,
    secret: bytes,
    query: str,
    version: str,
    measure: str = "patients",
) -> int | str:
    """Answer a count under the policy (suppression, deterministic noise, rounding).

    Parameters
    ----------
    true_count
        The exact count (never leaves this function).
    policy
        k, epsilon, rounding, sensitivity.
    secret
        The site secret (keys the noise; without it the noise cannot be reproduced).
    query
        Canonical query string (:func:`canonical_query`).
    version
        Dataset version(s) answered (e.g. the content hashes), so a new release draws new noise.
    measure
        What is counted (``patients``, ``series``): each has its own noise.

    Returns
    -------
    int or str
        ``0``, ``"<k"``, or a multiple of ``rounding`` that is at least ``k``.
    """
    if true_count < 0:
        raise OncoflowError("a count cannot be negative")
    if true_count == 0:
        return 0
    if true_count < policy.k:
        return f"<{policy.k}"
    noise = laplace_noise(policy.scale, uniform(secret, query, version, measure))
    return max(policy.floor, round_to(true_count + noise, policy.rounding))


def release_budget(
    policy: NoisePolicy, categories: Mapping[str, int], measures: int = 2
) -> dict[str, float | int]:
    """Worst-case privacy budget of a release: epsilon times the distinct answers it allows.

    Parameters
    ----------
    policy
        The noise policy.
    categories
        Number of distinct values of each query field in the release (a query fixes each
        field to one value or leaves it open).
    measures
        Counts answered per query (patients and series), each with its own noise.

    Returns
    -------
    dict
        ``epsilon`` per answer, ``queries`` (distinct queries possible), ``measures`` and
        ``budget`` (epsilon x queries x measures, by sequential composition).
    """
    queries = math.prod(n + 1 for n in categories.values())
    return {
        "epsilon": policy.epsilon,
        "queries": queries,
        "measures": measures,
        "budget": policy.epsilon * queries * measures,
    }

"""Obfuscated counts: suppression bounds, deterministic Laplace noise, rounding, budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from tasks.errors import OncoflowError
from tasks.federation.noise import (
    NoisePolicy,
    canonical_query,
    laplace_noise,
    obfuscate,
    release_budget,
    round_to,
    uniform,
)

SECRET = b"site-secret-\xce\xb1\xce\xb2"
POLICY = NoisePolicy(k=10, epsilon=0.5, rounding=5)


def answer(count: int, query: str = "q", version: str = "v1", policy=POLICY, secret=SECRET):
    return obfuscate(count, policy, secret=secret, query=query, version=version)


def test_repeating_a_query_gives_the_same_answer() -> None:
    q = canonical_query({"modality": "CT", "sex": "F"})
    first = answer(137, q)
    assert all(answer(137, q) == first for _ in range(50))
    # the same question written differently is the same question
    assert canonical_query({"sex": "F", "modality": "CT"}) == q
    # another release or another site draws other noise (for most queries)
    queries = [canonical_query({"roi": f"r{i}"}) for i in range(200)]
    draws = {uniform(SECRET, q, "v1", "patients") for q in queries}
    assert len(draws) == len(queries)
    assert draws.isdisjoint(uniform(SECRET, q, "v2", "patients") for q in queries)
    assert draws.isdisjoint(uniform(b"other", q, "v1", "patients") for q in queries)
    assert sum(answer(500, q) != answer(500, q, version="v2") for q in queries) > 40


def test_noise_follows_laplace_over_many_queries() -> None:
    scale = POLICY.scale
    draws = np.array(
        [laplace_noise(scale, uniform(SECRET, f"query-{i}", "v1", "patients")) for i in range(4000)]
    )
    result = stats.kstest(draws, stats.laplace(loc=0, scale=scale).cdf)
    assert result.pvalue > 0.01, result
    # and not just any symmetric distribution: a normal of the same variance is rejected
    wrong = stats.kstest(draws, stats.norm(loc=0, scale=scale * math.sqrt(2)).cdf)
    assert wrong.pvalue < result.pvalue
    assert abs(np.median(draws)) < 0.2 * scale


def test_answers_are_unbiased_multiples_of_the_rounding() -> None:
    true = 1000
    answers = [answer(true, f"q{i}") for i in range(2000)]
    assert all(isinstance(a, int) and a % 5 == 0 for a in answers)
    assert abs(np.mean(answers) - true) < 0.5  # Laplace(2) + rounding: mean within 0.5
    assert len(set(answers)) > 3  # really noisy


@given(st.integers(min_value=0, max_value=10_000), st.text(max_size=20))
def test_small_cells_are_never_answered_as_numbers(count: int, query: str) -> None:
    out = answer(count, query)
    if count == 0:
        assert out == 0
    elif count < POLICY.k:
        assert out == "<10"
    else:
        assert isinstance(out, int) and out >= 10 and out % 5 == 0


def test_rounding_and_floor() -> None:
    assert round_to(12.4, 5) == 10 and round_to(12.5, 5) == 15 and round_to(-2.6, 5) == -5
    assert NoisePolicy(k=10, rounding=3).floor == 12
    strict = NoisePolicy(k=10, epsilon=0.01, rounding=10)  # huge noise: the floor holds
    assert min(answer(10, f"q{i}", policy=strict) for i in range(300)) == 10


def test_policy_and_budget() -> None:
    with pytest.raises(OncoflowError, match="epsilon"):
        NoisePolicy(epsilon=0)
    with pytest.raises(OncoflowError, match="k must"):
        NoisePolicy(k=1)
    budget = release_budget(POLICY, {"modality": 2, "sex": 2, "age_band": 3})
    assert budget["queries"] == 3 * 3 * 4
    assert budget["budget"] == pytest.approx(0.5 * 36 * 2)

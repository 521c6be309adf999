"""Greedy, temperature, top-k, top-p: each keeps exactly what it promises, and seeds reproduce."""

from __future__ import annotations

import math

import pytest
import torch

from llmlab.sampling import (
    SamplingError,
    SamplingParams,
    make_generator,
    next_token_probs,
    sample_next,
    top_k_filter,
    top_p_filter,
)

PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])
LOGITS = PROBS.log()


def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0)), logits.argmax(-1))
    assert SamplingParams(temperature=0).greedy


@pytest.mark.parametrize("k", [1, 2, 3, 4, 10])
def test_top_k_keeps_k(k):
    kept = torch.isfinite(top_k_filter(LOGITS, k)).sum().item()
    assert kept == min(k, 4)
    assert torch.isfinite(top_k_filter(LOGITS, 1))[1]  # the most likely one


# The masses here are 0.5, 0.8, 0.95 only up to float rounding (softmax of logs: 0.5 comes out as 0.50000006
# on one kernel and could be 0.49999997 on another), so each p is at least 0.01 away from them.
@pytest.mark.parametrize(("p", "kept"), [(0.3, {1}), (0.49, {1}), (0.51, {1, 3}), (0.79, {1, 3}), (0.81, {1, 3, 2}),
                                         (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_nucleus(p, kept):
    filtered = top_p_filter(LOGITS, p)
    assert set(torch.nonzero(torch.isfinite(filtered)).flatten().tolist()) == kept


@pytest.mark.parametrize(("p", "n_kept"), [(0.25, 1), (0.5, 2), (0.500001, 3), (0.75, 3), (0.750001, 4)])
def test_top_p_mass_exactly_p_is_enough(p, n_kept):
    """Four equal logits: every probability is exactly 1/4 (exp(0) = 1, 1/4 is a binary fraction), so the
    masses 0.25, 0.5, 0.75 are exact and the boundary rule (reaching p is enough) can be tested exactly."""
    assert torch.isfinite(top_p_filter(torch.zeros(4), p)).sum().item() == n_kept


def test_top_p_batched_rows_are_independent():
    rows = torch.stack([LOGITS, LOGITS.flip(0)])
    filtered = top_p_filter(rows, 0.6)
    assert torch.isfinite(filtered[0]).tolist() == [False, True, False, True]
    assert torch.isfinite(filtered[1]).tolist() == [True, False, True, False]


def test_temperature_to_zero_approaches_greedy():
    probs = next_token_probs(LOGITS, SamplingParams(temperature=0.01))
    assert probs[1] > 0.999
    flat = next_token_probs(LOGITS, SamplingParams(temperature=100.0))
    assert flat.max() - flat.min() < 0.02  # high temperature: nearly uniform


def test_temperature_one_keeps_the_distribution():
    assert torch.allclose(next_token_probs(LOGITS, SamplingParams()), PROBS, atol=1e-6)


def test_sampling_follows_the_probabilities():
    draws = sample_next(LOGITS.expand(20_000, 4), SamplingParams(), make_generator(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    # A frequency out of 20,000 draws spreads by at most 0.0035 (one standard deviation), so 0.015 is 4σ.
    # Measured 0.0023, with the same seeded draws on the AVX512, portable and SSE4.2 kernels.
    assert torch.allclose(freq, PROBS, atol=0.015)


def test_seeds_reproduce_and_differ():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(top_k=20, top_p=0.9)
    a = sample_next(logits, params, make_generator(7))
    b = sample_next(logits, params, make_generator(7))
    c = sample_next(logits, params, make_generator(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be ≥ 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": 0}, "top_k must be an integer ≥ 1"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**kwargs)


def test_filters_never_empty_the_distribution():
    probs = next_token_probs(torch.tensor([[0.0, -math.inf, 5.0]]), SamplingParams(top_p=1e-9, top_k=1))
    assert probs.sum().item() == pytest.approx(1.0) and probs[0, 2] == 1.0

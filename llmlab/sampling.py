"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

Taught in notebook 08 (generation and sampling).  Every function works on the
last dimension of a ``[..., vocab]`` tensor, and sampling takes an explicit
``torch.Generator`` so a seed reproduces the same text.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch


class SamplingError(ValueError):
    """A sampling parameter is out of range (the message gives the valid range)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens (notebook 08).

    ``temperature == 0`` means greedy (always the most likely token).
    ``top_k``: keep only the k most likely tokens.  ``top_p``: keep the smallest
    set of tokens whose probabilities add up to at least p.  Generation stops
    after ``max_new_tokens`` or at any id in ``stop_ids``.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 200
    seed: int | None = None
    stop_ids: Collection[int] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise SamplingError(f"temperature must be ≥ 0 (0 = greedy), got {self.temperature!r}.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise SamplingError(f"top_k must be an integer ≥ 1 (or None to keep every token), got {self.top_k!r}.")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p!r}.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer ≥ 1, got {self.max_new_tokens!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit outside the ``k`` largest to −inf (ties at the k-th value are kept)."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p``; −inf elsewhere.

    The most likely token is always kept, so the result is never empty.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p: the logits the sampler will draw from."""
    logits = logits.float()
    if not params.greedy:
        logits = logits / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    return logits


def next_token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the next token is drawn from (one-hot on the argmax when greedy)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return torch.softmax(filter_logits(logits, params), dim=-1)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` ``[batch, vocab]`` → ``[batch]``."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, params)
    flat = probs.reshape(-1, probs.shape[-1])
    if generator is not None and generator.device != flat.device:
        flat = flat.to(generator.device)
    picked = torch.multinomial(flat, 1, generator=generator).to(logits.device)
    return picked.reshape(probs.shape[:-1])


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed`` (None: use torch's global random state)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)

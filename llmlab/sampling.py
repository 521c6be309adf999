"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

Taught in notebook 08 (generation and sampling).  Every function works on the
last dimension of a ``[..., vocab]`` tensor, and sampling takes an explicit
``torch.Generator`` so a seed reproduces the same text.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from llmlab.errors import LlmlabError, require_finite, require_int

MAX_NEW_TOKENS = 100_000
"""Most tokens one call may generate: far beyond any course model's context (256 to 40,960
tokens), and small enough that a typo (``1000000000``) fails at once instead of running for days."""

MIN_TEMPERATURE = 1e-6
"""Smallest positive temperature: below it, logits / temperature overflows to inf (NaN probabilities);
sampling that cold is greedy in effect, so use ``temperature=0``."""

MAX_SEED = 2**64 - 1
"""``torch.Generator.manual_seed`` keeps 64 unsigned bits: seeds are 0 .. 2**64 - 1."""

SEED_RANGE = ("seed must be an integer in 0 .. 2**64 - 1 (the 64 bits torch.Generator keeps; "
              "leave it unset for a fresh random seed)")


class SamplingError(LlmlabError, ValueError):
    """A sampling parameter is out of range (the message gives the valid range).

    ``param`` names the parameter (``"top_p"``), so that the command line can name its option instead.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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
        _check_temperature(self.temperature)
        if self.top_k is not None:
            _require(require_int, "top_k", self.top_k, minimum=1,
                     message="top_k must be an integer ≥ 1 (leave it unset to keep every token)")
        if self.top_p is not None:
            _require(require_finite, "top_p", self.top_p, minimum=0.0, maximum=1.0, exclude_minimum=True,
                     message="top_p must be in (0, 1] (1 keeps every token)")
        _check_max_new_tokens(self.max_new_tokens)
        if self.seed is not None:
            _require(require_int, "seed", self.seed, minimum=0, maximum=MAX_SEED, message=SEED_RANGE)
        _check_stop_ids(self.stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _require(check, name: str, value, *, message: str, exclude_minimum: bool = False, **limits):
    """``check(name, value, **limits)`` (``require_int`` or ``require_finite``), failing with ``message``.

    The checks themselves live in :mod:`llmlab.errors`; this only swaps their generic
    sentence for one that gives the valid range and what each end means.
    """
    try:
        checked = check(name, value, error=SamplingError, **limits)
    except SamplingError:
        checked = None
    if checked is None or (exclude_minimum and checked == limits.get("minimum")):
        raise SamplingError(f"{message}, got {value!r}.", name)
    return checked


def _check_temperature(temperature) -> None:
    """``temperature`` must be 0 (greedy) or a finite number ≥ ``MIN_TEMPERATURE`` (NaN and inf refused)."""
    value = _require(require_finite, "temperature", temperature,
                     message="temperature must be a finite number ≥ 0 (0 = greedy; 0.8 is typical)")
    if value < 0:
        raise SamplingError(f"temperature must be ≥ 0 (0 = greedy), got {temperature!r}.", "temperature")
    if 0 < value < MIN_TEMPERATURE:
        raise SamplingError(
            f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature!r}: "
            "logits / temperature would overflow, and sampling that cold is greedy anyway.", "temperature"
        )


def _check_max_new_tokens(max_new_tokens) -> None:
    """An integer in 1 .. ``MAX_NEW_TOKENS``."""
    _require(require_int, "max_new_tokens", max_new_tokens, minimum=1,
             message="max_new_tokens must be an integer ≥ 1")
    if max_new_tokens > MAX_NEW_TOKENS:
        raise SamplingError(
            f"max_new_tokens must be at most {MAX_NEW_TOKENS:,}, got {max_new_tokens:,}: the limit keeps a "
            "typo from running for hours; generate in several calls for longer text.", "max_new_tokens"
        )


def _check_stop_ids(stop_ids) -> None:
    """``stop_ids`` must be a collection (tuple, list, set) of token ids ≥ 0."""
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, Collection):
        raise SamplingError(
            f"stop_ids must be a tuple of token ids such as (tokenizer.eot_id,), got {stop_ids!r} "
            f"({type(stop_ids).__name__}).", "stop_ids"
        )
    for token in stop_ids:
        _require(require_int, "stop_ids", token, minimum=0,
                 message="stop_ids must hold token ids (integers ≥ 0) such as (tokenizer.eot_id,)")


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
    try:
        picked = torch.multinomial(flat, 1, generator=generator).to(logits.device)
    except RuntimeError as err:
        if bool(torch.isfinite(flat).all()):
            raise
        raise SamplingError(
            "the model's logits contain NaN or inf, so there is no distribution to sample from: the "
            "weights are probably damaged (e.g. training diverged); reload or retrain the model."
        ) from err
    return picked.reshape(probs.shape[:-1])


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed`` (None: use torch's global random state)."""
    if seed is None:
        return None
    _require(require_int, "seed", seed, minimum=0, maximum=MAX_SEED, message=SEED_RANGE)
    return torch.Generator(device=device).manual_seed(seed)

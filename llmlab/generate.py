"""The autoregressive loop: sequence → logits → sample → append → repeat.

Taught in notebook 08 (generation and sampling); the KV cache path in
notebook 09.

Context rule: a *prompt* longer than the model's ``context_length`` is an
error (:class:`PromptError`) — nothing is silently dropped from what the user
wrote.  While *generating*, once prompt + new tokens fill the context, the
model sees only the last ``context_length`` tokens (a sliding window, i.e.
left truncation); everything generated is still returned.  With a KV cache
the window is re-filled (one full forward pass) each time it slides, so both
paths compute the same logits.

Batches: prompts of different lengths are **left-padded** so that every
sequence's next token sits in the last column; an attention mask hides the
padding and positions count real tokens only, so each sequence gets exactly
the tokens it would get on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from numbers import Integral

import torch

from llmlab.cache import KVCache
from llmlab.compiled import CompiledDecoder
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.sampling import SamplingParams, make_generator, sample_next

PAD_ID = 0
"""Id written into padding positions (never seen: the attention mask hides it)."""


class GenerateError(LlmlabError, ValueError):
    """A generation request that cannot run (wrong model, parameters or options); the message says what to pass."""


class PromptError(GenerateError):
    """A prompt that cannot be generated from (empty, not token ids, or longer than the context)."""


def check_prompt(ids: Sequence[int], context_length: int) -> None:
    """Apply the context rule to a prompt's ids (see the module docstring); ids must be integers."""
    _check_ids_type(ids)
    if len(ids) == 0:
        raise PromptError("the prompt is empty: give at least one character (e.g. 'ROMEO:').")
    if len(ids) > context_length:
        raise PromptError(
            f"the prompt is {len(ids)} tokens but the model's context is {context_length}: "
            f"shorten it to at most {context_length} tokens (e.g. keep its end)."
        )


def _check_ids_type(ids) -> None:
    """A prompt is a list (or tuple, or 1-D integer tensor) of token ids, not text."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise PromptError(f"a prompt tensor must be 1-D integer token ids, got shape {tuple(ids.shape)} and "
                              f"dtype {ids.dtype}; encode text with tokenizer.encode(text).")
        return
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise PromptError(f"a prompt must be a list of token ids, got {type(ids).__name__}; "
                          "encode text first with tokenizer.encode(text).")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, Integral):
            raise PromptError(f"a prompt must hold integer token ids, got {token!r} ({type(token).__name__}); "
                              "encode text with tokenizer.encode(text).")


def check_request(model, prompts: Sequence[Sequence[int]], params: SamplingParams, use_cache: bool = True,
                  compiled: bool = False) -> None:
    """Everything a generation call needs, checked before any work (notebook 08).

    ``model`` is an llmlab ``Transformer``, ``prompts`` a non-empty list of prompts
    (each a list of token ids within the context), ``params`` a ``SamplingParams``.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(config, ModelConfig):
        raise GenerateError(f"model must be an llmlab Transformer (e.g. load_checkpoint().model), got "
                            f"{type(model).__name__}.")
    if not isinstance(params, SamplingParams):
        raise GenerateError(f"params must be a SamplingParams (e.g. SamplingParams(temperature=0.8)), got "
                            f"{type(params).__name__}.")
    for name, flag in (("use_cache", use_cache), ("compiled", compiled)):
        if not isinstance(flag, bool):
            raise GenerateError(f"{name} must be True or False, got {flag!r}.")
    if compiled and not use_cache:
        raise GenerateError("compiled=True compiles the cached decode step: use it with use_cache=True.")
    _check_prompts(prompts, config.context_length)


def _check_prompts(prompts: Sequence[Sequence[int]], context_length: int) -> None:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise PromptError(f"a tensor of prompts must be [batch, seq] token ids, got shape {tuple(prompts.shape)}; "
                              "for one prompt use generate_ids().")
    elif isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise PromptError(f"prompts must be a list of prompts (each a list of token ids), got "
                          f"{type(prompts).__name__}; for one prompt use generate_ids().")
    if len(prompts) == 0:
        raise PromptError("prompts is empty: give at least one prompt (a list of token ids).")
    for prompt in prompts:
        check_prompt(prompt, context_length)


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, both ``[batch, longest]``: prompts right-aligned, mask 1 on real tokens."""
    if len(prompts) == 0:
        raise PromptError("there are no prompts to pad: give at least one prompt (a list of token ids).")
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), PAD_ID, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, longest - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only: ``[0 0 1 2]`` for mask ``[0 1 1 1]`` (padding gets 0)."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


class _Stepper:
    """Produces next-token logits for a growing batch, with or without a KV cache.

    The cache holds at most what this request can use (the longest prompt plus
    the new tokens, up to the context).  ``compiled=True`` runs each decode step
    through :class:`llmlab.compiled.CompiledDecoder`; prefill (and a refill after
    the window slides) stays eager, since its length varies.
    """

    def __init__(self, model, batch_size: int, max_len: int, use_cache: bool, compiled: bool,
                 padded: bool, device) -> None:
        self.model, self.context, self.padded = model, model.config.context_length, padded
        dtype = next(model.parameters()).dtype  # the cache holds K/V as the model computes them
        self.cache = KVCache.for_model(model.config, batch_size, max_len=min(max_len, self.context),
                                       dtype=dtype, device=device) if use_cache else None
        self.cache_start = 0  # column of `ids` held at cache position 0
        self.compiled = CompiledDecoder(self.cache) if compiled else None

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        total = ids.shape[1]
        if self.cache is None:
            return self._window(ids, mask)
        cached_upto = self.cache_start + self.cache.length
        if self.cache.length == 0 or total - self.cache_start > self.cache.max_len:
            self.cache.reset()  # prefill, or the window slid: fill the cache again
            self.cache_start = max(0, total - self.context)
            if self.compiled is not None:
                self.compiled.reset()
            return self._window(ids, mask)
        window_mask = mask[:, self.cache_start:]
        new_ids = ids[:, cached_upto:]
        positions = positions_from_mask(window_mask)[:, -new_ids.shape[1]:]
        if self.compiled is not None:
            return self.compiled.logits(self.model, new_ids, positions, window_mask)
        out = self.model(new_ids, positions=positions, cache=self.cache,
                         attention_mask=window_mask if self.padded else None, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _window(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids, mask = ids[:, -self.context:], mask[:, -self.context:]
        out = self.model(ids, positions=positions_from_mask(mask), cache=self.cache,
                         attention_mask=mask if self.padded else None, logits_to_keep=1)
        return out.logits[:, -1, :]


@torch.no_grad()
def generate_batch(model, prompts: Sequence[Sequence[int]], params: SamplingParams,
                   use_cache: bool = True, *, compiled: bool = False) -> Iterator[torch.Tensor]:
    """Yield one ``[batch]`` tensor of new ids per step, for prompts of any lengths (left-padded).

    Stops after ``max_new_tokens`` steps, or once every sequence has produced a
    stop id.  A sequence that stopped keeps being computed (its later ids are
    to be ignored; :func:`generate_many` trims them).  ``compiled=True`` (needs
    ``use_cache``) compiles the decode step with ``torch.compile`` — the first
    call pays the compilation (seconds), later steps run faster (notebook 09).
    """
    if compiled and not use_cache:
        raise ValueError("compiled=True compiles the cached decode step: use it with use_cache=True.")
    for prompt in prompts:
        check_prompt(prompt, model.config.context_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = make_generator(params.seed)
    ids, mask = left_pad(prompts, device)
    stepper = _Stepper(model, len(prompts), ids.shape[1] + params.max_new_tokens, use_cache, compiled,
                       bool((mask == 0).any()), device)
    stop = torch.tensor(sorted(params.stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    try:
        for _ in range(params.max_new_tokens):
            next_ids = sample_next(stepper.logits(ids, mask), params, generator)
            yield next_ids
            finished |= torch.isin(next_ids, stop)
            if bool(finished.all()):
                return
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_ids)[:, None]], dim=1)
    finally:
        model.train(was_training)


def generate_many(model, prompts: Sequence[Sequence[int]], params: SamplingParams,
                  use_cache: bool = True, *, compiled: bool = False) -> list[list[int]]:
    """Every prompt's new ids, each ending at (and including) its first stop id."""
    check_request(model, prompts, params, use_cache, compiled)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in generate_batch(model, prompts, params, use_cache, compiled=compiled):
        for row, token in enumerate(step.tolist()):
            if not done[row]:
                outputs[row].append(token)
                done[row] = token in params.stop_ids
    return outputs


def generate_ids(model, prompt_ids: Sequence[int], params: SamplingParams, use_cache: bool = True, *,
                 compiled: bool = False) -> Iterator[int]:
    """Yield one sequence's new ids as they come (streaming), stopping at ``max_new_tokens`` or a stop id.

    The request is checked when this is called, before the first id is asked for.
    """
    check_request(model, [prompt_ids], params, use_cache, compiled)
    return (int(step[0]) for step in generate_batch(model, [prompt_ids], params, use_cache, compiled=compiled))


def stream_text(model, tokenizer, prompt: str, params: SamplingParams, use_cache: bool = True, *,
                compiled: bool = False) -> Iterator[str]:
    """Yield generated text piece by piece; bytes of a split character wait for the rest."""
    pending = b""
    for token in generate_ids(model, tokenizer.encode(prompt), params, use_cache, compiled=compiled):
        if token in params.stop_ids:
            break
        pending += tokenizer.decode_bytes([token])
        try:
            text = pending.decode("utf-8")
        except UnicodeDecodeError:
            if len(pending) < 8:  # a UTF-8 character is at most 4 bytes: wait for the rest
                continue
            text = pending.decode("utf-8", errors="replace")
        yield text
        pending = b""
    if pending:
        yield pending.decode("utf-8", errors="replace")


def generate_text(model, tokenizer, prompt: str, params: SamplingParams | None = None, use_cache: bool = True,
                  *, compiled: bool = False) -> str:
    """The prompt's continuation as one string (``prompt`` itself is not included)."""
    return "".join(stream_text(model, tokenizer, prompt, params or SamplingParams(), use_cache, compiled=compiled))

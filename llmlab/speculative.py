"""Speculative decoding: a small draft model guesses a few tokens, the big model checks them in one pass.

Taught in notebook 16 (making it fast).  Decoding one token at a time reads all
of the target model's weights per token.  Checking ``k`` proposed tokens costs
one forward pass over ``k + 1`` positions — about the price of one token, since
the weights are read once.  So:

1. the draft proposes ``d_1 .. d_k`` one by one (its own KV cache), remembering
   the probabilities ``q_i`` it drew them from;
2. the target runs once over the last accepted token and ``d_1 .. d_k`` (its KV
   cache), giving ``p_1 .. p_{k+1}``;
3. ``d_i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``, in order; at
   the first rejection the token is drawn from ``normalize(max(0, p_i - q_i))``
   instead, and the rest are dropped; if all ``k`` are accepted, a bonus token is
   drawn from ``p_{k+1}``;
4. both caches are cut back to the accepted length (``KVCache.truncate``).

Step 3 (Leviathan et al. 2023; Chen et al. 2023) makes every token distributed
*exactly* as if the target had sampled it alone, whatever the draft; a good draft
only makes it faster.  Greedy decoding (``temperature=0``) is the special case of
one-hot ``p`` and ``q``: a draft token is kept when it is the target's argmax, and
the output equals :func:`llmlab.generate.generate_ids` token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmlab.cache import KVCache
from llmlab.config import ModelConfig
from llmlab.errors import require_int
from llmlab.generate import GenerateError, check_request
from llmlab.sampling import SamplingParams, make_generator, next_token_probs

MAX_K = 64
"""Most draft tokens per round; beyond a few the acceptance of the last ones is tiny."""


class SpeculativeError(GenerateError):
    """A speculative-decoding request that cannot run (models that do not match, bad ``k``)."""


@dataclass
class SpeculativeResult:
    """The generated ids and how the drafting went (notebook 16)."""

    ids: list[int]
    """The new tokens (the prompt is not included), as ``generate_ids`` would give them."""
    proposed: int = 0
    """Draft tokens proposed."""
    accepted: int = 0
    """Draft tokens the target accepted."""
    target_passes: int = 0
    """Forward passes of the target (one per round, plus one per token once the context window slides)."""
    draft_passes: int = 0
    """Forward passes of the draft (one per proposed token)."""
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_pass(self) -> float:
        """New tokens per target forward pass: 1 without speculation, up to ``k + 1`` with a perfect draft."""
        return len(self.ids) / self.target_passes if self.target_passes else 0.0


def verify_drafts(draft_ids: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule, for a batch of rows: ``(n_accepted [B], next_id [B])`` (notebook 16).

    ``draft_ids`` ``[B, k]`` were drawn from ``q`` ``[B, k, V]``; ``p`` ``[B, k + 1, V]``
    is the target's distribution at the same positions plus one.  Draft ``i`` is kept
    while ``u_i < p_i(d_i) / q_i(d_i)`` (``u_i`` uniform in [0, 1)); the first rejected
    position draws from ``normalize(max(0, p - q))``, or from ``p_{k+1}`` when all were kept.
    """
    batch, k = draft_ids.shape
    rows = torch.arange(batch, device=p.device)
    if k:
        q_d = q.gather(-1, draft_ids[..., None])[..., 0]
        p_d = p[:, :k].gather(-1, draft_ids[..., None])[..., 0]
        u = torch.rand(batch, k, generator=generator, device=p.device)
        accepted = (u * q_d < p_d).long().cumprod(dim=-1).sum(dim=-1)
        q_next = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)[rows, accepted]
    else:
        accepted = torch.zeros(batch, dtype=torch.long, device=p.device)
        q_next = torch.zeros_like(p[:, 0])
    p_next = p[rows, accepted]
    residual = (p_next - q_next).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    # mass is 0 only if p == q at a rejected position, which happens with probability 0: fall back to p.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_next)
    next_id = torch.multinomial(residual, 1, generator=generator)[:, 0]
    return accepted, next_id


def check_pair(target: nn.Module, draft: nn.Module) -> None:
    """The draft must be an llmlab model with the target's vocabulary, on the same device."""
    for name, model in (("target", target), ("draft", draft)):
        if not isinstance(model, nn.Module) or not isinstance(getattr(model, "config", None), ModelConfig):
            raise SpeculativeError(f"{name} must be an llmlab Transformer, got {type(model).__name__}.")
    if target.config.vocab_size != draft.config.vocab_size:
        raise SpeculativeError(
            f"the draft's vocabulary ({draft.config.vocab_size:,} ids) differs from the target's "
            f"({target.config.vocab_size:,}): the draft must use the target's tokenizer, so that its token ids "
            "mean the same thing. Train the draft with the target's tokenizer (train_draft)."
        )
    target_device, draft_device = _device(target), _device(draft)
    if target_device != draft_device:
        raise SpeculativeError(f"the target is on {target_device} but the draft on {draft_device}: move them to "
                               "the same device.")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache(model: nn.Module, max_len: int) -> KVCache:
    parameter = next(model.parameters())
    return KVCache.for_model(model.config, 1, max_len=max(1, min(max_len, model.config.context_length)),
                             dtype=parameter.dtype, device=parameter.device)


def _propose(draft: nn.Module, cache: KVCache, ids: list[int], k: int, params: SamplingParams,
             generator: torch.Generator | None) -> tuple[list[int], torch.Tensor]:
    """``k`` draft tokens after ``ids`` and the ``[k, V]`` distributions they were drawn from."""
    device = _device(draft)
    tokens: list[int] = []
    dists = []
    for _ in range(k):
        feed = (ids + tokens)[cache.length:]
        logits = draft(torch.tensor([feed], device=device), cache=cache, logits_to_keep=1).logits[0, -1]
        q = next_token_probs(logits, params)
        tokens.append(int(torch.multinomial(q, 1, generator=generator)))
        dists.append(q)
    if not dists:
        return tokens, torch.zeros(0, draft.config.vocab_size, device=device)
    return tokens, torch.stack(dists)


def _target_probs(target: nn.Module, cache: KVCache, ids: list[int], drafts: list[int],
                  params: SamplingParams) -> torch.Tensor:
    """The target's ``[len(drafts) + 1, V]`` distributions after ``ids`` and after each draft token, in one pass."""
    feed = (ids + drafts)[cache.length:]
    logits = target(torch.tensor([feed], device=_device(target)), cache=cache, logits_to_keep=len(drafts) + 1).logits
    return next_token_probs(logits[0], params)


def _window_step(target: nn.Module, ids: list[int], params: SamplingParams,
                 generator: torch.Generator | None) -> int:
    """One plain token from the last ``context_length`` ids (the window has slid; as ``generate_ids`` does)."""
    window = torch.tensor([ids[-target.config.context_length:]], device=_device(target))
    p = next_token_probs(target(window, logits_to_keep=1).logits[0, -1], params)
    return int(torch.multinomial(p, 1, generator=generator))


@torch.no_grad()
def speculative_generate(target: nn.Module, draft: nn.Module, prompt_ids: Sequence[int], params: SamplingParams,
                         k: int = 4) -> SpeculativeResult:
    """Generate with ``target``, ``draft`` proposing ``k`` tokens per round (see the module docstring).

    The result's ``ids`` follow the same rules as ``generate_ids``: at most
    ``params.max_new_tokens``, ending at (and including) a stop id.  Sampling uses the
    same temperature / top-k / top-p for both models, seeded by ``params.seed``.
    While prompt + new tokens fit in both models' context, every round is one
    target pass; past the target's context the window slides and each token costs
    one full pass, without drafting.
    """
    check_request(target, [prompt_ids], params)
    check_pair(target, draft)
    k = require_int("k", k, minimum=1, maximum=MAX_K, error=SpeculativeError)
    ids = [int(t) for t in prompt_ids]
    budget = params.max_new_tokens
    generator = make_generator(params.seed, _device(target))
    stop = set(params.stop_ids)
    target_context, draft_context = target.config.context_length, draft.config.context_length
    target_cache = _cache(target, len(ids) + budget)
    draft_cache = _cache(draft, len(ids) + budget)
    result = SpeculativeResult(ids=[])
    training = [model for model in (target, draft) if model.training]
    for model in training:  # (only when needed: switching modes walks every submodule)
        model.eval()
    try:
        while len(result.ids) < budget:
            n = len(ids)
            if n > target_context:
                new = [_window_step(target, ids, params, generator)]
                result.target_passes += 1
            else:
                # room left: in the budget (the round's last token is the target's own), the target's
                # context (it stores n + k positions) and the draft's (n + k - 1)
                k_round = max(0, min(k, budget - len(result.ids) - 1, target_context - n, draft_context - n + 1))
                drafts, q = _propose(draft, draft_cache, ids, k_round, params, generator)
                p = _target_probs(target, target_cache, ids, drafts, params)
                accepted, next_id = verify_drafts(torch.tensor([drafts], dtype=torch.long, device=p.device),
                                                  q[None], p[None], generator)
                n_accepted = int(accepted[0])
                target_cache.truncate(n + n_accepted)
                draft_cache.truncate(min(draft_cache.length, n + n_accepted))
                new = drafts[:n_accepted] + [int(next_id[0])]
                result.rounds += 1
                result.target_passes += 1
                result.draft_passes += k_round
                result.proposed += k_round
                result.accepted += n_accepted
            for token in new:
                ids.append(token)
                result.ids.append(token)
                if token in stop:
                    return result
    finally:
        for model in training:
            model.train()
    return result


# --- a draft model for the course model -----------------------------------------------------------


def draft_config(target: ModelConfig, d_model: int = 64, n_layers: int = 2, n_heads: int = 2,
                 name: str = "course-draft") -> ModelConfig:
    """The target's config shrunk to a draft: same vocabulary and context, fewer and narrower layers."""
    if not isinstance(target, ModelConfig):
        raise SpeculativeError(f"target must be a ModelConfig (model.config), got {type(target).__name__}.")
    return target.replace(name=name, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=None,
                          head_dim=None, d_ff=None)


def train_draft(target: nn.Module, tokenizer, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 2,
                steps: int = 400, minutes: float | None = None, batch_size: int = 16, lr: float = 3e-3,
                seed: int = 0, progress: bool = False, text: str | None = None) -> nn.Module:
    """Train a small draft for ``target`` on tiny Shakespeare with the target's tokenizer (notebook 16).

    Same recipe as the course model (``llmlab.train``), a much smaller network:
    the default (2 layers of width 64, ~0.2M parameters) trains in a few minutes on a
    laptop's CPU.  ``minutes`` caps the wall-clock time.  Returns the draft in eval mode.
    """
    from llmlab.data import load_corpus
    from llmlab.model import Transformer
    from llmlab.train import Trainer, TrainConfig

    config = draft_config(target.config, d_model, n_layers, n_heads)
    if tokenizer.vocab_size != config.vocab_size:
        raise SpeculativeError(f"the tokenizer has {tokenizer.vocab_size:,} ids but the target's vocabulary is "
                               f"{config.vocab_size:,}: use the target's own tokenizer.")
    torch.manual_seed(seed)
    model = Transformer(config)
    ids = torch.tensor(tokenizer.encode(load_corpus() if text is None else text), dtype=torch.long)
    train_config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10,
                               warmup_steps=min(50, steps // 10), eval_every=max(1, steps // 4), eval_batches=4,
                               seed=seed, max_minutes=minutes)
    Trainer(model, tokenizer, ids, train_config).fit(progress=progress)
    return model.eval()

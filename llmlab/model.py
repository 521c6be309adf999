"""The decoder-only Transformer, assembled from ``llmlab.layers``.

Taught in notebook 06 (decoder block / full model):

    ids [batch, seq]
      -> token embedding (+ positions, unless RoPE does it inside attention)
      -> N x DecoderBlock
      -> final norm
      -> lm_head: one score (logit) per vocabulary entry, for every position
      -> logits [batch, seq, vocab_size]

With ``targets`` the model also returns the next-token cross-entropy loss
(notebook 07 trains with it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.cache import KVCache
from llmlab.config import ConfigError, ModelConfig, get_config
from llmlab.errors import LlmlabError
from llmlab.layers.block import DecoderBlock
from llmlab.layers.embedding import TokenEmbedding
from llmlab.layers.norm import make_norm
from llmlab.layers.positional import LearnedPositions, RotaryEmbedding, SinusoidalPositions

IGNORE_INDEX = -100
"""Targets equal to this are left out of the loss (padding, prompt tokens)."""

INIT_STD = 0.02
"""Standard deviation of the initial weights (as GPT-2)."""


class ModelInputError(LlmlabError, ValueError):
    """Input the model cannot take (wrong shape, empty, wrong device); the message says how to fix it."""


class ModelInputTypeError(ModelInputError, TypeError):
    """Input of the wrong type (not a tensor, or not integer ids); also a TypeError."""


class ContextLengthError(ModelInputError):
    """A sequence (or a position) beyond the model's ``context_length``."""


class ModelSizeError(LlmlabError, RuntimeError):
    """A config too large to build here (its weights do not fit in this machine's memory)."""


@dataclass
class ModelOutput:
    """What ``Transformer.forward`` returns (notebook 06).

    ``logits``: ``[batch, seq, vocab_size]``; ``loss``: a scalar when targets
    were given; ``attentions``: one ``[batch, heads, seq, seq]`` tensor per
    layer when ``return_attention=True``.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class Transformer(nn.Module):
    """A decoder-only language model built from a ``ModelConfig`` (notebook 06)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        _check_buildable(config)
        self.config = config
        self.token_embedding = TokenEmbedding(config.vocab_size, config.d_model)
        self.position_embedding = _make_positions(config)
        # RoPE tables are the same for every layer: build them once and share them.
        rope = None
        if config.positional == "rope":
            rope = RotaryEmbedding.from_config(config)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(config, rope=rope) for _ in range(config.n_layers))
        for index, block in enumerate(self.blocks):
            block.attn.layer_idx = index
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(_init_weights)
        _scale_residual_projections(self, config.n_layers)
        if config.tie_embeddings:  # one matrix both reads tokens in and scores them out
            self.lm_head.weight = self.token_embedding.weight

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Transformer:
        """``Transformer(get_config(name, **overrides))``, e.g. ``Transformer.from_preset("course-tiny")``."""
        return cls(get_config(name, **overrides))

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        return_attention: bool = False,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> ModelOutput:
        """Logits for every position of ``ids`` (``[batch, seq]`` token ids), and the loss if ``targets``.

        ``targets`` has the shape of ``ids`` (usually ``ids`` shifted left by
        one); entries equal to -100 are ignored.  ``positions`` defaults to
        ``0..seq-1`` — after the positions already in ``cache``, if one is given
        (notebook 09: the cache stores every layer's keys and values, so only
        the new tokens are computed).  ``attention_mask`` ``[batch, n_keys]``
        (1 = real token, 0 = padding) covers the cached and the new positions.
        ``logits_to_keep=n`` computes logits for the last ``n`` positions only (0: all):
        generating needs just the last one, and for a long prompt the LM head over
        every position costs as much as several layers (notebook 11).  A 1-D tensor
        of positions keeps exactly those (as ``transformers`` does): the serving engine
        packs many sequences into one row and needs each one's last token.
        """
        self._check_ids(ids, packed=positions is not None)
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        self._check_positions(positions, ids)
        n_keys = ids.shape[1] if cache is None else cache.n_keys(ids.shape[1])
        if attention_mask is not None and attention_mask.shape != (ids.shape[0], n_keys):
            raise ValueError(f"attention_mask must have shape [batch, cached + new] = "
                             f"{(ids.shape[0], n_keys)}, got {tuple(attention_mask.shape)}.")
        x = self.token_embedding(ids)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        x = self.dropout(x)
        attentions = []
        for block in self.blocks:
            x, weights = block(x, positions=positions, return_weights=return_attention, cache=cache,
                               key_mask=attention_mask)
            attentions.append(weights)
        if cache is not None:
            cache.advance(ids.shape[1])
        if isinstance(logits_to_keep, torch.Tensor) or logits_to_keep:
            if targets is not None:
                raise ModelInputError("logits_to_keep computes only some logits; the loss needs all of them.")
            x = x[:, logits_to_keep] if isinstance(logits_to_keep, torch.Tensor) else x[:, -logits_to_keep:]
        logits = self.lm_head(self.final_norm(x))
        loss = None if targets is None else self.loss(logits, targets)
        return ModelOutput(logits, loss, tuple(attentions) if return_attention else None)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` ``[batch, seq, vocab]`` against ``targets`` ``[batch, seq]``."""
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"targets must have the shape of ids, {tuple(logits.shape[:-1])}; got {tuple(targets.shape)}."
            )
        return F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten().long(), ignore_index=IGNORE_INDEX
        )

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters (a tied LM head is counted once) (notebook 06).

        ``non_embedding=True`` leaves out the token embedding, learned positions
        and an untied LM head: the convention of the scaling-law papers, and
        the ``non_embedding`` figure of ``llmlab.calc.param_counts``.
        """
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.token_embedding.weight.numel()
            if isinstance(self.position_embedding, LearnedPositions):
                total -= self.position_embedding.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    # --- input checks with messages that say what to do ---------------------------------

    def _check_ids(self, ids: torch.Tensor, packed: bool = False) -> None:
        """Integer ids ``[batch, seq]`` on the model's device; without explicit positions, at most the context.

        With ``packed`` (positions given) a row may hold several sequences side by side,
        as the serving engine packs them (notebook 11): the positions are checked instead.
        """
        if not isinstance(ids, torch.Tensor):
            raise ModelInputTypeError(f"ids must be a torch.Tensor of token ids, got {type(ids).__name__}; "
                                      "wrap it: torch.tensor([[...]]).")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ModelInputTypeError(f"ids must be integer token ids (torch.long), got dtype {ids.dtype}; "
                                      "use ids.long() if they are whole numbers stored as floats.")
        if ids.dim() != 2:
            raise ModelInputError(f"ids must have shape [batch, seq], got shape {tuple(ids.shape)}; "
                                  "for a single sequence use ids.unsqueeze(0).")
        if ids.shape[1] == 0:
            raise ModelInputError("ids is empty (seq length 0): give the model at least one token.")
        weights = self.token_embedding.weight
        if ids.device != weights.device and weights.device.type != "meta":
            raise ModelInputError(f"ids are on {ids.device} but the model is on {weights.device}: move them with "
                                  f"ids.to('{weights.device}').")
        limit = self.config.context_length
        if ids.shape[1] > limit and not packed:
            raise ContextLengthError(
                f"sequence of {ids.shape[1]} tokens is longer than context_length={limit}: "
                f"keep the last {limit} tokens (ids[:, -{limit}:]) or build the model with a larger "
                "context_length."
            )

    def _check_positions(self, positions: torch.Tensor, ids: torch.Tensor) -> None:
        if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
            what = f"dtype {positions.dtype}" if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise ModelInputTypeError(f"positions must be a tensor of integer positions (torch.long), got {what}; "
                                      "leave positions=None to number the tokens 0, 1, 2, ...")
        if positions.shape not in (ids.shape[1:], ids.shape):
            raise ModelInputError(f"positions must have shape [seq] or [batch, seq] = {tuple(ids.shape)}, "
                                  f"got {tuple(positions.shape)}.")
        if torch.compiler.is_compiling():  # reading values would split a compiled graph; eager calls check
            return
        if int(positions.max()) >= self.config.context_length or int(positions.min()) < 0:
            raise ContextLengthError(
                f"positions must be in 0..{self.config.context_length - 1} (context_length="
                f"{self.config.context_length}), got up to {int(positions.max())}: truncate the "
                "sequence or raise context_length."
            )


def _check_buildable(config: ModelConfig) -> None:
    """A ModelConfig whose fp32 weights fit in this machine's memory (checked before allocating any).

    Building on the ``meta`` device (shapes only) or on a GPU is not limited here.
    """
    if not isinstance(config, ModelConfig):
        hint = (f" use Transformer.from_preset({config!r})" if isinstance(config, str)
                else " build one with get_config('course-tiny') or ModelConfig(...)")
        raise ConfigError(f"Transformer() needs a ModelConfig, got {type(config).__name__};{hint}.")
    if torch.get_default_device().type != "cpu" or not hasattr(os, "sysconf"):
        return
    from llmlab.calc import human_bytes, param_counts

    needed = param_counts(config)["total"] * torch.get_default_dtype().itemsize
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    if needed > memory:
        raise ModelSizeError(
            f"config {config.name!r} has {param_counts(config)['total']:,} parameters: {human_bytes(needed)} of "
            f"weights, more than this machine's {human_bytes(memory)} of memory. Size it without building it "
            "(llmlab.calc), build it on the meta device (with torch.device('meta'): ...), or shrink the config."
        )


def _make_positions(config: ModelConfig) -> nn.Module | None:
    """The module that adds positions to the embeddings (None for RoPE, which works inside attention)."""
    if config.positional == "learned":
        return LearnedPositions(config.context_length, config.d_model)
    if config.positional == "sinusoidal":
        return SinusoidalPositions(config.context_length, config.d_model)
    return None


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialization: weights ~ N(0, 0.02), biases 0 (norms keep weight 1, bias 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _scale_residual_projections(model: Transformer, n_layers: int) -> None:
    """Scale the layers that write into the residual stream by 1/sqrt(2 * n_layers), as GPT-2.

    Each block adds two branches to the stream; without the scaling its
    variance would grow with depth.
    """
    std = INIT_STD / math.sqrt(2 * n_layers)
    for block in model.blocks:
        nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=std)
        nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=std)

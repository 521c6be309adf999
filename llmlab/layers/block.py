"""One decoder block: attention and MLP, each in a pre-norm residual branch.

Taught in notebook 06 (decoder block / full model).

    x = x + attn(norm1(x))     tokens exchange information
    x = x + mlp(norm2(x))      each token is transformed on its own

The residual stream ``x`` keeps its shape ``[batch, seq, d_model]`` through
every block, which is what makes blocks stackable.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.cache import KVCache
from llmlab.config import ModelConfig
from llmlab.layers.attention import CausalSelfAttention
from llmlab.layers.mlp import make_mlp
from llmlab.layers.norm import make_norm
from llmlab.layers.positional import RotaryEmbedding


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (notebook 06)."""

    def __init__(self, config: ModelConfig, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config, rope=rope)
        self.norm2 = make_norm(config)
        self.mlp = make_mlp(config)
        self.dropout = nn.Dropout(config.dropout)  # on each branch, before it joins the stream

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        return_weights: bool = False,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[batch, seq, d_model]`` -> ``(same shape, attention weights or None)``; see the attention's arguments."""
        attn_out, weights = self.attn(self.norm1(x), positions=positions, return_weights=return_weights,
                                      cache=cache, key_mask=key_mask)
        x = x + self.dropout(attn_out)
        x = x + self.dropout(self.mlp(self.norm2(x)))
        return x, weights

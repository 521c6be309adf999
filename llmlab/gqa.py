"""Turning a multi-head (MHA) model into a grouped-query (GQA) or multi-query (MQA) one.

Taught in notebook 10 (GQA).  GQA lets ``n_heads / n_kv_heads`` query heads
share one key/value head, so the KV cache shrinks by that factor.  The GQA
paper (Ainslie et al., 2023) converts an MHA checkpoint by **mean-pooling**
the key and value projections of the heads in each group, then "uptrains"
briefly to recover quality.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.model import Transformer


def mean_pool_heads(weight: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Average a projection's rows head-group by head-group: ``[n_heads·d, ...]`` → ``[n_kv_heads·d, ...]``.

    Works for weights ``[n_heads·head_dim, d_model]`` and biases ``[n_heads·head_dim]``.
    Query heads ``g·r … g·r + r − 1`` (``r = n_heads / n_kv_heads``) form group ``g``,
    the same grouping attention uses when it shares K/V heads.
    """
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}.")
    head_dim = weight.shape[0] // n_heads
    grouped = weight.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim, *weight.shape[1:])
    return grouped.mean(dim=1).reshape(n_kv_heads * head_dim, *weight.shape[1:])


@torch.no_grad()
def convert_to_gqa(model: Transformer, n_kv_heads: int) -> Transformer:
    """A new model with ``n_kv_heads`` key/value heads, its K/V projections mean-pooled from ``model``.

    Everything else (queries, outputs, MLPs, norms, embeddings) is copied
    unchanged.  ``n_kv_heads == n_heads`` gives an exact copy; 1 gives MQA.
    """
    config = model.config
    if config.n_kv_heads != config.n_heads:
        raise ValueError(
            f"the model already shares K/V heads (n_kv_heads={config.n_kv_heads}); convert from an MHA model "
            f"(n_kv_heads == n_heads == {config.n_heads})."
        )
    converted = Transformer(config.replace(n_kv_heads=n_kv_heads)).to(next(model.parameters()).device)
    state = model.state_dict()
    for index in range(config.n_layers):
        for name in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                key = f"blocks.{index}.attn.{name}.{kind}"
                if key in state:
                    state[key] = mean_pool_heads(state[key], config.n_heads, n_kv_heads)
    converted.load_state_dict(state)
    return converted.eval() if not model.training else converted


def kv_parameters(model: nn.Module) -> int:
    """Parameters in the key and value projections (what GQA shrinks besides the cache)."""
    return sum(p.numel() for name, p in model.named_parameters() if ".k_proj." in name or ".v_proj." in name)

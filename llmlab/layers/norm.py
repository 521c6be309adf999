"""Normalization: LayerNorm (GPT-2) and RMSNorm (Llama, Qwen).

Taught in notebook 06 (decoder block).  Each keeps the activations of one
token at a steady scale, which is what lets dozens of blocks be stacked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.config import ModelConfig


class LayerNorm(nn.Module):
    """Layer normalization over the last dimension (notebook 06).

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias

    (``var`` is the biased variance, as in ``nn.LayerNorm``; ``bias`` is
    optional, since some models drop it.)
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Root-mean-square normalization: no mean subtraction, no bias (notebook 06).

    y = x / sqrt(mean(x^2) + eps) * weight

    Computed in float32 whatever the input dtype (as Llama and Qwen do), then
    cast back before the weight is applied.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The norm ``config.norm`` asks for, over ``dim`` (default ``d_model``) features (notebook 06)."""
    dim = config.d_model if dim is None else dim
    if config.norm == "layernorm":
        return LayerNorm(dim, eps=config.norm_eps, bias=config.bias)
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=config.norm_eps)
    raise ValueError(f"unknown norm {config.norm!r}; use 'layernorm' or 'rmsnorm'.")

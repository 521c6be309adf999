"""The feed-forward network (FFN / MLP) of each block: GELU or ReLU, and SwiGLU.

Taught in notebook 06 (decoder block).  Attention mixes information *between*
tokens; the MLP then transforms each token on its own: widen to ``d_ff``
(4 x d_model in GPT-2), apply a nonlinearity, narrow back to ``d_model``.
Most of a model's parameters live here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.config import ModelConfig


class MLP(nn.Module):
    """``down_proj(act(up_proj(x)))``: d_model -> d_ff -> d_model (notebook 06).

    ``act`` is GELU with the tanh approximation (as GPT-2) or ReLU (as the
    original Transformer).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        if config.mlp == "gelu":
            self.act: nn.Module = nn.GELU(approximate="tanh")
        elif config.mlp == "relu":
            self.act = nn.ReLU()
        else:
            raise ValueError(f"MLP handles mlp='gelu' or 'relu', got {config.mlp!r} (use SwiGLU).")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, the gated MLP of Llama and Qwen (notebook 06).

    Three matrices instead of two, so Llama-style models use ``d_ff`` of about
    ``8/3 * d_model`` to spend the same parameters as a 4x GELU MLP.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_mlp(config: ModelConfig) -> nn.Module:
    """The MLP ``config.mlp`` asks for: ``SwiGLU`` for "swiglu", else ``MLP`` (notebook 06)."""
    return SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

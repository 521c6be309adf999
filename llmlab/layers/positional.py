"""Positional information: sinusoidal, learned, and rotary (RoPE).

Taught in notebook 03 (positions).  Self-attention on its own cannot tell
"the sky is clear" from "clear is the sky"; these modules put the position
back.  Sinusoidal and learned positions are *added* to the token embeddings;
RoPE instead *rotates* queries and keys inside attention (notebook 04 uses it).

Every module here takes the positions explicitly (a LongTensor), so that a
KV-cache decoder can ask for one new position at a time.  Notebook 14 (real
pretrained checkpoints) adds RoPE scaling, which stretches a trained model to a
longer context (``"linear"``, and Llama 3.1's ``"llama3"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmlab.errors import LlmlabError

if TYPE_CHECKING:  # pragma: no cover - only for the annotation
    from llmlab.config import ModelConfig


class PositionError(LlmlabError, ValueError):
    """A position outside the table (``0 .. max_positions - 1``), or positions that are not integers."""


class PositionTypeError(PositionError, TypeError):
    """Positions that are not an integer tensor (also a TypeError)."""


def check_positions(positions: torch.Tensor, max_positions: int) -> None:
    """Raise ``PositionError`` if a position is not an integer in ``0 .. max_positions - 1`` (notebook 03)."""
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        what = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise PositionTypeError(f"positions must be an integer tensor (torch.long), got {what}.")
    if torch.compiler.is_compiling():  # reading values would split a compiled graph; eager calls check
        return
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= max_positions):
        raise PositionError(
            f"positions must be in 0..{max_positions - 1} (the table has {max_positions} rows, one "
            f"per position up to context_length); got {int(positions.min())}..{int(positions.max())}. "
            "Truncate the sequence or raise context_length."
        )


# --- sinusoidal (fixed) ------------------------------------------------------------------


def sinusoidal_table(n_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need", shape ``[n_positions, dim]`` (notebook 03).

    PE[pos, 2i]   = sin(pos / base^(2i / dim))
    PE[pos, 2i+1] = cos(pos / base^(2i / dim))

    Low dimensions turn fast (short wavelengths), high dimensions slowly.
    """
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]  # [n_positions, 1]
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)  # 0, 2, 4, ...
    angle = position / base ** (two_i / dim)  # [n_positions, ceil(dim / 2)]
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : dim // 2])  # an odd dim has one sin column more
    return table.float()


class SinusoidalPositions(nn.Module):
    """Look up rows of ``sinusoidal_table``: no parameters, nothing to learn (notebook 03)."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        # Not saved in checkpoints (persistent=False): it is recomputed from the formula.
        self.register_buffer("table", sinusoidal_table(max_positions, dim), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """``[*positions.shape, dim]`` position vectors, to add to the token embeddings."""
        check_positions(positions, self.max_positions)
        return self.table[positions]


class LearnedPositions(nn.Embedding):
    """One trained vector per position, as in GPT-2: a ``[max_positions, dim]`` table (notebook 03)."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__(max_positions, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """``[*positions.shape, dim]`` position vectors, to add to the token embeddings."""
        check_positions(positions, self.num_embeddings)
        return super().forward(positions)


# --- rotary (RoPE) ------------------------------------------------------------------------


def rope_inverse_frequencies(head_dim: int, theta: float = 10000.0,
                             scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """How fast each of RoPE's ``head_dim / 2`` pairs turns: radians per position, ``[head_dim / 2]`` (notebook 03).

    Pair ``i`` turns at ``theta^(-2i / head_dim)``.  ``scaling`` (``ModelConfig.rope_scaling``,
    notebook 14) stretches the slow pairs so that a model trained on a short context reads a
    longer one: ``"linear"`` divides every frequency by ``factor``; ``"llama3"`` (Llama 3.1 and
    later) divides only the pairs whose wavelength is longer than the original context over
    ``low_freq_factor``, keeps those shorter than it over ``high_freq_factor``, and blends the
    ones between, as Meta's reference code does.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is None:
        return inv_freq
    kind, factor = scaling.get("rope_type"), scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"unknown rope_scaling type {kind!r}: llmlab computes 'linear' and 'llama3'.")
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    long_waves = wavelength > original / low  # slow pairs: stretched by the whole factor
    scaled = torch.where(long_waves, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)  # 0 at the long end of the band, 1 at the short end
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = ~(wavelength < original / high) & ~long_waves
    return torch.where(in_between, blended, scaled)


def rope_frequencies(
    head_dim: int, max_positions: int, theta: float = 10000.0, scaling: Mapping[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin tables, each ``[max_positions, head_dim]`` (notebook 03).

    Pair ``i`` (of ``head_dim / 2`` pairs) turns at frequency
    ``theta^(-2i / head_dim)`` (changed by ``scaling``: see :func:`rope_inverse_frequencies`);
    at position ``m`` its angle is ``m * freq_i``.
    Layout is the Hugging Face / Llama "half-split" one: the angle of pair ``i``
    sits in columns ``i`` and ``i + head_dim / 2`` (``cat([angles, angles])``),
    because pair ``i`` is made of dimensions ``i`` and ``i + head_dim / 2``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim (it rotates pairs), got {head_dim}.")
    inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_positions).float(), inv_freq)  # [max_positions, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # [max_positions, head_dim]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension: a 90-degree turn of every pair (notebook 03)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Rotate queries or keys ``x`` (``[batch, heads, seq, head_dim]``) by their positions (notebook 03).

    ``positions`` is ``[seq]`` (shared by the batch) or ``[batch, seq]``.
    Each pair ``(x[i], x[i + head_dim/2])`` is turned by angle ``position * freq_i``:
    ``x * cos + rotate_half(x) * sin``, the convention of Hugging Face's Llama.
    """
    cos, sin = cos[positions], sin[positions]  # [seq, head_dim] or [batch, seq, head_dim]
    if positions.dim() == 1:
        cos, sin = cos[None, None], sin[None, None]  # broadcast over batch and heads
    else:
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Holds RoPE's cos/sin tables and rotates queries and keys (notebooks 03 and 04).

    One instance can be shared by every attention layer of a model (the tables
    do not depend on the layer).  The tables are buffers that are not saved in
    checkpoints: they follow from ``head_dim``, ``max_positions``, ``theta`` and ``scaling``.
    """

    @classmethod
    def from_config(cls, config: ModelConfig) -> RotaryEmbedding:
        """The rotary embedding a ``ModelConfig`` with ``positional="rope"`` asks for (its tables on the default device)."""
        return cls(config.head_dim, config.context_length, config.rope_theta, config.rope_scaling)

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0,
                 scaling: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.max_positions = max_positions
        cos, sin = rope_frequencies(head_dim, max_positions, theta, scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x`` (``[batch, heads, seq, head_dim]``) rotated by ``positions``."""
        check_positions(positions, self.max_positions)
        return apply_rope(x, self.cos, self.sin, positions)

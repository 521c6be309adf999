"""The building blocks of a decoder-only Transformer, one concept per module.

- ``embedding``  token id -> vector (notebook 02)
- ``positional`` sinusoidal, learned and rotary positions (notebook 03)
- ``attention``  causal self-attention, MHA/GQA/MQA (notebooks 04 and 05)
- ``norm``       LayerNorm and RMSNorm (notebook 06)
- ``mlp``        GELU/ReLU MLP and SwiGLU (notebook 06)
- ``block``      the pre-norm decoder block (notebook 06)
"""

from llmlab.layers.attention import (
    CausalSelfAttention,
    causal_mask,
    repeat_kv,
    scaled_dot_product_attention_reference,
)
from llmlab.layers.block import DecoderBlock
from llmlab.layers.embedding import TokenEmbedding, TokenIdError, check_token_ids
from llmlab.layers.mlp import MLP, SwiGLU, make_mlp
from llmlab.layers.norm import LayerNorm, RMSNorm, make_norm
from llmlab.layers.positional import (
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    apply_rope,
    check_positions,
    rope_frequencies,
    rope_inverse_frequencies,
    rotate_half,
    sinusoidal_table,
)

__all__ = [
    "CausalSelfAttention",
    "DecoderBlock",
    "LayerNorm",
    "LearnedPositions",
    "MLP",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "SwiGLU",
    "TokenEmbedding",
    "TokenIdError",
    "apply_rope",
    "causal_mask",
    "check_positions",
    "check_token_ids",
    "make_mlp",
    "make_norm",
    "repeat_kv",
    "rope_frequencies",
    "rope_inverse_frequencies",
    "rotate_half",
    "scaled_dot_product_attention_reference",
    "sinusoidal_table",
]

"""Calculators for the infrastructure lens: parameters, FLOPs, bytes.

Taught alongside notebooks 02-06 (each notebook sizes the part it built) and
used by every later one.  Everything here is plain Python arithmetic on a
``ModelConfig``: no tensors are allocated, so GPT-3 175B or Llama-3-70B is
sized instantly.  ``param_counts`` agrees exactly with ``llmlab.model.Transformer``
(the tests check it).
"""

from __future__ import annotations

from llmlab.config import ModelConfig

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}
"""Bytes per stored value for each number format."""


# --- parameters ---------------------------------------------------------------------------


def linear_params(n_in: int, n_out: int, bias: bool) -> int:
    """A Linear layer: an ``n_in x n_out`` matrix, plus ``n_out`` biases (notebook 04)."""
    return n_in * n_out + (n_out if bias else 0)


def norm_params(config: ModelConfig, dim: int | None = None) -> int:
    """One norm layer over ``dim`` features: LayerNorm has weight (+ bias), RMSNorm a weight (notebook 06)."""
    dim = config.d_model if dim is None else dim
    if config.norm == "layernorm" and config.bias:
        return 2 * dim
    return dim


def attention_params(config: ModelConfig) -> int:
    """One attention layer: Q, K, V, O projections (+ Qwen3's per-head QK RMSNorms) (notebook 04).

    With GQA the K and V projections are narrower: ``d_model x (n_kv_heads * head_dim)``.
    """
    d, bias = config.d_model, config.bias
    q = linear_params(d, config.attention_dim, bias)
    kv = 2 * linear_params(d, config.kv_dim, bias)
    o = linear_params(config.attention_dim, d, bias)
    return q + kv + o + qk_norm_params(config)


def qk_norm_params(config: ModelConfig) -> int:
    """Qwen3's RMSNorm on queries and on keys: ``2 x head_dim`` weights per layer, else 0 (notebook 04)."""
    return 2 * config.head_dim if config.qk_norm else 0


def mlp_params(config: ModelConfig, include_bias: bool = True) -> int:
    """One MLP: ``2 x d_model x d_ff`` (GELU/ReLU) or ``3 x d_model x d_ff`` (SwiGLU) (notebook 06).

    ``include_bias=False`` gives the weight matrices alone, the figure usually
    quoted (GPT-3: 2 x 12,288 x 49,152 = 1,207,959,552).
    """
    bias = config.bias and include_bias
    d, d_ff = config.d_model, config.d_ff
    if config.mlp == "swiglu":
        return 2 * linear_params(d, d_ff, bias) + linear_params(d_ff, d, bias)
    return linear_params(d, d_ff, bias) + linear_params(d_ff, d, bias)


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters per component and in total, exactly as ``Transformer(config)`` has them (notebook 06).

    Keys: ``embedding``, ``positional`` (learned positions only), ``attention``,
    ``mlp``, ``norms`` (all blocks' norms plus the final norm), ``lm_head``
    (0 when tied to the embedding), ``total``, ``non_embedding`` (total minus
    embedding, positional and an untied LM head), and per block: ``block``,
    ``block_attention``, ``block_qk_norm`` (inside ``block_attention``),
    ``block_mlp``, ``block_mlp_no_bias``, ``block_norms``, plus ``final_norm``.
    """
    embedding = config.vocab_size * config.d_model
    positional = config.context_length * config.d_model if config.positional == "learned" else 0
    lm_head = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    block_attention = attention_params(config)
    block_mlp = mlp_params(config)
    block_norms = 2 * norm_params(config)
    block = block_attention + block_mlp + block_norms
    final_norm = norm_params(config)
    total = embedding + positional + config.n_layers * block + final_norm + lm_head
    return {
        "embedding": embedding,
        "positional": positional,
        "attention": config.n_layers * block_attention,
        "mlp": config.n_layers * block_mlp,
        "norms": config.n_layers * block_norms + final_norm,
        "lm_head": lm_head,
        "total": total,
        "non_embedding": total - embedding - positional - lm_head,
        "block": block,
        "block_attention": block_attention,
        "block_qk_norm": qk_norm_params(config),
        "block_mlp": block_mlp,
        "block_mlp_no_bias": mlp_params(config, include_bias=False),
        "block_norms": block_norms,
        "final_norm": final_norm,
    }


# --- FLOPs --------------------------------------------------------------------------------


def flops_per_token(config: ModelConfig, context: int | None = None, include_lm_head: bool = False) -> int:
    """Forward-pass FLOPs for one token, Kaplan et al. (2020) convention (notebook 06).

        2 * N  +  2 * n_layers * context * (n_heads * head_dim)

    - ``N`` is ``param_counts(config)["non_embedding"]`` (every block's weights,
      biases and norms; not the embedding, learned positions or LM head).  Each
      weight does one multiply and one add per token: 2 FLOPs.
    - The second term is attention over the context: for a token that sees
      ``t`` earlier tokens, Q.K^T and weights.V each cost ``2 * t * n_heads *
      head_dim`` FLOPs; averaged over a causal window of ``context`` tokens
      (``t`` ~ context / 2) the two together give ``2 * context * n_heads * head_dim``
      per layer.  ``context`` defaults to ``config.context_length``.
    - ``include_lm_head=True`` adds ``2 * d_model * vocab_size`` for the final
      projection to logits, which Kaplan et al. leave out and which matters for
      small models with big vocabularies.

    Softmax, norms' arithmetic and activations are ignored (a few percent at most).
    """
    context = config.context_length if context is None else context
    flops = 2 * param_counts(config)["non_embedding"]
    flops += 2 * config.n_layers * context * config.attention_dim
    if include_lm_head:
        flops += 2 * config.d_model * config.vocab_size
    return flops


def training_flops_per_token(
    config: ModelConfig, context: int | None = None, include_lm_head: bool = False
) -> int:
    """Training FLOPs per token: forward + backward ~ 3 x forward (backward costs about 2 x forward)."""
    return 3 * flops_per_token(config, context, include_lm_head)


def training_flops(config: ModelConfig, n_tokens: int, context: int | None = None) -> int:
    """Total training FLOPs for ``n_tokens`` tokens (~ 6 x parameters x tokens)."""
    return n_tokens * training_flops_per_token(config, context)


# --- bytes --------------------------------------------------------------------------------


def dtype_bytes(dtype: str) -> float:
    """Bytes per value of ``dtype`` ("fp32", "fp16", "bf16", "int8", "int4")."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}.")
    return DTYPE_BYTES[dtype]


def weight_bytes(config: ModelConfig | int, dtype: str = "bf16") -> float:
    """Bytes to hold all weights in ``dtype`` (notebook 06).

    ``config`` may also be a plain parameter count: ``weight_bytes(175e9, "fp16")``
    is the textbook 350 GB.
    """
    n = param_counts(config)["total"] if isinstance(config, ModelConfig) else config
    return n * dtype_bytes(dtype)


# --- formatting ---------------------------------------------------------------------------

_DECIMAL = ["B", "kB", "MB", "GB", "TB", "PB", "EB"]
_BINARY = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]


def human_bytes(n: float, binary: bool = False, digits: int = 1) -> str:
    """``350e9`` -> "350.0 GB" (powers of 1000), or with ``binary=True`` "326.0 GiB" (powers of 1024)."""
    step, units = (1024, _BINARY) if binary else (1000, _DECIMAL)
    value, unit = float(n), units[0]
    for unit in units:
        if abs(value) < step or unit == units[-1]:
            break
        value /= step
    if unit == "B":
        return f"{value:g} B"
    return f"{value:.{digits}f} {unit}"


def human_count(n: float, digits: int = 1) -> str:
    """``124_439_808`` -> "124.4M"; also K (thousand), B (billion), T (trillion)."""
    value = float(n)
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.{digits}f}{unit}"
    return f"{value:g}"

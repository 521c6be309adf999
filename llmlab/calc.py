"""Calculators for the infrastructure lens: parameters, FLOPs, bytes.

Taught alongside notebooks 02-06 (each notebook sizes the part it built) and
used by every later one.  Everything here is plain Python arithmetic on a
``ModelConfig``: no tensors are allocated, so GPT-3 175B or Llama-3-70B is
sized instantly.  ``param_counts`` agrees exactly with ``llmlab.model.Transformer``
(the tests check it).

Every public function checks its inputs at the boundary (see the end of the
module): a config must be a ``ModelConfig`` (or a preset name such as
``"llama3-8b"``), counts of tokens and sequences are integers ≥ 0, memory is a
positive finite number, and so on; anything else raises :class:`CalcError`
naming the argument and what it accepts.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from numbers import Real
from typing import Any

from llmlab.config import ModelConfig, get_config
from llmlab.errors import LlmlabError, require_finite, require_int

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}
"""Bytes per stored value for each number format."""


class CalcError(LlmlabError, ValueError):
    """A calculator was given an argument it cannot size (the message names it and what it accepts)."""


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
    qkv_bias = bias or config.qkv_bias  # Qwen2: biases on Q, K and V only
    q = linear_params(d, config.attention_dim, qkv_bias)
    kv = 2 * linear_params(d, config.kv_dim, qkv_bias)
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
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CalcError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}.")
    return DTYPE_BYTES[dtype]


def weight_bytes(config: ModelConfig | int, dtype: str = "bf16") -> float:
    """Bytes to hold all weights in ``dtype`` (notebook 06).

    ``config`` may also be a plain parameter count: ``weight_bytes(175e9, "fp16")``
    is the textbook 350 GB.
    """
    n = param_counts(config)["total"] if isinstance(config, ModelConfig) else config
    return n * dtype_bytes(dtype)


# --- KV cache (notebooks 09 and 10) ----------------------------------------------------------


def kv_bytes_per_token(config: ModelConfig, dtype: str = "bf16") -> float:
    """Bytes of K and V that one token adds to the cache, over all layers (notebook 09).

        2 (K and V) × n_layers × n_kv_heads × head_dim × bytes per value

    GPT-2 124M in fp16: 2 × 12 × 12 × 64 × 2 = 36,864 bytes.
    """
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype_bytes(dtype)


def kv_cache_bytes(config: ModelConfig, batch: int = 1, tokens: int | None = None, dtype: str = "bf16") -> float:
    """KV-cache bytes = 2 × batch × tokens × layers × kv_heads × head_dim × bytes per value (notebook 09).

    ``tokens`` defaults to the full context length.
    """
    tokens = config.context_length if tokens is None else tokens
    if batch < 0 or tokens < 0:
        raise ValueError(f"batch and tokens must be ≥ 0, got batch={batch}, tokens={tokens}.")
    return batch * tokens * kv_bytes_per_token(config, dtype)


def max_concurrent_sequences(
    config: ModelConfig,
    gpu_bytes: float,
    seq_len: int,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    reserve_fraction: float = 0.1,
    n_gpus: int = 1,
) -> int:
    """How many sequences of ``seq_len`` tokens fit next to the weights (notebook 09's capacity planner).

    Memory = ``n_gpus × gpu_bytes``, minus ``reserve_fraction`` of it for
    activations and the runtime, minus the weights; what is left holds KV
    caches.  Returns 0 when the weights alone do not fit.
    """
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}.")
    free = n_gpus * gpu_bytes * (1 - reserve_fraction) - weight_bytes(config, weight_dtype)
    if free <= 0:
        return 0
    return int(free // kv_cache_bytes(config, 1, seq_len, kv_dtype))


# --- arithmetic intensity and the roofline (notebook 09) ------------------------------------


def weights_read_per_pass(config: ModelConfig) -> int:
    """Parameters a forward pass reads in full: all but the lookup tables (token embedding, learned positions).

    A lookup reads only the rows of the batch's tokens.  A tied LM head still
    reads the whole shared matrix, so it stays in.
    """
    counts = param_counts(config)
    lookups = counts["positional"] + (0 if config.tie_embeddings else counts["embedding"])
    return counts["total"] - lookups


def forward_bytes(config: ModelConfig, batch: int, new_tokens: int, context: int, dtype: str = "bf16") -> float:
    """Bytes one forward pass must move: the weights once, the KV cache read, the new K/V written."""
    kv_read = kv_cache_bytes(config, batch, context, dtype)
    kv_written = kv_cache_bytes(config, batch, new_tokens, dtype)
    return weights_read_per_pass(config) * dtype_bytes(dtype) + kv_read + kv_written


def decode_step_bytes(config: ModelConfig, context: int, dtype: str = "bf16", batch: int = 1) -> float:
    """Bytes one decode step moves: the course's one definition (notebooks 08, 09, 10).

    Every weight a pass reads (:func:`weights_read_per_pass`: all but the lookup tables) once,
    plus each sequence's KV cache of ``context`` tokens read, plus its new token's K/V written —
    :func:`forward_bytes` with one new token per sequence.
    """
    return forward_bytes(config, batch, 1, context, dtype)


def forward_flops(config: ModelConfig, batch: int, new_tokens: int, context: int) -> float:
    """FLOPs of one forward pass over ``new_tokens`` per sequence attending to ``context`` earlier tokens.

    Weights: 2 FLOPs per parameter per token (LM head included).  Attention:
    Q·Kᵀ and weights·V, 4 × head_dim × heads FLOPs per (query, key) pair per
    layer, with causal pairs among the new tokens.
    """
    weights = 2 * (param_counts(config)["non_embedding"] + config.d_model * config.vocab_size)
    pairs = new_tokens * context + new_tokens * (new_tokens + 1) / 2
    attention = 4 * config.n_layers * config.attention_dim * pairs
    return batch * (new_tokens * weights + attention)


def arithmetic_intensity(config: ModelConfig, batch: int, new_tokens: int, context: int = 0,
                         dtype: str = "bf16") -> float:
    """FLOPs per byte moved for one forward pass (prefill: many new tokens; decode: one)."""
    return forward_flops(config, batch, new_tokens, context) / forward_bytes(config, batch, new_tokens, context, dtype)


def decode_intensity_limit(config: ModelConfig, context: int, dtype: str = "bf16") -> float:
    """The arithmetic intensity batched decode approaches as the batch grows, at ``context`` cached tokens.

    A decode step's bytes (``forward_bytes``) are the weights read once, shared by the
    whole batch (``weights_read_per_pass × bytes``), plus each sequence's own KV cache
    read and its new K/V written.  As the batch grows the shared weight read vanishes
    per sequence, leaving one sequence's FLOPs ÷ its own KV bytes (notebook 09).
    Llama-3-8B in bf16: about 228, 61 and 18 FLOP/byte at 512, 2,000 and 8,192 tokens.
    """
    shared = weights_read_per_pass(config) * dtype_bytes(dtype)
    own = forward_bytes(config, 1, 1, context, dtype) - shared
    return forward_flops(config, 1, 1, context) / own


def roofline(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """Attainable FLOP/s = min(peak, intensity × bandwidth); the ridge point is peak / bandwidth."""
    return min(peak_flops, intensity * bandwidth)


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


# --- the boundary: every public function checks its arguments -----------------------------
#
# The formulas above are what the notebooks show; the checks are applied here, by argument
# name, so that each one is written once: ``batch`` means the same thing in every function.
# Number formats are checked where they are used, by ``dtype_bytes``.


def _config(name: str, value: Any) -> ModelConfig:
    if isinstance(value, ModelConfig):
        return value
    if isinstance(value, str):
        return get_config(value)  # an unknown name: ConfigError listing the presets
    raise CalcError(f"{name} must be a ModelConfig (e.g. get_config('llama3-8b')) or a preset name, "
                    f"got {value!r} ({type(value).__name__}).")


def _config_or_count(name: str, value: Any) -> ModelConfig | float:
    """``weight_bytes`` also takes a parameter count (``175e9``)."""
    if isinstance(value, (ModelConfig, str)):
        return _config(name, value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise CalcError(f"{name} must be a ModelConfig, a preset name or a parameter count (e.g. 175e9), "
                        f"got {value!r} ({type(value).__name__}).")
    return _number(name, value, "a parameter count ≥ 0 (e.g. 175e9)", minimum=0)


def _int(minimum: int, what: str, maximum: int | None = None) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        try:
            return require_int(name, value, minimum=minimum, maximum=maximum, error=CalcError)
        except CalcError:
            raise CalcError(f"{name} must be {what}, got {value!r}.") from None
    return check


def _number(name: str, value: Any, what: str, minimum: float | None = None, maximum: float | None = None,
            *, below_maximum: bool = False, above_minimum: bool = False) -> float:
    try:
        number = require_finite(name, value, minimum=minimum, maximum=maximum, error=CalcError)
    except CalcError:
        number = None
    if number is None or (below_maximum and number == maximum) or (above_minimum and number == minimum):
        raise CalcError(f"{name} must be {what}, got {value!r}.")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise CalcError(f"{name} must be True or False, got {value!r}.")
    return value


def _display_number(name: str, value: Any) -> Any:
    """The formatters take any finite number (ints, floats, NumPy or 0-d tensor scalars)."""
    if isinstance(value, (bool, str, bytes)):
        number = None
    else:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            number = None
    if number is None or number != number or number in (float("inf"), float("-inf")):
        raise CalcError(f"{name} must be a finite number, got {value!r}.")
    return value


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "config": _config,
    "batch": _int(0, "an integer ≥ 0 (sequences in the batch)"),
    "tokens": _int(0, "an integer ≥ 0 (tokens per sequence), or None for the full context"),
    "context": _int(0, "an integer ≥ 0 (tokens already in the context)"),
    "new_tokens": _int(0, "an integer ≥ 0 (tokens each sequence adds in this pass)"),
    "seq_len": _int(1, "an integer ≥ 1 (tokens per sequence)"),
    "n_gpus": _int(1, "an integer ≥ 1"),
    "n_in": _int(0, "an integer ≥ 0 (input features)"),
    "n_out": _int(0, "an integer ≥ 0 (output features)"),
    "dim": _int(1, "an integer ≥ 1 (features normalised), or None for d_model"),
    "digits": _int(0, "an integer from 0 to 20 (digits after the point)", maximum=20),
    "n_tokens": lambda name, value: _number(name, value, "a number of tokens ≥ 0 (e.g. 300e9)", 0),
    "gpu_bytes": lambda name, value: _number(name, value, "a positive number of bytes (e.g. 80e9)", 0,
                                             above_minimum=True),
    "reserve_fraction": lambda name, value: _number(
        name, value, "a fraction in [0, 1) (0.1 keeps a tenth of memory back)", 0, 1, below_maximum=True),
    "intensity": lambda name, value: _number(name, value, "a finite number ≥ 0 (FLOPs per byte)", 0),
    "peak_flops": lambda name, value: _number(name, value, "a finite number ≥ 0 (FLOP/s)", 0),
    "bandwidth": lambda name, value: _number(name, value, "a finite number ≥ 0 (bytes/s)", 0),
    "n": _display_number,
    "bias": _bool, "include_bias": _bool, "include_lm_head": _bool, "binary": _bool,
}
"""How each argument name is checked, in every function that takes it."""


def _checked(function: Callable, overrides: dict[str, Callable] | None = None) -> Callable:
    """``function`` with its arguments checked by name (``_CHECKS``); an overflow becomes a CalcError."""
    signature = inspect.signature(function)
    checks = {**_CHECKS, **(overrides or {})}

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as err:
            raise CalcError(f"{function.__name__}(): {err}; see help(calc.{function.__name__}).") from None
        for name, value in bound.arguments.items():
            optional = signature.parameters[name].default is None
            if name in checks and not (optional and value is None):
                bound.arguments[name] = checks[name](name, value)
        try:
            return function(*bound.args, **bound.kwargs)
        except OverflowError:
            raise CalcError(f"{function.__name__}(): the result is too large for a float (over 1e308): "
                            "check the sizes for a typo.") from None

    return wrapper


_PUBLIC = [
    "linear_params", "norm_params", "attention_params", "qk_norm_params", "mlp_params", "param_counts",
    "flops_per_token", "training_flops_per_token", "training_flops", "dtype_bytes", "kv_bytes_per_token",
    "kv_cache_bytes", "max_concurrent_sequences", "weights_read_per_pass", "forward_bytes",
    "decode_step_bytes", "forward_flops", "arithmetic_intensity", "decode_intensity_limit", "roofline",
    "human_bytes", "human_count",
]
for _name in _PUBLIC:
    globals()[_name] = _checked(globals()[_name])
weight_bytes = _checked(weight_bytes, {"config": _config_or_count})
del _name

"""The shape of a model: ``ModelConfig``, its validation, and named presets.

Taught across notebooks 02-06: notebook 02 (embeddings) meets ``vocab_size`` and
``d_model``, 03 (positions) ``positional`` and ``context_length``, 04 (attention)
``n_heads``, ``n_kv_heads`` and ``head_dim``, 05 (causal mask) the decoder-only
setting, and 06 (decoder block / full model) ``norm``, ``mlp``, ``d_ff`` and
``n_layers``.  The calculators in ``llmlab.calc`` read the same config, so a
preset such as ``gpt3-175b`` can be sized without allocating a single weight.

This module imports no torch on purpose: a config is plain data.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from llmlab.errors import LlmlabError, require_finite, require_int

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "relu", "swiglu")
POSITIONALS = ("learned", "sinusoidal", "rope", "none")
ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
"""The RoPE context extensions llmlab computes (``rope_scaling["rope_type"]``) and the numbers each one takes."""

# Fields whose ``None`` default is worked out from the others in ``__post_init__``.
_DERIVED = ("n_kv_heads", "head_dim", "d_ff")
_POSITIVE_INTS = ("vocab_size", "context_length", "d_model", "n_layers", "n_heads")

MAX_SIZE = 2**31 - 1
"""Largest value of any size field (vocab_size, context_length, d_model, …).  Far beyond every
model there is (vocabularies reach ~256k, contexts ~10M tokens), and it keeps every product the
calculators form, and every tensor shape, in range."""


class ConfigError(LlmlabError, ValueError):
    """A model configuration that cannot be built, with a message that says how to fix it."""


@dataclass(frozen=True)
class ModelConfig:
    """Every number and choice that fixes a decoder-only Transformer's shape.

    Taught in notebooks 02-06 (see the module docstring for which field where).
    The defaults describe a GPT-2-style model (LayerNorm, GELU, learned
    positions, biases, tied embeddings); the Llama/Qwen family switches to
    RMSNorm, SwiGLU, RoPE, no biases.

    Two fields exist for real checkpoints (notebook 14): ``qkv_bias`` gives the
    query, key and value projections a bias even when ``bias`` is False (Qwen2),
    and ``rope_scaling`` stretches RoPE to a longer context, in Hugging Face's
    format: ``{"rope_type": "linear", "factor": 4.0}`` or Llama 3.1's
    ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}``.

    Three fields may be left as ``None`` and are filled in on creation:
    ``n_kv_heads`` becomes ``n_heads`` (plain multi-head attention),
    ``head_dim`` becomes ``d_model // n_heads``, and ``d_ff`` becomes
    ``4 * d_model``.  A config is frozen: use ``replace(...)`` to change it.
    """

    name: str
    vocab_size: int
    context_length: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int | None = None
    norm: str = "layernorm"
    mlp: str = "gelu"
    positional: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    bias: bool = True
    qkv_bias: bool = False
    tie_embeddings: bool = True
    qk_norm: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0
    # Which of n_kv_heads / head_dim / d_ff were filled in (so replace() can
    # recompute them); not a real setting, so it is left out of init, repr, ==.
    _derived: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_basic_fields(self)
        derived = set()
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
            derived.add("n_kv_heads")
        if self.head_dim is None:
            if self.d_model % self.n_heads != 0:
                raise ConfigError(_heads_do_not_divide(self.d_model, self.n_heads))
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
            derived.add("head_dim")
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
            derived.add("d_ff")
        object.__setattr__(self, "_derived", frozenset(derived))
        _check_derived_fields(self)

    # --- convenient read-only figures -------------------------------------------------

    @property
    def attention_dim(self) -> int:
        """Width of all query heads together, ``n_heads * head_dim`` (notebook 04)."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of all key (or value) heads together, ``n_kv_heads * head_dim`` (notebook 04)."""
        return self.n_kv_heads * self.head_dim

    # --- changing, saving, loading ----------------------------------------------------

    def replace(self, **changes: Any) -> ModelConfig:
        """A new, validated config with ``changes`` applied (notebook 06).

        Fields that were filled in automatically are worked out again, so
        ``get_config("gpt2-124m").replace(d_model=1024, n_heads=16)`` gets
        ``head_dim=64`` and ``d_ff=4096``, not the old 64 and 3072 by accident.
        """
        _reject_unknown_keys(changes, "replace()")
        values = self.to_dict()
        for name in self._derived:
            values[name] = None
        values.update(changes)
        return ModelConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-friendly dict, with derived fields written out (notebook 06)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build (and validate) a config from ``to_dict()``'s output (notebook 06)."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"a config must be a mapping of field names to values ({{\"name\": ..., \"vocab_size\": ...}}, "
                f"as to_dict() writes it), got {type(data).__name__}."
            )
        _reject_unknown_keys(data, "from_dict()")
        _reject_missing_keys(data, "from_dict()")
        return cls(**data)

    def to_json(self) -> str:
        """The config as a JSON string (``from_json`` reads it back)."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelConfig:
        """Read a config written by ``to_json``; text that is not JSON of a config gives ``ConfigError``."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise ConfigError(f"from_json() reads JSON text (a str), got {type(text).__name__}; "
                              "for a dict use ModelConfig.from_dict().")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"the config is not valid JSON ({err}); write it with config.to_json().") from None
        return cls.from_dict(data)


# --- validation ------------------------------------------------------------------------


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig) if f.init]


def _reject_unknown_keys(keys: dict[str, Any], where: str) -> None:
    known = _field_names()
    for key in keys:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: config field names are strings, got {key!r}. Known fields: "
                              f"{', '.join(known)}.")
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: unknown config field {key!r}.{hint} Known fields: {', '.join(known)}."
            )


def _reject_missing_keys(data: dict[str, Any], where: str) -> None:
    required = [f.name for f in dataclasses.fields(ModelConfig)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{where}: the config lacks {', '.join(map(repr, missing))}; every config needs "
                          f"{', '.join(required)} (the other fields have defaults).")


def _check_positive_int(name: str, value: Any) -> None:
    try:
        require_int(name, value, minimum=1, error=ConfigError)
    except ConfigError:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.") from None
    if value > MAX_SIZE:
        raise ConfigError(f"{name}={value:,} is larger than any model has (the limit is {MAX_SIZE:,}): "
                          "check for a typo.")


def _check_number(name: str, value: Any, valid: str, low: float, high: float | None = None, *,
                  low_open: bool = True, high_open: bool = True, hint: str = "") -> None:
    """``value`` must be a finite number between ``low`` and ``high`` (ends open or closed); ``valid`` says so."""
    try:
        number = require_finite(name, value, error=ConfigError)
    except ConfigError:
        number = None
    ok = number is not None and (number > low if low_open else number >= low)
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        raise ConfigError(f"{name} must be {valid}, got {value!r}" + (f"; {hint}." if hint else "."))


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name}={value!r} is not known: use one of {', '.join(choices)}.{hint}")


def _check_basic_fields(cfg: ModelConfig) -> None:
    if not isinstance(cfg.name, str) or not cfg.name:
        raise ConfigError(f"name must be a non-empty string, got {cfg.name!r}.")
    for name in _POSITIVE_INTS:
        _check_positive_int(name, getattr(cfg, name))
    for name in _DERIVED:
        value = getattr(cfg, name)
        if value is not None:
            _check_positive_int(name, value)
    _check_choice("norm", cfg.norm, NORMS)
    _check_choice("mlp", cfg.mlp, MLPS)
    _check_choice("positional", cfg.positional, POSITIONALS)
    for name in ("bias", "qkv_bias", "tie_embeddings", "qk_norm"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be True or False, got {getattr(cfg, name)!r}.")
    _check_number("rope_theta", cfg.rope_theta, "a positive number greater than 1 (RoPE's base: 10,000 in "
                  "the original paper, 500,000 in Llama 3)", 1.0)
    object.__setattr__(cfg, "rope_scaling", _checked_rope_scaling(cfg.rope_scaling, cfg.positional))
    _check_number("norm_eps", cfg.norm_eps, "a small positive number such as 1e-5", 0.0, 1.0)
    _check_number("dropout", cfg.dropout, "in [0, 1)", 0.0, 1.0, low_open=False,
                  hint="use 0.0 to turn it off")


def _checked_rope_scaling(scaling: Any, positional: str) -> dict[str, Any] | None:
    """``rope_scaling`` as a plain dict of floats (ints for positions), or ConfigError saying what is wrong."""
    if scaling is None:
        return None
    example = ("e.g. {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, "
               "'original_max_position_embeddings': 8192}")
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be None or a dict ({example}), got {scaling!r}.")
    if positional != "rope":
        raise ConfigError(f"rope_scaling stretches RoPE, but positional={positional!r}: use positional='rope' "
                          "or drop rope_scaling.")
    kind = scaling.get("rope_type")
    if not isinstance(kind, str) or kind not in ROPE_SCALINGS:
        raise ConfigError(f"rope_scaling's rope_type {kind!r} is not known: use one of "
                          f"{', '.join(ROPE_SCALINGS)} ({example}).")
    wanted = {"rope_type", *ROPE_SCALINGS[kind]}
    if set(scaling) != wanted:
        raise ConfigError(f"rope_scaling of type {kind!r} takes exactly the keys {', '.join(sorted(wanted))}; "
                          f"got {', '.join(sorted(map(str, scaling)))}.")
    checked: dict[str, Any] = {"rope_type": kind}
    for key in ROPE_SCALINGS[kind]:
        if key == "original_max_position_embeddings":
            _check_positive_int(f"rope_scaling['{key}']", scaling[key])
            checked[key] = scaling[key]
        else:
            _check_number(f"rope_scaling['{key}']", scaling[key], "a positive number", 0.0)
            checked[key] = float(scaling[key])
    if kind == "llama3" and checked["high_freq_factor"] <= checked["low_freq_factor"]:
        raise ConfigError(f"rope_scaling's high_freq_factor ({checked['high_freq_factor']}) must be larger than its "
                          f"low_freq_factor ({checked['low_freq_factor']}): Llama 3.1 uses 4.0 and 1.0.")
    return checked


def _check_derived_fields(cfg: ModelConfig) -> None:
    if cfg.n_heads % cfg.n_kv_heads != 0:
        raise ConfigError(
            f"n_heads={cfg.n_heads} is not divisible by n_kv_heads={cfg.n_kv_heads}: each key/value "
            f"head serves an equal group of query heads, so pick n_kv_heads among the divisors of "
            f"n_heads ({_some(_divisors(cfg.n_heads))})."
        )
    if cfg.positional == "rope" and cfg.head_dim % 2 != 0:
        raise ConfigError(
            f"RoPE rotates pairs of numbers, so head_dim must be even; got head_dim={cfg.head_dim}. "
            "Change d_model or n_heads (or set head_dim), or use another positional encoding."
        )


def _divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order (trial division up to √n: fast for any MAX_SIZE value)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _some(numbers: list[int], limit: int = 12) -> str:
    """``1, 2, 4, 8`` — or the first ``limit`` numbers and an ellipsis."""
    shown = ", ".join(map(str, numbers[:limit]))
    return shown + (", …" if len(numbers) > limit else "")


def _heads_do_not_divide(d_model: int, n_heads: int) -> str:
    # Suggest the next divisors up (more heads), falling back to the nearest ones below.
    above = [d for d in _divisors(d_model) if d > n_heads]
    below = [d for d in _divisors(d_model) if d < n_heads]
    nearest = (above + below[::-1])[:2]
    options = " or ".join(str(d) for d in sorted(nearest))
    return (
        f"d_model={d_model} is not divisible by n_heads={n_heads}: pick n_heads that divides "
        f"d_model (e.g. {options}), or set head_dim explicitly."
    )


# --- presets ---------------------------------------------------------------------------


def _gpt2(name: str, d_model: int, n_layers: int, n_heads: int, context_length: int = 1024) -> ModelConfig:
    """GPT-2 family (and GPT-3): learned positions, LayerNorm, GELU, biases, tied LM head."""
    return ModelConfig(
        name=name, vocab_size=50257, context_length=context_length,
        d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        norm="layernorm", mlp="gelu", positional="learned",
        bias=True, tie_embeddings=True, norm_eps=1e-5,
    )


def _llama3(name: str, d_model: int, n_layers: int, n_heads: int, d_ff: int) -> ModelConfig:
    """Llama 3 family: RMSNorm, SwiGLU, RoPE (theta 500,000), GQA with 8 KV heads, no biases."""
    return ModelConfig(
        name=name, vocab_size=128256, context_length=8192,
        d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, d_ff=d_ff,
        norm="rmsnorm", mlp="swiglu", positional="rope", rope_theta=500000.0,
        bias=False, tie_embeddings=False, norm_eps=1e-5,
    )


_PRESET_LIST = [
    # The model the course trains on a CPU (notebook 06 onwards).
    ModelConfig(
        name="course-tiny", vocab_size=1024, context_length=256,
        d_model=256, n_layers=4, n_heads=4,
        norm="layernorm", mlp="gelu", positional="learned", bias=True, tie_embeddings=True,
    ),
    # Same size, Llama style.  SwiGLU has three matrices, so d_ff = 8/3 * 256 = 683,
    # rounded up to a multiple of 16 (688) keeps the MLP's parameter count comparable.
    ModelConfig(
        name="course-tiny-llama", vocab_size=1024, context_length=256,
        d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=688,
        norm="rmsnorm", mlp="swiglu", positional="rope", bias=False, tie_embeddings=True,
    ),
    _gpt2("gpt2-124m", 768, 12, 12),
    _gpt2("gpt2-355m", 1024, 24, 16),
    _gpt2("gpt2-774m", 1280, 36, 20),
    _gpt2("gpt2-1558m", 1600, 48, 25),
    _gpt2("gpt3-175b", 12288, 96, 96, context_length=2048),
    _llama3("llama3-8b", 4096, 32, 32, 14336),
    _llama3("llama3-70b", 8192, 80, 64, 28672),
    ModelConfig(
        name="qwen3-0.6b", vocab_size=151936, context_length=40960,
        d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, d_ff=3072,
        norm="rmsnorm", mlp="swiglu", positional="rope", rope_theta=1_000_000.0,
        bias=False, tie_embeddings=True, qk_norm=True, norm_eps=1e-6,
    ),
    # The "Qwen-style model" of an inference-engine walkthrough (see FACTS.md).
    ModelConfig(
        name="qwen-walkthrough", vocab_size=151936, context_length=4096,
        d_model=4096, n_layers=24, n_heads=32, n_kv_heads=32, head_dim=128, d_ff=11008,
        norm="rmsnorm", mlp="swiglu", positional="rope", bias=False, tie_embeddings=False,
    ),
]

PRESETS: dict[str, ModelConfig] = {cfg.name: cfg for cfg in _PRESET_LIST}
"""Named configurations: the course's own models and published ones (for the calculators)."""


def get_config(name: str, /, **overrides: Any) -> ModelConfig:
    """The preset called ``name``, with ``overrides`` applied and validated (notebook 06).

    >>> get_config("course-tiny", n_layers=2).n_layers
    2
    """
    if not isinstance(name, str):
        raise ConfigError(f"a preset name is a string such as 'course-tiny', got {name!r} ({type(name).__name__}). "
                          f"Available presets: {', '.join(PRESETS)}.")
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown preset {name!r}.{hint} Available presets: {', '.join(PRESETS)}."
        )
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

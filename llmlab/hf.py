"""llmlab's ``Transformer`` ⇄ Hugging Face: the configs, weight names and layouts of GPT-2, Llama and Qwen.

Taught in notebook 14 (real pretrained checkpoints).  A Hugging Face checkpoint and an llmlab
model compute the same function; only the names and layouts of their weights differ.
GPT-2 (``GPT2LMHeadModel``):

    llmlab                                   Hugging Face GPT-2
    token_embedding.weight                   transformer.wte.weight
    position_embedding.weight                transformer.wpe.weight
    blocks.i.norm1 / norm2                   transformer.h.i.ln_1 / ln_2
    blocks.i.attn.q_proj, k_proj, v_proj     transformer.h.i.attn.c_attn   (fused: [q; k; v])
    blocks.i.attn.o_proj                     transformer.h.i.attn.c_proj
    blocks.i.mlp.up_proj / down_proj         transformer.h.i.mlp.c_fc / c_proj
    final_norm                               transformer.ln_f
    lm_head.weight                           lm_head.weight   (tied to wte in GPT-2)

GPT-2's projections are ``Conv1D`` layers, which store the weight as ``[in, out]``
(``y = x @ W + b``), the transpose of ``nn.Linear``'s ``[out, in]``: every matrix is
transposed on the way.  Its ``c_attn`` computes queries, keys and values in one
matrix multiply; its output columns are ``[q | k | v]``, so llmlab's three
projections are concatenated (or split) along the output dimension.

Llama (2, 3, 3.1, 3.2), Qwen2/Qwen2.5 and Qwen3 name their layers as llmlab does
(llmlab borrowed the names), inside ``model.``: ``model.embed_tokens`` is the token
embedding, ``model.layers.i.input_layernorm`` / ``post_attention_layernorm`` are
``norm1`` / ``norm2``, ``self_attn`` is ``attn``, ``model.norm`` the final norm.  What
differs between them is in the config: Qwen2 gives q, k and v a bias
(``ModelConfig.qkv_bias``), Qwen3 normalizes each query and key head (``qk_norm``),
Llama 3.1 stretches RoPE (``rope_scaling`` of type ``"llama3"``).

The activation of GPT-2: llmlab's GELU is the tanh approximation (``nn.GELU(approximate="tanh")``),
the function GPT-2 was trained with (Hugging Face calls it ``"gelu_new"``, written out
in Python).  :func:`to_hf_gpt2` writes ``"gelu_pytorch_tanh"`` — the same formula,
computed by the same PyTorch kernel as llmlab, so the logits agree to the last bits;
:func:`from_hf_gpt2` accepts every spelling of the tanh approximation, and ReLU.
The exact (erf) ``"gelu"`` is refused: llmlab's MLP does not compute it.

Weights are read through a :class:`TensorSource` (a state dict here; safetensors files
in :mod:`llmlab.hub`), checked against the config by their shapes before any is read,
and put into a model built on the ``meta`` device one tensor at a time
(:func:`build_model`): a model is never held twice in memory.  ``transformers`` is needed
only to convert to or from its model objects (it is a test dependency of llmlab, not a
core one): it is imported when such a function runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from llmlab.config import ConfigError, ModelConfig
from llmlab.errors import LlmlabError
from llmlab.model import Transformer

if TYPE_CHECKING:  # pragma: no cover - only for the annotations
    import transformers

GPT2_EOT_ID = 50256
"""GPT-2's ``<|endoftext|>`` id (its bos, eos and, for batches, pad token)."""

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python_tanh")
"""Hugging Face names of the tanh-approximated GELU: llmlab's ``mlp="gelu"``."""

HF_ACTIVATION = {"gelu": "gelu_pytorch_tanh", "relu": "relu"}
"""Activation written for llmlab's ``mlp``: ``gelu_pytorch_tanh`` is ``F.gelu(x, approximate="tanh")``, as llmlab."""

FAMILIES = {"gpt2": "GPT-2", "llama": "Llama 2/3/3.1/3.2", "qwen2": "Qwen2/Qwen2.5", "qwen3": "Qwen3"}
"""The ``model_type``s of ``config.json`` that llmlab loads, and the models they are."""

_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
"""Buffers some checkpoints store (GPT-2's causal mask, old Llamas' RoPE frequencies), not weights."""

_LLAMA_DEFAULTS = {  # what transformers assumes when config.json leaves a field out
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "head_dim": 128},
}
_GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                  "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.1,
                  "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}


class HFConversionError(LlmlabError, ValueError):
    """A Hugging Face model, config, folder or weight llmlab cannot convert (the message says why and what to do)."""


# --- configs ------------------------------------------------------------------------------


def check_gpt2_expressible(config: ModelConfig) -> None:
    """Raise :class:`HFConversionError` unless ``config`` is a GPT-2 architecture (notebook 14).

    GPT-2 is: LayerNorm with bias, a GELU (tanh) or ReLU MLP, learned positions, biases in
    every projection, plain multi-head attention (``n_kv_heads == n_heads``), ``head_dim ==
    d_model / n_heads``, no QK-norm.  Everything else (RoPE, SwiGLU, RMSNorm, GQA, …) belongs
    to other Hugging Face architectures (Llama, Qwen), not to ``GPT2LMHeadModel``.
    """
    if not isinstance(config, ModelConfig):
        raise HFConversionError(f"expected an llmlab ModelConfig, got {type(config).__name__}.")
    problems = []
    if config.positional != "learned":
        problems.append(f"positional={config.positional!r} (GPT-2 learns one vector per position: 'learned')")
    if config.mlp not in HF_ACTIVATION:
        problems.append(f"mlp={config.mlp!r} (GPT-2's MLP is two matrices and a GELU: 'gelu' or 'relu')")
    if config.norm != "layernorm":
        problems.append(f"norm={config.norm!r} (GPT-2 uses 'layernorm')")
    if not config.bias:
        problems.append("bias=False (every GPT-2 projection and LayerNorm has a bias)")
    if config.n_kv_heads != config.n_heads:
        problems.append(f"n_kv_heads={config.n_kv_heads} with n_heads={config.n_heads} (GQA/MQA; GPT-2's fused "
                        "c_attn has as many key/value heads as query heads)")
    if config.head_dim * config.n_heads != config.d_model:
        problems.append(f"head_dim={config.head_dim} ≠ d_model / n_heads = {config.d_model}/{config.n_heads} "
                        "(GPT-2 derives head_dim from d_model)")
    if config.qk_norm:
        problems.append("qk_norm=True (GPT-2 has no QK-norm)")
    if problems:
        raise HFConversionError(
            f"config {config.name!r} cannot be written as a Hugging Face GPT-2: " + "; ".join(problems) +
            ". Only GPT-2-style configs (e.g. 'course-tiny', 'gpt2-124m') convert to GPT2LMHeadModel."
        )


def gpt2_config_to_hf(config: ModelConfig, attn_implementation: str = "sdpa") -> transformers.GPT2Config:
    """The ``transformers.GPT2Config`` of an llmlab GPT-2-style ``ModelConfig`` (notebook 14).

    ``attn_implementation`` is "sdpa" (PyTorch's fused attention, as llmlab) or "eager"
    (the written-out softmax); the weights are float32.  Raises :class:`HFConversionError`
    for what GPT-2 cannot express (see :func:`check_gpt2_expressible`).
    """
    check_gpt2_expressible(config)
    if attn_implementation not in ("sdpa", "eager"):
        raise HFConversionError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}.")
    GPT2Config = _transformers().GPT2Config
    eot = GPT2_EOT_ID if config.vocab_size > GPT2_EOT_ID else None  # GPT-2's <|endoftext|>, if the vocab has it
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.d_ff,
        activation_function=HF_ACTIVATION[config.mlp],
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=eot,
        eos_token_id=eot,
        dtype="float32",
        attn_implementation=attn_implementation,
    )


def hf_gpt2_to_config(hf_config: transformers.PretrainedConfig, name: str | None = None) -> ModelConfig:
    """The llmlab ``ModelConfig`` of a Hugging Face ``GPT2Config`` (notebook 14).

    ``name`` defaults to the folder or hub name the config came from (else "hf-gpt2").
    Raises :class:`HFConversionError` for a config that is not GPT-2, or a GPT-2 variant
    llmlab does not compute (exact-erf GELU, cross-attention, attention scaled by layer index).
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "gpt2":
        raise HFConversionError(
            f"expected a Hugging Face GPT-2 config (model_type 'gpt2'), got {type(hf_config).__name__} with "
            f"model_type {model_type!r}: only GPT-2 checkpoints map onto llmlab's GPT-2-style Transformer."
        )
    return config_from_hf({**hf_config.to_dict(), "model_type": "gpt2"},
                          name or _name_of(getattr(hf_config, "_name_or_path", ""), "gpt2"))


def config_from_hf(data: Mapping[str, Any], name: str | None = None) -> ModelConfig:
    """The llmlab ``ModelConfig`` of a Hugging Face ``config.json`` (as a dict) (notebook 14).

    ``model_type`` picks the family: one of :data:`FAMILIES` (GPT-2, Llama, Qwen2, Qwen3).
    Fields the file leaves out take ``transformers``' defaults.  What llmlab does not compute
    (another architecture, a quantized checkpoint, sliding-window attention, a RoPE
    type other than default / linear / llama3, …) is an :class:`HFConversionError` naming it.
    ``name`` defaults to the ``_name_or_path`` the file records, else ``hf-<model_type>``.
    """
    if not isinstance(data, Mapping):
        raise HFConversionError(f"a Hugging Face config is a JSON object of fields, got {type(data).__name__}.")
    family = data.get("model_type")
    if family not in FAMILIES:
        supported = "; ".join(f"{key!r} ({label})" for key, label in FAMILIES.items())
        raise HFConversionError(f"model_type {family!r} is not an architecture llmlab loads: it loads {supported}.")
    if data.get("quantization_config"):
        method = data["quantization_config"].get("quant_method", "?") if isinstance(
            data["quantization_config"], Mapping) else "?"
        raise HFConversionError(f"this checkpoint is quantized ({method}); llmlab loads fp32, bf16 and fp16 "
                                "weights: use the model's unquantized release.")
    name = name or _name_of(str(data.get("_name_or_path", "") or ""), family)
    fields = _gpt2_fields(data) if family == "gpt2" else _llama_fields(data, family)
    try:
        return ModelConfig(name=name, **fields)
    except ConfigError as err:
        raise HFConversionError(f"the {FAMILIES[family]} config does not make a valid llmlab config: {err}") from None


def _name_of(source: str, family: str) -> str:
    """The last part of a folder or hub name (``meta-llama/Llama-3.2-1B`` → ``Llama-3.2-1B``)."""
    return os.path.basename(source.rstrip("/\\")) or f"hf-{family}"


def _field(data: Mapping[str, Any], key: str, defaults: Mapping[str, Any] | None = None) -> Any:
    """``data[key]``, else the default; a field with neither is an error naming it."""
    if data.get(key) is not None:
        return data[key]
    if defaults is not None and key in defaults:
        return defaults[key]
    raise HFConversionError(f"the config lacks {key!r}: config.json is incomplete (compare it with the model's "
                            "config.json on the hub).")


def _gpt2_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a GPT-2 ``config.json``; variants llmlab does not compute are refused."""
    activation = _field(data, "activation_function", _GPT2_DEFAULTS)
    if activation in TANH_GELUS:
        mlp = "gelu"
    elif activation == "relu":
        mlp = "relu"
    else:
        hint = (" (the exact erf GELU; llmlab's MLP computes the tanh approximation, 'gelu_new')"
                if activation == "gelu" else "")
        raise HFConversionError(f"activation_function={activation!r}{hint} is not one llmlab's MLP computes: "
                                f"use one of {', '.join(TANH_GELUS)} or 'relu'.")
    unsupported = [(flag, why) for flag, why in (
        ("add_cross_attention", "cross-attention (an encoder-decoder model)"),
        ("scale_attn_by_inverse_layer_idx", "attention scores scaled by 1 / (layer index + 1)"),
    ) if data.get(flag, False)]
    if not data.get("scale_attn_weights", True):
        unsupported.append(("scale_attn_weights=False", "attention scores not divided by √head_dim"))
    if unsupported:
        raise HFConversionError("this GPT-2 config uses " + "; ".join(f"{flag} ({why})" for flag, why in unsupported)
                                + ", which llmlab's attention does not compute.")
    return dict(
        vocab_size=_field(data, "vocab_size", _GPT2_DEFAULTS),
        context_length=_field(data, "n_positions", _GPT2_DEFAULTS),
        d_model=_field(data, "n_embd", _GPT2_DEFAULTS),
        n_layers=_field(data, "n_layer", _GPT2_DEFAULTS),
        n_heads=_field(data, "n_head", _GPT2_DEFAULTS),
        d_ff=data.get("n_inner"),  # None: 4 × d_model, as GPT-2
        norm="layernorm", mlp=mlp, positional="learned", bias=True,
        tie_embeddings=_field(data, "tie_word_embeddings", _GPT2_DEFAULTS),
        norm_eps=_field(data, "layer_norm_epsilon", _GPT2_DEFAULTS),
        dropout=float(_field(data, "resid_pdrop", _GPT2_DEFAULTS)),  # training only; llmlab has one dropout rate
    )


def _llama_fields(data: Mapping[str, Any], family: str) -> dict[str, Any]:
    """ModelConfig fields of a Llama, Qwen2 or Qwen3 ``config.json``."""
    defaults = _LLAMA_DEFAULTS[family]
    label = FAMILIES[family]
    activation = data.get("hidden_act", "silu")
    if activation != "silu":
        raise HFConversionError(f"hidden_act={activation!r}: llmlab's SwiGLU gates with SiLU ('silu'), as every "
                                f"{label} release does.")
    layer_types = data.get("layer_types") or []
    if data.get("use_sliding_window") or any(kind != "full_attention" for kind in layer_types):
        raise HFConversionError(f"this {label} config uses sliding-window attention (use_sliding_window / "
                                "layer_types), which llmlab's attention does not compute: every llmlab layer "
                                "attends to the whole context.")
    attention_bias, mlp_bias = bool(data.get("attention_bias", False)), bool(data.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise HFConversionError(f"attention_bias={attention_bias} with mlp_bias={mlp_bias}: llmlab's bias=True puts "
                                "a bias in every projection, bias=False in none (Qwen2's q/k/v-only biases "
                                "aside); this mix is not one it computes.")
    n_heads = _field(data, "num_attention_heads")
    d_model = _field(data, "hidden_size")
    head_dim = data.get("head_dim") or defaults.get("head_dim")  # None: d_model / n_heads
    theta, scaling = _rope(data, _field(data, "max_position_embeddings", defaults))
    return dict(
        vocab_size=_field(data, "vocab_size"),
        context_length=_field(data, "max_position_embeddings", defaults),
        d_model=d_model,
        n_layers=_field(data, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=data.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        d_ff=_field(data, "intermediate_size"),
        norm="rmsnorm", mlp="swiglu", positional="rope", rope_theta=theta, rope_scaling=scaling,
        bias=attention_bias, qkv_bias=family == "qwen2",
        tie_embeddings=_field(data, "tie_word_embeddings", defaults),
        qk_norm=family == "qwen3",
        norm_eps=_field(data, "rms_norm_eps", defaults),
    )


def _rope(data: Mapping[str, Any], max_positions: int) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either way config.json writes them.

    Checkpoints written by transformers 4 have ``rope_theta`` and ``rope_scaling`` (whose type
    is under ``rope_type``, or ``type`` in older files); transformers 5 writes both inside
    ``rope_parameters``.
    """
    params = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
    if not all(isinstance(key, str) for key in params):  # per-layer-type parameters (Gemma-style)
        raise HFConversionError("this config has a RoPE per layer type; llmlab has one RoPE for every layer.")
    theta = params.pop("rope_theta", None) or data.get("rope_theta") or 10000.0
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    partial = params.pop("partial_rotary_factor", None) or data.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise HFConversionError(f"partial_rotary_factor={partial}: this model rotates only part of each head; "
                                "llmlab's RoPE rotates all of it.")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": params.get("factor")}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor")
        scaling = {"rope_type": "llama3", **{key: params.get(key) for key in keys},
                   "original_max_position_embeddings": params.get("original_max_position_embeddings", max_positions)}
        return theta, scaling
    raise HFConversionError(f"RoPE type {kind!r} is not one llmlab computes: it computes the default RoPE and the "
                            "'linear' and 'llama3' scalings (ModelConfig.rope_scaling).")


# --- weights ------------------------------------------------------------------------------


class TensorSource(Protocol):
    """Named tensors that can be listed and sized without reading them, then read one at a time."""

    def names(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...


class StateDictSource:
    """A :class:`TensorSource` over tensors already in memory (a ``state_dict()``)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state

    def names(self) -> Iterable[str]:
        return self.state.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name].detach()


@dataclass(frozen=True)
class WeightSpec:
    """One llmlab weight: which Hugging Face tensor holds it, that tensor's shape, and how to turn it into ours."""

    target: str
    source: str
    shape: tuple[int, ...]
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def is_gpt2_layout(config: ModelConfig) -> bool:
    """Whether ``config``'s weights are laid out as GPT-2's (learned positions) rather than Llama's (RoPE)."""
    return config.positional == "learned"


def weight_plan(model: Transformer) -> list[WeightSpec]:
    """Every weight of ``model`` (an llmlab Transformer), and where a Hugging Face checkpoint keeps it (notebook 14).

    GPT-2-style models read GPT-2's names and layouts; RoPE models read Llama's names
    (Llama, Qwen2 and Qwen3 share them).  A tied LM head is not read: it is the embedding.
    """
    config = model.config
    if is_gpt2_layout(config):
        check_gpt2_expressible(config)
        return _gpt2_plan(config)
    plan = []
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        plan.append(WeightSpec(name, _llama_name(name), tuple(tensor.shape)))
    return plan


_LLAMA_RENAMES = (("token_embedding.", "model.embed_tokens."), ("final_norm.", "model.norm."),
                  ("blocks.", "model.layers."), (".norm1.", ".input_layernorm."),
                  (".norm2.", ".post_attention_layernorm."), (".attn.", ".self_attn."))


def _llama_name(name: str) -> str:
    """The Llama/Qwen name of an llmlab weight (``blocks.0.attn.q_proj.weight`` → ``model.layers.0.self_attn.q_proj.weight``)."""
    for ours, theirs in _LLAMA_RENAMES:
        name = name.replace(ours, theirs)
    return name


def _gpt2_plan(config: ModelConfig) -> list[WeightSpec]:
    """GPT-2's names and ``[in, out]`` layouts; ``c_attn`` is split into q, k and v."""
    d, hd, ff = config.d_model, config.attention_dim, config.d_ff
    plan = [WeightSpec("token_embedding.weight", "transformer.wte.weight", (config.vocab_size, d)),
            WeightSpec("position_embedding.weight", "transformer.wpe.weight", (config.context_length, d))]
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            plan += [WeightSpec(f"{ours}{a}.weight", f"{theirs}{b}.weight", (d,)),
                     WeightSpec(f"{ours}{a}.bias", f"{theirs}{b}.bias", (d,))]
        for index, part in enumerate("qkv"):
            columns = slice(index * hd, (index + 1) * hd)
            plan += [WeightSpec(f"{ours}attn.{part}_proj.weight", f"{theirs}attn.c_attn.weight", (d, 3 * hd),
                                lambda w, columns=columns: w[:, columns].t()),
                     WeightSpec(f"{ours}attn.{part}_proj.bias", f"{theirs}attn.c_attn.bias", (3 * hd,),
                                lambda b, columns=columns: b[columns])]
        for a, b, shape in (("attn.o_proj", "attn.c_proj", (hd, d)), ("mlp.up_proj", "mlp.c_fc", (d, ff)),
                            ("mlp.down_proj", "mlp.c_proj", (ff, d))):
            plan += [WeightSpec(f"{ours}{a}.weight", f"{theirs}{b}.weight", shape, torch.t),
                     WeightSpec(f"{ours}{a}.bias", f"{theirs}{b}.bias", (shape[1],))]
    plan += [WeightSpec("final_norm.weight", "transformer.ln_f.weight", (d,)),
             WeightSpec("final_norm.bias", "transformer.ln_f.bias", (d,))]
    if not config.tie_embeddings:
        plan.append(WeightSpec("lm_head.weight", "lm_head.weight", (config.vocab_size, d)))
    return plan


def _canonical(name: str, gpt2: bool) -> str | None:
    """A checkpoint's tensor name as the plan spells it (with its ``transformer.`` / ``model.`` prefix); None: not a weight."""
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    prefix = "transformer." if gpt2 else "model."
    return name if name.startswith((prefix, "lm_head.")) else prefix + name


def check_weights(config: ModelConfig, plan: list[WeightSpec], source: TensorSource) -> dict[str, str]:
    """Check that ``source`` holds every weight of ``plan`` with its shape, and nothing else (notebook 14).

    Only names and shapes are read.  Returns the plan's names → the source's own names.
    Raises :class:`HFConversionError` naming the first missing or mis-shaped tensor (and the
    shape the config asks for), or the unexpected ones.
    """
    gpt2 = is_gpt2_layout(config)
    kind = "GPT-2" if gpt2 else "Llama/Qwen"
    names: dict[str, str] = {}
    for name in source.names():
        canonical = _canonical(name, gpt2)
        if canonical is not None:
            names[canonical] = name
    if config.tie_embeddings:
        names.pop("lm_head.weight", None)  # a saved copy of the tied head: the embedding is the one used
    elif "lm_head.weight" not in names:
        raise HFConversionError(f"the config unties the LM head (tie_word_embeddings=False) but the weights lack "
                                f"'lm_head.weight' {list(_shape_of(plan, 'lm_head.weight'))}.")
    for spec in plan:
        if spec.source not in names:
            raise HFConversionError(
                f"the {kind} weights lack {spec.source!r} (shape {list(spec.shape)}): the checkpoint is incomplete "
                f"(a missing shard?), or its config does not match its weights (n_layer / num_hidden_layers?).")
        found = source.shape(names[spec.source])
        if tuple(found) != spec.shape:
            raise HFConversionError(f"{spec.source} has shape {list(found)}, but the config asks for "
                                    f"{list(spec.shape)}: the config does not match these weights.")
    unexpected = sorted(set(names) - {spec.source for spec in plan})
    if unexpected:
        raise HFConversionError(f"unexpected weights for a {kind} of {config.n_layers} layers: "
                                f"{', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''} (a config "
                                "with fewer layers than the weights, or another architecture's weights).")
    return names


def stored_dtype(config: ModelConfig, source: TensorSource) -> torch.dtype:
    """The dtype ``source`` stores its token embedding in: what loading "as stored" uses (notebook 14)."""
    gpt2 = is_gpt2_layout(config)
    embedding = "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"
    for name in source.names():
        if _canonical(name, gpt2) == embedding:
            return source.dtype(name)
    raise HFConversionError(f"the weights lack the token embedding {embedding!r}: these are not the weights of "
                            f"this config's architecture, or the checkpoint is incomplete.")


def _shape_of(plan: list[WeightSpec], target: str) -> tuple[int, ...]:
    return next((spec.shape for spec in plan if spec.target == target), ())


def build_model(config: ModelConfig, source: TensorSource, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> Transformer:
    """An llmlab Transformer of ``config`` holding the Hugging Face weights of ``source``, in eval mode (notebook 14).

    The model is built on the ``meta`` device (shapes only, no random init), every weight is
    checked first (:func:`check_weights`), then read, converted, cast to ``dtype`` (default:
    the stored dtype of the token embedding) and moved to ``device`` one tensor at a time:
    the weights are never held twice.  Each weight gets its own memory (never a view of
    ``source``: a memory-mapped file can change under a model that reads it).  RoPE's
    tables, computed rather than stored, are built on ``device``.
    """
    with torch.device("meta"):
        model = Transformer(config)
    plan = weight_plan(model)
    names = check_weights(config, plan, source)
    dtype = dtype or stored_dtype(config, source)
    with torch.no_grad():
        for spec in plan:
            stored = source.get(names[spec.source])
            tensor = stored if spec.transform is None else spec.transform(stored)
            tensor = tensor.to(device=device, dtype=dtype).contiguous()
            if tensor.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr():
                tensor = tensor.clone()  # its own memory: not the mapped file, another model, or a wider tensor
            _put(model, spec.target, tensor)
    if config.tie_embeddings:
        model.lm_head.weight = model.token_embedding.weight
    if config.positional == "rope":
        from llmlab.layers.positional import RotaryEmbedding

        with torch.device(device):
            rope = RotaryEmbedding.from_config(config)
        for block in model.blocks:
            block.attn.rope = rope
    _check_materialized(model)
    return model.eval()


def _put(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the parameter ``name`` of ``model`` (replacing its meta placeholder, not copying into it)."""
    owner, _, attribute = name.rpartition(".")
    module = model.get_submodule(owner)
    setattr(module, attribute, torch.nn.Parameter(tensor, requires_grad=getattr(module, attribute).requires_grad))


def _check_materialized(model: torch.nn.Module) -> None:
    """Every parameter and buffer holds real numbers (a weight the plan forgot would still be on ``meta``)."""
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise HFConversionError(f"llmlab could not fill {', '.join(left[:5])}: this is a bug in llmlab.hf, "
                                "please report it with the checkpoint's config.json.")


def _to_hf_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """llmlab state dict → Hugging Face GPT2LMHeadModel state dict (transposed, q/k/v fused)."""
    out = {
        "transformer.wte.weight": state["token_embedding.weight"],
        "transformer.wpe.weight": state["position_embedding.weight"],
        "transformer.ln_f.weight": state["final_norm.weight"],
        "transformer.ln_f.bias": state["final_norm.bias"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{theirs}{b}.weight"] = state[f"{ours}{a}.weight"]
            out[f"{theirs}{b}.bias"] = state[f"{ours}{a}.bias"]
        qkv = [f"{ours}attn.{p}_proj" for p in "qkv"]
        out[f"{theirs}attn.c_attn.weight"] = torch.cat([state[p + ".weight"] for p in qkv], dim=0).t().contiguous()
        out[f"{theirs}attn.c_attn.bias"] = torch.cat([state[p + ".bias"] for p in qkv], dim=0)
        for a, b in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
            out[f"{theirs}{b}.weight"] = state[f"{ours}{a}.weight"].t().contiguous()
            out[f"{theirs}{b}.bias"] = state[f"{ours}{a}.bias"]
    return out


def to_hf_gpt2(model: Transformer, attn_implementation: str = "sdpa") -> transformers.GPT2LMHeadModel:
    """A ``transformers.GPT2LMHeadModel`` computing what the llmlab ``model`` computes (notebook 14).

    The weights are copied (the two models share no memory), onto the same device and dtype;
    the result is in eval mode.  ``attn_implementation``: see :func:`gpt2_config_to_hf`.
    """
    if not isinstance(model, Transformer):
        raise HFConversionError(f"to_hf_gpt2() converts an llmlab Transformer, got {type(model).__name__}.")
    hf_config = gpt2_config_to_hf(model.config, attn_implementation)
    weight = model.token_embedding.weight
    with torch.device("meta"):  # no time spent on a random init that is overwritten at once
        hf = _transformers().GPT2LMHeadModel(hf_config)
    hf.to_empty(device=weight.device)
    if weight.dtype != torch.float32:
        hf.to(weight.dtype)
        hf.config.dtype = weight.dtype
    state = _to_hf_state({k: v.detach() for k, v in model.state_dict().items()}, model.config)
    with torch.no_grad():
        hf.load_state_dict(state, strict=True)
    if model.config.tie_embeddings:
        hf.lm_head.weight = hf.transformer.wte.weight  # to_empty() untied them
    return hf.eval()


def from_hf_gpt2(hf_model: transformers.PreTrainedModel, name: str | None = None) -> Transformer:
    """The llmlab ``Transformer`` computing what a Hugging Face ``GPT2LMHeadModel`` computes (notebook 14).

    Weights are copied onto the Hugging Face model's device, in its dtype; the result is in eval mode.
    ``name`` names the llmlab config (see :func:`hf_gpt2_to_config`).
    """
    config_of = getattr(hf_model, "config", None)
    if not isinstance(hf_model, torch.nn.Module) or config_of is None or not hasattr(hf_model, "lm_head"):
        raise HFConversionError(f"from_hf_gpt2() converts a transformers GPT2LMHeadModel, got "
                                f"{type(hf_model).__name__}.")
    config = hf_gpt2_to_config(config_of, name=name)
    weight = hf_model.get_input_embeddings().weight
    return build_model(config, StateDictSource(hf_model.state_dict()), weight.device, weight.dtype)


def load_hf_gpt2(folder: str | os.PathLike, device: str | torch.device = "cpu", *,
                 dtype: torch.dtype | None = None, name: str | None = None) -> Transformer:
    """Load a Hugging Face GPT-2 folder (``config.json`` + safetensors weights) as an llmlab model (notebook 14).

    ``folder`` is what ``GPT2LMHeadModel.save_pretrained(folder)`` writes (a single
    ``model.safetensors`` or shards listed in ``model.safetensors.index.json``); the weights
    are read with ``safetensors``, without building a Hugging Face model.  ``dtype`` defaults to
    the stored one; ``name`` to the folder's name.  :func:`llmlab.hub.load_model` loads every
    family (Llama and Qwen too).
    """
    from llmlab.hub import load_model, read_hf_config

    kind = read_hf_config(folder).get("model_type")
    if kind != "gpt2":
        raise HFConversionError(f"{os.fspath(folder)}/config.json describes model_type {kind!r}, not 'gpt2': "
                                "load_hf_gpt2() loads GPT-2 checkpoints; llmlab.hub.load_model() loads every "
                                f"family llmlab knows ({', '.join(FAMILIES)}).")
    return load_model(folder, device, dtype=dtype, name=name)


def _transformers():
    """The ``transformers`` package, or a clear error when it is not installed."""
    try:
        import transformers
    except ImportError:
        raise HFConversionError("converting to or from Hugging Face needs the 'transformers' package: "
                                "pip install transformers (it comes with llmlab's 'test' extra).") from None
    return transformers


__all__ = [
    "FAMILIES", "HFConversionError", "StateDictSource", "TensorSource", "WeightSpec", "build_model",
    "check_gpt2_expressible", "check_weights", "config_from_hf", "from_hf_gpt2", "gpt2_config_to_hf",
    "hf_gpt2_to_config", "is_gpt2_layout", "load_hf_gpt2", "stored_dtype", "to_hf_gpt2", "weight_plan",
]

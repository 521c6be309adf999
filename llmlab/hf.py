"""llmlab's GPT-2-style ``Transformer`` ⇄ Hugging Face ``transformers.GPT2LMHeadModel``.

Taught in notebook 14 (real pretrained checkpoints); this module is its first piece.
The two models compute the same function; only the names and layouts of their weights differ:

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

The activation: llmlab's GELU is the tanh approximation (``nn.GELU(approximate="tanh")``),
the function GPT-2 was trained with (Hugging Face calls it ``"gelu_new"``, written out
in Python).  :func:`to_hf_gpt2` writes ``"gelu_pytorch_tanh"`` — the same formula,
computed by the same PyTorch kernel as llmlab, so the logits agree to the last bits;
:func:`from_hf_gpt2` accepts every spelling of the tanh approximation, and ReLU.
The exact (erf) ``"gelu"`` is refused: llmlab's MLP does not compute it.

``transformers`` is needed only here (it is a test dependency of llmlab, not a core
one): it is imported when a function runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
"""Buffers old GPT-2 checkpoints store (the causal mask), not weights."""


class HFConversionError(LlmlabError, ValueError):
    """A model, config or folder that the GPT-2 mapping cannot convert (the message says why and what to do)."""


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
    activation = hf_config.activation_function
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
    ) if getattr(hf_config, flag, False)]
    if not getattr(hf_config, "scale_attn_weights", True):
        unsupported.append(("scale_attn_weights=False", "attention scores not divided by √head_dim"))
    if unsupported:
        raise HFConversionError("this GPT-2 config uses " + "; ".join(f"{flag} ({why})" for flag, why in unsupported)
                                + ", which llmlab's attention does not compute.")
    if name is None:
        source = str(getattr(hf_config, "_name_or_path", "") or "").rstrip("/\\")
        name = os.path.basename(source) or "hf-gpt2"
    try:
        return ModelConfig(
            name=name,
            vocab_size=hf_config.vocab_size,
            context_length=hf_config.n_positions,
            d_model=hf_config.n_embd,
            n_layers=hf_config.n_layer,
            n_heads=hf_config.n_head,
            d_ff=hf_config.n_inner,  # None: 4 × d_model, as GPT-2
            norm="layernorm", mlp=mlp, positional="learned", bias=True,
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            norm_eps=hf_config.layer_norm_epsilon,
            dropout=float(hf_config.resid_pdrop),  # training only; llmlab has one dropout rate
        )
    except ConfigError as err:
        raise HFConversionError(f"the GPT-2 config does not make a valid llmlab config: {err}") from None


# --- weights ------------------------------------------------------------------------------


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


def _from_hf_state(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 state dict (with or without the ``transformer.`` prefix) → llmlab state dict.

    Every weight must be there with its expected shape; anything left over is an error.
    """
    state = {}
    for key, value in hf_state.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        key = key if key.startswith("lm_head.") or key.startswith("transformer.") else "transformer." + key
        state[key] = value
    d, hd = config.d_model, config.attention_dim

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in state:
            raise HFConversionError(f"the GPT-2 weights lack {key!r}: the checkpoint is incomplete, or its config "
                                    "does not match its weights (n_layer?).")
        tensor = state.pop(key)
        if tuple(tensor.shape) != shape:
            raise HFConversionError(f"{key} has shape {tuple(tensor.shape)}, but the config asks for {shape}: the "
                                    "config does not match these weights.")
        return tensor

    out = {
        "token_embedding.weight": take("transformer.wte.weight", (config.vocab_size, d)),
        "position_embedding.weight": take("transformer.wpe.weight", (config.context_length, d)),
    }
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{ours}{a}.weight"] = take(f"{theirs}{b}.weight", (d,))
            out[f"{ours}{a}.bias"] = take(f"{theirs}{b}.bias", (d,))
        qkv_w = take(f"{theirs}attn.c_attn.weight", (d, 3 * hd)).t()
        qkv_b = take(f"{theirs}attn.c_attn.bias", (3 * hd,))
        for part, w, b in zip("qkv", qkv_w.split(hd, dim=0), qkv_b.split(hd, dim=0)):
            out[f"{ours}attn.{part}_proj.weight"] = w.contiguous()
            out[f"{ours}attn.{part}_proj.bias"] = b
        for a, b, shape in (("attn.o_proj", "attn.c_proj", (hd, d)), ("mlp.up_proj", "mlp.c_fc", (d, config.d_ff)),
                            ("mlp.down_proj", "mlp.c_proj", (config.d_ff, d))):
            out[f"{ours}{a}.weight"] = take(f"{theirs}{b}.weight", shape).t().contiguous()
            out[f"{ours}{a}.bias"] = take(f"{theirs}{b}.bias", (shape[1],))
    out["final_norm.weight"] = take("transformer.ln_f.weight", (d,))
    out["final_norm.bias"] = take("transformer.ln_f.bias", (d,))
    head = state.pop("lm_head.weight", None)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["token_embedding.weight"]  # one matrix; a saved copy is ignored
    elif head is None:
        raise HFConversionError("the config unties the LM head (tie_word_embeddings=False) but the weights lack "
                                "'lm_head.weight'.")
    else:
        state["lm_head.weight"] = head
        out["lm_head.weight"] = take("lm_head.weight", (config.vocab_size, d))
    if state:
        raise HFConversionError(f"unexpected weights for a GPT-2 of {config.n_layers} layers: "
                                f"{', '.join(sorted(state)[:5])}{' …' if len(state) > 5 else ''}.")
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


def _build(config: ModelConfig, state: dict[str, torch.Tensor], device: torch.device | str,
           dtype: torch.dtype) -> Transformer:
    """An llmlab Transformer holding ``state`` (built on the meta device: no throwaway random init)."""
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.to(dtype)
    if config.tie_embeddings:
        model.lm_head.weight = model.token_embedding.weight  # to_empty() untied them
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model.eval()


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
    state = _from_hf_state({k: v.detach() for k, v in hf_model.state_dict().items()}, config)
    return _build(config, state, weight.device, weight.dtype)


def load_hf_gpt2(folder: str | os.PathLike, device: str | torch.device = "cpu", *,
                 dtype: torch.dtype | None = None, name: str | None = None) -> Transformer:
    """Load a Hugging Face GPT-2 folder (``config.json`` + safetensors weights) as an llmlab model (notebook 14).

    ``folder`` is what ``GPT2LMHeadModel.save_pretrained(folder)`` writes (a single
    ``model.safetensors`` or shards listed in ``model.safetensors.index.json``); the weights
    are read with ``safetensors``, without building a Hugging Face model.  ``dtype`` defaults to
    the stored one; ``name`` to the folder's name.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise HFConversionError(f"{str(folder)!r} is not a folder: give the folder save_pretrained() wrote.")
    if not config_path.is_file():
        raise HFConversionError(f"{str(folder)!r} has no config.json: it is not a Hugging Face model folder.")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFConversionError(f"{config_path} is not valid JSON ({err}).") from None
    if not isinstance(data, dict) or data.get("model_type") != "gpt2":
        kind = data.get("model_type") if isinstance(data, dict) else None
        raise HFConversionError(f"{config_path} describes model_type {kind!r}, not 'gpt2': only GPT-2 checkpoints "
                                "load into llmlab's GPT-2-style Transformer.")
    hf_config = _transformers().GPT2Config.from_dict(data)
    config = hf_gpt2_to_config(hf_config, name=name or folder.resolve().name)
    hf_state = _read_safetensors(folder)
    dtype = dtype or hf_state[next(k for k in hf_state if k.endswith("wte.weight"))].dtype
    return _build(config, _from_hf_state(hf_state, config), device, dtype)


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors``, or of the shards ``model.safetensors.index.json`` lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map: dict[str, Any] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise HFConversionError(f"{index} is not a valid shard index ({err!r}).") from None
        files = [folder / shard for shard in sorted(set(weight_map.values()))]
    else:
        others = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {', '.join(others)}: re-save with save_pretrained(safe_serialization=True))" if others else ""
        raise HFConversionError(f"{str(folder)!r} has no model.safetensors{hint}.")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise HFConversionError(f"cannot read {path}: {err}. The file is missing or corrupt.") from None
    if not any(k.endswith("wte.weight") for k in state):
        raise HFConversionError(f"{str(folder)!r} holds no GPT-2 token embedding (wte.weight): not GPT-2 weights.")
    return state


def _transformers():
    """The ``transformers`` package, or a clear error when it is not installed."""
    try:
        import transformers
    except ImportError:
        raise HFConversionError("converting to or from Hugging Face needs the 'transformers' package: "
                                "pip install transformers (it comes with llmlab's 'test' extra).") from None
    return transformers


__all__ = [
    "HFConversionError", "check_gpt2_expressible", "from_hf_gpt2", "gpt2_config_to_hf", "hf_gpt2_to_config",
    "load_hf_gpt2", "to_hf_gpt2",
]

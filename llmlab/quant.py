"""Weight-only quantization: int8 per output channel, int4 per group of inputs.

Taught in notebook 16 (making it fast).  Decoding one token reads every weight
once and does little arithmetic with it, so on a laptop the time goes into
moving weights from memory.  Storing them in fewer bits moves fewer bytes:

    int8, per output channel (symmetric):  w[o, i] ≈ q[o, i] * scale[o],       q in -127..127
    int4, per group of G inputs (affine):  w[o, i] ≈ (q[o, i] - 8) * scale[o, g] + zero[o, g],
                                           q in 0..15, g = i // G

Only the weights are quantized ("weight-only"): activations, the residual
stream, norms, embeddings and the KV cache keep the model's dtype.  The error
per weight is at most half a step (``scale / 2``), which is why a scale per
*row* (int8) or per *group of 32-128 inputs* (int4) matters: one outlier only
coarsens its own row or group.

Speed on a CPU comes from PyTorch's own kernels for exactly this layout,
``torch.ops.aten._weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu``: they
read the small integers and scale them on the fly, in bfloat16 (their fp32
versions are not vectorized on x86: measured 10x slower).  They are built for a
few rows at a time (decoding, or verifying a few speculative tokens); for a long
prompt (:data:`KERNEL_MAX_ROWS` rows or more) the layer dequantizes the weight
once and runs an ordinary matrix product.  Notebook 16 measures both.

:func:`quantize_model` swaps every ``nn.Linear`` of a model for
:class:`Int8Linear` or :class:`Int4Linear`; the model's ``forward``, the KV
cache, the generator and the serving engine stay as they are.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.config import ConfigError, ModelConfig
from llmlab.errors import LlmlabError

BITS = (8, 4)
"""Weight widths :func:`quantize_model` knows."""

GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes for int4 (inputs that share one scale and zero); PyTorch's int4 kernel takes these."""

DEFAULT_GROUP_SIZE = 64
"""int4's default group size: 64 inputs share a scale and a zero (in an fp32 model they add 1 bit per weight)."""

KERNEL_MAX_ROWS = 16
"""Up to this many rows (tokens) a layer uses PyTorch's int8/int4 CPU kernel; more rows dequantize and use a
matrix product.  Measured on a busy 2-core AVX2 CPU, one thread (notebook 16): a 768→3072 layer at 1 row takes
0.20 ms with the int8 kernel against 0.29-0.42 ms for fp32 ``nn.Linear``; the 768→50257 LM head of GPT-2 6-15 ms
against 16-22 ms; at 16 rows the kernel still wins (2 ms against 6), at 64 it loses (17 ms against 10: it
re-reads the weights for every 4 rows)."""

INT8_MAX = 127
INT4_LEVELS = 15
INT4_OFFSET = 8
"""int4 codes are 0..15; code 8 sits on ``zero`` (the kernel's convention: ``w = (q - 8) * scale + zero``)."""

FORMAT = "llmlab-quantized"
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
_KERNEL_DTYPE = torch.bfloat16


class QuantizationError(LlmlabError, ValueError):
    """A quantization request that cannot work (bits, group size, model, file); the message says what to do."""


# --- rounding a scale so that bf16 (the kernels' dtype) holds it exactly ---------------------------


def _round_up_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` (≥ 0, fp32) rounded *up* to the nearest bfloat16 value, returned as fp32.

    The kernels read scales in bfloat16; rounding up (never down) keeps every weight
    inside the quantization range, so the error stays within half a step.
    """
    rounded = x.to(torch.bfloat16).float()
    low = rounded < x
    if bool(low.any()):  # one bf16 step up: the next representable value
        bits = rounded[low].to(torch.bfloat16).view(torch.int16) + 1
        rounded[low] = bits.view(torch.bfloat16).float()
    return rounded


# --- int8, per output channel -----------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` for a ``[out, in]`` weight: ``q`` int8 in -127..127, ``scale`` fp32 ``[out]`` (notebook 16).

    ``scale[o] = max|w[o, :]| / 127`` (rounded up to a bfloat16 value), so
    ``|w - q * scale| ≤ scale / 2`` for every weight.  An all-zero row gets scale 1.
    """
    _check_weight(weight)
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = _round_up_to_bf16(torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)))
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` as a ``[out, in]`` matrix of ``dtype``."""
    return q.to(dtype) * scale.to(dtype)[:, None]


# --- int4, per group ---------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 ``[out, in]`` → bytes ``[out, in / 2]``: column ``2j`` in the low nibble, ``2j + 1`` high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``[out, in / 2]`` → codes ``[out, in]`` (uint8 0..15); the inverse of :func:`pack_int4`."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed, scale, zero)`` for a ``[out, in]`` weight, one scale and zero per ``group_size`` inputs.

    ``packed`` is uint8 ``[out, in / 2]`` (two codes per byte), ``scale`` and ``zero``
    fp32 ``[out, in / group_size]`` holding bfloat16 values.  Each group's range
    ``min..max`` is cut into 15 steps: ``|w - ŵ| ≤ scale / 2`` up to the rounding of
    ``zero`` to bfloat16 (notebook 16).
    """
    _check_weight(weight)
    out_features, in_features = weight.shape
    group_size = _check_group_size(group_size, in_features)
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    span = high - low
    scale = _round_up_to_bf16(torch.where(span > 0, span / INT4_LEVELS, torch.ones_like(span)))
    zero = (low + INT4_OFFSET * scale).to(torch.bfloat16).float()
    q = torch.round((w - zero[..., None]) / scale[..., None] + INT4_OFFSET).clamp(0, INT4_LEVELS)
    return pack_int4(q.reshape(out_features, in_features)), scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - 8) * scale + zero`` as a ``[out, in]`` matrix of ``dtype``."""
    q = unpack_int4(packed)
    out_features, in_features = q.shape
    groups = scale.shape[1]
    q = q.reshape(out_features, groups, in_features // groups).to(dtype) - INT4_OFFSET
    return (q * scale.to(dtype)[..., None] + zero.to(dtype)[..., None]).reshape(out_features, in_features)


# --- the layers ---------------------------------------------------------------------------------------


class _QuantizedLinear(nn.Module):
    """What both quantized layers share: shapes, bias, and the choice kernel / dequantize."""

    bits: int = 0

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.use_kernel = True
        """Set False to always dequantize (the exact reference the tests compare with)."""

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def _kernel_ok(self, x: torch.Tensor, rows: int) -> bool:
        return False

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} takes inputs of {self.in_features} features, got shape "
                             f"{tuple(x.shape)}.")
        rows = x.numel() // self.in_features
        # (torch.compile cannot lower these kernels on every version: compiled code dequantizes, and the
        # compiler fuses that into the product)
        if (self.use_kernel and 0 < rows <= KERNEL_MAX_ROWS and not torch.compiler.is_compiling()
                and self._kernel_ok(x, rows)):
            flat = x.reshape(rows, self.in_features).to(_KERNEL_DTYPE)
            if flat.data_ptr() % 64:  # the x86 kernels use aligned loads
                flat = flat.clone()
            y = self._kernel(flat.contiguous()).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantizedLinear):
    """``nn.Linear`` with int8 weights and one scale per output channel (notebook 16).

    Buffers: ``weight_int8`` int8 ``[out, in]``, ``scale`` ``[out]`` (the model's
    dtype); ``bias`` stays a parameter.  ``forward(x) ≈ x @ (weight_int8 * scale)ᵀ + bias``.
    """

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize an ``nn.Linear`` (its weight and bias are copied, the original is left alone)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device)
        q, scale = quantize_int8(weight)
        with torch.no_grad():
            layer.weight_int8.copy_(q)
            layer.scale.copy_(scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.scale, dtype)

    def _kernel_ok(self, x: torch.Tensor, rows: int) -> bool:
        # The AVX512 kernel reads 16 inputs at a time with aligned loads: rows must be whole vectors.
        return x.device.type == "cpu" and self.in_features % 16 == 0 and _has_op("_weight_int8pack_mm")

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scale.to(_KERNEL_DTYPE))


class Int4Linear(_QuantizedLinear):
    """``nn.Linear`` with 4-bit weights, two per byte, and a scale and zero per group of inputs (notebook 16).

    Buffers: ``weight_int4`` uint8 ``[out, in / 2]``, ``scale`` and ``zero``
    ``[out, in / group_size]``.  ``forward(x) ≈ x @ ŵᵀ + bias`` with
    ``ŵ = (q - 8) * scale + zero`` per group.
    """

    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = DEFAULT_GROUP_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        group_size = _check_group_size(group_size, in_features)
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self._packed: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        """Quantize an ``nn.Linear`` with groups of ``group_size`` inputs."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, weight.dtype,
                    weight.device)
        packed, scale, zero = quantize_int4(weight, group_size)
        with torch.no_grad():
            layer.weight_int4.copy_(packed)
            layer.scale.copy_(scale)
            layer.zero.copy_(zero)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.weight_int4, self.scale, self.zero, dtype)

    def _kernel_ok(self, x: torch.Tensor, rows: int) -> bool:
        return x.device.type == "cpu" and self.in_features % 16 == 0 and _has_op("_weight_int4pack_mm_for_cpu")

    def _kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's own packing of the weight and its ``[groups, out, 2]`` scales-and-zeros, kept until the
        buffers change (``_version`` counts in-place writes, e.g. ``load_state_dict``)."""
        key = (self.weight_int4._version, self.scale._version, self.zero._version, self.weight_int4.data_ptr())
        if self._packed is None or self._packed[0] != key:
            pad = -self.out_features % 16  # the kernel takes outputs in blocks of 16: pad with zero rows
            codes = F.pad(unpack_int4(self.weight_int4).to(torch.int32), (0, 0, 0, pad), value=INT4_OFFSET)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            scales_zeros = F.pad(torch.stack([self.scale, self.zero], dim=-1), (0, 0, 0, 0, 0, pad))
            self._packed = (key, packed, scales_zeros.transpose(0, 1).contiguous().to(_KERNEL_DTYPE))
        return self._packed[1], self._packed[2]

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        packed, scales_zeros = self._kernel_weights()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group_size, scales_zeros)
        return y[:, : self.out_features]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


# --- whole models --------------------------------------------------------------------------------------


def quantize_model(model: nn.Module, bits: int = 8, group_size: int | None = None,
                   skip: Sequence[str] = ()) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by an :class:`Int8Linear` / :class:`Int4Linear`, in place (notebook 16).

    ``bits``: 8 (per output channel) or 4 (per group of ``group_size`` inputs, default
    64).  ``skip``: module names to keep in full precision, matched whole or by their
    last parts (``"lm_head"``, ``"o_proj"``, ``"blocks.0.mlp.up_proj"``).

    A tied LM head (``tie_embeddings``) gets its own quantized copy; the token
    embedding keeps its full-precision matrix (a lookup reads one row per token, so
    keeping it costs memory but no time).  Quantizing the head is the default: it is
    the largest matrix a GPT-2 reads per token (38M of 124M parameters), and measured
    (one thread) a GPT-2 124M decodes 26 tokens/s with it in int8 against 18 with it
    in fp32 (fp32 model: 19), while the course model's validation loss moves by
    +0.01% either way.  ``skip=("lm_head",)`` keeps it exact (and tied: 37 MiB less
    for GPT-2).  Returns ``model``, with ``model.quantization`` describing what was done.
    """
    bits, group_size = _check_bits(bits, group_size)
    if not isinstance(model, nn.Module):
        raise QuantizationError(f"model must be a torch.nn.Module (e.g. load_checkpoint().model), got "
                                f"{type(model).__name__}.")
    if getattr(model, "quantization", None) is not None:
        raise QuantizationError("this model is already quantized: quantize the full-precision model (load it "
                                "again) instead of quantizing twice.")
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise QuantizationError(f"skip must be a tuple of module names such as ('lm_head',), got {skip!r}.")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not _skipped(name, skip)]
    if not targets:
        raise QuantizationError("the model has no nn.Linear layer to quantize (or skip names all of them).")
    if bits == 4:  # check every layer before changing any
        for name, module in targets:
            _check_group_size(group_size, module.in_features, name)
    for name, module in targets:
        new = Int8Linear.from_linear(module) if bits == 8 else Int4Linear.from_linear(module, group_size)
        _set_submodule(model, name, new)
    model.quantization = {"bits": bits, "group_size": group_size, "skip": list(skip),
                          "modules": [name for name, _ in targets]}
    return model


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _quantized_skeleton(model: nn.Module, info: dict[str, Any]) -> None:
    """Swap the named ``nn.Linear`` layers for empty quantized ones of the same shapes (for loading)."""
    for name in info["modules"]:
        linear = model.get_submodule(name)
        dtype, device = linear.weight.dtype, linear.weight.device
        bias = linear.bias is not None
        if info["bits"] == 8:
            new: nn.Module = Int8Linear(linear.in_features, linear.out_features, bias, dtype, device)
        else:
            new = Int4Linear(linear.in_features, linear.out_features, bias, info["group_size"], dtype, device)
        _set_submodule(model, name, new)
    model.quantization = dict(info)


def _check_bits(bits: Any, group_size: Any) -> tuple[int, int | None]:
    if isinstance(bits, bool) or bits not in BITS:
        raise QuantizationError(f"bits must be 8 (int8, one scale per output channel) or 4 (int4, one scale per "
                                f"group of inputs), got {bits!r}.")
    if bits == 8:
        if group_size is not None:
            raise QuantizationError(f"int8 uses one scale per output channel, so group_size must be None, got "
                                    f"{group_size!r}; groups are for bits=4.")
        return 8, None
    return 4, DEFAULT_GROUP_SIZE if group_size is None else group_size


def _check_group_size(group_size: Any, in_features: int, name: str = "") -> int:
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise QuantizationError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))} (inputs per int4 "
                                f"scale), got {group_size!r}.")
    if in_features % group_size:
        where = f"layer {name!r}" if name else "the layer"
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = (f"use group_size {' or '.join(map(str, fits))}" if fits else
                f"keep it in full precision with skip=({name.rpartition('.')[2]!r},)")
        raise QuantizationError(f"group_size={group_size} does not divide {where}'s {in_features} inputs: {hint}.")
    return group_size


def _check_weight(weight: Any) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        what = f"shape {tuple(weight.shape)}, {weight.dtype}" if isinstance(weight, torch.Tensor) else \
            type(weight).__name__
        raise QuantizationError(f"a weight to quantize is a 2-D floating-point [out, in] matrix, got {what}.")
    if not bool(torch.isfinite(weight).all()):
        raise QuantizationError("the weight holds NaN or inf: the model is damaged (e.g. training diverged); "
                                "reload it before quantizing.")
    if weight.shape[1] % 2:
        raise QuantizationError(f"a weight with an odd number of inputs ({weight.shape[1]}) cannot be packed; "
                                "keep that layer in full precision (skip=...).")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's stored weights: parameters and saved buffers, each tensor once (notebook 16).

    A quantized model counts its int8/int4 codes *and* its scales and zeros; a tied
    matrix counts once.  Tables a model rebuilds itself (RoPE) are not counted.
    """
    seen: set[int] = set()
    total = 0
    persistent = {name for name, _ in model.named_buffers()}
    for module_name, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            persistent.discard(f"{module_name}.{name}" if module_name else name)
    tensors = [p for p in model.parameters()] + [b for name, b in model.named_buffers() if name in persistent]
    for tensor in tensors:
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def quantized_weight_bytes(config: ModelConfig, bits: int = 8, group_size: int | None = None,
                           skip: Sequence[str] = (), dtype: torch.dtype = torch.float32) -> int:
    """Bytes :func:`weight_bytes` would give for ``quantize_model(Transformer(config), bits, ...)``, without
    building it (the shapes come from a model on the ``meta`` device), e.g. for GPT-2 or Llama presets.

    Quantized layers count their codes (``bits / 8`` bytes per weight) plus scales (and zeros)
    of ``dtype``; everything else (embeddings, norms, biases) stays in ``dtype`` (notebook 16).
    """
    from llmlab.model import Transformer

    bits, group_size = _check_bits(bits, group_size)
    if not isinstance(config, ModelConfig):
        raise QuantizationError(f"config must be a ModelConfig (e.g. get_config('gpt2-124m')), got "
                                f"{type(config).__name__}.")
    with torch.device("meta"):
        model = Transformer(config)
    size = torch.empty((), dtype=dtype).element_size()
    embedding = model.token_embedding.weight
    replaced: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not _skipped(name, skip):
            n_out, n_in = module.out_features, module.in_features
            if bits == 8:
                total += n_out * n_in + n_out * size
            else:
                _check_group_size(group_size, n_in, name)
                total += n_out * n_in // 2 + 2 * n_out * (n_in // group_size) * size
            if module.weight is not embedding:  # a tied head's matrix stays, as the embedding
                replaced.add(id(module.weight))
    total += sum(p.numel() * size for p in model.parameters() if id(p) not in replaced)
    return total


# --- saving and loading --------------------------------------------------------------------------------


def save_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write a quantized model to a folder: ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``).

    ``config.json`` holds the model's config and ``model.quantization``; :func:`load_quantized`
    reads it back bit for bit.  An existing folder is replaced only if it holds an earlier
    quantized save (notebook 16).
    """
    from safetensors.torch import save_model

    info = getattr(model, "quantization", None)
    config = getattr(model, "config", None)
    if info is None or not isinstance(config, ModelConfig):
        raise QuantizationError("save_quantized() writes a model returned by quantize_model(); for a full-precision "
                                "model use llmlab.checkpoint.save_checkpoint().")
    if tokenizer is not None and getattr(tokenizer, "vocab_size", None) != config.vocab_size:
        raise QuantizationError(f"the tokenizer has {getattr(tokenizer, 'vocab_size', '?')} ids but the model's "
                                f"vocab_size is {config.vocab_size}: save the model with its own tokenizer.")
    directory = _as_dir(directory)
    if directory.exists():
        if not directory.is_dir():
            raise QuantizationError(f"{directory} is a file: choose a folder name for the quantized model.")
        foreign = [p.name for p in directory.iterdir() if p.name not in (WEIGHTS, CONFIG, TOKENIZER)]
        if foreign or ((directory / CONFIG).exists() and not _is_quantized_folder(directory)):
            raise QuantizationError(f"{directory} holds something else ({', '.join(sorted(foreign)) or CONFIG}): "
                                    "llmlab never replaces it. Choose another folder.")
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": 1, "model": config.to_dict(), "quantization": info}
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER)
        from llmlab.checkpoint import tokenizer_sha256

        meta["tokenizer_sha256"] = tokenizer_sha256(tokenizer)
    elif (directory / TOKENIZER).exists():
        (directory / TOKENIZER).unlink()  # an older save's tokenizer does not belong to this model
    save_model(model, str(directory / WEIGHTS), metadata={"format": FORMAT})
    (directory / CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


def load_quantized(directory: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Read a folder written by :func:`save_quantized`; returns the quantized Transformer in eval mode.

    The tokenizer, if one was saved, is ``BPETokenizer.load(directory / "tokenizer.json")``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from llmlab.model import Transformer

    directory = _as_dir(directory)
    if not directory.is_dir():
        raise QuantizationError(f"no quantized model at {directory}: write one with save_quantized(model, path).")
    info = _read_quantized_config(directory)
    try:
        config = ModelConfig.from_dict(info["model"])
        quant = info["quantization"]
        _check_bits(quant["bits"], quant["group_size"])
    except (KeyError, TypeError, ConfigError, QuantizationError) as err:
        raise QuantizationError(f"{directory / CONFIG} is corrupt ({err}); save the model again.") from err
    model = Transformer(config)
    _quantized_skeleton(model, quant)
    try:
        load_model(model, str(directory / WEIGHTS), strict=True, device="cpu")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise QuantizationError(f"the weights in {directory / WEIGHTS} do not load ({str(err).splitlines()[0]}); "
                                "the folder is damaged or mixes files from different saves.") from err
    return model.to(device).eval()


def _as_dir(value: Any) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise QuantizationError(f"give a folder path (str or pathlib.Path), got {value!r}.")
    return Path(value)


def _is_quantized_folder(directory: Path) -> bool:
    try:
        return json.loads((directory / CONFIG).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_quantized_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if not path.is_file() or not (directory / WEIGHTS).is_file():
        raise QuantizationError(f"{directory} is not a quantized model: it needs {WEIGHTS} and {CONFIG} "
                                "(written by save_quantized).")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QuantizationError(f"{path} is not readable JSON ({err}); save the model again.") from err
    found = info.get("format") if isinstance(info, dict) else None
    if found == "llmlab-checkpoint":
        raise QuantizationError(f"{directory} is a full-precision llmlab checkpoint: load it with load_checkpoint() "
                                "and quantize it with quantize_model().")
    if found != FORMAT:
        raise QuantizationError(f"{path} is not a quantized llmlab model (format {found!r}).")
    return info


# --- how much accuracy it costs ------------------------------------------------------------------------


@dataclass
class QuantizationReport:
    """The validation loss of a model before and after quantization, and how often they agree (notebook 16)."""

    loss_reference: float
    loss_quantized: float
    top1_agreement: float
    """Fraction of positions where both models' most likely next token is the same."""
    tokens: int
    bytes_reference: int
    bytes_quantized: int

    @property
    def relative_loss_change(self) -> float:
        return (self.loss_quantized - self.loss_reference) / self.loss_reference

    @property
    def perplexity_reference(self) -> float:
        return math.exp(self.loss_reference)

    @property
    def perplexity_quantized(self) -> float:
        return math.exp(self.loss_quantized)

    def summary(self) -> str:
        change = 100 * self.relative_loss_change
        return (f"loss {self.loss_reference:.4f} → {self.loss_quantized:.4f} ({change:+.2f}%), "
                f"perplexity {self.perplexity_reference:.2f} → {self.perplexity_quantized:.2f}, "
                f"top-1 agreement {100 * self.top1_agreement:.1f}% over {self.tokens:,} tokens, "
                f"weights {self.bytes_reference / 2**20:.2f} → {self.bytes_quantized / 2**20:.2f} MiB")


@torch.no_grad()
def quantization_report(model_reference: nn.Module, model_quantized: nn.Module,
                        batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> QuantizationReport:
    """Compare two models on ``batches`` of ``(ids, targets)`` (e.g. :func:`validation_batches`).

    Losses are means over every target token; agreement compares the argmax of
    the two models' logits at every position.
    """
    total_ref = total_q = 0.0
    agree = count = 0
    for ids, targets in batches:
        logits_ref = model_reference(ids).logits.float()
        logits_q = model_quantized(ids).logits.float()
        n = targets.numel()
        total_ref += float(F.cross_entropy(logits_ref.flatten(0, 1), targets.flatten(), reduction="sum"))
        total_q += float(F.cross_entropy(logits_q.flatten(0, 1), targets.flatten(), reduction="sum"))
        agree += int((logits_ref.argmax(-1) == logits_q.argmax(-1)).sum())
        count += n
    if count == 0:
        raise QuantizationError("batches is empty: give at least one (ids, targets) pair.")
    return QuantizationReport(total_ref / count, total_q / count, agree / count, count,
                              weight_bytes(model_reference), weight_bytes(model_quantized))


def validation_batches(tokenizer, block_size: int = 256, batch_size: int = 8, max_batches: int | None = None,
                       val_fraction: float = 0.1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows of the tiny Shakespeare validation split, as ``(ids, targets)`` pairs.

    The split is the one training uses (the last ``val_fraction`` of the tokens), cut
    into non-overlapping windows of ``block_size`` (as ``Trainer.evaluate_full``).
    """
    from llmlab.data import load_corpus, train_val_split

    ids = torch.tensor(tokenizer.encode(load_corpus()), dtype=torch.long)
    _, val = train_val_split(ids, val_fraction)
    n_windows = (len(val) - 1) // block_size
    windows = [val[i * block_size: i * block_size + block_size + 1] for i in range(n_windows)]
    batches = []
    for start in range(0, len(windows), batch_size):
        chunk = torch.stack(windows[start: start + batch_size])
        batches.append((chunk[:, :-1], chunk[:, 1:]))
        if max_batches is not None and len(batches) >= max_batches:
            break
    return batches

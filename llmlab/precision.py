"""Which precision a model runs in — fp32, bf16, or int8/int4 weight-only — and the fastest one here.

Taught in notebook 16 (making it fast).  Decoding reads every weight once per
token, so fewer bytes per weight means more tokens per second, as long as the
hardware multiplies the smaller numbers natively:

* **bf16** halves the bytes; it is fast where the hardware has bf16 matrix units (GPUs,
  CPUs with AVX-512-BF16 or AMX) and emulated, so slower than fp32, elsewhere;
* **int8 weight-only** quarters them (one scale per output channel) and runs on
  PyTorch's CPU int8 kernel — the fast choice on a CPU without bf16 units;
* **int4** (groups of 64) shrinks them further, but no fast CPU kernel exists for
  it on AVX2 machines: smaller, not faster.

:func:`choose` turns ``--precision auto`` into the fast precision of the device
(:func:`fast_precision`) unless something needs the full-precision model; the
validation loss of the course model changes by +0.01% in int8 and +0.00% in bf16
(measured in notebook 16), far inside the 1% the course allows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from llmlab.errors import LlmlabError

PRECISIONS = ("auto", "fp32", "bf16", "int8", "int4")
"""What ``--precision`` accepts; ``auto`` is :func:`fast_precision`."""


class PrecisionError(LlmlabError, ValueError):
    """A precision that does not exist, or cannot run as asked (the message says what to use)."""


@functools.cache
def has_native_bf16() -> bool:
    """True on a CPU with bf16 matrix units (AVX-512-BF16 or AMX); on AVX2 alone bf16 is emulated."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            flags = file.read()
    except OSError:  # not Linux: ask PyTorch what it would use
        return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")
    return " avx512_bf16" in flags or " amx_bf16" in flags


def fast_precision(device: torch.device | str = "cpu") -> str:
    """The precision that decodes fastest on ``device`` while keeping quality: bf16 on a GPU or a CPU
    with bf16 units, int8 weight-only on any other CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "mps":
        return "fp32"  # (PyTorch's int8 kernel and bf16 on Apple GPUs vary by release: the safe choice)
    return "bf16" if has_native_bf16() else "int8"


@dataclass(frozen=True)
class Choice:
    """The precision a command runs in, and why — printed so the user always knows which path ran."""

    precision: str
    reason: str

    def describe(self) -> str:
        return f"precision {self.precision} ({self.reason})"


def choose(requested: str, device: torch.device | str = "cpu", *, full_precision_for: str | None = None) -> Choice:
    """``requested`` as given, or for ``auto`` the device's :func:`fast_precision`.

    ``full_precision_for`` names what needs the model as loaded (``"--tp"``, ``"--compile"``,
    ``"--dtype"``): ``auto`` then keeps it, saying so.
    """
    if requested not in PRECISIONS:
        raise PrecisionError(f"unknown precision {requested!r}: use one of {', '.join(PRECISIONS)}.")
    if requested != "auto":
        return Choice(requested, "as asked with --precision")
    if full_precision_for is not None:
        return Choice("as loaded", f"{full_precision_for} runs the model as loaded; --precision int8 or bf16 to change")
    fast = fast_precision(device)
    why = {"int8": "weight-only, per channel: the fastest on this CPU, which has no bf16 units",
           "bf16": "this device multiplies bf16 natively",
           "fp32": "the safe choice on this device"}[fast]
    return Choice(fast, f"{why}; --precision fp32 runs the exact model")


def apply(model: nn.Module, precision: str) -> nn.Module:
    """``model`` in ``precision`` (in place where it can be): cast for fp32/bf16, quantized for int8/int4."""
    if precision == "as loaded":
        return model
    if precision == "fp32":
        return model.float()
    if precision == "bf16":
        return model.to(torch.bfloat16)
    if precision in ("int8", "int4"):
        from llmlab.quant import quantize_model

        return quantize_model(model, bits=8 if precision == "int8" else 4)
    raise PrecisionError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS[1:])}.")


__all__ = ["Choice", "PRECISIONS", "PrecisionError", "apply", "choose", "fast_precision", "has_native_bf16"]

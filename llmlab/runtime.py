"""Where the course runs: device choice, seeding, fast mode, optional Triton.

Taught in notebook 00 (welcome and environment check).  Every other module asks
these helpers instead of deciding for itself, so the whole package agrees on
one device, one seed and one notion of "fast mode".
"""

from __future__ import annotations

import os
import random
from functools import lru_cache

import numpy as np
import torch

FAST_ENV = "LLMLAB_FAST"
"""Environment variable that turns fast mode on ("1") or off ("0")."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def fast_mode() -> bool:
    """True when notebooks should shrink training steps and benchmark sizes.

    ``LLMLAB_FAST`` decides when it is set; otherwise fast mode follows ``CI``
    (CI services set ``CI=true``).  Fast mode shrinks sizes, never checks.
    """
    value = os.environ.get(FAST_ENV)
    if value is None:
        value = os.environ.get("CI", "")
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{FAST_ENV} (or CI) is {value!r}; set it to 1/true/yes/on or 0/false/no/off."
    )


def pick(full, fast):
    """Return ``fast`` in fast mode and ``full`` otherwise (e.g. ``steps = pick(2000, 20)``)."""
    return fast if fast_mode() else full


def device(prefer: str | None = None) -> torch.device:
    """The device the course computes on: CUDA when present, else CPU.

    ``prefer`` (or the ``LLMLAB_DEVICE`` environment variable) forces a choice,
    e.g. ``"cpu"`` on a GPU machine; asking for CUDA where there is none is an error.
    """
    choice = prefer or os.environ.get("LLMLAB_DEVICE")
    if choice:
        dev = torch.device(choice)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device {choice!r} was asked for but CUDA is not available here; "
                "use 'cpu' or unset LLMLAB_DEVICE."
            )
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) and return a seeded CPU generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton imports and can run: on CUDA, or on CPU under ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install on an odd platform
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def environment_report() -> dict[str, str]:
    """Versions and hardware, as a dict (notebook 00 prints it)."""
    report = {
        "python": f"{__import__('sys').version.split()[0]}",
        "torch": torch.__version__,
        "device": str(device()),
        "cpu threads": str(torch.get_num_threads()),
        "fast mode": str(fast_mode()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception:
        report["triton"] = "not installed (plain-torch paths are used)"
    try:
        import tiktoken

        report["tiktoken"] = tiktoken.__version__
    except Exception:
        report["tiktoken"] = "not installed"
    return report

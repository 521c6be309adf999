"""Where the course runs: device choice, seeding, fast mode, optional Triton.

Taught in notebook 00 (welcome and environment check).  Every other module asks
these helpers instead of deciding for itself, so the whole package agrees on
one device, one seed and one notion of "fast mode".
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from llmlab.errors import LlmlabError, require_int

FAST_ENV = "LLMLAB_FAST"
"""Environment variable that turns fast mode on ("1") or off ("0")."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

DEVICE_ENV = "LLMLAB_DEVICE"
"""Environment variable that forces a device ("cpu", "cuda", "cuda:1", "mps")."""

MAX_SEED = 2**32 - 1
"""NumPy's ``np.random.seed`` takes 0 … 2**32 - 1, so :func:`seed_everything` does too."""


class SettingError(LlmlabError, ValueError):
    """An environment setting or runtime argument (LLMLAB_FAST, a seed) that cannot be used."""


class DeviceError(SettingError, RuntimeError):
    """A device that does not exist or is not available here (the message says what to use instead)."""


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
    raise SettingError(
        f"{FAST_ENV} (or CI) is {value!r}; set it to 1/true/yes/on or 0/false/no/off."
    )


def pick(full, fast):
    """Return ``fast`` in fast mode and ``full`` otherwise (e.g. ``steps = pick(2000, 20)``)."""
    return fast if fast_mode() else full


def device(prefer: str | None = None) -> torch.device:
    """The device the course computes on: CUDA when present, else CPU.

    ``prefer`` (or the ``LLMLAB_DEVICE`` environment variable) forces a choice,
    e.g. ``"cpu"`` on a GPU machine; a device that is not there is a :class:`DeviceError`.
    """
    if prefer:
        return _available(prefer, "device")
    if os.environ.get(DEVICE_ENV):
        return _available(os.environ[DEVICE_ENV], DEVICE_ENV)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _available(choice: str | torch.device, source: str) -> torch.device:
    """``choice`` as a torch.device, or :class:`DeviceError` saying why it cannot be used here.

    ``source`` names where the choice came from (the argument, or ``LLMLAB_DEVICE``).
    """
    fix = "unset LLMLAB_DEVICE or set it to 'cpu'" if source == DEVICE_ENV else "use 'cpu'"
    if not isinstance(choice, (str, torch.device)):
        raise DeviceError(f"{source} must be a device name such as 'cpu' or 'cuda', got {choice!r} "
                          f"({type(choice).__name__}).")
    try:
        dev = torch.device(choice)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"{source} {choice!r} is not a device torch knows: {fix}, or 'cuda' "
                          "('cuda:1' for the second GPU) on a machine with an NVIDIA GPU.") from None
    if dev.type == "meta":
        raise DeviceError(f"{source} {choice!r} holds tensor shapes only, no numbers, so nothing can be computed "
                          f"on it: {fix}.")
    backend = getattr(torch, dev.type, None) if dev.type != "cpu" else None
    if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        raise DeviceError(f"{source} {choice!r} was asked for but {dev.type.upper()} is not available here: "
                          f"{fix}.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"{source} {choice!r} does not exist: this machine has {torch.cuda.device_count()} "
                          "GPU(s), numbered from cuda:0.")
    return dev


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) and return a seeded CPU generator.

    ``seed`` is an integer in 0 … 2**32 - 1 (NumPy's range), else :class:`SettingError`.
    """
    require_int("seed", seed, minimum=0, maximum=MAX_SEED, error=SettingError)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def triton_available() -> bool:
    """True when Triton imports and can run: on CUDA, or on CPU in its interpreter (``TRITON_INTERPRET=1``).

    Asks :mod:`llmlab.kernels.dispatch`, the one place that knows (notebook 13).
    """
    from llmlab.kernels.dispatch import interpret_requested, triton_importable

    return triton_importable() and (torch.cuda.is_available() or interpret_requested())


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

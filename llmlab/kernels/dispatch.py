"""The one dispatch point of every kernel: compiled Triton, Triton's interpreter, or the plain-torch reference.

Taught in notebook 13 (Triton kernels).  Each kernel module holds three things
side by side: the Triton kernel, its plain-torch reference, and a public
function that asks :func:`dispatch` which of the two runs.  There are three
backends:

- ``"triton"``    — the kernel compiled for the GPU (CUDA tensors only);
- ``"interpret"`` — the *same* kernel run by Triton's interpreter, one program
  after another in NumPy, on CPU tensors: slow, but it runs anywhere Triton is
  installed, so the kernels can be tested and stepped through without a GPU;
- ``"torch"``     — the reference, which is what runs where Triton is missing.

**Who chooses.**  By default (``"auto"``): the interpreter when Triton's own switch
``TRITON_INTERPRET=1`` is on, compiled Triton for CUDA tensors, torch otherwise.
A caller can ask for a backend by name, in this order of precedence:

1. ``backend=`` on a kernel call (``softmax(x, backend="interpret")``);
2. ``with use_backend("interpret"): ...`` for a block of code in this process;
3. the environment variable ``LLMLAB_KERNELS=auto|triton|interpret|torch``.

**Why the kernels are jitted lazily.**  Triton decides interpreted-or-compiled
when ``@triton.jit`` *decorates* a function (it reads ``triton.knobs.runtime.interpret``,
i.e. ``TRITON_INTERPRET``, at that moment).  A module-level ``@triton.jit`` would
fix the mode at import time, so ``TRITON_INTERPRET=1`` set later in the same
process would change nothing.  Kernels are therefore decorated with
:func:`triton_kernel`, which keeps the plain Python function and jits it on
first use, once per mode — the same source serves both.  Triton's own helpers
(``tl.max``, ``tl.sum``, …) are ``@triton.jit`` functions too, decorated when
``triton.language`` is imported, so interpreted launches run inside
:func:`_interpreting`, which lets the interpreter call them.

Triton is optional: without it this module still imports, the torch backend
works, and asking for ``"triton"`` or ``"interpret"`` is a
:class:`KernelUnavailableError` that says what to do.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from llmlab.errors import LlmlabError

try:  # Triton ships for Linux x86_64 (with CUDA wheels); elsewhere the torch references run
    import triton
    import triton.language as tl
except Exception as error:  # ImportError, or a broken install on an odd platform
    triton = None
    tl = None
    _TRITON_MISSING = f"{type(error).__name__}: {error}"
else:
    _TRITON_MISSING = ""

T = TypeVar("T")

BACKENDS = ("triton", "interpret", "torch")
"""What can run a kernel: compiled Triton, Triton's interpreter, the plain-torch reference."""

KERNELS_ENV = "LLMLAB_KERNELS"
"""Environment variable that asks for a backend: ``auto`` (the default), ``triton``, ``interpret`` or ``torch``."""

_CHOICES = ("auto",) + BACKENDS
_TRUE = {"1", "true", "yes", "on"}
_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmlab_kernels_backend", default=None)


class KernelError(LlmlabError, ValueError):
    """A kernel called with inputs it cannot take (shapes, dtypes, devices), or an unknown backend name."""


class KernelUnavailableError(LlmlabError, RuntimeError):
    """A backend that cannot run here: Triton not installed, or compiled Triton asked for CPU tensors."""


def triton_importable() -> bool:
    """True when ``import triton`` worked (it says nothing about a GPU)."""
    return triton is not None


def interpret_requested() -> bool:
    """True when Triton's own switch asks for its interpreter (``TRITON_INTERPRET=1``, or its knob set in code)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # Triton ≥ 3.4: the knob reads TRITON_INTERPRET unless code set it
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def _checked(name: Any, source: str) -> str:
    """``name`` as a backend choice, or :class:`KernelError` naming where it came from."""
    choice = name.strip().lower() if isinstance(name, str) else name
    if choice not in _CHOICES:
        raise KernelError(f"{source} is {name!r}; use one of {', '.join(map(repr, _CHOICES))}.")
    return choice


def requested_backend() -> str:
    """What the caller asked for: :func:`use_backend`'s choice, else ``LLMLAB_KERNELS``, else ``"auto"``."""
    inside = _requested.get()
    if inside is not None:
        return inside
    return _checked(os.environ.get(KERNELS_ENV, "auto") or "auto", KERNELS_ENV)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every kernel inside the ``with`` block on backend ``name`` (or ``"auto"``); restored after.

    >>> with use_backend("interpret"):   # the Triton kernel, interpreted on CPU
    ...     y = softmax(x)
    """
    token = _requested.set(_checked(name, "use_backend(name)"))
    try:
        yield
    finally:
        _requested.reset(token)


def backend_for(tensor: torch.Tensor, backend: str | None = None) -> str:
    """The backend that will run a kernel on ``tensor``: ``"triton"``, ``"interpret"`` or ``"torch"``.

    ``backend`` (a name or ``"auto"``) overrides :func:`requested_backend`.  A
    backend asked for by name that cannot run here is a :class:`KernelUnavailableError`.
    """
    choice = requested_backend() if backend is None else _checked(backend, "backend")
    if choice == "auto":
        if triton is not None and interpret_requested():
            return "interpret"
        if triton is not None and tensor.is_cuda:
            return "triton"
        return "torch"
    if choice != "torch" and triton is None:
        raise KernelUnavailableError(
            f"The {choice!r} kernel backend needs Triton, which does not import here ({_TRITON_MISSING}). "
            "Install it (pip install triton; wheels exist for Linux x86_64), or use the plain-torch "
            f"backend: backend='torch', use_backend('torch') or {KERNELS_ENV}=torch.")
    if choice == "triton" and not tensor.is_cuda:
        raise KernelUnavailableError(
            f"Compiled Triton kernels run on CUDA tensors, and this one is on {tensor.device}. "
            "Move the tensors to a GPU (.to('cuda')), or run the same kernel in Triton's interpreter "
            "on CPU: backend='interpret' (or use_backend('interpret'), or TRITON_INTERPRET=1).")
    return choice


def dispatch(reference: Callable[..., T], launch: Callable[..., T], *args: Any,
             backend: str | None = None, **kwargs: Any) -> T:
    """Run one kernel call on the backend :func:`backend_for` picks for ``args[0]``.

    ``"torch"`` calls ``reference(*args, **kwargs)``; the Triton backends call
    ``launch(*args, mode=..., **kwargs)`` with ``mode`` ``"triton"`` or ``"interpret"``,
    on the tensors' own GPU when compiled.  Every public kernel function is one call of this.
    """
    mode = backend_for(args[0], backend)
    if mode == "torch":
        return reference(*args, **kwargs)
    if mode == "triton":
        with torch.cuda.device(args[0].device):  # launch on the GPU that holds the tensors
            return launch(*args, mode=mode, **kwargs)
    with _interpreting():
        return launch(*args, mode=mode, **kwargs)


class TritonKernel:
    """A Triton kernel's Python source, jitted on first use once per mode (see the module docstring).

    ``kernel.jit("triton")`` is the compiled kernel, ``kernel.jit("interpret")`` the
    interpreted one; either is launched the usual way, ``kernel.jit(mode)[grid](...)``.
    """

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn  # inspect.getsource and show() reach the kernel's own source
        self._jitted: dict[str, Any] = {}

    def jit(self, mode: str) -> Any:
        """The kernel jitted for ``mode`` (``"triton"`` or ``"interpret"``), built on first use."""
        if mode not in ("triton", "interpret"):
            raise KernelError(f"A Triton kernel runs compiled ('triton') or interpreted ('interpret'), not {mode!r}.")
        if triton is None:
            raise KernelUnavailableError("Triton is not installed: use the torch backend (backend='torch').")
        if mode not in self._jitted:
            self._jitted[mode] = _jit(self.fn, interpret=mode == "interpret")
        return self._jitted[mode]

    def __repr__(self) -> str:
        return f"TritonKernel({self.__name__}, jitted for {sorted(self._jitted) or 'nothing yet'})"


@contextlib.contextmanager
def _interpreting() -> Iterator[None]:
    """Triton's interpreter switched on for the launches inside, as if ``TRITON_INTERPRET=1`` had been set.

    Triton's own helpers (``tl.max``, ``tl.sum``, ``tl.cdiv``, …) are ``@triton.jit``
    functions decorated once, when ``triton.language`` is imported; unless the
    process started with ``TRITON_INTERPRET=1`` they are compiled-mode functions,
    which refuse to be called from Python.  Inside this block a call to one runs
    its source through the interpreter instead, and the knob reads "interpret".
    Not thread-safe: it patches Triton for the duration of one launch.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def call_interpreted(self: JITFunction, *args: Any, **kwargs: Any) -> Any:
        if self.fn not in _INTERPRETED_HELPERS:
            _INTERPRETED_HELPERS[self.fn] = InterpretedFunction(self.fn)
        return _INTERPRETED_HELPERS[self.fn](*args, **kwargs)

    compiled_call = JITFunction.__call__
    JITFunction.__call__ = call_interpreted
    try:
        knobs = getattr(triton, "knobs", None)
        with knobs.runtime.scope() if knobs is not None else contextlib.nullcontext():
            if knobs is not None:
                knobs.runtime.interpret = True
            yield
    finally:
        JITFunction.__call__ = compiled_call


_INTERPRETED_HELPERS: dict[Callable[..., Any], Any] = {}


def triton_kernel(fn: Callable[..., None]) -> TritonKernel:
    """Decorator for a kernel, used instead of ``@triton.jit`` so one source runs compiled and interpreted."""
    return TritonKernel(fn)


def _jit(fn: Callable[..., None], interpret: bool) -> Any:
    """``triton.jit(fn)`` with the interpreter switched on or off for this one decoration."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # Triton ≥ 3.4; scope() restores the knob and TRITON_INTERPRET afterwards
        with knobs.runtime.scope():
            knobs.runtime.interpret = interpret
            return triton.jit(fn)
    before = os.environ.get("TRITON_INTERPRET")  # older Triton reads the variable itself
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        return triton.jit(fn)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def same_device(**tensors: torch.Tensor) -> torch.device:
    """The one device all ``tensors`` are on, or :class:`KernelError` naming them."""
    devices = {name: tensor.device for name, tensor in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise KernelError(f"A kernel's tensors must share one device; got {listed}. Move them with .to(device).")
    return next(iter(devices.values()))


KERNEL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
"""Float dtypes the attention and softmax kernels take: they load these and accumulate in fp32."""


def require_kernel_float(kernel: str, tensor: torch.Tensor) -> None:
    """:class:`KernelError` unless ``tensor`` is fp16/bf16/fp32 (float64 would silently lose digits in fp32)."""
    if tensor.dtype not in KERNEL_FLOATS:
        raise KernelError(f"The {kernel} Triton kernel takes float16, bfloat16 or float32 tensors (it accumulates in "
                          f"float32); got {tensor.dtype}. Cast, or run the reference: backend='torch'.")


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ ``n`` (≥ 1): ``tl.arange`` tiles must be powers of two, so edges are masked."""
    return 1 << max(0, int(n) - 1).bit_length()

"""Vector addition: the first Triton kernel — programs, blocks, masks and the grid.

Taught in notebook 13 (Triton kernels).  A Triton kernel is written for *one
program*; the launch grid says how many programs run.  Here each program adds
``BLOCK`` consecutive elements, so ``cdiv(n, BLOCK)`` programs cover the vector,
and the last one masks the elements past the end.
"""

from __future__ import annotations

import torch

from llmlab.kernels.dispatch import KernelError, dispatch, same_device, tl, triton, triton_kernel

BLOCK = 1024
"""Elements per program (a power of two, as ``tl.arange`` requires)."""


@triton_kernel
def vector_add_kernel(x_ptr, y_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    """Program ``pid`` writes ``out[pid*BLOCK : (pid+1)*BLOCK] = x[...] + y[...]``."""
    pid = tl.program_id(axis=0)  # which block of BLOCK elements this program adds
    offsets = pid * BLOCK + tl.arange(0, BLOCK)  # the element indices it owns
    mask = offsets < n_elements  # the last block may run past the end: those lanes do nothing
    x = tl.load(x_ptr + offsets, mask=mask)  # reads BLOCK elements of x from HBM (masked lanes read nothing)
    y = tl.load(y_ptr + offsets, mask=mask)  # reads BLOCK elements of y
    tl.store(out_ptr + offsets, x + y, mask=mask)  # writes BLOCK elements of out


def vector_add_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What the kernel must equal: ``x + y``."""
    return x + y


def vector_add(x: torch.Tensor, y: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``x + y`` for two tensors of one shape, dtype and device, on the backend the dispatch point picks."""
    if x.shape != y.shape or x.dtype != y.dtype:
        raise KernelError(f"vector_add needs two tensors of one shape and dtype; got {tuple(x.shape)} {x.dtype} "
                          f"and {tuple(y.shape)} {y.dtype}.")
    same_device(x=x, y=y)
    return dispatch(vector_add_reference, _launch, x, y, backend=backend)


def _launch(x: torch.Tensor, y: torch.Tensor, *, mode: str) -> torch.Tensor:
    x, y = x.contiguous(), y.contiguous()  # the kernel walks memory in order
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK),)  # one program per block of BLOCK elements
        vector_add_kernel.jit(mode)[grid](x, y, out, n, BLOCK=BLOCK)
    return out


def vector_add_bytes(n_elements: int, dtype: torch.dtype) -> int:
    """HBM bytes one ``vector_add`` moves: read ``x`` and ``y``, write ``out`` — ``3 · n · element size``.

    Two FLOP-free reads per add: the kernel is bound by memory bandwidth, not arithmetic.
    """
    return 3 * n_elements * dtype.itemsize

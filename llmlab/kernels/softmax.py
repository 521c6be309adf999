"""Fused row softmax: one program per row, the whole row read once, kept in registers, written once.

Taught in notebook 13 (Triton kernels).  Eager PyTorch computes a softmax as
several kernels (max, subtract, exp, sum, divide), each reading its input from
HBM and writing its output back; the fused kernel reads each element once and
writes it once.  :func:`softmax_bytes` and :func:`softmax_eager_bytes` count the
difference.  The row's maximum is subtracted first so ``exp`` never overflows;
rows whose width is not a power of two are padded with ``-inf`` lanes, which
``exp`` turns into zeros.
"""

from __future__ import annotations

import torch

from llmlab.kernels.dispatch import KernelError, dispatch, next_power_of_2, require_kernel_float, tl, triton_kernel


@triton_kernel
def softmax_kernel(out_ptr, x_ptr, x_row_stride, out_row_stride, n_cols, BLOCK: tl.constexpr):
    """Program ``row`` writes ``softmax(x[row])``; ``BLOCK`` is ``n_cols`` rounded up to a power of two."""
    row = tl.program_id(axis=0)  # one program per row
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols  # lanes past the row's end
    # reads the whole row from HBM, once; padding lanes hold -inf so they add exp(-inf) = 0 below
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
    x = x - tl.max(x, axis=0)  # subtract the row's maximum: the largest exponent is exp(0) = 1
    numerator = tl.exp(x)
    denominator = tl.sum(numerator, axis=0)
    y = numerator / denominator
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)  # writes the row


def softmax_reference(x: torch.Tensor) -> torch.Tensor:
    """What the kernel must equal: ``torch.softmax`` over the last dimension, in fp32, cast back."""
    return torch.softmax(x.float(), dim=-1).to(x.dtype)


def softmax(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Softmax over the last dimension of ``x`` (any leading shape), on the backend the dispatch point picks."""
    if x.dim() == 0 or x.shape[-1] == 0:
        raise KernelError(f"softmax needs at least one element per row; got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise KernelError(f"softmax needs a floating-point tensor; got {x.dtype}.")
    return dispatch(softmax_reference, _launch, x, backend=backend)


def _launch(x: torch.Tensor, *, mode: str) -> torch.Tensor:
    require_kernel_float("softmax", x)
    n_cols = x.shape[-1]
    rows = x.reshape(-1, n_cols)
    if rows.stride(1) != 1:  # the kernel reads each row as one contiguous run
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if len(rows):
        grid = (len(rows),)  # one program per row
        softmax_kernel.jit(mode)[grid](out, rows, rows.stride(0), out.stride(0), n_cols,
                                       BLOCK=next_power_of_2(n_cols))
    return out.view(x.shape)


def softmax_bytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    """HBM bytes the fused kernel moves: each element read once and written once, ``2 · rows · cols · size``."""
    return 2 * rows * cols * dtype.itemsize


def softmax_eager_bytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    """HBM bytes of softmax as five eager kernels, each reading its inputs and writing its output.

    ``m = x.max(-1)`` reads ``rows·cols``, writes ``rows``; ``z = x - m`` reads
    ``rows·cols + rows``, writes ``rows·cols``; ``e = exp(z)`` reads and writes
    ``rows·cols``; ``s = e.sum(-1)`` reads ``rows·cols``, writes ``rows``;
    ``e / s`` reads ``rows·cols + rows``, writes ``rows·cols``.  In all
    ``8 · rows · cols + 4 · rows`` elements: about four times the fused kernel.
    """
    return (8 * rows * cols + 4 * rows) * dtype.itemsize

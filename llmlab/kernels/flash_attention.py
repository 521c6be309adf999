"""FlashAttention forward (prefill): attention tiled over queries and keys, never writing the N×N scores.

Taught in notebook 13 (Triton kernels); attention itself is notebooks 04–05.
Standard attention writes the ``seq_q × seq_k`` score matrix to HBM, reads it
back for the softmax, writes the weights, reads them again for ``weights @ V``.
Here one program owns a tile of ``BLOCK_M`` queries of one head, keeps them in
registers, and walks the keys ``BLOCK_N`` at a time with an online softmax
(running max ``m``, running sum ``total``, running output ``acc``, rescaled by
``exp(m_old - m_new)`` when the max grows).  Scores live only in registers, one
``BLOCK_M × BLOCK_N`` tile at a time; :func:`flash_attention_hbm_bytes` and
:func:`standard_attention_hbm_bytes` count what that saves.

Conventions are the model's (:func:`~llmlab.layers.attention.causal_mask`): the
``seq_q`` queries are the *last* ``seq_q`` of the ``seq_k`` positions, so query
``i`` sees keys ``0 .. seq_k - seq_q + i`` (bottom-right aligned).  Grouped KV
heads (GQA/MQA) are shared by index — query head ``h`` reads KV head
``h // (n_heads // n_kv_heads)`` — nothing is copied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmlab.kernels.dispatch import (
    KernelError,
    dispatch,
    next_power_of_2,
    require_kernel_float,
    same_device,
    tl,
    triton,
    triton_kernel,
)
from llmlab.layers.attention import causal_mask, repeat_kv

BLOCK_M = 32
"""Queries per program (a power of two ≥ 16, as ``tl.dot`` requires)."""

BLOCK_N = 32
"""Keys per step of a program's loop (a power of two ≥ 16)."""


@triton_kernel
def flash_attention_kernel(out_ptr, q_ptr, k_ptr, v_ptr, scale,
                           q_batch_stride, q_head_stride, q_seq_stride,
                           k_batch_stride, k_head_stride, k_seq_stride,
                           v_batch_stride, v_head_stride, v_seq_stride,
                           out_batch_stride, out_head_stride, out_seq_stride,
                           n_heads, group, seq_q, seq_k, head_dim,
                           CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           DIM: tl.constexpr):
    """Program ``(tile, batch·n_heads + head)`` writes the outputs of queries ``tile·BLOCK_M ...`` of one head.

    ``DIM`` is ``head_dim`` rounded up to a power of two ≥ 16 (the extra lanes are masked to zero).
    """
    tile = tl.program_id(axis=0)  # which BLOCK_M queries
    batch_head = tl.program_id(axis=1)
    batch = batch_head // n_heads
    head = batch_head % n_heads
    kv_head = head // group  # GQA: the query heads of a group read one KV head
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query indices
    row_ok = rows < seq_q
    dims = tl.arange(0, DIM)
    dim_ok = dims < head_dim
    q_base = q_ptr + batch * q_batch_stride + head * q_head_stride
    k_base = k_ptr + batch * k_batch_stride + kv_head * k_head_stride
    v_base = v_ptr + batch * v_batch_stride + kv_head * v_head_stride
    # reads this tile's queries once: [BLOCK_M, DIM]
    q = tl.load(q_base + rows[:, None] * q_seq_stride + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max score per query
    total = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_M, DIM], dtype=tl.float32)  # running sum of exp(score - m) · value
    shift = seq_k - seq_q  # query i is position shift + i among the keys
    end = seq_k
    if CAUSAL:  # keys after the tile's last query are never visible: stop before them
        end = tl.minimum(seq_k, (tile + 1) * BLOCK_M + shift)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key indices
        col_ok = cols < seq_k
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * k_seq_stride + dims[None, :], mask=kv_mask, other=0.0)  # reads keys
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_M, BLOCK_N], fp32, registers only
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + shift)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        rescale = tl.exp(m - m_new)  # shrinks the old sums when the max grows (exp(-inf) = 0 at first)
        weights = tl.exp(scores - m_new[:, None])
        total = total * rescale + tl.sum(weights, axis=1)
        v = tl.load(v_base + cols[:, None] * v_seq_stride + dims[None, :], mask=kv_mask, other=0.0)  # reads values
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision="ieee")
        m = m_new

    out = acc / total[:, None]
    out_base = out_ptr + batch * out_batch_stride + head * out_head_stride
    tl.store(out_base + rows[:, None] * out_seq_stride + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])  # writes this tile's outputs, once


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                              scale: float | None = None) -> torch.Tensor:
    """What the kernel must equal: PyTorch's attention (fp32 or wider), the model's causal mask, copied KV heads."""
    n_rep = q.shape[1] // k.shape[1]
    mask = causal_mask(q.shape[2], k.shape[2], device=q.device) if causal else None
    work = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 computed in fp32, like the kernel; fp64 kept
    out = F.scaled_dot_product_attention(q.to(work), repeat_kv(k.to(work), n_rep), repeat_kv(v.to(work), n_rep),
                                         attn_mask=mask, scale=scale)
    return out.to(q.dtype)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: float | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Attention of ``q`` over ``k`` and ``v``, tiled (FlashAttention forward); ``[batch, n_heads, seq_q, head_dim]``.

    ``q`` is ``[batch, n_heads, seq_q, head_dim]``, ``k`` and ``v`` ``[batch, n_kv_heads, seq_k, head_dim]``
    (``n_kv_heads`` divides ``n_heads``).  With ``causal`` the queries are the last ``seq_q``
    positions (``seq_q ≤ seq_k``).  ``scale`` defaults to ``1/sqrt(head_dim)``.
    """
    _check(q, k, v, causal)
    return dispatch(flash_attention_reference, _launch, q, k, v, causal, scale, backend=backend)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise KernelError(f"flash_attention needs q [batch, n_heads, seq_q, head_dim] and k, v [batch, n_kv_heads, "
                          f"seq_k, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if q.shape[1] % k.shape[1]:
        raise KernelError(f"{k.shape[1]} KV heads cannot be shared evenly by {q.shape[1]} query heads: "
                          "n_kv_heads must divide n_heads.")
    if k.shape[2] == 0 or (causal and q.shape[2] > k.shape[2]):
        raise KernelError(f"flash_attention needs at least one key, and with causal=True no more queries than keys "
                          f"(the queries are the last positions); got seq_q={q.shape[2]}, seq_k={k.shape[2]}.")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise KernelError(f"flash_attention needs q, k and v in one dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    same_device(q=q, k=k, v=v)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None, *,
            mode: str) -> torch.Tensor:
    require_kernel_float("flash attention", q)
    batch, n_heads, seq_q, head_dim = q.shape
    q, k, v = (x if x.stride(3) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel():
        grid = (triton.cdiv(seq_q, BLOCK_M), batch * n_heads)  # one program per (query tile, batch, head)
        flash_attention_kernel.jit(mode)[grid](
            out, q, k, v, 1.0 / math.sqrt(head_dim) if scale is None else float(scale),
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            n_heads, n_heads // k.shape[1], seq_q, k.shape[2], head_dim,
            CAUSAL=bool(causal), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DIM=max(16, next_power_of_2(head_dim)))
    return out


def flash_attention_hbm_bytes(batch: int, n_heads: int, n_kv_heads: int, seq_q: int, seq_k: int, head_dim: int,
                              dtype: torch.dtype) -> int:
    """HBM bytes of fused attention: read Q, K, V once and write O once; the scores never leave the chip.

    ``(2 · batch · n_heads · seq_q + 2 · batch · n_kv_heads · seq_k) · head_dim`` elements.  (It
    counts each K/V tile once, as if re-reads by other query tiles hit the on-chip L2 cache.)
    """
    return (2 * batch * n_heads * seq_q + 2 * batch * n_kv_heads * seq_k) * head_dim * dtype.itemsize


def standard_attention_hbm_bytes(batch: int, n_heads: int, n_kv_heads: int, seq_q: int, seq_k: int,
                                 head_dim: int, dtype: torch.dtype) -> int:
    """HBM bytes of attention as three eager kernels: ``S = QKᵀ``, ``P = softmax(S)``, ``O = P V``.

    The same Q, K, V, O traffic as :func:`flash_attention_hbm_bytes`, plus the
    ``batch · n_heads · seq_q · seq_k`` score matrix four times: ``S`` written,
    read by the softmax, ``P`` written, read by ``P V`` (scores in ``dtype``; a
    fused softmax, not :func:`~llmlab.kernels.softmax.softmax_eager_bytes`'s five passes).
    """
    scores = batch * n_heads * seq_q * seq_k * dtype.itemsize
    return flash_attention_hbm_bytes(batch, n_heads, n_kv_heads, seq_q, seq_k, head_dim, dtype) + 4 * scores

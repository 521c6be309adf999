"""Paged decode attention: one new query per sequence over its keys, read straight from the block pool.

Taught in notebook 13 (Triton kernels); the pool, block tables and the plain-torch
reference :func:`~llmlab.engine.paged_cache.paged_attention_reference` are notebook 11's.

Each sequence's keys sit in fixed-size blocks scattered over the pool; its block
table lists them in order.  One program handles one (sequence, KV head) pair and
**all the query heads of that KV head's group** (GQA), so each key and value is
read from HBM once per group instead of once per query head.  The program walks
the sequence's positions ``BLOCK_N`` at a time: position ``p`` lives in block
``block_table[p // block_size]`` at offset ``p % block_size`` — any block size
works, 1, 16 or 12 — and keeps a running (online) softmax:

    m = max score so far,  total = sum of exp(score - m),  acc = sum of exp(score - m) · value

rescaling ``total`` and ``acc`` by ``exp(m_old - m_new)`` whenever the maximum grows.
At the end ``out = acc / total``: the softmax-weighted values, without ever holding
all the scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from llmlab.engine.paged_cache import paged_attention_reference
from llmlab.kernels.dispatch import (
    KernelError,
    dispatch,
    next_power_of_2,
    require_kernel_float,
    same_device,
    tl,
    triton_kernel,
)

BLOCK_N = 16
"""Key positions one program scores per step (a power of two; the last step is masked)."""


@triton_kernel
def paged_decode_kernel(out_ptr, q_ptr, pool_ptr, block_tables_ptr, context_lens_ptr, scale,
                        q_row_stride, q_head_stride, out_row_stride, out_head_stride, table_row_stride,
                        pool_slot_stride, pool_kv_stride, pool_head_stride,
                        block_size, group, head_dim,
                        GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program ``(row, kv_head)``: ``out[row, h] = softmax(q[row, h] · Kᵀ · scale) · V`` for the group's heads ``h``.

    ``GROUP`` and ``DIM`` are the group size and ``head_dim`` rounded up to powers of two (masked).
    """
    row = tl.program_id(axis=0)  # which sequence
    kv_head = tl.program_id(axis=1)  # which KV head; its query heads are kv_head*group ... + group - 1
    members = tl.arange(0, GROUP)
    heads = kv_head * group + members  # [GROUP] the query heads that share this KV head
    head_ok = members < group
    dims = tl.arange(0, DIM)
    dim_ok = dims < head_dim
    q_mask = head_ok[:, None] & dim_ok[None, :]
    # reads the group's queries once: [GROUP, DIM]
    q = tl.load(q_ptr + row * q_row_stride + heads[:, None] * q_head_stride + dims[None, :],
                mask=q_mask, other=0.0).to(tl.float32)
    context_len = tl.load(context_lens_ptr + row)  # reads one int: how many keys this sequence has

    m = tl.full([GROUP], float("-inf"), dtype=tl.float32)  # running max score, per query head
    total = tl.zeros([GROUP], dtype=tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([GROUP, DIM], dtype=tl.float32)  # running sum of exp(score - m) · value
    for start in range(0, context_len, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions in the sequence
        visible = positions < context_len  # the last step runs past the end
        # reads the block-table entries of these positions (neighbours share an entry)
        blocks = tl.load(block_tables_ptr + row * table_row_stride + positions // block_size,
                         mask=visible, other=0).to(tl.int64)
        slots = blocks * block_size + positions % block_size  # [BLOCK_N] where each token lives in the pool
        kv_offsets = slots[:, None] * pool_slot_stride + kv_head * pool_head_stride + dims[None, :]
        kv_mask = visible[:, None] & dim_ok[None, :]
        k = tl.load(pool_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)  # reads keys [BLOCK_N, DIM]
        v = tl.load(pool_ptr + pool_kv_stride + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)  # and values

        # scores of every query head of the group against these keys: [GROUP, BLOCK_N]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        scores = tl.where(visible[None, :], scores, float("-inf"))  # past the end: weight exp(-inf) = 0
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        rescale = tl.exp(m - m_new)  # how much the old sums shrink when the max grows (exp(-inf) = 0 at first)
        weights = tl.exp(scores - m_new[:, None])
        total = total * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
        m = m_new

    out = acc / total[:, None]
    tl.store(out_ptr + row * out_row_stride + heads[:, None] * out_head_stride + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)  # writes the group's outputs


class _PoolAsCache:
    """One layer's pool tensor seen through the one method :func:`paged_attention_reference` reads."""

    def __init__(self, pool: torch.Tensor, block_size: int) -> None:
        self.pool, self.block_size = pool, block_size

    def block_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = (-1, self.block_size)
        return self.pool[:, 0].unflatten(0, blocks), self.pool[:, 1].unflatten(0, blocks)


def paged_decode_reference(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, scale: float | None = None) -> torch.Tensor:
    """What the kernel must equal: notebook 11's :func:`paged_attention_reference` on one layer's ``pool``.

    That reference scales scores by ``1/sqrt(head_dim)``; another ``scale`` is folded into ``q``.
    """
    if scale is not None:
        q_scaled = q.float() * (scale * math.sqrt(q.shape[-1]))
        return paged_attention_reference(q_scaled, _PoolAsCache(pool, block_size), 0, block_tables,
                                         context_lens).to(q.dtype)
    return paged_attention_reference(q, _PoolAsCache(pool, block_size), 0, block_tables, context_lens)


def paged_decode_attention(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, scale: float | None = None, *,
                           backend: str | None = None) -> torch.Tensor:
    """Decode attention of one query per sequence over its paged keys; ``[rows, n_heads, head_dim]``.

    ``q`` ``[rows, n_heads, head_dim]`` (each sequence's newest token, whose K/V are
    already in the pool); ``pool`` one layer's ``[(num_blocks + 1) * block_size, 2,
    n_kv_heads, head_dim]``; ``block_tables`` ``[rows, max_blocks]`` int (padded, e.g.
    with the null block); ``context_lens`` ``[rows]`` int, each ≥ 1.  ``scale``
    defaults to ``1/sqrt(head_dim)``.  ``n_kv_heads`` must divide ``n_heads``.
    """
    _check(q, pool, block_tables, context_lens, block_size)
    return dispatch(paged_decode_reference, _launch, q, pool, block_tables, context_lens, block_size, scale,
                    backend=backend)


def _check(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
           block_size: int) -> None:
    if q.dim() != 3 or pool.dim() != 4 or pool.shape[1] != 2 or pool.shape[3] != q.shape[2]:
        raise KernelError(f"paged_decode_attention needs q [rows, n_heads, head_dim] and a pool "
                          f"[slots, 2, n_kv_heads, head_dim]; got {tuple(q.shape)} and {tuple(pool.shape)}.")
    if q.shape[1] % pool.shape[2]:
        raise KernelError(f"{pool.shape[2]} KV heads cannot be shared evenly by {q.shape[1]} query heads: "
                          "n_kv_heads must divide n_heads.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 \
            or pool.shape[0] % block_size:
        raise KernelError(f"block_size must be a positive int that divides the pool's {pool.shape[0]} slots; "
                          f"got {block_size!r}.")
    rows = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != rows or context_lens.shape != (rows,) \
            or block_tables.is_floating_point() or context_lens.is_floating_point():
        raise KernelError(f"paged_decode_attention needs integer block_tables [{rows}, max_blocks] and context_lens "
                          f"[{rows}]; got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}.")
    same_device(q=q, pool=pool, block_tables=block_tables, context_lens=context_lens)


def _launch(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
            block_size: int, scale: float | None, *, mode: str) -> torch.Tensor:
    require_kernel_float("paged decode", q)
    require_kernel_float("paged decode", pool)
    rows, n_heads, head_dim = q.shape
    n_kv_heads = pool.shape[2]
    group = n_heads // n_kv_heads
    q = q if q.stride(2) == 1 else q.contiguous()
    pool = pool if pool.stride(3) == 1 else pool.contiguous()
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if rows:
        grid = (rows, n_kv_heads)  # one program per (sequence, KV head)
        paged_decode_kernel.jit(mode)[grid](
            out, q, pool, block_tables, context_lens.contiguous(),
            1.0 / math.sqrt(head_dim) if scale is None else float(scale),
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            pool.stride(0), pool.stride(1), pool.stride(2),
            block_size, group, head_dim,
            GROUP=next_power_of_2(group), DIM=next_power_of_2(head_dim), BLOCK_N=BLOCK_N)
    return out


def paged_decode_hbm_bytes(context_lens: Sequence[int], n_heads: int, n_kv_heads: int, head_dim: int,
                           dtype: torch.dtype, per_query_head: bool = False) -> int:
    """HBM bytes one decode step moves: read the queries, every visible key and value, write the outputs.

    The kernel reads each sequence's ``context_len`` keys and values once per KV head
    (``2 · Σ context_lens · n_kv_heads · head_dim`` elements); ``per_query_head=True``
    counts a kernel with one program per *query* head instead, which reads them
    ``n_heads / n_kv_heads`` times.  Queries in and outputs out add
    ``2 · rows · n_heads · head_dim``.  Block tables and lengths (a few bytes per
    block) are left out.
    """
    readers = n_heads if per_query_head else n_kv_heads
    kv = 2 * sum(context_lens) * readers * head_dim
    q_and_out = 2 * len(context_lens) * n_heads * head_dim
    return (kv + q_and_out) * dtype.itemsize

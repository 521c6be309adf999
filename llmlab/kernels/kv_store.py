"""Storing new keys and values into the paged KV pool through a slot mapping (−1 = skip).

Taught in notebook 13 (Triton kernels); the pool and its slots are notebook 11's
:class:`~llmlab.engine.paged_cache.PagedKVCache`.  One layer's pool is

    pool : [slots, 2, n_kv_heads, head_dim]      pool[:, 0] = keys, pool[:, 1] = values

and token ``i``'s key and value go to slot ``slot_mapping[i]``.  A slot of −1
means "skip this token" (its K/V are already cached, e.g. a prefix-cache hit).
One program per token copies that token's key and value for every KV head; the
program of a −1 slot returns at once, so it touches nothing.
"""

from __future__ import annotations

import torch

from llmlab.kernels.dispatch import KernelError, dispatch, next_power_of_2, same_device, tl, triton_kernel


@triton_kernel
def store_kvcache_kernel(k_ptr, v_ptr, pool_ptr, slot_ptr,
                         k_token_stride, k_head_stride, v_token_stride, v_head_stride,
                         pool_slot_stride, pool_kv_stride, pool_head_stride,
                         n_kv_heads, head_dim, HEADS: tl.constexpr, DIM: tl.constexpr):
    """Program ``token`` copies ``k[token]`` and ``v[token]`` (all KV heads) into slot ``slot_mapping[token]``.

    ``HEADS`` and ``DIM`` are ``n_kv_heads`` and ``head_dim`` rounded up to powers of two.
    """
    token = tl.program_id(axis=0)  # one program per new token
    slot = tl.load(slot_ptr + token).to(tl.int64)  # reads one int: where this token's K/V go (−1: nowhere)
    if slot < 0:  # a skipped token: this program reads and writes nothing
        return
    heads = tl.arange(0, HEADS)[:, None]  # [HEADS, 1]
    dims = tl.arange(0, DIM)[None, :]  # [1, DIM]
    mask = (heads < n_kv_heads) & (dims < head_dim)  # the padding lanes of HEADS × DIM
    k = tl.load(k_ptr + token * k_token_stride + heads * k_head_stride + dims, mask=mask)  # reads k[token]
    v = tl.load(v_ptr + token * v_token_stride + heads * v_head_stride + dims, mask=mask)  # reads v[token]
    key_slot = pool_ptr + slot * pool_slot_stride + heads * pool_head_stride + dims  # pool[slot, 0]
    tl.store(key_slot, k, mask=mask)  # writes the keys
    tl.store(key_slot + pool_kv_stride, v, mask=mask)  # writes the values, next to them: pool[slot, 1]


def store_kvcache_reference(k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """What the kernel must do: copy the rows with a slot ≥ 0 into ``pool`` (as ``PagedStep.write`` does)."""
    keep = (slot_mapping >= 0).nonzero().squeeze(1)
    pool.index_copy_(0, slot_mapping[keep].long(), torch.stack((k, v), dim=1)[keep])


def store_kvcache(k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor, slot_mapping: torch.Tensor, *,
                  backend: str | None = None) -> None:
    """Write ``k``/``v`` ``[N, n_kv_heads, head_dim]`` into ``pool`` at ``slot_mapping`` ``[N]`` (−1 = skip), in place.

    ``pool`` is one layer's ``[slots, 2, n_kv_heads, head_dim]`` (``PagedKVCache.pools[layer]``).
    The slots of one call must be distinct.
    """
    _check(k, v, pool, slot_mapping)
    dispatch(store_kvcache_reference, _launch, k, v, pool, slot_mapping, backend=backend)


def _check(k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise KernelError(f"store_kvcache needs k and v of one shape [N, n_kv_heads, head_dim]; got "
                          f"{tuple(k.shape)} and {tuple(v.shape)}.")
    if pool.dim() != 4 or pool.shape[1] != 2 or pool.shape[2:] != k.shape[1:]:
        raise KernelError(f"store_kvcache needs a pool [slots, 2, {k.shape[1]}, {k.shape[2]}] for k {tuple(k.shape)}; "
                          f"got {tuple(pool.shape)}.")
    if k.dtype != pool.dtype or v.dtype != pool.dtype:
        raise KernelError(f"store_kvcache needs k, v and the pool in one dtype; got {k.dtype}, {v.dtype}, "
                          f"{pool.dtype}.")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise KernelError(f"store_kvcache needs slot_mapping as [{k.shape[0]}] int32/int64 (one slot per token); got "
                          f"{tuple(slot_mapping.shape)} {slot_mapping.dtype}.")
    same_device(k=k, v=v, pool=pool, slot_mapping=slot_mapping)


def _launch(k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor, slot_mapping: torch.Tensor, *, mode: str) -> None:
    if pool.stride(3) != 1:
        raise KernelError("store_kvcache writes the pool in place, so its last dimension must be contiguous.")
    k = k if k.stride(2) == 1 else k.contiguous()
    v = v if v.stride(2) == 1 else v.contiguous()
    n_tokens, n_kv_heads, head_dim = k.shape
    if n_tokens:
        store_kvcache_kernel.jit(mode)[(n_tokens,)](  # one program per token
            k, v, pool, slot_mapping.contiguous(),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            pool.stride(0), pool.stride(1), pool.stride(2),
            n_kv_heads, head_dim, HEADS=next_power_of_2(n_kv_heads), DIM=next_power_of_2(head_dim))


def store_kvcache_bytes(n_tokens: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        slot_dtype: torch.dtype = torch.int64) -> int:
    """HBM bytes one call moves when every token is stored: read k, v and the slots, write k and v into the pool.

    ``2 · (2 · n_tokens · n_kv_heads · head_dim · size) + n_tokens · slot size``; a skipped (−1)
    token costs only its slot.
    """
    kv = 2 * n_tokens * n_kv_heads * head_dim * dtype.itemsize
    return 2 * kv + n_tokens * slot_dtype.itemsize

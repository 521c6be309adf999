"""The paged KV cache: one fixed pool of blocks per layer, read and written through block tables.

Taught in notebook 11 (serving engine).  Per layer the pool is

    keys, values : [(num_blocks + 1) * block_size, n_kv_heads, head_dim]

allocated once.  Slot ``block * block_size + offset`` holds one token's key
(or value) for all KV heads.  The extra last block is the **null block**: it
is never allocated and stays zero, so that reading "nothing" (padding) is an
ordinary gather.

The model does not know about pages.  It is handed one cache object per step,
:class:`PagedStep`, with the same three methods the contiguous
:class:`~llmlab.cache.KVCache` has (``update``, ``n_keys``, ``advance``):
``update`` writes the new tokens' K/V at their slots (−1 = skip) and returns,
for each row of the batch, its keys and values gathered through its block
table, right-aligned so that the model's usual causal + padding mask is
exactly right (a row's queries are its last tokens; see ``llmlab.generate``'s
left padding).

:func:`paged_attention_reference` is decode attention computed straight from
the pool and the block tables in plain torch: the reference that notebook 13's
Triton paged-attention kernel must equal.
"""

from __future__ import annotations

import math

import torch

from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError, require_int


class PagedCacheError(LlmlabError, ValueError):
    """A paged cache that cannot be built as asked (the message says what to change)."""


class PagedKVCache:
    """Per-layer pools of ``num_blocks`` KV blocks of ``block_size`` slots, allocated once (notebook 11)."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        for name, value in (("n_layers", n_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            require_int(name, value, minimum=1, error=PagedCacheError)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.null_block = num_blocks
        shape = ((num_blocks + 1) * block_size, n_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    @classmethod
    def for_model(cls, config: ModelConfig, num_blocks: int, block_size: int = 16,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> PagedKVCache:
        return cls(config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim, dtype, device)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype = torch.float32) -> int:
        """K and V of ``block_size`` tokens in every layer: the unit the pool is counted in."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layers * block_size * config.n_kv_heads * config.head_dim * element

    @property
    def nbytes(self) -> int:
        """Bytes of every pool (the null block included)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def block_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s pools as ``[num_blocks + 1, block_size, n_kv_heads, head_dim]``."""
        k, v = self.keys[layer], self.values[layer]
        return (k.view(self.num_blocks + 1, self.block_size, *k.shape[1:]),
                v.view(self.num_blocks + 1, self.block_size, *v.shape[1:]))

    def gather_index(self, block_tables: torch.Tensor, context_lens: torch.Tensor, width: int) -> torch.Tensor:
        """``[rows, width]`` slots: row r's positions ``0 .. context_lens[r] - 1`` right-aligned, null slots before.

        ``block_tables`` is ``[rows, max_blocks]`` (padded with the null block).
        """
        columns = torch.arange(width, device=block_tables.device)
        positions = columns[None, :] - (width - context_lens[:, None])
        real = positions >= 0
        positions = positions.clamp(min=0)
        blocks = block_tables.gather(1, positions // self.block_size)
        slots = blocks * self.block_size + positions % self.block_size
        return torch.where(real, slots, torch.full_like(slots, self.null_block * self.block_size))

    def step(self, write_slots: torch.Tensor, gather: torch.Tensor) -> PagedStep:
        """The cache object for one forward pass: write at ``write_slots``, read through ``gather``."""
        return PagedStep(self, write_slots, gather)


class PagedStep:
    """One forward pass's view of a :class:`PagedKVCache` — what the model is handed as ``cache``.

    ``write_slots`` is ``[rows, new]``: the slot of each new token, −1 to skip it (padding,
    or a token whose K/V came from the prefix cache).  ``gather`` is ``[rows, n_keys]``:
    the slots each row attends to, right-aligned (see :meth:`PagedKVCache.gather_index`).
    """

    def __init__(self, cache: PagedKVCache, write_slots: torch.Tensor, gather: torch.Tensor) -> None:
        self.cache, self.gather = cache, gather
        flat = write_slots.reshape(-1)
        self.write_rows = (flat >= 0).nonzero().squeeze(1)
        self.write_to = flat[self.write_rows]

    def n_keys(self, new: int) -> int:
        return self.gather.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (``[rows, kv_heads, new, head_dim]``) at their slots; return each row's keys and values."""
        pool_k, pool_v = self.cache.keys[layer], self.cache.values[layer]
        if len(self.write_to):
            pool_k.index_copy_(0, self.write_to, _tokens(k)[self.write_rows])
            pool_v.index_copy_(0, self.write_to, _tokens(v)[self.write_rows])
        return self._read(pool_k), self._read(pool_v)

    def _read(self, pool: torch.Tensor) -> torch.Tensor:
        """Each row's slots, ``[rows, kv_heads, n_keys, head_dim]`` (one ``index_select``: faster than fancy indexing)."""
        rows, n_keys = self.gather.shape
        picked = pool.index_select(0, self.gather.reshape(-1))
        return picked.view(rows, n_keys, *pool.shape[1:]).transpose(1, 2)

    def advance(self, n: int) -> None:
        """Nothing: the block manager, not the cache, knows each sequence's length."""


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[rows, heads, new, head_dim]`` → ``[rows * new, heads, head_dim]``, row-major like the slot mapping."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def paged_attention_reference(q: torch.Tensor, cache: PagedKVCache, layer: int, block_tables: torch.Tensor,
                              context_lens: torch.Tensor) -> torch.Tensor:
    """Decode attention straight from the paged pool, in plain torch (notebook 11; notebook 13's kernel must equal it).

    ``q`` is ``[rows, n_heads, head_dim]``, one query per sequence (its newest token, whose
    K/V are already in the pool); ``block_tables`` ``[rows, max_blocks]``; ``context_lens``
    ``[rows]``.  Returns ``[rows, n_heads, head_dim]``.  Keys are gathered block by block
    through the block table, grouped query heads share their KV head.
    """
    pool_k, pool_v = cache.block_view(layer)
    rows, n_heads, head_dim = q.shape
    keys = pool_k[block_tables].flatten(1, 2)  # [rows, max_blocks * block_size, kv_heads, head_dim]
    values = pool_v[block_tables].flatten(1, 2)
    group = n_heads // keys.shape[2]
    keys, values = keys.repeat_interleave(group, dim=2), values.repeat_interleave(group, dim=2)
    scores = torch.einsum("rhd,rthd->rht", q.float(), keys.float()) / math.sqrt(head_dim)
    visible = torch.arange(keys.shape[1], device=q.device)[None, :] < context_lens[:, None]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("rht,rthd->rhd", weights, values.float()).to(q.dtype)

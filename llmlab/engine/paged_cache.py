"""The paged KV cache: one fixed pool of blocks per layer, read and written through block tables.

Taught in notebook 11 (serving engine).  Per layer the pool is

    pool : [(num_blocks + 1) * block_size, 2, n_kv_heads, head_dim]

allocated once: ``keys[layer]`` and ``values[layer]`` are its two halves (views).
Slot ``block * block_size + offset`` holds one token's key and value for all KV
heads, side by side, so one gather fetches both.  The extra last block is the **null block**: it
is never allocated and stays zero, so that reading "nothing" (padding) is an
ordinary gather.

The model does not know about pages.  It is handed one cache object per
forward pass, :class:`PagedStep`, through the seam every cache shares
(``attention``, ``n_keys``, ``advance``; see :class:`~llmlab.cache.StoreThenAttend`):
it writes the new tokens' K/V at their slots (−1 = skip) and lets each
sequence attend over its own keys, gathered through its block table.  A pass is
packed — all sequences' new tokens in one row — so nothing is padded outside
attention.

:func:`paged_attention_reference` is decode attention computed straight from
the pool and the block tables in plain torch: the reference that notebook 13's
Triton paged-attention kernel must equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError, require_int
from llmlab.layers.attention import causal_mask


GROUP_COST_BYTES = 512 * 1024
"""One more gather + attention call costs about as much as copying this many bytes of K/V (measured on a
2-core CPU: ~50 µs per call against ~0.4–1.5 µs per slot); it sets how finely decode rows are grouped."""


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
        shape = ((num_blocks + 1) * block_size, 2, n_kv_heads, head_dim)
        self.pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.keys = [pool[:, 0] for pool in self.pools]  # [slots, n_kv_heads, head_dim] views
        self.values = [pool[:, 1] for pool in self.pools]
        self._scratch = torch.empty(0, *shape[1:], dtype=dtype, device=device)
        slot_bytes = self.pools[0][0].numel() * self.pools[0].element_size()
        self.group_cost_slots = max(64, GROUP_COST_BYTES // slot_bytes)
        """The fixed price of one more decode group, in slots (see :func:`group_by_length`)."""

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
        return sum(pool.numel() * pool.element_size() for pool in self.pools)

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def block_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s pools as ``[num_blocks + 1, block_size, n_kv_heads, head_dim]``."""
        blocks = (self.num_blocks + 1, self.block_size)
        return self.keys[layer].unflatten(0, blocks), self.values[layer].unflatten(0, blocks)

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

    def step(self, write_slots: torch.Tensor, spans: list[Span]) -> PagedStep:
        """The cache object for one packed forward pass: write at ``write_slots``, attend per span.

        On the Triton kernels when :mod:`llmlab.kernels` would run them on this pool (a GPU, or
        ``use_backend("interpret")``; notebook 13), otherwise the plain-torch :class:`PagedStep`.
        """
        from llmlab.engine.kernel_step import KernelPagedStep, uses_kernels  # (it imports the kernels, which import us)

        return KernelPagedStep(self, write_slots, spans) if uses_kernels(self) else PagedStep(self, write_slots, spans)

    def scratch(self, n_slots: int) -> torch.Tensor:
        """The reusable gather buffer as ``[n_slots, 2, kv_heads, head_dim]``; it grows when needed."""
        if len(self._scratch) < n_slots:
            self._scratch = self._scratch.new_empty(max(n_slots, 2 * len(self._scratch)), *self._scratch.shape[1:])
        return self._scratch[:n_slots]


@dataclass(frozen=True)
class Span:
    """One sequence's part of a packed pass: ``n`` new tokens at ``start ..`` of the row.

    They are the last ``n`` of the sequence's ``context_len`` tokens, whose K/V
    live in the blocks of ``block_table``.
    """

    start: int
    n: int
    context_len: int
    block_table: list[int]


class PagedStep:
    """One forward pass's view of a :class:`PagedKVCache` — what the model is handed as ``cache`` (notebook 11).

    The pass is **packed**: every scheduled sequence's new tokens sit side by side
    in one row of ``N`` tokens (a prompt chunk, or one decoding token), so the
    linear layers compute no padding at all.  ``write_slots`` ``[N]`` is each new
    token's slot (−1: skip it, its K/V came from the prefix cache); ``spans`` says
    which tokens belong to which sequence.  Only attention needs to know, and it
    asks the cache (:meth:`attention`, the seam every cache shares):

    - a span of several tokens (prefill) attends over its own sequence's keys,
      causally: the new ones directly when nothing was cached before them,
      otherwise gathered through its block table;
    - the one-token spans (decode) are batched: sorted by length and split into
      groups (:func:`group_by_length`), each group's keys gathered right-aligned and
      padded to the group's longest, so little is padded and few calls are made.

    Gathers copy into one reusable buffer: a fresh multi-megabyte tensor at every
    layer and step costs more in page faults than the copy itself.
    """

    def __init__(self, cache: PagedKVCache, write_slots: torch.Tensor, spans: list[Span],
                 group_cost_slots: int | None = None) -> None:
        self.cache, self.spans = cache, spans
        self.write_rows = (write_slots >= 0).nonzero().squeeze(1)
        self.write_to = write_slots[self.write_rows]
        self.prefills = [self._prefill(span) for span in spans if span.n > 1]
        decodes = sorted((span for span in spans if span.n == 1), key=lambda span: span.context_len)
        cost = cache.group_cost_slots if group_cost_slots is None else group_cost_slots
        groups = group_by_length([span.context_len for span in decodes], cost)
        self.decode_groups = self._decode_groups(decodes, groups) if decodes else []

    def _prefill(self, span: Span) -> tuple[Span, torch.Tensor | None, torch.Tensor | None]:
        """``(span, gather [1, context] or None, causal mask or None)``: nothing to gather or mask
        when the span is the whole sequence so far (its new K/V are all its keys; SDPA's causal flag)."""
        if span.context_len == span.n:
            return span, None, None
        device = self.cache.device
        gather = self.cache.gather_index(torch.tensor([span.block_table], device=device),
                                         torch.tensor([span.context_len], device=device), span.context_len)
        return span, gather, causal_mask(span.n, span.context_len, device=device)

    def _decode_groups(self, spans: list[Span], groups: list[tuple[int, int]]
                       ) -> list[tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per group of decoding spans (sorted by length): ``(where its tokens are in the row,
        gather [rows, width], mask [rows, 1, 1, width])``, keys right-aligned, the padding before
        them hidden.  The tokens are a slice when the spans sit side by side in the row (the runner
        packs them so), an index tensor otherwise."""
        device = self.cache.device
        width = max(len(span.block_table) for span in spans)
        tables = torch.tensor([span.block_table + [self.cache.null_block] * (width - len(span.block_table))
                               for span in spans], device=device)
        lengths = torch.tensor([span.context_len for span in spans], device=device)
        result = []
        for start, end in groups:
            n_keys = spans[end - 1].context_len  # the group's longest: the spans are sorted
            blocks = -(-n_keys // self.cache.block_size)
            gather = self.cache.gather_index(tables[start:end, :blocks], lengths[start:end], n_keys)
            real = torch.arange(n_keys, device=device)[None, :] >= (n_keys - lengths[start:end])[:, None]
            starts = [span.start for span in spans[start:end]]
            side_by_side = starts == list(range(starts[0], starts[0] + len(starts)))
            tokens = slice(starts[0], starts[0] + len(starts)) if side_by_side else torch.tensor(starts, device=device)
            result.append((tokens, gather, real[:, None, None, :]))
        return result

    def n_keys(self, new: int) -> int:
        """Every span sees its own keys; the model is given no padding mask for a packed pass."""
        return new

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attend: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, None]:
        """Store the new K/V at their slots; attend each span over its own sequence's keys.

        ``q`` is ``[1, heads, N, head_dim]``, ``k``/``v`` ``[1, kv_heads, N, head_dim]``
        (the packed row); ``attend`` is the layer's own attention.  Returns ``(out, None)``.
        """
        self.write(layer, k, v)
        out = torch.empty_like(q)
        for span, gather, mask in self.prefills:
            new = slice(span.start, span.start + span.n)
            keys, values = (k[:, :, new], v[:, :, new]) if gather is None else self.read(layer, gather)
            out[:, :, new] = attend(q[:, :, new], keys, values, mask=mask)[0]
        for tokens, gather, mask in self.decode_groups:
            queries = q[0, :, tokens].transpose(0, 1).unsqueeze(2)  # [rows, heads, 1, head_dim]
            keys, values = self.read(layer, gather)
            out[0, :, tokens] = attend(queries, keys, values, mask=mask)[0].squeeze(2).transpose(0, 1)
        return out, None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` (``[1, kv_heads, N, head_dim]``) at their slots, skipping −1."""
        if len(self.write_to):
            new = torch.stack((_tokens(k), _tokens(v)), dim=1)  # [N, 2, kv_heads, head_dim], like a slot
            self.cache.pools[layer].index_copy_(0, self.write_to, new[self.write_rows])

    def read(self, layer: int, gather: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``gather``'s slots, ``[rows, kv_heads, n_keys, head_dim]`` each.

        One ``index_select`` fetches both (they share a slot) into the reused buffer.
        """
        rows, n_keys = gather.shape
        flat = gather.reshape(-1)
        both = torch.index_select(self.cache.pools[layer], 0, flat, out=self.cache.scratch(len(flat)))
        both = both.view(rows, n_keys, *both.shape[1:])
        return both[:, :, 0].transpose(1, 2), both[:, :, 1].transpose(1, 2)

    def advance(self, n: int) -> None:
        """Nothing: the block manager, not the cache, knows each sequence's length."""


def group_by_length(lengths: list[int], group_cost: int) -> list[tuple[int, int]]:
    """Split sorted ``lengths`` into consecutive groups ``[start, end)`` of least padded work (notebook 11).

    A group costs ``group_cost`` (the fixed price of one more gather and attention
    call, counted in slots) plus ``rows × its longest length`` slots.  One group pads
    every row to the longest; one group per row pays the fixed price every time.
    Dynamic programming over the sorted lengths finds the cheapest split exactly.
    """
    if any(a > b for a, b in zip(lengths, lengths[1:])):
        raise ValueError("group_by_length needs the lengths sorted, shortest first.")
    best, cut = [0] + [0] * len(lengths), [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        longest = lengths[end - 1]
        best[end], cut[end] = min((best[start] + group_cost + (end - start) * longest, start)
                                  for start in range(end))
    groups, end = [], len(lengths)
    while end:
        groups.append((cut[end], end))
        end = cut[end]
    return groups[::-1]


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

"""The paged forward pass on the Triton kernels: what the engine runs on a GPU (and, when asked, in Triton's interpreter).

Taught in notebook 13 (Triton kernels); the paged cache and its plain-torch step
are notebook 11's.  :class:`KernelPagedStep` is the same seam as
:class:`~llmlab.engine.paged_cache.PagedStep` — the model hands it queries, keys
and values and gets attention back — but it never gathers a sequence's keys into a
padded copy:

- ``store_kvcache`` writes the new tokens' K/V into the pool through the slot
  mapping (−1: skip);
- every decoding sequence (one new token) is one row of **one**
  ``paged_decode_attention`` call, which reads the keys straight from the pool through
  the block tables — no length groups, no padding;
- a prefill chunk runs ``flash_attention``, causal and bottom-right aligned, over its
  new keys (or, after a prefix-cache hit or an earlier chunk, over its keys gathered
  from the pool).

:func:`uses_kernels` is the one place that chooses: the dispatch point of
:mod:`llmlab.kernels` says which backend would run on the pool's tensors, and
the kernels run unless that is the torch reference (the plain step is faster
there) or the pool holds a dtype the kernels do not take (float64).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.engine.paged_cache import PagedKVCache, PagedStep, Span, _tokens
from llmlab.kernels import backend_for, flash_attention, paged_decode_attention, store_kvcache
from llmlab.kernels.dispatch import KERNEL_FLOATS


def uses_kernels(cache: PagedKVCache) -> bool:
    """True when a step over ``cache`` should run the Triton kernels (compiled on CUDA, or interpreted when asked)."""
    pool = cache.pools[0]
    return pool.dtype in KERNEL_FLOATS and backend_for(pool) != "torch"


class KernelPagedStep(PagedStep):
    """One packed forward pass over a :class:`PagedKVCache`, attention by the Triton kernels (notebook 13)."""

    def __init__(self, cache: PagedKVCache, write_slots: torch.Tensor, spans: list[Span]) -> None:
        self.cache, self.spans, self.write_slots = cache, spans, write_slots
        self.prefills = [self._prefill(span) for span in spans if span.n > 1]
        decodes = [span for span in spans if span.n == 1]
        device = cache.device
        self.decode_tokens = torch.tensor([span.start for span in decodes], dtype=torch.long, device=device)
        width = max((len(span.block_table) for span in decodes), default=0)
        self.decode_tables = torch.tensor(
            [span.block_table + [cache.null_block] * (width - len(span.block_table)) for span in decodes],
            dtype=torch.int32, device=device).reshape(len(decodes), width)
        self.decode_lengths = torch.tensor([span.context_len for span in decodes], dtype=torch.int32, device=device)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attend: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, None]:
        """Store the new K/V (kernel), then attend: prefill spans by flash attention, all decode rows in one
        paged-decode call.  ``attend`` (the layer's own attention) is not needed: the kernels replace it."""
        pool = self.cache.pools[layer]
        store_kvcache(_tokens(k), _tokens(v), pool, self.write_slots)
        out = torch.empty_like(q)
        for span, gather, _ in self.prefills:
            new = slice(span.start, span.start + span.n)
            keys, values = (k[:, :, new], v[:, :, new]) if gather is None else self.read(layer, gather)
            out[:, :, new] = flash_attention(q[:, :, new], keys, values, causal=True)
        if len(self.decode_tokens):
            queries = q[0, :, self.decode_tokens].transpose(0, 1)  # [rows, heads, head_dim]
            decoded = paged_decode_attention(queries, pool, self.decode_tables, self.decode_lengths,
                                             self.cache.block_size)
            out[0, :, self.decode_tokens] = decoded.transpose(0, 1)
        return out, None

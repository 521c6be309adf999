"""The contiguous KV cache: every layer's keys and values, kept so decoding never recomputes them.

Taught in notebook 09 (KV cache).  For each layer the cache preallocates

    K, V : [batch, n_kv_heads, max_len, head_dim]

Prefill writes the prompt's keys and values (positions ``0..T-1``); each
decode step writes one more position.  Memory is fixed at creation:
2 (K and V) × layers × batch × kv_heads × max_len × head_dim × bytes per value —
the formula ``llmlab.calc.kv_cache_bytes`` computes for real models.

A decode step normally reads ``cache.length`` (a Python int) and attends to
the first ``length + 1`` positions, so every step has a new shape.
:meth:`KVCache.fixed_shape_step` gives the same step with *fixed* shapes — the
write position is a tensor and attention covers a fixed number of slots (a
"bucket"), with a mask hiding the empty ones — which is what ``torch.compile``
(and CUDA graphs on a GPU) need to turn the step into a few kernels.  Notebook
09 measures it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.config import ModelConfig


class CacheFullError(RuntimeError):
    """Writing past the cache's capacity (``max_len`` positions)."""


class StoreThenAttend:
    """The seam between the model's attention and any KV cache (notebooks 09 and 11).

    The attention layer hands the cache its new ``q``, ``k``, ``v`` and its own
    ``attend(q, keys, values, key_mask=...)``; the cache stores ``k``/``v`` and
    returns ``(out, weights)``.  A contiguous cache does it the obvious way:
    :meth:`update` gives every stored key and value, and the layer's attention
    runs over them.  The paged cache of notebook 11 keeps the same call but decides
    itself which keys each sequence sees, so the model never knows about pages.
    """

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attend: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store ``k``/``v`` in layer ``layer``; attend ``q`` over everything stored."""
        keys, values = self.update(layer, k, v)
        return attend(q, keys, values)


class KVCache(StoreThenAttend):
    """Preallocated per-layer keys and values (notebook 09).

    The model calls :meth:`update` once per layer (through :meth:`attention`) with
    the new positions' K/V and gets back K/V for every position so far; after the
    last layer it calls :meth:`advance`.  ``length`` is the number of positions already stored.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if min(n_layers, batch_size, n_kv_heads, head_dim, max_len) < 1:
            raise ValueError("a KV cache needs at least one layer, sequence, head, dimension and position.")
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, config: ModelConfig, batch_size: int = 1, max_len: int | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        """A cache shaped for ``config`` (``max_len`` defaults to its context length)."""
        max_len = config.context_length if max_len is None else max_len
        if max_len > config.context_length:
            raise ValueError(
                f"max_len={max_len} exceeds the model's context_length={config.context_length}: "
                "positions past the context do not exist."
            )
        return cls(config.n_layers, batch_size, config.n_kv_heads, config.head_dim, max_len, dtype, device)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (``[batch, kv_heads, new, head_dim]``) after the stored positions; return all of them."""
        new = k.shape[2]
        end = self.length + new
        if end > self.max_len:
            raise CacheFullError(
                f"the KV cache holds {self.max_len} positions; {self.length} are used and {new} more were "
                "asked for. Create a larger cache (up to the model's context_length), or start a new one."
            )
        if k.shape[0] != self.batch_size:
            raise ValueError(f"the cache was made for batch {self.batch_size}, got a batch of {k.shape[0]}.")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def n_keys(self, new: int) -> int:
        """How many key positions attention sees after ``new`` more are written."""
        return self.length + new

    def fixed_shape_step(self, slot: torch.Tensor, n_slots: int | None = None) -> FixedShapeStep:
        """This cache seen by one step that writes at column ``slot`` (a ``[new]`` long tensor) and
        attends over the first ``n_slots`` columns (default: all ``max_len``)."""
        return FixedShapeStep(self, slot, self.max_len if n_slots is None else n_slots)

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as stored (the model calls this after its last layer)."""
        self.length += n

    def reset(self) -> None:
        """Forget every position (the memory stays allocated)."""
        self.length = 0

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions, forget the rest (speculative decoding rolls back
        rejected draft tokens this way, notebook 16); later writes overwrite the forgotten ones."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.length:
            raise ValueError(f"truncate() keeps 0..{self.length} positions (the stored ones), got {length!r}.")
        self.length = length

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values in all layers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def used_bytes(self) -> int:
        """Bytes holding stored positions."""
        return self.nbytes * self.length // self.max_len

    def __repr__(self) -> str:
        b, h, n, d = self.keys[0].shape
        return (f"KVCache(layers={len(self.keys)}, batch={b}, kv_heads={h}, max_len={n}, head_dim={d}, "
                f"length={self.length}, {self.nbytes / 2**20:.1f} MiB)")


class FixedShapeStep(StoreThenAttend):
    """One step's view of a :class:`KVCache` whose shapes do not depend on the cache's length (notebook 09).

    :meth:`update` writes the new keys/values at the columns in the ``slot``
    tensor and returns the first ``n_slots`` columns; the caller passes an
    ``attention_mask`` ``[batch, n_slots]`` that is 1 only on written, real
    positions, so the empty slots get no attention.  Nothing here reads the
    Python-int ``length``: every step with the same ``n_slots`` has the same
    shapes, so a compiler traces it once.  The caller advances the cache afterwards.
    """

    def __init__(self, cache: KVCache, slot: torch.Tensor, n_slots: int) -> None:
        if not 1 <= n_slots <= cache.max_len:
            raise ValueError(f"n_slots must be in 1..{cache.max_len} (the cache's max_len), got {n_slots}.")
        self.keys, self.values, self.slot, self.n_slots = cache.keys, cache.values, slot, n_slots

    def n_keys(self, new: int) -> int:
        """Attention always covers ``n_slots`` slots."""
        return self.n_slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` at the ``slot`` columns; return this layer's first ``n_slots`` slots."""
        self.keys[layer].index_copy_(2, self.slot, k)
        self.values[layer].index_copy_(2, self.slot, v)
        return self.keys[layer][:, :, : self.n_slots], self.values[layer][:, :, : self.n_slots]

    def advance(self, n: int) -> None:
        """Nothing: the length lives outside the fixed-shape step (``KVCache.advance`` after it)."""

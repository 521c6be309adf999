"""Compiling the decode step: fixed shapes, ``torch.compile``, attention buckets.

Taught in notebook 09 (KV cache, "where a cached step's time goes").  A cached
decode step of a small model spends most of its time not computing but
dispatching ~60 small operations.  ``torch.compile`` turns the step into a few
fused kernels, but only if the step has the same shapes every time; a growing
cache does not (attention reads ``length + 1`` rows).  So the compiled step

- writes the new keys/values at a position given as a *tensor*
  (:meth:`llmlab.cache.KVCache.fixed_shape_step`), and
- attends over a fixed number of slots — a power-of-two *bucket* — with a mask
  hiding the slots not written yet.

One graph is compiled per bucket (64, 128, 256, … slots), just as GPU servers
record one CUDA graph per batch-size bucket.  ``generate_*(..., compiled=True)``
uses :class:`CompiledDecoder`; prefill stays eager.
"""

from __future__ import annotations

import torch

from llmlab.cache import KVCache

SMALLEST_BUCKET = 64
"""Compiled decoding attends over 64, 128, 256 … slots (the smallest power of two ≥ 64 that holds them)."""

COMPILED_GRAPHS_LIMIT = 64
"""How many compiled decode graphs (model × batch × cache size × bucket) a process keeps before failing."""


class CompileError(RuntimeError):
    """``torch.compile`` could not build the decode step (usually: no C++ compiler on this machine)."""


def attention_bucket(n_keys: int, max_len: int) -> int:
    """Slots a compiled step attends over for ``n_keys`` keys: a power of two ≥ 64, at most ``max_len``.

    Fixed shapes let the step be compiled, but attending over every slot of a
    long cache would read its empty part at every step; doubling buckets cost
    at most 2× the reads and one compilation per bucket.
    """
    bucket = SMALLEST_BUCKET
    while bucket < n_keys:
        bucket *= 2
    return min(bucket, max_len)


def fixed_shape_logits(model, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor,
                       slot: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``[batch, vocab]`` from one decode step with fixed shapes.

    Writes the new keys/values at cache column ``slot`` (``[1]`` long tensor) and
    attends over the first ``visible.shape[1]`` slots; ``visible`` is 1 on
    written, real positions.  ``ids`` and ``positions`` are ``[batch, 1]``.
    Runs eagerly as written; :func:`compiled_decode_step` is the same function compiled.
    """
    step = cache.fixed_shape_step(slot, n_slots=visible.shape[1])
    out = model(ids, positions=positions, cache=step, attention_mask=visible)
    return out.logits[:, -1, :]


_compiled_logits = None


def compiled_decode_step():
    """:func:`fixed_shape_logits` compiled once per process.

    ``fullgraph=True``: the step must trace as one graph (a graph break would
    silently bring back the Python overhead being removed).  ``dynamic=False``:
    steps in one bucket have the same shapes, so one specialised graph serves them all.
    """
    global _compiled_logits
    if _compiled_logits is None:
        _compiled_logits = torch.compile(fixed_shape_logits, fullgraph=True, dynamic=False)
    return _compiled_logits


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A copy with standard strides (a slice of a growing tensor has new strides every step,
    even when it counts as contiguous, and strides are part of a compiled graph's guards)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


class CompiledDecoder:
    """Decode steps for one :class:`KVCache` through :func:`compiled_decode_step` (notebook 09).

    Keeps the ``[batch, max_len]`` mask of written, real slots between steps;
    call :meth:`reset` whenever the cache is refilled eagerly.
    """

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.step = compiled_decode_step()
        self.visible: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the mask: the next step rebuilds it from the (re)filled cache."""
        self.visible = None

    def logits(self, model, new_ids: torch.Tensor, positions: torch.Tensor, window_mask: torch.Tensor) -> torch.Tensor:
        """Logits for ``new_ids`` ``[batch, 1]`` at ``positions``; ``window_mask`` covers the cache and the new id."""
        slot = self.cache.length
        if self.visible is None:  # first step after a (re)fill
            self.visible = torch.zeros(self.cache.batch_size, self.cache.max_len, dtype=torch.long,
                                       device=window_mask.device)
            self.visible[:, : slot + 1] = window_mask
        self.visible[:, slot] = window_mask[:, -1]
        visible = self.visible[:, : attention_bucket(slot + 1, self.cache.max_len)]
        slot_index = torch.tensor([slot], device=new_ids.device)
        from torch._dynamo.exc import BackendCompilerFailed  # imported here: only compiled decoding needs them
        from torch._inductor.exc import InductorError

        try:
            with torch._dynamo.config.patch(recompile_limit=COMPILED_GRAPHS_LIMIT):
                logits = self.step(model, self.cache, _fresh(new_ids), _fresh(positions), slot_index, visible)
        except (BackendCompilerFailed, InductorError) as err:
            raise CompileError(
                "torch.compile could not build the decode step. On a CPU it needs a working C++ "
                "compiler (gcc or clang; on macOS: xcode-select --install), on a GPU Triton. "
                f"Generate with compiled=False instead. ({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from err
        self.cache.advance(new_ids.shape[1])
        return logits

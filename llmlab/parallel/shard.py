"""Split an ordinary model across tensor-parallel ranks, in place, from its unsharded weights.

Taught in notebook 12 (tensor parallelism).  Megatron-LM's plan, layer by layer:

- attention by **heads**: rank r keeps ``n_heads / tp`` query heads and the KV heads
  they read; Q, K, V are column-parallel, the output projection row-parallel
  (one all-reduce);
- the MLP by its **intermediate dimension**: up (and SwiGLU's gate, split the same
  way) column-parallel, down row-parallel (one all-reduce);
- the token embedding and the LM head by **vocabulary rows** (one all-reduce in,
  one all-gather of the logits out); norms and learned positions are small and
  stay whole on every rank.

**Fewer KV heads than ranks** (GQA/MQA at high TP): a KV head cannot be split
between the query heads that share it, so it is **replicated** — each rank keeps
the one KV head its query heads read.  Its K/V projection and its KV cache are
then stored ``tp / n_kv_heads`` times; that is the price, and it is why serving
systems keep ``tp ≤ n_kv_heads`` where they can.

The model code does not change: the parallel layers replace the plain ones, and
``model.config`` becomes this rank's view (local heads, local ``d_ff``), so a KV
cache built from it holds only this rank's heads.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.config import ModelConfig, _divisors
from llmlab.errors import LlmlabError
from llmlab.parallel.comm import Comm
from llmlab.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                    VocabParallelLMHead)


class ParallelConfigError(LlmlabError, ValueError):
    """A model that cannot be split over this many ranks; the message says which sizes would work."""


def check_tp(config: ModelConfig, tp: int) -> None:
    """Raise :class:`ParallelConfigError` unless ``config`` splits over ``tp`` ranks (notebook 12)."""
    if config.n_heads % tp:
        raise ParallelConfigError(f"n_heads={config.n_heads} of {config.name!r} does not divide by tp={tp}: "
                                  f"each rank needs whole query heads; use tp in {_divisors(config.n_heads)}.")
    if config.d_ff % tp:
        raise ParallelConfigError(f"d_ff={config.d_ff} of {config.name!r} does not divide by tp={tp}; "
                                  f"use tp in {_divisors(config.d_ff)}.")
    if config.n_kv_heads % tp and tp % config.n_kv_heads:
        raise ParallelConfigError(f"n_kv_heads={config.n_kv_heads} and tp={tp}: either tp divides the KV heads "
                                  "(each rank keeps some) or the KV heads divide tp (each is replicated); "
                                  "neither holds.")


def head_rows(heads: range, head_dim: int) -> torch.Tensor:
    """The weight rows (output features) of ``heads``, ``head_dim`` rows each."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def local_heads(config: ModelConfig, rank: int, tp: int) -> tuple[range, range]:
    """``(query heads, KV heads)`` rank ``rank`` keeps; KV heads replicated when there are fewer than ranks."""
    per_rank = config.n_heads // tp
    queries = range(rank * per_rank, (rank + 1) * per_rank)
    if config.n_kv_heads % tp == 0:
        kv_per_rank = config.n_kv_heads // tp
        return queries, range(rank * kv_per_rank, (rank + 1) * kv_per_rank)
    group = config.n_heads // config.n_kv_heads  # query heads per KV head; this rank's all read one
    return queries, range(queries.start // group, queries.start // group + 1)


def shard_model(model: nn.Module, comm: Comm) -> nn.Module:
    """Replace ``model``'s layers by this rank's tensor-parallel shards, in place; returns it (notebook 12).

    Every rank must start from the same weights (load the same checkpoint, or seed alike).
    """
    config, tp, rank = model.config, comm.world_size, comm.rank
    check_tp(config, tp)
    queries, kv_heads = local_heads(config, rank, tp)
    q_rows, kv_rows = head_rows(queries, config.head_dim), head_rows(kv_heads, config.head_dim)
    ff_per_rank = config.d_ff // tp
    ff_rows = torch.arange(rank * ff_per_rank, (rank + 1) * ff_per_rank)
    for block in model.blocks:
        attn = block.attn
        attn.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, comm, q_rows)
        attn.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, comm, kv_rows)
        attn.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, comm, kv_rows)
        attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, comm, q_rows)
        attn.n_heads, attn.n_kv_heads = len(queries), len(kv_heads)
        mlp = block.mlp
        for name in ("gate_proj", "up_proj"):
            if hasattr(mlp, name):
                setattr(mlp, name, ColumnParallelLinear.from_linear(getattr(mlp, name), comm, ff_rows))
        mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, comm, ff_rows)
    tied = model.lm_head.weight is model.token_embedding.weight
    model.token_embedding = VocabParallelEmbedding(model.token_embedding, comm)
    model.lm_head = (VocabParallelLMHead(model.token_embedding.weight, config.vocab_size, comm) if tied
                     else VocabParallelLMHead.from_linear(model.lm_head, comm))
    model.config = config.replace(n_heads=len(queries), n_kv_heads=len(kv_heads), head_dim=config.head_dim,
                                  d_ff=ff_per_rank)
    model.tp_comm = comm
    return model

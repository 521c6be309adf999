"""Tensor-parallel layers: a linear layer split by output columns or by input rows, and a split vocabulary.

Taught in notebook 12 (tensor parallelism).  For ``y = x @ Wᵀ + b`` with
``W`` ``[out, in]``:

- **column parallel**: rank r holds some rows of ``W`` (some *output* features):
  it computes its slice of ``y`` from the whole ``x``; nothing is sent, unless the
  full ``y`` is wanted (``gather_output``: an all-gather);
- **row parallel**: rank r holds some columns of ``W`` (some *input* features) and
  gets only those features of ``x`` (the column-parallel layer before it made
  them); each rank's product is a partial sum of ``y``, so one **all-reduce** adds
  them, and the bias is added once, after it.

A column-parallel layer followed by a row-parallel one (attention's Q/K/V then
its output projection; the MLP's up then down) costs exactly one all-reduce.
Each layer is built from an ordinary ``nn.Linear`` by keeping this rank's part of
its weights (:meth:`from_linear`), so the unsharded checkpoint is the only one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.layers.embedding import check_token_ids
from llmlab.parallel.comm import Comm


def _parameter(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor.detach().clone())


class ColumnParallelLinear(nn.Module):
    """This rank's output features of a linear layer (notebook 12); ``gather_output`` all-gathers the rest."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, comm: Comm,
                 gather_output: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = _parameter(weight), _parameter(bias)
        self.comm, self.gather_output = comm, gather_output

    @classmethod
    def from_linear(cls, linear: nn.Linear, comm: Comm, rows: torch.Tensor,
                    gather_output: bool = False) -> ColumnParallelLinear:
        """Keep the output features ``rows`` (indices into ``linear.out_features``)."""
        bias = None if linear.bias is None else linear.bias[rows]
        return cls(linear.weight[rows], bias, comm, gather_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return self.comm.all_gather(y, dim=-1) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """This rank's input features of a linear layer; the partial outputs are all-reduced (notebook 12)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, comm: Comm) -> None:
        super().__init__()
        self.weight, self.bias = _parameter(weight), _parameter(bias)
        self.comm = comm

    @classmethod
    def from_linear(cls, linear: nn.Linear, comm: Comm, columns: torch.Tensor) -> RowParallelLinear:
        """Keep the input features ``columns`` (indices into ``linear.in_features``); the bias whole."""
        return cls(linear.weight[:, columns], linear.bias, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def vocab_shard(vocab_size: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """``(start, stop, shard_size)``: rank ``rank``'s rows of a vocabulary padded to a multiple of ``world_size``.

    GPT-2's 50,257 tokens do not divide by 2 or 4; every shard gets ``ceil(V / N)``
    rows, and the last one's tail (``stop .. start + shard_size``) is zero padding.
    """
    shard_size = -(-vocab_size // world_size)
    start = rank * shard_size
    return start, min(start + shard_size, vocab_size), shard_size


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows ``start .. stop`` of the token embedding (notebook 12).

    Each rank looks up the ids it holds and writes zeros for the others; one
    all-reduce then gives every rank every token's vector.
    """

    def __init__(self, embedding: nn.Embedding, comm: Comm) -> None:
        super().__init__()
        self.vocab_size, d_model = embedding.weight.shape
        self.start, self.stop, shard_size = vocab_shard(self.vocab_size, comm.rank, comm.world_size)
        weight = embedding.weight.new_zeros(shard_size, d_model)
        weight[:self.stop - self.start] = embedding.weight[self.start:self.stop]
        self.weight = nn.Parameter(weight)
        self.comm = comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(ids, self.vocab_size)
        local = ids - self.start
        elsewhere = (local < 0) | (local >= self.stop - self.start)
        vectors = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        return self.comm.all_reduce(vectors.masked_fill(elsewhere[..., None], 0.0))


class VocabParallelLMHead(nn.Module):
    """The LM head split by vocabulary rows like :class:`VocabParallelEmbedding`; logits all-gathered (notebook 12).

    With tied embeddings it shares the embedding shard's weight (same rows).
    """

    def __init__(self, weight: torch.Tensor | nn.Parameter, vocab_size: int, comm: Comm) -> None:
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.vocab_size, self.comm = vocab_size, comm

    @classmethod
    def from_linear(cls, linear: nn.Linear, comm: Comm) -> VocabParallelLMHead:
        vocab_size, d_model = linear.weight.shape
        start, stop, shard_size = vocab_shard(vocab_size, comm.rank, comm.world_size)
        weight = linear.weight.new_zeros(shard_size, d_model)
        weight[:stop - start] = linear.weight[start:stop]
        return cls(weight.detach(), vocab_size, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(F.linear(x, self.weight), dim=-1)[..., :self.vocab_size]

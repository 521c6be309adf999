"""Turn a scheduled step into one packed forward pass over the paged cache, and sample.

Taught in notebook 11 (serving engine).  A step's sequences are **packed** into
one row: sequence after sequence, each with the ``n`` tokens it computes now (a
prompt chunk, or one token while decoding), their positions, and the slots
their K/V go to.  Prefill chunks and decodes share the one pass, and no token
is padding, so every weight is read once per step.  Attention is the only part
that must keep the sequences apart; the :class:`~llmlab.engine.paged_cache.PagedStep`
handed to the model does that.  Logits are computed only for the sequences that
reach their last token (the others are mid-prompt), and only those are sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmlab.engine.block_manager import BlockManager
from llmlab.engine.paged_cache import PagedKVCache, Span
from llmlab.engine.sequence import Sequence
from llmlab.sampling import sample_next


class ModelRunner:
    """Runs a model over a :class:`PagedKVCache` for the sequences a step schedules (notebook 11)."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, blocks: BlockManager) -> None:
        self.model, self.cache, self.blocks = model, cache, blocks
        self.device = cache.device
        self.forward_passes = 0

    @torch.no_grad()
    def run(self, items: list[tuple[Sequence, int]]) -> dict[Sequence, int]:
        """Compute the scheduled tokens; return the sampled next token of every sequence that reached its end."""
        finishing, logits = self.forward(items)
        return dict(zip(finishing, sample_rows(logits, finishing))) if finishing else {}

    def forward(self, items: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """One packed pass over ``items``' new tokens.

        Returns the sequences whose last token was computed (they get a next token)
        and their logits, ``[len(those), vocab]``, in the same order.
        """
        batch = self.pack(items)
        return batch.finishing, self.run_packed(batch.ids, batch.positions, batch.slots, batch.spans, batch.last)

    def run_packed(self, ids: list[int], positions: list[int], slots: list[int], spans: list[Span],
                   last: list[int]) -> torch.Tensor:
        """The model over one packed row; ``[len(last), vocab]`` logits at the row indices ``last``."""
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        out = self.model(as_tensor([ids]), positions=as_tensor(positions), cache=self.cache.step(as_tensor(slots), spans),
                         logits_to_keep=as_tensor(last))
        self.forward_passes += 1
        return out.logits[0]

    def stop(self) -> None:
        """Nothing to tell: one process runs the model (a tensor-parallel runner releases its other ranks)."""

    def pack(self, items: list[tuple[Sequence, int]]) -> PackedBatch:
        """Lay ``items``' new tokens side by side in one row: prompt chunks first, then the decoding
        tokens shortest context first (each group of decodes the paged cache attends together is
        then one slice of the row)."""
        batch = PackedBatch(sorted(items, key=lambda item: (item[1] == 1, item[0].num_tokens if item[1] == 1 else 0)))
        for seq, n in batch.items:
            start = seq.num_computed
            batch.spans.append(Span(len(batch.ids), n, start + n, seq.block_table))
            batch.ids += seq.all_ids[start:start + n]
            batch.positions += range(start, start + n)
            batch.slots += [self.blocks.slot_of(seq, p) for p in range(start, start + n)]
            if start + n == seq.num_tokens:
                batch.last.append(len(batch.ids) - 1)
                batch.finishing.append(seq)
        return batch


@dataclass
class PackedBatch:
    """One step's sequences side by side in one row (notebook 11): no token is padding.

    ``items`` are ``(sequence, new tokens)`` in row order; ``ids``, ``positions`` and ``slots``
    (where each token's K/V go; −1: skip) have one entry per token; ``spans`` say which tokens
    are whose; ``last`` is the row index of the last token of each sequence in ``finishing``
    (those whose whole context is computed after this pass: they get a next token).
    """

    items: list[tuple[Sequence, int]]
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    last: list[int] = field(default_factory=list)
    finishing: list[Sequence] = field(default_factory=list)


def sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One next token per row, each row with its own request's SamplingParams and generator (notebook 11).

    Greedy rows take one batched argmax; every other row goes through the same
    :func:`llmlab.sampling.sample_next` as a request generated alone, with the
    request's own seeded generator — so a seeded request gives the same tokens
    whether it runs alone or in a batch of strangers.
    """
    tokens = [0] * len(seqs)
    greedy = [row for row, seq in enumerate(seqs) if seq.params.greedy]
    if greedy:
        picks = logits[greedy].argmax(dim=-1).tolist()
        for row, token in zip(greedy, picks):
            tokens[row] = token
    for row, seq in enumerate(seqs):
        if not seq.params.greedy:
            tokens[row] = int(sample_next(logits[row:row + 1], seq.params, seq.generator)[0])
    return tokens

"""The serving engine over tensor-parallel ranks: rank 0 schedules and samples, the others follow.

Taught in notebook 12 (tensor parallelism).  Every rank holds a shard of the
model and its own block pool (the same blocks, its own KV heads).  Only rank 0
runs the scheduler and the block manager: before each forward pass it
**broadcasts** the packed batch it decided — token ids, positions, slots, and
each sequence's span and block table — and every rank runs the pass (their
all-reduces and the logits' all-gather need all of them).  Rank 0 then samples;
the others only wait for the next batch.  The broadcast goes through the same
counted :class:`~llmlab.parallel.Comm`, so its bytes are on the bill too:
tens of bytes per token against the all-reduces' kilobytes.
"""

from __future__ import annotations

import torch

from llmlab.engine.block_manager import BlockManager
from llmlab.engine.paged_cache import PagedKVCache, Span
from llmlab.engine.runner import ModelRunner, PackedBatch
from llmlab.engine.sequence import Sequence
from llmlab.parallel.comm import Comm
from llmlab.parallel.launch import ParallelSetupError

STOP = -1
HEARTBEAT = -2
"""A batch length that means "still here, nothing to run": an idle server's rank 0 sends it so that the
followers' collectives do not time out (``llmlab.serve.parallel``); :func:`follow` skips it."""
"""A batch length that tells the other ranks to stop following."""


def encode(batch: PackedBatch) -> torch.Tensor:
    """One packed batch as one int64 tensor: counts, then ids, positions, slots, spans, block tables, last."""
    width = max((len(span.block_table) for span in batch.spans), default=0)
    tables = [span.block_table + [-1] * (width - len(span.block_table)) for span in batch.spans]
    header = [len(batch.ids), len(batch.spans), len(batch.last), width]
    spans = [value for span in batch.spans for value in (span.start, span.n, span.context_len)]
    return torch.tensor(header + batch.ids + batch.positions + batch.slots + spans
                        + [block for table in tables for block in table] + batch.last, dtype=torch.long)


def decode(message: torch.Tensor) -> tuple[list[int], list[int], list[int], list[Span], list[int]]:
    """What :func:`encode` packed: ``(ids, positions, slots, spans, last)``."""
    values = message.tolist()
    n_tokens, n_spans, n_last, width = values[:4]
    at = 4
    ids, positions, slots = (values[at + i * n_tokens:at + (i + 1) * n_tokens] for i in range(3))
    at += 3 * n_tokens
    triples = [values[at + 3 * i:at + 3 * i + 3] for i in range(n_spans)]
    at += 3 * n_spans
    tables = [[b for b in values[at + width * i:at + width * (i + 1)] if b >= 0] for i in range(n_spans)]
    at += width * n_spans
    spans = [Span(start, n, context, table) for (start, n, context), table in zip(triples, tables)]
    return ids, positions, slots, spans, values[at:at + n_last]


class BroadcastRunner(ModelRunner):
    """Rank 0's runner: each packed batch goes to the other ranks (one counted broadcast), then runs here too."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, blocks: BlockManager, comm: Comm) -> None:
        if comm.rank != 0:
            raise ParallelSetupError(f"an Engine schedules on rank 0 only; on rank {comm.rank}, run "
                                     "llmlab.parallel.engine.follow(model, comm) instead, which runs the batches "
                                     "rank 0 sends.")
        super().__init__(model, cache, blocks)
        self.comm = comm
        comm.broadcast(torch.tensor([cache.num_blocks, cache.block_size]))  # the followers build the same pool

    def forward(self, items: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        batch = self.pack(items)
        message = encode(batch)
        self.comm.broadcast(torch.tensor([len(message)]))
        self.comm.broadcast(message)
        return batch.finishing, self.run_packed(batch.ids, batch.positions, batch.slots, batch.spans, batch.last)

    def heartbeat(self) -> None:
        """Tell the other ranks this one is alive, with nothing to run (an idle server, notebook 15)."""
        self.comm.broadcast(torch.tensor([HEARTBEAT]))

    def stop(self) -> None:
        """Tell the other ranks that no batch will follow."""
        self.comm.broadcast(torch.tensor([STOP]))


def follow(model: torch.nn.Module, comm: Comm) -> int:
    """On a rank other than 0: build the pool rank 0 announces, run every batch it sends (skipping
    heartbeats), until it stops.

    Returns the number of forward passes run.
    """
    shape = comm.broadcast(torch.zeros(2, dtype=torch.long))
    num_blocks, block_size = (int(v) for v in shape)
    parameter = next(model.parameters())
    cache = PagedKVCache.for_model(model.config, num_blocks, block_size, parameter.dtype, parameter.device)
    runner = ModelRunner(model, cache, BlockManager(num_blocks, block_size))
    with torch.no_grad():
        while True:
            length = int(comm.broadcast(torch.zeros(1, dtype=torch.long))[0])
            if length == STOP:
                return runner.forward_passes
            if length != HEARTBEAT:
                runner.run_packed(*decode(comm.broadcast(torch.zeros(length, dtype=torch.long))))

"""Turn a scheduled step into tensors, run the model over the paged cache, and sample.

Taught in notebook 11 (serving engine).  A step's sequences become rows of a
left-padded batch: row r holds the ``n`` tokens sequence r computes now (a
prompt chunk, or one token while decoding), with their positions and the
slots their K/V go to.  Rows that compute one token (decoding) and rows that
compute a chunk (prefilling) run as two forward passes of the same step, so a
long chunk does not pad every decoding row to its length.  Logits are computed
for each row's last token only (``logits_to_keep=1``), and only rows that
reach their last token are sampled.
"""

from __future__ import annotations

import torch

from llmlab.engine.block_manager import BlockManager
from llmlab.engine.paged_cache import PagedKVCache
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
        sampled: dict[Sequence, int] = {}
        for group in ([it for it in items if it[1] > 1], [it for it in items if it[1] == 1]):
            if group:
                logits = self.forward(group)
                done = [(row, seq) for row, (seq, n) in enumerate(group) if seq.num_computed + n == seq.num_tokens]
                if done:
                    rows = torch.tensor([row for row, _ in done], device=logits.device)
                    tokens = sample_rows(logits.index_select(0, rows), [seq for _, seq in done])
                    sampled.update(zip([seq for _, seq in done], tokens))
        return sampled

    def forward(self, group: list[tuple[Sequence, int]]) -> torch.Tensor:
        """One forward pass over ``group``'s new tokens; ``[rows, vocab]`` logits of each row's last token."""
        width = max(n for _, n in group)
        ids, positions, slots, tables, lengths = [], [], [], [], []
        for seq, n in group:
            start, pad = seq.num_computed, width - n
            ids.append([0] * pad + seq.all_ids[start:start + n])
            positions.append([0] * pad + list(range(start, start + n)))
            slots.append([-1] * pad + [self.blocks.slot_of(seq, p) for p in range(start, start + n)])
            tables.append(seq.block_table)
            lengths.append(start + n)
        n_keys = max(lengths)
        max_blocks = max(len(t) for t in tables)
        tables = [t + [self.cache.null_block] * (max_blocks - len(t)) for t in tables]
        as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=self.device)  # noqa: E731
        lengths_t = as_tensor(lengths)
        gather = self.cache.gather_index(as_tensor(tables), lengths_t, n_keys)
        key_mask = torch.arange(n_keys, device=self.device)[None, :] >= (n_keys - lengths_t)[:, None]
        out = self.model(as_tensor(ids), positions=as_tensor(positions), cache=self.cache.step(as_tensor(slots), gather),
                         attention_mask=key_mask, logits_to_keep=1)
        self.forward_passes += 1
        return out.logits[:, -1, :]


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

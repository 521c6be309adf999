"""Token embeddings: token id ``i`` selects row ``i`` of a ``[vocab_size, d_model]`` matrix.

Taught in notebook 02 (embeddings).  The lookup is ``nn.Embedding``; what this
module adds is a clear error when an id does not fit the vocabulary (plain
``nn.Embedding`` raises an opaque "index out of range in self", or a CUDA
device-side assert on a GPU).
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.errors import LlmlabError


class TokenIdError(LlmlabError, ValueError, IndexError):
    """A token id outside ``0 .. vocab_size - 1`` (catch it as ValueError or IndexError)."""


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ``TokenIdError`` naming the first id outside ``0 .. vocab_size - 1`` (notebook 02).

    Skipped inside ``torch.compile`` (reading a value would split the graph):
    compiled decoding feeds back ids the model itself produced.
    """
    if torch.compiler.is_compiling():
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        value = int(ids[where])
        raise TokenIdError(
            f"token id {value} at position {where} is out of range: this embedding has "
            f"vocab_size={vocab_size}, so ids must be in 0..{vocab_size - 1}. Check that the "
            "tokenizer and the model agree on the vocabulary size."
        )


class TokenEmbedding(nn.Embedding):
    """The token embedding table, ``[vocab_size, d_model]`` (notebook 02).

    ``forward(ids)`` returns ``weight[ids]``: shape ``[*ids.shape, d_model]``.
    """

    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__(vocab_size, d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(ids, self.num_embeddings)
        return super().forward(ids)

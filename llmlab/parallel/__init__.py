"""Tensor parallelism on ``torch.distributed``: split layers, counted collectives, real ranks.

Taught in notebook 12 (tensor parallelism).  ``shard_model(model, Comm())``
replaces a model's layers by this rank's shards (attention by heads, the MLP by
its intermediate dimension, the vocabulary by rows); :class:`Comm` runs and
counts every collective; :func:`run_parallel` (or a longer-lived :class:`RankGroup`) spawns ranks on one machine and
:func:`init_distributed` joins a group started by ``torchrun``.
"""

from llmlab.parallel.comm import Comm, CommStats, ring_wire_bytes
from llmlab.parallel.launch import ParallelSetupError, RankGroup, free_port, init_distributed, run_parallel
from llmlab.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                    VocabParallelLMHead, vocab_shard)
from llmlab.parallel.shard import ParallelConfigError, check_tp, local_heads, shard_model

__all__ = [
    "ColumnParallelLinear", "Comm", "CommStats", "ParallelConfigError", "ParallelSetupError", "RankGroup", "RowParallelLinear",
    "VocabParallelEmbedding", "VocabParallelLMHead", "check_tp", "free_port", "init_distributed", "local_heads",
    "ring_wire_bytes", "run_parallel", "shard_model", "vocab_shard",
]

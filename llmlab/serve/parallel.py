"""Serving a model split over tensor-parallel ranks: rank 0 serves HTTP and schedules, the others follow.

Taught in notebook 15 (serving and its metrics), on top of notebook 12's
:mod:`llmlab.parallel.engine`: rank 0's Engine broadcasts each batch to the other
ranks (its ``BroadcastRunner``), and every rank runs the forward pass.  A server
can sit idle for hours, but every collective has a bounded timeout (so that a dead
rank is noticed), so while idle rank 0 sends a **heartbeat** every
:data:`HEARTBEAT_S` seconds; :func:`follow_server` answers it with nothing.
"""

from __future__ import annotations

import os

import torch

from llmlab.engine.block_manager import BlockManager
from llmlab.engine.paged_cache import PagedKVCache
from llmlab.engine.runner import ModelRunner
from llmlab.parallel.comm import Comm
from llmlab.parallel.engine import STOP, decode

HEARTBEAT = -2
"""A batch length that means "still here, nothing to run" (``STOP`` is -1)."""
HEARTBEAT_S = 10.0
"""Seconds between heartbeats of an idle server: well under the collectives' timeout (60 s by default).
``LLMLAB_SERVE_HEARTBEAT_S`` overrides it (the tests send many to check that the followers skip them)."""


def heartbeat_seconds() -> float:
    """:data:`HEARTBEAT_S`, or ``$LLMLAB_SERVE_HEARTBEAT_S`` when set to a positive number."""
    try:
        value = float(os.environ.get("LLMLAB_SERVE_HEARTBEAT_S", HEARTBEAT_S))
    except ValueError:
        return HEARTBEAT_S
    return value if value > 0 else HEARTBEAT_S


def heartbeat(comm: Comm) -> None:
    """Rank 0, idle: tell the other ranks it is alive (one broadcast of one integer)."""
    comm.broadcast(torch.tensor([HEARTBEAT]))


def follow_server(model: torch.nn.Module, comm: Comm) -> int:
    """On a rank other than 0: run every batch rank 0 sends, skip heartbeats, return at STOP (forward passes run)."""
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

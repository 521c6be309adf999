"""A process group whose collectives are counted: every call, and the bytes it moves.

Taught in notebook 12 (tensor parallelism).  Tensor-parallel layers never call
``torch.distributed`` directly; they call a :class:`Comm`, which runs the real
collective on the real process group (gloo on CPU, NCCL on GPUs) and records
what it sent.  The bytes are read from the tensors handed to the collective, not
from a formula — so notebook 12 can put the measured bytes beside the formula.

Per collective it counts calls, seconds spent inside it (waiting for the slowest
rank included) and two byte counts:

- **payload**: the bytes of the tensor each rank hands in (what the model "asks"
  to reduce or gather);
- **wire**: what each rank sends over the link under the usual ring algorithms:
  all-reduce ``2·(N−1)/N × payload``, all-gather ``(N−1) × payload`` (each rank's
  piece travels to the N−1 others), broadcast ``payload`` from the source.

With one rank (``world_size == 1``) nothing is sent and nothing is counted: the
same model code runs unsplit.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from llmlab.network import ring_allreduce_bytes


def ring_wire_bytes(op: str, payload: int, world_size: int) -> float:
    """Bytes one rank sends for one collective of ``payload`` bytes under the ring algorithm (notebook 12)."""
    if op == "all_reduce":
        return ring_allreduce_bytes(payload, world_size)
    if op == "all_gather":
        return float((world_size - 1) * payload)
    if op == "broadcast":
        return float(payload) if world_size > 1 else 0.0
    raise ValueError(f"unknown collective {op!r}: expected all_reduce, all_gather or broadcast.")


@dataclass
class CommStats:
    """What a :class:`Comm` has sent since its last ``reset``: calls, payload bytes, wire bytes and seconds
    inside the collective, per collective."""

    calls: Counter = field(default_factory=Counter)
    payload_bytes: Counter = field(default_factory=Counter)
    wire_bytes: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)

    def total(self, what: str = "wire_bytes") -> float:
        return sum(getattr(self, what).values())


class Comm:
    """Counted collectives over one process group (notebook 12).

    ``Comm()`` uses the default group set up by :func:`llmlab.parallel.init_distributed`
    (or by ``torchrun``); ``Comm.single()`` is a one-rank stand-in that sends nothing.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, single: bool = False) -> None:
        self.group = group
        if single:
            self.rank, self.world_size = 0, 1
        else:
            if not dist.is_initialized():
                raise RuntimeError("no process group: call llmlab.parallel.init_distributed(...) first "
                                   "(or start under torchrun), or use Comm.single() for one process.")
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.stats = CommStats()

    @classmethod
    def single(cls) -> Comm:
        """One rank, no process group: every collective is the identity."""
        return cls(single=True)

    def reset(self) -> CommStats:
        """Start counting afresh; return what was counted so far."""
        counted, self.stats = self.stats, CommStats()
        return counted

    def record(self, op: str, payload: int) -> None:
        """Count one collective of ``payload`` bytes per rank; the collectives here call it, and so can
        code that runs a collective itself (DDP's communication hook, notebook 12)."""
        self.stats.calls[op] += 1
        self.stats.payload_bytes[op] += payload
        self.stats.wire_bytes[op] += ring_wire_bytes(op, payload, self.world_size)

    def _timed(self, op: str, collective: Callable[[], object]) -> None:
        start = time.perf_counter()
        collective()
        self.stats.seconds[op] += time.perf_counter() - start

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it."""
        if self.world_size > 1:
            self.record("all_reduce", tensor.numel() * tensor.element_size())
            self._timed("all_reduce", lambda: dist.all_reduce(tensor, group=self.group))
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``tensor`` (all the same shape), concatenated along ``dim`` in rank order."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        self.record("all_gather", tensor.numel() * tensor.element_size())
        pieces = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._timed("all_gather", lambda: dist.all_gather(pieces, tensor, group=self.group))
        return torch.cat(pieces, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` on every rank, in place; returns it."""
        if self.world_size > 1:
            self.record("broadcast", tensor.numel() * tensor.element_size())
            self._timed("broadcast", lambda: dist.broadcast(tensor, src=src, group=self.group))
        return tensor

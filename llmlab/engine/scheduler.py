"""Which sequences run in the next step, and how many of their tokens: continuous batching.

Taught in notebook 11 (serving engine).  Every step the scheduler fills a
**token budget** (``max_num_batched_tokens``):

1. running sequences first, oldest first: one token each when decoding, the
   next chunk of the prompt while prefilling (**chunked prefill**: a long
   prompt is cut into chunks that fit what is left of the budget, so the
   decoding sequences beside it never wait for the whole prompt);
2. then waiting sequences, in arrival order (a preempted one at the front),
   while fewer than ``max_num_seqs`` run and budget is left; a new sequence
   first takes every block the prefix cache has of its prompt.

When the block pool runs out, the **newest** running sequence is preempted
(by recompute): it gives its blocks back and goes to the front of the waiting
queue; when readmitted it prefills prompt + output so far again, hitting the
prefix cache for whatever of it is still there.  Nothing is admitted in a step
that had to preempt.  A finished sequence leaves between two steps, and a
waiting one takes its place at once: the batch is never drained to refill.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmlab.engine.block_manager import BlockManager
from llmlab.engine.sequence import Sequence, SequenceStatus
from llmlab.errors import LlmlabError, require_int


class SchedulerError(LlmlabError, ValueError):
    """A scheduler setting that cannot work."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step: at most ``max_num_seqs`` sequences and ``max_num_batched_tokens`` tokens."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512

    def __post_init__(self) -> None:
        require_int("max_num_seqs", self.max_num_seqs, minimum=1, error=SchedulerError)
        require_int("max_num_batched_tokens", self.max_num_batched_tokens, minimum=1, error=SchedulerError)


@dataclass
class ScheduledStep:
    """What one step computes: ``(sequence, number of its tokens)`` pairs, and who was preempted for it."""

    items: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    @property
    def is_empty(self) -> bool:
        return not self.items


class Scheduler:
    """Waiting and running queues over one :class:`BlockManager` (notebook 11)."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config, self.blocks = config, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        """Choose the next step's work (see the module docstring)."""
        step = ScheduledStep()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(step, budget)
        if not step.preempted:
            self._admit_waiting(step, budget)
        return step

    def _schedule_running(self, step: ScheduledStep, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            n = min(seq.num_to_compute, budget)
            while not self.blocks.can_append(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    return budget
            self.blocks.append_slots(seq, n)
            step.items.append((seq, n))
            budget -= n
            index += 1
        return budget

    def _admit_waiting(self, step: ScheduledStep, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.allocate_prefix(seq)
            n = min(seq.num_to_compute, budget)
            if not self.blocks.can_append(seq, n):
                self.blocks.free(seq)  # give the prefix hits back; try again after others finish
                return
            self.waiting.popleft()
            self.blocks.count_admission(seq)
            self.blocks.append_slots(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.items.append((seq, n))
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: give the blocks back and go to the front of the waiting queue."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from its queue and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

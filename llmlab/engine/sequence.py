"""One request as the engine sees it: its tokens, its state and its clock.

Taught in notebook 11 (serving engine).  A sequence moves

    WAITING ──admit──▶ RUNNING ──stop id / length / abort──▶ FINISHED
                          │  ▲
                 preempt  ▼  │ admit again (re-prefill prompt + output so far)
                        PREEMPTED

``num_computed`` counts the tokens whose keys and values are in the paged
cache; the next step computes ``all_ids[num_computed:]`` (a prompt chunk, or
the one token sampled last).  Timestamps (``time.perf_counter`` seconds) give
the serving metrics: time to first token (TTFT) and time per output token (TPOT).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from llmlab.sampling import SamplingParams, make_generator


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life (see the module docstring)."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a sequence ended: a stop id, a length limit (max_new_tokens or the context), or an abort."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    """A request's tokens, sampling parameters, cache bookkeeping and timestamps (notebook 11)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed: int = 0
    """Tokens whose keys and values are in the cache (the next step starts here)."""
    num_cached: int = 0
    """Of those, how many came from the prefix cache at the last admission (their K/V are never written again)."""
    block_table: list[int] = field(default_factory=list)
    """Physical block of each logical block: position p lives in block ``block_table[p // block_size]``."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Chain hash of each full block of ``all_ids`` computed so far (see ``BlockManager``)."""
    num_registered_blocks: int = 0
    """Leading blocks of ``block_table`` already offered to the prefix cache."""
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    num_preemptions: int = 0
    prefix_hit_tokens: int = 0
    """Prompt (and re-prefill) tokens served from the prefix cache over the whole life of the request."""
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.generator = make_generator(self.params.seed)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_to_compute(self) -> int:
        """Tokens not yet in the cache: the prompt's rest while prefilling, 1 while decoding."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token: int, now: float) -> None:
        self.output_ids.append(token)
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)

    def forget_cache(self) -> None:
        """After a preemption: nothing of this sequence is in the cache any more."""
        self.num_computed = self.num_cached = 0
        self.block_table = []
        self.num_registered_blocks = 0

    # -- serving metrics (notebook 15 serves them) ------------------------------------------

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival → first output token (seconds)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: mean gap between output tokens (seconds)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

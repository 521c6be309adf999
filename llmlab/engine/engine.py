"""The serving engine: requests in, tokens out, one scheduled step at a time.

Taught in notebook 11 (serving engine).  Online use::

    engine = Engine(model)
    rid = engine.add_request(prompt_ids, SamplingParams(temperature=0, max_new_tokens=50))
    while engine.has_unfinished_requests:
        for out in engine.step():          # every request that got a token this step
            print(out.request_id, out.new_token_ids, out.finish_reason)

``abort(request_id)`` frees a request's blocks at once; ``stream(prompt_ids,
params)`` yields one request's tokens as they come while every other request
keeps running.  Offline batches: :class:`llmlab.engine.LLM`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass

import torch

from llmlab.config import ModelConfig
from llmlab.engine.block_manager import BlockManager
from llmlab.engine.paged_cache import PagedKVCache
from llmlab.engine.runner import ModelRunner
from llmlab.engine.scheduler import Scheduler, SchedulerConfig, SchedulerError
from llmlab.engine.sequence import FinishReason, Sequence, SequenceStatus
from llmlab.errors import LlmlabError, require_int
from llmlab.generate import PromptError, check_prompt
from llmlab.sampling import SamplingParams

DEFAULT_KV_CACHE_BYTES = 1 << 30
"""Default size of the block pool when ``num_blocks`` is not given: at most 1 GiB of K/V
(less when ``max_num_seqs`` full contexts need less)."""


class EngineError(LlmlabError, ValueError):
    """An engine setting or a request that cannot work (the message says what to change)."""


class RequestNotFoundError(EngineError, LookupError):
    """No unfinished request has this id."""


@dataclass
class RequestOutput:
    """One request's progress after a step: the tokens it got in this step, and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]
    finish_reason: FinishReason | None
    sequence: Sequence

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Continuous batching over a paged KV cache with prefix caching (notebook 11).

    ``block_size`` tokens per block (16; any size ≥ 1).  ``num_blocks`` blocks in the
    pool (default: what ``kv_cache_bytes`` holds, see :data:`DEFAULT_KV_CACHE_BYTES`);
    it must hold at least one full context.  A step computes at most
    ``max_num_batched_tokens`` tokens for at most ``max_num_seqs`` sequences.
    """

    def __init__(self, model: torch.nn.Module, *, block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True,
                 kv_cache_bytes: int | None = None) -> None:
        self.config = _model_config(model)
        self.model = model.eval()
        block_size = require_int("block_size", block_size, minimum=1, error=EngineError)
        try:
            scheduler_config = SchedulerConfig(max_num_seqs, max_num_batched_tokens)
        except SchedulerError as err:
            raise EngineError(str(err)) from None
        parameter = next(model.parameters())
        num_blocks = self._pool_size(num_blocks, block_size, max_num_seqs, kv_cache_bytes, parameter.dtype)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.cache = PagedKVCache.for_model(self.config, num_blocks, block_size, parameter.dtype, parameter.device)
        self.scheduler = Scheduler(scheduler_config, self.blocks)
        comm = getattr(self.model, "tp_comm", None)
        if comm is not None and comm.world_size > 1:  # split by llmlab.parallel.shard_model (notebook 12)
            from llmlab.parallel.engine import BroadcastRunner

            self.runner = BroadcastRunner(self.model, self.cache, self.blocks, comm)
        else:
            self.runner = ModelRunner(self.model, self.cache, self.blocks)
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_computed_tokens = 0

    def _pool_size(self, num_blocks: int | None, block_size: int, max_num_seqs: int, kv_cache_bytes: int | None,
                   dtype: torch.dtype) -> int:
        per_sequence = -(-self.config.context_length // block_size)
        if num_blocks is None:
            per_block = PagedKVCache.bytes_per_block(self.config, block_size, dtype)
            budget = DEFAULT_KV_CACHE_BYTES if kv_cache_bytes is None else require_int(
                "kv_cache_bytes", kv_cache_bytes, minimum=1, error=EngineError)
            num_blocks = min(max_num_seqs * per_sequence, budget // per_block)
        else:
            require_int("num_blocks", num_blocks, minimum=1, error=EngineError)
        if num_blocks < per_sequence:
            raise EngineError(
                f"a pool of {num_blocks} blocks × {block_size} tokens cannot hold even one request of the model's "
                f"context ({self.config.context_length} tokens): give num_blocks ≥ {per_sequence} "
                "(or a larger kv_cache_bytes)."
            )
        return num_blocks

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request; return its id.  Everything is checked here, before the request touches any state."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise EngineError(f"params must be a SamplingParams, got {type(params).__name__}.")
        check_prompt(prompt_ids, self.config.context_length)
        prompt_ids = [int(t) for t in prompt_ids]
        vocab = self.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            bad = next(t for t in prompt_ids if not 0 <= t < vocab)
            raise PromptError(f"token id {bad} is outside the model's vocabulary 0..{vocab - 1}: encode the prompt "
                              "with this model's tokenizer.")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise EngineError(f"request_id must be a non-empty string, got {request_id!r}.")
        if request_id in self.requests:
            raise EngineError(f"request id {request_id!r} is already running: give each request its own id.")
        seq = Sequence(request_id, prompt_ids, params)
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> Sequence:
        """Stop a request now (a client went away): its blocks are free when this returns."""
        seq = self.requests.pop(request_id, None) if isinstance(request_id, str) else None
        if seq is None:
            raise RequestNotFoundError(f"no unfinished request has the id {request_id!r} (finished or never added).")
        seq.finish_reason = FinishReason.ABORT
        seq.finish_time = time.perf_counter()
        self.scheduler.finish(seq)
        return seq

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- stepping -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once over the paged cache, sample; return what each request got."""
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        sampled = self.runner.run(scheduled.items)
        now = time.perf_counter()
        self.num_steps += 1
        for seq, n in scheduled.items:
            seq.num_computed += n
            self.blocks.register_full_blocks(seq)
        self.num_computed_tokens += scheduled.num_tokens
        outputs = []
        for seq, token in sampled.items():
            seq.append_token(token, now)
            self.num_generated_tokens += 1
            reason = self._finish_reason(seq, token)
            if reason is not None:
                seq.finish_reason, seq.finish_time = reason, now
                self.scheduler.finish(seq)
                del self.requests[seq.request_id]
            outputs.append(RequestOutput(seq.request_id, [token], list(seq.output_ids), reason, seq))
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in seq.params.stop_ids:
            return FinishReason.STOP
        if len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens > self.config.context_length:
            return FinishReason.LENGTH  # (the next token would need a position past the context)
        return None

    def stream(self, prompt_ids: Seq[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Add a request now (checked now) and return an iterator over its tokens as they come.

        Reading it steps the engine, so every other request runs too; closing it early aborts the request.
        """
        return self._tokens_of(self.add_request(prompt_ids, params))

    def _tokens_of(self, request_id: str) -> Iterator[int]:
        try:
            while request_id in self.requests:  # (aborted by someone else: the stream ends)
                for out in self.step():
                    if out.request_id == request_id:
                        yield from out.new_token_ids
                        if out.finished:
                            return
        finally:
            if request_id in self.requests:  # the caller stopped reading: free the request at once
                self.abort(request_id)

    def run_to_completion(self) -> None:
        """Step until every request has finished."""
        while self.has_unfinished_requests:
            self.step()

    # -- numbers for the notebook and the benchmark ------------------------------------------

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def close(self) -> None:
        """Release what the engine holds outside this process: a tensor-parallel engine (notebook 12)
        tells its other ranks to stop following.  Nothing to do for one process."""
        self.runner.stop()

    def stats(self) -> dict[str, float]:
        """Counters since the engine was made: steps, tokens, preemptions, prefix-cache hit rate, blocks."""
        b = self.blocks
        return {
            "steps": self.num_steps,
            "forward_passes": self.runner.forward_passes,
            "generated_tokens": self.num_generated_tokens,
            "computed_tokens": self.num_computed_tokens,
            "preemptions": self.num_preemptions,
            "prefix_hit_tokens": b.hit_tokens,
            "prefix_hit_rate": b.hit_tokens / b.query_tokens if b.query_tokens else 0.0,
            "free_blocks": b.num_free,
            "total_blocks": b.num_blocks,
            "cached_blocks": b.num_cached_blocks,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
        }

    def is_idle_and_clean(self) -> bool:
        """No request left, every block free with reference count 0 (what the stress test checks)."""
        return (not self.requests and not self.scheduler.has_work and self.blocks.num_free == self.blocks.num_blocks
                and not self.blocks.leaked_blocks())


def _model_config(model) -> ModelConfig:
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(config, ModelConfig):
        raise EngineError(f"model must be an llmlab Transformer (e.g. load_checkpoint().model), got "
                          f"{type(model).__name__}.")
    return config


__all__ = ["Engine", "EngineError", "RequestNotFoundError", "RequestOutput", "SequenceStatus"]

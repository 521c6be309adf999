"""The serving engine: a paged KV cache, prefix caching, continuous batching (notebook 11).

One concept per module:

* :mod:`~llmlab.engine.sequence`       a request's tokens, state and timestamps
* :mod:`~llmlab.engine.block_manager`  blocks, reference counts, free list, prefix cache
* :mod:`~llmlab.engine.paged_cache`    the per-layer block pools and the cache object the model sees
* :mod:`~llmlab.engine.scheduler`      token budget, chunked prefill, preemption by recompute
* :mod:`~llmlab.engine.runner`         tensors for a step, the forward pass, per-row sampling
* :mod:`~llmlab.engine.engine`         ``Engine``: add_request / step / abort / stream
* :mod:`~llmlab.engine.llm`            ``LLM``: offline batches
"""

from llmlab.engine.block_manager import BlockManager, NoFreeBlocksError, block_hash
from llmlab.engine.engine import Engine, EngineError, RequestNotFoundError, RequestOutput
from llmlab.engine.llm import LLM, Completion
from llmlab.engine.paged_cache import PagedCacheError, PagedKVCache, PagedStep, Span, paged_attention_reference
from llmlab.engine.scheduler import ScheduledStep, Scheduler, SchedulerConfig, SchedulerError
from llmlab.engine.sequence import FinishReason, Sequence, SequenceStatus

__all__ = [
    "BlockManager", "Completion", "Engine", "EngineError", "FinishReason", "LLM", "NoFreeBlocksError",
    "PagedCacheError", "PagedKVCache", "PagedStep", "Span", "RequestNotFoundError", "RequestOutput", "ScheduledStep",
    "Scheduler", "SchedulerConfig", "SchedulerError", "Sequence", "SequenceStatus", "block_hash",
    "paged_attention_reference",
]

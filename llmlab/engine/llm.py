"""Offline batches through the engine: ``LLM(...).generate(prompts, params)``.

Taught in notebook 11 (serving engine).  Every prompt is added to one
:class:`~llmlab.engine.Engine` at once and the engine steps until all are
done; continuous batching and the prefix cache do the rest.  Results come back
in the order of the prompts, with their serving metrics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from llmlab.engine.engine import Engine, EngineError
from llmlab.engine.sequence import FinishReason, Sequence
from llmlab.sampling import SamplingParams


@dataclass
class Completion:
    """One prompt's result: its new token ids (and text, with a tokenizer), why it stopped, and its timings."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: FinishReason
    ttft: float | None
    tpot: float | None
    num_preemptions: int
    prefix_hit_tokens: int

    @classmethod
    def of(cls, seq: Sequence, tokenizer) -> Completion:
        text = None
        if tokenizer is not None:
            stop = set(seq.params.stop_ids)
            shown = seq.output_ids[:-1] if seq.output_ids and seq.output_ids[-1] in stop else seq.output_ids
            text = tokenizer.decode(shown)
        return cls(seq.prompt_ids, list(seq.output_ids), text, seq.finish_reason, seq.ttft, seq.tpot,
                   seq.num_preemptions, seq.prefix_hit_tokens)


class LLM:
    """A model, its tokenizer and an :class:`Engine`, for offline batches (notebook 11).

    ``LLM()`` loads the built-in checkpoint; ``LLM(checkpoint="runs/mine")`` another one;
    ``LLM(model=m, tokenizer=t)`` wraps what you have.  Other keywords go to :class:`Engine`.
    """

    def __init__(self, model: torch.nn.Module | None = None, tokenizer=None, *,
                 checkpoint: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 **engine_options) -> None:
        if model is None:
            from llmlab.checkpoint import load_checkpoint
            from llmlab.runtime import device as pick_device

            loaded = load_checkpoint(checkpoint, device=pick_device(device))
            model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        elif checkpoint is not None:
            raise EngineError("give either model= or checkpoint=, not both.")
        self.tokenizer = tokenizer
        self.engine = Engine(model, **engine_options)

    def generate(self, prompts: Seq[str] | Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress: bool = True) -> list[Completion]:
        """Run every prompt to completion; one :class:`Completion` per prompt, in order.

        ``prompts`` are strings (with a tokenizer) or lists of token ids; ``params`` is one
        SamplingParams for all, or one per prompt.  ``progress`` shows a bar of finished requests.
        """
        from llmlab.train import progress_bar

        from llmlab.generate import check_prompt

        prompt_ids = [self._ids(p) for p in _as_list(prompts)]
        per_prompt = self._params(params, len(prompt_ids))
        for ids_, sp in zip(prompt_ids, per_prompt):  # all checked before any is queued
            check_prompt(ids_, self.engine.config.context_length)
            if not isinstance(sp, SamplingParams):
                raise EngineError(f"params must be SamplingParams, got {type(sp).__name__}.")
        ids: list[str] = []
        results: list[Completion | None] = [None] * len(prompt_ids)
        bar = progress_bar(total=len(prompt_ids), enabled=progress, desc="generating", unit="request")
        try:
            for p, sp in zip(prompt_ids, per_prompt):
                ids.append(self.engine.add_request(p, sp))
            order = {rid: i for i, rid in enumerate(ids)}
            while any(r is None for r in results):
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = Completion.of(out.sequence, self.tokenizer)
                        bar.update(1)
        finally:
            bar.close()
            for rid in ids:  # a bad prompt or an interruption: free what is left
                if rid in self.engine.requests:
                    self.engine.abort(rid)
        return results

    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineError("text prompts need a tokenizer: LLM(model, tokenizer) or pass token ids.")
            return self.tokenizer.encode(prompt)
        return prompt

    def _params(self, params, count: int) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams(stop_ids=self._end_of_text())] * count
        params = _as_list(params, "params")
        if len(params) != count:
            raise EngineError(f"got {len(params)} SamplingParams for {count} prompts: give one, or one per prompt.")
        return params


    def _end_of_text(self) -> tuple[int, ...]:
        """The tokenizer's end-of-text id as the default stop id (none without a tokenizer or such a token)."""
        from llmlab.tokenizer import ENDOFTEXT

        special = getattr(self.tokenizer, "special_tokens", {})
        return (special[ENDOFTEXT],) if ENDOFTEXT in special else ()


def _as_list(items, what: str = "prompts") -> list:
    if isinstance(items, (str, bytes)) or not isinstance(items, Seq):
        raise EngineError(f"{what} must be a list, got {type(items).__name__}.")
    if not items:
        raise EngineError(f"{what} is empty: give at least one.")
    return list(items)

"""What the server serves: a model, its tokenizer, chat template, stop ids and the name clients ask for.

Taught in notebook 15 (serving and its metrics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

BUILTIN_NAME = "llmlab-course-tiny"
"""The name the built-in course checkpoint is served under (``llmlab serve`` with no ``--model``)."""


@dataclass
class ServedModel:
    """A model ready to serve (notebook 15): ``chat_template`` None means no ``/v1/chat/completions``."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    chat_template: Any = None
    stop_ids: tuple[int, ...] = ()

    @property
    def context_length(self) -> int:
        return int(self.model.config.context_length)

    @classmethod
    def from_checkpoint(cls, checkpoint, name: str = BUILTIN_NAME) -> ServedModel:
        """A :func:`llmlab.checkpoint.load_checkpoint` result (the course model: no chat template)."""
        return cls(checkpoint.model, checkpoint.tokenizer, name, None, (checkpoint.tokenizer.eot_id,))

    @classmethod
    def from_pretrained(cls, pretrained, name: str | None = None) -> ServedModel:
        """A :func:`llmlab.hub.load_pretrained` result: its chat template and stop ids come along."""
        return cls(pretrained.model, pretrained.tokenizer, name or pretrained.model.config.name,
                   pretrained.chat_template, tuple(pretrained.stop_ids))

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt's ids: special-token text (``<|endoftext|>``) reads as the special token."""
        from llmlab.hub import HFTokenizer

        if isinstance(self.tokenizer, HFTokenizer):
            return self.tokenizer.encode(text)
        return self.tokenizer.encode(text, allowed_special="all")

    def chat_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The prompt ids of a conversation, rendered by the chat template, ready for the assistant's reply."""
        from llmlab.hub import HFTokenizer

        text = self.chat_template.render(messages, add_generation_prompt=True)
        if isinstance(self.tokenizer, HFTokenizer):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text, allowed_special="all")

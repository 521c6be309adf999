"""Token ids → text, one step at a time, for a streamed reply: whole characters only, stop strings cut.

Taught in notebook 15 (serving and its metrics).  A byte-level BPE token may hold
part of a UTF-8 character (an emoji, a Korean syllable): the bytes of an
unfinished character are held back until the token that completes it arrives.
A stop string (OpenAI's ``stop``) may arrive split over several tokens: the end
of the text that could still become a stop string is held back too, and once a
stop string appears the text is cut just before it.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence


class IncrementalText:
    """Feed token ids with :meth:`add`; each call returns the text that is safe to send now.

    >>> # text = IncrementalText(tokenizer, stop=["\\n\\n"]); delta = text.add([id1, id2])
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_ids: Iterable[int]) -> str:
        """The new text these tokens complete (``stopped`` turns True when a stop string appeared)."""
        if self.stopped:
            return ""
        self.text += self._decoder.decode(self.tokenizer.decode_bytes(list(token_ids)), final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """The end of the reply: every held-back character (an unfinished one becomes U+FFFD)."""
        if self.stopped:
            return ""
        self.text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    @property
    def sent_text(self) -> str:
        """Everything returned so far (the reply's text)."""
        return self.text[:self.sent]

    def _release(self, final: bool) -> str:
        hits = [at for at in (self.text.find(s, self.sent) for s in self.stop) if at >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            end = len(self.text) if final else len(self.text) - self._held_back()
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest unsent end of the text that begins some stop string."""
        unsent = self.text[self.sent:]
        for k in range(min(len(unsent), max((len(s) for s in self.stop), default=0) - 1), 0, -1):
            tail = unsent[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

"""ipywidgets explorers used by the notebooks.

The token explorer is in notebook 01: type text, see each tokenizer's pieces
coloured, with their ids and counts.  Later notebooks add sampling panels here.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Protocol

from llmlab.viz import TOKEN_COLOURS


class Tokenizer(Protocol):
    """What the explorer needs: ``encode`` and per-token text (``BPETokenizer`` has both)."""

    def encode(self, text: str, **kwargs) -> list[int]: ...

    def token_texts(self, ids: list[int]) -> list[str]: ...


def tokens_html(tokenizer: Tokenizer, text: str, show_ids: bool = True) -> str:
    """HTML for ``text`` as coloured token spans, each with its id as a tooltip (and below it)."""
    ids = tokenizer.encode(text, disallowed_special=())
    spans = []
    for i, (token_id, piece) in enumerate(zip(ids, tokenizer.token_texts(ids))):
        shown = html.escape(piece).replace(" ", "&nbsp;").replace("\n", "↵<br>")
        colour = TOKEN_COLOURS[i % len(TOKEN_COLOURS)]
        id_line = f"<sub style='color:#5c677d'>{token_id}</sub>" if show_ids else ""
        spans.append(
            f"<span title='id {token_id}' style='background:{colour};border-radius:3px;"
            f"padding:1px 2px;margin:1px;font-family:monospace;display:inline-block'>{shown}{id_line}</span>"
        )
    n_bytes, n_chars = len(text.encode("utf-8")), len(text)
    summary = (
        f"<div style='color:#33415c;font-size:90%'>{len(ids)} tokens · {n_chars} characters · "
        f"{n_bytes} bytes · {n_bytes / max(len(ids), 1):.2f} bytes/token</div>"
    )
    return "<div>" + "".join(spans) + "</div>" + summary


def token_explorer(tokenizers: Mapping[str, Tokenizer], text: str = "The sky is clear. 하늘이 맑다. 🚀"):
    """A text box and, for each named tokenizer, the coloured tokens of what is typed."""
    import ipywidgets as widgets

    box = widgets.Textarea(value=text, description="text", layout=widgets.Layout(width="95%", height="70px"))
    outputs = {name: widgets.HTML() for name in tokenizers}

    def redraw(_=None) -> None:
        for name, tok in tokenizers.items():
            outputs[name].value = f"<b>{html.escape(name)}</b>" + tokens_html(tok, box.value)

    box.observe(redraw, names="value")
    redraw()
    return widgets.VBox([box, *outputs.values()])

"""ipywidgets explorers used by the notebooks.

- :func:`token_explorer` (notebook 01): type text, see each tokenizer's pieces
  coloured, with their ids and counts.
- :func:`sampling_explorer` (notebook 08): temperature / top-k / top-p sliders
  over a real model's next-token distribution.

Both return an :class:`Explorer`.  Displayed in a notebook it shows, first, a
static HTML preview of its first state (what a notebook opened without running
shows: on GitHub, in a fresh clone, after ``python -m llmlab.strip_widgets``),
then the live widget, which hides that preview while it is alive.

Token pieces are drawn the same way everywhere: a space shows as ``·``, a
newline as ``↵``, a tab as ``→``, and bytes that are not UTF-8 on their own
(a third of a Korean syllable, part of an emoji) as their hex values, e.g.
``⟨EC 95⟩``, so different partial pieces never look alike.
"""

from __future__ import annotations

import html
import uuid
from collections.abc import Mapping
from typing import Protocol

from llmlab.viz import TOKEN_COLOURS

FONT_PX = 16
"""Text size of the explorers (readable on a projector)."""

ID_FONT_PX = 13
"""Size of the token ids under each piece."""

PREVIEW_CAPTION = "static preview — run the cell for the live explorer"
"""The line above every static preview."""

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
"""The mime type of a live ipywidgets view in a notebook output."""

TOP_K_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50, 100, 200)
"""The top-k slider's stops after "off": every small value is one step apart."""

_WHITESPACE = {" ": "·", "\n": "↵", "\t": "→"}
_MUTED = "#5c677d"
_FAINT = "#8d99ae"
_BYTES_COLOUR = "#7b2cbf"
_CELL = "font-family:monospace;white-space:pre;border:none;vertical-align:middle;line-height:1.25;"


class Tokenizer(Protocol):
    """What the explorers need: ``encode``, and each token's bytes (``BPETokenizer.decode_bytes``).

    A tokenizer without ``decode_bytes`` may offer tiktoken's
    ``decode_single_token_bytes`` or, failing both, ``token_texts``.
    """

    def encode(self, text: str, **kwargs) -> list[int]: ...


# --- drawing one token ---------------------------------------------------------------------------


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The raw bytes of one token (a token may hold part of a UTF-8 character)."""
    if hasattr(tokenizer, "decode_bytes"):
        return tokenizer.decode_bytes([token_id])
    if hasattr(tokenizer, "decode_single_token_bytes"):  # tiktoken.Encoding
        return tokenizer.decode_single_token_bytes(token_id)
    return tokenizer.token_texts([token_id])[0].encode("utf-8")


def piece_parts(raw: bytes) -> list[tuple[str, bool]]:
    """Split a token's bytes into runs of text and runs of bytes that are not UTF-8 on their own.

    Returns ``(text, is_bytes)`` pairs: ``b" \\xec\\x95"`` → ``[(" ", False), ("EC 95", True)]``.
    """
    parts: list[tuple[str, bool]] = []
    bad = bytearray()
    i = 0
    while i < len(raw):
        try:
            text = raw[i:].decode("utf-8")
        except UnicodeDecodeError as err:
            text = raw[i : i + err.start].decode("utf-8")
            if text:
                if bad:
                    parts.append((" ".join(f"{b:02X}" for b in bad), True))
                    bad.clear()
                parts.append((text, False))
            bad += raw[i + err.start : i + err.end]
            i += err.end
            continue
        if bad:
            parts.append((" ".join(f"{b:02X}" for b in bad), True))
            bad.clear()
        parts.append((text, False))
        break
    if bad:
        parts.append((" ".join(f"{b:02X}" for b in bad), True))
    return parts


def piece_label(raw: bytes) -> str:
    """A token as plain text: spaces ``·``, newlines ``↵``, tabs ``→``, partial characters ``⟨EC 95⟩``."""
    out = []
    for text, is_bytes in piece_parts(raw):
        out.append(f"⟨{text}⟩" if is_bytes else "".join(_WHITESPACE.get(c, c) for c in text))
    return "".join(out) or "∅"


def piece_html(raw: bytes) -> str:
    """:func:`piece_label` as HTML: whitespace marks in grey, byte runs in purple."""
    out = []
    for text, is_bytes in piece_parts(raw):
        if is_bytes:
            out.append(f"<span style='color:{_BYTES_COLOUR}'>⟨{text}⟩</span>")
            continue
        for c in text:
            if c in _WHITESPACE:
                out.append(f"<span style='color:{_FAINT}'>{_WHITESPACE[c]}</span>")
            else:
                out.append(html.escape(c))
    return "".join(out) or f"<span style='color:{_FAINT}'>∅</span>"


def _is_partial(raw: bytes) -> bool:
    return any(is_bytes for _, is_bytes in piece_parts(raw))


# --- notebook 01: the token explorer --------------------------------------------------------------


def tokens_html(tokenizer: Tokenizer, text: str, show_ids: bool = True) -> str:
    """HTML for ``text`` as coloured token chips: the piece, and its id below it (and as a tooltip).

    A piece whose bytes are not UTF-8 on their own shows as its bytes (``⟨EC 95⟩``)
    in a dashed chip; a newline token also breaks the line.
    """
    ids = tokenizer.encode(text, disallowed_special=())
    chips = []
    for i, token_id in enumerate(ids):
        raw = token_bytes(tokenizer, token_id)
        colour = TOKEN_COLOURS[i % len(TOKEN_COLOURS)]
        border = f"1px dashed {_BYTES_COLOUR}" if _is_partial(raw) else "1px solid transparent"
        id_line = (f"<span class='llmlab-token-id' style='font-size:{ID_FONT_PX}px;color:{_MUTED};"
                   f"line-height:1.1'>{token_id}</span>") if show_ids else ""
        chips.append(
            f"<span class='llmlab-token' title='id {token_id}' style='display:inline-flex;flex-direction:column;"
            f"align-items:center;vertical-align:top;background:{colour};border:{border};border-radius:3px;"
            f"padding:1px 3px;margin:2px 1px;font-family:monospace;white-space:pre'>"
            f"<span class='llmlab-piece'>{piece_html(raw)}</span>{id_line}</span>"
        )
        if raw.endswith(b"\n"):
            chips.append("<br>")
    n_bytes, n_chars = len(text.encode("utf-8")), len(text)
    summary = (
        f"<div class='llmlab-token-summary' style='color:#33415c'>{len(ids)} tokens · {n_chars} characters · "
        f"{n_bytes} bytes · {n_bytes / max(len(ids), 1):.2f} bytes/token</div>"
    )
    return "<div style='line-height:1.3'>" + "".join(chips) + "</div>" + summary


def _tokenizer_block(name: str, tokenizer: Tokenizer, text: str) -> str:
    return (f"<div style='font-size:{FONT_PX}px;line-height:1.3;margin:4px 0'>"
            f"<b>{html.escape(name)}</b>{tokens_html(tokenizer, text)}</div>")


def token_explorer(tokenizers: Mapping[str, Tokenizer], text: str = "The sky is clear. 하늘이 맑다. 🚀") -> Explorer:
    """A text box and, for each named tokenizer, the coloured tokens of what is typed.

    Returns an :class:`Explorer`: ``.widget`` is the live panel (CSS class
    ``llmlab-token-explorer``), ``.controls["text"]`` the text box and
    ``.outputs`` the HTML widget of each tokenizer.
    """
    import ipywidgets as widgets

    uid = uuid.uuid4().hex[:12]
    box = widgets.Textarea(value=text, description="text",
                           layout=widgets.Layout(width="95%", height="64px"))
    box.add_class("llmlab-text")
    outputs = {name: widgets.HTML() for name in tokenizers}

    def redraw(_=None) -> None:
        for n, (name, tok) in enumerate(tokenizers.items()):
            style = _live_style(uid, "llmlab-token-explorer") if n == 0 else ""
            outputs[name].value = style + _tokenizer_block(name, tok, box.value)

    box.observe(redraw, names="value")
    redraw()
    panel = widgets.VBox([box, *outputs.values()])
    panel.add_class("llmlab-explorer")
    panel.add_class("llmlab-token-explorer")
    preview = (
        f"<div style='font-size:{FONT_PX}px;line-height:1.3'><b>text</b> "
        f"<span style='font-family:monospace;white-space:pre-wrap'>{html.escape(text)}</span></div>"
        + "".join(_tokenizer_block(name, tok, text) for name, tok in tokenizers.items())
    )
    return Explorer(panel, preview, "token explorer", uid, controls={"text": box}, outputs=outputs)


# --- the static preview beside the live widget ----------------------------------------------------


def _live_style(uid: str, panel_class: str) -> str:
    """CSS the live widget carries: bigger widget text, and hide this explorer's static preview.

    The preview's output is hidden only while the widget is alive in the page, so
    a notebook opened without a kernel (the widget dead or stripped) shows it.
    """
    return (
        "<style>"
        f".{panel_class} {{--jp-widgets-font-size:{FONT_PX}px;--jp-widgets-inline-height:30px}}"
        f".{panel_class} .widget-html-content, .{panel_class} .jupyter-widget-html-content "
        "{line-height:1.3;min-width:0}"
        f".jp-OutputArea-child:has(.llmlab-preview-{uid}) {{display:none}}"
        f".llmlab-preview-{uid} {{display:none}}"
        "</style>"
    )


class Explorer:
    """A live ipywidgets panel and a static HTML preview of its first state.

    ``display(explorer)`` (or leaving it as a cell's last expression) emits two
    outputs: the preview (HTML with a one-line caption) and the live widget
    (short ``text/plain``, marked ``{"llmlab": {"live_widget": name}}`` in its
    output metadata so :mod:`llmlab.strip_widgets` can drop it).  Extra keyword
    arguments become attributes (``controls``, ``state``, ...), for tests.
    """

    def __init__(self, widget, preview_html: str, name: str, uid: str | None = None, **parts) -> None:
        self.widget = widget
        self.name = name
        self.uid = uid or uuid.uuid4().hex[:12]
        self.preview_html = preview_html
        for key, value in parts.items():
            setattr(self, key, value)

    @property
    def children(self) -> tuple:
        """The live panel's children (as if the explorer were the panel itself)."""
        return self.widget.children

    def preview_bundle(self) -> dict[str, str]:
        """The static preview's mime bundle (HTML with a caption, and a plain-text line)."""
        caption = (f"<div style='color:{_MUTED};font-size:14px;font-style:italic;margin-bottom:4px'>"
                   f"{html.escape(self.name)}: {PREVIEW_CAPTION}</div>")
        body = (f"<div class='llmlab-static-preview llmlab-preview-{self.uid}' "
                f"style='font-size:{FONT_PX}px;line-height:1.3'>{caption}{self.preview_html}</div>")
        return {"text/html": body, "text/plain": f"[{self.name}: {PREVIEW_CAPTION}]"}

    def widget_bundle(self) -> dict:
        """The live widget's mime bundle, with a short ``text/plain`` instead of the widget's repr."""
        bundle = dict(self.widget._repr_mimebundle_())
        bundle["text/plain"] = f"[{self.name}: live widget]"
        return bundle

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.preview_bundle(), raw=True, metadata={"llmlab": {"static_preview": self.name}})
        display(self.widget_bundle(), raw=True, metadata={"llmlab": {"live_widget": self.name}})

    def __repr__(self) -> str:
        return f"<llmlab {self.name}: display it in Jupyter for the live widget>"


# --- notebook 08: the sampling explorer -------------------------------------------------------


def sampling_bars_html(labels: list[str], base: list[float], final: list[float], title: str = "") -> str:
    """HTML bars: for each token, its probability under the settings (blue), the raw softmax as a grey tick.

    ``labels`` are plain text (see :func:`piece_label`); ``base`` is the
    unfiltered softmax (temperature 1), ``final`` the distribution the sampler
    draws from; a token the filters removed shows as struck through.
    """
    rows = []
    for label, p0, p in zip(labels, base, final):
        removed = p == 0.0
        name = html.escape(label)
        name = f"<s style='color:{_FAINT}'>{name}</s>" if removed else name
        rows.append(
            f"<tr class='llmlab-bar{' llmlab-removed' if removed else ''}' style='background:none'>"
            f"<td style='{_CELL}text-align:right;padding:0 6px 0 0'>{name}</td>"
            f"<td style='{_CELL}width:100%;min-width:80px;padding:0'>"
            "<div style='position:relative;width:100%;height:14px;background:#f1f3f5'>"
            f"<div style='position:absolute;left:0;top:0;height:14px;width:{p * 100:.1f}%;background:#4c78a8'></div>"
            f"<div style='position:absolute;top:0;height:14px;left:{min(p0, 0.99) * 100:.1f}%;width:2px;"
            f"background:{_MUTED}'></div></div></td>"
            f"<td class='llmlab-p' style='{_CELL}text-align:right;padding:0 0 0 6px'>{p:6.1%}</td>"
            f"<td style='{_CELL}color:{_FAINT};text-align:right;padding:0 0 0 6px'>(raw {p0:5.1%})</td>"
            "</tr>"
        )
    head = (f"<div class='llmlab-bars-title' style='color:#33415c;margin-bottom:2px'>{html.escape(title)}</div>"
            if title else "")
    # The table's inline styles win over JupyterLab's own table styles (12 px text, padding, stripes).
    return (f"<div style='font-size:{FONT_PX}px;line-height:1.25'>" + head
            + f"<table style='border-collapse:collapse;table-layout:auto;width:100%;max-width:560px;margin:0;"
            f"font-size:{FONT_PX}px;line-height:1.25;border:none'>" + "".join(rows) + "</table></div>")


def _continuation_html(prompt: str, text: str, seed: int, n_new: int) -> str:
    shown_prompt = prompt if len(prompt) <= 300 else "…" + prompt[-300:]
    return (
        f"<div style='font-size:{FONT_PX}px;line-height:1.35'>"
        f"<div class='llmlab-continuation' style='font-family:monospace;white-space:pre-wrap;"
        f"border-left:3px solid #4c78a8;padding-left:6px;line-height:1.35'>"
        f"<span style='color:{_FAINT}'>{html.escape(shown_prompt)}</span>"
        f"<b>{html.escape(text)}</b></div>"
        f"<div style='color:{_MUTED}'>seed {seed} · {n_new} new tokens</div></div>"
    )


def _top_k_options(vocab: int) -> list[tuple[str, int]]:
    return [("off", 0)] + [(str(k), k) for k in TOP_K_STEPS if k <= vocab]


def sampling_explorer(
    model,
    tokenizer,
    prompt: str = "ROMEO:\nBut soft, what light through yonder",
    *,
    top_n: int = 10,
    max_new_tokens: int = 40,
    seed: int = 0,
) -> Explorer:
    """Sliders for temperature / top-k / top-p over a real model's next-token distribution (notebook 08).

    The bars show the ``top_n`` most likely next tokens of ``prompt``: blue is
    the probability the sampler uses under the current settings, the grey tick
    the raw softmax.  Every change redraws the bars and samples a continuation
    with ``seed``; "resample" moves to the next seed.  Filtering and sampling
    are ``llmlab.sampling``'s and ``llmlab.generate``'s own functions.  The
    top-k slider steps through "off", 1–6, 8, 10, 12, 15, 20, 30, 50, 100, 200.

    Returns an :class:`Explorer` whose ``.widget`` is the live panel (CSS class
    ``llmlab-sampling-explorer``) and which carries ``controls`` (name →
    widget), ``bars`` and ``continuation`` (HTML widgets) and ``state`` (what
    is shown: ``params``, ``prompt_ids``, ``top_ids``, ``probs``, ``kept``,
    ``continuation_ids``, ``text``, ``error``) so a test can drive it headless.
    """
    import ipywidgets as widgets
    import torch

    from llmlab.generate import PromptError, check_prompt, generate_ids
    from llmlab.sampling import SamplingParams, next_token_probs

    vocab = model.config.vocab_size
    uid = uuid.uuid4().hex[:12]

    def slider_kw(width: str) -> dict:
        return {"continuous_update": False, "style": {"description_width": "initial"},
                "layout": widgets.Layout(width=width, margin="2px 12px 2px 0")}

    controls = {
        "prompt": widgets.Textarea(value=prompt, description="prompt", continuous_update=False,
                                   layout=widgets.Layout(width="95%", height="56px")),
        "temperature": widgets.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.05, description="temperature",
                                           readout_format=".2f", **slider_kw("330px")),
        "top_k": widgets.SelectionSlider(options=_top_k_options(vocab), value=0, description="top-k",
                                         **slider_kw("300px")),
        "top_p": widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top-p",
                                     readout_format=".2f", **slider_kw("300px")),
        "seed": widgets.IntText(value=seed, description="seed", style={"description_width": "initial"},
                                layout=widgets.Layout(width="130px", margin="2px 12px 2px 0")),
        "resample": widgets.Button(description="resample", icon="refresh", tooltip="next seed, new continuation",
                                   layout=widgets.Layout(width="auto")),
    }
    for name, control in controls.items():
        control.add_class(f"llmlab-{name.replace('_', '-')}")
    bars, continuation = widgets.HTML(), widgets.HTML()
    bars.add_class("llmlab-bars")
    continuation.add_class("llmlab-continuation-box")
    state: dict = {}
    eot = tokenizer.special_tokens.get("<|endoftext|>") if hasattr(tokenizer, "special_tokens") else None
    style = _live_style(uid, "llmlab-sampling-explorer")

    def current_params() -> SamplingParams:
        top_k = controls["top_k"].value
        top_p = controls["top_p"].value
        return SamplingParams(
            temperature=float(controls["temperature"].value),
            top_k=top_k if top_k > 0 else None,
            top_p=top_p if top_p < 1.0 else None,
            max_new_tokens=max_new_tokens,
            seed=int(controls["seed"].value),
            stop_ids=(eot,) if eot is not None else (),
        )

    @torch.no_grad()
    def prompt_logits(text: str) -> tuple[list[int], torch.Tensor]:
        ids = tokenizer.encode(text, disallowed_special=())
        check_prompt(ids, model.config.context_length)
        if state.get("prompt_ids") != ids:  # the forward pass runs only when the prompt changed
            device = next(model.parameters()).device
            was_training = model.training
            model.eval()
            logits = model(torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
            model.train(was_training)
            state.update(prompt_ids=ids, logits=logits)
        return ids, state["logits"]

    def redraw(_=None) -> None:
        params = current_params()
        state.update(params=params, error=None)
        try:
            ids, logits = prompt_logits(controls["prompt"].value)
        except PromptError as err:
            state.update(error=str(err), prompt_ids=None, probs=None, kept=0, top_ids=[], continuation_ids=[], text="")
            bars.value = (style + f"<div style='color:#c1121f;font-size:{FONT_PX}px'>⚠ {html.escape(str(err))}</div>")
            continuation.value = ""
            return
        base = torch.softmax(logits, dim=-1)
        probs = next_token_probs(logits, params)
        top_ids = torch.topk(base, min(top_n, vocab)).indices.tolist()
        kept = int((probs > 0).sum())
        labels = [piece_label(token_bytes(tokenizer, i)) for i in top_ids]
        mode = "greedy (argmax)" if params.greedy else f"T={params.temperature:.2f}"
        title = (f"next token after {len(ids)} prompt tokens · {mode} · top-k {params.top_k or 'off'} · "
                 f"top-p {params.top_p or 'off'} · {kept:,} of {vocab:,} tokens can be drawn")
        bars.value = style + sampling_bars_html(labels, base[top_ids].tolist(), probs[top_ids].tolist(), title)
        new_ids = list(generate_ids(model, ids, params))
        if new_ids and new_ids[-1] in params.stop_ids:
            new_ids = new_ids[:-1]
        text = tokenizer.decode(new_ids)
        state.update(probs=probs, top_ids=top_ids, kept=kept, continuation_ids=new_ids, text=text)
        continuation.value = _continuation_html(controls["prompt"].value, text, params.seed, len(new_ids))

    def resample(_=None) -> None:
        controls["seed"].value += 1  # the observer on seed redraws

    for name in ("prompt", "temperature", "top_k", "top_p", "seed"):
        controls[name].observe(redraw, names="value")
    controls["resample"].on_click(resample)
    redraw()
    wrap = {"flex_flow": "row wrap", "align_items": "flex-start", "width": "100%"}
    row = widgets.HBox([controls[n] for n in ("temperature", "top_k", "top_p", "seed", "resample")],
                       layout=widgets.Layout(**wrap))
    row.add_class("llmlab-controls")
    # min_width 0 lets a box shrink below its basis on a narrow screen (the title wraps; a table
    # wider than the screen scrolls inside its box instead of being cut off).
    bars.layout = widgets.Layout(flex="1 1 500px", min_width="0", overflow="auto", margin="0 16px 0 0")
    continuation.layout = widgets.Layout(flex="1 1 320px", min_width="0")
    panel = widgets.VBox([controls["prompt"], row, widgets.HBox([bars, continuation], layout=widgets.Layout(**wrap))])
    panel.add_class("llmlab-explorer")
    panel.add_class("llmlab-sampling-explorer")

    settings = (f"<div style='color:{_MUTED}'>temperature {controls['temperature'].value:.2f} · top-k off · "
                f"top-p {controls['top_p'].value:.2f} · seed {controls['seed'].value}</div>")
    preview = (
        settings + "<div style='display:flex;flex-wrap:wrap;gap:16px'>"
        f"<div style='flex:1 1 520px'>{bars.value.removeprefix(style)}</div>"
        f"<div style='flex:1 1 320px'>{continuation.value}</div></div>"
    )
    return Explorer(panel, preview, "sampling explorer", uid,
                    controls=controls, bars=bars, continuation=continuation, state=state)

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


# --- notebook 08: the sampling explorer -------------------------------------------------------


def _token_label(text: str) -> str:
    """A token's text made visible: spaces as ·, newlines as ↵, tabs as →."""
    return text.replace(" ", "·").replace("\n", "↵").replace("\t", "→") or "∅"


def sampling_bars_html(labels: list[str], base: list[float], final: list[float], title: str = "") -> str:
    """HTML bars: for each token, its probability under the settings (blue), the raw softmax as a grey tick.

    ``base`` is the unfiltered softmax (temperature 1), ``final`` the distribution
    the sampler draws from; a token the filters removed shows as struck through.
    """
    width = 260
    rows = []
    for label, p0, p in zip(labels, base, final):
        removed = p == 0.0
        name = html.escape(label)
        name = f"<s style='color:#8d99ae'>{name}</s>" if removed else name
        rows.append(
            "<tr>"
            f"<td style='font-family:monospace;text-align:right;padding-right:6px;white-space:pre'>{name}</td>"
            f"<td><div style='position:relative;width:{width}px;height:12px;background:#f1f3f5'>"
            f"<div style='position:absolute;left:0;top:0;height:12px;width:{p * width:.1f}px;background:#4c78a8'></div>"
            f"<div style='position:absolute;top:0;height:12px;left:{min(p0 * width, width - 2):.1f}px;width:2px;"
            "background:#5c677d'></div></div></td>"
            f"<td style='font-family:monospace;padding-left:6px'>{p:6.1%}</td>"
            f"<td style='font-family:monospace;color:#8d99ae;padding-left:6px'>(raw {p0:5.1%})</td>"
            "</tr>"
        )
    head = f"<div style='color:#33415c;font-size:90%'>{html.escape(title)}</div>" if title else ""
    return head + "<table style='border-collapse:collapse;line-height:1.1'>" + "".join(rows) + "</table>"


def sampling_explorer(
    model,
    tokenizer,
    prompt: str = "ROMEO:\nBut soft, what light through yonder",
    *,
    top_n: int = 15,
    max_new_tokens: int = 40,
    seed: int = 0,
):
    """Sliders for temperature / top-k / top-p over a real model's next-token distribution (notebook 08).

    The bars show the ``top_n`` most likely next tokens of ``prompt``: blue is
    the probability the sampler uses under the current settings, the grey tick
    the raw softmax.  Every change redraws the bars and samples a continuation
    with ``seed``; "resample" moves to the next seed.  Filtering and sampling
    are ``llmlab.sampling``'s and ``llmlab.generate``'s own functions.

    Returns an ``ipywidgets.VBox`` that also carries ``controls`` (name →
    widget), ``bars`` and ``continuation`` (HTML widgets) and ``state`` (what
    is shown: ``params``, ``prompt_ids``, ``top_ids``, ``probs``, ``kept``,
    ``continuation_ids``, ``text``, ``error``) so a test can drive it headless.
    """
    import ipywidgets as widgets
    import torch

    from llmlab.generate import PromptError, check_prompt, generate_ids
    from llmlab.sampling import SamplingParams, next_token_probs

    vocab = model.config.vocab_size
    slider = {"continuous_update": False, "style": {"description_width": "90px"},
              "layout": widgets.Layout(width="420px")}
    controls = {
        "prompt": widgets.Textarea(value=prompt, description="prompt", continuous_update=False,
                                  layout=widgets.Layout(width="95%", height="60px")),
        "temperature": widgets.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.05, description="temperature",
                                           readout_format=".2f", **slider),
        "top_k": widgets.IntSlider(value=0, min=0, max=min(vocab, 200), description="top-k (0=off)", **slider),
        "top_p": widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top-p (1=off)",
                                     readout_format=".2f", **slider),
        "seed": widgets.IntText(value=seed, description="seed", layout=widgets.Layout(width="180px")),
        "resample": widgets.Button(description="resample", icon="refresh", tooltip="next seed, new continuation"),
    }
    bars, continuation = widgets.HTML(), widgets.HTML()
    state: dict = {}
    eot = tokenizer.special_tokens.get("<|endoftext|>") if hasattr(tokenizer, "special_tokens") else None

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
            bars.value = f"<div style='color:#c1121f'>⚠ {html.escape(str(err))}</div>"
            continuation.value = ""
            return
        base = torch.softmax(logits, dim=-1)
        probs = next_token_probs(logits, params)
        top_ids = torch.topk(base, min(top_n, vocab)).indices.tolist()
        kept = int((probs > 0).sum())
        labels = [_token_label(t) for t in tokenizer.token_texts(top_ids)]
        mode = "greedy (argmax)" if params.greedy else f"T={params.temperature:.2f}"
        title = (f"next token after {len(ids)} prompt tokens · {mode} · top-k {params.top_k or 'off'} · "
                 f"top-p {params.top_p or 'off'} · {kept:,} of {vocab:,} tokens can be drawn")
        bars.value = sampling_bars_html(labels, base[top_ids].tolist(), probs[top_ids].tolist(), title)
        new_ids = list(generate_ids(model, ids, params))
        if new_ids and new_ids[-1] in params.stop_ids:
            new_ids = new_ids[:-1]
        text = tokenizer.decode(new_ids)
        state.update(probs=probs, top_ids=top_ids, kept=kept, continuation_ids=new_ids, text=text)
        continuation.value = (
            "<div style='font-family:monospace;white-space:pre-wrap;border-left:3px solid #4c78a8;padding-left:6px'>"
            f"<span style='color:#8d99ae'>{html.escape(controls['prompt'].value)}</span>"
            f"<b>{html.escape(text)}</b></div>"
            f"<div style='color:#5c677d;font-size:85%'>seed {params.seed} · {len(new_ids)} new tokens</div>"
        )

    def resample(_=None) -> None:
        controls["seed"].value += 1  # the observer on seed redraws

    for name in ("prompt", "temperature", "top_k", "top_p", "seed"):
        controls[name].observe(redraw, names="value")
    controls["resample"].on_click(resample)
    redraw()
    panel = widgets.VBox([
        controls["prompt"],
        widgets.HBox([widgets.VBox([controls["temperature"], controls["top_k"], controls["top_p"]]),
                      widgets.VBox([controls["seed"], controls["resample"]])]),
        bars,
        continuation,
    ])
    panel.controls, panel.bars, panel.continuation, panel.state = controls, bars, continuation, state
    return panel

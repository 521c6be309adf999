"""The explorers' drawing (byte chips, visible spaces), the top-k scale, the static preview, and strip_widgets."""

from __future__ import annotations

import copy
import json
import re

import nbformat
import pytest
import torch

pytest.importorskip("ipywidgets")

from llmlab import Transformer, get_config
from llmlab.strip_widgets import WIDGET_MIME, main as strip_main, strip_file, strip_notebook
from llmlab.tokenizer import BPETokenizer
from llmlab.widgets import (
    PREVIEW_CAPTION,
    TOP_K_STEPS,
    Explorer,
    piece_html,
    piece_label,
    piece_parts,
    sampling_bars_html,
    sampling_explorer,
    token_bytes,
    token_explorer,
    tokens_html,
)

KOREAN = "하늘이 맑다"


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train("to be or not to be, that is the question " * 20 + KOREAN, 300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = get_config("course-tiny").replace(vocab_size=tok.vocab_size, context_length=16, d_model=32, n_layers=1,
                                            n_heads=2)
    return Transformer(cfg).eval()


# --- one token, drawn ------------------------------------------------------------------------------


def test_partial_utf8_shows_as_bytes():
    assert piece_parts("하".encode()[:2]) == [("ED 95", True)]
    assert piece_label("하".encode()[:2]) == "⟨ED 95⟩"
    assert piece_label(" 하".encode()[:3]) == "·⟨ED 95⟩"  # leading space, then two bytes of 하
    assert piece_label("하".encode()[2:] + b"x") == "⟨98⟩x"  # a continuation byte, then text
    assert piece_label("🚀".encode()[:3]) == "⟨F0 9F 9A⟩"
    # different bytes never look alike (the old chips all showed U+FFFD)
    raw = "하늘".encode()
    pieces = {piece_label(raw[i:i + 1]) for i in range(len(raw))}
    assert len(pieces) == len(set(raw)) == 5 and "\ufffd" not in "".join(pieces)


def test_whole_characters_and_whitespace():
    assert piece_label("하늘".encode()) == "하늘"
    assert piece_label(b" the") == "·the"
    assert piece_label(b"\n\n") == "↵↵" and piece_label(b"\t") == "→"
    assert piece_label(b"") == "∅"
    assert piece_parts(b"ok") == [("ok", False)]
    out = piece_html(b" <b>")
    assert "&lt;b&gt;" in out and "·" in out and "&nbsp;" not in out


def test_token_bytes_from_each_kind_of_tokenizer(tok):
    ids = tok.encode(KOREAN)
    assert b"".join(token_bytes(tok, i) for i in ids) == KOREAN.encode()

    class Tiktokenish:  # tiktoken.Encoding's API
        def decode_single_token_bytes(self, i):
            return tok.decode_bytes([i])

    assert [token_bytes(Tiktokenish(), i) for i in ids] == [token_bytes(tok, i) for i in ids]


def test_tokens_html_chips(tok):
    text = "to be " + KOREAN + " 🚀"
    out = tokens_html(tok, text)
    ids = tok.encode(text)
    shown = re.findall(r"<span class='llmlab-piece'>(.*?)</span><span class='llmlab-token-id'", out)
    assert len(shown) == len(ids)
    labels = [piece_label(tok.decode_bytes([i])) for i in ids]
    assert [re.sub(r"<[^>]+>", "", s) for s in shown] == labels  # (no HTML-special characters here)
    assert "⟨F0⟩" in out or "⟨F0 " in out  # the rocket's first byte, not a "�"
    assert "\ufffd" not in out and "&nbsp;" not in out and "·be" in re.sub(r"<[^>]+>", "", out)
    assert f"{len(ids)} tokens · {len(text)} characters · {len(text.encode())} bytes" in out
    assert "font-size:13px" in out  # ids are readable (≥ 13 px)
    assert "<br>" in tokens_html(tok, "to\nbe")  # a newline token breaks the line


# --- the sampling explorer's controls ---------------------------------------------------------------


def test_top_k_slider_steps_through_small_values(model, tok):
    explorer = sampling_explorer(model, tok, prompt="to be or", top_n=8, max_new_tokens=4)
    top_k = explorer.controls["top_k"]
    values = [value for _, value in top_k.options]
    assert values[0] == 0 and top_k.options[0][0] == "off" and top_k.value == 0
    assert values[1:6] == [1, 2, 3, 4, 5]  # each small k is one step
    assert values[1:] == [k for k in TOP_K_STEPS if k <= model.config.vocab_size]
    assert values == sorted(values) and values[-1] == 200
    top_k.value = 2
    assert explorer.state["kept"] == 2 and "top-k 2 " in explorer.bars.value


def test_sampling_labels_show_spaces_and_bytes(model, tok):
    explorer = sampling_explorer(model, tok, prompt="to be or", top_n=model.config.vocab_size, max_new_tokens=2)
    text = re.sub(r"<[^>]+>", "", explorer.bars.value)
    assert "·to" in text or "·be" in text  # leading spaces show as ·
    assert "⟨" in text and "\ufffd" not in text  # the lone bytes of the vocabulary show as ⟨..⟩


def test_bars_are_readable_and_single_spaced():
    out = sampling_bars_html(["a", "b"], [0.7, 0.3], [1.0, 0.0], title="t")
    assert "font-size:16px" in out and "line-height:1.25" in out
    assert out.count("llmlab-removed") == 1


# --- the static preview beside the live widget ------------------------------------------------------


def displayed(explorer, monkeypatch) -> list[tuple[dict, dict]]:
    import IPython.display

    calls = []
    monkeypatch.setattr(IPython.display, "display",
                        lambda obj, raw=False, metadata=None: calls.append((obj, metadata)))
    explorer._ipython_display_()
    return calls


def test_explorer_displays_preview_then_live_widget(tok, monkeypatch):
    explorer = token_explorer({"course": tok}, text="to be 하늘")
    assert isinstance(explorer, Explorer) and "llmlab-token-explorer" in explorer.widget._dom_classes
    (preview, meta1), (live, meta2) = displayed(explorer, monkeypatch)
    assert PREVIEW_CAPTION in preview["text/html"] and "llmlab-static-preview" in preview["text/html"]
    assert tokens_html(tok, "to be 하늘") in preview["text/html"]  # the same HTML the widget shows
    assert meta1 == {"llmlab": {"static_preview": "token explorer"}}
    assert live[WIDGET_MIME]["model_id"] == explorer.widget.model_id
    assert "VBox" not in live["text/plain"] and len(live["text/plain"]) < 60
    assert meta2 == {"llmlab": {"live_widget": "token explorer"}}
    # the live widget hides exactly this preview while it is alive
    assert f".llmlab-preview-{explorer.uid}" in explorer.outputs["course"].value
    assert "VBox" not in repr(explorer)
    explorer.controls["text"].value = "be"
    assert f"{len(tok.encode('be'))} tokens · 2 characters" in explorer.outputs["course"].value
    assert tokens_html(tok, "to be 하늘") in explorer.preview_html  # the preview keeps the first state


def test_sampling_preview_matches_first_state(model, tok, monkeypatch):
    explorer = sampling_explorer(model, tok, prompt="to be or", top_n=5, max_new_tokens=3)
    first_bars = explorer.bars.value
    (preview, _), (live, _) = displayed(explorer, monkeypatch)
    assert PREVIEW_CAPTION in preview["text/html"]
    table = first_bars[first_bars.index("<div style='font-size"):]
    assert table in preview["text/html"]
    assert explorer.continuation.value in preview["text/html"]
    assert "<style>" not in preview["text/html"]
    assert "llmlab-sampling-explorer" in explorer.widget._dom_classes and WIDGET_MIME in live


# --- strip_widgets -----------------------------------------------------------------------------------


def _notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    view = {"model_id": "abc", "version_major": 2, "version_minor": 0}
    explorer = nbformat.v4.new_code_cell("token_explorer(...)", outputs=[
        nbformat.v4.new_output("display_data", data={"text/html": "<div>preview</div>", "text/plain": "[preview]"},
                               metadata={"llmlab": {"static_preview": "token explorer"}}),
        nbformat.v4.new_output("display_data", data={WIDGET_MIME: view, "text/plain": "[token explorer: live widget]"},
                               metadata={"llmlab": {"live_widget": "token explorer"}}),
    ])
    old_widget = nbformat.v4.new_code_cell("VBox(...)", execution_count=3, outputs=[
        nbformat.v4.new_output("execute_result", execution_count=3,
                               data={WIDGET_MIME: view, "text/plain": "VBox(children=(Textarea(value='x'…"}),
    ])
    progress = nbformat.v4.new_code_cell("for _ in tqdm(...): ...", outputs=[
        nbformat.v4.new_output("display_data", data={WIDGET_MIME: view, "text/plain": "100%|██████████| 3/3"}),
        nbformat.v4.new_output("stream", name="stdout", text="done\n"),
    ])
    plain = nbformat.v4.new_code_cell("1 + 1", execution_count=4, outputs=[
        nbformat.v4.new_output("execute_result", execution_count=4, data={"text/plain": "2"}),
    ])
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), explorer, old_widget, progress, plain]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                           "version_minor": 0}}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.validate(nb)
    return nb


def test_strip_notebook_keeps_previews_and_drops_dead_widgets():
    nb = _notebook()
    assert strip_notebook(nb) == 4
    nbformat.validate(nb)
    _, explorer, old_widget, progress, plain = nb.cells
    assert [o["data"] for o in explorer.outputs] == [{"text/html": "<div>preview</div>", "text/plain": "[preview]"}]
    assert old_widget.outputs == []  # only the VBox repr was left: dropped
    assert progress.outputs[0]["data"] == {"text/plain": "100%|██████████| 3/3"}  # a readable text stays
    assert progress.outputs[1]["text"] == "done\n"
    assert plain.outputs[0]["data"] == {"text/plain": "2"}
    assert "widgets" not in nb.metadata and nb.metadata["kernelspec"]["name"] == "python3"
    assert WIDGET_MIME not in json.dumps(nb)
    again = copy.deepcopy(nb)
    assert strip_notebook(again) == 0 and again == nb  # idempotent


def test_strip_file_and_cli(tmp_path, capsys):
    path = tmp_path / "nb.ipynb"
    nbformat.write(_notebook(), path)
    before = path.read_bytes()
    assert strip_main(["--check", str(path)]) == 1
    assert path.read_bytes() == before  # --check changes nothing
    assert strip_main([str(path)]) == 0
    assert "stripped 4" in capsys.readouterr().out
    stripped = path.read_bytes()
    assert WIDGET_MIME.encode() not in stripped and b'"widgets"' not in stripped
    assert strip_file(path) == 0 and path.read_bytes() == stripped  # untouched when clean
    assert strip_main(["--check", str(path)]) == 0
    assert not list(tmp_path.glob("*.tmp"))

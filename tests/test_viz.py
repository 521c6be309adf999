"""The shared figures draw what they are given and refuse what they cannot draw."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from llmlab import viz
from llmlab.tokenizer import WordVocab
from llmlab.widgets import token_explorer, tokens_html


def test_pipeline_diagram_has_every_stage():
    fig = viz.pipeline_diagram(highlight="attention")
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {name for name, _ in viz.PIPELINE} <= texts
    with pytest.raises(ValueError, match="unknown stage"):
        viz.pipeline_diagram(highlight="magic")
    plt.close("all")


def test_heatmap_marks_minus_infinity():
    scores = torch.tensor([[1.0, float("-inf")], [0.5, 0.25]])
    ax = viz.heatmap(scores, ["a", "b"], ["a", "b"])
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["1.00", "−∞", "0.50", "0.25"]
    with pytest.raises(ValueError, match="2-D"):
        viz.heatmap(torch.zeros(2, 2, 2))
    plt.close("all")


def test_scatter_and_bars_validate():
    ax = viz.scatter_2d(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), ["man", "woman"], arrows=[(0, 1)])
    assert {t.get_text() for t in ax.texts} >= {"man", "woman"}
    with pytest.raises(ValueError, match="labels"):
        viz.scatter_2d(torch.zeros(2, 2), ["one"])
    ax = viz.bar_breakdown({"gpt2": {"embedding": 38.6, "blocks": 85.0}, "tiny": {"embedding": 0.3}})
    assert len(ax.patches) == 4
    plt.close("all")


def test_token_strip_checks_lengths():
    with pytest.raises(ValueError, match="one id per piece"):
        viz.token_strip(["a", "b"], [1])
    ax = viz.token_strip(["The", " sky"], [464, 6766])
    assert {"The", "␣sky", "464", "6766"} <= {t.get_text() for t in ax.texts}
    plt.close("all")


class _Chars:
    """A stand-in tokenizer: one token per character."""

    def encode(self, text, **kwargs):
        return [ord(c) for c in text]

    def token_texts(self, ids):
        return [chr(i) for i in ids]


def test_tokens_html_escapes_and_counts():
    html = tokens_html(_Chars(), "a<b")
    assert "&lt;" in html and "<b" not in html.replace("<b>", "")
    assert "3 tokens · 3 characters · 3 bytes" in html


def test_token_explorer_redraws():
    widget = token_explorer({"chars": _Chars(), "words": _Chars()}, text="hi")
    box, first, _ = widget.children
    assert "2 tokens" in first.value
    box.value = "hello"
    assert "5 tokens" in first.value


def test_word_vocab_is_exported_from_tokenizer():
    assert WordVocab.PAD_ID == 0 and WordVocab.UNK_ID == 1

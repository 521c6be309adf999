"""The sampling explorer (notebook 08) redraws what its sliders say, using llmlab.sampling's own functions."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ipywidgets")

from llmlab import Transformer, get_config
from llmlab.generate import generate_ids
from llmlab.sampling import SamplingParams, next_token_probs
from llmlab.tokenizer import BPETokenizer
from llmlab.widgets import sampling_bars_html, sampling_explorer


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train("to be or not to be, that is the question " * 20, 280)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = get_config("course-tiny").replace(vocab_size=tok.vocab_size, context_length=16, d_model=32, n_layers=1, n_heads=2)
    return Transformer(cfg).eval()


@pytest.fixture
def panel(model, tok):
    return sampling_explorer(model, tok, prompt="to be or", top_n=8, max_new_tokens=6, seed=0)


def test_initial_state_is_the_plain_softmax(panel, model, tok):
    state = panel.state
    assert state["error"] is None
    ids = tok.encode("to be or")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(state["probs"], torch.softmax(logits, -1), atol=1e-6)
    assert state["kept"] == model.config.vocab_size
    assert len(state["top_ids"]) == 8
    assert "tokens can be drawn" in panel.bars.value and "<table" in panel.bars.value
    assert 1 <= len(state["continuation_ids"]) <= 6


def test_sliders_change_what_is_shown(panel, model):
    before = panel.bars.value
    panel.controls["top_k"].value = 3
    assert panel.state["kept"] == 3 and panel.state["params"].top_k == 3
    assert panel.bars.value != before
    panel.controls["top_k"].value = 0
    panel.controls["top_p"].value = 0.05
    assert panel.state["params"].top_p == 0.05 and panel.state["kept"] < model.config.vocab_size
    panel.controls["top_p"].value = 1.0
    assert panel.state["params"].top_p is None and panel.state["kept"] == model.config.vocab_size
    panel.controls["temperature"].value = 0.5
    sharper = panel.state["probs"].max().item()
    panel.controls["temperature"].value = 2.0
    assert panel.state["probs"].max().item() < sharper  # hotter = flatter


def test_probs_are_the_packages(panel, model):
    panel.controls["temperature"].value = 0.7
    panel.controls["top_k"].value = 5
    params = panel.state["params"]
    expected = next_token_probs(panel.state["logits"], params)
    assert torch.equal(panel.state["probs"], expected)


def test_greedy_continuation_equals_generate_ids(panel, model):
    panel.controls["temperature"].value = 0.0
    assert panel.state["params"].greedy and panel.state["kept"] == 1
    ids = panel.state["prompt_ids"]
    expected = list(generate_ids(model, ids, SamplingParams(temperature=0, max_new_tokens=6)))
    assert panel.state["continuation_ids"] == expected[: len(panel.state["continuation_ids"])]
    assert "greedy" in panel.bars.value


def test_resample_moves_the_seed_and_seeds_reproduce(panel):
    panel.controls["temperature"].value = 1.5
    first = panel.state["continuation_ids"]
    panel.controls["resample"].click()
    assert panel.controls["seed"].value == 1 and panel.state["params"].seed == 1
    panel.controls["seed"].value = 0
    assert panel.state["continuation_ids"] == first


def test_prompt_box_and_bad_prompts(panel, model):
    panel.controls["prompt"].value = "the question"
    assert panel.state["prompt_ids"] is not None and "question" in panel.continuation.value
    panel.controls["prompt"].value = ""
    assert "empty" in panel.state["error"] and "⚠" in panel.bars.value and panel.continuation.value == ""
    panel.controls["prompt"].value = "to be " * 20  # longer than the context of 16
    assert "context" in panel.state["error"]
    panel.controls["prompt"].value = "to be"
    assert panel.state["error"] is None and panel.state["probs"] is not None


def test_bars_html_marks_removed_tokens():
    out = sampling_bars_html(["a", "<b>"], [0.6, 0.4], [1.0, 0.0], title="t")
    assert "<s " in out and "&lt;b&gt;" in out and "100.0%" in out

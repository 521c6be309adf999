"""The notebook helpers' guards: unanswered exercises, coding checks, tagged listings, readable figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from llmlab import notebook, runtime
from llmlab.layers.norm import RMSNorm
from llmlab.notebook import (
    FigureTextTooSmall,
    check,
    check_function,
    resolve_address,
    save_figure,
    show,
    small_texts,
    source_address,
)


def test_unanswered_exercise_says_so_and_does_not_fail(capsys):
    check("1.1", ..., 42)
    out = capsys.readouterr().out
    assert notebook.NOT_ANSWERED in out and "42" not in out


def test_wrong_answer_raises_without_revealing_the_expected_value():
    with pytest.raises(AssertionError) as err:
        check("1.1", 41, 42, hint="count the heads")
    assert "41" in str(err.value) and "42" not in str(err.value) and "count the heads" in str(err.value)


def test_check_tolerances_and_kinds(capsys):
    check("rel", 100.5, 100.0, tol=0.01)
    check("abs", 1e-7, 0.0, atol=1e-6)
    check("tensor", torch.tensor([1.0, 2.0]) + 1e-7, torch.tensor([1.0, 2.0]), atol=1e-6)
    check("list", [1, 2.0000001], [1, 2.0], tol=1e-6)
    with pytest.raises(AssertionError):
        check("shape", torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(AssertionError):
        check("nan", float("nan"), 1.0, tol=0.5)
    with pytest.raises(AssertionError):
        check("bool is not a number", True, 1)
    assert capsys.readouterr().out.count("✓") == 4


def _rms_reference(x, w):
    norm = RMSNorm(x.shape[-1])
    norm.weight.data = w
    return norm(x).detach()


def _cases():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, 8, generator=g), torch.randn(8, generator=g)) for _ in range(3)]


def test_check_function(capsys):
    def stub(x, w):
        """not written yet"""
        ...

    check_function("stub", stub, _rms_reference, _cases())
    assert notebook.NOT_ANSWERED in capsys.readouterr().out

    def right(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    check_function("right", right, _rms_reference, _cases())
    assert "✓ right (3 cases)" in capsys.readouterr().out

    def forgot_eps_and_weight(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))

    with pytest.raises(AssertionError, match="case 1 of 3 differs"):
        check_function("wrong", forgot_eps_and_weight, _rms_reference, _cases())
    with pytest.raises(ValueError, match="at least one case"):
        check_function("none", right, _rms_reference, [])


def test_show_tags_its_listing_with_an_address_that_resolves():
    listing = show(runtime.pick)
    data, metadata = listing._repr_mimebundle_()
    assert data["text/plain"].startswith("def pick")
    assert metadata == {"llmlab": {"source_of": "llmlab.runtime:pick"}}
    assert resolve_address(source_address(RMSNorm.forward)) is RMSNorm.forward
    assert resolve_address(source_address(runtime)) is runtime
    with pytest.raises(TypeError, match="cannot show"):
        show(42)


def test_small_text_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(notebook.FIGURES_ENV, str(tmp_path))
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([0, 1], [0, 1])
    ax.set_title("big enough", fontsize=12)
    ax.tick_params(labelsize=10)
    save_figure(fig, "fine")
    assert (tmp_path / "fine.png").read_bytes()[:4] == b"\x89PNG"

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.set_title("too small", fontsize=6)
    with pytest.raises(FigureTextTooSmall, match="'too small'"):
        save_figure(fig, "tiny")
    assert not (tmp_path / "tiny.png").exists()
    plt.close("all")


def test_wide_figures_need_bigger_text():
    fig, ax = plt.subplots(figsize=(16, 3))
    ax.set_title("ten points", fontsize=10)
    # 16 in x 110 dpi = 1,760 px, shown at 1,000 px: 10 pt -> 15.3 px x 0.57 = 8.7 px < 12.
    assert ("ten points", pytest.approx(10 * 110 / 72 * 1000 / 1760, rel=0.05)) in [
        (label, px) for label, px in small_texts(fig, 110, 1760)]
    plt.close(fig)

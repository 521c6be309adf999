"""Device choice, seeding, fast mode, and the notebook helpers (show, save_figure, check)."""

from __future__ import annotations

import pytest
import torch

import llmlab
from llmlab import runtime
from llmlab.notebook import check, figures_dir, save_figure, show, source


@pytest.mark.parametrize(
    ("fast", "ci", "expected"),
    [("1", None, True), ("0", "true", False), (None, "true", True), (None, None, False), ("yes", None, True)],
)
def test_fast_mode(monkeypatch, fast, ci, expected):
    for name, value in (("LLMLAB_FAST", fast), ("CI", ci)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert runtime.fast_mode() is expected
    assert runtime.pick(100, 5) == (5 if expected else 100)


def test_fast_mode_rejects_nonsense(monkeypatch):
    monkeypatch.setenv("LLMLAB_FAST", "maybe")
    with pytest.raises(ValueError, match="LLMLAB_FAST"):
        runtime.fast_mode()


def test_device(monkeypatch):
    monkeypatch.delenv("LLMLAB_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.device().type == expected
    assert runtime.device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            runtime.device("cuda")


def test_seed_everything_reproduces():
    g = llmlab.seed_everything(7)
    a = torch.randn(3), torch.randn(2, generator=g)
    g = llmlab.seed_everything(7)
    b = torch.randn(3), torch.randn(2, generator=g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_environment_report_names_the_basics():
    report = llmlab.environment_report()
    assert {"python", "torch", "device", "fast mode", "triton"} <= set(report)


def test_show_returns_the_source():
    assert "def pick" in source(runtime.pick)
    shown = show(runtime.pick)
    assert "def pick" in getattr(shown, "data", shown)
    with pytest.raises(TypeError, match="cannot show"):
        show(42)


def test_save_figure_writes_png(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setenv("LLMLAB_FIGURES_DIR", str(tmp_path))
    assert figures_dir() == tmp_path
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, "demo")
    first = (tmp_path / "demo.png").read_bytes()
    assert first.startswith(b"\x89PNG")
    save_figure(fig, "demo")
    assert (tmp_path / "demo.png").read_bytes() == first  # no timestamps: same picture, same bytes
    with pytest.raises(ValueError, match="plain file name"):
        save_figure(fig, "../escape")
    plt.close(fig)


def test_figures_dir_finds_the_course_root(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMLAB_FIGURES_DIR", raising=False)
    (tmp_path / "course").mkdir()
    (tmp_path / "figures").mkdir()
    monkeypatch.chdir(tmp_path / "course")
    assert figures_dir() == tmp_path / "figures"


def test_check(capsys):
    check("sum", 2 + 2, 4)
    assert "✓ sum" in capsys.readouterr().out
    check("close", 1.0 + 1e-12, 1.0, tol=1e-9)
    assert "✓ close" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="close"):
        check("close", 1.0 + 1e-6, 1.0, tol=1e-9)  # the tolerance is a real bound
    with pytest.raises(AssertionError, match="got 5, expected something else. Hint: count again"):
        check("sum", 5, 4, hint="count again")

"""Training: the schedule, a decreasing loss, determinism, and exact resumption."""

from __future__ import annotations

import pytest
import torch

from llmlab import Transformer, get_config
from llmlab.checkpoint import CheckpointError
from llmlab.tokenizer import BPETokenizer
from llmlab.train import Trainer, TrainConfig, TrainingError, lr_at

TEXT_SLICE = 60_000


@pytest.fixture(scope="module")
def data(shakespeare):
    text = shakespeare[:TEXT_SLICE]
    tok = BPETokenizer.train(text, 300)
    return tok, torch.tensor(tok.encode(text))


def tiny_model(seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    cfg = get_config("course-tiny").replace(vocab_size=300, context_length=32, d_model=48, n_layers=2, n_heads=2)
    return Transformer(cfg.replace(**changes) if changes else cfg)


def trainer(data, steps: int, **kw) -> Trainer:
    tok, ids = data
    cfg = TrainConfig(steps=steps, batch_size=8, warmup_steps=3, eval_every=1000, eval_batches=2, lr=3e-3, **kw)
    return Trainer(tiny_model(), tok, ids, cfg)


def test_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_loss_decreases(data):
    t = trainer(data, 60)
    before = t.evaluate("val")
    t.fit(progress=False)
    after = t.evaluate("val")
    assert after < before - 0.5, (before, after)
    assert t.history.eval_step == [60] and len(t.history.train_loss) == 60
    assert t.per_char(after) == pytest.approx(after / t.chars_per_token)
    assert 1.2 < t.chars_per_token < 2  # 300 ids: a little over one character per token


def test_seeded_runs_are_identical(data):
    a, b = trainer(data, 8), trainer(data, 8)
    a.fit(progress=False)
    b.fit(progress=False)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_resume_continues_identically(data, tmp_path):
    straight = trainer(data, 10)
    straight.fit(progress=False)

    first = trainer(data, 10)
    for _ in range(5):
        first.train_step()
    first.save(tmp_path / "ck")

    second = trainer(data, 10)
    second.resume(tmp_path / "ck")
    assert second.step == 5
    second.fit(progress=False)
    for (name, x), y in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(x, y), name
    assert second.history.train_loss == straight.history.train_loss


def test_resume_refuses_a_different_model(data, tmp_path):
    t = trainer(data, 2)
    t.fit(progress=False)
    t.save(tmp_path / "ck")
    tok, ids = data
    other = Trainer(tiny_model(d_model=64), tok, ids, t.cfg)
    with pytest.raises(CheckpointError, match=r"d_model \(checkpoint 48, here 64\)"):
        other.resume(tmp_path / "ck")


def test_wall_clock_budget_stops_early(data):
    t = trainer(data, 10_000, max_minutes=0.02)
    t.fit(progress=False)
    assert 0 < t.step < 10_000
    assert t.history.eval_step[-1] == t.step


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"steps": 0}, "steps must be ≥ 1"), ({"lr": 1e-3, "min_lr": 1e-2}, "min_lr ≤ lr"), ({"max_minutes": 0}, "max_minutes"),
     ({"lr": float("nan")}, "lr must be a finite number"), ({"max_minutes": float("inf")}, "max_minutes must be a finite")],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(TrainingError, match=message):
        TrainConfig(**kwargs)


def test_block_size_and_tiny_data(data):
    tok, ids = data
    with pytest.raises(TrainingError, match="exceeds the model's context_length"):
        Trainer(tiny_model(), tok, ids, TrainConfig(block_size=64))
    with pytest.raises(TrainingError, match="validation split has"):
        Trainer(tiny_model(), tok, ids[:200], TrainConfig())


def test_periodic_checkpoints_are_resumable(data, tmp_path):
    from llmlab.checkpoint import load_checkpoint

    for steps in (6, 8):  # 8: the last periodic save is the final state, so it is not written twice
        folder = tmp_path / f"ck{steps}"
        t = trainer(data, steps, checkpoint_dir=str(folder), checkpoint_every=4)
        t.fit(progress=False)
        assert load_checkpoint(folder, load_trainer_state=True).trainer_state["step"] == steps
        again = trainer(data, steps)
        again.resume(folder)
        assert again.step == steps
        assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), again.model.state_dict().values()))


def _last_line(text: str) -> str:
    """What a terminal or a notebook shows of a progress stream: the text after the last carriage return."""
    return [part for part in text.replace("\n", "\r").split("\r") if part.strip()][-1]


@pytest.mark.parametrize("in_notebook", [False, True])
def test_progress_ends_on_the_last_step(data, capsys, monkeypatch, in_notebook):
    import llmlab.train

    monkeypatch.setattr(llmlab.train, "_in_jupyter", lambda: in_notebook)
    t = trainer(data, 5)
    t.fit(progress=True)
    captured = capsys.readouterr()
    shown, other = (captured.out, captured.err) if in_notebook else (captured.err, captured.out)
    assert other == ""  # a notebook gets stdout (a plain stream, no widget); a terminal stderr
    final = _last_line(shown)
    assert "5/5" in final and "100%" in final, final
    assert "loss=" in final


def test_progress_false_is_quiet(data, capsys):
    trainer(data, 3).fit(progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""

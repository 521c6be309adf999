"""Bad input to checkpoints, training and `llmlab train|info`: a clear LlmlabError, and nothing a user made is lost.

Table-driven (issue 10): one row per bad input, for the API (the exact error type and a
fragment of the message) and for the command line (exit status, exactly one
``llmlab <cmd>: error:`` line on stderr, no traceback).  The nothing-lost rows check the
user's files byte for byte; Ctrl-C is simulated inside the training loop; hypothesis feeds
arbitrary values to save/load_checkpoint and TrainConfig.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmlab import Transformer, get_config
from llmlab.__main__ import main
from llmlab.checkpoint import (
    TOKENIZER_HASH,
    CheckpointError,
    CheckpointWriteError,
    builtin_checkpoint,
    check_output_dir,
    load_checkpoint,
    save_checkpoint,
    tokenizer_sha256,
    verify_checkpoint,
)
from llmlab.errors import LlmlabError
from llmlab.recipe import train_course_model
from llmlab.runtime import DeviceError
from llmlab.tokenizer import BPETokenizer
from llmlab.train import Trainer, TrainConfig, TrainingError, TrainingInterrupted

VOCAB = 280
TEXT = "the quick brown fox jumps over the lazy dog " * 30


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(TEXT, VOCAB)


def small_model(vocab: int = VOCAB) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_config("course-tiny").replace(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2,
                                                         context_length=32))


@pytest.fixture(scope="module")
def model() -> Transformer:
    return small_model()


@pytest.fixture(scope="module")
def good(tmp_path_factory, model, tok) -> Path:
    """A valid checkpoint folder (copy it before damaging it)."""
    return save_checkpoint(tmp_path_factory.mktemp("good") / "ck", model, tok, trainer_state={"step": 1})


@pytest.fixture
def ck(tmp_path, good) -> Path:
    """A fresh copy of the valid checkpoint, to damage."""
    return Path(shutil.copytree(good, tmp_path / "ck"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare) -> Path:
    """A tiny corpus: `llmlab train --corpus` on it takes a second or two (BPE of 280 ids, 2-4 steps)."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(shakespeare[:8_000], encoding="utf-8")
    return path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders): to check nothing was touched."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


def assert_one_error_line(stderr: str, command: str, fragment: str) -> None:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"llmlab {command}: error:"), stderr
    assert fragment in lines[0], stderr


# -- the API: checkpoints ------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _other_tokenizer(ck: Path) -> None:  # the same number of ids, other merges
    BPETokenizer.train("pack my box with five dozen liquor jugs " * 30, VOCAB).save(ck / "tokenizer.json")


def _smaller_tokenizer(ck: Path) -> None:
    BPETokenizer.train(TEXT, VOCAB - 10).save(ck / "tokenizer.json")


def _config_field(ck: Path, key: str, value) -> None:
    info = json.loads((ck / "config.json").read_text())
    info[key] = value
    (ck / "config.json").write_text(json.dumps(info))


def _other_shapes(ck: Path) -> None:
    info = json.loads((ck / "config.json").read_text())
    info["model"]["d_ff"] = 64  # a valid config, but not the one the weights were made with
    (ck / "config.json").write_text(json.dumps(info))


LOAD_CASES = [
    # (id, damage(ck), load kwargs, error type, message fragment)
    ("0-byte weights", lambda ck: _write(ck / "model.safetensors", b""), {}, CheckpointError, "corrupt or truncated"),
    ("truncated weights", lambda ck: _write(ck / "model.safetensors", (ck / "model.safetensors").read_bytes()[:999]),
     {}, CheckpointError, "corrupt or truncated"),
    ("weights of other shapes", _other_shapes, {}, CheckpointError, "do not match its config.json"),
    ("other tokenizer, same size", _other_tokenizer, {}, CheckpointError, "not the tokenizer these weights were trained"),
    ("tokenizer with fewer ids", _smaller_tokenizer, {}, CheckpointError, "the tokenizer has 270 ids"),
    ("hash not a string", lambda ck: _config_field(ck, TOKENIZER_HASH, 5), {}, CheckpointError, "config.json is corrupt"),
    ("config a list", lambda ck: _write(ck / "config.json", b"[1, 2]"), {}, CheckpointError,
     "not an llmlab checkpoint config"),
    ("config not utf-8", lambda ck: _write(ck / "config.json", b"\xff\xfe{"), {}, CheckpointError, "config.json is corrupt"),
    ("meta not a dict", lambda ck: _config_field(ck, "meta", [1]), {}, CheckpointError, "meta is not a JSON object"),
    ("model not a dict", lambda ck: _config_field(ck, "model", "gpt"), {}, CheckpointError, "config.json is corrupt"),
    ("corrupt trainer state", lambda ck: _write(ck / "trainer_state.pt", b"junk"), {"load_trainer_state": True},
     CheckpointError, "cannot be resumed"),
    ("unknown device (file is fine)", lambda ck: None, {"device": "foo"}, DeviceError, "not a device torch knows"),
    ("device of a wrong type", lambda ck: None, {"device": 3}, CheckpointError, "device must be"),
    ("empty device", lambda ck: None, {"device": ""}, CheckpointError, "device must be"),
    ("absent GPU", lambda ck: None, {"device": "cuda:7"}, DeviceError, "cuda:7"),
    ("load_trainer_state not a bool", lambda ck: None, {"load_trainer_state": "yes"}, CheckpointError,
     "load_trainer_state must be True or False"),
]


@pytest.mark.parametrize(("damage", "kwargs", "error", "fragment"), [c[1:] for c in LOAD_CASES],
                         ids=[c[0] for c in LOAD_CASES])
def test_load_bad_checkpoint(ck, damage, kwargs, error, fragment):
    damage(ck)
    with pytest.raises(error, match=None) as info:
        load_checkpoint(ck, **kwargs)
    assert type(info.value) is error and fragment in str(info.value), str(info.value)
    if "device" in kwargs:
        assert "corrupt" not in str(info.value)  # a good file is never blamed for a bad device


@pytest.mark.parametrize(("damage", "fragment"), [(c[1], c[4]) for c in LOAD_CASES[:10]], ids=[c[0] for c in LOAD_CASES[:10]])
def test_verify_checks_what_load_checks(ck, damage, fragment):
    damage(ck)
    with pytest.raises(CheckpointError, match=fragment.replace("(", r"\(")):
        verify_checkpoint(ck)


@pytest.mark.parametrize(
    ("where", "fragment"),
    [(5, "must be a path"), (b"ck", "must be a path"), ("", "is empty"), ("a\0b", "NUL byte"), (" ", "is empty"),
     ("missing", "no checkpoint folder"), ("afile", "is a file, not a checkpoint folder")],
)
def test_load_bad_path(tmp_path, where, fragment):
    (tmp_path / "afile").write_text("mine")
    directory = tmp_path / where if where in ("missing", "afile") else where
    with pytest.raises(CheckpointError, match=fragment):
        load_checkpoint(directory)


def test_checkpoint_without_a_hash_still_loads(ck):
    info = json.loads((ck / "config.json").read_text())
    del info[TOKENIZER_HASH]
    (ck / "config.json").write_text(json.dumps(info))
    assert load_checkpoint(ck).config.vocab_size == VOCAB


def test_builtin_model_is_bound_to_its_tokenizer():
    info = json.loads((builtin_checkpoint() / "config.json").read_text())
    ckpt = load_checkpoint()
    assert info[TOKENIZER_HASH] == tokenizer_sha256(ckpt.tokenizer)
    assert ckpt.tokenizer.vocab_size == ckpt.config.vocab_size == 1024


SAVE_CASES = [
    # (id, kwargs overriding (model, tokenizer, meta, trainer_state), fragment)
    ("model a string", {"model": "gpt2"}, "model must be an llmlab Transformer"),
    ("tokenizer None", {"tokenizer": None}, "tokenizer must be a BPETokenizer"),
    ("tokenizer of another size", {"tokenizer": BPETokenizer.train(TEXT, VOCAB - 10)}, "the tokenizer has 270 ids"),
    ("meta a list", {"meta": [1]}, "meta must be a dict"),
    ("meta not JSON", {"meta": {"f": object()}}, "JSON values"),
    ("trainer_state a list", {"trainer_state": [1]}, "trainer_state must be a dict"),
]


@pytest.mark.parametrize(("kwargs", "fragment"), [c[1:] for c in SAVE_CASES], ids=[c[0] for c in SAVE_CASES])
def test_save_bad_arguments(tmp_path, model, tok, kwargs, fragment):
    args = {"model": model, "tokenizer": tok, **kwargs}
    with pytest.raises(CheckpointError, match=fragment):
        save_checkpoint(tmp_path / "out", args.pop("model"), args.pop("tokenizer"), **args)
    assert list(tmp_path.iterdir()) == []  # nothing written


# -- nothing lost ---------------------------------------------------------------------------------------


def _user_file(tmp: Path) -> tuple[Path, Path]:
    (tmp / "afile").write_text("my notes\n")
    return tmp / "afile", tmp / "afile"


def _under_a_file(tmp: Path) -> tuple[Path, Path]:
    (tmp / "afile").write_text("my notes\n")
    return tmp / "afile" / "sub", tmp / "afile"


def _foreign_folder(tmp: Path) -> tuple[Path, Path]:
    (tmp / "work").mkdir()
    (tmp / "work" / "thesis.txt").write_text("chapter 1\n")
    (tmp / "work" / "config.json").write_text('{"format": "llmlab-checkpoint"}')  # looks ours, but thesis.txt
    return tmp / "work", tmp / "work"


def _hugging_face_folder(tmp: Path) -> tuple[Path, Path]:
    (tmp / "hf").mkdir()
    for name, text in (("config.json", '{"model_type": "gpt2"}'), ("tokenizer.json", "{}"), ("model.safetensors", "x")):
        (tmp / "hf" / name).write_text(text)
    return tmp / "hf", tmp / "hf"


NOTHING_LOST = [
    ("output is a regular file", _user_file, "exists and is not a folder"),
    ("output under a regular file", _under_a_file, "is a file, so the checkpoint folder"),
    ("output holds other files", _foreign_folder, "not an llmlab checkpoint (thesis.txt)"),
    ("output is another library's model", _hugging_face_folder, "not an llmlab checkpoint (config.json)"),
]


@pytest.mark.parametrize(("make", "fragment"), [c[1:] for c in NOTHING_LOST], ids=[c[0] for c in NOTHING_LOST])
def test_save_never_replaces_what_is_not_ours(tmp_path, model, tok, make, fragment):
    out, mine = make(tmp_path)
    before, names = snapshot(mine), sorted(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        save_checkpoint(out, model, tok)
    with pytest.raises(CheckpointError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        check_output_dir(out)
    assert snapshot(mine) == before and sorted(os.listdir(tmp_path)) == names  # byte for byte, no .old-PID left


@pytest.mark.parametrize(("make", "fragment"), [c[1:] for c in NOTHING_LOST], ids=[c[0] for c in NOTHING_LOST])
def test_trainer_checks_its_output_before_the_first_step(tmp_path, tok, make, fragment):
    out, mine = make(tmp_path)
    before = snapshot(mine)
    ids = torch.tensor(tok.encode(TEXT * 4))
    with pytest.raises(CheckpointError, match=fragment.split(" (")[0]):
        Trainer(small_model(), tok, ids, TrainConfig(steps=2, batch_size=2, checkpoint_dir=str(out)))
    assert snapshot(mine) == before


def test_overwriting_our_checkpoint_leaves_no_old_copy(tmp_path, model, tok):
    save_checkpoint(tmp_path / "ck", model, tok, meta={"v": 1})
    save_checkpoint(tmp_path / "ck", model, tok, meta={"v": 2})
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert load_checkpoint(tmp_path / "ck").meta == {"v": 2}


def test_a_failed_write_is_a_checkpoint_error_and_keeps_the_old(tmp_path, model, tok, monkeypatch):
    save_checkpoint(tmp_path / "ck", model, tok, meta={"v": 1})
    before = snapshot(tmp_path / "ck")
    monkeypatch.setattr(BPETokenizer, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(CheckpointWriteError, match="unchanged"):
        save_checkpoint(tmp_path / "ck", model, tok, meta={"v": 2})
    assert snapshot(tmp_path / "ck") == before and sorted(os.listdir(tmp_path)) == ["ck"]


# -- the API: training -----------------------------------------------------------------------------------------


CONFIG_CASES = [
    ({"steps": 0}, "steps must be ≥ 1"), ({"steps": -5}, "steps must be ≥ 1"), ({"steps": 1.5}, "steps must be an integer"),
    ({"steps": "10"}, "steps must be an integer"), ({"steps": True}, "steps must be an integer"),
    ({"steps": None}, "steps must be an integer"), ({"batch_size": 0}, "batch_size must be ≥ 1"),
    ({"batch_size": 2**40}, "batch_size must be ≤"), ({"lr": math.nan}, "lr must be a finite number"),
    ({"lr": math.inf}, "lr must be a finite number"), ({"lr": -math.inf}, "lr must be a finite number"),
    ({"lr": 0}, "lr must be > 0"), ({"lr": -1e-3}, "lr must be > 0"), ({"lr": "0.1"}, "lr must be a number"),
    ({"min_lr": math.nan}, "min_lr must be a finite"), ({"lr": 1e-3, "min_lr": 1e-2}, "min_lr ≤ lr"),
    ({"min_lr": -1e-4}, "min_lr ≤ lr"), ({"warmup_steps": -1}, "warmup_steps must be ≥ 0"),
    ({"weight_decay": -0.1}, "weight_decay must be ≥ 0"), ({"weight_decay": math.nan}, "weight_decay must be a finite"),
    ({"betas": (1.0, 0.9)}, "betas must be in [0, 1)"), ({"betas": (0.9,)}, "betas must be two numbers"),
    ({"betas": "ab"}, "betas must be two numbers"), ({"betas": (math.nan, 0.9)}, "betas[0] must be a finite"),
    ({"grad_clip": -1}, "grad_clip must be ≥ 0"), ({"grad_clip": math.inf}, "grad_clip must be a finite"),
    ({"eval_every": 0}, "eval_every must be ≥ 1"), ({"eval_batches": 0}, "eval_batches must be ≥ 1"),
    ({"val_fraction": 0}, "val_fraction must be between 0 and 1"), ({"val_fraction": 1}, "val_fraction must be between"),
    ({"val_fraction": math.nan}, "val_fraction must be a finite"), ({"seed": -1}, "seed must be ≥ 0"),
    ({"seed": 2**40}, "seed must be ≤"), ({"max_minutes": 0}, "max_minutes must be > 0"),
    ({"max_minutes": math.nan}, "max_minutes must be a finite"), ({"max_minutes": math.inf}, "max_minutes must be a finite"),
    ({"checkpoint_dir": ""}, "checkpoint_dir must be a folder path"), ({"checkpoint_dir": 5}, "checkpoint_dir must be"),
    ({"checkpoint_every": 0}, "checkpoint_every must be ≥ 1"), ({"block_size": 0}, "block_size must be ≥ 1"),
]


@pytest.mark.parametrize(("kwargs", "fragment"), CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_train_config_refuses(kwargs, fragment):
    with pytest.raises(TrainingError) as info:
        TrainConfig(**kwargs)
    assert fragment in str(info.value), str(info.value)


def _trainer_args(tok, **changes):
    args = {"model": small_model(), "tokenizer": tok, "ids": torch.tensor(tok.encode(TEXT * 4)),
            "cfg": TrainConfig(steps=2, batch_size=2)}
    return {**args, **changes}


TRAINER_CASES = [
    ("model a string", lambda tok: {"model": "gpt2"}, "model must be an llmlab Transformer"),
    ("tokenizer a dict", lambda tok: {"tokenizer": {}}, "tokenizer must be a BPETokenizer"),
    ("tokenizer of another size", lambda tok: {"model": small_model(512)}, "build the model with vocab_size=280"),
    ("ids a list", lambda tok: {"ids": [1, 2, 3]}, "ids must be a 1-D integer tensor"),
    ("ids floats", lambda tok: {"ids": torch.rand(500)}, "ids must be a 1-D integer tensor"),
    ("ids 2-D", lambda tok: {"ids": torch.zeros(2, 500, dtype=torch.long)}, "ids must be a 1-D integer tensor"),
    ("ids out of the vocabulary", lambda tok: {"ids": torch.arange(600)}, "ids must lie in 0 … 279"),
    ("ids negative", lambda tok: {"ids": torch.full((600,), -1)}, "ids must lie in"),
    ("cfg a dict", lambda tok: {"cfg": {"steps": 2}}, "cfg must be a TrainConfig"),
    ("too little text", lambda tok: {"ids": torch.tensor(tok.encode(TEXT))[:50]}, "split has"),
    ("block larger than the context", lambda tok: {"cfg": TrainConfig(block_size=64)}, "exceeds the model's context"),
]


@pytest.mark.parametrize(("changes", "fragment"), [c[1:] for c in TRAINER_CASES], ids=[c[0] for c in TRAINER_CASES])
def test_trainer_refuses(tok, changes, fragment):
    args = _trainer_args(tok, **changes(tok))
    with pytest.raises(TrainingError, match=fragment):
        Trainer(args["model"], args["tokenizer"], args["ids"], args["cfg"])


def test_a_diverging_run_stops_and_saves_no_nan(tmp_path, tok):
    args = _trainer_args(tok, cfg=TrainConfig(steps=20, batch_size=2, lr=1e30, min_lr=0, warmup_steps=0,
                                              grad_clip=0, checkpoint_dir=str(tmp_path / "run")))
    trainer = Trainer(**args)
    with pytest.raises(TrainingError, match="training diverged"):
        trainer.fit(progress=False)
    assert not (tmp_path / "run").exists()


def test_out_of_memory_says_what_to_do(tok, monkeypatch):
    trainer = Trainer(**_trainer_args(tok))
    monkeypatch.setattr(trainer, "train_step", lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(TrainingError, match="use a smaller batch_size"):
        trainer.fit(progress=False)


RECIPE_CASES = [
    ({"lr": math.nan}, TrainingError, "--lr must be a finite number"), ({"lr": 0.0}, TrainingError, "--lr must be > 0"),
    ({"minutes": math.inf}, TrainingError, "--minutes must be a finite"), ({"minutes": -1.0}, TrainingError, "--minutes must be > 0"),
    ({"steps": 0}, TrainingError, "--steps must be ≥ 1"), ({"steps": 2.5}, TrainingError, "--steps must be an integer"),
    ({"batch_size": -2}, TrainingError, "--batch-size must be ≥ 1"), ({"seed": -1}, TrainingError, "--seed must be ≥ 0"),
    ({"vocab_size": 100}, TrainingError, "--vocab-size must be ≥ 257"), ({"vocab_size": 10**9}, TrainingError, "--vocab-size must be ≤"),
    ({"preset": 5}, TrainingError, "--preset must be a preset name"), ({"resume": "yes"}, TrainingError, "resume must be True or False"),
    ({"device_name": "foo"}, DeviceError, "not a device torch knows"), ({"out": None}, CheckpointError, "must be a path"),
    ({"resume": True}, CheckpointError, "--resume needs the checkpoint of an earlier run"),
    ({"vocab_size": 5000}, TrainingError, "Pass --vocab-size"),  # the corpus cannot fill 5000 ids: refused before training
]


@pytest.mark.parametrize(("kwargs", "error", "fragment"), RECIPE_CASES, ids=[str(c[0]) for c in RECIPE_CASES])
def test_recipe_refuses_before_training(tmp_path, corpus, kwargs, error, fragment):
    args = {"out": tmp_path / "run", "steps": 2, "batch_size": 2, "vocab_size": VOCAB, "corpus": corpus,
            "progress": False, **kwargs}
    with pytest.raises(error) as info:
        train_course_model(**args)
    assert fragment in str(info.value), str(info.value)
    assert not (tmp_path / "run").exists()


# -- Ctrl-C -------------------------------------------------------------------------------------------------------------


def _train_args(out: Path, corpus: Path, steps: int = 4) -> list[str]:
    return ["train", "--steps", str(steps), "--out", str(out), "--corpus", str(corpus), "--vocab-size", str(VOCAB),
            "--batch-size", "2"]


def _interrupt_at(monkeypatch, step: int, how) -> None:
    original = Trainer.train_step

    def step_then_maybe_interrupt(self):
        if self.step == step:
            how()
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_maybe_interrupt)


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="Ctrl-C is handled by someone else in this process")
def test_ctrl_c_before_the_first_periodic_save_saves_and_resumes(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 2, lambda: signal.raise_signal(signal.SIGINT))  # a real Ctrl-C during step 3
    assert main(_train_args(out, corpus)) == 130
    err = capsys.readouterr().err
    assert f"interrupted at step 3 of 4; a resumable checkpoint is in {out}" in err and "--resume" in err, err
    assert load_checkpoint(out, load_trainer_state=True).trainer_state["step"] == 3
    monkeypatch.undo()
    assert main([*_train_args(out, corpus), "--resume"]) == 0
    assert load_checkpoint(out, load_trainer_state=True).trainer_state["step"] == 4


def test_ctrl_c_in_the_middle_of_a_step_says_nothing_was_saved(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "run"

    def interrupt():
        raise KeyboardInterrupt

    _interrupt_at(monkeypatch, 1, interrupt)  # lands inside a step: its state is not whole, so it is not saved
    assert main(_train_args(out, corpus)) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 1 of 4; nothing was saved" in err and "Traceback" not in err, err
    assert not out.exists()


def test_ctrl_c_keeps_an_earlier_checkpoint_and_says_so(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(_train_args(out, corpus, steps=2)) == 0
    before = snapshot(out)
    _interrupt_at(monkeypatch, 0, lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(_train_args(out, corpus, steps=3)) == 130
    err = capsys.readouterr().err
    assert "nothing was saved" in err and f"{out} still holds the earlier checkpoint of step 2" in err, err
    assert snapshot(out) == before


def test_trainer_interrupted_between_steps_saves(tmp_path, tok):
    folder = tmp_path / "run"
    trainer = Trainer(**_trainer_args(tok, cfg=TrainConfig(steps=6, batch_size=2, eval_every=2, eval_batches=1,
                                                           checkpoint_dir=str(folder))))

    def stop(t):
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit(callback=stop, progress=False)
    assert isinstance(info.value, KeyboardInterrupt) and info.value.checkpoint == folder
    assert "resumable checkpoint is in" in str(info.value)
    assert load_checkpoint(folder, load_trainer_state=True).trainer_state["step"] == 2


# -- the command line ---------------------------------------------------------------------------------------------------------


def _cli_cases(tmp: Path, corpus: Path) -> list[tuple[str, list[str], int, str]]:
    """(id, argv, exit status, fragment); ``tmp`` holds afile, a foreign folder and damaged checkpoints."""
    out = str(tmp / "run")
    train = ["train", "--corpus", str(corpus), "--vocab-size", str(VOCAB), "--batch-size", "2", "--steps", "2"]
    return [
        ("lr nan", [*train, "--out", out, "--lr", "nan"], 2, "--lr must be a finite number"),
        ("lr inf", [*train, "--out", out, "--lr", "inf"], 2, "--lr must be a finite number"),
        ("lr -inf", [*train, "--out", out, "--lr=-inf"], 2, "--lr must be a finite number"),
        ("lr zero", [*train, "--out", out, "--lr", "0"], 2, "--lr must be > 0"),
        ("minutes nan", ["train", "--minutes", "nan", "--out", out], 2, "--minutes must be a finite number"),
        ("minutes negative", ["train", "--minutes", "-1", "--out", out], 2, "--minutes must be > 0"),
        ("steps zero", ["train", "--steps", "0", "--out", out], 2, "--steps must be ≥ 1"),
        ("steps negative", ["train", "--steps", "-3", "--out", out], 2, "--steps must be ≥ 1"),
        ("steps not a number", ["train", "--steps", "abc", "--out", out], 2, "invalid int value"),
        ("batch size zero", ["train", "--batch-size", "0", "--out", out], 2, "--batch-size must be ≥ 1"),
        ("batch size huge", ["train", "--batch-size", str(10**12), "--out", out], 2, "--batch-size must be ≤"),
        ("seed negative", ["train", "--seed", "-1", "--out", out], 2, "--seed must be ≥ 0"),
        ("seed huge", ["train", "--seed", str(2**64), "--out", out], 2, "--seed must be ≤"),
        ("vocab too small", ["train", "--vocab-size", "10", "--out", out], 2, "--vocab-size must be ≥ 257"),
        ("vocab huge", ["train", "--vocab-size", str(10**9), "--out", out], 2, "--vocab-size must be ≤"),
        ("unknown device", ["train", "--device", "foo", "--out", out], 2, "not a device torch knows"),
        ("unknown preset", ["train", "--preset", "gpt5", "--out", out], 2, "gpt5"),
        ("out is a file", [*train, "--out", str(tmp / "afile")], 1, "exists and is not a folder"),
        ("out under a file", [*train, "--out", str(tmp / "afile" / "sub")], 1, "is a file, so the checkpoint folder"),
        ("out holds other files", [*train, "--out", str(tmp / "work")], 1, "not an llmlab checkpoint"),
        ("resume from nothing", [*train, "--out", out, "--resume"], 1, "--resume needs the checkpoint"),
        ("resume a release checkpoint", [*train, "--out", str(tmp / "release"), "--resume"], 1, "not resumed"),
        ("corpus missing", [*train, "--out", out, "--corpus", str(tmp / "nope.txt")], 1, "nope.txt"),
        ("info: 0-byte weights", ["info", "--checkpoint", str(tmp / "empty-weights")], 1, "corrupt or truncated"),
        ("info: other tokenizer", ["info", "--checkpoint", str(tmp / "other-tok")], 1, "not the tokenizer"),
        ("info: a file", ["info", "--checkpoint", str(tmp / "afile")], 1, "is a file, not a checkpoint folder"),
        ("info: missing", ["info", "--checkpoint", str(tmp / "nothing")], 1, "no checkpoint folder"),
        ("info: config not ours", ["info", "--checkpoint", str(tmp / "hf")], 1, "not an llmlab checkpoint config"),
    ]


@pytest.fixture(scope="module")
def cli_tmp(tmp_path_factory, good, model, tok) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "afile").write_text("my notes\n")
    _foreign_folder(tmp)
    for name, damage in (("empty-weights", lambda ck: _write(ck / "model.safetensors", b"")),
                         ("other-tok", _other_tokenizer), ("hf", lambda ck: _config_field(ck, "format", "hf"))):
        damage(Path(shutil.copytree(good, tmp / name)))
    save_checkpoint(tmp / "release", model, tok)  # no trainer state
    return tmp


CLI_IDS = [c[0] for c in _cli_cases(Path("."), Path("."))]
SUBPROCESS_IDS = ["lr nan", "steps not a number", "unknown device", "out under a file",
                  "info: 0-byte weights"]  # one per kind (1 s each); every row also runs in-process above


@pytest.mark.parametrize("case", range(len(CLI_IDS)), ids=CLI_IDS)
def test_cli_bad_input_in_process(cli_tmp, corpus, capsys, case):
    _, argv, code, fragment = _cli_cases(cli_tmp, corpus)[case]
    before = snapshot(cli_tmp)
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own refusals (a value that is not a number)
        status = exit_.code
    assert status == code
    assert_one_error_line(capsys.readouterr().err, argv[0], fragment)
    assert snapshot(cli_tmp) == before and not (cli_tmp / "run").exists()


@pytest.mark.parametrize("case", [CLI_IDS.index(i) for i in SUBPROCESS_IDS], ids=SUBPROCESS_IDS)
def test_cli_bad_input_subprocess(cli_tmp, corpus, case):
    _, argv, code, fragment = _cli_cases(cli_tmp, corpus)[case]
    before = snapshot(cli_tmp)
    result = run_cli(*argv)
    assert result.returncode == code, result.stderr
    assert_one_error_line(result.stderr, argv[0], fragment)
    assert snapshot(cli_tmp) == before


# -- hypothesis: arbitrary values give a clean result or an LlmlabError ----------------------------------------------------

WILD = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=4),
    st.lists(st.integers(), max_size=3), st.tuples(st.floats(), st.floats()), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
NAME = st.text(st.characters(blacklist_characters="/\\", blacklist_categories=("Cs",)), min_size=0, max_size=12).filter(
    lambda s: s not in (".", ".."))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, good) -> Path:
    """Folders for the hypothesis tests: a good checkpoint, a damaged one, a file."""
    root = tmp_path_factory.mktemp("sandbox")
    shutil.copytree(good, root / "good")
    _write(Path(shutil.copytree(good, root / "bad")) / "model.safetensors", b"\0" * 10)
    (root / "afile").write_text("mine")
    return root


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(NAME, WILD), meta=WILD, state=st.one_of(st.none(), WILD))
def test_save_checkpoint_any_input(sandbox, model, tok, name, meta, state):
    work = Path(tempfile.mkdtemp(dir=sandbox))
    (work / "afile").write_text("mine")
    directory = work / name if isinstance(name, str) and name else name
    try:
        path = save_checkpoint(directory, model, tok, meta=meta, trainer_state=state)
    except LlmlabError:
        pass
    else:
        assert load_checkpoint(path).config == model.config
    assert (work / "afile").read_text() == "mine"
    assert not [p for p in work.iterdir() if ".old-" in p.name or ".tmp-" in p.name]
    shutil.rmtree(work)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.one_of(st.sampled_from(["good", "bad", "afile", "missing", ""]), WILD),
       device=st.one_of(st.sampled_from(["cpu", "cuda", "cuda:9", "meta", "mps", "cpu:0", " "]), WILD),
       state=WILD)
def test_load_checkpoint_any_input(sandbox, which, device, state):
    directory = sandbox / which if isinstance(which, str) and which in ("good", "bad", "afile", "missing") else which
    try:
        ckpt = load_checkpoint(directory, device=device, load_trainer_state=state)
    except LlmlabError:
        return
    assert ckpt.tokenizer.vocab_size == ckpt.config.vocab_size


FIELDS = ["steps", "batch_size", "block_size", "lr", "min_lr", "warmup_steps", "weight_decay", "betas", "grad_clip",
          "eval_every", "eval_batches", "val_fraction", "seed", "max_minutes", "checkpoint_dir", "checkpoint_every"]


@settings(max_examples=100, deadline=None)
@given(kwargs=st.dictionaries(st.sampled_from(FIELDS), WILD, max_size=4))
def test_train_config_any_input(kwargs):
    try:
        cfg = TrainConfig(**kwargs)
    except LlmlabError:
        return
    assert cfg.steps >= 1 and cfg.lr > 0 and 0 <= cfg.min_lr <= cfg.lr and math.isfinite(cfg.weight_decay)
    assert 0 < cfg.val_fraction < 1 and all(0 <= b < 1 for b in cfg.betas)

"""The course model's recipe: tokenizer + model + training settings that reproduce the built-in checkpoint.

Taught in notebook 07 (training).  ``python -m llmlab train`` runs exactly
this; the built-in model in ``llmlab/assets/`` was written by::

    python -m llmlab train --preset course-tiny --release --out llmlab/assets/course-tiny-shakespeare

Every setting and the output folder are checked before the corpus is tokenized,
so a bad ``--out`` or ``--lr`` fails in a second, not after the training.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from llmlab.checkpoint import TRAINER_STATE, CheckpointError, check_output_dir, read_config
from llmlab.config import ModelConfig, get_config
from llmlab.data import load_corpus
from llmlab.errors import require_finite, require_int
from llmlab.model import Transformer
from llmlab.runtime import MAX_SEED, device, seed_everything
from llmlab.tokenizer import BPETokenizer, VocabSizeWarning
from llmlab.train import MAX_BATCH_SIZE, Trainer, TrainConfig, TrainingError, TrainingInterrupted

MAX_VOCAB = 65_536
"""The largest ``--vocab-size`` the recipe accepts: the course BPE trains in Python (the course uses 1024)."""

COURSE_TRAINING = TrainConfig(
    steps=800,
    batch_size=16,
    block_size=None,
    lr=2e-3,
    min_lr=2e-4,
    warmup_steps=50,
    weight_decay=0.1,
    grad_clip=1.0,
    eval_every=100,
    eval_batches=8,
)
"""The settings the built-in model was trained with: 800 steps of 16 × 256 tokens (~3.3M tokens).

A run is bounded by steps, so it is reproducible; ``--minutes`` can cap the wall-clock time too.
"""


@dataclass
class RecipeResult:
    """What a recipe run produced."""

    out: Path
    steps: int
    seconds: float
    tokens_seen: int
    val_loss: float
    val_loss_per_char: float

    def summary(self) -> str:
        return (
            f"trained {self.steps} steps in {self.seconds / 60:.1f} min "
            f"({self.tokens_seen / max(self.seconds, 1e-9):,.0f} tokens/s); "
            f"validation loss {self.val_loss:.3f} nats/token = {self.val_loss_per_char:.3f} nats/char; "
            f"checkpoint: {self.out}"
        )


def prepare_tokens(text: str, vocab_size: int) -> tuple[BPETokenizer, torch.Tensor]:
    """Train the course BPE on ``text`` and return it with the whole text's ids."""
    tokenizer = BPETokenizer.train(text, vocab_size)
    return tokenizer, torch.tensor(tokenizer.encode(text), dtype=torch.long)


def _training_config(out: str | os.PathLike, minutes: float | None, steps: int | None, batch_size: int | None,
                     lr: float | None, seed: int) -> TrainConfig:
    """COURSE_TRAINING with the command line's changes, every number checked (named as its option)."""
    changes: dict = {"seed": require_int("--seed", seed, minimum=0, maximum=MAX_SEED, error=TrainingError),
                     "checkpoint_dir": os.fspath(out), "checkpoint_every": 100}
    # A resumable checkpoint every 100 steps (and one on Ctrl-C), so an interrupted run loses little (`--resume`).
    if minutes is not None:
        minutes = require_finite("--minutes", minutes, error=TrainingError)
        if minutes <= 0:
            raise TrainingError(f"--minutes must be > 0, got {minutes}.")
    changes["max_minutes"] = minutes
    if steps is not None:
        changes["steps"] = require_int("--steps", steps, minimum=1, error=TrainingError)
    if batch_size is not None:
        changes["batch_size"] = require_int("--batch-size", batch_size, minimum=1, maximum=MAX_BATCH_SIZE,
                                            error=TrainingError)
    if lr is not None:
        lr = require_finite("--lr", lr, error=TrainingError)
        if lr <= 0:
            raise TrainingError(f"--lr must be > 0, got {lr} (the course uses {COURSE_TRAINING.lr}).")
        changes["lr"], changes["min_lr"] = lr, lr / 10
    cfg = TrainConfig(**{**COURSE_TRAINING.__dict__, **changes})
    if cfg.warmup_steps >= cfg.steps:
        cfg.warmup_steps = max(1, cfg.steps // 10)
    return cfg


def _model_config(preset: str, vocab_size: int | None) -> ModelConfig:
    if not isinstance(preset, str):
        raise TrainingError(f"--preset must be a preset name such as 'course-tiny', got {preset!r}.")
    config = get_config(preset)
    if vocab_size is not None:
        vocab_size = require_int("--vocab-size", vocab_size, minimum=257, maximum=MAX_VOCAB, error=TrainingError)
        config = config.replace(vocab_size=vocab_size)
    return config


def _device(name: str | None) -> torch.device:
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise TrainingError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {name!r}.")
    return device(name)  # its own errors (llmlab.runtime.DeviceError) say what to use instead


def _check_out(out: str | os.PathLike, config: ModelConfig, resume: bool) -> None:
    """With ``resume``, ``out`` must hold a resumable checkpoint of this model (checked before any long work)."""
    if not resume:
        return
    if not Path(out).is_dir():
        raise CheckpointError(f"--resume needs the checkpoint of an earlier run in --out, but {out} does not exist: "
                              "give the --out of that run, or leave --resume out to start a new one.")
    theirs, _ = read_config(out)
    if not (Path(out) / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"{out} has no {TRAINER_STATE} (it was written with --release): it can be loaded but not resumed. "
            "Leave --resume out and choose another --out to start a new run."
        )
    if theirs != config:
        diff = [k for k, v in config.to_dict().items() if theirs.to_dict().get(k) != v]
        raise CheckpointError(
            f"cannot resume from {out}: it holds a different model (differs in {', '.join(diff)}). "
            "Use the same --preset and --vocab-size as that run, or leave --resume out to start a new one."
        )


def _check_flags(**flags: object) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TrainingError(f"{name} must be True or False, got {value!r}.")


def _tokens(corpus: str | os.PathLike | None, config: ModelConfig) -> tuple[BPETokenizer, torch.Tensor]:
    """The corpus's BPE and ids; refused when the text is too small to learn ``vocab_size`` ids."""
    if corpus is not None and not isinstance(corpus, (str, os.PathLike)):
        raise TrainingError(f"--corpus must be the path of a text file, got {corpus!r}.")
    text = load_corpus(path=corpus) if corpus is not None else load_corpus()
    with warnings.catch_warnings():  # a shortfall is refused below, with the options to change
        warnings.simplefilter("ignore", VocabSizeWarning)
        tokenizer, ids = prepare_tokens(text, config.vocab_size)
    if tokenizer.vocab_size != config.vocab_size:
        raise TrainingError(
            f"the corpus is too small for a vocabulary of {config.vocab_size:,}: its BPE stops at "
            f"{tokenizer.vocab_size:,} ids (nothing left to merge). Pass --vocab-size {tokenizer.vocab_size} "
            "or a larger --corpus."
        )
    return tokenizer, ids


def train_course_model(
    preset: str = "course-tiny",
    out: str | os.PathLike = "runs/course-tiny",
    *,
    minutes: float | None = None,
    steps: int | None = None,
    vocab_size: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    corpus: str | os.PathLike | None = None,
    device_name: str | None = None,
    resume: bool = False,
    release: bool = False,
    progress: bool = True,
) -> RecipeResult:
    """Tokenize the corpus, train ``preset`` and write a checkpoint to ``out``; report the validation loss.

    ``release=True`` leaves the optimizer state out of the final checkpoint (a third of the size,
    but it cannot be resumed): that is how the built-in model is written.  Every input and ``out``
    are checked first; Ctrl-C raises :class:`~llmlab.train.TrainingInterrupted` saying what was saved.
    """
    _check_flags(resume=resume, release=release, progress=progress)
    out = check_output_dir(out)  # before any long work: a run must not end in a failed save
    cfg = _training_config(out, minutes, steps, batch_size, lr, seed)
    config = _model_config(preset, vocab_size)
    target = _device(device_name)
    _check_out(out, config, resume)
    trainer = None
    try:
        seed_everything(cfg.seed)
        tokenizer, ids = _tokens(corpus, config)
        model = Transformer(config).to(target)
        trainer = Trainer(model, tokenizer, ids, cfg)
        if resume:
            trainer.resume(out)
        return _fit_and_save(trainer, out, preset, release, progress)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt as err:  # outside the loop: tokenizing, the final evaluation or save
        step = trainer.step if trainer is not None else 0
        kept = trainer.last_checkpoint if trainer is not None else None
        raise TrainingInterrupted(step, cfg.steps, kept, trainer.last_checkpoint_step if kept else None,
                                  "" if trainer is not None else "before training started") from err


def _fit_and_save(trainer: Trainer, out: Path, preset: str, release: bool, progress: bool) -> RecipeResult:
    start = time.perf_counter()
    trainer.fit(progress=progress)
    val_loss = trainer.evaluate_full("val")
    result = RecipeResult(
        out=Path(out), steps=trainer.step, seconds=trainer.history.seconds, tokens_seen=trainer.history.tokens_seen,
        val_loss=val_loss, val_loss_per_char=trainer.per_char(val_loss),
    )
    trainer.save(out, meta={"val_loss": val_loss, "val_loss_per_char": result.val_loss_per_char,
                            "train_seconds": round(time.perf_counter() - start, 1), "preset": preset},
                 with_state=not release)
    return result

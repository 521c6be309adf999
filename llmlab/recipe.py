"""The course model's recipe: tokenizer + model + training settings that reproduce the built-in checkpoint.

Taught in notebook 07 (training).  ``python -m llmlab train`` runs exactly
this; the built-in model in ``llmlab/assets/`` was written by::

    python -m llmlab train --preset course-tiny --release --out llmlab/assets/course-tiny-shakespeare
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmlab.config import get_config
from llmlab.data import load_corpus
from llmlab.model import Transformer
from llmlab.runtime import device, seed_everything
from llmlab.tokenizer import BPETokenizer
from llmlab.train import Trainer, TrainConfig, TrainingError

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
            f"trained {self.steps} steps in {self.seconds / 60:.1f} min ({self.tokens_seen / self.seconds:,.0f} tokens/s); "
            f"validation loss {self.val_loss:.3f} nats/token = {self.val_loss_per_char:.3f} nats/char; "
            f"checkpoint: {self.out}"
        )


def prepare_tokens(text: str, vocab_size: int) -> tuple[BPETokenizer, torch.Tensor]:
    """Train the course BPE on ``text`` and return it with the whole text's ids."""
    tokenizer = BPETokenizer.train(text, vocab_size)
    return tokenizer, torch.tensor(tokenizer.encode(text), dtype=torch.long)


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
    but it cannot be resumed): that is how the built-in model is written.
    """
    if minutes is not None and minutes <= 0:
        raise TrainingError(f"--minutes must be > 0, got {minutes}.")
    seed_everything(seed)
    config = get_config(preset)
    if vocab_size is not None:
        config = config.replace(vocab_size=vocab_size)
    text = load_corpus(path=corpus) if corpus is not None else load_corpus()
    tokenizer, ids = prepare_tokens(text, config.vocab_size)
    # A resumable checkpoint every 100 steps, so an interrupted run loses little (`--resume`).
    changes = {"seed": seed, "max_minutes": minutes, "checkpoint_dir": str(out), "checkpoint_every": 100}
    if steps is not None:
        changes["steps"] = steps
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if lr is not None:
        changes["lr"], changes["min_lr"] = lr, lr / 10
    cfg = TrainConfig(**{**COURSE_TRAINING.__dict__, **changes})
    if cfg.warmup_steps >= cfg.steps:
        cfg.warmup_steps = max(1, cfg.steps // 10)
    model = Transformer(config).to(device(device_name))
    trainer = Trainer(model, tokenizer, ids, cfg)
    if resume:
        trainer.resume(out)
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

"""Training: AdamW, warmup + cosine schedule, gradient clipping, evaluation, checkpoints.

Taught in notebook 07 (training).  One :class:`Trainer` holds the model, the
tokenized corpus split into train/validation, the optimizer and the random
state; ``fit`` runs steps with a progress bar, evaluates every ``eval_every``
steps and can write resumable checkpoints.  On CPU, a seeded run is
bit-for-bit reproducible, and resuming from a checkpoint continues exactly
where the first run would have gone.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmlab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from llmlab.data import random_batch, train_val_split
from llmlab.tokenizer import BPETokenizer


class TrainingError(ValueError):
    """A training setting that cannot work (the message says which and why)."""


@dataclass
class TrainConfig:
    """The knobs of a training run (notebook 07).

    ``max_minutes`` stops the run by wall-clock time (checked after each step);
    the learning-rate schedule still spans ``steps``.
    """

    steps: int = 2000
    batch_size: int = 32
    block_size: int | None = None  # None: the model's context_length
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 20
    val_fraction: float = 0.1
    seed: int = 0
    max_minutes: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None  # None: only at the end (when checkpoint_dir is set)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches"):
            if int(getattr(self, name)) < 1:
                raise TrainingError(f"{name} must be ≥ 1, got {getattr(self, name)!r}.")
        if self.warmup_steps < 0 or self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise TrainingError(
                f"need warmup_steps ≥ 0 and 0 ≤ min_lr ≤ lr with lr > 0; got warmup_steps={self.warmup_steps}, "
                f"lr={self.lr}, min_lr={self.min_lr}."
            )
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise TrainingError(f"max_minutes must be > 0, got {self.max_minutes}.")
        self.betas = tuple(self.betas)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms' gains)."""
    decay, no_decay = [], []
    for p in model.parameters():  # a tied matrix appears once
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@dataclass
class History:
    """What happened during training, for plots and the checkpoint."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_train_loss: list[float] = field(default_factory=list)
    eval_val_loss: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    seconds: float = 0.0


def _in_jupyter() -> bool:
    """True inside a Jupyter kernel, where stdout becomes a cell's output."""
    from llmlab.notebook import _in_notebook

    return _in_notebook()


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "training"):
    """A plain-text tqdm bar: to stdout in a notebook, to stderr in a terminal.

    Plain text rather than a widget: a notebook keeps the bar as a stream whose
    last line (after the carriage returns) is the final state, e.g. ``800/800``,
    so a saved or widget-less notebook shows where the run ended, not ``0/800``.
    """
    import sys

    from tqdm.std import tqdm

    file = sys.stdout if _in_jupyter() else sys.stderr
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", file=file)


class Trainer:
    """Train a model on a token stream (notebook 07).

    ``ids`` is the whole tokenized corpus (1-D); the last ``val_fraction`` of it
    is held out for validation.  ``chars_per_token`` (characters / tokens of the
    validation text) converts losses to nats per character, so that models with
    different tokenizers can be compared.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: BPETokenizer, ids: torch.Tensor, cfg: TrainConfig) -> None:
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.block_size = cfg.block_size or model.config.context_length
        if self.block_size > model.config.context_length:
            raise TrainingError(
                f"block_size={self.block_size} exceeds the model's context_length={model.config.context_length}."
            )
        self.train_ids, self.val_ids = train_val_split(ids, cfg.val_fraction)
        if len(self.val_ids) <= self.block_size:
            raise TrainingError(
                f"the validation split has {len(self.val_ids)} tokens, too few for block_size={self.block_size}: "
                "use more text, a larger val_fraction or a smaller block_size."
            )
        self.chars_per_token = len(tokenizer.decode(self.val_ids.tolist())) / len(self.val_ids)
        self.device = next(model.parameters()).device
        torch.manual_seed(cfg.seed)  # dropout
        self.generator = torch.Generator().manual_seed(cfg.seed)  # which windows are drawn
        self.optimizer = make_optimizer(model, cfg)
        self.step = 0
        self.history = History()

    # -- one step ------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step on a fresh random batch; returns its loss."""
        self.model.train()
        x, y = random_batch(self.train_ids, self.cfg.batch_size, self.block_size, self.generator)
        x, y = x.to(self.device), y.to(self.device)
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.model(x, targets=y).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        value = loss.item()
        h = self.history
        h.step.append(self.step)
        h.train_loss.append(value)
        h.lr.append(lr)
        h.tokens_seen += x.numel()
        self.step += 1
        return value

    @torch.no_grad()
    def evaluate(self, split: str = "val", batches: int | None = None) -> float:
        """Mean loss (nats per token) over ``batches`` fixed windows of a split.

        The windows are the same at every call (a generator seeded apart from
        training's), so evaluations along a run compare like with like.
        """
        ids = self.val_ids if split == "val" else self.train_ids
        generator = torch.Generator().manual_seed(10_000 + self.cfg.seed)
        was_training = self.model.training
        self.model.eval()
        losses = []
        for _ in range(batches or self.cfg.eval_batches):
            x, y = random_batch(ids, self.cfg.batch_size, self.block_size, generator)
            losses.append(float(self.model(x.to(self.device), targets=y.to(self.device)).loss))
        self.model.train(was_training)
        return sum(losses) / len(losses)

    @torch.no_grad()
    def evaluate_full(self, split: str = "val") -> float:
        """Loss over every token of a split, in consecutive windows (the number to report)."""
        ids = self.val_ids if split == "val" else self.train_ids
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        n = self.block_size
        starts = list(range(0, len(ids) - 1, n))
        for i in range(0, len(starts), self.cfg.batch_size):
            chunk = [ids[s : s + n + 1] for s in starts[i : i + self.cfg.batch_size]]
            chunk = [c for c in chunk if len(c) == n + 1]
            if not chunk:
                continue
            batch = torch.stack(chunk).to(self.device)
            loss = self.model(batch[:, :-1], targets=batch[:, 1:]).loss
            total += float(loss) * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
        self.model.train(was_training)
        return total / count

    def per_char(self, loss_per_token: float) -> float:
        """Convert nats per token to nats per character of the validation text."""
        return loss_per_token / self.chars_per_token

    # -- the loop ---------------------------------------------------------------------------

    def fit(self, callback: Callable[[Trainer], None] | None = None, progress: bool = True) -> History:
        """Train until ``steps`` (or ``max_minutes``); evaluate, call ``callback`` after each evaluation.

        ``progress`` shows a plain-text bar (see :func:`progress_bar`); its last line is the final step.
        """
        cfg = self.cfg
        start = time.perf_counter()
        bar = progress_bar(total=cfg.steps, initial=self.step, enabled=progress)
        while self.step < cfg.steps:
            loss = self.train_step()
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.history.lr[-1]:.1e}", refresh=False)
            bar.update(1)
            elapsed = self.history.seconds + time.perf_counter() - start
            out_of_time = cfg.max_minutes is not None and elapsed >= cfg.max_minutes * 60
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps or out_of_time:
                self._record_eval()
                if callback is not None:
                    callback(self)
            if cfg.checkpoint_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.history.seconds = elapsed
                start = time.perf_counter()
                self.save(cfg.checkpoint_dir)
            if out_of_time:
                break
        bar.close()
        self.history.seconds += time.perf_counter() - start
        just_saved = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
        if cfg.checkpoint_dir and not just_saved:
            self.save(cfg.checkpoint_dir)
        return self.history

    def _record_eval(self) -> None:
        h = self.history
        h.eval_step.append(self.step)
        h.eval_train_loss.append(self.evaluate("train"))
        h.eval_val_loss.append(self.evaluate("val"))

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything needed to resume exactly: optimizer, step, random states, history."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "train_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.cfg).items()},
            "history": asdict(self.history),
        }

    def save(self, directory: str | os.PathLike, meta: dict[str, Any] | None = None, with_state: bool = True) -> Path:
        """Write a checkpoint (weights, config, tokenizer), resumable unless ``with_state=False``."""
        info = {"step": self.step, "chars_per_token": self.chars_per_token}
        if self.history.eval_val_loss:
            info["val_loss"] = self.history.eval_val_loss[-1]
        return save_checkpoint(directory, self.model, self.tokenizer, meta={**info, **(meta or {})},
                               trainer_state=self.state() if with_state else None)

    def resume(self, directory: str | os.PathLike) -> None:
        """Continue from a checkpoint written by :meth:`save`; the model config must match exactly."""
        ckpt = load_checkpoint(directory, device=self.device, load_trainer_state=True)
        if ckpt.config != self.model.config:
            theirs, ours = ckpt.config.to_dict(), self.model.config.to_dict()
            diff = {k: (theirs[k], ours[k]) for k in ours if theirs.get(k) != ours[k]}
            raise CheckpointError(
                f"cannot resume from {directory}: its model config differs from this model's in "
                + ", ".join(f"{k} (checkpoint {a!r}, here {b!r})" for k, (a, b) in diff.items())
                + ". Build the model from the checkpoint's config, or start a new run."
            )
        if ckpt.trainer_state is None:
            raise CheckpointError(f"{directory} has no trainer_state.pt: it can be loaded but not resumed.")
        if ckpt.tokenizer.ranks != self.tokenizer.ranks:
            raise CheckpointError(f"cannot resume from {directory}: it was trained with a different tokenizer.")
        state = ckpt.trainer_state
        self.model.load_state_dict(ckpt.model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.history = History(**state["history"])

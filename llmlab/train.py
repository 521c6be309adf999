"""Training: AdamW, warmup + cosine schedule, gradient clipping, evaluation, checkpoints.

Taught in notebook 07 (training).  One :class:`Trainer` holds the model, the
tokenized corpus split into train/validation, the optimizer and the random
state; ``fit`` runs steps with a progress bar, evaluates every ``eval_every``
steps and can write resumable checkpoints.  On CPU, a seeded run is
bit-for-bit reproducible, and resuming from a checkpoint continues exactly
where the first run would have gone.  A first Ctrl-C lets the current step
finish and saves a resumable checkpoint (:class:`TrainingInterrupted` says
where); the output folder is checked before the first step.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmlab.checkpoint import CheckpointError, check_output_dir, load_checkpoint, save_checkpoint
from llmlab.config import ModelConfig
from llmlab.data import random_batch, train_val_split
from llmlab.errors import LlmlabError, require_finite, require_int
from llmlab.runtime import MAX_SEED
from llmlab.tokenizer import BPETokenizer

MAX_BATCH_SIZE = 2**20
"""The largest batch_size a TrainConfig accepts (memory runs out long before; see ``Trainer.fit``)."""


class TrainingError(LlmlabError, ValueError):
    """A training setting that cannot work (the message says which and why)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :meth:`Trainer.fit`; ``checkpoint`` is the resumable checkpoint left (None: none).

    A KeyboardInterrupt, so code that catches Ctrl-C still does; the message says
    what was kept and how to continue (notebook 07).
    """

    def __init__(self, step: int, total: int, checkpoint: Path | None = None, checkpoint_step: int | None = None,
                 note: str = "") -> None:
        self.step, self.total, self.note = step, total, note
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step
        if checkpoint is None:
            where = "nothing was saved"
        else:
            which = "" if checkpoint_step == step else f" (of step {checkpoint_step})"
            where = (f"the resumable checkpoint{which} is in {checkpoint}: continue with Trainer.resume "
                     "(on the command line: the same command plus --resume)")
        super().__init__(f"training interrupted at step {step} of {total}; {where}" + (f" [{note}]" if note else ""))


class _StopRequested(KeyboardInterrupt):
    """Raised by the loop itself after a held-back Ctrl-C, between two steps."""


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
        for name in ("steps", "eval_every", "eval_batches"):
            setattr(self, name, require_int(name, getattr(self, name), minimum=1, error=TrainingError))
        self.batch_size = require_int("batch_size", self.batch_size, minimum=1, maximum=MAX_BATCH_SIZE,
                                      error=TrainingError)
        self.warmup_steps = require_int("warmup_steps", self.warmup_steps, minimum=0, error=TrainingError)
        self.seed = require_int("seed", self.seed, minimum=0, maximum=MAX_SEED, error=TrainingError)
        self.block_size = _optional_int("block_size", self.block_size)
        self.checkpoint_every = _optional_int("checkpoint_every", self.checkpoint_every)
        self._check_rates()
        self.val_fraction = require_finite("val_fraction", self.val_fraction, minimum=0, maximum=1, error=TrainingError)
        if not 0 < self.val_fraction < 1:
            raise TrainingError(
                f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}; 0.1 is usual."
            )
        if self.max_minutes is not None:
            self.max_minutes = _positive("max_minutes", self.max_minutes)
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)) or not str(self.checkpoint_dir).strip():
                raise TrainingError(f"checkpoint_dir must be a folder path or None, got {self.checkpoint_dir!r}.")
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)  # a str, so the trainer state loads with weights_only

    def _check_rates(self) -> None:
        """Learning rates, weight decay, betas and clipping: finite numbers in their ranges."""
        self.lr = _positive("lr", self.lr)
        self.min_lr = require_finite("min_lr", self.min_lr, error=TrainingError)
        if not 0 <= self.min_lr <= self.lr:
            raise TrainingError(f"need 0 ≤ min_lr ≤ lr; got lr={self.lr}, min_lr={self.min_lr} (lr / 10 is usual).")
        self.weight_decay = require_finite("weight_decay", self.weight_decay, minimum=0, error=TrainingError)
        if self.grad_clip is not None:
            self.grad_clip = require_finite("grad_clip", self.grad_clip, minimum=0, error=TrainingError)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise TrainingError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.95); got {self.betas!r}.")
        self.betas = tuple(
            require_finite(f"betas[{i}]", b, minimum=0, error=TrainingError) for i, b in enumerate(self.betas)
        )
        if max(self.betas) >= 1:
            raise TrainingError(f"betas must be in [0, 1), e.g. (0.9, 0.95); got {self.betas}.")


def _optional_int(name: str, value) -> int | None:
    return None if value is None else require_int(name, value, minimum=1, error=TrainingError)


def _positive(name: str, value) -> float:
    value = require_finite(name, value, error=TrainingError)
    if value <= 0:
        raise TrainingError(f"{name} must be > 0, got {value}.")
    return value


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


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "training", unit: str = "step"):
    """A plain-text tqdm bar: to stdout in a notebook, to stderr in a terminal.

    Plain text rather than a widget: a notebook keeps the bar as a stream whose
    last line (after the carriage returns) is the final state, e.g. ``800/800``,
    so a saved or widget-less notebook shows where the run ended, not ``0/800``.
    """
    import sys

    from tqdm.std import tqdm

    file = sys.stdout if _in_jupyter() else sys.stderr
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit, file=file)


class Trainer:
    """Train a model on a token stream (notebook 07).

    ``ids`` is the whole tokenized corpus (1-D); the last ``val_fraction`` of it
    is held out for validation.  ``chars_per_token`` (characters / tokens of the
    validation text) converts losses to nats per character, so that models with
    different tokenizers can be compared.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: BPETokenizer, ids: torch.Tensor, cfg: TrainConfig) -> None:
        _check_parts(model, tokenizer, ids, cfg)
        if cfg.checkpoint_dir:
            check_output_dir(cfg.checkpoint_dir)  # before any step: a run must not end in a failed save
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.block_size = cfg.block_size or model.config.context_length
        if self.block_size > model.config.context_length:
            raise TrainingError(
                f"block_size={self.block_size} exceeds the model's context_length={model.config.context_length}."
            )
        self.train_ids, self.val_ids = train_val_split(ids, cfg.val_fraction)
        for split, part in (("validation", self.val_ids), ("training", self.train_ids)):
            if len(part) <= self.block_size:
                raise TrainingError(
                    f"the {split} split has {len(part)} tokens, too few for block_size={self.block_size}: "
                    "use more text, a larger val_fraction or a smaller block_size."
                )
        self.chars_per_token = len(tokenizer.decode(self.val_ids.tolist())) / len(self.val_ids)
        self.device = next(model.parameters()).device
        torch.manual_seed(cfg.seed)  # dropout
        self.generator = torch.Generator().manual_seed(cfg.seed)  # which windows are drawn
        self.optimizer = make_optimizer(model, cfg)
        self.step = 0
        self.history = History()
        self.last_checkpoint: Path | None = None
        """The folder of the last resumable checkpoint :meth:`save` wrote, and its step."""
        self.last_checkpoint_step: int | None = None

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
        A first Ctrl-C finishes the current step, saves a resumable checkpoint to ``checkpoint_dir``
        (when set) and raises :class:`TrainingInterrupted`; a second one stops at once.
        """
        cfg = self.cfg
        if cfg.checkpoint_dir:
            check_output_dir(cfg.checkpoint_dir)
        first_step = self.step
        self._clock = [self.history.seconds, time.perf_counter()]  # seconds before, start of this stretch
        bar = progress_bar(total=cfg.steps, initial=self.step, enabled=progress)
        try:
            with _deferred_interrupt() as ctrl_c:
                try:
                    self._loop(callback, bar, ctrl_c)
                except KeyboardInterrupt as err:
                    bar.close()
                    self._stop_clock()
                    whole = isinstance(err, _StopRequested) or not (ctrl_c.in_step or ctrl_c.pressed)
                    raise self._interrupted(first_step, whole, ctrl_c.pressed) from err
        finally:
            bar.close()
        self._stop_clock()
        if cfg.checkpoint_dir and not self._saved_here():
            self.save(cfg.checkpoint_dir)
        return self.history

    def _loop(self, callback: Callable[[Trainer], None] | None, bar, ctrl_c: _CtrlC) -> None:
        cfg = self.cfg
        while self.step < cfg.steps:
            ctrl_c.in_step = True
            loss = self._guarded_step()
            ctrl_c.in_step = False
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.history.lr[-1]:.1e}", refresh=False)
            bar.update(1)
            out_of_time = cfg.max_minutes is not None and self._elapsed() >= cfg.max_minutes * 60
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps or out_of_time:
                self._record_eval()
                if callback is not None:
                    callback(self)
            if cfg.checkpoint_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._stop_clock()
                self.save(cfg.checkpoint_dir)
            if ctrl_c.pressed:
                raise _StopRequested
            if out_of_time:
                break

    def _guarded_step(self) -> float:
        """:meth:`train_step`, turning running out of memory and a diverged loss into a TrainingError."""
        try:
            loss = self.train_step()
        except (torch.OutOfMemoryError, MemoryError) as err:
            raise self._out_of_memory(err) from err
        except RuntimeError as err:
            if "alloc" not in str(err).lower():
                raise
            raise self._out_of_memory(err) from err
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss} at step {self.step}: training diverged, and nothing from this step on is "
                f"saved{self._last_saved_note()}. Lower the learning rate (lr={self.cfg.lr}) and train again."
            )
        return loss

    def _out_of_memory(self, err: BaseException) -> TrainingError:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return TrainingError(
            f"out of memory at step {self.step} with batch_size={self.cfg.batch_size} × block_size={self.block_size} "
            f"tokens ({first}): use a smaller batch_size or a smaller model{self._last_saved_note(';')}."
        )

    def _last_saved_note(self, sep: str = ";") -> str:
        if self.last_checkpoint is None:
            return ""
        return f"{sep} the last checkpoint (step {self.last_checkpoint_step}) is in {self.last_checkpoint}"

    def _elapsed(self) -> float:
        before, start = self._clock
        return before + time.perf_counter() - start

    def _stop_clock(self) -> None:
        """Add the time since the clock last started to ``history.seconds`` and restart it."""
        self.history.seconds = self._elapsed()
        self._clock = [self.history.seconds, time.perf_counter()]

    def _saved_here(self) -> bool:
        """True when the current step is already in ``checkpoint_dir``."""
        return (self.last_checkpoint_step == self.step and self.cfg.checkpoint_dir is not None
                and self.last_checkpoint == Path(self.cfg.checkpoint_dir))

    def _interrupted(self, first_step: int, whole: bool, second: bool) -> TrainingInterrupted:
        """After Ctrl-C: save the run if its state is whole (between steps) and say what is kept where."""
        cfg, note = self.cfg, ""
        if not cfg.checkpoint_dir:
            note = "no checkpoint_dir was set"
        elif not whole:
            note = "a second Ctrl-C stops at once" if second else "stopped in the middle of a step, which is not saved"
        elif self.step > first_step and not self._saved_here():
            try:
                self.save(cfg.checkpoint_dir)
            except (CheckpointError, OSError) as err:
                note = f"saving failed: {err}"
        kept = self.last_checkpoint is not None
        return TrainingInterrupted(self.step, cfg.steps, self.last_checkpoint if kept else None,
                                   self.last_checkpoint_step if kept else None, note)

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
        if meta is not None and not isinstance(meta, dict):
            raise CheckpointError(f"meta must be a dict or None, got {type(meta).__name__}.")
        path = save_checkpoint(directory, self.model, self.tokenizer, meta={**info, **(meta or {})},
                               trainer_state=self.state() if with_state else None)
        if with_state:
            self.last_checkpoint, self.last_checkpoint_step = path, self.step
        return path

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


def _check_parts(model: torch.nn.Module, tokenizer: BPETokenizer, ids: torch.Tensor, cfg: TrainConfig) -> None:
    """The Trainer's inputs: an llmlab model, its tokenizer, a 1-D tensor of valid ids, a TrainConfig."""
    if not isinstance(cfg, TrainConfig):
        raise TrainingError(f"cfg must be a TrainConfig, got {type(cfg).__name__}.")
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(config, ModelConfig):
        raise TrainingError(f"model must be an llmlab Transformer, got {type(model).__name__}.")
    if not isinstance(tokenizer, BPETokenizer):
        raise TrainingError(f"tokenizer must be a BPETokenizer, got {type(tokenizer).__name__}.")
    if tokenizer.vocab_size != config.vocab_size:
        raise TrainingError(
            f"the tokenizer has {tokenizer.vocab_size:,} ids but the model's vocab_size is {config.vocab_size:,}: "
            f"build the model with vocab_size={tokenizer.vocab_size}."
        )
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex \
            or ids.dtype == torch.bool:
        raise TrainingError("ids must be a 1-D integer tensor of token ids, e.g. torch.tensor(tokenizer.encode(text)).")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size):
        raise TrainingError(
            f"ids must lie in 0 … {config.vocab_size - 1} (the model's vocabulary); found {int(ids.min())} … "
            f"{int(ids.max())}: encode the text with this model's tokenizer."
        )


class _CtrlC:
    """What :func:`_deferred_interrupt` saw: Ctrl-C presses, and whether a step was running."""

    def __init__(self) -> None:
        self.presses = 0
        self.in_step = False

    @property
    def pressed(self) -> bool:
        return self.presses > 0


@contextmanager
def _deferred_interrupt() -> Iterator[_CtrlC]:
    """Hold back the first Ctrl-C until the current step ends (so the saved state is whole); a second one acts at once.

    Only in the main thread and where Python's own SIGINT handler is in place (a terminal,
    a Jupyter kernel); elsewhere Ctrl-C arrives as usual.
    """
    ctrl_c = _CtrlC()
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield ctrl_c
        return

    def hold(signum, frame) -> None:
        ctrl_c.presses += 1
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one interrupts at once

    signal.signal(signal.SIGINT, hold)
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)

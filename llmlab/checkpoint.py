"""Checkpoints: a folder with safetensors weights, a JSON config and the tokenizer.

Taught in notebook 07 (training).  Layout of a checkpoint folder::

    model.safetensors   the weights (a tied LM head is stored once)
    config.json         the ModelConfig, plus what wrote it
    tokenizer.json      the BPE tokenizer (human-readable)
    trainer_state.pt    optional: optimizer, step, random state, history (to resume)

A checkpoint is written into a temporary folder first and then swapped into
place, so a crash mid-write never leaves a half-written checkpoint behind and
never damages the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from llmlab.config import ConfigError, ModelConfig
from llmlab.tokenizer import BPETokenizer, TokenizerFileError

WEIGHTS, CONFIG, TOKENIZER, TRAINER_STATE = "model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"
FORMAT = "llmlab-checkpoint"
BUILTIN = "course-tiny-shakespeare"
"""Name of the checkpoint shipped inside the package (``llmlab/assets/``)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match (the message says what to do)."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    model: torch.nn.Module
    tokenizer: BPETokenizer
    config: ModelConfig
    meta: dict[str, Any] = field(default_factory=dict)
    trainer_state: dict[str, Any] | None = None
    path: Path | None = None


def builtin_checkpoint() -> Path:
    """The folder of the model shipped with llmlab (trained on tiny Shakespeare by ``llmlab train``)."""
    return Path(str(resources.files("llmlab") / "assets" / BUILTIN))


def save_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: BPETokenizer,
    *,
    meta: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (see the module docstring) and return its path."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config = model.config
        save_model(model, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        info = {"format": FORMAT, "version": 1, "model": config.to_dict(), "meta": meta or {}}
        (tmp / CONFIG).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp / TOKENIZER)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return directory


def read_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig and metadata of a checkpoint folder, without loading weights."""
    directory = _existing(directory)
    try:
        info = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
        if info.get("format") != FORMAT:
            raise CheckpointError(f"{directory / CONFIG} is not an llmlab checkpoint config (format {info.get('format')!r}).")
        return ModelConfig.from_dict(info["model"]), info.get("meta", {})
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{directory / CONFIG} is corrupt ({err}); the checkpoint cannot be used.") from err


def load_checkpoint(
    directory: str | os.PathLike | None = None, device: torch.device | str = "cpu", load_trainer_state: bool = False
) -> Checkpoint:
    """Load a checkpoint folder (default: the built-in model) onto ``device``.

    Every failure is a :class:`CheckpointError` naming the folder and the problem.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from llmlab.model import Transformer

    directory = _existing(builtin_checkpoint() if directory is None else directory)
    config, meta = read_config(directory)
    try:
        tokenizer = BPETokenizer.load(directory / TOKENIZER)
    except TokenizerFileError as err:
        raise CheckpointError(f"the tokenizer of {directory} is unusable: {err}") from err
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{config.vocab_size}: they do not belong together."
        )
    model = Transformer(config)
    try:
        load_model(model, str(directory / WEIGHTS), strict=True, device=str(device))
    except SafetensorError as err:
        raise CheckpointError(f"{directory / WEIGHTS} is corrupt or truncated ({err}); re-train or re-download it.") from err
    except RuntimeError as err:
        raise CheckpointError(
            f"the weights in {directory / WEIGHTS} do not match its config.json ({str(err).splitlines()[0]}); "
            "the folder mixes files from different models."
        ) from err
    model.to(device).eval()
    state = None
    if load_trainer_state and (directory / TRAINER_STATE).is_file():
        state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    return Checkpoint(model, tokenizer, config, meta, state, directory)


def _existing(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"no checkpoint folder at {directory}: train one with `python -m llmlab train --out {directory}` "
            "or leave --checkpoint out to use the built-in model."
        )
    missing = [name for name in (WEIGHTS, CONFIG, TOKENIZER) if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory} is an incomplete checkpoint: missing {', '.join(missing)}.")
    return directory

"""Checkpoints: a folder with safetensors weights, a JSON config and the tokenizer.

Taught in notebook 07 (training).  Layout of a checkpoint folder::

    model.safetensors   the weights (a tied LM head is stored once)
    config.json         the ModelConfig, what wrote it, and the sha256 of the tokenizer
    tokenizer.json      the BPE tokenizer (human-readable)
    trainer_state.pt    optional: optimizer, step, random state, history (to resume)

A checkpoint is written into a temporary folder first and then swapped into
place, so a crash mid-write never leaves a half-written checkpoint behind and
never damages the previous one.  Only a checkpoint of ours (or an empty folder)
is ever replaced: a file, or a folder holding anything else, is refused before
any work starts (:func:`check_output_dir`).  ``config.json`` records the
tokenizer's sha256, so weights are never decoded with another tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from llmlab.config import ConfigError, ModelConfig
from llmlab.errors import LlmlabError
from llmlab.tokenizer import BPETokenizer, TokenizerError

WEIGHTS, CONFIG, TOKENIZER, TRAINER_STATE = "model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"
FORMAT = "llmlab-checkpoint"
TOKENIZER_HASH = "tokenizer_sha256"
"""Key in ``config.json`` binding the weights to their tokenizer (see :func:`tokenizer_sha256`)."""
BUILTIN = "course-tiny-shakespeare"
"""Name of the checkpoint shipped inside the package (``llmlab/assets/``)."""
_OURS = frozenset({WEIGHTS, CONFIG, TOKENIZER, TRAINER_STATE})


class CheckpointError(LlmlabError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match (the message says what to do)."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, no permission); whatever was there before is intact."""


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


def tokenizer_sha256(tokenizer: BPETokenizer) -> str:
    """The sha256 of a tokenizer's canonical JSON: its tokens by id, special tokens and regex (notebook 07).

    Two tokenizers with the same hash encode and decode every text alike; the
    name and the file's layout do not count.
    """
    if not isinstance(tokenizer, BPETokenizer):
        raise CheckpointError(f"tokenizer must be a BPETokenizer, got {type(tokenizer).__name__}.")
    canonical = {
        "pattern": tokenizer.pattern,
        "tokens": sorted([i, b.hex()] for b, i in tokenizer.ranks.items()),
        "special_tokens": sorted([i, s] for s, i in tokenizer.special_tokens.items()),
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- where a checkpoint may be written -----------------------------------------------------------


def _as_path(value: Any, what: str = "checkpoint folder") -> Path:
    """``value`` as a Path, or CheckpointError when it is not a usable path."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes) or not isinstance(value, str):
        raise CheckpointError(
            f"the {what} must be a path (str or pathlib.Path), got {value!r} ({type(value).__name__})."
        )
    if not value.strip() or "\0" in value:
        raise CheckpointError(
            f"the {what} path {value!r} is empty or has a NUL byte: give a folder name such as runs/mine."
        )
    return Path(value)


def _is_our_config(path: Path) -> bool:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(info, dict) and info.get("format") == FORMAT


def _foreign_entries(directory: Path) -> list[str]:
    """What in an existing folder is not part of an llmlab checkpoint (empty list: safe to replace)."""
    names = sorted(p.name for p in directory.iterdir())
    if not names:
        return []
    foreign = [n for n in names if n not in _OURS or not (directory / n).is_file()]
    if not foreign and not _is_our_config(directory / CONFIG):
        foreign = [CONFIG if CONFIG in names else f"no {CONFIG}"]
    return foreign


def _check_parents(directory: Path) -> None:
    """The nearest existing parent of ``directory`` must be a writable folder."""
    for parent in directory.absolute().parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise CheckpointError(
                    f"{parent} is a file, so the checkpoint folder {directory} cannot be created inside it: "
                    "choose an output folder whose parents are folders."
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CheckpointError(
                    f"cannot write the checkpoint {directory}: {parent} is not writable. "
                    "Choose an output folder you can write to."
                )
            return


def check_output_dir(directory: str | os.PathLike) -> Path:
    """Check, before any long work, that a checkpoint can be written at ``directory``; return it as a Path.

    Refused with :class:`CheckpointError`: a path that is a file, a folder holding
    anything but an llmlab checkpoint, a path under a file, an unwritable parent.
    Taught in notebook 07.
    """
    directory = _as_path(directory)
    if os.path.lexists(directory):
        if not directory.is_dir():
            raise CheckpointError(
                f"{directory} exists and is not a folder: llmlab never replaces it. "
                "Choose another output folder, or move the file away yourself."
            )
        try:
            foreign = _foreign_entries(directory)
        except OSError as err:
            raise CheckpointError(f"cannot read the folder {directory} ({err}): choose another output folder.") from err
        if foreign:
            shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
            raise CheckpointError(
                f"{directory} already holds something that is not an llmlab checkpoint ({shown}): llmlab never "
                "replaces it. Choose another output folder, or empty this one yourself."
            )
    _check_parents(directory)
    return directory


# -- saving --------------------------------------------------------------------------------------


def _model_config(model: Any) -> ModelConfig:
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(config, ModelConfig):
        raise CheckpointError(
            f"model must be an llmlab Transformer (a torch.nn.Module with a ModelConfig .config), "
            f"got {type(model).__name__}."
        )
    return config


def _check_vocab(tokenizer: BPETokenizer, config: ModelConfig, where: str) -> None:
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {tokenizer.vocab_size:,} ids but the model's vocab_size is "
            f"{config.vocab_size:,}: they do not belong together. Use the tokenizer the model was built for."
        )


def _config_json(config: ModelConfig, tokenizer: BPETokenizer, meta: Any) -> str:
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"meta must be a dict or None, got {type(meta).__name__}.")
    info = {"format": FORMAT, "version": 1, "model": config.to_dict(), TOKENIZER_HASH: tokenizer_sha256(tokenizer),
            "meta": meta or {}}
    try:
        return json.dumps(info, indent=2) + "\n"
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"meta must hold only JSON values (numbers, strings, lists, dicts): {err}.") from err


def _write_files(folder: Path, model: torch.nn.Module, tokenizer: BPETokenizer, config_text: str,
                 trainer_state: dict[str, Any] | None) -> None:
    from safetensors.torch import save_model

    save_model(model, str(folder / WEIGHTS), metadata={"format": FORMAT})
    (folder / CONFIG).write_text(config_text, encoding="utf-8")
    tokenizer.save(folder / TOKENIZER)
    if trainer_state is not None:
        torch.save(trainer_state, folder / TRAINER_STATE)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Replace ``target`` (an old checkpoint of ours, an empty folder, or nothing) by ``tmp``."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous checkpoint back
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(old):
        warnings.warn(f"could not remove the previous checkpoint's copy {old}: delete it yourself.", stacklevel=3)


def save_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: BPETokenizer,
    *,
    meta: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (see the module docstring) and return its path.

    Only an earlier llmlab checkpoint or an empty folder is replaced (:func:`check_output_dir`);
    a failed write raises :class:`CheckpointWriteError` and leaves what was there intact.
    """
    directory = check_output_dir(directory)
    config = _model_config(model)
    if not isinstance(tokenizer, BPETokenizer):
        raise CheckpointError(f"tokenizer must be a BPETokenizer, got {type(tokenizer).__name__}.")
    _check_vocab(tokenizer, config, f"cannot save {directory}")
    if trainer_state is not None and not isinstance(trainer_state, dict):
        raise CheckpointError(f"trainer_state must be a dict or None, got {type(trainer_state).__name__}.")
    config_text = _config_json(config, tokenizer, meta)
    target = directory.resolve() if directory.is_symlink() else directory  # write through a link, keep the link
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        _write_files(tmp, model, tokenizer, config_text, trainer_state)
        _swap_into_place(tmp, target)
    except OSError as err:
        raise CheckpointWriteError(
            f"could not write the checkpoint {directory} ({err}); what was there before is unchanged. "
            "Free some space or choose another output folder."
        ) from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


# -- reading -------------------------------------------------------------------------------------


def _read_info(directory: Path) -> dict[str, Any]:
    """``config.json`` as a dict, checked to be ours and well formed."""
    path = directory / CONFIG
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CheckpointError(f"cannot read {path} ({err}): check its permissions.") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}); the checkpoint cannot be used.") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(f"{path} is not an llmlab checkpoint config (format {found!r}).")
    digest = info.get(TOKENIZER_HASH)
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise CheckpointError(f"{path} is corrupt ({TOKENIZER_HASH} is {digest!r}); the checkpoint cannot be used.")
    if not isinstance(info.get("meta", {}), dict):
        raise CheckpointError(f"{path} is corrupt (meta is not a JSON object); the checkpoint cannot be used.")
    return info


def _model_config_of(directory: Path, info: dict[str, Any]) -> ModelConfig:
    try:
        return ModelConfig.from_dict(info["model"])
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise CheckpointError(f"{directory / CONFIG} is corrupt ({err}); the checkpoint cannot be used.") from err


def read_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig and metadata of a checkpoint folder, without loading weights (see :func:`verify_checkpoint`)."""
    directory = _existing(directory)
    info = _read_info(directory)
    return _model_config_of(directory, info), info.get("meta", {})


def _bound_tokenizer(directory: Path, info: dict[str, Any], config: ModelConfig) -> BPETokenizer:
    """The folder's tokenizer, checked against the model's vocabulary and the recorded sha256."""
    try:
        tokenizer = BPETokenizer.load(directory / TOKENIZER)
    except (TokenizerError, OSError) as err:
        raise CheckpointError(f"the tokenizer of {directory} is unusable: {err}") from err
    _check_vocab(tokenizer, config, str(directory))
    expected = info.get(TOKENIZER_HASH)
    if expected is not None and tokenizer_sha256(tokenizer) != expected:
        raise CheckpointError(
            f"{directory / TOKENIZER} is not the tokenizer these weights were trained with (its sha256 differs from "
            f"the one in {CONFIG}): the folder mixes files from different runs. Put back the original "
            f"{TOKENIZER}, or train again."
        )
    return tokenizer


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in a safetensors file, from its header (no data is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt or truncated ({err}); re-train or re-download it.") from err


def _check_weights(path: Path, config: ModelConfig) -> None:
    """The tensors in ``path`` must be exactly the model's (a tied matrix stored once), shape for shape."""
    from llmlab.model import Transformer

    shapes = _weight_shapes(path)
    with torch.device("meta"):  # shapes only: no memory, no time
        params = Transformer(config).state_dict(keep_vars=True)
    stored = {id(params[name]) for name in shapes if name in params}
    problems = [f"unexpected {name}" for name in shapes if name not in params]
    problems += [f"{name} is {list(shapes[name])}, expected {list(params[name].shape)}"
                 for name in shapes if name in params and shapes[name] != tuple(params[name].shape)]
    problems += [f"missing {name}" for name, p in params.items() if name not in shapes and id(p) not in stored]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; … ({len(problems)} problems)" if len(problems) > 3 else "")
        raise CheckpointError(
            f"the weights in {path} do not match its config.json ({shown}); "
            "the folder mixes files from different models."
        )


def _inspect(directory: Path) -> tuple[ModelConfig, dict[str, Any], BPETokenizer]:
    """Config, metadata and bound tokenizer of an existing folder, after checking the weights' header."""
    info = _read_info(directory)
    config = _model_config_of(directory, info)
    tokenizer = _bound_tokenizer(directory, info, config)
    _check_weights(directory / WEIGHTS, config)
    return config, info.get("meta", {}), tokenizer


def verify_checkpoint(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """Check a checkpoint folder without loading its weights; return its ModelConfig and metadata.

    Checked: the three files exist, ``config.json`` is ours, the tokenizer loads, has the
    model's vocabulary size and the recorded sha256, and the weights file's header lists
    exactly the model's tensors with the right shapes (notebook 07).
    """
    config, meta, _ = _inspect(_existing(directory))
    return config, meta


def _target_device(device: Any) -> torch.device:
    """The device to load onto, checked before any file is read (a bad device is not a bad file)."""
    from llmlab.runtime import device as resolve

    if not isinstance(device, (str, torch.device)) or (isinstance(device, str) and not device.strip()):
        raise CheckpointError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}.")
    return resolve(device)  # its own errors (llmlab.runtime.DeviceError) say what to use instead


def _read_trainer_state(directory: Path) -> dict[str, Any] | None:
    path = directory / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle fails in many ways (struct.error, EOFError, UnpicklingError, …)
        raise CheckpointError(
            f"{path} is corrupt ({str(err).splitlines()[0] if str(err) else type(err).__name__}): the weights are "
            "fine, but the run cannot be resumed from here; load it without the trainer state or start a new run."
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a trainer state (a {type(state).__name__}): the run cannot be resumed.")
    return state


def _read_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(model, str(path), strict=True, device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is corrupt or truncated ({err}); re-train or re-download it.") from err
    except RuntimeError as err:
        raise CheckpointError(
            f"the weights in {path} do not match its config.json ({str(err).splitlines()[0]}); "
            "the folder mixes files from different models."
        ) from err


def load_checkpoint(
    directory: str | os.PathLike | None = None, device: torch.device | str = "cpu", load_trainer_state: bool = False
) -> Checkpoint:
    """Load a checkpoint folder (default: the built-in model) onto ``device``.

    Every failure is a :class:`CheckpointError` naming the folder and the problem;
    the device is checked first, and a file is called corrupt only when reading it failed.
    """
    from llmlab.model import Transformer

    target = _target_device(device)
    if not isinstance(load_trainer_state, bool):
        raise CheckpointError(f"load_trainer_state must be True or False, got {load_trainer_state!r}.")
    directory = _existing(builtin_checkpoint() if directory is None else directory)
    config, meta, tokenizer = _inspect(directory)
    model = Transformer(config)
    _read_weights(model, directory / WEIGHTS)
    try:
        model.to(target).eval()
    except RuntimeError as err:
        raise CheckpointError(
            f"the weights of {directory} are fine, but moving them to {target} failed: {err}"
        ) from err
    state = _read_trainer_state(directory) if load_trainer_state else None
    return Checkpoint(model, tokenizer, config, meta, state, directory)


def _existing(directory: str | os.PathLike) -> Path:
    directory = _as_path(directory)
    if os.path.lexists(directory) and not directory.is_dir():
        raise CheckpointError(
            f"{directory} is a file, not a checkpoint folder: give the folder that holds "
            f"{WEIGHTS}, {CONFIG} and {TOKENIZER}."
        )
    if not directory.is_dir():
        raise CheckpointError(
            f"no checkpoint folder at {directory}: train one with `python -m llmlab train --out {directory}` "
            "or leave --checkpoint out to use the built-in model."
        )
    missing = [name for name in (WEIGHTS, CONFIG, TOKENIZER) if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory} is an incomplete checkpoint: missing {', '.join(missing)}.")
    return directory

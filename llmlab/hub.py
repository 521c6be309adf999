"""Real pretrained checkpoints: a Hugging Face folder or hub id as an ordinary llmlab model.

Taught in notebook 14 (real pretrained checkpoints).  A checkpoint on the Hugging Face hub
is a folder of plain files, and each has one job here:

    config.json                     the shape  → llmlab.hf.config_from_hf → ModelConfig
    model.safetensors               the weights (or model-0000i-of-0000n.safetensors shards,
    model.safetensors.index.json      listed in the index) → read one tensor at a time
    generation_config.json          which ids end a reply (eos_token_id)
    tokenizer.json                  the tokenizer → the ``tokenizers`` library (GPT-2: tiktoken)
    tokenizer_config.json           special tokens, and the chat template (or chat_template.jinja)

:func:`load_pretrained` reads them all (downloading a hub id with ``huggingface_hub`` first)
and returns a :class:`Pretrained`: an ordinary :class:`llmlab.model.Transformer` — so
``llmlab.generate``, the serving engine, tensor parallelism and ``llmlab.calc`` work on it
unchanged — with its tokenizer, chat template and stop ids.  The weights are memory-mapped
(``safetensors.safe_open``) and put into a model built on the ``meta`` device tensor by
tensor (:func:`llmlab.hf.build_model`), so a model is never held twice while loading.

Families: GPT-2, Llama 2/3/3.1/3.2, Qwen2/Qwen2.5, Qwen3 (:data:`llmlab.hf.FAMILIES`).
Every bad input is a :class:`HubError` saying what is wrong and what to do.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmlab.config import ModelConfig
from llmlab.hf import (FAMILIES, HFConversionError, build_model, check_weights, config_from_hf, stored_dtype,
                       weight_plan)
from llmlab.model import Transformer
from llmlab.tokenizer import BPETokenizer, TokenizerError

CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")
DOWNLOAD_PATTERNS = (*CONFIG_FILES, *WEIGHT_FILES, *TOKENIZER_FILES)
"""What is downloaded of a hub repository: nothing else (no PyTorch ``.bin``, no duplicate original weights)."""

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "fp64": torch.float64, "float64": torch.float64}
"""Names ``dtype=`` and ``--dtype`` accept (``"auto"`` or None: as stored)."""

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The named special tokens a chat template sees (as ``transformers``' ``special_tokens_map``)."""


class HubError(HFConversionError):
    """A Hugging Face folder, hub id, file or tokenizer llmlab cannot load (the message says what to do)."""


class HubOfflineError(HubError):
    """A hub id given with no connection to the hub (or ``HF_HUB_OFFLINE=1``), and no copy in the cache."""


class ChatTemplateError(HubError):
    """A chat template that is missing, does not compile, or refuses the conversation."""


# --- folders and hub ids ------------------------------------------------------------------


def resolve(name_or_path: str | os.PathLike, patterns: Sequence[str] = DOWNLOAD_PATTERNS) -> Path:
    """The local folder of a checkpoint: ``name_or_path`` itself, or a hub id downloaded (notebook 14).

    A hub id (``Qwen/Qwen2.5-0.5B-Instruct``) is fetched with ``huggingface_hub.snapshot_download``
    into its standard cache (``HF_HOME``), with a progress bar; only the files matching
    ``patterns`` are downloaded, and a second call finds them there.  With no connection (or
    ``HF_HUB_OFFLINE=1``) and nothing cached, :class:`HubOfflineError` says which files to get
    by hand and where to put them.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HubError(f"{text!r} is a file, not a folder: give the folder that holds config.json and the "
                       "*.safetensors weights.")
    if not _is_repo_id(text):
        raise HubError(f"{text!r} is not a folder: give the folder save_pretrained() wrote (config.json, "
                       "*.safetensors, tokenizer.json), or a hub id such as Qwen/Qwen2.5-0.5B-Instruct.")
    return _download(text, patterns)


def _is_repo_id(text: str) -> bool:
    """Whether ``text`` is spelled like a hub id (``name`` or ``owner/name``) rather than a path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.startswith((".", "~", os.sep)) or text.count("/") > 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _download(repo_id: str, patterns: Sequence[str]) -> Path:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=list(patterns)))
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its licence on https://huggingface.co/{repo_id} and log in "
                       "(hf auth login), or download its files on another machine and give the folder "
                       "(--model PATH).") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise HubError(f"there is no folder {repo_id!r} here and no model {repo_id!r} on the Hugging Face hub: "
                       "check the spelling (a private model also needs hf auth login).") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        offline = bool(constants.HF_HUB_OFFLINE) or isinstance(err, OfflineModeIsEnabled)
        raise HubOfflineError(offline_help(repo_id, "HF_HUB_OFFLINE=1 is set" if offline
                                           else "the Hugging Face hub cannot be reached")) from None
    except _network_errors(HfHubHTTPError) as err:
        raise HubOfflineError(offline_help(repo_id, f"the download failed ({type(err).__name__}: {err})")) from None


def _network_errors(*known: type[Exception]) -> tuple[type[Exception], ...]:
    """What a failed download raises: the hub's errors, OSError, and its HTTP client's (httpx or requests)."""
    import importlib

    errors = [*known, OSError]
    for module, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def offline_help(repo_id: str, reason: str) -> str:
    """What to do when ``repo_id`` cannot be downloaded: which files, where to put them, how to pass them."""
    folder = f"models/{repo_id.rsplit('/', 1)[-1]}"
    return (f"cannot download {repo_id}: {reason}, and the Hugging Face cache ({_cache_dir()}) has no copy. "
            f"On a machine with internet, get these files from https://huggingface.co/{repo_id}/tree/main: "
            "config.json (and generation_config.json, if there is one); model.safetensors, or "
            "model.safetensors.index.json with every model-*-of-*.safetensors shard it lists; tokenizer.json and "
            "tokenizer_config.json (and chat_template.jinja, if there is one). "
            f"Put them in one folder, e.g. {folder} (hf download {repo_id} --local-dir {folder} does it), and give "
            f"that folder instead of the hub id: --model PATH takes a local folder, e.g. "
            f"llmlab generate --model {folder} \"Hello\".")


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a Hugging Face folder, as a dict (errors name the folder and the problem)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{os.fspath(folder)!r} is not a folder: give the folder save_pretrained() wrote.")
    path = folder / "config.json"
    if not path.is_file():
        raise HubError(f"{os.fspath(folder)!r} has no config.json: it is not a Hugging Face model folder (it needs "
                       "config.json, the *.safetensors weights and tokenizer.json, as the hub has them).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HubError(f"{path} is not valid JSON ({err}): download it again.") from None
    except OSError as err:
        raise HubError(f"cannot read {path} ({err.strerror or err}): check its permissions.") from None
    if not isinstance(data, dict):
        raise HubError(f"{path} is not valid JSON of a config (a {type(data).__name__}, not an object).")
    if data.get("format") == "llmlab-checkpoint":
        raise HubError(f"{os.fspath(folder)!r} is an llmlab checkpoint, not a Hugging Face one: load it with "
                       "llmlab.checkpoint.load_checkpoint (on the command line: --checkpoint).")
    return data


def read_config(folder: str | os.PathLike, name: str | None = None) -> ModelConfig:
    """The llmlab ``ModelConfig`` of a Hugging Face folder's ``config.json`` (notebook 14); ``name``: the folder's."""
    return config_from_hf(read_hf_config(folder), name or default_name(folder))


def default_name(name_or_path: str | os.PathLike) -> str:
    """What a checkpoint is called: its folder's name, or the last part of its hub id (``Llama-3.2-1B``)."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    return (path.resolve().name if path.is_dir() else text.rstrip("/").rsplit("/", 1)[-1]) or "hf-model"


# --- weights ------------------------------------------------------------------------------


class SafetensorsFolder:
    """The tensors of a folder's safetensors file(s), memory-mapped: names and shapes from the headers,
    each tensor read when asked for (a :class:`llmlab.hf.TensorSource`).

    ``model.safetensors``, or the shards ``model.safetensors.index.json`` lists.  A missing,
    truncated or corrupt file is a :class:`HubError` naming it.  Use it in a ``with`` block, or
    call :meth:`close`.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        for path, names in self._files().items():
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                self.close()
                raise HubError(f"cannot read {path}: {err}. The file is missing, truncated or corrupt: download "
                               "it again.") from None
            self._handles[path] = handle
            held = set(handle.keys())
            for name in held if names is None else names:
                if name not in held:
                    self.close()
                    raise HubError(f"{self.folder / 'model.safetensors.index.json'} puts {name!r} in {path.name}, "
                                   "which does not hold it: the shards and the index are from different "
                                   "downloads; download them again.")
                self._where[name] = path

    def _files(self) -> dict[Path, list[str] | None]:
        """Each weight file, with the names the index puts in it (None: all of a single file)."""
        single, index = self.folder / "model.safetensors", self.folder / "model.safetensors.index.json"
        if single.is_file():
            return {single: None}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files: dict[Path, list[str] | None] = {}
                for name, shard in weight_map.items():
                    files.setdefault(self.folder / shard, []).append(name)
                return files
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
                raise HubError(f"{index} is not a valid shard index ({err!r}): download it again.") from None
        shards = sorted(p.name for p in self.folder.glob("*.safetensors"))
        others = sorted(p.name for p in self.folder.glob("*.bin"))
        if shards:
            hint = (f" (found {', '.join(shards[:3])}{' …' if len(shards) > 3 else ''} but no "
                    "model.safetensors.index.json, which says which tensor is in which shard: download it too)")
        elif others:
            hint = (f" (found {', '.join(others[:3])}: PyTorch pickles, which llmlab does not load; get the "
                    "*.safetensors files, or re-save with save_pretrained(safe_serialization=True))")
        else:
            hint = ": download the weights (model.safetensors, or the index and its shards) into it"
        raise HubError(f"{os.fspath(self.folder)!r} has no model.safetensors{hint}.")

    def names(self) -> Iterable[str]:
        return self._where.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        kind = self._handles[self._where[name]].get_slice(name).get_dtype()
        if kind not in _SAFETENSORS_DTYPES:
            raise HubError(f"{name} is stored as {kind}; llmlab loads float weights (F32, BF16, F16): a quantized "
                           "checkpoint? Use the model's unquantized release.")
        return _SAFETENSORS_DTYPES[kind]

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self._handles[self._where[name]].get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise HubError(f"cannot read {name} from {self._where[name]}: {err}. The file is damaged: download "
                           "it again.") from None

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> SafetensorsFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", *,
               dtype: str | torch.dtype | None = None, name: str | None = None) -> Transformer:
    """A Hugging Face checkpoint (folder or hub id) as an llmlab ``Transformer`` in eval mode (notebook 14).

    ``dtype``: ``"fp32"``, ``"bf16"``, ``"fp16"`` (or a ``torch.dtype``); default: as stored.
    ``name`` names the config (default: the folder's name).  Only the model: for its tokenizer,
    chat template and stop ids too, use :func:`load_pretrained`.
    """
    folder = resolve(name_or_path)
    config = read_config(folder, name or default_name(name_or_path))
    device = torch.device(device)
    wanted = resolve_dtype(dtype)
    with SafetensorsFolder(folder) as source:
        wanted = wanted or stored_dtype(config, source)
        check_dtype_runs(wanted, device)
        return build_model(config, source, device, wanted)


def check_folder(name_or_path: str | os.PathLike) -> tuple[ModelConfig, Path, torch.dtype | None]:
    """Read a checkpoint's config and check its weights' names and shapes, reading no weight (notebook 14).

    Returns ``(config, folder, stored dtype)``; the dtype is None when the folder has no weights
    (a hub id is fetched without them: ``llmlab info`` sizes a model before downloading it).
    """
    folder = resolve(name_or_path, CONFIG_FILES)
    config = read_config(folder, default_name(name_or_path))
    if not any(folder.glob("*.safetensors")):
        return config, folder, None
    with torch.device("meta"):
        plan = weight_plan(Transformer(config))
    with SafetensorsFolder(folder) as source:
        check_weights(config, plan, source)
        return config, folder, stored_dtype(config, source)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` as a ``torch.dtype``: a name of :data:`DTYPES`, a float dtype, or None / ``"auto"`` (as stored)."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise HubError(f"dtype {dtype!r} is not one llmlab loads weights in: use fp32, bf16, fp16 (or fp64, for "
                   "checks), or auto for the stored one.")


def check_dtype_runs(dtype: torch.dtype, device: str | torch.device) -> None:
    """Raise :class:`HubError` when ``device`` cannot compute in ``dtype`` (tried on a tiny attention step).

    PyTorch runs fp16 and bf16 on CPUs too (slowly); what fails is refused with what to use instead,
    e.g. bf16 on a GPU older than Ampere, or fp64 on Apple's MPS.
    """
    device = torch.device(device)
    try:
        x = torch.ones(1, 1, 2, 8, dtype=dtype, device=device)
        torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
        torch.nn.functional.linear(x, torch.ones(8, 8, dtype=dtype, device=device)).softmax(-1)
    except (RuntimeError, TypeError) as err:
        name = next(key for key, value in DTYPES.items() if value == dtype)
        raise HubError(f"{device} cannot compute in {name} here ({str(err).splitlines()[0]}): choose another "
                       "dtype (--dtype fp32 works everywhere; fp16 on GPUs without bf16).") from None


# --- tokenizers ---------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's), character → byte, as ``tokenizers``' ByteLevel uses it.

    The 188 printable bytes stand for themselves; the other 68 (controls, space, …) for
    U+0100 onwards, in byte order, so that every token is printable text.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in table.values())})
    return table


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (run by the ``tokenizers`` library) with llmlab's tokenizer interface.

    ``encode`` gives the ids ``transformers``' tokenizer gives (special tokens in the text
    become their ids; ``add_special_tokens`` adds what the tokenizer adds, e.g. Llama's
    ``<|begin_of_text|>``); ``decode_bytes`` gives each token's raw bytes, so streamed text
    never shows half a character (notebook 08); ``special_tokens`` maps each special token to
    its id; ``eos_token`` / ``bos_token`` come from ``tokenizer_config.json``.
    """

    def __init__(self, tokenizer: Any, *, named_tokens: Mapping[str, str] | None = None, name: str = "hf") -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.named_tokens = dict(named_tokens or {})
        added = tokenizer.get_added_tokens_decoder()
        self._added = {i: token.content for i, token in added.items()}
        self.special_tokens = {token.content: i for i, token in added.items() if token.special}
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1  # largest id + 1
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        self._bytes_of = self._byte_level if "ByteLevel" in kinds else (
            self._byte_fallback if "ByteFallback" in kinds else self._decoded)
        self._alphabet = _byte_level_alphabet()

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @property
    def eos_token(self) -> str | None:
        return self.named_tokens.get("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self.named_tokens.get("bos_token")

    @property
    def eot_id(self) -> int:
        """The id of the end-of-sequence token (``eos_token`` of ``tokenizer_config.json``)."""
        token = self.eos_token
        token_id = None if token is None else self.token_id(token)
        if token_id is None:
            raise TokenizerError("this tokenizer names no end-of-sequence token (eos_token in "
                                 "tokenizer_config.json); give the stop ids yourself (SamplingParams(stop_ids=...)).")
        return token_id

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, special_tokens={len(self.special_tokens)})"

    def encode(self, text: str, *, allowed_special: str | Iterable[str] = "all",
               add_special_tokens: bool = True) -> list[int]:
        """The ids of ``text``, as ``transformers``' tokenizer gives them.

        ``allowed_special="all"`` (default, as ``transformers``) reads special-token text
        (``<|im_end|>``) as the special token; an empty set reads it as ordinary characters.
        ``add_special_tokens=False`` leaves out what the tokenizer adds around a text (a chat
        template writes those itself).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, not {type(text).__name__}.")
        if isinstance(allowed_special, str):
            if allowed_special != "all":
                raise TokenizerError(f"allowed_special is 'all' or an empty set, got {allowed_special!r}.")
            ordinary = False
        else:
            if list(allowed_special):
                raise TokenizerError("a Hugging Face tokenizer reads either all special tokens (allowed_special="
                                     "'all') or none (an empty set), not some.")
            ordinary = True
        saved = self.tokenizer.encode_special_tokens
        self.tokenizer.encode_special_tokens = ordinary
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as err:  # the Rust library reports bad text (lone surrogates) as a plain Exception
            raise TokenizerError(f"the text cannot be tokenized: {err}") from None
        finally:
            self.tokenizer.encode_special_tokens = saved

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, special tokens included (as ``transformers``' ``decode``)."""
        return self.tokenizer.decode(self._ids(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids``: a token may hold part of a UTF-8 character (an emoji, a Korean syllable)."""
        return b"".join(self._added[i].encode("utf-8") if i in self._added else self._bytes_of(i)
                        for i in self._ids(ids))

    def _ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        size = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < size or self.tokenizer.id_to_token(i) is None), None)
        if bad is not None:
            raise TokenizerError(f"token id {bad} is not in this tokenizer's vocabulary (ids 0..{size - 1}).")
        return ids

    def _byte_level(self, token_id: int) -> bytes:
        token = self.tokenizer.id_to_token(token_id)
        try:
            return bytes(self._alphabet[c] for c in token)
        except KeyError:  # a vocabulary entry written as plain text: the library decodes it
            return self._decoded(token_id)

    def _byte_fallback(self, token_id: int) -> bytes:  # SentencePiece style (Llama 2): ▁ is a space, <0x0A> a byte
        token = self.tokenizer.id_to_token(token_id)
        match = _BYTE_FALLBACK.fullmatch(token)
        return bytes([int(match.group(1), 16)]) if match else token.replace("▁", " ").encode("utf-8")

    def _decoded(self, token_id: int) -> bytes:
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` (empty when absent) with ``special_tokens_map.json`` filling its gaps."""
    config: dict[str, Any] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / file
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise HubError(f"{path} is not valid JSON ({err}): download it again.") from None
            if isinstance(data, dict):
                config.update({k: v for k, v in data.items() if v is not None})
    return config


def _named_tokens(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """``bos_token``, ``eos_token``, … as strings (the file writes a token as text or as ``{"content": …}``)."""
    named = {}
    for key in _SPECIAL_TOKEN_NAMES:
        value = tokenizer_config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            named[key] = value
    return named


def load_tokenizer(folder: str | os.PathLike, config: ModelConfig | None = None,
                   family: str | None = None) -> HFTokenizer | BPETokenizer:
    """The tokenizer of a Hugging Face folder (notebook 14).

    GPT-2's vocabulary (a ``gpt2`` model of 50,257 ids) goes through tiktoken, as in
    notebook 01 (``llmlab.tokenizer.gpt2_tokenizer``); every other tokenizer through its
    ``tokenizer.json`` and the ``tokenizers`` library.  With ``config``, a tokenizer whose ids
    do not fit the model's ``vocab_size`` is refused.
    """
    from llmlab.tokenizer import VocabularyUnavailableError, gpt2_tokenizer

    folder = Path(folder)
    path = folder / "tokenizer.json"
    if family == "gpt2" and config is not None and config.vocab_size == 50257:
        try:
            return gpt2_tokenizer()
        except VocabularyUnavailableError:
            if not path.is_file():
                raise
    if not path.is_file():
        raise HubError(f"{os.fspath(folder)!r} has no tokenizer.json: get it (and tokenizer_config.json) from the "
                       "model's page on the hub into the same folder.")
    from tokenizers import Tokenizer

    try:
        inner = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust library's errors are plain Exceptions
        raise HubError(f"cannot read {path}: {str(err).splitlines()[0]}. It is truncated, corrupt or not a "
                       "tokenizers file: download it again.") from None
    tokenizer = HFTokenizer(inner, named_tokens=_named_tokens(_tokenizer_config(folder)), name=folder.resolve().name)
    if config is not None and tokenizer.vocab_size > config.vocab_size:
        raise HubError(f"{path} has ids up to {tokenizer.vocab_size - 1}, but the model has vocab_size="
                       f"{config.vocab_size} (ids 0..{config.vocab_size - 1}): this tokenizer belongs to another "
                       "model; get the tokenizer files of this one.")
    return tokenizer


# --- chat templates -----------------------------------------------------------------------


class ChatTemplate:
    """A checkpoint's chat template: the Jinja program that turns messages into the text the model was tuned on.

    Rendered as ``transformers``' ``apply_chat_template`` renders it (a sandboxed Jinja
    environment with the same settings, filters and functions, and the tokenizer's named
    special tokens as variables), so the text is the same (notebook 14).
    """

    def __init__(self, source: str, named_tokens: Mapping[str, str] | None = None,
                 origin: str = "the template") -> None:
        import jinja2

        self.source, self.origin = source, origin
        self.named_tokens = dict(named_tokens or {})
        try:
            self._template = _jinja_environment().from_string(source)
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"the chat template in {origin} does not compile ({err}): download it "
                                    "again.") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **variables: Any) -> str:
        """The text of ``messages`` (``[{"role": "user", "content": "Hi"}, …]``); with ``add_generation_prompt``
        it ends where the assistant's reply begins.  ``variables`` reach the template (e.g. ``enable_thinking``)."""
        import jinja2

        checked = _check_messages(messages)
        try:
            return self._template.render(messages=checked, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.named_tokens, **variables})
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"the chat template refused this conversation: {err}") from None


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                                f"{type(messages).__name__}.")
    checked = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ChatTemplateError(f"message {number} must be a dict with a 'role' and a 'content' string, got "
                                    f"{message!r}.")
        checked.append(dict(message))
    return checked


def _jinja_environment():
    """Jinja as ``transformers`` sets it up for chat templates: sandboxed, trimmed blocks, loop controls,
    a JSON ``tojson``, ``raise_exception`` and ``strftime_now``, and a ``{% generation %}`` block."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}…{% endgeneration %}`` marks the assistant's part for training; rendered as it is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlock, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment


def load_chat_template(folder: str | os.PathLike) -> ChatTemplate | None:
    """The chat template of a folder: ``chat_template.jinja``, else ``chat_template`` in
    ``tokenizer_config.json`` (or ``chat_template.json``); None for a base model that has none."""
    folder = Path(folder)
    config = _tokenizer_config(folder)
    named = _named_tokens(config)
    path = folder / "chat_template.jinja"
    if path.is_file():
        return ChatTemplate(path.read_text(encoding="utf-8"), named, str(path))
    source, origin = config.get("chat_template"), folder / "tokenizer_config.json"
    if source is None and (folder / "chat_template.json").is_file():
        origin = folder / "chat_template.json"
        try:
            source = json.loads(origin.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ChatTemplateError(f"{origin} is not valid JSON of a chat template ({err}).") from None
    if isinstance(source, list):  # several named templates: the default one
        source = next((t.get("template") for t in source if isinstance(t, Mapping) and t.get("name") == "default"),
                      None)
    if source is None:
        return None
    if not isinstance(source, str):
        raise ChatTemplateError(f"the chat_template in {origin} is not a string: download it again.")
    return ChatTemplate(source, named, str(origin))


# --- everything together ------------------------------------------------------------------


@dataclass
class Pretrained:
    """What :func:`load_pretrained` returns: the model, its tokenizer, chat template and stop ids."""

    model: Transformer
    tokenizer: HFTokenizer | BPETokenizer
    chat_template: ChatTemplate | None
    stop_ids: tuple[int, ...]
    folder: Path

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def check_chat_template(self) -> None:
        """Raise :class:`ChatTemplateError` when the checkpoint has no chat template (a base model)."""
        if self.chat_template is None:
            raise ChatTemplateError(f"{os.fspath(self.folder)!r} has no chat template (chat_template.jinja, or "
                                    "chat_template in tokenizer_config.json): a base model continues text; use "
                                    "llmlab generate, or an instruct/chat release of this model.")

    def chat_ids(self, messages: Sequence[Mapping[str, Any]], **variables: Any) -> list[int]:
        """The prompt ids of a conversation: its chat template rendered, ready for the assistant's reply."""
        self.check_chat_template()
        text = self.chat_template.render(messages, add_generation_prompt=True, **variables)
        return self.tokenizer.encode(text, add_special_tokens=False)


def load_pretrained(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", *,
                    dtype: str | torch.dtype | None = None, name: str | None = None) -> Pretrained:
    """A Hugging Face checkpoint (folder or hub id) ready to run: model, tokenizer, chat template, stop ids (notebook 14).

    >>> pre = load_pretrained("Qwen/Qwen2.5-0.5B-Instruct", dtype="bf16")      # doctest: +SKIP
    >>> ids = pre.chat_ids([{"role": "user", "content": "Hi!"}])                  # doctest: +SKIP
    >>> generate_ids(pre.model, ids, SamplingParams(stop_ids=pre.stop_ids))       # doctest: +SKIP

    Everything is checked before the weights are read: the tokenizer must fit the model's
    vocabulary.  ``stop_ids`` are the end-of-sequence ids of ``generation_config.json``,
    ``config.json`` and the tokenizer.
    """
    folder = resolve(name_or_path)
    name = name or default_name(name_or_path)
    data = read_hf_config(folder)
    config = read_config(folder, name)
    tokenizer = load_tokenizer(folder, config, data.get("model_type"))
    chat_template = load_chat_template(folder)
    model = load_model(folder, device, dtype=dtype, name=name)
    return Pretrained(model, tokenizer, chat_template, _stop_ids(folder, data, tokenizer, config), folder)


def greedy_on_ranks(name_or_path: str | os.PathLike, prompts: list[list[int]], max_new_tokens: int,
                    dtype: str | torch.dtype | None = None) -> list[list[int]]:
    """One rank's part of a tensor-parallel run of a real checkpoint (notebook 14): load it, split it over
    the ranks at load time (``llmlab.parallel.shard_model``), and continue ``prompts`` greedily.

    Run it on every rank with ``llmlab.parallel.run_parallel(greedy_on_ranks, 2, folder, prompts, 20)``:
    a notebook cannot define a function the spawned ranks can import, so it lives here.
    """
    from llmlab.generate import generate_many
    from llmlab.parallel import Comm, shard_model
    from llmlab.sampling import SamplingParams

    model = shard_model(load_model(name_or_path, dtype=dtype), Comm())
    return generate_many(model, prompts, SamplingParams(temperature=0, max_new_tokens=max_new_tokens))


def _stop_ids(folder: Path, data: Mapping[str, Any], tokenizer: Any, config: ModelConfig) -> tuple[int, ...]:
    """Every end-of-sequence id the checkpoint names (an instruct model often has several)."""
    found: list[Any] = [data.get("eos_token_id")]
    path = folder / "generation_config.json"
    if path.is_file():
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")).get("eos_token_id"))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise HubError(f"{path} is not valid JSON ({err}): download it again.") from None
    try:
        found.append(tokenizer.eot_id)
    except TokenizerError:
        pass
    ids: list[int] = []
    for value in found:
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < config.vocab_size \
                    and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


__all__ = [
    "ChatTemplate", "ChatTemplateError", "DTYPES", "FAMILIES", "HFTokenizer", "HubError", "HubOfflineError",
    "Pretrained", "SafetensorsFolder", "check_dtype_runs", "check_folder", "load_chat_template", "load_model",
    "default_name", "greedy_on_ranks", "load_pretrained", "load_tokenizer", "offline_help", "read_config", "read_hf_config", "resolve",
    "resolve_dtype",
]

"""Corpora (download, checksum, cache) and batches of token ids.

Taught in notebook 01 (where the corpus first appears) and notebook 07
(training batches).  A corpus is fetched once from its public address,
checked against its sha256 and cached in the user's cache folder
(``$LLMLAB_CACHE_DIR`` overrides it), so the course works offline afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_ENV = "LLMLAB_CACHE_DIR"
"""Environment variable that chooses the cache folder for downloads."""


@dataclass(frozen=True)
class Corpus:
    """A public text file: where it lives, what it must hash to, what to call it in the cache."""

    name: str
    url: str
    sha256: str
    filename: str


CORPORA: dict[str, Corpus] = {
    "tinyshakespeare": Corpus(
        name="tinyshakespeare",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
    ),
}


class DataError(RuntimeError):
    """A corpus could not be had; the message says what to do instead."""


class DownloadError(DataError):
    """The download failed (no network, unreachable host, HTTP error)."""


class ChecksumError(DataError):
    """A file's sha256 is not the one expected: it is damaged or not the right file."""


def cache_dir() -> Path:
    """The folder where downloads are kept: ``$LLMLAB_CACHE_DIR`` or the user's cache folder."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("llmlab"))


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest``, atomically, after checking its sha256.

    The bytes go to a temporary file beside ``dest`` and replace it only when
    complete and correct, so a failed or damaged download never overwrites a
    good file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    shutil.copyfileobj(response, out)
            except (urllib.error.URLError, OSError) as err:
                raise DownloadError(
                    f"could not download {url}: {getattr(err, 'reason', err)}.\n"
                    f"If you are offline, fetch the file elsewhere and either pass its path "
                    f"(load_corpus(path=...)) or copy it to {dest}."
                ) from err
        if sha256 is not None:
            got = sha256_of(tmp)
            if got != sha256:
                raise ChecksumError(
                    f"the file downloaded from {url} has sha256 {got}, expected {sha256}: "
                    "it is damaged or not the expected file, so it was not kept. "
                    "Try again, or check the address."
                )
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def corpus_path(name: str = "tinyshakespeare", url: str | None = None) -> Path:
    """The cached file of a known corpus, downloading it first if needed.

    ``url`` replaces the public address (a mirror); the sha256 check stays.
    A cached file that fails the check is fetched again.
    """
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; known corpora: {sorted(CORPORA)}. Or pass path=... to load_corpus.")
    corpus = CORPORA[name]
    path = cache_dir() / corpus.filename
    if path.is_file() and sha256_of(path) == corpus.sha256:
        return path
    return download(url or corpus.url, path, corpus.sha256)


def load_corpus(name: str = "tinyshakespeare", *, path: str | os.PathLike | None = None, url: str | None = None) -> str:
    """The text of a corpus: from ``path`` if given, else from the cache (downloading once)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"no corpus file at {path}: check the path.")
    else:
        path = corpus_path(name, url)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}).") from err


# ----------------------------------------------------------------------------
# Token ids → training batches (notebook 07)
# ----------------------------------------------------------------------------


def train_val_split(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D id tensor into a leading train part and a trailing validation part."""
    if ids.ndim != 1:
        raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    n_train = int(len(ids) * (1.0 - val_fraction))
    return ids[:n_train], ids[n_train:]


def random_batch(
    ids: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block_size`` ids and the same windows shifted by one.

    ``y[b, t]`` is the token that follows ``x[b, t]``: next-token prediction.
    """
    if len(ids) <= block_size:
        raise ValueError(
            f"the data has {len(ids)} tokens, too few for windows of block_size={block_size} "
            "(need at least block_size + 1)."
        )
    starts = torch.randint(0, len(ids) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size)
    x = ids[starts[:, None] + offsets]
    y = ids[starts[:, None] + offsets + 1]
    return x, y

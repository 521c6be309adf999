"""Corpora (download, checksum, cache) and batches of token ids.

Taught in notebook 01 (where the corpus first appears) and notebook 07
(training batches).  A corpus is fetched once from its public address,
checked against its sha256 and cached in the user's cache folder
(``$LLMLAB_CACHE_DIR`` overrides it), so the course works offline afterwards.

Nothing a user made is lost: a download replaces its destination only when
complete and correct, and a file already there with other contents (a damaged
cache, a user's own copy) is first kept beside it as ``<name>.sha256-<hash>.bad``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import reprlib
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from llmlab.errors import LlmlabError, require_finite

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


class DataError(LlmlabError, RuntimeError):
    """A corpus could not be had, or an argument was wrong; the message says what to do instead."""


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


class BatchError(LlmlabError, ValueError):
    """Token ids cannot be split or cut into the batches asked for (notebook 07)."""


class KeptFileWarning(UserWarning):
    """A file that stood where a fresh one was written was kept beside it (the message says where)."""


# ----------------------------------------------------------------------------
# Files: checksums, output paths, keeping what was there
# ----------------------------------------------------------------------------


def as_path(name: str, value, error: type[Exception] = DataError) -> Path:
    """``value`` as a :class:`Path`, or ``error`` naming ``name`` (not a str/path, empty, or a NUL byte)."""
    if not isinstance(value, (str, os.PathLike)):
        raise error(
            f"{name} must be a file path (str or pathlib.Path), got {reprlib.repr(value)} ({type(value).__name__})."
        )
    text = os.fspath(value)
    if not isinstance(text, str) or not text or "\0" in text:
        raise error(f"{name} must be a non-empty file path without NUL characters, got {reprlib.repr(value)}.")
    return Path(text)


def check_output_file(path: str | os.PathLike, what: str = "the file", error: type[Exception] = DataError,
                      name: str = "path") -> Path:
    """``path`` if a file can be written there, else ``error`` saying why and what to do (nothing is created).

    Refused: a folder, something that is not a regular file (``/dev/null``), and a
    path below a regular file (``notes.txt/out.json``).  Missing parent folders
    are fine: writers create them.
    """
    path = as_path(name, path, error)
    try:
        if path.is_dir():
            raise error(
                f"cannot write {what} to {path}: it is a folder. Give a file path inside it, e.g. {path / 'name'}."
            )
        if path.exists() and not path.is_file():
            raise error(f"cannot write {what} to {path}: it exists and is not a regular file. Choose another path.")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise error(
                        f"cannot write {what} to {path}: {parent} is a file, not a folder. Choose a path "
                        f"inside a folder, or move {parent} away first (llmlab never replaces it)."
                    )
                break
    except OSError as err:
        raise error(f"cannot write {what} to {path}: {err.strerror or err}. Choose another path.") from err
    return path


def make_parent(path: Path, what: str = "the file", error: type[Exception] = DataError) -> None:
    """Create ``path``'s folder (and its parents), or ``error`` naming the folder and the reason."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise error(
            f"cannot write {what} to {path}: the folder {path.parent} cannot be created "
            f"({err.strerror or err}). Choose another path."
        ) from err


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside the llmlab package."""
    package = os.path.dirname(__file__) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def kept_name(path: Path, digest: str) -> Path:
    """Where a file with sha256 ``digest`` is kept when a fresh copy takes its place."""
    return path.with_name(f"{path.name}.sha256-{digest[:12]}.bad")


def keep_aside(path: Path, digest: str) -> Path:
    """Move the file at ``path`` (sha256 ``digest``) to :func:`kept_name` and return that path."""
    kept = kept_name(path, digest)
    os.replace(path, kept)
    return kept


def damaged_note(path: Path, got: str, expected: str) -> str:
    """One sentence saying that the file at ``path`` has the wrong sha256 (both hashes)."""
    return (
        f"The file already at {path} has sha256 {got}, expected {expected}: it is damaged or another file. "
        "It was left in place (nothing was deleted)."
    )


def _check_download_args(url, dest, sha256, timeout) -> tuple[Path, float]:
    if not isinstance(url, str) or not url.strip():
        raise DataError(f"url must be a non-empty str such as 'https://…/file.txt', got {reprlib.repr(url)}.")
    if sha256 is not None and (
        not isinstance(sha256, str) or not sha256 or any(c not in "0123456789abcdefABCDEF" for c in sha256)
    ):
        raise DataError(f"sha256 must be None or a hex digest (str), got {reprlib.repr(sha256)}.")
    timeout = require_finite("timeout", timeout, error=DataError)
    if timeout <= 0:
        raise DataError(f"timeout must be > 0 seconds, got {timeout}.")
    return check_output_file(dest, "the download", DataError, name="dest"), timeout


def _fetch(url: str, out, timeout: float, dest: Path, sha256: str | None) -> None:
    """Copy ``url`` into the open file ``out``; network failures and disk failures say which they are."""
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except ValueError as err:  # "unknown url type", a host name that is not ASCII, ...
        raise DownloadError(f"cannot download {url!r}: {err}. Give a full address such as 'https://…'.") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not download {url}: {reason}. {_what_to_do(dest, sha256)}") from err
    with response:
        while True:
            try:
                chunk = response.read(1 << 20)
            except (http.client.HTTPException, OSError) as err:
                raise DownloadError(
                    f"could not download {url}: the connection broke ({err}). {_what_to_do(dest, sha256)}"
                ) from err
            if not chunk:
                return
            try:
                out.write(chunk)
            except OSError as err:
                raise DataError(
                    f"cannot write the download to {dest.parent}: {err.strerror or err}. "
                    "Free some space or choose another folder."
                ) from err


def _damaged_copy(dest: Path, sha256: str | None) -> str | None:
    """The sha256 of the file at ``dest`` if it fails the check ``sha256``; else None."""
    if sha256 is None or not dest.is_file():
        return None
    got = sha256_of(dest)
    return got if got != sha256 else None


def _what_to_do(dest: Path, sha256: str | None) -> str:
    """What to do when no good copy could be downloaded to ``dest`` (it depends on what is there now)."""
    got = _damaged_copy(dest, sha256)
    if got is not None:
        return (
            f"{damaged_note(dest, got, sha256)} Replace it with the right file (sha256 {sha256}), "
            f"or use it as it is with load_corpus(path='{dest}'); or try again when online "
            f"(it will then be kept as {kept_name(dest, got).name})."
        )
    return (
        "If you are offline, fetch the file elsewhere and either pass its path "
        f"(load_corpus(path=...)) or copy it to {dest}."
    )


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest``, atomically, after checking its sha256.

    The bytes go to a temporary file beside ``dest`` and replace it only when
    complete and correct, so a failed or damaged download never overwrites a
    good file.  A file already at ``dest`` with other contents is kept as
    ``<name>.sha256-<hash>.bad`` (with a :class:`KeptFileWarning`), never lost.
    """
    dest, timeout = _check_download_args(url, dest, sha256, timeout)
    sha256 = sha256.lower() if sha256 is not None else None
    make_parent(dest, "the download")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    except OSError as err:
        raise DataError(
            f"cannot write the download to {dest.parent}: {err.strerror or err}. Choose another folder."
        ) from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out, timeout, dest, sha256)
        got = sha256_of(tmp)
        if sha256 is not None and got != sha256:
            raise ChecksumError(
                f"the file downloaded from {url} has sha256 {got}, expected {sha256}: "
                "it is damaged or not the expected file, so it was not kept. "
                "Try again, or check the address."
                + (" " + _what_to_do(dest, sha256) if _damaged_copy(dest, sha256) else "")
            )
        _keep_existing(dest, got)
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def _keep_existing(dest: Path, new_digest: str) -> None:
    """Before a fresh file replaces ``dest``: keep a different file found there beside it, and say so."""
    if not dest.is_file():
        return
    old = sha256_of(dest)
    if old == new_digest:
        return
    kept = keep_aside(dest, old)
    warnings.warn(
        f"{dest} had sha256 {old}, not that of the fresh download ({new_digest}); "
        f"it was kept as {kept} (delete it if you do not need it).",
        KeptFileWarning,
        stacklevel=user_stacklevel(),
    )


def corpus_path(name: str = "tinyshakespeare", url: str | None = None) -> Path:
    """The cached file of a known corpus, downloading it first if needed.

    ``url`` replaces the public address (a mirror); the sha256 check stays.
    A cached file that fails the check is fetched again; the damaged copy is
    kept as ``<name>.sha256-<hash>.bad`` beside it (a :class:`KeptFileWarning`
    says so), or left in place if no fresh copy can be had (the error says so).
    """
    if not isinstance(name, str) or name not in CORPORA:
        raise DataError(
            f"unknown corpus {reprlib.repr(name)}; known corpora: {sorted(CORPORA)}. Or pass path=... to load_corpus."
        )
    if url is not None and not isinstance(url, str):
        raise DataError(f"url must be None or an address (str), got {reprlib.repr(url)} ({type(url).__name__}).")
    corpus = CORPORA[name]
    path = cache_dir() / corpus.filename
    try:
        check_output_file(path, f"the {name} corpus")
    except DataError as err:
        raise DataError(f"{err} Or set ${CACHE_ENV} to another cache folder.") from None
    if path.is_file() and sha256_of(path) == corpus.sha256:
        return path
    return download(url or corpus.url, path, corpus.sha256)


def load_corpus(name: str = "tinyshakespeare", *, path: str | os.PathLike | None = None, url: str | None = None) -> str:
    """The text of a corpus: from ``path`` if given, else from the cache (downloading once)."""
    if path is not None:
        path = as_path("path", path)
        if path.is_dir():
            raise DataError(f"{path} is a folder, not a corpus file: pass the path of a UTF-8 text file.")
        if not path.is_file():
            raise DataError(f"no corpus file at {path}: check the path.")
    else:
        path = corpus_path(name, url)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}): save it as UTF-8 and try again.") from err
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}.") from err


# ----------------------------------------------------------------------------
# Token ids → training batches (notebook 07)
# ----------------------------------------------------------------------------


def train_val_split(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D id tensor into a leading train part and a trailing validation part."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1:
        got = f"shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise BatchError(f"expected a 1-D tensor of token ids, got {got}: e.g. torch.tensor(tok.encode(text)).")
    val_fraction = require_finite("val_fraction", val_fraction, error=BatchError)
    if not 0.0 < val_fraction < 1.0:
        raise BatchError(f"val_fraction must be in (0, 1), got {val_fraction}.")
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

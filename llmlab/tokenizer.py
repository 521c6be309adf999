"""Tokenizers: byte-level BPE (train / encode / decode / save / load), special
tokens, the bridge to tiktoken, GPT-2's vocabulary, and the word-level toy
vocabulary of the first lessons.

Taught in notebook 01 (tokenization).

The BPE here is deliberately the same algorithm as tiktoken's, written in plain
Python so it can be read:

1. *Pre-tokenize*: a regex splits text into pieces (words with their leading
   space, runs of digits, punctuation, whitespace).  Merges never cross pieces.
2. *Bytes*: each piece becomes its UTF-8 bytes; the 256 byte values are the
   first 256 tokens, so any text can be encoded (no "unknown" token).
3. *Merge by rank*: repeatedly join the adjacent pair whose concatenation has
   the lowest rank (the earliest learned merge) until no pair is a token.

Because GPT-2's vocabulary is just such a rank table, loading its ranks into
:class:`BPETokenizer` gives exactly tiktoken's ids.
"""

from __future__ import annotations

import collections
import json
import os
import re as std_re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import regex

GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
"""GPT-2's pre-tokenization regex (as tiktoken writes it for ``r50k_base``)."""

ENDOFTEXT = "<|endoftext|>"
"""The special token that separates documents (GPT-2's id 50256)."""

GPT2_ENCODING = "r50k_base"
"""tiktoken's name for GPT-2's vocabulary."""

FILE_FORMAT = "llmlab-bpe"
FILE_VERSION = 1


class TokenizerError(ValueError):
    """A tokenizer was asked to do something it cannot (the message says what to do)."""


class TokenizerFileError(TokenizerError):
    """A tokenizer file is missing, truncated, corrupt or of another format."""


class VocabularyUnavailableError(RuntimeError):
    """A published vocabulary (e.g. GPT-2's) could not be fetched or read."""


# ----------------------------------------------------------------------------
# The core algorithm: rank-ordered byte-pair merging inside one piece.
# ----------------------------------------------------------------------------


def bpe_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode one pre-tokenized piece by merging the lowest-ranked adjacent pair first.

    This is the loop that turns ``b" unhappiness"`` into a few subword ids.
    A piece that is itself a token is returned at once (as tiktoken does).
    """
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


@dataclass
class _PairStats:
    """Pair counts over the distinct pre-tokenized words, kept up to date as merges happen."""

    words: list[list[int]]
    counts: list[int]
    pair_counts: collections.Counter = field(default_factory=collections.Counter)
    where: dict = field(default_factory=lambda: collections.defaultdict(set))

    def __post_init__(self) -> None:
        for w, (word, count) in enumerate(zip(self.words, self.counts)):
            self._add_word(w, word, count)

    def _add_word(self, w: int, word: list[int], count: int) -> None:
        for pair in zip(word, word[1:]):
            self.pair_counts[pair] += count
            self.where[pair].add(w)

    def _remove_word(self, w: int, word: list[int], count: int) -> None:
        for pair in zip(word, word[1:]):
            self.pair_counts[pair] -= count
            if self.pair_counts[pair] <= 0:
                del self.pair_counts[pair]

    def merge(self, pair: tuple[int, int], new_id: int) -> None:
        """Replace every occurrence of ``pair`` by ``new_id``, updating counts incrementally."""
        a, b = pair
        for w in list(self.where.pop(pair, ())):
            word = self.words[w]
            if len(word) < 2:
                continue
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            if len(merged) == len(word):
                continue
            self._remove_word(w, word, self.counts[w])
            self.words[w] = merged
            self._add_word(w, merged, self.counts[w])


def _count_pieces(text: str, pattern: str) -> collections.Counter:
    return collections.Counter(m.group().encode("utf-8") for m in regex.finditer(pattern, text))


def train_bpe(
    text: str,
    vocab_size: int,
    *,
    pattern: str = GPT2_PATTERN,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    verbose: bool = False,
) -> tuple[dict[bytes, int], list[tuple[int, int]]]:
    """Learn BPE merges from ``text`` until the vocabulary has ``vocab_size`` ids.

    Returns ``(ranks, merges)``: ``ranks`` maps each token's bytes to its id
    (ids 0..255 are the single bytes), ``merges`` lists the learned pairs in
    order.  Special tokens take the last ids, so the number of merges is
    ``vocab_size - 256 - len(special_tokens)``.  Ties between equally frequent
    pairs go to the pair whose bytes sort first, so training is deterministic.
    """
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
        raise TokenizerError(
            f"vocab_size={vocab_size!r} is too small: a byte-level BPE needs the 256 byte "
            f"tokens plus {len(special_tokens)} special token(s), so use at least "
            f"{256 + len(special_tokens)} (the course uses 1024)."
        )
    if not text:
        raise TokenizerError("cannot train on empty text: pass a corpus (e.g. llmlab.data.load_corpus()).")
    piece_counts = _count_pieces(text, pattern)
    token_bytes = [bytes([i]) for i in range(256)]
    stats = _PairStats(words=[list(p) for p in piece_counts], counts=list(piece_counts.values()))
    merges: list[tuple[int, int]] = []
    n_merges = vocab_size - 256 - len(special_tokens)
    for step in range(n_merges):
        if not stats.pair_counts:
            break  # every piece is a single token already: nothing left to merge
        pair = max(
            stats.pair_counts,
            key=lambda p: (stats.pair_counts[p], _neg_bytes(token_bytes[p[0]] + token_bytes[p[1]])),
        )
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[pair[0]] + token_bytes[pair[1]])
        merges.append(pair)
        stats.merge(pair, new_id)
        if verbose and (step < 10 or step % 100 == 0):
            print(f"merge {step:4d}: {token_bytes[pair[0]]!r} + {token_bytes[pair[1]]!r} -> id {new_id}")
    ranks = {b: i for i, b in enumerate(token_bytes)}
    return ranks, merges


class _neg_bytes(bytes):
    """Bytes that sort in reverse, so ``max`` prefers the lexicographically first pair on ties."""

    def __lt__(self, other: bytes) -> bool:  # type: ignore[override]
        return bytes.__gt__(self, other)

    def __gt__(self, other: bytes) -> bool:  # type: ignore[override]
        return bytes.__lt__(self, other)


# ----------------------------------------------------------------------------
# The tokenizer object
# ----------------------------------------------------------------------------

SpecialSet = Collection[str] | Literal["all"]


class BPETokenizer:
    """A byte-level BPE tokenizer: a rank table, a regex and special tokens.

    Build one with :meth:`train`, :meth:`load`, :meth:`from_tiktoken` or
    :func:`gpt2_tokenizer`.  ``encode``/``decode`` follow tiktoken's rules for
    special tokens: by default a special token's text inside ``text`` is an
    error, so user input cannot smuggle in ``<|endoftext|>``.
    """

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
        name: str = "llmlab-bpe",
    ) -> None:
        self.name = name
        self.pattern = pattern
        self.ranks = dict(ranks)
        self.special_tokens = dict(special_tokens or {})
        self._check_ids()
        self._decoder: dict[int, bytes] = {i: b for b, i in self.ranks.items()}
        self._decoder.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self._regex = regex.compile(pattern)
        self._cache: dict[bytes, tuple[int, ...]] = {}

    def _check_ids(self) -> None:
        ids = list(self.ranks.values()) + list(self.special_tokens.values())
        if len(set(ids)) != len(ids):
            raise TokenizerError("token ids must be unique across the ranks and the special tokens.")
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise TokenizerError(
                f"a byte-level BPE must contain all 256 single bytes; {len(missing)} are missing "
                f"(first: {missing[0]})."
            )

    # -- construction ---------------------------------------------------------

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        *,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        pattern: str = GPT2_PATTERN,
        name: str = "llmlab-bpe",
        verbose: bool = False,
    ) -> BPETokenizer:
        """Train on ``text`` to ``vocab_size`` ids (special tokens included, at the end)."""
        ranks, _ = train_bpe(text, vocab_size, pattern=pattern, special_tokens=special_tokens, verbose=verbose)
        first_special = len(ranks)
        specials = {tok: first_special + i for i, tok in enumerate(special_tokens)}
        return cls(ranks, specials, pattern, name)

    @classmethod
    def from_tiktoken(cls, encoding) -> BPETokenizer:
        """Copy a ``tiktoken.Encoding``'s ranks, regex and special tokens into a readable tokenizer."""
        return cls(
            encoding._mergeable_ranks,
            encoding._special_tokens,
            encoding._pat_str,
            encoding.name,
        )

    # -- sizes ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids (one more than the largest id)."""
        return max(self._decoder) + 1

    @property
    def eot_id(self) -> int:
        """The id of ``<|endoftext|>``."""
        if ENDOFTEXT not in self.special_tokens:
            raise TokenizerError(f"this tokenizer has no {ENDOFTEXT} token.")
        return self.special_tokens[ENDOFTEXT]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"BPETokenizer(name={self.name!r}, vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"

    # -- encode / decode --------------------------------------------------------

    def pre_tokenize(self, text: str) -> list[str]:
        """Split text into the pieces that merges never cross."""
        return self._regex.findall(text)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token text as ordinary characters."""
        ids: list[int] = []
        for piece in self._regex.findall(text):
            raw = piece.encode("utf-8")
            cached = self._cache.get(raw)
            if cached is None:
                cached = tuple(bpe_merge(raw, self.ranks))
                if len(self._cache) < 200_000:
                    self._cache[raw] = cached
            ids.extend(cached)
        return ids

    def encode(
        self,
        text: str,
        *,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = "all",
    ) -> list[int]:
        """Encode text to ids.

        ``allowed_special`` names the special tokens that become their special id
        when their text appears; ``disallowed_special`` (by default every other
        special token) makes such text an error.  Pass ``disallowed_special=()``
        to encode special-token text as ordinary characters.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}.")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TokenizerError(
                f"allowed_special names {sorted(unknown)}, which are not special tokens of this "
                f"tokenizer; its special tokens are {sorted(self.special_tokens)}."
            )
        disallowed = (
            set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        )
        for token in disallowed:
            if token in text:
                raise TokenizerError(
                    f"the text contains the special token {token!r}, which is disallowed. "
                    f"To encode it as the special token, pass allowed_special={{{token!r}}}; "
                    "to encode it as ordinary text, pass disallowed_special=()."
                )
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        splitter = "(" + "|".join(std_re.escape(t) for t in sorted(allowed, key=len, reverse=True)) + ")"
        for i, chunk in enumerate(std_re.split(splitter, text)):
            if i % 2:
                ids.append(self.special_tokens[chunk])
            elif chunk:
                ids.extend(self.encode_ordinary(chunk))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids`` (a token may hold part of a UTF-8 character)."""
        out = bytearray()
        for i in ids:
            token = self._decoder.get(int(i))
            if token is None:
                raise TokenizerError(
                    f"token id {int(i)} is not in this vocabulary (valid ids: 0..{self.vocab_size - 1}); "
                    "were these ids made by another tokenizer?"
                )
            out += token
        return bytes(out)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decode ids to text; bytes that are not valid UTF-8 become U+FFFD (as tiktoken does)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_texts(self, ids: Iterable[int]) -> list[str]:
        """Each id's text on its own (for colouring tokens); partial characters show as U+FFFD."""
        return [self.decode_bytes([i]).decode("utf-8", errors="replace") for i in ids]

    # -- tiktoken bridge ----------------------------------------------------------

    def to_tiktoken(self):
        """Export as a real ``tiktoken.Encoding`` (same ids, Rust speed)."""
        import tiktoken

        return tiktoken.Encoding(
            name=self.name,
            pat_str=self.pattern,
            mergeable_ranks=self.ranks,
            special_tokens=self.special_tokens,
        )

    # -- save / load ----------------------------------------------------------------

    def merges(self) -> list[tuple[int, int, int]]:
        """Each multi-byte token as ``(left_id, right_id, id)``, in id order.

        A token's pair is two lower-ranked tokens that concatenate to it; any such
        split rebuilds the same bytes, so this is how the file stores the vocabulary.
        """
        out = []
        for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            if len(token) == 1:
                continue
            out.append((*self._split(token, rank), rank))
        return out

    def _split(self, token: bytes, rank: int) -> tuple[int, int]:
        for cut in range(1, len(token)):
            left, right = self.ranks.get(token[:cut]), self.ranks.get(token[cut:])
            if left is not None and right is not None and left < rank and right < rank:
                return left, right
        raise TokenizerError(f"token {token!r} (id {rank}) is not a merge of two earlier tokens.")

    def save(self, path: str | os.PathLike) -> Path:
        """Write a human-readable JSON file (one merge per line), atomically."""
        path = Path(path)
        byte_ids = [self.ranks[bytes([b])] for b in range(256)]
        lines = [
            "{",
            f'  "format": {json.dumps(FILE_FORMAT)},',
            f'  "version": {FILE_VERSION},',
            f'  "name": {json.dumps(self.name)},',
            f'  "pattern": {json.dumps(self.pattern)},',
            f'  "special_tokens": {json.dumps(self.special_tokens, ensure_ascii=False)},',
            f'  "byte_ids": {json.dumps(byte_ids)},',
            '  "merges": [',
        ]
        merges = self.merges()
        for n, (left, right, rank) in enumerate(merges):
            text = (self._decoder[left] + self._decoder[right]).decode("utf-8", errors="backslashreplace")
            comma = "," if n < len(merges) - 1 else ""
            lines.append(f"    [{rank}, {left}, {right}, {json.dumps(text, ensure_ascii=False)}]{comma}")
        lines += ["  ]", "}", ""]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(lines), encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a file written by :meth:`save`; a damaged file gives :class:`TokenizerFileError`."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerFileError(f"no tokenizer file at {path}: check the path, or save one with tok.save(path).")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TokenizerFileError(
                f"{path} is not a readable tokenizer file ({err}); it may be truncated or corrupt: "
                "save it again with tok.save(path) or retrain it."
            ) from err
        return cls._from_dict(data, path)

    @classmethod
    def _from_dict(cls, data, path: Path) -> BPETokenizer:
        def bad(why: str) -> TokenizerFileError:
            return TokenizerFileError(f"{path} is not a valid llmlab tokenizer file: {why}. Save it again with tok.save(path).")

        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise bad(f'"format" must be {FILE_FORMAT!r}')
        if data.get("version") != FILE_VERSION:
            raise bad(f'"version" is {data.get("version")!r}; this llmlab reads version {FILE_VERSION}')
        try:
            byte_ids = data["byte_ids"]
            if sorted(byte_ids) != list(range(256)):
                raise bad('"byte_ids" must be a permutation of 0..255')
            decoder = {i: bytes([b]) for b, i in enumerate(byte_ids)}
            for entry in data["merges"]:
                rank, left, right, text = entry
                if rank in decoder or left not in decoder or right not in decoder:
                    raise bad(f"merge {entry} refers to an unknown or repeated id")
                token = decoder[left] + decoder[right]
                if token.decode("utf-8", errors="backslashreplace") != text:
                    raise bad(f"merge {entry} does not spell {text!r}")
                decoder[rank] = token
            return cls(
                {b: i for i, b in decoder.items()},
                {str(k): int(v) for k, v in data["special_tokens"].items()},
                data["pattern"],
                data.get("name", path.stem),
            )
        except TokenizerFileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise bad(f"{type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------
# GPT-2's vocabulary
# ----------------------------------------------------------------------------


def gpt2_encoding(path: str | os.PathLike | None = None):
    """GPT-2's vocabulary as a ``tiktoken.Encoding``.

    With ``path``, read a local ``r50k_base.tiktoken`` file (checked by its
    sha256).  Without it, tiktoken downloads the file once and caches it in
    ``TIKTOKEN_CACHE_DIR``; offline with no cached copy this raises
    :class:`VocabularyUnavailableError`, which says how to provide the file.
    """
    import tiktoken
    import tiktoken.load

    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise VocabularyUnavailableError(f"no GPT-2 vocabulary file at {path}.")
        ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=_R50K_SHA256)
        return tiktoken.Encoding(
            name=GPT2_ENCODING,
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: 50256},
            explicit_n_vocab=50257,
        )
    try:
        return tiktoken.get_encoding(GPT2_ENCODING)
    except Exception as err:  # requests' ConnectionError, a hash mismatch, ...
        raise VocabularyUnavailableError(_offline_help(err)) from err


_R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
_R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def _offline_help(err: Exception) -> str:
    import hashlib

    cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<your temp dir>/data-gym-cache")
    key = hashlib.sha1(_R50K_URL.encode()).hexdigest()
    return (
        f"GPT-2's vocabulary ({GPT2_ENCODING}) could not be loaded: {type(err).__name__}: {err}\n"
        "tiktoken downloads it once from\n"
        f"  {_R50K_URL}\n"
        "and caches it. With no network, get that file another way and either\n"
        "  - pass its path: llmlab.tokenizer.gpt2_tokenizer(path='r50k_base.tiktoken'), or\n"
        f"  - copy it to {cache}/{key} (set TIKTOKEN_CACHE_DIR to choose the folder)."
    )


def gpt2_tokenizer(path: str | os.PathLike | None = None) -> BPETokenizer:
    """GPT-2's vocabulary loaded into llmlab's own (readable) encoder."""
    return BPETokenizer.from_tiktoken(gpt2_encoding(path))


# ----------------------------------------------------------------------------
# The word-level toy vocabulary (pad = 0, unk = 1, real words from 2)
# ----------------------------------------------------------------------------

_WORD = std_re.compile(r"\w+|[^\w\s]")


class WordVocab:
    """A word-level vocabulary as in the first lessons: id 0 = <pad>, id 1 = <unk>, words from 2.

    It shows why real models moved to subwords: every unseen word is ``<unk>``,
    and the table grows with every new word form.
    """

    PAD, UNK = "<pad>", "<unk>"
    PAD_ID, UNK_ID = 0, 1

    def __init__(self, words: Iterable[str]) -> None:
        specials = (self.PAD, self.UNK)
        self.itos: list[str] = [*specials, *(w for w in dict.fromkeys(words) if w not in specials)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case words and punctuation marks."""
        return _WORD.findall(text.lower())

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1, max_size: int | None = None) -> WordVocab:
        """Most frequent words first (ties alphabetical); ``max_size`` counts pad and unk."""
        if min_count < 1:
            raise ValueError(f"min_count must be ≥ 1, got {min_count}.")
        if max_size is not None and max_size < 2:
            raise ValueError(f"max_size must leave room for <pad> and <unk> (≥ 2), got {max_size}.")
        counts = collections.Counter(w for t in texts for w in cls.split(t))
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            ranked = ranked[: max_size - 2]
        return cls(ranked)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Word ids; words not in the vocabulary become ``UNK_ID``."""
        return [self.stoi.get(w, self.UNK_ID) for w in self.split(text)]

    def decode(self, ids: Iterable[int], skip_pad: bool = True) -> str:
        """Words joined by spaces (padding dropped unless ``skip_pad=False``)."""
        words = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise TokenizerError(f"word id {i} is out of range for this vocabulary (0..{len(self.itos) - 1}).")
            if skip_pad and i == self.PAD_ID:
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def pad_batch(self, sequences: Sequence[Sequence[int]], length: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """Right-pad id lists to one length; returns ``(ids, mask)`` with mask 1 on real tokens.

        ``length`` defaults to the longest sequence; a longer sequence is an error
        (truncate it first), so no token is silently dropped.
        """
        longest = max((len(s) for s in sequences), default=0)
        length = longest if length is None else length
        if longest > length:
            raise ValueError(f"a sequence has {longest} ids but length={length}: truncate it or raise length.")
        ids = [list(s) + [self.PAD_ID] * (length - len(s)) for s in sequences]
        mask = [[1] * len(s) + [0] * (length - len(s)) for s in sequences]
        return ids, mask

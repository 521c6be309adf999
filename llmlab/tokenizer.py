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

import base64
import codecs
import collections
import json
import operator
import os
import re as std_re
import uuid
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import regex

from llmlab.data import (
    KeptFileWarning,
    as_path,
    check_output_file,
    damaged_note,
    keep_aside,
    make_parent,
    sha256_of,
    user_stacklevel,
)
from llmlab.errors import LlmlabError, require_int

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


class TokenizerError(LlmlabError, ValueError):
    """A tokenizer was asked to do something it cannot (the message says what to do)."""


class TokenizerTypeError(TokenizerError, TypeError):
    """An argument has the wrong type (a float where a token id or a size is needed, bytes for text, ...)."""


class SpecialTokenError(TokenizerError):
    """The text holds a special token's text (e.g. ``<|endoftext|>``) that ``encode`` was not allowed to use.

    The message names the token and the two ways out: ``allowed_special={...}``
    (encode it as the special token) or ``disallowed_special=()`` (as ordinary text).
    """


class TokenizerFileError(TokenizerError):
    """A tokenizer file is missing, truncated, corrupt or of another format, or cannot be written there."""


class VocabularyUnavailableError(LlmlabError, RuntimeError):
    """A published vocabulary (e.g. GPT-2's) could not be fetched or read."""


class VocabSizeWarning(UserWarning):
    """BPE training ran out of pairs to merge before reaching ``vocab_size`` (the text is too small)."""


# ----------------------------------------------------------------------------
# Checks at the boundary: text, token ids, names
# ----------------------------------------------------------------------------


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _require_str(name: str, value) -> str:
    if not isinstance(value, str):
        raise TokenizerTypeError(f"{name} must be a str, got {_short(value)} ({type(value).__name__}).")
    return value


def _require_unicode(text: str, what: str = "the text") -> str:
    """``text`` if it can be written as UTF-8; a lone surrogate (from bytes that were not UTF-8) is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        before = text[max(0, err.start - 20) : err.start]
        raise TokenizerError(
            f"{what} is not valid Unicode: it holds the lone surrogate {text[err.start]!r} at character "
            f"{err.start} (after {before!r}). Such characters come from bytes that are not UTF-8 "
            "(a file or command-line argument in another encoding): convert the text to UTF-8, or drop them "
            "with text.encode('utf-8', 'replace').decode('utf-8')."
        ) from None
    return text


def _require_size(name: str, value, minimum: int, why: str, maximum: int | None = None) -> int:
    """An int in range: a wrong type is a :class:`TokenizerTypeError`, out of range a :class:`TokenizerError`."""
    value = require_int(name, value, error=TokenizerTypeError)
    if value < minimum:
        raise TokenizerError(f"{name} must be ≥ {minimum} ({why}), got {value}.")
    if maximum is not None and value > maximum:
        raise TokenizerError(f"{name} must be ≤ {maximum:,}, got {value:,}.")
    return value


def _token_id(value) -> int | None:
    """``value`` as a token id (an int, or a numpy/torch integer scalar); None for bools, floats, text, ..."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _require_id_sequence(ids) -> None:
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Iterable):
        hint = " (to decode bytes, use bytes.decode('utf-8'))" if isinstance(ids, (bytes, bytearray)) else ""
        raise TokenizerTypeError(
            f"ids must be a sequence of token ids (ints), e.g. [15496, 995], got {_short(ids)} "
            f"({type(ids).__name__}){hint}."
        )


def _valid_ids(ids, size: Callable[[], int], known: Callable[[int], bool], what: str = "token id",
               missing: str = "is not in this vocabulary") -> list[int]:
    """``ids`` as a list of ints, each ``known(i)``; else an error naming the first bad id, its position and
    the valid range ``0..size() - 1`` (``size`` is only called then)."""
    _require_id_sequence(ids)
    out: list[int] = []
    try:
        for pos, value in enumerate(ids):
            i = _token_id(value)
            if i is None:
                raise TokenizerTypeError(
                    f"{what} {_short(value)} (ids[{pos}], a {type(value).__name__}) is not an integer: "
                    f"ids must be ints (not bools or floats) in 0..{size() - 1}."
                )
            if not known(i):
                raise TokenizerError(
                    f"{what} {i} {missing} (valid ids: 0..{size() - 1}); it is ids[{pos}]. "
                    "Were these ids made by another tokenizer?"
                )
            out.append(i)
    except TokenizerError:
        raise
    except TypeError as err:  # e.g. iterating a 0-d tensor
        raise TokenizerTypeError(f"ids must be a sequence of token ids (ints), got {_short(ids)}: {err}.") from err
    return out


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


def _check_special_tokens(special_tokens) -> tuple[str, ...]:
    """Distinct, non-empty strings (a bare str is refused: its characters are not the tokens meant)."""
    if isinstance(special_tokens, str) or not isinstance(special_tokens, Iterable):
        raise TokenizerTypeError(
            f"special_tokens must be a list of strings such as [{ENDOFTEXT!r}], got {_short(special_tokens)} "
            f"({type(special_tokens).__name__})."
        )
    tokens = tuple(special_tokens)
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise TokenizerTypeError(f"each special token must be a non-empty str, got {_short(token)}.")
        _require_unicode(token, f"the special token {token!r}")
    if len(set(tokens)) != len(tokens):
        raise TokenizerError(f"special_tokens must be distinct, got {list(tokens)}.")
    return tokens


def _compile_pattern(pattern) -> regex.Pattern:
    """The pre-tokenization regex, compiled; a pattern that does not compile is a :class:`TokenizerError`."""
    _require_str("pattern", pattern)
    try:
        return regex.compile(pattern)
    except (regex.error, ValueError, TypeError, OverflowError, RecursionError) as err:
        raise TokenizerError(
            f"the pre-tokenization pattern {_short(pattern)} does not compile ({err}); "
            "fix it, or leave it out to use GPT-2's (llmlab.tokenizer.GPT2_PATTERN)."
        ) from None


def _check_training_input(text, vocab_size, pattern, special_tokens) -> tuple[int, tuple[str, ...]]:
    _require_str("text", text)
    vocab_size = require_int("vocab_size", vocab_size, error=TokenizerTypeError)
    special_tokens = _check_special_tokens(special_tokens)
    if vocab_size < 256 + len(special_tokens):
        raise TokenizerError(
            f"vocab_size={vocab_size!r} is too small: a byte-level BPE needs the 256 byte "
            f"tokens plus {len(special_tokens)} special token(s), so use at least "
            f"{256 + len(special_tokens)} (the course uses 1024)."
        )
    _compile_pattern(pattern)
    _require_unicode(text, "the training text")
    if not text:
        raise TokenizerError("cannot train on empty text: pass a corpus (e.g. llmlab.data.load_corpus()).")
    return vocab_size, special_tokens


def _report_shortfall(vocab_size: int, reached: int, n_merges: int, n_pieces: int, strict: bool) -> None:
    """Say that training stopped short of ``vocab_size``: a :class:`VocabSizeWarning`, or an error if ``strict``."""
    message = (
        f"BPE training reached {reached:,} ids, not the vocab_size={vocab_size:,} asked for: after "
        f"{n_merges:,} merges every piece of the text ({n_pieces:,} distinct pre-tokenized pieces) is a "
        f"single token, so no pair is left to merge. Train on more text for a larger vocabulary, or ask "
        f"for vocab_size={reached}"
    )
    if strict:
        raise TokenizerError(message + " (or pass strict=False to accept the smaller vocabulary).")
    warnings.warn(message + ".", VocabSizeWarning, stacklevel=user_stacklevel())


def train_bpe(
    text: str,
    vocab_size: int,
    *,
    pattern: str = GPT2_PATTERN,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    verbose: bool = False,
    strict: bool = False,
) -> tuple[dict[bytes, int], list[tuple[int, int]]]:
    """Learn BPE merges from ``text`` until the vocabulary has ``vocab_size`` ids.

    Returns ``(ranks, merges)``: ``ranks`` maps each token's bytes to its id
    (ids 0..255 are the single bytes), ``merges`` lists the learned pairs in
    order.  Special tokens take the last ids, so the number of merges is
    ``vocab_size - 256 - len(special_tokens)``.  Ties between equally frequent
    pairs go to the pair whose bytes sort first, so training is deterministic.

    A text too small for ``vocab_size`` runs out of pairs to merge first: the
    smaller vocabulary is returned with a :class:`VocabSizeWarning` naming the
    size reached, or, with ``strict=True``, a :class:`TokenizerError` is raised.
    """
    vocab_size, special_tokens = _check_training_input(text, vocab_size, pattern, special_tokens)
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
    if len(merges) < n_merges:  # the text ran out of pairs: say so (an error if strict)
        _report_shortfall(vocab_size, len(token_bytes) + len(special_tokens), len(merges), len(piece_counts), strict)
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


def _check_ranks(ranks) -> dict[bytes, int]:
    """A copy of ``ranks`` after checking it maps bytes to non-negative int ids."""
    if not isinstance(ranks, Mapping):
        raise TokenizerTypeError(f"ranks must be a dict of token bytes → id, got {type(ranks).__name__}.")
    out = dict(ranks)
    for token, rank in out.items():
        if not isinstance(token, bytes) or not token:
            raise TokenizerTypeError(f"ranks must map non-empty bytes to ids; it holds the key {_short(token)}.")
        out[token] = _non_negative_id(f"the rank of {token!r}", rank)
    return out


def _non_negative_id(name: str, value) -> int:
    i = _token_id(value)
    if i is None:
        raise TokenizerTypeError(f"{name} must be an int, got {_short(value)} ({type(value).__name__}).")
    if i < 0:
        raise TokenizerError(f"{name} must be ≥ 0, got {i}.")
    return i


def _check_special_ids(special_tokens) -> dict[str, int]:
    """A copy of ``special_tokens`` after checking it maps non-empty strings to non-negative int ids."""
    if special_tokens is None:
        return {}
    if not isinstance(special_tokens, Mapping):
        raise TokenizerTypeError(
            f"special_tokens must be a dict of token text → id such as {{{ENDOFTEXT!r}: 50256}}, "
            f"got {type(special_tokens).__name__}."
        )
    out = {}
    for token, i in special_tokens.items():
        if not isinstance(token, str) or not token:
            raise TokenizerTypeError(f"special token names must be non-empty strings, got {_short(token)}.")
        _require_unicode(token, f"the special token {token!r}")
        out[token] = _non_negative_id(f"the id of the special token {token!r}", i)
    return out


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
        self.name = _require_str("name", name)
        self._regex = _compile_pattern(pattern)
        self.pattern = pattern
        self.ranks = _check_ranks(ranks)
        self.special_tokens = _check_special_ids(special_tokens)
        self._check_ids()
        self._decoder: dict[int, bytes] = {i: b for b, i in self.ranks.items()}
        self._decoder.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
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
        strict: bool = False,
    ) -> BPETokenizer:
        """Train on ``text`` to ``vocab_size`` ids (special tokens included, at the end).

        A text too small for ``vocab_size`` runs out of pairs to merge first: the
        tokenizer then has fewer ids (``tok.vocab_size``) and a
        :class:`VocabSizeWarning` says how many and why; with ``strict=True``
        that is a :class:`TokenizerError` instead.
        """
        _require_str("name", name)
        special_tokens = _check_special_tokens(special_tokens)
        ranks, _ = train_bpe(
            text, vocab_size, pattern=pattern, special_tokens=special_tokens, verbose=verbose, strict=strict
        )
        first_special = len(ranks)
        specials = {tok: first_special + i for i, tok in enumerate(special_tokens)}
        return cls(ranks, specials, pattern, name)

    @classmethod
    def from_tiktoken(cls, encoding) -> BPETokenizer:
        """Copy a ``tiktoken.Encoding``'s ranks, regex and special tokens into a readable tokenizer."""
        if not all(hasattr(encoding, a) for a in ("_mergeable_ranks", "_special_tokens", "_pat_str", "name")):
            raise TokenizerTypeError(
                f"from_tiktoken() takes a tiktoken.Encoding (e.g. tiktoken.get_encoding('r50k_base')), "
                f"got {_short(encoding)} ({type(encoding).__name__})."
            )
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
        return self._regex.findall(_require_str("text", text))

    @staticmethod
    def _check_text(text) -> str:
        """``text`` if it is a str of valid Unicode; otherwise a :class:`TokenizerError` saying why."""
        if not isinstance(text, str):
            raise TokenizerTypeError(f"encode() takes a str, not {type(text).__name__}.")
        return _require_unicode(text)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token text as ordinary characters."""
        return self._encode_ordinary(self._check_text(text))

    def _encode_ordinary(self, text: str) -> list[int]:
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
        special token) makes such text an error (:class:`SpecialTokenError`).
        Pass ``disallowed_special=()`` to encode special-token text as ordinary
        characters.  Text that is not valid Unicode (a lone surrogate) is refused.
        """
        text = self._check_text(text)
        allowed = self._special_set("allowed_special", allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TokenizerError(
                f"allowed_special names {sorted(unknown)}, which are not special tokens of this "
                f"tokenizer; its special tokens are {sorted(self.special_tokens)}."
            )
        disallowed = self._special_set("disallowed_special", disallowed_special)
        if disallowed_special == "all":
            disallowed -= allowed
        for token in sorted(disallowed):
            if token in text:
                raise SpecialTokenError(
                    f"the text contains the special token {token!r}, which is disallowed. "
                    f"To encode it as the special token, pass allowed_special={{{token!r}}}; "
                    "to encode it as ordinary text, pass disallowed_special=()."
                )
        if not allowed:
            return self._encode_ordinary(text)
        ids: list[int] = []
        splitter = "(" + "|".join(std_re.escape(t) for t in sorted(allowed, key=len, reverse=True)) + ")"
        for i, chunk in enumerate(std_re.split(splitter, text)):
            if i % 2:
                ids.append(self.special_tokens[chunk])
            elif chunk:
                ids.extend(self._encode_ordinary(chunk))
        return ids

    def _special_set(self, name: str, value) -> set[str]:
        """``"all"`` (every special token) or a collection of strings, as a set."""
        if isinstance(value, str):
            if value == "all":
                return set(self.special_tokens)
            raise TokenizerTypeError(
                f"{name} must be 'all' or a set of special tokens such as {{{ENDOFTEXT!r}}}, got the str "
                f"{_short(value)}: put it in a set ({name}={{{value!r}}})."
            )
        if not isinstance(value, Iterable) or isinstance(value, (bytes, bytearray)):
            raise TokenizerTypeError(
                f"{name} must be 'all' or a set of strings, got {_short(value)} ({type(value).__name__})."
            )
        tokens = list(value)
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise TokenizerTypeError(f"{name} must hold non-empty strings, got {_short(token)} in it.")
        return set(tokens)

    def _ids(self, ids) -> list[int]:
        """``ids`` checked against this vocabulary (see :func:`_valid_ids`)."""
        return _valid_ids(ids, lambda: self.vocab_size, self._decoder.__contains__)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids`` (a token may hold part of a UTF-8 character).

        Ids are ints (numpy/torch integer scalars too) in this vocabulary; a bool, a
        float or an unknown id is a :class:`TokenizerError` naming the first one.
        """
        return b"".join(self._decoder[i] for i in self._ids(ids))

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decode ids to text; bytes that are not valid UTF-8 become U+FFFD (as tiktoken does).

        ``errors`` is a codec error handler: ``"replace"``, ``"strict"`` (a
        :class:`TokenizerError` for bytes that are not UTF-8), ``"ignore"``, ...
        """
        if not isinstance(errors, str):
            raise TokenizerTypeError(f"errors must be a str such as 'replace' or 'strict', got {_short(errors)}.")
        try:
            codecs.lookup_error(errors)
        except (LookupError, ValueError):  # unknown, or not even a valid name (NUL, surrogates)
            raise TokenizerError(
                f"errors={_short(errors)} is not a codec error handler: use 'replace', 'strict' or 'ignore'."
            ) from None
        raw = self.decode_bytes(ids)
        try:
            return raw.decode("utf-8", errors=errors)
        except UnicodeDecodeError as err:
            raise TokenizerError(
                f"the ids decode to bytes that are not valid UTF-8 (byte {err.start}: {err.reason}) and "
                f"errors={errors!r}: pass errors='replace' to show them as U+FFFD, or use decode_bytes()."
            ) from None

    def token_texts(self, ids: Iterable[int]) -> list[str]:
        """Each id's text on its own (for colouring tokens); partial characters show as U+FFFD."""
        return [self._decoder[i].decode("utf-8", errors="replace") for i in self._ids(ids)]

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
        """Write a human-readable JSON file (one merge per line), atomically.

        Missing folders are created.  A folder, a path below a regular file, or an
        existing file that is not an llmlab tokenizer file is refused with
        :class:`TokenizerFileError` (nothing of the user's is replaced).
        """
        path = check_output_file(as_path("path", path, TokenizerTypeError), "the tokenizer", TokenizerFileError)
        if not _replaceable(path):
            raise TokenizerFileError(
                f"cannot save the tokenizer to {path}: that file exists and is not an llmlab tokenizer file, "
                "so saving would replace it. Choose another path, or move that file away first."
            )
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
        _write_atomically(path, "\n".join(lines))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a file written by :meth:`save`; a damaged file gives :class:`TokenizerFileError`."""
        path = as_path("path", path, TokenizerTypeError)
        if not path.is_file():
            raise TokenizerFileError(f"no tokenizer file at {path}: check the path, or save one with tok.save(path).")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise TokenizerFileError(
                f"{path} is not a readable tokenizer file ({type(err).__name__}: {err}); it may be truncated or "
                "corrupt: save it again with tok.save(path) or retrain it."
            ) from err
        except OSError as err:
            raise TokenizerFileError(f"cannot read the tokenizer file {path}: {err.strerror or err}.") from err
        return cls._from_dict(data, path)

    @classmethod
    def _from_dict(cls, data, path: Path) -> BPETokenizer:
        def bad(why: str) -> TokenizerFileError:
            return TokenizerFileError(f"{path} is not a valid llmlab tokenizer file: {why}. Save it again with tok.save(path).")

        try:
            fields = _file_fields(data, default_name=path.stem)
            decoder = _file_decoder(fields["byte_ids"], fields["merges"])
            return cls({b: i for i, b in decoder.items()}, fields["special_tokens"], fields["pattern"], fields["name"])
        except _BadFile as err:
            raise bad(str(err)) from None
        except TokenizerError as err:  # from the constructor: a pattern that does not compile, a repeated id, ...
            raise bad(str(err).rstrip(".")) from err


class _BadFile(Exception):
    """Why a tokenizer file's contents are not valid (becomes a :class:`TokenizerFileError`)."""


def _is_id(value) -> bool:
    return type(value) is int and value >= 0  # JSON's true/false and 1.0 are not ids


def _file_fields(data, default_name: str) -> dict:
    """The checked top-level fields of a tokenizer file's JSON."""
    if not isinstance(data, dict):
        raise _BadFile(f"it holds a JSON {type(data).__name__}, not an object")
    if data.get("format") != FILE_FORMAT:
        raise _BadFile(f'"format" must be {FILE_FORMAT!r}')
    version = data.get("version")
    if type(version) is not int or version != FILE_VERSION:
        raise _BadFile(f'"version" is {_short(version)}; this llmlab reads version {FILE_VERSION}')
    expected = {"pattern": str, "special_tokens": dict, "byte_ids": list, "merges": list}
    for key, kind in expected.items():
        if key not in data:
            raise _BadFile(f'"{key}" is missing')
        if not isinstance(data[key], kind):
            raise _BadFile(f'"{key}" must be a JSON {_JSON_NAMES[kind]}, got {type(data[key]).__name__}')
    name = data.get("name", default_name)
    if not isinstance(name, str):
        raise _BadFile(f'"name" must be a string, got {_short(name)}')
    for token, i in data["special_tokens"].items():
        if not token or not _is_id(i):
            raise _BadFile(
                f'"special_tokens" maps {_short(token)} to {_short(i)}; it needs non-empty names and integer ids ≥ 0'
            )
    byte_ids = data["byte_ids"]
    if not (len(byte_ids) == 256 and all(type(i) is int for i in byte_ids) and sorted(byte_ids) == list(range(256))):
        raise _BadFile('"byte_ids" must be a permutation of 0..255')
    return {**{key: data[key] for key in expected}, "name": name}


_JSON_NAMES = {str: "string", dict: "object", list: "array"}


def _file_decoder(byte_ids: list[int], merges: list) -> dict[int, bytes]:
    """Id → bytes, rebuilt from the byte ids and the merges; every merge is checked."""
    decoder = {i: bytes([b]) for b, i in enumerate(byte_ids)}
    seen = {token: i for i, token in decoder.items()}
    for entry in merges:
        if not (isinstance(entry, list) and len(entry) == 4 and all(_is_id(x) for x in entry[:3])
                and isinstance(entry[3], str)):
            raise _BadFile(f"merge {_short(entry)} must be [id, left_id, right_id, text] with integer ids")
        rank, left, right, text = entry
        if rank in decoder or left not in decoder or right not in decoder:
            raise _BadFile(f"merge {_short(entry)} refers to an unknown or repeated id")
        if left >= rank or right >= rank:
            raise _BadFile(f"merge {_short(entry)} joins ids that are not below its own id {rank}")
        token = decoder[left] + decoder[right]
        if token.decode("utf-8", errors="backslashreplace") != text:
            raise _BadFile(f"merge {_short(entry)} does not spell {text!r}")
        if token in seen:
            raise _BadFile(f"merge {_short(entry)} repeats the token {text!r} (already id {seen[token]})")
        decoder[rank], seen[token] = token, rank
    return decoder


def _replaceable(path: Path) -> bool:
    """Whether saving may replace ``path``: nothing there, an empty file, or an llmlab tokenizer file."""
    try:
        if not path.exists() or path.stat().st_size == 0:
            return True
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return regex.search(rb'"format"\s*:\s*"' + FILE_FORMAT.encode() + rb'"', head) is not None


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a new temporary file beside ``path``, then swap it in; errors name the path."""
    make_parent(path, "the tokenizer", TokenizerFileError)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    created = False
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # "x": a new file, never one that is there
            created = True
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        raise TokenizerFileError(
            f"cannot save the tokenizer to {path}: {err.strerror or err}. Choose another path."
        ) from err
    finally:
        if created:
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------
# GPT-2's vocabulary
# ----------------------------------------------------------------------------


def gpt2_encoding(path: str | os.PathLike | None = None):
    """GPT-2's vocabulary as a ``tiktoken.Encoding``.

    With ``path``, read a local ``r50k_base.tiktoken`` file, checked by its
    sha256 (another file is a :class:`VocabularyUnavailableError` naming both
    hashes).  Without it, tiktoken downloads the file once and caches it in
    ``TIKTOKEN_CACHE_DIR``; offline with no cached copy this raises
    :class:`VocabularyUnavailableError`, which says how to provide the file.  A
    damaged cached copy is kept (as ``<name>.sha256-<hash>.bad``), never deleted.
    """
    import tiktoken

    if path is not None:
        return tiktoken.Encoding(
            name=GPT2_ENCODING,
            pat_str=GPT2_PATTERN,
            mergeable_ranks=_read_r50k(as_path("path", path, TokenizerTypeError)),
            special_tokens={ENDOFTEXT: 50256},
            explicit_n_vocab=50257,
        )
    return _cached_gpt2_encoding()


_R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
_R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def _read_r50k(path: Path) -> dict[bytes, int]:
    """The ranks of a local ``r50k_base.tiktoken`` file, after checking its sha256 (as llmlab.data does)."""
    if not path.is_file():
        raise VocabularyUnavailableError(
            f"no GPT-2 vocabulary file at {path}: check the path, or leave out path= to let tiktoken "
            f"download it from {_R50K_URL}."
        )
    try:
        got = sha256_of(path)
        contents = path.read_bytes()
    except OSError as err:
        raise VocabularyUnavailableError(
            f"cannot read the GPT-2 vocabulary file {path}: {err.strerror or err}."
        ) from err
    if got != _R50K_SHA256:
        raise VocabularyUnavailableError(
            f"{path} is not GPT-2's {GPT2_ENCODING} vocabulary (sha256 {got}, expected {_R50K_SHA256}): it is "
            f"damaged or another file. Get the file from {_R50K_URL}, or leave out path= to let tiktoken download it."
        )
    ranks = {}
    for line in contents.splitlines():  # the format tiktoken reads: "<base64 token> <rank>" per line
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _tiktoken_cache_file() -> Path | None:
    """Where tiktoken caches GPT-2's vocabulary (None when its cache is switched off)."""
    import tempfile

    folder = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if folder is None:
        folder = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if folder == "":
        return None
    return Path(folder) / _tiktoken_cache_file_name()


def _cached_gpt2_encoding():
    """tiktoken's GPT-2 encoding; a damaged cached copy is set aside first (tiktoken would delete it)."""
    import tiktoken
    import tiktoken.registry

    cache = _tiktoken_cache_file()
    damaged, kept = None, None
    if GPT2_ENCODING not in getattr(tiktoken.registry, "ENCODINGS", {}) and cache is not None and cache.is_file():
        got = sha256_of(cache)
        if got != _R50K_SHA256:
            damaged, kept = got, keep_aside(cache, got)
    try:
        encoding = tiktoken.get_encoding(GPT2_ENCODING)
    except BaseException as err:  # requests' ConnectionError, a hash mismatch, Ctrl-C, ...
        if kept is not None:
            os.replace(kept, cache)  # no fresh copy: put the user's file back where it was
        if not isinstance(err, Exception):
            raise
        raise VocabularyUnavailableError(_offline_help(err, cache, damaged)) from err
    if kept is not None:
        warnings.warn(
            f"the cached GPT-2 vocabulary {cache} had sha256 {damaged}, expected {_R50K_SHA256}; it was kept as "
            f"{kept} and a fresh copy was downloaded (delete the kept file if you do not need it).",
            KeptFileWarning,
            stacklevel=user_stacklevel(),
        )
    return encoding


def _offline_help(err: Exception, cache: Path | None, damaged: str | None = None) -> str:
    where = (
        f"  - copy it to {cache} (set TIKTOKEN_CACHE_DIR to choose the folder)."
        if cache is not None
        else "  - set TIKTOKEN_CACHE_DIR to a folder and copy it there under the name "
        f"{_tiktoken_cache_file_name()}."
    )
    if damaged is not None:
        where = (
            f"  - replace the file at {cache} with it.\n{damaged_note(cache, damaged, _R50K_SHA256)}"
        )
    return (
        f"GPT-2's vocabulary ({GPT2_ENCODING}) could not be loaded: {type(err).__name__}: {err}\n"
        "tiktoken downloads it once from\n"
        f"  {_R50K_URL}\n"
        "and caches it. With no network, get that file another way and either\n"
        "  - pass its path: llmlab.tokenizer.gpt2_tokenizer(path='r50k_base.tiktoken'), or\n"
        f"{where}"
    )


def _tiktoken_cache_file_name() -> str:
    import hashlib

    return hashlib.sha1(_R50K_URL.encode()).hexdigest()


def gpt2_tokenizer(path: str | os.PathLike | None = None) -> BPETokenizer:
    """GPT-2's vocabulary loaded into llmlab's own (readable) encoder."""
    return BPETokenizer.from_tiktoken(gpt2_encoding(path))


# ----------------------------------------------------------------------------
# The word-level toy vocabulary (pad = 0, unk = 1, real words from 2)
# ----------------------------------------------------------------------------

_WORD = std_re.compile(r"\w+|[^\w\s]")

MAX_PAD_LENGTH = 1 << 20
"""The longest ``pad_batch`` pads to (far beyond any lesson; it stops an impossible allocation)."""


class WordVocab:
    """A word-level vocabulary as in the first lessons: id 0 = <pad>, id 1 = <unk>, words from 2.

    It shows why real models moved to subwords: every unseen word is ``<unk>``,
    and the table grows with every new word form.
    """

    PAD, UNK = "<pad>", "<unk>"
    PAD_ID, UNK_ID = 0, 1

    def __init__(self, words: Iterable[str]) -> None:
        specials = (self.PAD, self.UNK)
        words = _strings("words", words)
        self.itos: list[str] = [*specials, *(w for w in dict.fromkeys(words) if w not in specials)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case words and punctuation marks."""
        return _WORD.findall(_require_str("text", text).lower())

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1, max_size: int | None = None) -> WordVocab:
        """Most frequent words first (ties alphabetical); ``max_size`` counts pad and unk."""
        texts = _strings("texts", texts)
        min_count = _require_size("min_count", min_count, 1, "a word must be seen at least once")
        if max_size is not None:
            max_size = _require_size("max_size", max_size, 2, "it must leave room for <pad> and <unk>")
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
        """Words joined by spaces (padding dropped unless ``skip_pad=False``); ids are ints in range."""
        ids = self._ids(ids)
        return " ".join(self.itos[i] for i in ids if not (skip_pad and i == self.PAD_ID))

    def pad_batch(self, sequences: Sequence[Sequence[int]], length: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """Right-pad id lists to one length; returns ``(ids, mask)`` with mask 1 on real tokens.

        ``length`` defaults to the longest sequence; a longer sequence is an error
        (truncate it first), so no token is silently dropped.
        """
        sequences, length = self._check_batch(sequences, length)
        longest = max((len(s) for s in sequences), default=0)
        length = longest if length is None else length
        if longest > length:
            raise TokenizerError(f"a sequence has {longest} ids but length={length}: truncate it or raise length.")
        ids = [list(s) + [self.PAD_ID] * (length - len(s)) for s in sequences]
        mask = [[1] * len(s) + [0] * (length - len(s)) for s in sequences]
        return ids, mask

    def _ids(self, ids) -> list[int]:
        n = len(self.itos)
        return _valid_ids(ids, lambda: n, lambda i: 0 <= i < n, "word id", "is out of range for this vocabulary")

    def _check_batch(self, sequences, length) -> tuple[list[list[int]], int | None]:
        """``pad_batch``'s arguments checked: lists of word ids in range, and a length that is None or an int ≥ 0."""
        if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Iterable):
            raise TokenizerTypeError(f"sequences must be a list of id lists, got {_short(sequences)}.")
        sequences = [self._ids(s) for s in sequences]
        if length is not None:
            length = _require_size("length", length, 0, "a sequence length", maximum=MAX_PAD_LENGTH)
        return sequences, length


def _strings(name: str, values) -> list[str]:
    """``values`` as a list of strings; a bare str (whose characters would be taken one by one) is refused."""
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise TokenizerTypeError(
            f"{name} must be a list of strings, got {_short(values)} ({type(values).__name__})"
            + (f": pass [{_short(values)}]." if isinstance(values, str) else ".")
        )
    values = list(values)
    for value in values:
        if not isinstance(value, str):
            raise TokenizerTypeError(f"{name} must hold strings only, got {_short(value)} ({type(value).__name__}).")
    return values

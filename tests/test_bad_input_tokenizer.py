"""Every bad input to the tokenizers and the corpus loader ends in a clear llmlab error (issue 10).

One row per bad input: the exact package error type and a fragment of its
message; rows that involve a user's file also check that the file is untouched.
A hypothesis test then feeds arbitrary values to the public functions and
accepts only a clean result or an :class:`~llmlab.errors.LlmlabError`.
Training stays tiny (a sentence, a few hundred ids) so the file runs in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import math
import socket
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmlab import data
from llmlab.data import BatchError, ChecksumError, DataError, DownloadError, KeptFileWarning
from llmlab.errors import LlmlabError
from llmlab.tokenizer import (
    ENDOFTEXT,
    BPETokenizer,
    SpecialTokenError,
    TokenizerError,
    TokenizerFileError,
    TokenizerTypeError,
    VocabSizeWarning,
    VocabularyUnavailableError,
    WordVocab,
    gpt2_encoding,
    gpt2_tokenizer,
    train_bpe,
)

TEXT = "to be or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 4
VOCAB = 270  # reached by TEXT (see test_tiny_tokenizer_reaches_its_size)
SHA = data.CORPORA["tinyshakespeare"].sha256
R50K_SHA = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(TEXT, VOCAB)


@pytest.fixture(scope="module")
def words() -> WordVocab:
    return WordVocab.build(["the cat sat on the mat", "the dog sat"])


def test_tiny_tokenizer_reaches_its_size(tok):
    assert tok.vocab_size == VOCAB


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raises(call, error: type[Exception], fragment: str) -> str:
    """Run ``call``; it must raise exactly ``error`` (an LlmlabError) with ``fragment`` in its message."""
    with pytest.raises(LlmlabError) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert fragment in message, message
    assert "Traceback" not in message
    return message


# ----------------------------------------------------------------------------
# BPE training: types, range, empty, huge, not Unicode, a target the text cannot reach
# ----------------------------------------------------------------------------

TRAIN_ROWS = [
    ("vocab float", dict(vocab_size=300.5), TokenizerTypeError, "vocab_size must be an integer, got 300.5 (float)"),
    ("vocab nan", dict(vocab_size=NAN), TokenizerTypeError, "vocab_size must be an integer, got nan"),
    ("vocab inf", dict(vocab_size=INF), TokenizerTypeError, "vocab_size must be an integer, got inf"),
    ("vocab -inf", dict(vocab_size=-INF), TokenizerTypeError, "vocab_size must be an integer"),
    ("vocab str", dict(vocab_size="300"), TokenizerTypeError, "vocab_size must be an integer, got '300' (str)"),
    ("vocab bool", dict(vocab_size=True), TokenizerTypeError, "(bool)"),
    ("vocab None", dict(vocab_size=None), TokenizerTypeError, "(NoneType)"),
    ("vocab negative", dict(vocab_size=-1), TokenizerError, "use at least 257"),
    ("vocab zero", dict(vocab_size=0), TokenizerError, "use at least 257"),
    ("vocab 256 with a special", dict(vocab_size=256), TokenizerError, "use at least 257"),
    ("huge vocab, strict", dict(vocab_size=10**30, strict=True), TokenizerError, "not the vocab_size=1,000,000"),
    ("target not reached, strict", dict(vocab_size=100_000, strict=True), TokenizerError, "no pair is left to merge"),
    ("text bytes", dict(text=b"to be"), TokenizerTypeError, "text must be a str"),
    ("text None", dict(text=None), TokenizerTypeError, "text must be a str"),
    ("text list", dict(text=["to be"]), TokenizerTypeError, "text must be a str"),
    ("text empty", dict(text=""), TokenizerError, "cannot train on empty text"),
    ("text lone surrogate", dict(text="ROMEO\udcff"), TokenizerError, "not valid Unicode"),
    ("specials bare str", dict(special_tokens=ENDOFTEXT), TokenizerTypeError, "must be a list of strings"),
    ("specials empty name", dict(special_tokens=[""]), TokenizerTypeError, "non-empty str"),
    ("specials not str", dict(special_tokens=[1]), TokenizerTypeError, "non-empty str"),
    ("specials repeated", dict(special_tokens=["<a>", "<a>"]), TokenizerError, "must be distinct"),
    ("specials None", dict(special_tokens=None), TokenizerTypeError, "must be a list of strings"),
    ("pattern bad regex", dict(pattern="(unclosed"), TokenizerError, "does not compile"),
    ("pattern not str", dict(pattern=5), TokenizerTypeError, "pattern must be a str"),
    ("name not str", dict(name=5), TokenizerTypeError, "name must be a str"),
]


@pytest.mark.parametrize("kwargs, error, fragment", [r[1:] for r in TRAIN_ROWS], ids=[r[0] for r in TRAIN_ROWS])
def test_train_refuses(kwargs, error, fragment):
    args = {"text": TEXT, "vocab_size": VOCAB, **kwargs}
    raises(lambda: BPETokenizer.train(args.pop("text"), args.pop("vocab_size"), **args), error, fragment)


def test_train_bpe_refuses_the_same():
    raises(lambda: train_bpe(TEXT, 300.5), TokenizerTypeError, "vocab_size must be an integer")
    raises(lambda: train_bpe(TEXT, 10**6, strict=True), TokenizerError, "no pair is left to merge")


@pytest.mark.parametrize("vocab_size", [100_000, 10**30])
def test_unreached_target_warns_with_the_size_reached(vocab_size):
    with pytest.warns(VocabSizeWarning) as record:
        small = BPETokenizer.train(TEXT, vocab_size)
    message = str(record[0].message)
    assert f"reached {small.vocab_size:,} ids" in message and f"vocab_size={vocab_size:,}" in message
    assert "no pair is left to merge" in message and f"vocab_size={small.vocab_size}" in message
    assert record[0].filename == __file__  # it points at the caller, not into the package
    assert small.vocab_size < vocab_size
    assert small.decode(small.encode(TEXT)) == TEXT


# ----------------------------------------------------------------------------
# encode: wrong type, text that is not Unicode, special tokens, bad special sets
# ----------------------------------------------------------------------------

ENCODE_ROWS = [
    ("bytes", (b"ROMEO",), {}, TokenizerTypeError, "encode() takes a str, not bytes"),
    ("None", (None,), {}, TokenizerTypeError, "encode() takes a str, not NoneType"),
    ("int", (5,), {}, TokenizerTypeError, "takes a str"),
    ("lone surrogate", ("ROMEO\udcff",), {}, TokenizerError, "not valid Unicode: it holds the lone surrogate '\\udcff' at character 5"),
    ("surrogate pair halves", ("a\ud800\udc00",), {}, TokenizerError, "at character 1"),
    ("special token text", (f"ROMEO {ENDOFTEXT}",), {}, SpecialTokenError, "allowed_special={'<|endoftext|>'}"),
    ("allowed_special bare str", ("x",), {"allowed_special": ENDOFTEXT}, TokenizerTypeError, "put it in a set"),
    ("allowed_special int", ("x",), {"allowed_special": 5}, TokenizerTypeError, "allowed_special must be 'all'"),
    ("allowed_special unknown", ("x",), {"allowed_special": {"<|im_start|>"}}, TokenizerError, "not special tokens"),
    ("allowed_special non-str", ("x",), {"allowed_special": {1}}, TokenizerTypeError, "non-empty strings"),
    ("disallowed_special empty str", ("x",), {"disallowed_special": {""}}, TokenizerTypeError, "non-empty strings"),
    ("disallowed_special None", ("x",), {"disallowed_special": None}, TokenizerTypeError, "disallowed_special must be"),
]


@pytest.mark.parametrize("args, kwargs, error, fragment", [r[1:] for r in ENCODE_ROWS], ids=[r[0] for r in ENCODE_ROWS])
def test_encode_refuses(tok, args, kwargs, error, fragment):
    raises(lambda: tok.encode(*args, **kwargs), error, fragment)


def test_other_text_entry_points_refuse(tok):
    raises(lambda: tok.encode_ordinary("ROMEO\udcff"), TokenizerError, "not valid Unicode")
    raises(lambda: tok.encode_ordinary(b"x"), TokenizerTypeError, "takes a str")
    raises(lambda: tok.pre_tokenize(5), TokenizerTypeError, "text must be a str")


def test_special_token_error_is_catchable_apart(tok):
    with pytest.raises(SpecialTokenError) as info:
        tok.encode(ENDOFTEXT)
    assert isinstance(info.value, TokenizerError) and isinstance(info.value, ValueError)
    assert "disallowed_special=()" in str(info.value)


# ----------------------------------------------------------------------------
# decode / decode_bytes / token_texts: ids are ints in range, nothing else
# ----------------------------------------------------------------------------

DECODE_ROWS = [
    ("float", [1.7], TokenizerTypeError, "token id 1.7 (ids[0], a float) is not an integer"),
    ("whole float", [3.0], TokenizerTypeError, "token id 3.0 (ids[0], a float)"),
    ("bool", [True], TokenizerTypeError, "(ids[0], a bool)"),
    ("nan second", [3, NAN], TokenizerTypeError, "token id nan (ids[1], a float)"),
    ("inf", [INF], TokenizerTypeError, "token id inf"),
    ("str id", ["3"], TokenizerTypeError, "token id '3' (ids[0], a str)"),
    ("None id", [None], TokenizerTypeError, "a NoneType"),
    ("float tensor", torch.tensor([1.0]), TokenizerTypeError, "a Tensor) is not an integer"),
    ("bool tensor", torch.tensor([True]), TokenizerTypeError, "is not an integer"),
    ("negative", [-1], TokenizerError, f"token id -1 is not in this vocabulary (valid ids: 0..{VOCAB - 1})"),
    ("one past the end", [5, VOCAB], TokenizerError, f"token id {VOCAB} is not in this vocabulary (valid ids: 0..{VOCAB - 1}); it is ids[1]"),
    ("huge", [10**30], TokenizerError, "is not in this vocabulary"),
    ("a str", "abc", TokenizerTypeError, "ids must be a sequence of token ids"),
    ("bytes", b"abc", TokenizerTypeError, "bytes.decode('utf-8')"),
    ("an int", 5, TokenizerTypeError, "ids must be a sequence of token ids"),
    ("None", None, TokenizerTypeError, "ids must be a sequence of token ids"),
    ("0-d tensor", torch.tensor(3), TokenizerTypeError, "ids must be a sequence of token ids"),
]


@pytest.mark.parametrize("ids, error, fragment", [r[1:] for r in DECODE_ROWS], ids=[r[0] for r in DECODE_ROWS])
@pytest.mark.parametrize("method", ["decode", "decode_bytes", "token_texts"])
def test_decode_refuses(tok, method, ids, error, fragment):
    raises(lambda: getattr(tok, method)(ids), error, fragment)


def test_decode_errors_argument(tok):
    raises(lambda: tok.decode([1], errors="bogus"), TokenizerError, "not a codec error handler")
    raises(lambda: tok.decode([1], errors=None), TokenizerTypeError, "errors must be a str")
    raises(lambda: tok.decode([0xE2], errors="strict"), TokenizerError, "not valid UTF-8")


def test_decode_still_takes_integer_scalars(tok):
    ids = tok.encode("to be")
    assert tok.decode(np.array(ids)) == "to be"
    assert tok.decode(torch.tensor(ids)) == "to be"
    assert tok.decode(iter(ids)) == "to be"
    assert tok.token_texts(torch.tensor(ids)) == tok.token_texts(ids)


# ----------------------------------------------------------------------------
# Tokenizer files: every malformed file reaches the loader's own error; the file is untouched
# ----------------------------------------------------------------------------


def _edit(change):
    def apply(d):
        change(d)
        return d
    return apply


FILE_ROWS = [
    ("pattern does not compile", _edit(lambda d: d.update(pattern="(unclosed")), "does not compile"),
    ("pattern not a string", _edit(lambda d: d.update(pattern=5)), '"pattern" must be a JSON string'),
    ("a JSON list", lambda d: [d], "not an object"),
    ("a JSON number", lambda d: 5, "it holds a JSON int"),
    ("format missing", _edit(lambda d: d.pop("format")), '"format" must be'),
    ("version true", _edit(lambda d: d.update(version=True)), '"version" is True'),
    ("version string", _edit(lambda d: d.update(version="1")), "this llmlab reads version 1"),
    ("merges missing", _edit(lambda d: d.pop("merges")), '"merges" is missing'),
    ("merges an object", _edit(lambda d: d.update(merges={})), '"merges" must be a JSON array'),
    ("special_tokens a list", _edit(lambda d: d.update(special_tokens=[ENDOFTEXT])), '"special_tokens" must be a JSON object'),
    ("special id a string", _edit(lambda d: d.update(special_tokens={ENDOFTEXT: "269"})), '"special_tokens" maps'),
    ("special id negative", _edit(lambda d: d.update(special_tokens={ENDOFTEXT: -1})), "integer ids ≥ 0"),
    ("special id is a rank", _edit(lambda d: d.update(special_tokens={ENDOFTEXT: 3})), "token ids must be unique"),
    ("special name empty", _edit(lambda d: d.update(special_tokens={"": 269})), "non-empty names"),
    ("byte_ids floats", _edit(lambda d: d.update(byte_ids=[float(i) for i in d["byte_ids"]])), "permutation of 0..255"),
    ("byte_ids short", _edit(lambda d: d.update(byte_ids=d["byte_ids"][:-1])), "permutation of 0..255"),
    ("byte_ids repeated", _edit(lambda d: d["byte_ids"].__setitem__(0, 1)), "permutation of 0..255"),
    ("byte_ids a string", _edit(lambda d: d.update(byte_ids="0..255")), '"byte_ids" must be a JSON array'),
    ("merge of three", _edit(lambda d: d["merges"].__setitem__(0, d["merges"][0][:3])), "must be [id, left_id, right_id, text]"),
    ("merge not a list", _edit(lambda d: d["merges"].__setitem__(0, "x")), "must be [id, left_id, right_id, text]"),
    ("merge id a bool", _edit(lambda d: d["merges"][0].__setitem__(1, True)), "with integer ids"),
    ("merge id a float", _edit(lambda d: d["merges"][0].__setitem__(0, 256.0)), "with integer ids"),
    ("merge text a number", _edit(lambda d: d["merges"][0].__setitem__(3, 5)), "must be [id, left_id, right_id, text]"),
    ("duplicate rank", _edit(lambda d: d["merges"].append(list(d["merges"][0]))), "unknown or repeated id"),
    ("duplicate token", _edit(lambda d: d["merges"].append([500, *d["merges"][0][1:]])), "repeats the token"),
    ("unknown left id", _edit(lambda d: d["merges"][0].__setitem__(1, 9999)), "unknown or repeated id"),
    ("merge spells wrong", _edit(lambda d: d["merges"][0].__setitem__(3, "nope")), "does not spell"),
    ("name a number", _edit(lambda d: d.update(name=5)), '"name" must be a string'),
]


@pytest.fixture
def saved(tok, tmp_path) -> tuple[Path, dict]:
    path = tok.save(tmp_path / "tok.json")
    return path, json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("change, fragment", [r[1:] for r in FILE_ROWS], ids=[r[0] for r in FILE_ROWS])
def test_load_refuses_malformed_files(saved, change, fragment):
    path, contents = saved
    path.write_text(json.dumps(change(contents)), encoding="utf-8")
    before = path.read_bytes()
    message = raises(lambda: BPETokenizer.load(path), TokenizerFileError, fragment)
    assert str(path) in message and "is not a valid llmlab tokenizer file" in message
    assert path.read_bytes() == before


def test_merge_of_a_later_id_is_refused(saved):
    path, contents = saved
    last = contents["merges"][-1]
    contents["merges"][-1] = [VOCAB + 100, *last[1:]]  # leaves id last[0] free ...
    contents["merges"].append([last[0], VOCAB + 100, 32, last[3] + " "])  # ... for a merge of a higher id
    path.write_text(json.dumps(contents), encoding="utf-8")
    raises(lambda: BPETokenizer.load(path), TokenizerFileError, "joins ids that are not below its own id")


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"", "truncated or corrupt"),
        (b"\xff\xfe not utf-8", "truncated or corrupt"),
        (b'{"format": "llmlab-bpe", "merges": [', "truncated or corrupt"),
        (b"[" * 100_000 + b"]" * 100_000, "truncated or corrupt"),
    ],
    ids=["empty", "not utf-8", "truncated", "nested too deep"],
)
def test_load_refuses_unreadable_files(tmp_path, raw, fragment):
    path = tmp_path / "tok.json"
    path.write_bytes(raw)
    raises(lambda: BPETokenizer.load(path), TokenizerFileError, fragment)
    assert path.read_bytes() == raw


def test_load_refuses_missing_folder_and_wrong_types(tmp_path):
    raises(lambda: BPETokenizer.load(tmp_path / "missing.json"), TokenizerFileError, "no tokenizer file")
    raises(lambda: BPETokenizer.load(tmp_path), TokenizerFileError, "no tokenizer file")
    raises(lambda: BPETokenizer.load(5), TokenizerTypeError, "path must be a file path")
    raises(lambda: BPETokenizer.load(""), TokenizerTypeError, "non-empty file path")
    raises(lambda: BPETokenizer.load("a\0b"), TokenizerTypeError, "NUL")


# ----------------------------------------------------------------------------
# Saving: a path below a regular file, a folder, somebody else's file
# ----------------------------------------------------------------------------


def test_save_under_a_regular_file(tok, tmp_path):
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    message = raises(lambda: tok.save(user_file / "tok.json"), TokenizerFileError, "is a file, not a folder")
    assert str(user_file) in message and "move" in message
    raises(lambda: tok.save(user_file / "deeper" / "tok.json"), TokenizerFileError, "is a file, not a folder")
    assert user_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_save_never_replaces_a_users_file(tok, tmp_path):
    user_file = tmp_path / "corpus.txt"
    user_file.write_text("my corpus")
    raises(lambda: tok.save(user_file), TokenizerFileError, "is not an llmlab tokenizer file")
    assert user_file.read_text() == "my corpus"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_save_refuses_folders_and_non_paths(tok, tmp_path):
    raises(lambda: tok.save(tmp_path), TokenizerFileError, "it is a folder")
    raises(lambda: tok.save(None), TokenizerTypeError, "path must be a file path")
    raises(lambda: tok.save(3.5), TokenizerTypeError, "path must be a file path")
    raises(lambda: tok.save("a\0b.json"), TokenizerTypeError, "NUL")
    assert list(tmp_path.iterdir()) == []


def test_save_still_replaces_its_own_file_and_makes_folders(tok, tmp_path):
    path = tok.save(tmp_path / "new" / "folder" / "tok.json")
    again = tok.save(path)
    assert BPETokenizer.load(again).ranks == tok.ranks
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]


# ----------------------------------------------------------------------------
# Constructors
# ----------------------------------------------------------------------------


def test_constructors_refuse(tok):
    raises(lambda: BPETokenizer({}), TokenizerError, "all 256 single bytes")
    raises(lambda: BPETokenizer([1, 2]), TokenizerTypeError, "ranks must be a dict")
    raises(lambda: BPETokenizer({"a": 1}), TokenizerTypeError, "non-empty bytes")
    raises(lambda: BPETokenizer({**tok.ranks, b"zz": 1.5}), TokenizerTypeError, "must be an int")
    raises(lambda: BPETokenizer(tok.ranks, {ENDOFTEXT: -3}), TokenizerError, "must be ≥ 0")
    raises(lambda: BPETokenizer(tok.ranks, [ENDOFTEXT]), TokenizerTypeError, "special_tokens must be a dict")
    raises(lambda: BPETokenizer(tok.ranks, pattern="["), TokenizerError, "does not compile")
    raises(lambda: BPETokenizer.from_tiktoken("r50k_base"), TokenizerTypeError, "takes a tiktoken.Encoding")


# ----------------------------------------------------------------------------
# GPT-2's vocabulary: a wrong local file, a damaged cached copy
# ----------------------------------------------------------------------------


def test_gpt2_wrong_local_file_names_both_hashes(tmp_path):
    wrong = tmp_path / "r50k_base.tiktoken"
    wrong.write_bytes(b"not the vocabulary\n")
    message = raises(lambda: gpt2_tokenizer(path=wrong), VocabularyUnavailableError,
                     "is not GPT-2's r50k_base vocabulary (sha256 ")
    assert f"expected {R50K_SHA}" in message and data.sha256_of(wrong) in message
    assert "hash mismatch" not in message.lower() and "download" in message
    assert wrong.read_bytes() == b"not the vocabulary\n"


def test_gpt2_path_arguments(tmp_path):
    raises(lambda: gpt2_encoding(path=tmp_path / "nope.tiktoken"), VocabularyUnavailableError, "no GPT-2 vocabulary file")
    raises(lambda: gpt2_encoding(path=tmp_path), VocabularyUnavailableError, "no GPT-2 vocabulary file")
    raises(lambda: gpt2_encoding(path=5), TokenizerTypeError, "path must be a file path")


@pytest.fixture
def empty_tiktoken(tmp_path, monkeypatch):
    """tiktoken with no encoding loaded and its cache in ``tmp_path``; returns the cache file's path."""
    import tiktoken.registry

    from llmlab.tokenizer import _tiktoken_cache_file

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    return _tiktoken_cache_file()


def test_gpt2_damaged_cache_offline_is_left_in_place(empty_tiktoken, monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise requests.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(requests, "get", no_network)
    empty_tiktoken.write_bytes(b"damaged")
    message = raises(gpt2_tokenizer, VocabularyUnavailableError, "could not be loaded")
    assert data.sha256_of(empty_tiktoken) in message and R50K_SHA in message and "left in place" in message
    assert empty_tiktoken.read_bytes() == b"damaged"
    assert [p.name for p in empty_tiktoken.parent.iterdir()] == [empty_tiktoken.name]


def test_gpt2_damaged_cache_is_kept_when_replaced(empty_tiktoken, monkeypatch, shared_data):
    import requests

    class Response:
        content = (shared_data / "gpt2.tiktoken").read_bytes()

        def raise_for_status(self):
            pass

    monkeypatch.setattr(requests, "get", lambda *args, **kwargs: Response())
    empty_tiktoken.write_bytes(b"damaged")
    with pytest.warns(KeptFileWarning, match="was kept as"):
        enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    kept = data.kept_name(empty_tiktoken, hashlib.sha256(b"damaged").hexdigest())
    assert kept.read_bytes() == b"damaged"
    assert data.sha256_of(empty_tiktoken) == R50K_SHA


# ----------------------------------------------------------------------------
# WordVocab
# ----------------------------------------------------------------------------

WORD_ROWS = [
    ("build bare str", lambda v: WordVocab.build("the cat"), TokenizerTypeError, "pass ['the cat']"),
    ("build non-str", lambda v: WordVocab.build([1, 2]), TokenizerTypeError, "must hold strings only"),
    ("build None", lambda v: WordVocab.build(None), TokenizerTypeError, "texts must be a list of strings"),
    ("min_count zero", lambda v: WordVocab.build(["a"], min_count=0), TokenizerError, "min_count must be ≥ 1"),
    ("min_count float", lambda v: WordVocab.build(["a"], min_count=1.5), TokenizerTypeError, "min_count must be an integer"),
    ("min_count nan", lambda v: WordVocab.build(["a"], min_count=NAN), TokenizerTypeError, "min_count must be an integer"),
    ("max_size one", lambda v: WordVocab.build(["a"], max_size=1), TokenizerError, "max_size must be ≥ 2"),
    ("max_size inf", lambda v: WordVocab.build(["a"], max_size=INF), TokenizerTypeError, "max_size must be an integer"),
    ("words not str", lambda v: WordVocab([1]), TokenizerTypeError, "words must hold strings only"),
    ("words bare str", lambda v: WordVocab("cat"), TokenizerTypeError, "words must be a list of strings"),
    ("split bytes", lambda v: WordVocab.split(b"x"), TokenizerTypeError, "text must be a str"),
    ("encode None", lambda v: v.encode(None), TokenizerTypeError, "text must be a str"),
    ("decode float", lambda v: v.decode([2.5]), TokenizerTypeError, "word id 2.5 (ids[0], a float)"),
    ("decode bool", lambda v: v.decode([True]), TokenizerTypeError, "a bool"),
    ("decode out of range", lambda v: v.decode([2, 99]), TokenizerError, "word id 99 is out of range for this vocabulary"),
    ("decode negative", lambda v: v.decode([-1]), TokenizerError, "out of range"),
    ("decode a str", lambda v: v.decode("2 3"), TokenizerTypeError, "sequence of token ids"),
    ("pad too long", lambda v: v.pad_batch([[2, 3, 4]], length=2), TokenizerError, "truncate"),
    ("pad negative length", lambda v: v.pad_batch([[2]], length=-1), TokenizerError, "length must be ≥ 0"),
    ("pad float length", lambda v: v.pad_batch([[2]], length=2.0), TokenizerTypeError, "length must be an integer"),
    ("pad huge length", lambda v: v.pad_batch([[2]], length=10**20), TokenizerError, "length must be ≤ 1,048,576"),
    ("pad not lists", lambda v: v.pad_batch(5), TokenizerTypeError, "sequences must be a list of id lists"),
    ("pad float id", lambda v: v.pad_batch([[2, 0.5]]), TokenizerTypeError, "word id 0.5"),
]


@pytest.mark.parametrize("call, error, fragment", [r[1:] for r in WORD_ROWS], ids=[r[0] for r in WORD_ROWS])
def test_word_vocab_refuses(words, call, error, fragment):
    raises(lambda: call(words), error, fragment)


# ----------------------------------------------------------------------------
# Corpus and downloads (served on 127.0.0.1; nothing leaves the machine)
# ----------------------------------------------------------------------------


@pytest.fixture
def server(shared_data):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shared_data))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def dead_url() -> str:
    return f"http://127.0.0.1:{closed_port()}/tinyshakespeare.txt"


DOWNLOAD_ROWS = [
    ("url int", dict(url=5), DataError, "url must be a non-empty str"),
    ("url empty", dict(url=""), DataError, "url must be a non-empty str"),
    ("url not a url", dict(url="not a url"), DownloadError, "Give a full address"),
    ("sha not hex", dict(sha256="xyz"), DataError, "sha256 must be None or a hex digest"),
    ("sha int", dict(sha256=5), DataError, "sha256 must be None or a hex digest"),
    ("timeout nan", dict(timeout=NAN), DataError, "timeout must be a finite number"),
    ("timeout inf", dict(timeout=INF), DataError, "timeout must be a finite number"),
    ("timeout zero", dict(timeout=0), DataError, "timeout must be > 0"),
    ("timeout negative", dict(timeout=-1), DataError, "timeout must be > 0"),
    ("timeout str", dict(timeout="5"), DataError, "timeout must be a number"),
    ("dest int", dict(dest=5), DataError, "dest must be a file path"),
    ("dest NUL", dict(dest="a\0b"), DataError, "NUL"),
]


@pytest.mark.parametrize("kwargs, error, fragment", [r[1:] for r in DOWNLOAD_ROWS], ids=[r[0] for r in DOWNLOAD_ROWS])
def test_download_refuses(tmp_path, kwargs, error, fragment):
    args = {"url": dead_url(), "dest": tmp_path / "t.txt", "sha256": SHA, **kwargs}
    raises(lambda: data.download(**args), error, fragment)
    assert list(tmp_path.iterdir()) == []


def test_download_under_a_regular_file(tmp_path):
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    message = raises(lambda: data.download(dead_url(), user_file / "t.txt", SHA), DataError, "is a file, not a folder")
    assert str(user_file) in message
    raises(lambda: data.download(dead_url(), tmp_path, SHA), DataError, "it is a folder")
    assert user_file.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cache_folder_under_a_regular_file(tmp_path, monkeypatch):
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    monkeypatch.setenv(data.CACHE_ENV, str(user_file / "cache"))
    raises(lambda: data.load_corpus(url=dead_url()), DataError, f"set ${data.CACHE_ENV}")
    assert user_file.read_text() == "mine"


def test_damaged_cache_offline_names_both_hashes_and_keeps_it(cache):
    cache.mkdir(parents=True)
    cached = cache / "tinyshakespeare.txt"
    cached.write_text("my own edition")
    got = data.sha256_of(cached)
    message = raises(lambda: data.load_corpus(url=dead_url()), DownloadError, "could not download")
    assert got in message and f"expected {SHA}" in message and "left in place" in message
    assert "load_corpus(path=" in message and "\n" not in message
    assert cached.read_text() == "my own edition" and [p.name for p in cache.iterdir()] == [cached.name]


def test_damaged_cache_with_a_bad_mirror_names_both_checksums(cache, server):
    cache.mkdir(parents=True)
    cached = cache / "tinyshakespeare.txt"
    cached.write_text("my own edition")
    message = raises(lambda: data.load_corpus(url=f"{server}/README.md"), ChecksumError, "was not kept")
    assert data.sha256_of(cached) in message and "left in place" in message
    assert cached.read_text() == "my own edition"


def test_damaged_cache_is_kept_beside_the_fresh_copy(cache, server):
    cache.mkdir(parents=True)
    cached = cache / "tinyshakespeare.txt"
    cached.write_text("my own edition")
    kept = data.kept_name(cached, data.sha256_of(cached))
    with pytest.warns(KeptFileWarning, match="was kept as") as record:
        text = data.load_corpus(url=f"{server}/tinyshakespeare.txt")
    assert record[0].filename == __file__  # it points at the caller, not into the package
    assert text.startswith("First Citizen:")
    assert kept.read_text() == "my own edition"


LOAD_ROWS = [
    ("name int", dict(name=5), DataError, "unknown corpus 5"),
    ("name list", dict(name=[]), DataError, "unknown corpus []"),
    ("name unknown", dict(name="wikitext"), DataError, "known corpora"),
    ("url int", dict(url=5), DataError, "url must be None or an address"),
    ("path int", dict(path=5), DataError, "path must be a file path"),
    ("path empty", dict(path=""), DataError, "non-empty file path"),
    ("path missing", dict(path="/nonexistent/corpus.txt"), DataError, "no corpus file"),
]


@pytest.mark.parametrize("kwargs, error, fragment", [r[1:] for r in LOAD_ROWS], ids=[r[0] for r in LOAD_ROWS])
def test_load_corpus_refuses(kwargs, error, fragment):
    raises(lambda: data.load_corpus(**kwargs), error, fragment)


def test_load_corpus_refuses_folders_and_non_utf8(tmp_path):
    raises(lambda: data.load_corpus(path=tmp_path), DataError, "is a folder, not a corpus file")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    raises(lambda: data.load_corpus(path=latin), DataError, "save it as UTF-8")
    assert latin.read_bytes() == "café".encode("latin-1")


def test_train_val_split_refuses():
    raises(lambda: data.train_val_split([1, 2, 3]), BatchError, "expected a 1-D tensor")
    raises(lambda: data.train_val_split(torch.zeros(2, 2)), BatchError, "shape (2, 2)")
    raises(lambda: data.train_val_split(torch.arange(10), NAN), BatchError, "val_fraction must be a finite number")
    raises(lambda: data.train_val_split(torch.arange(10), "0.1"), BatchError, "val_fraction must be a number")
    raises(lambda: data.train_val_split(torch.arange(10), 0), BatchError, "val_fraction must be in (0, 1)")


def test_every_error_class_is_an_llmlab_error():
    from llmlab import tokenizer

    for module in (tokenizer, data):
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning)
                    and obj.__module__ == module.__name__):
                if not name.startswith("_"):
                    assert issubclass(obj, LlmlabError), f"{module.__name__}.{name}"
    assert issubclass(TokenizerError, ValueError) and issubclass(DataError, RuntimeError)
    assert issubclass(TokenizerTypeError, TypeError) and issubclass(VocabularyUnavailableError, RuntimeError)


# ----------------------------------------------------------------------------
# Arbitrary values: a clean result or an LlmlabError, never anything else
# ----------------------------------------------------------------------------

SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    SURROGATES,
    st.binary(max_size=10),
    st.lists(st.integers(min_value=-5, max_value=400), max_size=8),
    st.lists(st.floats(allow_nan=True), max_size=4),
    st.lists(st.text(max_size=8), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    st.just(()),
    st.just(frozenset()),
    st.just(ENDOFTEXT),
    st.just("all"),
)
SMALL_TEXT = st.one_of(st.text(max_size=40), ANYTHING)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def clean_or_llmlab_error(call) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VocabSizeWarning)
        warnings.simplefilter("ignore", KeptFileWarning)
        try:
            call()
        except LlmlabError:
            pass


@FUZZ
@given(text=SMALL_TEXT, vocab_size=st.one_of(st.integers(min_value=250, max_value=300), ANYTHING),
       special_tokens=st.one_of(st.just((ENDOFTEXT,)), ANYTHING), pattern=st.one_of(st.just(None), ANYTHING))
def test_fuzz_train(text, vocab_size, special_tokens, pattern):
    kwargs = {} if pattern is None else {"pattern": pattern}
    clean_or_llmlab_error(lambda: BPETokenizer.train(text, vocab_size, special_tokens=special_tokens, **kwargs))


@FUZZ
@given(text=SMALL_TEXT, allowed=ANYTHING, disallowed=st.one_of(st.just("all"), ANYTHING), ids=ANYTHING)
def test_fuzz_encode_decode(tok, text, allowed, disallowed, ids):
    clean_or_llmlab_error(lambda: tok.encode(text))
    clean_or_llmlab_error(lambda: tok.encode(text, allowed_special=allowed, disallowed_special=disallowed))
    clean_or_llmlab_error(lambda: tok.encode_ordinary(text))
    clean_or_llmlab_error(lambda: tok.decode(ids))
    clean_or_llmlab_error(lambda: tok.decode(ids, errors=text))
    clean_or_llmlab_error(lambda: tok.decode_bytes(ids))
    clean_or_llmlab_error(lambda: tok.token_texts(ids))


@FUZZ
@given(texts=ANYTHING, min_count=ANYTHING, max_size=ANYTHING, ids=ANYTHING, length=ANYTHING)
def test_fuzz_word_vocab(words, texts, min_count, max_size, ids, length):
    clean_or_llmlab_error(lambda: WordVocab.build(texts))
    clean_or_llmlab_error(lambda: WordVocab.build(["the cat"], min_count=min_count, max_size=max_size))
    clean_or_llmlab_error(lambda: WordVocab(texts))
    clean_or_llmlab_error(lambda: words.encode(texts))
    clean_or_llmlab_error(lambda: words.decode(ids))
    clean_or_llmlab_error(lambda: words.pad_batch(ids, length))
    clean_or_llmlab_error(lambda: words.pad_batch([ids], length))


URLS = st.one_of(ANYTHING, st.sampled_from(["", "not a url", "ftp://127.0.0.1:1/x", "http://", "http://127.0.0.1:1/x"]))


@FUZZ
@given(name=ANYTHING, path=st.one_of(st.none(), ANYTHING), url=st.one_of(st.none(), URLS),
       dest_name=ANYTHING, sha256=st.one_of(st.none(), ANYTHING), timeout=ANYTHING)
def test_fuzz_corpus_and_download(tmp_path, name, path, url, dest_name, sha256, timeout):
    if isinstance(path, str) and Path(path).is_file():  # an arbitrary name that happens to exist here
        path = None
    if url is None or (isinstance(url, str) and ":" in url):  # never the network: a refused local address
        url = "http://127.0.0.1:1/x"
    clean_or_llmlab_error(lambda: data.load_corpus(name, path=path, url=url))
    folder = tmp_path / "downloads"
    if isinstance(dest_name, str):  # a plain file name inside the test's folder, never elsewhere
        dest_name = folder / ("".join(c for c in dest_name if c.isalnum())[:20] or "x")
    clean_or_llmlab_error(lambda: data.download(url, dest_name, sha256, timeout=1 if timeout is None else timeout))
    if folder.exists():  # nothing but finished downloads (none here: every address is dead or refused)
        assert not [p for p in folder.rglob("*") if p.is_file()]

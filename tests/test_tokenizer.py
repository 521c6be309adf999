"""Byte-level BPE, special tokens, save/load, the tiktoken bridge, GPT-2, the word vocabulary."""

from __future__ import annotations

import collections
import json

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.tokenizer import (
    ENDOFTEXT,
    GPT2_PATTERN,
    BPETokenizer,
    TokenizerError,
    TokenizerFileError,
    VocabularyUnavailableError,
    WordVocab,
    bpe_merge,
    gpt2_encoding,
    gpt2_tokenizer,
    train_bpe,
)

SAMPLES = [
    "Hello, world! It's 2026.",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "안녕하세요, 세계! 토큰화는 재미있어요.",
    "emoji 🎉🚀👩‍👩‍👧 and flags 🇰🇷",
    "  leading and trailing spaces   \n\n",
    "ÀÉÎÕÜ naïve café 北京 Ελληνικά",
    "",
]


@pytest.fixture(scope="module")
def tok(shakespeare) -> BPETokenizer:
    return BPETokenizer.train(shakespeare[:200_000], 512)


@pytest.fixture(scope="module")
def gpt2(shared_data) -> BPETokenizer:
    return gpt2_tokenizer()


# -- training ----------------------------------------------------------------------


def test_first_merge_is_the_most_frequent_pair():
    text = "low lower lowest low low"
    ranks, merges = train_bpe(text, 258, special_tokens=())
    pieces = [p.encode() for p in regex.findall(GPT2_PATTERN, text)]
    pairs = collections.Counter(pair for p in pieces for pair in zip(p, p[1:]))
    best = max(pairs.values())
    assert pairs[merges[0]] == best
    assert len(ranks) == 258 and len(merges) == 2


def test_training_is_deterministic_and_sized(tok, shakespeare):
    again = BPETokenizer.train(shakespeare[:200_000], 512)
    assert again.ranks == tok.ranks
    assert tok.vocab_size == 512
    assert tok.special_tokens == {ENDOFTEXT: 511}
    assert tok.eot_id == 511


def test_merges_never_cross_pieces(tok):
    for token in tok.ranks:
        text = token.decode("utf-8", errors="ignore")
        if text:
            assert len(regex.findall(GPT2_PATTERN, text)) <= 1, token


def test_compresses_text(tok, shakespeare):
    sample = shakespeare[300_000:310_000]
    assert len(tok.encode(sample)) < 0.6 * len(sample.encode())  # 512 ids: ~1.8 bytes per token


def test_rare_word_splits_into_known_subwords(tok):
    ids = tok.encode(" unhappiness")
    assert 1 < len(ids) < len(" unhappiness")
    assert "".join(tok.token_texts(ids)) == " unhappiness"


def test_vocab_size_too_small():
    with pytest.raises(TokenizerError, match="at least 257"):
        BPETokenizer.train("some text", 255)


def test_empty_training_text():
    with pytest.raises(TokenizerError, match="empty"):
        BPETokenizer.train("", 300)


def test_bpe_merge_uses_lowest_rank_first():
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"bc"] = 256
    ranks[b"ab"] = 257
    # "bc" has the lower rank, so "abc" becomes a + bc, not ab + c.
    assert bpe_merge(b"abc", ranks) == [ord("a"), 256]


# -- encode / decode -------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_samples(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_property(tok, text):
    ids = tok.encode(text, disallowed_special=())
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tiktoken_export_round_trip_and_same_ids(tok, text):
    enc = tok.to_tiktoken()
    ids = enc.encode(text, disallowed_special=())
    assert ids == tok.encode(text, disallowed_special=())
    assert enc.decode(ids) == text


def test_decode_out_of_range(tok):
    with pytest.raises(TokenizerError, match=r"token id 512 is not in this vocabulary \(valid ids: 0\.\.511\)"):
        tok.decode([5, 512])
    with pytest.raises(TokenizerError, match="-1"):
        tok.decode([-1])


def test_encode_needs_str(tok):
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(b"bytes")


# -- special tokens --------------------------------------------------------------------


def test_special_token_disallowed_by_default(tok):
    with pytest.raises(TokenizerError, match=r"allowed_special=\{'<\|endoftext\|>'\}"):
        tok.encode(f"one{ENDOFTEXT}two")


def test_special_token_allowed(tok):
    ids = tok.encode(f"one{ENDOFTEXT}two", allowed_special={ENDOFTEXT})
    assert ids.count(tok.eot_id) == 1
    assert ids == tok.encode("one") + [tok.eot_id] + tok.encode("two")
    assert tok.decode(ids) == f"one{ENDOFTEXT}two"
    assert tok.encode(ENDOFTEXT, allowed_special="all") == [tok.eot_id]


def test_special_token_as_plain_text(tok):
    ids = tok.encode(ENDOFTEXT, disallowed_special=())
    assert tok.eot_id not in ids and len(ids) > 1
    assert tok.decode(ids) == ENDOFTEXT


def test_unknown_allowed_special(tok):
    with pytest.raises(TokenizerError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|im_start|>"})


# -- save / load -----------------------------------------------------------------------------


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "tok.json")
    again = BPETokenizer.load(path)
    assert again.ranks == tok.ranks
    assert again.special_tokens == tok.special_tokens
    assert again.pattern == tok.pattern
    text = path.read_text(encoding="utf-8")
    assert '"format": "llmlab-bpe"' in text
    # Human-readable: one merge per line, with the token's text.
    first = tok.merges()[0]
    spelled = tok.decode([first[2]])
    assert f"[{first[2]}, {first[0]}, {first[1]}, {json.dumps(spelled)}]" in text


def test_load_truncated_file(tok, tmp_path):
    path = tok.save(tmp_path / "tok.json")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(TokenizerFileError, match="truncated or corrupt"):
        BPETokenizer.load(path)


def test_load_corrupt_merge(tok, tmp_path):
    path = tok.save(tmp_path / "tok.json")
    data = json.loads(path.read_text())
    data["merges"][3][3] = "definitely not this"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerFileError, match="does not spell"):
        BPETokenizer.load(path)


def test_load_wrong_format_and_missing(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(TokenizerFileError, match='"format" must be'):
        BPETokenizer.load(path)
    with pytest.raises(TokenizerFileError, match="no tokenizer file"):
        BPETokenizer.load(tmp_path / "missing.json")


def test_save_is_atomic(tok, tmp_path):
    path = tok.save(tmp_path / "tok.json")
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]
    assert BPETokenizer.load(path).ranks == tok.ranks


# -- GPT-2 -------------------------------------------------------------------------------


def test_gpt2_pattern_is_tiktokens(shared_data):
    assert gpt2_encoding()._pat_str == GPT2_PATTERN


def test_gpt2_ids_equal_tiktoken_on_whole_corpus(gpt2, shakespeare):
    enc = gpt2_encoding()
    ids = gpt2.encode(shakespeare)
    assert ids == enc.encode(shakespeare)
    assert gpt2.decode(ids) == shakespeare


@pytest.mark.parametrize("text", SAMPLES)
def test_gpt2_ids_equal_tiktoken_on_samples(gpt2, text):
    enc = gpt2_encoding()
    assert gpt2.encode(text) == enc.encode(text)
    assert gpt2.decode(gpt2.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_gpt2_ids_equal_tiktoken_property(gpt2, text):
    enc = gpt2_encoding()
    assert gpt2.encode(text, disallowed_special=()) == enc.encode(text, disallowed_special=())


def test_gpt2_known_ids(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]


def test_gpt2_save_load_round_trip(gpt2, tmp_path):
    again = BPETokenizer.load(gpt2.save(tmp_path / "gpt2.json"))
    assert again.ranks == gpt2.ranks


def test_gpt2_from_local_file(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    enc = gpt2_encoding(path=shared_data / "gpt2.tiktoken")
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257


def test_gpt2_offline_error_says_what_to_do(tmp_path, monkeypatch):
    import requests
    import tiktoken.registry

    def no_network(*args, **kwargs):
        raise requests.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(VocabularyUnavailableError) as info:
        gpt2_tokenizer()
    message = str(info.value)
    assert "r50k_base.tiktoken" in message and "path=" in message and "TIKTOKEN_CACHE_DIR" in message


def test_gpt2_missing_local_file(tmp_path):
    with pytest.raises(VocabularyUnavailableError, match="no GPT-2 vocabulary file"):
        gpt2_encoding(path=tmp_path / "nope.tiktoken")


# -- word vocabulary ------------------------------------------------------------------------


def test_word_vocab_ids():
    vocab = WordVocab.build(["the cat sat on the mat", "the dog sat"])
    assert vocab.itos[:3] == ["<pad>", "<unk>", "the"]
    assert vocab.encode("the cat") == [2, vocab.stoi["cat"]]
    assert vocab.encode("the zebra") == [2, WordVocab.UNK_ID]
    assert vocab.decode(vocab.encode("the dog sat")) == "the dog sat"


def test_word_vocab_padding():
    vocab = WordVocab.build(["a b c", "a"])
    ids, mask = vocab.pad_batch([vocab.encode("a b c"), vocab.encode("a")])
    assert ids[1] == [vocab.stoi["a"], 0, 0]
    assert mask == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="truncate"):
        vocab.pad_batch([[2, 3, 4]], length=2)


def test_word_vocab_limits_and_errors():
    vocab = WordVocab.build(["a a a b b c"], max_size=4)
    assert vocab.itos == ["<pad>", "<unk>", "a", "b"]
    assert vocab.encode("c") == [1]
    with pytest.raises(TokenizerError, match="out of range"):
        vocab.decode([4])
    with pytest.raises(ValueError, match="max_size"):
        WordVocab.build(["a"], max_size=1)

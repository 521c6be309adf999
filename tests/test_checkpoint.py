"""Checkpoints: bit-exact round trip, atomic writes, clear errors; the built-in model."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab import Transformer, get_config
from llmlab.checkpoint import CheckpointError, builtin_checkpoint, load_checkpoint, read_config, save_checkpoint
from llmlab.tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train("the quick brown fox jumps over the lazy dog " * 30, 280)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(get_config("course-tiny").replace(vocab_size=280, d_model=32, n_layers=2, n_heads=2))


def test_round_trip_is_bit_exact(tmp_path, model, tok):
    save_checkpoint(tmp_path / "ck", model, tok, meta={"note": "hi"})
    ckpt = load_checkpoint(tmp_path / "ck")
    assert ckpt.config == model.config and ckpt.meta == {"note": "hi"}
    assert list(ckpt.model.state_dict()) == list(model.state_dict())  # zip below would stop at the shorter
    for (name, a), (_, b) in zip(model.state_dict().items(), ckpt.model.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([tok.encode("the lazy dog")])
    # Exact: the same weights through the same operations on the same machine.
    assert torch.equal(model.eval()(ids).logits, ckpt.model(ids).logits)
    assert ckpt.tokenizer.ranks == tok.ranks
    assert ckpt.model.lm_head.weight is ckpt.model.token_embedding.weight  # still tied


def test_overwrite_failure_keeps_the_old_checkpoint(tmp_path, model, tok, monkeypatch):
    target = save_checkpoint(tmp_path / "ck", model, tok, meta={"version": 1})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(BPETokenizer, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, model, tok, meta={"version": 2})
    assert read_config(target)[1] == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folders left


def test_the_config_binds_the_tokenizer(tmp_path, model, tok):
    from llmlab.checkpoint import TOKENIZER_HASH, tokenizer_sha256

    path = save_checkpoint(tmp_path / "ck", model, tok)
    assert json.loads((path / "config.json").read_text())[TOKENIZER_HASH] == tokenizer_sha256(tok)
    other = BPETokenizer.train("pack my box with five dozen liquor jugs " * 30, 280)
    assert tokenizer_sha256(other) != tokenizer_sha256(tok)
    other.save(path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="not the tokenizer these weights were trained with"):
        load_checkpoint(path)


def test_missing_and_incomplete(tmp_path, model, tok):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_checkpoint(tmp_path / "nothing")
    path = save_checkpoint(tmp_path / "ck", model, tok)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint: missing model.safetensors"):
        load_checkpoint(path)


def test_corrupt_weights(tmp_path, model, tok):
    path = save_checkpoint(tmp_path / "ck", model, tok)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_mismatched_config(tmp_path, model, tok):
    path = save_checkpoint(tmp_path / "ck", model, tok)
    info = json.loads((path / "config.json").read_text())
    info["model"]["d_model"] = 64
    (path / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="do not match its config.json"):
        load_checkpoint(path)


def test_corrupt_config_and_tokenizer(tmp_path, model, tok):
    path = save_checkpoint(tmp_path / "ck", model, tok)
    (path / "tokenizer.json").write_text("{ truncated")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_checkpoint(path)
    (path / "config.json").write_text("not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        load_checkpoint(path)


def test_builtin_checkpoint_is_small_and_loads():
    folder = builtin_checkpoint()
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 20 * 2**20
    ckpt = load_checkpoint()
    assert ckpt.config.name == "course-tiny"
    assert ckpt.meta["val_loss_per_char"] <= 1.75
    assert not (folder / "trainer_state.pt").exists()  # ship weights only

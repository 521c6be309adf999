"""The full Transformer: shapes, causality, loss, init, determinism, golden values, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.config import ModelConfig, get_config
from llmlab.layers import TokenIdError
from llmlab.model import ContextLengthError, ModelInputError, ModelOutput, Transformer

KINDS = {
    "gpt2-style": dict(),
    "sinusoidal-relu": dict(positional="sinusoidal", mlp="relu"),
    "llama-style": dict(norm="rmsnorm", mlp="swiglu", positional="rope", n_kv_heads=2, bias=False,
                        tie_embeddings=False),
    "qwen3-style": dict(norm="rmsnorm", mlp="swiglu", positional="rope", n_kv_heads=1, head_dim=16,
                        qk_norm=True, bias=False, norm_eps=1e-6),
    "no-positions": dict(positional="none", bias=False),
}


def small(**changes) -> ModelConfig:
    base = dict(name="small", vocab_size=64, context_length=12, d_model=32, n_layers=2, n_heads=4)
    base.update(changes)
    return ModelConfig(**base)


def model_of(kind: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small(**KINDS[kind])).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_shapes(kind):
    model = model_of(kind)
    ids = torch.randint(0, 64, (3, 10))
    out = model(ids)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, 10, 64) and out.loss is None and out.attentions is None
    out = model(ids, return_attention=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, 10, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_future_tokens_change_no_earlier_logit(kind):
    model = model_of(kind)
    ids = torch.randint(0, 64, (2, 10))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 64
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert torch.equal(before[:, :6], after[:, :6]) or torch.allclose(before[:, :6], after[:, :6], atol=1e-6)
    assert not torch.allclose(before[:, 6:], after[:, 6:], atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2-style", "qwen3-style"])
def test_attention_weights_above_diagonal_are_exactly_zero(kind):
    out = model_of(kind)(torch.randint(0, 64, (1, 8)), return_attention=True)
    above = torch.ones(8, 8, dtype=torch.bool).triu(diagonal=1)
    for weights in out.attentions:
        assert torch.all(weights[..., above] == 0.0)
        assert torch.all(weights[..., ~above] > 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_path_gives_the_same_logits(kind):
    model = model_of(kind)
    ids = torch.randint(0, 64, (2, 9))
    assert torch.allclose(model(ids).logits, model(ids, return_attention=True).logits, atol=1e-5)


def test_loss_is_mean_cross_entropy_with_ignore_index():
    model = model_of("gpt2-style")
    ids = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    out = model(ids, targets=targets)
    expected = F.cross_entropy(out.logits.reshape(-1, 64), targets.reshape(-1))
    assert torch.allclose(out.loss, expected)
    masked = targets.clone()
    masked[:, :5] = -100  # only the last 3 positions count
    kept = F.cross_entropy(out.logits[:, 5:].reshape(-1, 64), targets[:, 5:].reshape(-1))
    assert torch.allclose(model(ids, targets=masked).loss, kept)


def test_initial_loss_is_close_to_uniform_guess():
    torch.manual_seed(0)
    model = Transformer(get_config("course-tiny", n_layers=2)).eval()
    ids = torch.randint(0, 1024, (4, 32))
    loss = model(ids, targets=torch.randint(0, 1024, (4, 32))).loss.item()
    assert abs(loss - math.log(1024)) < 0.3  # small init: near-uniform predictions


def test_tied_and_untied_heads():
    tied = model_of("gpt2-style")
    assert tied.lm_head.weight is tied.token_embedding.weight
    untied = model_of("llama-style")
    assert untied.lm_head.weight is not untied.token_embedding.weight
    assert "lm_head.weight" in untied.state_dict()


def test_init_statistics():
    torch.manual_seed(0)
    model = Transformer(get_config("course-tiny"))  # 4 layers
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * 4)
    assert model.blocks[0].attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.blocks[3].mlp.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.all(model.blocks[0].attn.q_proj.bias == 0)
    assert torch.all(model.final_norm.weight == 1)


def test_deterministic_given_seed():
    a, b, c = model_of("llama-style", 1), model_of("llama-style", 1), model_of("llama-style", 2)
    for (name, pa), (_, pb), (_, pc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.token_embedding.weight, c.token_embedding.weight)


def test_rope_model_logits_are_shift_invariant():
    """With RoPE only relative positions matter: starting at position 0 or 3 gives the same logits."""
    model = model_of("llama-style")
    ids = torch.randint(0, 64, (1, 6))
    shifted = model(ids, positions=torch.arange(3, 9)).logits
    assert torch.allclose(model(ids).logits, shifted, atol=1e-5)
    learned = model_of("gpt2-style")  # absolute positions: the shift matters
    assert not torch.allclose(learned(ids).logits, learned(ids, positions=torch.arange(3, 9)).logits, atol=1e-4)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = Transformer(small(dropout=0.5))
    ids = torch.randint(0, 64, (1, 8))
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_num_parameters():
    model = model_of("llama-style")  # untied, RoPE
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    assert model.num_parameters(non_embedding=True) == total - 2 * 64 * 32
    gpt = model_of("gpt2-style")  # tied (counted once), learned positions
    assert gpt.num_parameters(non_embedding=True) == gpt.num_parameters() - 64 * 32 - 12 * 32


def test_from_preset():
    assert Transformer.from_preset("course-tiny", n_layers=1).config.n_layers == 1


# Golden values: course-tiny, seed 0, a fixed input.  They change only if the
# architecture, the init or the course-tiny preset change.  To regenerate, run
# the body of this test and print `out.logits[0, -1, :4]`, `out.logits[1, 3, 100:103]`
# and `out.loss`, then paste the numbers here (and say why in the commit message).
def test_golden_course_tiny_forward():
    torch.manual_seed(0)
    model = Transformer(get_config("course-tiny")).eval()
    ids = (torch.arange(16).view(2, 8) * 37 + 5) % 1024
    with torch.no_grad():
        out = model(ids, targets=ids.roll(-1, dims=1))
    expected_last = torch.tensor([-0.35763824, 0.05719193, 0.16703209, 0.37952650])
    expected_mid = torch.tensor([-0.02462242, -0.38231713, -0.13121869])
    assert torch.allclose(out.logits[0, -1, :4], expected_last, atol=1e-4)
    assert torch.allclose(out.logits[1, 3, 100:103], expected_mid, atol=1e-4)
    assert out.loss.item() == pytest.approx(7.1789427, abs=1e-4)


# --- errors -------------------------------------------------------------------------------


def test_sequence_longer_than_context_is_a_clear_error():
    model = model_of("gpt2-style")
    with pytest.raises(ContextLengthError,
                       match=r"sequence of 13 tokens is longer than context_length=12: keep the last 12 "
                             r"tokens \(ids\[:, -12:\]\) or build the model with a larger context_length"):
        model(torch.zeros(1, 13, dtype=torch.long))
    assert issubclass(ContextLengthError, ValueError)


def test_positions_beyond_context_are_a_clear_error():
    model = model_of("llama-style")
    with pytest.raises(ContextLengthError, match=r"positions must be in 0..11 \(context_length=12\), got up to 13"):
        model(torch.zeros(1, 4, dtype=torch.long), positions=torch.arange(10, 14))
    with pytest.raises(ValueError, match=r"positions must have shape \[seq\] or \[batch, seq\]"):
        model(torch.zeros(1, 4, dtype=torch.long), positions=torch.arange(5))


def test_token_id_out_of_range_is_a_clear_error():
    model = model_of("gpt2-style")
    ids = torch.tensor([[1, 2, 64]])
    with pytest.raises(TokenIdError, match=r"token id 64 at position \(0, 2\) is out of range: .*0..63"):
        model(ids)


def test_wrong_dtype_and_shape_are_clear_errors():
    model = model_of("gpt2-style")
    with pytest.raises(TypeError, match=r"ids must be integer token ids \(torch.long\), got dtype torch.float32"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"ids must have shape \[batch, seq\], got shape \(4,\); .*unsqueeze\(0\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="ids must be a torch.Tensor"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match="ids is empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must have the shape of ids, \(1, 4\); got \(1, 3\)"):
        model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 3, dtype=torch.long))


def test_logits_to_keep_gives_the_last_logits_only():
    torch.manual_seed(0)
    model = Transformer(get_config("course-tiny", n_layers=2)).eval()
    ids = torch.randint(0, 1024, (2, 9))
    full = model(ids).logits
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 1024)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
    assert model(ids, logits_to_keep=3).logits.shape == (2, 3, 1024)
    picked = model(ids, logits_to_keep=torch.tensor([0, 4])).logits  # chosen positions, as transformers allows
    torch.testing.assert_close(picked, full[:, [0, 4]], atol=1e-5, rtol=0)
    assert model(ids, logits_to_keep=torch.tensor([], dtype=torch.long)).logits.shape == (2, 0, 1024)
    with pytest.raises(ModelInputError, match="the loss needs all of them"):
        model(ids, targets=ids, logits_to_keep=1)

"""llmlab.layers: each building block checked against a by-hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.config import ModelConfig
from llmlab.layers import (
    MLP,
    CausalSelfAttention,
    DecoderBlock,
    LayerNorm,
    LearnedPositions,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositions,
    SwiGLU,
    TokenEmbedding,
    TokenIdError,
    apply_rope,
    causal_mask,
    make_mlp,
    make_norm,
    rope_frequencies,
    scaled_dot_product_attention_reference,
    sinusoidal_table,
)


def cfg(**changes) -> ModelConfig:
    base = dict(name="t", vocab_size=50, context_length=16, d_model=32, n_layers=2, n_heads=4)
    base.update(changes)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- embedding ----------------------------------------------------------------------------


def test_token_embedding_selects_rows():
    emb = TokenEmbedding(100, 8)
    out = emb(torch.tensor([[42, 0, 99]]))
    assert out.shape == (1, 3, 8)
    assert torch.equal(out[0, 0], emb.weight[42]) and torch.equal(out[0, 2], emb.weight[99])


@pytest.mark.parametrize("bad", [100, -1])
def test_token_embedding_rejects_ids_out_of_range(bad):
    emb = TokenEmbedding(100, 8)
    with pytest.raises(TokenIdError, match=rf"token id {bad} at position \(0, 1\) is out of range: .*"
                                           r"vocab_size=100, so ids must be in 0..99"):
        emb(torch.tensor([[3, bad, 5]]))
    assert issubclass(TokenIdError, ValueError) and issubclass(TokenIdError, IndexError)


# --- sinusoidal and learned positions ------------------------------------------------------


def test_sinusoidal_table_hand_computed_points():
    table = sinusoidal_table(50, 6)
    assert table.shape == (50, 6)
    assert torch.equal(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))  # sin 0, cos 0: exact
    # PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same), d = 6.
    # The table is float32 (rounding: up to 3e-8, measured 2.9e-8); a wrong formula is off by >1e-3.
    assert table[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert table[1, 1].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert table[7, 2].item() == pytest.approx(math.sin(7 / 10000 ** (2 / 6)), abs=1e-6)
    assert table[49, 5].item() == pytest.approx(math.cos(49 / 10000 ** (4 / 6)), abs=1e-6)


def test_sinusoidal_table_odd_dim():
    table = sinusoidal_table(4, 5)
    assert table.shape == (4, 5)
    assert table[3, 4].item() == pytest.approx(math.sin(3 / 10000 ** (4 / 5)), abs=1e-6)


def test_sinusoidal_positions_have_no_parameters_and_index_by_position():
    pos = SinusoidalPositions(16, 8)
    assert list(pos.parameters()) == [] and pos.state_dict() == {}
    out = pos(torch.tensor([3, 0, 15]))
    assert torch.equal(out, sinusoidal_table(16, 8)[[3, 0, 15]])


def test_learned_positions_and_range_check():
    pos = LearnedPositions(16, 8)
    assert sum(p.numel() for p in pos.parameters()) == 16 * 8
    assert torch.equal(pos(torch.tensor([5])), pos.weight[5:6])
    with pytest.raises(ValueError, match=r"positions must be in 0..15 .* got 0..16"):
        pos(torch.arange(17))


# --- RoPE ---------------------------------------------------------------------------------


def test_rope_matches_complex_rotation():
    """Pair i is (x[i], x[i + d/2]); as a complex number it is multiplied by e^{j * m * theta^(-2i/d)}."""
    head_dim, theta = 8, 10000.0
    x = torch.randn(1, 1, 5, head_dim, dtype=torch.float64)
    cos, sin = rope_frequencies(head_dim, 5, theta)
    out = apply_rope(x, cos.double(), sin.double(), torch.arange(5))
    half = head_dim // 2
    for m in range(5):
        for i in range(half):
            z = complex(x[0, 0, m, i], x[0, 0, m, i + half])
            rotated = z * complex(math.cos(m * theta ** (-2 * i / head_dim)),
                                  math.sin(m * theta ** (-2 * i / head_dim)))
            assert out[0, 0, m, i].item() == pytest.approx(rotated.real, abs=1e-6)
            assert out[0, 0, m, i + half].item() == pytest.approx(rotated.imag, abs=1e-6)


def test_rope_dot_product_depends_only_on_offset():
    head_dim = 16
    rope = RotaryEmbedding(head_dim, 64, theta=10000.0)
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)

    def score(m: int, n: int) -> float:
        qm = rope(q, torch.tensor([m]))
        kn = rope(k, torch.tensor([n]))
        return (qm * kn).sum().item()

    for m, n, s in [(5, 2, 10), (3, 3, 40), (0, 7, 13)]:
        assert score(m + s, n + s) == pytest.approx(score(m, n), abs=1e-4)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # ...but it does depend on the offset


def test_rope_position_zero_is_identity_and_batched_positions():
    rope = RotaryEmbedding(8, 32)
    x = torch.randn(2, 3, 4, 8)
    assert torch.equal(rope(x, torch.zeros(4, dtype=torch.long)), x)
    per_row = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    out = rope(x, per_row)
    # Element-wise products and sums of the same numbers: equal bit for bit, whatever the kernel.
    assert torch.allclose(out[1:], rope(x[1:], torch.arange(10, 14)))
    assert torch.allclose(out[:1], rope(x[:1], torch.arange(4)))
    with pytest.raises(ValueError, match="positions must be in 0..31"):
        rope(x, torch.arange(29, 33))


def test_rope_matches_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf_config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
                                         max_position_embeddings=32)
    head_dim = 16
    q, k = torch.randn(2, 4, 6, head_dim), torch.randn(2, 2, 6, head_dim)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_config)(q, positions)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    ours = RotaryEmbedding(head_dim, 32, theta=500000.0)
    assert torch.allclose(ours(q, positions), hf_q, atol=1e-6)
    assert torch.allclose(ours(k, positions), hf_k, atol=1e-6)


# --- attention ----------------------------------------------------------------------------


def test_causal_mask():
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(4), expected)
    # two new queries at the end of five keys (KV-cache decoding): they see 0..3 and 0..4
    assert torch.equal(causal_mask(2, 5), torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))


def test_reference_attention_weights_are_causal_and_normalized():
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    out, weights = scaled_dot_product_attention_reference(q, k, v)
    above = ~causal_mask(5)
    assert torch.all(weights[..., above] == 0.0)  # exp(-inf) is exactly 0
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 5))  # within 1e-5 of 1; measured 6e-8
    assert torch.allclose(out[:, :, 0], v[:, :, 0])  # the first token can only see itself: weight exactly 1
    # by hand for the last query: softmax(q.k / sqrt(d)) @ v over all keys
    scores = (q[0, 1, -1] @ k[0, 1].T) / 2.0
    assert torch.allclose(out[0, 1, -1], torch.softmax(scores, -1) @ v[0, 1], atol=1e-6)


def test_reference_attention_equals_pytorch_sdpa():
    # PyTorch's fused kernel sums in another order: up to 3.6e-7 apart (measured, AVX512 and portable kernels).
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    out, _ = scaled_dot_product_attention_reference(q, k, v, causal=True)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    out, weights = scaled_dot_product_attention_reference(q, k, v, causal=False)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    assert torch.all(weights > 0)


def test_reference_attention_groups_kv_heads():
    q = torch.randn(1, 4, 3, 8)
    k, v = torch.randn(2, 1, 2, 3, 8).unbind(0)  # 2 KV heads for 4 query heads
    out, _ = scaled_dot_product_attention_reference(q, k, v)
    # query heads 0, 1 use KV head 0; heads 2, 3 use KV head 1
    out_head3, _ = scaled_dot_product_attention_reference(q[:, 3:4], k[:, 1:2], v[:, 1:2])
    assert torch.allclose(out[:, 3:4], out_head3, atol=1e-5)  # a wrong grouping is off by ~1


@pytest.mark.parametrize(
    "changes",
    [dict(), dict(n_kv_heads=2), dict(n_kv_heads=1), dict(positional="rope", n_kv_heads=2),
     dict(positional="rope", qk_norm=True, head_dim=16, bias=False)],
)
def test_attention_fused_path_equals_reference_path(changes):
    attn = CausalSelfAttention(cfg(**changes)).eval()
    x = torch.randn(2, 7, 32)
    fast, no_weights = attn(x)
    slow, weights = attn(x, return_weights=True)
    assert no_weights is None and weights.shape == (2, 4, 7, 7)
    assert fast.shape == (2, 7, 32)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_gqa_projection_shapes():
    mha = CausalSelfAttention(cfg())
    gqa_full = CausalSelfAttention(cfg(n_kv_heads=4))
    mqa = CausalSelfAttention(cfg(n_kv_heads=1))
    x = torch.randn(1, 5, 32)
    assert mha(x)[0].shape == gqa_full(x)[0].shape == mqa(x)[0].shape
    assert gqa_full.k_proj.weight.shape == mha.k_proj.weight.shape == (32, 32)
    assert mqa.k_proj.weight.shape == mqa.v_proj.weight.shape == (8, 32)  # one head of 8
    assert mqa.q_proj.weight.shape == (32, 32)


def test_attention_is_causal_future_tokens_do_not_change_the_past():
    for changes in (dict(), dict(positional="rope", n_kv_heads=2)):
        attn = CausalSelfAttention(cfg(**changes)).eval()
        x = torch.randn(1, 6, 32)
        y = x.clone()
        y[:, 4] += 5.0  # change token 4
        out_x, _ = attn(x)
        out_y, _ = attn(y)
        assert torch.allclose(out_x[:, :4], out_y[:, :4], atol=1e-6)
        assert not torch.allclose(out_x[:, 4:], out_y[:, 4:], atol=1e-3)


def test_rope_attention_depends_only_on_relative_positions():
    attn = CausalSelfAttention(cfg(positional="rope")).eval()
    x = torch.randn(1, 5, 32)
    out0, _ = attn(x, positions=torch.arange(5))
    out7, _ = attn(x, positions=torch.arange(7, 12))
    assert torch.allclose(out0, out7, atol=1e-5)


def test_qk_norm_modules_exist_only_when_asked():
    with_norm = CausalSelfAttention(cfg(qk_norm=True))
    assert isinstance(with_norm.q_norm, RMSNorm) and with_norm.q_norm.weight.shape == (8,)
    assert CausalSelfAttention(cfg()).q_norm is None


# --- norms --------------------------------------------------------------------------------


def test_layernorm_by_hand():
    norm = LayerNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6))
        norm.bias.copy_(torch.randn(6))
    x = torch.randn(3, 6) * 4 + 2
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance
    expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
    assert torch.allclose(norm(x), expected, atol=1e-5)
    assert LayerNorm(6, bias=False).bias is None


def test_rmsnorm_by_hand():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6))
    x = torch.randn(3, 6) * 4 + 2
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-5)
    assert not torch.allclose(norm(x), LayerNorm(6)(x) * norm.weight, atol=1e-2)  # no centering
    # In bf16 the output stays bf16 and within bf16's rounding (8 significant bits, ~0.4% per rounding;
    # measured 0.0077 here, the same on every CPU) of the float32 result.  (At 6 features this cannot
    # tell float32 statistics from bf16 ones: both round to about the same bf16 numbers.)
    out16 = norm.bfloat16()(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    assert torch.allclose(out16.float(), expected, atol=5e-2, rtol=5e-2)


def test_make_norm():
    assert isinstance(make_norm(cfg()), LayerNorm)
    rms = make_norm(cfg(norm="rmsnorm", norm_eps=1e-6), dim=8)
    assert isinstance(rms, RMSNorm) and rms.weight.shape == (8,) and rms.eps == 1e-6


# --- MLPs ---------------------------------------------------------------------------------


def test_gelu_mlp_by_hand():
    mlp = MLP(cfg(d_ff=24))
    x = torch.randn(2, 3, 32)
    h = x @ mlp.up_proj.weight.T + mlp.up_proj.bias
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # GPT-2's GELU
    expected = h @ mlp.down_proj.weight.T + mlp.down_proj.bias
    assert torch.allclose(mlp(x), expected, atol=1e-5)


def test_relu_mlp_by_hand():
    mlp = MLP(cfg(mlp="relu", bias=False))
    x = torch.randn(2, 32)
    expected = torch.clamp(x @ mlp.up_proj.weight.T, min=0) @ mlp.down_proj.weight.T
    assert torch.allclose(mlp(x), expected, atol=1e-5)
    assert mlp.up_proj.bias is None


def test_swiglu_by_hand():
    mlp = SwiGLU(cfg(mlp="swiglu", d_ff=40, bias=False))
    x = torch.randn(2, 32)
    gate, up = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    expected = (gate * torch.sigmoid(gate) * up) @ mlp.down_proj.weight.T
    assert torch.allclose(mlp(x), expected, atol=1e-5)
    assert mlp.gate_proj.weight.shape == (40, 32) and mlp.down_proj.weight.shape == (32, 40)


def test_make_mlp():
    assert type(make_mlp(cfg())) is MLP
    assert type(make_mlp(cfg(mlp="swiglu"))) is SwiGLU


# --- block --------------------------------------------------------------------------------


def test_decoder_block_is_pre_norm_residual():
    block = DecoderBlock(cfg()).eval()
    x = torch.randn(2, 5, 32)
    attn_out, _ = block.attn(block.norm1(x))
    h = x + attn_out
    expected = h + block.mlp(block.norm2(h))
    out, weights = block(x)
    assert weights is None and torch.allclose(out, expected, atol=1e-6)
    out2, weights = block(x, return_weights=True)
    assert weights.shape == (2, 4, 5, 5) and torch.allclose(out, out2, atol=1e-5)


def test_causal_switch_lets_the_future_in():
    """Notebook 05's deliberate break: with ``causal = False`` an earlier output depends on later tokens."""
    from llmlab.config import get_config
    from llmlab.layers import CausalSelfAttention

    torch.manual_seed(0)
    attn = CausalSelfAttention(get_config("course-tiny").replace(d_model=16, n_heads=2)).eval()
    x = torch.randn(1, 5, 16)
    changed = x.clone()
    changed[0, 4] += 1.0
    assert torch.allclose(attn(x)[0][0, :4], attn(changed)[0][0, :4], atol=1e-6)
    attn.causal = False
    assert not torch.allclose(attn(x)[0][0, :4], attn(changed)[0][0, :4], atol=1e-6)  # they move by ~0.1
    fast, _ = attn(x)
    slow, weights = attn(x, return_weights=True)
    assert torch.allclose(fast, slow, atol=1e-5) and (weights[0, :, 0, 4] > 0).all()

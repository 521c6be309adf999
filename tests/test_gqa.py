"""MHA / GQA / MQA: shapes, exact equalities, and the mean-pooling conversion."""

from __future__ import annotations

import pytest
import torch

from llmlab import Transformer, calc, get_config
from llmlab.gqa import convert_to_gqa, kv_parameters, mean_pool_heads
from llmlab.layers import CausalSelfAttention
from llmlab.layers.attention import repeat_kv, scaled_dot_product_attention_reference


def cfg(n_kv_heads: int = 8, **changes):
    return get_config("course-tiny-llama").replace(d_model=64, n_heads=8, n_kv_heads=n_kv_heads, d_ff=96,
                                                   n_layers=2, vocab_size=101, context_length=32, **changes)


@pytest.mark.parametrize("n_kv_heads", [8, 4, 2, 1])
def test_projection_shapes(n_kv_heads):
    attn = CausalSelfAttention(cfg(n_kv_heads))
    assert attn.q_proj.weight.shape == (64, 64)
    assert attn.k_proj.weight.shape == (n_kv_heads * 8, 64)
    out, weights = attn(torch.randn(2, 5, 64), return_weights=True)
    assert out.shape == (2, 5, 64) and weights.shape == (2, 8, 5, 5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_grouped_fast_path_equals_repeated_reference(n_kv_heads):
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg(n_kv_heads)).eval()
    x = torch.randn(2, 7, 64)
    fast, _ = attn(x)
    slow, _ = attn(x, return_weights=True)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_reference_with_repeated_heads_is_mha():
    q, k, v = torch.randn(1, 8, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    grouped, _ = scaled_dot_product_attention_reference(q, k, v)
    # Query heads 0-3 share KV head 0 and heads 4-7 KV head 1: spelled out here, not with repeat_kv.
    owner = [0, 0, 0, 0, 1, 1, 1, 1]
    assert torch.equal(repeat_kv(k, 4), k[:, owner])
    mha, _ = scaled_dot_product_attention_reference(q, k[:, owner], v[:, owner])
    assert torch.equal(grouped, mha)  # exact: the grouped path copies the same heads, then does the same sums


def test_gqa_with_all_heads_equals_mha_exactly():
    torch.manual_seed(0)
    mha = Transformer(cfg(8)).eval()
    same = convert_to_gqa(mha, 8)
    assert same is not mha
    ids = torch.randint(0, 101, (2, 12))
    # Exact: a mean over groups of one head copies the weights, and the two models run the same operations.
    assert torch.equal(mha(ids).logits, same(ids).logits)


def test_mean_pooling_groups_adjacent_heads():
    w = torch.arange(8 * 2 * 3, dtype=torch.float32).reshape(8 * 2, 3)  # 8 heads of dim 2
    pooled = mean_pool_heads(w, n_heads=8, n_kv_heads=2)
    assert pooled.shape == (4, 3)
    assert torch.equal(pooled[:2], w[:8].reshape(4, 2, 3).mean(0))
    assert torch.equal(mean_pool_heads(torch.ones(16), 8, 4), torch.ones(8))


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_conversion_shrinks_kv_and_keeps_the_rest(n_kv_heads):
    torch.manual_seed(0)
    mha = Transformer(cfg(8))
    gqa = convert_to_gqa(mha, n_kv_heads)
    assert gqa.config.n_kv_heads == n_kv_heads
    assert kv_parameters(gqa) == kv_parameters(mha) * n_kv_heads // 8
    assert torch.equal(gqa.blocks[0].attn.q_proj.weight, mha.blocks[0].attn.q_proj.weight)
    assert gqa(torch.randint(0, 101, (1, 9))).logits.shape == (1, 9, 101)


def test_conversion_refuses_bad_input():
    with pytest.raises(ValueError, match="not divisible"):
        convert_to_gqa(Transformer(cfg(8)), 3)
    with pytest.raises(ValueError, match="already shares"):
        convert_to_gqa(Transformer(cfg(4)), 2)


def test_cache_savings_for_real_configs():
    llama70 = get_config("llama3-70b")
    mha = llama70.replace(n_kv_heads=64)
    assert calc.kv_bytes_per_token(llama70) * 8 == calc.kv_bytes_per_token(mha)
    base = get_config("llama3-8b").replace(n_kv_heads=32)
    assert calc.kv_bytes_per_token(base.replace(n_kv_heads=4)) == calc.kv_bytes_per_token(base) / 8
    assert calc.kv_bytes_per_token(base.replace(n_kv_heads=1)) == calc.kv_bytes_per_token(base) / 32

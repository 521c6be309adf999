"""The KV cache: generation with it equals generation without it, for every preset and batch shape."""

from __future__ import annotations

import pytest
import torch

from llmlab import Transformer
from llmlab.cache import CacheFullError, KVCache
from llmlab.config import PRESETS
from llmlab.generate import generate_many, left_pad, positions_from_mask
from llmlab.sampling import SamplingParams


def shrunk(name: str, context: int = 24):
    """A preset's architecture (norm, MLP, positions, GQA, QK-norm, bias, tying) at test size."""
    cfg = PRESETS[name]
    kv = 4 if cfg.n_kv_heads == cfg.n_heads else (1 if cfg.n_kv_heads == 1 else 2)
    return cfg.replace(vocab_size=97, context_length=context, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv,
                       head_dim=8, d_ff=48)


def model_for(name: str, context: int = 24) -> Transformer:
    torch.manual_seed(0)
    return Transformer(shrunk(name, context)).eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42, 43]]
# Token-for-token comparisons below (cached vs recomputed, batched vs alone) are exact on purpose: the
# two ways differ by at most 2e-7 in their logits (measured on the AVX512, portable and SSE4.2 kernels),
# and along these seeded random-weight trajectories the best token leads the runner-up by at least
# 1.3e-4 (over 600 times more), so another CPU, thread count or BLAS cannot tip a near-tie.


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_cached_logits_equal_recomputed(name):
    model = model_for(name)
    ids = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    cache = KVCache.for_model(model.config, batch_size=2)
    prefill = model(ids[:, :8], cache=cache).logits
    steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(8, 20)]
    got = torch.cat([prefill, *steps], dim=1)
    assert cache.length == 20
    assert torch.allclose(got, full, atol=1e-5), (got - full).abs().max()


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("batch", [1, 3])
def test_generation_same_tokens_with_and_without_cache(name, batch):
    model = model_for(name)
    params = SamplingParams(temperature=0, max_new_tokens=30)  # 7 + 30 > context 24: the window slides
    prompts = PROMPTS[:batch]
    assert generate_many(model, prompts, params, use_cache=True) == generate_many(model, prompts, params, use_cache=False)


@pytest.mark.parametrize("name", ["course-tiny", "course-tiny-llama", "qwen3-0.6b", "gpt2-124m"])
def test_left_padded_batch_equals_each_alone(name):
    model = model_for(name)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    together = generate_many(model, PROMPTS, params, use_cache=True)
    alone = [generate_many(model, [p], params, use_cache=False)[0] for p in PROMPTS]
    assert together == alone


@pytest.mark.parametrize("name", ["course-tiny", "course-tiny-llama"])
def test_left_padded_logits_match_unpadded(name):
    model = model_for(name)
    ids, mask = left_pad(PROMPTS)
    padded = model(ids, positions=positions_from_mask(mask), attention_mask=mask).logits
    for row, prompt in enumerate(PROMPTS):
        alone = model(torch.tensor([prompt])).logits[0]
        assert torch.allclose(padded[row, -len(prompt):], alone, atol=1e-5)


def test_sampled_generation_same_with_cache():
    # Same seed, same draws: the tokens stay the same even with 1e-4 of noise added to every logit
    # (measured, 20 noise draws), 1,000 times the cached/recomputed difference.
    model = model_for("course-tiny-llama")
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=20, seed=4)
    assert generate_many(model, PROMPTS, params, True) == generate_many(model, PROMPTS, params, False)


def test_capacity_is_a_clear_error():
    model = model_for("course-tiny")
    cache = KVCache.for_model(model.config, batch_size=1, max_len=8)
    model(torch.ones(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(CacheFullError, match="holds 8 positions; 6 are used and 3 more were asked for"):
        model(torch.ones(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds the model's context_length"):
        KVCache.for_model(model.config, max_len=25)


def test_cache_shape_and_bytes():
    cfg = shrunk("llama3-8b")
    cache = KVCache.for_model(cfg, batch_size=3, max_len=10)
    assert cache.keys[0].shape == (3, cfg.n_kv_heads, 10, cfg.head_dim)
    assert cache.nbytes == 2 * cfg.n_layers * 3 * cfg.n_kv_heads * 10 * cfg.head_dim * 4
    cache.advance(5)
    assert cache.used_bytes == cache.nbytes // 2
    cache.reset()
    assert cache.length == 0


def test_positions_from_mask():
    assert positions_from_mask(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]


def test_builtin_model_cache_matches_recompute():
    """The trained model's logits are large (~±20): equal to 1e-4 absolute plus 1e-4 relative.

    Measured: up to 1.3e-5 apart (a quarter of 1e-5 + 1e-5·|logit|: too close to the edge for other CPUs).
    Greedy tokens: the runner-up trails by at least 1.1e-3 along these 40 steps, 75 times the gap
    between cached and recomputed logits."""
    from llmlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint()
    prompt = ckpt.tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks?")
    params = SamplingParams(temperature=0, max_new_tokens=40)
    assert generate_many(ckpt.model, [prompt], params, True) == generate_many(ckpt.model, [prompt], params, False)
    ids = torch.tensor([prompt])
    cache = KVCache.for_model(ckpt.config, 1)
    with torch.no_grad():
        steps = [ckpt.model(ids[:, :4], cache=cache).logits]
        steps += [ckpt.model(ids[:, t : t + 1], cache=cache).logits for t in range(4, ids.shape[1])]
        full = ckpt.model(ids).logits
    assert torch.allclose(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)

"""Calculators: exact agreement with the module, published figures, FLOPs, bytes, formatting."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llmlab.calc import (
    DTYPE_BYTES,
    flops_per_token,
    human_bytes,
    human_count,
    param_counts,
    training_flops,
    training_flops_per_token,
    weight_bytes,
)
from llmlab import calc
from llmlab.config import ModelConfig, get_config
from llmlab.model import Transformer


def small(**changes) -> ModelConfig:
    base = dict(name="small", vocab_size=96, context_length=20, d_model=48, n_layers=3, n_heads=6)
    base.update(changes)
    return ModelConfig(**base)


# One config per kind, covering every choice that changes the parameter count.
KINDS = {
    "gpt2": small(),
    "gpt2-untied-nobias": small(bias=False, tie_embeddings=False),
    "layernorm-swiglu-bias": small(mlp="swiglu", d_ff=40),
    "relu-sinusoidal": small(mlp="relu", positional="sinusoidal", d_ff=100),
    "rmsnorm-bias-none": small(norm="rmsnorm", positional="none"),
    "llama": small(norm="rmsnorm", mlp="swiglu", positional="rope", n_kv_heads=2, bias=False,
                   tie_embeddings=False, d_ff=128),
    "qwen3": small(norm="rmsnorm", mlp="swiglu", positional="rope", n_kv_heads=3, head_dim=16,
                   qk_norm=True, bias=False, d_ff=64),
    "mqa-bias-qknorm-layernorm": small(n_kv_heads=1, qk_norm=True),
    "course-tiny": get_config("course-tiny"),
    "course-tiny-llama": get_config("course-tiny-llama"),
}


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_param_counts_equal_the_module(kind):
    cfg = KINDS[kind]
    model = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == model.num_parameters()
    assert counts["non_embedding"] == model.num_parameters(non_embedding=True)
    assert counts["embedding"] == model.token_embedding.weight.numel()
    assert counts["positional"] == (numel(model.position_embedding) if model.position_embedding else 0)
    assert counts["attention"] == sum(numel(b.attn) for b in model.blocks)
    assert counts["mlp"] == sum(numel(b.mlp) for b in model.blocks)
    assert counts["norms"] == sum(numel(b.norm1) + numel(b.norm2) for b in model.blocks) + numel(model.final_norm)
    assert counts["lm_head"] == (0 if cfg.tie_embeddings else model.lm_head.weight.numel())
    assert counts["block"] == numel(model.blocks[0])
    parts = ("embedding", "positional", "attention", "mlp", "norms", "lm_head")
    assert sum(counts[p] for p in parts) == counts["total"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gpt2-124m", 124_439_808),
        ("gpt2-355m", 354_823_168),
        ("gpt2-774m", 774_030_080),
        ("gpt2-1558m", 1_557_611_200),
    ],
)
def test_gpt2_published_parameter_counts(name, expected):
    assert param_counts(get_config(name))["total"] == expected


def test_gpt3_175b():
    counts = param_counts(get_config("gpt3-175b"))
    assert counts["total"] == pytest.approx(175e9, rel=0.01)
    assert counts["block_mlp_no_bias"] == 2 * 12_288 * 49_152 == 1_207_959_552
    assert counts["block_mlp"] == 1_207_959_552 + 49_152 + 12_288  # with biases
    assert counts["embedding"] == 50_257 * 12_288 == 617_558_016
    textbook = param_counts(get_config("gpt3-175b", vocab_size=50_000))
    assert textbook["embedding"] == 614_400_000


@pytest.mark.parametrize(
    "name, total, non_embedding",
    [
        ("llama3-8b", 8_030_261_248, 6_979_588_096),
        ("llama3-70b", 70_553_706_496, 68_452_360_192),
        ("qwen3-0.6b", 596_049_920, 440_467_456),
    ],
)
def test_llama_and_qwen_parameter_counts(name, total, non_embedding):
    counts = param_counts(get_config(name))
    assert counts["total"] == total
    assert counts["non_embedding"] == non_embedding
    assert human_count(total) in {"8.0B", "70.6B", "596.0M"}


def test_qwen3_counts_its_qk_norms():
    cfg = get_config("qwen3-0.6b")
    assert param_counts(cfg)["block_qk_norm"] == 2 * 128
    assert param_counts(cfg)["total"] - param_counts(cfg.replace(qk_norm=False))["total"] == 28 * 2 * 128


def test_weight_bytes():
    assert weight_bytes(175e9, "fp16") == 350e9
    gpt3 = get_config("gpt3-175b")
    assert weight_bytes(gpt3, "fp16") == pytest.approx(350e9, rel=0.01)
    assert weight_bytes(gpt3, "fp32") == 2 * weight_bytes(gpt3, "bf16") == 4 * weight_bytes(gpt3, "int8")
    assert weight_bytes(gpt3, "int4") == param_counts(gpt3)["total"] / 2
    assert weight_bytes(get_config("gpt2-124m"), "fp32") == 124_439_808 * 4
    assert DTYPE_BYTES == {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}
    with pytest.raises(ValueError, match="unknown dtype 'fp8': use one of fp32, fp16, bf16, int8, int4"):
        weight_bytes(gpt3, "fp8")


def test_flops_per_token_formula():
    cfg = get_config("gpt2-124m")
    n = param_counts(cfg)["non_embedding"]
    assert flops_per_token(cfg) == 2 * n + 2 * 12 * 1024 * 768
    assert flops_per_token(cfg, context=1) == 2 * n + 2 * 12 * 768
    assert flops_per_token(cfg, include_lm_head=True) == flops_per_token(cfg) + 2 * 768 * 50257
    assert training_flops_per_token(cfg) == 3 * flops_per_token(cfg)
    assert training_flops(cfg, 1000) == 1000 * training_flops_per_token(cfg)
    # GPT-3: attention is a small correction, so training is ~6 N per token (Kaplan et al.)
    gpt3 = get_config("gpt3-175b")
    assert training_flops_per_token(gpt3) == pytest.approx(6 * param_counts(gpt3)["non_embedding"], rel=0.02)


def test_flops_per_token_agrees_with_torch_flop_counter():
    """Count the real matmuls of a forward pass and compare with the formula.

    The reference attention path (``return_attention=True``) does its matmuls
    in plain sight (the counter cannot see inside CPU's fused kernel).  It
    computes the full seq x seq square of scores (the mask only zeroes half of
    it), i.e. 4 * seq * d_attn FLOPs per token and layer, which is the formula's
    term with context = 2 * seq.  Norms are not matmuls, so the counter leaves
    them out: allow 1 %.
    """
    cfg = small(norm="rmsnorm", mlp="swiglu", positional="rope", n_kv_heads=2, bias=False, d_ff=128)
    model = Transformer(cfg).eval()
    seq = 16
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, seq, dtype=torch.long), return_attention=True)
    measured = counter.get_total_flops() / seq
    assert measured == pytest.approx(flops_per_token(cfg, context=2 * seq, include_lm_head=True), rel=0.01)


def test_human_formatting():
    assert human_bytes(350e9) == "350.0 GB"
    assert human_bytes(350e9, binary=True) == "326.0 GiB"
    assert human_bytes(2**30, binary=True) == "1.0 GiB"
    assert human_bytes(512) == "512 B"
    assert human_bytes(36_864) == "36.9 kB"
    assert human_count(124_439_808) == "124.4M"
    assert human_count(175e9) == "175.0B"
    assert human_count(1_500) == "1.5K"
    assert human_count(12) == "12"


def test_presets_are_sized_instantly():
    """No allocation: even the 70B model is sized in well under a second."""
    import time

    start = time.perf_counter()
    for name in ("gpt3-175b", "llama3-70b", "qwen-walkthrough"):
        param_counts(get_config(name))
        flops_per_token(get_config(name))
    assert time.perf_counter() - start < 0.5


# --- KV cache, capacity, roofline (notebook 09) ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [("gpt2-124m", "fp16", 36_864), ("llama3-8b", "bf16", 131_072), ("llama3-70b", "bf16", 327_680),
     ("qwen3-0.6b", "bf16", 114_688), ("gpt3-175b", "fp16", 4_718_592)],
)
def test_kv_bytes_per_token_published(name, dtype, expected):
    assert calc.kv_bytes_per_token(get_config(name), dtype) == expected


def test_kv_cache_bytes_formula():
    cfg = get_config("llama3-8b")
    assert calc.kv_cache_bytes(cfg, batch=3, tokens=100, dtype="bf16") == 2 * 3 * 100 * 32 * 8 * 128 * 2
    mha_32k = cfg.replace(n_kv_heads=32, context_length=32_768)
    assert calc.kv_cache_bytes(mha_32k, 1, 32_768, "bf16") == 17_179_869_184  # 17.18 GB
    assert calc.kv_cache_bytes(mha_32k.replace(n_kv_heads=8), 1, 32_768, "bf16") == 4_294_967_296  # 4.29 GB
    with pytest.raises(ValueError, match="≥ 0"):
        calc.kv_cache_bytes(cfg, batch=-1)


def test_palm_sized_cache_claim():
    # 118 layers, attention width 12,288 (48 heads x 256), MHA, batch 512, context 2,048.
    palm = get_config("gpt3-175b").replace(n_layers=118, d_model=18_432, n_heads=48, head_dim=256)
    assert calc.kv_cache_bytes(palm, 512, 2048, "int8") == pytest.approx(3.04e12, rel=1e-3)
    assert calc.kv_cache_bytes(palm, 512, 2048, "bf16") == pytest.approx(6.08e12, rel=1e-3)


def test_capacity_planner():
    cfg = get_config("llama3-8b")
    free = 80e9 * 0.9 - calc.weight_bytes(cfg, "bf16")
    assert calc.max_concurrent_sequences(cfg, 80e9, 8192) == int(free // (8192 * 131_072))
    assert calc.max_concurrent_sequences(get_config("llama3-70b"), 80e9, 8192) == 0  # weights alone do not fit
    assert calc.max_concurrent_sequences(get_config("llama3-70b"), 80e9, 8192, n_gpus=4) > 0


def test_prefill_is_compute_bound_and_decode_bandwidth_bound():
    cfg = get_config("llama3-8b")
    decode = calc.arithmetic_intensity(cfg, batch=1, new_tokens=1, context=1000)
    prefill = calc.arithmetic_intensity(cfg, batch=1, new_tokens=2000)
    peak, bandwidth = 989e12, 3.35e12  # H100 SXM dense bf16, HBM3
    ridge = peak / bandwidth
    assert decode < 2 < ridge < prefill
    assert calc.roofline(decode, peak, bandwidth) == pytest.approx(decode * bandwidth)
    assert calc.roofline(prefill, peak, bandwidth) == peak


def test_decode_intensity_limit_is_positive_and_the_large_batch_limit():
    # The ceiling batching approaches: one sequence's FLOPs ÷ its own KV bytes. Subtracting all the
    # weights (weight_bytes, with the embedding table) instead of the weights a pass reads
    # (weights_read_per_pass) made the 512- and 2,000-token ceilings negative in notebook 09.
    cfg = get_config("llama3-8b")
    assert calc.forward_bytes(cfg, 0, 1, 0) == calc.weights_read_per_pass(cfg) * 2  # the shared read
    assert calc.weights_read_per_pass(cfg) * 2 < calc.weight_bytes(cfg, "bf16")
    for context, expected in [(512, 228), (2000, 61), (8192, 18)]:
        limit = calc.decode_intensity_limit(cfg, context)
        assert limit > 0
        assert limit == pytest.approx(expected, rel=0.02)
        assert calc.arithmetic_intensity(cfg, 64, 1, context) < limit
        assert calc.arithmetic_intensity(cfg, 10**6, 1, context) == pytest.approx(limit, rel=0.01)


def test_decode_step_bytes_is_the_one_definition():
    llama = get_config("llama3-8b")
    weights = calc.weights_read_per_pass(llama) * 2
    assert calc.decode_step_bytes(llama, 1000) == weights + 1001 * 131_072
    assert calc.decode_step_bytes(llama, 1000, batch=4) == calc.forward_bytes(llama, 4, 1, 1000)
    assert calc.decode_step_bytes(llama, 0) < calc.weight_bytes(llama, "bf16")  # the embedding table is a lookup

"""Fixed-shape decode steps and the compiled decoder: same numbers as the eager cache, one graph for every step."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config as inductor_config

from llmlab import compiled as compiled_module
from llmlab.cache import KVCache
from llmlab.compiled import CompileError, attention_bucket, compiled_decode_step, fixed_shape_logits
from llmlab.generate import generate_many, left_pad, positions_from_mask
from llmlab.layers.attention import attention_mask
from llmlab.sampling import SamplingParams
from tests.test_cache import PROMPTS, model_for


def prefilled(model, max_len: int):
    """A left-padded batch of PROMPTS prefilled into a cache of ``max_len`` slots, with its mask."""
    ids, mask = left_pad(PROMPTS)
    cache = KVCache.for_model(model.config, batch_size=len(PROMPTS), max_len=max_len)
    model(ids, positions=positions_from_mask(mask), cache=cache, attention_mask=mask)
    return ids, mask, cache


def fixed_shape_inputs(cache: KVCache, mask: torch.Tensor, new_ids: torch.Tensor):
    """What the generator passes to one fixed-shape step after ``mask`` (which already covers ``new_ids``)."""
    visible = torch.zeros(cache.batch_size, cache.max_len, dtype=torch.long)
    visible[:, : mask.shape[1]] = mask
    positions = positions_from_mask(mask)[:, -1:].clone()
    return new_ids, positions, torch.tensor([cache.length]), visible


@pytest.mark.parametrize("name", ["course-tiny", "course-tiny-llama", "qwen3-0.6b"])
def test_fixed_shape_step_equals_growing_cache(name):
    model = model_for(name)
    with torch.no_grad():
        ids, mask, growing = prefilled(model, max_len=20)
        _, _, fixed = prefilled(model, max_len=20)
        for token in (11, 12, 13, 14):
            new_ids = torch.full((len(PROMPTS), 1), token)
            mask = torch.cat([mask, torch.ones_like(new_ids)], dim=1)
            positions = positions_from_mask(mask)[:, -1:]
            expected = model(new_ids, positions=positions, cache=growing, attention_mask=mask).logits[:, -1]
            got = fixed_shape_logits(model, fixed, *fixed_shape_inputs(fixed, mask, new_ids))
            fixed.advance(1)
            assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()  # measured 1.2e-7
    # Exact: layer 0's keys come from the same embedding, norm and projection of the same [3, 1] ids in
    # both caches (later layers differ by float rounding, since their attention sums differ).
    assert torch.equal(fixed.keys[0][:, :, : growing.length], growing.keys[0][:, :, : growing.length])


def test_empty_slots_get_no_attention():
    # One query over 6 slots of which the first 3 are written: the trailing empty slots stay hidden
    # (an older rule let a query always see the last column, which is an empty slot here).
    visible = torch.tensor([[1, 1, 1, 0, 0, 0]])
    assert attention_mask(1, 6, visible).flatten().tolist() == [True, True, True, False, False, False]
    # A padding query that may see nothing still sees itself, so softmax has something to weigh.
    padded = attention_mask(3, 3, torch.tensor([[0, 1, 1]]))[0, 0]
    assert padded.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def graphs_limit(monkeypatch, n: int) -> None:
    """Forget earlier compilations and allow only ``n`` compiled decode graphs from here on."""
    torch._dynamo.reset()
    monkeypatch.setattr(compiled_module, "COMPILED_GRAPHS_LIMIT", n)


@pytest.fixture
def one_graph(monkeypatch):
    """Fail on any recompilation: every decode step of a short request must reuse one graph."""
    graphs_limit(monkeypatch, 1)
    yield
    torch._dynamo.reset()


def test_attention_buckets():
    assert [attention_bucket(n, 1040) for n in (1, 64, 65, 129, 700, 1025)] == [64, 64, 128, 256, 1024, 1040]
    assert attention_bucket(20, 24) == 24  # never more than the cache holds


def test_one_graph_per_bucket(monkeypatch):
    # 3 + 150 tokens cross the 64 and 128 buckets into the last one (153 slots): three graphs, no more.
    # Same tokens: compiled and eager logits differ by <2e-7 here, the top-2 gap is never below 0.16.
    graphs_limit(monkeypatch, 3)
    model = model_for("course-tiny", context=160)
    params = SamplingParams(temperature=0, max_new_tokens=150)
    assert generate_many(model, [[5, 6, 7]], params, compiled=True) == generate_many(model, [[5, 6, 7]], params)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["course-tiny", "course-tiny-llama"])
def test_compiled_generation_equals_uncached(name, one_graph):
    model = model_for(name, context=32)
    params = SamplingParams(temperature=0, max_new_tokens=30)  # 7 + 30 > 32: the window slides, the cache refills
    compiled = generate_many(model, PROMPTS, params, compiled=True)  # left-padded batch of 3
    # Exact tokens: the logits differ by <2e-7 (measured), the top-2 gap is never below 2e-3.
    assert compiled == generate_many(model, PROMPTS, params, use_cache=False)


def test_compiled_logits_within_1e5_of_eager(one_graph):
    model = model_for("course-tiny-llama", context=32)
    step = compiled_decode_step()
    with torch.no_grad():
        ids, mask, cache = prefilled(model, max_len=24)
        new_ids = torch.full((len(PROMPTS), 1), 17)
        mask = torch.cat([mask, torch.ones_like(new_ids)], dim=1)
        inputs = fixed_shape_inputs(cache, mask, new_ids)
        eager = fixed_shape_logits(model, cache, *inputs)
        compiled = step(model, cache, *inputs)
    assert torch.allclose(compiled, eager, atol=1e-5), (compiled - eager).abs().max()  # measured 1.2e-7


def test_compiled_needs_the_cache():
    model = model_for("course-tiny")
    with pytest.raises(ValueError, match="use_cache=True"):
        generate_many(model, [[1, 2]], SamplingParams(max_new_tokens=2), use_cache=False, compiled=True)


def test_missing_compiler_is_a_clear_error(one_graph):
    model = model_for("course-tiny")
    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler"), "fx_graph_cache": False}):
        with pytest.raises(CompileError, match="compiled=False"):
            generate_many(model, [[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=3), compiled=True)

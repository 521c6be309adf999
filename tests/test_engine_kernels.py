"""The engine on the Triton kernels: the kernel step equals the plain-torch step, and the engine's tokens are the same.

On CPU the kernels run in Triton's interpreter (``use_backend("interpret")``), the
same kernel source a GPU compiles; small sizes keep it quick.
"""

from __future__ import annotations

import pytest
import torch

from llmlab.config import get_config
from llmlab.engine import Engine, PagedKVCache
from llmlab.engine.kernel_step import KernelPagedStep, uses_kernels
from llmlab.engine.paged_cache import PagedStep, Span
from llmlab.kernels import KernelUnavailableError, use_backend
from llmlab.kernels.dispatch import triton
from llmlab.layers import CausalSelfAttention
from llmlab.parallel.runs import build_model
from llmlab.sampling import SamplingParams

pytestmark = pytest.mark.skipif(triton is None, reason="Triton's interpreter needs Triton (Linux x86_64 wheels)")


def test_the_plain_step_runs_on_cpu_and_the_kernel_step_when_asked():
    cache = PagedKVCache(1, 4, 4, 2, 8)
    write, spans = torch.tensor([0]), [Span(0, 1, 1, [0])]
    assert type(cache.step(write, spans)) is PagedStep and not uses_kernels(cache)
    with use_backend("interpret"):
        assert type(cache.step(write, spans)) is KernelPagedStep
        double = PagedKVCache(1, 4, 4, 2, 8, dtype=torch.float64)
        assert type(double.step(write, spans)) is PagedStep  # the kernels take fp16/bf16/fp32 only
    with use_backend("triton"), pytest.raises(KernelUnavailableError, match="CUDA tensors"):
        cache.step(write, spans)


@pytest.mark.parametrize(("n_heads", "n_kv_heads", "block_size"), [(4, 4, 4), (4, 2, 3), (4, 1, 16)])
def test_kernel_step_equals_the_plain_step(n_heads, n_kv_heads, block_size):
    """One packed pass with every kind of span: a fresh prompt, a prompt chunk after cached blocks,
    and decodes of several lengths (one at a block boundary); K/V written with a −1 slot among them."""
    head_dim, n_blocks = 8, 12
    config = get_config("course-tiny-llama", n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
    layer = CausalSelfAttention(config).eval()
    generator = torch.Generator().manual_seed(n_heads * 10 + n_kv_heads + block_size)
    tables = [[0, 1, 2, 3, 4][: -(-9 // block_size)], [5, 6, 7], [8, 9], [10, 11]]
    spans = [Span(0, 5, 5, tables[0][: -(-5 // block_size)]),  # a whole prompt: nothing cached before it
             Span(5, 3, 3 + block_size, tables[1][: -(-(3 + block_size) // block_size)]),  # a chunk after one block
             Span(8, 1, block_size, tables[2][:1]),  # a decode that fills its block exactly
             Span(9, 1, block_size + 1, tables[3][:2])]  # a decode one past a block boundary
    n = 10
    slots = []
    for span in spans:
        for position in range(span.context_len - span.n, span.context_len):
            slots.append(span.block_table[position // block_size] * block_size + position % block_size)
    slots[1] = -1  # its K/V are "already cached": written nowhere
    write = torch.tensor(slots)
    q = torch.randn(1, n_heads, n, head_dim, generator=generator)
    k = torch.randn(1, n_kv_heads, n, head_dim, generator=generator)
    v = torch.randn(1, n_kv_heads, n, head_dim, generator=generator)
    outputs, pools = [], []
    for kernels in (False, True):
        cache = PagedKVCache(1, n_blocks, block_size, n_kv_heads, head_dim)
        torch.manual_seed(0)
        cache.pools[0][:-block_size].copy_(torch.randn_like(cache.pools[0][:-block_size]))  # earlier tokens' K/V
        with use_backend("interpret" if kernels else "torch"):
            step = cache.step(write, spans)
            assert isinstance(step, KernelPagedStep) == kernels
            outputs.append(step.attention(0, q, k, v, layer.attend)[0])
        pools.append(cache.pools[0])
    torch.testing.assert_close(pools[1], pools[0], atol=0, rtol=0)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)


def test_engine_tokens_are_the_same_on_the_interpreted_kernels():
    """Greedy tokens of the engine (chunked prefill, decodes of several lengths) with the kernels
    interpreted = with the plain-torch step.  Float32 on both sides: the test first checks, on the
    reference run, that no greedy choice was closer than 1e-3 in logits, so rounding (~1e-6) cannot flip one."""
    model = build_model("course-tiny-llama", n_kv_heads=2)
    prompts = [[5, 17, 300, 2, 9, 9, 41], [900, 4, 4, 81, 13, 7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [77]]

    def run() -> tuple[list[list[int]], float]:
        engine = Engine(model, block_size=4, num_blocks=64, max_num_seqs=3, max_num_batched_tokens=12)
        gaps, forward = [], engine.runner.forward

        def recording(items):
            finishing, logits = forward(items)
            top = logits.float().topk(2, dim=-1).values
            gaps.append((top[:, 0] - top[:, 1]).min().item())
            return finishing, logits

        engine.runner.forward = recording
        ids = [engine.add_request(p, SamplingParams(temperature=0, max_new_tokens=4)) for p in prompts]
        tokens = {}
        while engine.has_unfinished_requests:
            for out in engine.step():
                tokens[out.request_id] = out.token_ids
        return [tokens[i] for i in ids], min(gaps)

    want, gap = run()
    assert gap > 1e-3, "pick other prompts: a greedy choice was nearly a tie"
    with use_backend("interpret"):
        got, _ = run()
    assert got == want

"""Triton kernels equal their plain-torch references; the dispatch point picks, refuses and restores as it says.

On CPU every kernel runs in Triton's interpreter (the same kernel source that is
compiled on a GPU), over shapes chosen to hit the masked edges: lengths that are
not a multiple of the tile, head dims and group sizes that are not powers of
two, context lengths at, below and above block boundaries.  The references are
independent code (torch.softmax, index_copy, notebook 11's
``paged_attention_reference``, PyTorch's SDPA), so a wrong kernel fails here.
The ``cuda`` tests run the compiled kernels where a GPU is present.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llmlab.engine.paged_cache import PagedKVCache, paged_attention_reference
from llmlab.errors import LlmlabError
from llmlab.kernels import (
    KernelError,
    KernelUnavailableError,
    backend_for,
    flash_attention,
    flash_attention_hbm_bytes,
    flash_attention_reference,
    paged_decode_attention,
    paged_decode_hbm_bytes,
    paged_decode_reference,
    requested_backend,
    softmax,
    softmax_bytes,
    softmax_eager_bytes,
    softmax_reference,
    standard_attention_hbm_bytes,
    store_kvcache,
    store_kvcache_bytes,
    store_kvcache_reference,
    use_backend,
    vector_add,
    vector_add_bytes,
)
from llmlab.kernels import dispatch as dispatch_module
from llmlab.kernels.dispatch import TritonKernel, triton
from llmlab.layers.attention import scaled_dot_product_attention_reference

ATOL = RTOL = 1e-5
cuda = pytest.mark.skipif(not torch.cuda.is_available() or triton is None,
                          reason="compiled Triton kernels need a CUDA GPU (and Triton)")
needs_triton = pytest.mark.skipif(triton is None, reason="Triton's interpreter needs Triton (Linux x86_64 wheels)")
MODULES = {name: importlib.import_module(f"llmlab.kernels.{name}")  # (the package exports functions of these names)
           for name in ("vector_add", "softmax", "kv_store", "paged_decode", "flash_attention")}


@pytest.fixture(autouse=True)
def clean_switches(monkeypatch):
    """Every test starts on "auto" with Triton's interpreter off, and leaves no switch behind."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LLMLAB_KERNELS", raising=False)
    jit_call = triton.runtime.jit.JITFunction.__call__ if triton else None
    yield
    assert dispatch_module._requested.get() is None, "a use_backend block leaked out of its test"
    if triton is not None:
        assert triton.runtime.jit.JITFunction.__call__ is jit_call, "the interpreter patch leaked out of its launch"
        assert "interpret" not in vars(triton.knobs.runtime), "Triton's interpreter knob leaked out of its launch"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------- inputs


def kv_tokens(n: int, n_kv_heads: int, head_dim: int, seed: int, dtype=torch.float32):
    """New K and V as the engine makes them: ``[1, kv_heads, N, d]`` → ``[N, kv_heads, d]``, not contiguous."""
    g = gen(seed)
    k = torch.randn(1, n_kv_heads, n, head_dim, generator=g, dtype=dtype)
    v = torch.randn(1, n_kv_heads, n, head_dim, generator=g, dtype=dtype)
    return k[0].transpose(0, 1), v[0].transpose(0, 1)


def paged_inputs(context_lens: list[int], block_size: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 seed: int = 0):
    """Queries, a filled one-layer :class:`PagedKVCache`, shuffled block tables padded with the null block, lengths."""
    g = gen(seed)
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + 2  # two spare blocks that no table names
    cache = PagedKVCache(1, num_blocks, block_size, n_kv_heads, head_dim)
    cache.pools[0][: num_blocks * block_size] = torch.randn(num_blocks * block_size, 2, n_kv_heads, head_dim,
                                                            generator=g)
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(needed) + 1  # at least one padding column in every row
    tables = []
    for n in needed:
        mine, order = order[:n], order[n:]
        tables.append(mine + [cache.null_block] * (width - n))
    q = torch.randn(len(context_lens), n_heads, head_dim, generator=g)
    return q, cache, torch.tensor(tables), torch.tensor(context_lens)


def around_boundaries(block_size: int) -> list[int]:
    """Context lengths at, one below and one above block boundaries, and past one key tile (16)."""
    lens = {1, block_size, block_size + 1, 2 * block_size - 1, 2 * block_size, 2 * block_size + 1, 37}
    return sorted(n for n in lens if n >= 1)


def attention_inputs(batch: int, n_heads: int, n_kv_heads: int, seq_q: int, seq_k: int, head_dim: int,
                     seed: int = 0, dtype=torch.float32):
    """q, k, v laid out as the model's split_heads makes them (transposed views, not contiguous)."""
    g = gen(seed)
    q = torch.randn(batch, seq_q, n_heads, head_dim, generator=g, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, seq_k, n_kv_heads, head_dim, generator=g, dtype=dtype).transpose(1, 2)
    v = torch.randn(batch, seq_k, n_kv_heads, head_dim, generator=g, dtype=dtype).transpose(1, 2)
    return q, k, v


# ---------------------------------------------------------------------------------------------- vector_add


@needs_triton
@pytest.mark.parametrize("n", [1, 1000, 1024, 1025, 3000])
def test_vector_add_interpreted_equals_reference(n):
    g = gen(n)
    x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
    out = vector_add(x, y, backend="interpret")
    assert torch.equal(out, x + y)  # one rounding each way: exactly equal


@needs_triton
def test_vector_add_keeps_shape_and_reads_strided_input():
    x = torch.randn(40, 30, generator=gen(1)).t()  # not contiguous
    y = torch.randn(30, 40, generator=gen(2))
    assert torch.equal(vector_add(x, y, backend="interpret"), x + y)


# ------------------------------------------------------------------------------------------------- softmax


@needs_triton
@pytest.mark.parametrize("shape", [(3, 1), (4, 37), (2, 3, 64), (5, 100)])
def test_softmax_interpreted_equals_reference(shape):
    x = torch.randn(shape, generator=gen(sum(shape))) * 30  # large scores: exp overflows unless the max is subtracted
    out = softmax(x, backend="interpret")
    close(out, softmax_reference(x))
    close(out.sum(-1), torch.ones(shape[:-1]))


@needs_triton
def test_softmax_half_precision_and_strided_rows():
    x = torch.randn(24, 10, generator=gen(3)).t()  # rows of a transposed matrix: not contiguous
    close(softmax(x, backend="interpret"), softmax_reference(x))
    half = torch.randn(6, 50, generator=gen(4)).half()
    close(softmax(half, backend="interpret"), softmax_reference(half), atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------- store_kvcache


@needs_triton
@pytest.mark.parametrize("n_kv_heads,head_dim", [(2, 16), (3, 12), (1, 5)])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_store_kvcache_interpreted_equals_reference(n_kv_heads, head_dim, slot_dtype):
    n_slots = 8 * 4
    pool = torch.randn(n_slots, 2, n_kv_heads, head_dim, generator=gen(head_dim))
    k, v = kv_tokens(7, n_kv_heads, head_dim, seed=n_kv_heads)
    slots = torch.tensor([5, -1, 31, 0, -1, 17, 16], dtype=slot_dtype)  # −1: skip (a prefix-cache hit)
    expected, actual = pool.clone(), pool.clone()
    store_kvcache_reference(k, v, expected, slots)
    store_kvcache(k, v, actual, slots, backend="interpret")
    assert torch.equal(actual, expected)  # a copy: exactly equal
    written = slots[slots >= 0].long()
    assert torch.equal(actual[written, 0], k[slots >= 0]) and torch.equal(actual[written, 1], v[slots >= 0])
    untouched = torch.ones(n_slots, dtype=torch.bool)
    untouched[written] = False
    assert torch.equal(actual[untouched], pool[untouched])  # the skipped tokens wrote nowhere


@needs_triton
def test_store_kvcache_into_an_engine_pool_equals_the_engines_write():
    cache = PagedKVCache(n_layers=2, num_blocks=4, block_size=3, n_kv_heads=2, head_dim=6)
    twin = PagedKVCache(n_layers=2, num_blocks=4, block_size=3, n_kv_heads=2, head_dim=6)
    k, v = torch.randn(1, 2, 5, 6, generator=gen(7)), torch.randn(1, 2, 5, 6, generator=gen(8))
    slots = torch.tensor([4, 5, -1, 9, 0])
    twin.step(slots, []).write(1, k, v)  # what PagedStep.write does today
    store_kvcache(k[0].transpose(0, 1), v[0].transpose(0, 1), cache.pools[1], slots, backend="interpret")
    assert torch.equal(cache.pools[1], twin.pools[1]) and not cache.pools[0].any()
    assert torch.equal(cache.keys[1][4], k[0, :, 0]) and torch.equal(cache.values[1][9], v[0, :, 3])


# ------------------------------------------------------------------------------------------ paged decoding


@needs_triton
@pytest.mark.parametrize("block_size", [1, 3, 12, 16])
@pytest.mark.parametrize("n_kv_heads", [8, 4, 2, 1])  # 8 query heads: groups of 1, 2, 4, all
def test_paged_decode_interpreted_equals_reference(block_size, n_kv_heads):
    lens = around_boundaries(block_size)
    q, cache, tables, lens_t = paged_inputs(lens, block_size, 8, n_kv_heads, head_dim=12, seed=block_size)
    out = paged_decode_attention(q, cache.pools[0], tables, lens_t, block_size, backend="interpret")
    close(out, paged_attention_reference(q, cache, 0, tables, lens_t))  # notebook 11's reference itself


@needs_triton
def test_paged_decode_reads_exactly_context_len_keys():
    """One key more or less changes the answer: the comparison above would catch an off-by-one at a boundary."""
    q, cache, tables, lens = paged_inputs([16, 17], 16, 4, 2, head_dim=16, seed=9)
    out = paged_decode_attention(q, cache.pools[0], tables, lens, 16, backend="interpret")
    for wrong in (lens - 1, lens + 1):
        off = paged_attention_reference(q, cache, 0, tables, wrong)
        assert (out - off).abs().amax(dim=(1, 2)).min() > 1e-3


@needs_triton
def test_paged_decode_custom_scale_and_power_of_two_head_dim():
    q, cache, tables, lens = paged_inputs([5, 33, 2], 4, 6, 3, head_dim=32, seed=11)
    out = paged_decode_attention(q, cache.pools[0], tables, lens, 4, scale=0.3, backend="interpret")
    close(out, paged_decode_reference(q, cache.pools[0], tables, lens, 4, scale=0.3))
    default = paged_decode_attention(q, cache.pools[0], tables, lens, 4, backend="interpret")
    assert not torch.allclose(out, default)


def test_paged_decode_reference_wrapper_is_notebook_11s_reference():
    q, cache, tables, lens = paged_inputs([7, 2], 3, 4, 2, head_dim=8, seed=12)
    assert torch.equal(paged_decode_reference(q, cache.pools[0], tables, lens, 3),
                       paged_attention_reference(q, cache, 0, tables, lens))


# ---------------------------------------------------------------------------------------- flash attention

FLASH_CASES = [  # (batch, n_heads, n_kv_heads, seq_q, seq_k, head_dim)
    (1, 4, 4, 1, 1, 16),  # a single position
    (2, 4, 2, 17, 17, 12),  # less than one tile, head_dim not a power of two
    (1, 4, 1, 33, 33, 16),  # one past a 32-wide tile; MQA
    (1, 2, 2, 64, 64, 8),  # exactly two tiles
    (2, 4, 2, 31, 70, 12),  # cached prefix: queries are the last 31 of 70 positions
    (1, 8, 2, 1, 45, 16),  # one decoding query over many keys
    (1, 4, 1, 40, 41, 20),  # one more key than queries
]


@needs_triton
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: "b{}h{}kv{}q{}k{}d{}".format(*c))
def test_flash_attention_interpreted_equals_reference(case, causal):
    q, k, v = attention_inputs(*case, seed=sum(case))
    close(flash_attention(q, k, v, causal=causal, backend="interpret"), flash_attention_reference(q, k, v, causal))


@needs_triton
def test_flash_attention_follows_the_models_causal_convention():
    """Bottom-right aligned, like llmlab.layers.attention (the repo's own step-by-step attention)."""
    q, k, v = attention_inputs(1, 4, 2, 20, 50, 16, seed=5)
    expected, _ = scaled_dot_product_attention_reference(q, k, v, causal=True)
    close(flash_attention(q, k, v, backend="interpret"), expected)
    assert not torch.allclose(flash_attention(q, k, v, causal=False, backend="interpret"), expected, atol=1e-3)


@needs_triton
def test_flash_attention_custom_scale_and_half_precision():
    q, k, v = attention_inputs(1, 2, 1, 19, 19, 16, seed=6)
    close(flash_attention(q, k, v, scale=0.05, backend="interpret"), flash_attention_reference(q, k, v, scale=0.05))
    q, k, v = (x.half() for x in (q, k, v))
    close(flash_attention(q, k, v, backend="interpret"), flash_attention_reference(q, k, v), atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------------------ dispatch point


def _calls(name: str, backend: str | None = None):
    """One small call of kernel ``name``: (function, args) with CPU tensors."""
    q, cache, tables, lens = paged_inputs([5, 2], 2, 2, 1, head_dim=4)
    k, v = kv_tokens(3, 2, 4, seed=0)
    fq, fk, fv = attention_inputs(1, 2, 1, 3, 3, 4)
    return {
        "vector_add": (vector_add, (torch.ones(5), torch.ones(5))),
        "softmax": (softmax, (torch.randn(2, 3),)),
        "kv_store": (store_kvcache, (k, v, torch.zeros(8, 2, 2, 4), torch.tensor([0, -1, 7]))),
        "paged_decode": (paged_decode_attention, (q, cache.pools[0], tables, lens, 2)),
        "flash_attention": (flash_attention, (fq, fk, fv)),
    }[name]


REFERENCES = {"vector_add": "vector_add_reference", "softmax": "softmax_reference",
              "kv_store": "store_kvcache_reference", "paged_decode": "paged_decode_reference",
              "flash_attention": "flash_attention_reference"}


@pytest.fixture
def launches(monkeypatch):
    """Every mode a Triton kernel is jitted for, in order (the kernel still runs)."""
    seen: list[str] = []
    original = TritonKernel.jit

    def spy(self, mode):
        seen.append(mode)
        return original(self, mode)

    monkeypatch.setattr(TritonKernel, "jit", spy)
    return seen


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_cpu_tensors_run_the_torch_reference_by_default(name, monkeypatch, launches):
    module = MODULES[name]
    ran = []
    reference = getattr(module, REFERENCES[name])
    monkeypatch.setattr(module, REFERENCES[name], lambda *a, **kw: ran.append(1) or reference(*a, **kw))
    fn, args = _calls(name)
    assert backend_for(args[0]) == "torch"
    fn(*args)
    assert ran == [1] and launches == []  # the reference ran, no kernel was launched


@needs_triton
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_asking_for_the_interpreter_launches_the_kernel(name, monkeypatch, launches):
    module = MODULES[name]
    monkeypatch.setattr(module, REFERENCES[name], lambda *a, **kw: pytest.fail("the reference ran"))
    fn, args = _calls(name)
    with use_backend("interpret"):
        fn(*args)
    assert launches == ["interpret"]


@needs_triton
def test_each_way_of_asking_picks_the_backend(monkeypatch):
    x = torch.ones(3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's own switch, read at call time
    assert backend_for(x) == "interpret"
    monkeypatch.setenv("LLMLAB_KERNELS", "torch")  # a named choice beats "auto"
    assert backend_for(x) == "torch"
    with use_backend("interpret"):  # code beats the environment
        assert backend_for(x) == "interpret"
        assert backend_for(x, "torch") == "torch"  # and the argument beats both
        with use_backend("auto"):
            assert backend_for(x) == "interpret"  # auto: TRITON_INTERPRET is still set
        assert requested_backend() == "interpret"
    assert requested_backend() == "torch"
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("LLMLAB_KERNELS", " Interpret ")
    assert backend_for(x) == "interpret"


@needs_triton
def test_triton_interpret_env_runs_the_kernel_through_the_public_function(monkeypatch, launches):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(3, 9, generator=gen(0))
    close(softmax(x), softmax_reference(x))
    assert launches == ["interpret"]


def test_use_backend_is_restored_after_an_error():
    with pytest.raises(ZeroDivisionError):
        with use_backend("interpret"):
            raise ZeroDivisionError
    assert requested_backend() == "auto"


def test_unknown_backend_names_are_refused(monkeypatch):
    with pytest.raises(KernelError, match="use one of"):
        with use_backend("cuda"):
            pass
    with pytest.raises(KernelError, match="backend"):
        softmax(torch.randn(2, 2), backend="numpy")
    monkeypatch.setenv("LLMLAB_KERNELS", "fast")
    with pytest.raises(KernelError, match="LLMLAB_KERNELS"):
        softmax(torch.randn(2, 2))


@needs_triton
def test_compiled_triton_on_cpu_tensors_suggests_the_interpreter():
    with pytest.raises(KernelUnavailableError, match="interpret") as caught:
        softmax(torch.randn(2, 2), backend="triton")
    assert isinstance(caught.value, LlmlabError) and isinstance(caught.value, RuntimeError)


def test_without_triton_the_references_run_and_asking_for_triton_says_what_to_do():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # as on a machine where Triton is not installed
        import torch
        from llmlab.kernels import KernelUnavailableError, softmax, softmax_reference, triton_importable, use_backend
        assert not triton_importable()
        x = torch.randn(3, 5)
        assert torch.equal(softmax(x), softmax_reference(x))
        for ask in ("interpret", "triton"):
            try:
                with use_backend(ask):
                    softmax(x)
            except KernelUnavailableError as error:
                print(error)
            else:
                raise SystemExit("no error for " + ask)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # even Triton's switch cannot conjure it
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("pip install triton") == 2 and "backend='torch'" in done.stdout


@pytest.mark.parametrize("call,match", [
    (lambda: vector_add(torch.ones(3), torch.ones(4)), "one shape"),
    (lambda: softmax(torch.ones(2, 0)), "at least one element"),
    (lambda: store_kvcache(torch.ones(2, 1, 4), torch.ones(2, 1, 4), torch.zeros(4, 2, 2, 4),
                           torch.tensor([0, 1])), "pool"),
    (lambda: store_kvcache(torch.ones(2, 1, 4), torch.ones(2, 1, 4), torch.zeros(4, 2, 1, 4),
                           torch.tensor([0.0, 1.0])), "slot_mapping"),
    (lambda: paged_decode_attention(torch.ones(1, 3, 4), torch.zeros(4, 2, 2, 4), torch.zeros(1, 2, dtype=torch.long),
                                    torch.tensor([1]), 2), "divide"),
    (lambda: paged_decode_attention(torch.ones(1, 2, 4), torch.zeros(6, 2, 2, 4), torch.zeros(1, 2, dtype=torch.long),
                                    torch.tensor([1]), 4), "block_size"),
    (lambda: flash_attention(torch.ones(1, 2, 5, 4), torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4)),
     "no more queries"),
    (lambda: flash_attention(torch.ones(1, 3, 2, 4), torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4)), "divide"),
])
def test_bad_inputs_are_kernel_errors(call, match):
    with pytest.raises(KernelError, match=match) as caught:
        call()
    assert isinstance(caught.value, LlmlabError) and isinstance(caught.value, ValueError)


@needs_triton
def test_float64_runs_the_reference_but_not_a_float32_kernel():
    q, k, v = (x.double() for x in attention_inputs(1, 2, 1, 5, 5, 8))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1),
                                                                is_causal=True)
    close(flash_attention(q, k, v), expected, atol=1e-12, rtol=1e-12)  # torch on CPU: float64 kept
    with pytest.raises(KernelError, match="backend='torch'"):
        flash_attention(q, k, v, backend="interpret")
    with pytest.raises(KernelError, match="float32"):
        softmax(q, backend="interpret")


# -------------------------------------------------------------------------------------------- bytes moved


def test_bytes_moved_counts():
    f32, f16 = torch.float32, torch.float16
    assert vector_add_bytes(1000, f32) == 12_000
    assert softmax_bytes(4, 1024, f16) == 2 * 4 * 1024 * 2
    assert softmax_eager_bytes(4, 1024, f16) == (8 * 4 * 1024 + 16) * 2  # about four times the fused kernel
    assert store_kvcache_bytes(10, 2, 64, f16) == 4 * 10 * 2 * 64 * 2 + 10 * 8
    gqa = paged_decode_hbm_bytes([100, 28], n_heads=8, n_kv_heads=2, head_dim=64, dtype=f32)
    per_head = paged_decode_hbm_bytes([100, 28], n_heads=8, n_kv_heads=2, head_dim=64, dtype=f32, per_query_head=True)
    assert gqa == (2 * 128 * 2 * 64 + 2 * 2 * 8 * 64) * 4
    assert per_head - gqa == 2 * 128 * (8 - 2) * 64 * 4  # the GQA-aware kernel reads each KV head once
    flash = flash_attention_hbm_bytes(1, 12, 12, 1024, 1024, 64, f16)
    assert flash == 4 * 12 * 1024 * 64 * 2
    assert standard_attention_hbm_bytes(1, 12, 12, 1024, 1024, 64, f16) - flash == 4 * 12 * 1024 * 1024 * 2


# --------------------------------------------------------------------- compiled for a GPU, without one

INT_POINTERS = {"slot_ptr": "*i64", "block_tables_ptr": "*i64", "context_lens_ptr": "*i64"}
COMPILE_CONSTANTS = {  # one realistic specialisation per kernel (GPT-2-like head_dim 64, a GQA group of 4)
    "vector_add": {"BLOCK": 1024},
    "softmax": {"BLOCK": 1024},
    "kv_store": {"HEADS": 4, "DIM": 64},
    "paged_decode": {"GROUP": 4, "DIM": 64, "BLOCK_N": 16},
    "flash_attention": {"CAUSAL": True, "BLOCK_M": 32, "BLOCK_N": 32, "DIM": 64},
}


@needs_triton
@pytest.mark.parametrize("name", sorted(COMPILE_CONSTANTS))
def test_kernel_compiles_for_a_gpu(name):
    """The compiled path, checked on CPU: Triton lowers the kernel to PTX and machine code for an H100 (sm_90).

    The interpreter runs Python; the compiler is stricter (types across loop iterations, tl.dot shapes),
    so this catches what only a GPU run would otherwise show.  It compiles, it does not run.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = next(value for value in vars(MODULES[name]).values() if isinstance(value, TritonKernel))
    constants = COMPILE_CONSTANTS[name]
    signature = {}
    for param in inspect.signature(kernel.fn).parameters:
        if param in constants:
            signature[param] = "constexpr"
        elif param.endswith("_ptr"):
            signature[param] = INT_POINTERS.get(param, "*fp16")
        else:
            signature[param] = "fp32" if param == "scale" else "i32"
    compiled = triton.compile(ASTSource(kernel.jit("triton"), signature, constants), target=GPUTarget("cuda", 90, 32),
                              options={"enable_fp_fusion": True})  # Triton 3.9's default, said out loud
    assert ".entry " + kernel.__name__ in compiled.asm["ptx"] and compiled.asm["cubin"]


# -------------------------------------------------------------------------------- compiled, on a CUDA GPU


@cuda
def test_cuda_vector_add_compiled_equals_reference():
    x, y = torch.randn(5000, device="cuda"), torch.randn(5000, device="cuda")
    assert backend_for(x) == "triton"
    assert torch.equal(vector_add(x, y, backend="triton"), x + y)


@cuda
def test_cuda_softmax_compiled_equals_reference():
    x = torch.randn(37, 1000, device="cuda") * 30
    close(softmax(x, backend="triton"), softmax_reference(x))


@cuda
def test_cuda_store_kvcache_compiled_equals_reference():
    k, v = (t.cuda() for t in kv_tokens(7, 3, 12, seed=0))
    pool = torch.randn(32, 2, 3, 12, device="cuda")
    slots = torch.tensor([5, -1, 31, 0, -1, 17, 16], device="cuda")
    expected, actual = pool.clone(), pool.clone()
    store_kvcache_reference(k, v, expected, slots)
    store_kvcache(k, v, actual, slots, backend="triton")
    assert torch.equal(actual, expected)


@cuda
@pytest.mark.parametrize("block_size", [1, 12, 16])
@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
def test_cuda_paged_decode_compiled_equals_reference(block_size, n_kv_heads):
    q, cache, tables, lens = paged_inputs(around_boundaries(block_size), block_size, 8, n_kv_heads, head_dim=64)
    q, pool, tables, lens = q.cuda(), cache.pools[0].cuda(), tables.cuda(), lens.cuda()
    close(paged_decode_attention(q, pool, tables, lens, block_size, backend="triton"),
          paged_decode_reference(q, pool, tables, lens, block_size))


@cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", FLASH_CASES + [(2, 8, 2, 300, 517, 64)],
                         ids=lambda c: "b{}h{}kv{}q{}k{}d{}".format(*c))
def test_cuda_flash_attention_compiled_equals_reference(case, causal):
    q, k, v = (x.cuda() for x in attention_inputs(*case, seed=1))
    close(flash_attention(q, k, v, causal=causal, backend="triton"), flash_attention_reference(q, k, v, causal),
          atol=1e-4, rtol=1e-4)

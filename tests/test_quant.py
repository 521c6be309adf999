"""Weight-only quantization: error bounds per weight and per layer, whole models, saving, the engine, bad input.

Bounds used below:

* int8 per output channel rounds each weight to the nearest multiple of ``scale[o]``:
  ``|w - ŵ| ≤ scale[o] / 2``, so a layer's output is off by at most ``Σ_i |x_i| · scale[o] / 2``.
* int4 per group: ``|w - ŵ| ≤ scale / 2`` plus the rounding of ``zero`` to bfloat16 (``2^-9 |zero|``).
* The CPU kernels compute in bfloat16: the input is rounded (relative error ≤ 2^-9 each), the
  sum is accumulated in fp32, the output is rounded (≤ 2^-9 relative): together at most
  ``2^-8 · Σ_i |x_i ŵ_i|`` away from the exact product with the dequantized weight.
"""

from __future__ import annotations

import copy

import pytest
import torch

import llmlab.quant as quant
from llmlab import Transformer, get_config
from llmlab.checkpoint import load_checkpoint, save_checkpoint
from llmlab.engine import LLM
from llmlab.generate import generate_ids
from llmlab.quant import (
    Int4Linear,
    Int8Linear,
    QuantizationError,
    dequantize_int4,
    load_quantized,
    pack_int4,
    quantization_report,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantized_weight_bytes,
    save_quantized,
    unpack_int4,
    weight_bytes,
)
from llmlab.sampling import SamplingParams
from llmlab.tokenizer import BPETokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0, dtype=torch.float32, **changes) -> Transformer:
    torch.manual_seed(seed)
    shape = dict(vocab_size=300, context_length=32, d_model=64, n_layers=2, n_heads=2)
    cfg = get_config("course-tiny").replace(**{**shape, **changes})
    return Transformer(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def tokenizer(shakespeare):
    return BPETokenizer.train(shakespeare[:20_000], 300)


@pytest.fixture(scope="module")
def course():
    return load_checkpoint()


# --- one weight matrix ----------------------------------------------------------------------------


def test_int8_rounds_each_weight_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.rand(48, 1)  # rows of very different sizes
    w[3] = 0.0  # an all-zero row
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert int(q.abs().max()) <= 127
    assert bool(((w - q.float() * scale[:, None]).abs() <= scale[:, None] / 2 + 1e-7).all())
    assert torch.equal(scale, scale.bfloat16().float())  # the kernel's bf16 scale is exactly this one


def test_int4_packs_two_codes_per_byte_and_rounds_within_half_a_step():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    w = torch.randn(32, 128)
    packed, scale, zero = quantize_int4(w, group_size=32)
    assert packed.shape == (32, 64) and packed.dtype == torch.uint8 and scale.shape == zero.shape == (32, 4)
    error = (dequantize_int4(packed, scale, zero) - w).abs().reshape(32, 4, 32)
    bound = scale[..., None] / 2 + 2**-9 * zero.abs()[..., None] + 1e-7
    assert bool((error <= bound).all())


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 40])  # 40 rows > KERNEL_MAX_ROWS: always the dequantized product
def test_int8_linear_is_within_its_bound(use_kernel, rows):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear)
    layer.use_kernel = use_kernel
    x = torch.randn(rows, 64)
    y, exact = layer(x), linear(x)
    rounding = x.abs() @ (layer.scale[:, None] / 2).expand(48, 64).T  # Σ_i |x_i| scale_o / 2
    bf16 = 2**-8 * (x.abs() @ layer.dequantized_weight().abs().T) if use_kernel else 0.0
    assert bool(((y - exact).abs() <= rounding + bf16 + 1e-5).all())


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int4_linear_kernel_matches_its_dequantized_weight(rows):
    torch.manual_seed(rows)
    layer = Int4Linear.from_linear(torch.nn.Linear(64, 33), group_size=32)  # 33: the kernel pads to 48
    x = torch.randn(2, rows, 64)  # any leading dimensions
    y = layer(x)
    layer.use_kernel = False
    reference = layer(x)
    w = layer.dequantized_weight()
    assert torch.allclose(reference, x @ w.T + layer.bias, atol=1e-5)
    assert bool(((y - reference).abs() <= 2**-8 * (x.abs() @ w.abs().T) + 1e-5).all())


def test_quantized_layers_keep_the_bias_and_take_bf16():
    linear = torch.nn.Linear(64, 16)
    layer = Int8Linear.from_linear(linear)
    assert torch.equal(layer.bias, linear.bias)
    x = torch.randn(1, 64)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="64 features"):
        layer(torch.randn(1, 63))


# --- whole models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size,tolerance", [(8, None, 0.02), (4, 32, 0.2)])
def test_a_quantized_model_stays_close(bits, group_size, tolerance):
    model = tiny_model()
    reference = copy.deepcopy(model)
    quantize_model(model, bits=bits, group_size=group_size)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    ids = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    assert float((got - expected).norm() / expected.norm()) < tolerance
    assert model.token_embedding.weight.dtype == torch.float32  # the embedding stays exact


def test_the_course_model_keeps_its_predictions(course, shakespeare):
    ids = torch.tensor(course.tokenizer.encode(shakespeare[-3000:])[:513])
    batch = [(ids[:-1].reshape(2, 256), ids[1:].reshape(2, 256))]
    for bits, group_size, loss_change, agreement in ((8, None, 0.01, 0.95), (4, 64, 0.03, 0.85)):
        quantized = quantize_model(copy.deepcopy(course.model), bits=bits, group_size=group_size)
        report = quantization_report(course.model, quantized, batch)
        assert abs(report.relative_loss_change) < loss_change, report.summary()
        assert report.top1_agreement > agreement, report.summary()
        assert report.bytes_quantized < report.bytes_reference / 2
        # (greedy *paths* are not compared: one flipped near-tie and the two texts part for good)


def test_tied_head_gets_its_own_copy_and_skip_keeps_layers_exact():
    model = quantize_model(tiny_model(), skip=("lm_head", "blocks.1.mlp.up_proj"))
    assert model.lm_head.weight is model.token_embedding.weight  # skipped: still tied
    assert isinstance(model.blocks[1].mlp.up_proj, torch.nn.Linear)
    assert isinstance(model.blocks[0].mlp.up_proj, Int8Linear)
    head = quantize_model(tiny_model()).lm_head
    assert isinstance(head, Int8Linear)


def test_weight_bytes_count_codes_and_scales():
    model = tiny_model()
    assert weight_bytes(model) == 4 * model.num_parameters()
    quantized = quantize_model(copy.deepcopy(model))
    expected = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):  # int8 codes + an fp32 scale per row + the fp32 bias
            bias = module.out_features if module.bias is not None else 0
            expected += module.weight.numel() + 4 * module.out_features + 4 * bias
    others = model.num_parameters() - sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                                          for m in model.modules() if isinstance(m, torch.nn.Linear)
                                          and m is not model.lm_head)
    assert weight_bytes(quantized) == expected + 4 * others


@pytest.mark.parametrize("bits,group_size,skip", [(8, None, ()), (8, None, ("lm_head",)), (4, 32, ()),
                                                   (4, 64, ("lm_head", "o_proj"))])
@pytest.mark.parametrize("preset", ["course-tiny", "course-tiny-llama"])
def test_weight_bytes_can_be_worked_out_from_the_config(preset, bits, group_size, skip):
    model = Transformer(get_config(preset).replace(vocab_size=300, context_length=32, d_model=64, n_heads=2,
                                                   n_kv_heads=None, head_dim=None, d_ff=None, n_layers=2))
    expected = quantized_weight_bytes(model.config, bits, group_size, skip)
    assert weight_bytes(quantize_model(model, bits=bits, group_size=group_size, skip=skip)) == expected


def test_gpt2_in_int8_needs_about_half_its_fp32_bytes():
    fp32 = 4 * 124_439_808
    int8 = quantized_weight_bytes(get_config("gpt2-124m"))
    assert 0.5 < int8 / fp32 < 0.6  # the fp32 token embedding (38.6M weights) stays; the head gets an int8 copy


def test_generation_and_the_engine_run_a_quantized_model():
    model = quantize_model(tiny_model(dtype=torch.float64))
    prompt = [5, 6, 7]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    expected = list(generate_ids(model, prompt, params))
    assert len(expected) == 12
    done = LLM(model).generate([prompt], params, progress=False)
    assert done[0].token_ids == expected


# --- saving and loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 64)])
def test_a_saved_model_loads_bit_for_bit(tmp_path, tokenizer, bits, group_size):
    model = quantize_model(tiny_model(), bits=bits, group_size=group_size)
    save_quantized(model, tmp_path / "q", tokenizer)
    save_quantized(model, tmp_path / "q", tokenizer)  # an earlier save is replaced
    loaded = load_quantized(tmp_path / "q")
    assert loaded.quantization == model.quantization
    ids = torch.randint(0, 300, (1, 20))
    for rows in (ids, ids[:, :1]):  # 20 rows (dequantized) and one (the kernel)
        assert torch.equal(loaded(rows).logits, model(rows).logits)
    assert BPETokenizer.load(tmp_path / "q" / "tokenizer.json").vocab_size == 300


def test_loading_something_else_says_what_to_do(tmp_path, tokenizer):
    model = tiny_model()
    save_checkpoint(tmp_path / "full", model, tokenizer)
    with pytest.raises(QuantizationError, match="load_checkpoint"):
        load_quantized(tmp_path / "full")
    with pytest.raises(QuantizationError, match="no quantized model"):
        load_quantized(tmp_path / "missing")
    with pytest.raises(QuantizationError, match="save_checkpoint"):
        save_quantized(model, tmp_path / "q")
    with pytest.raises(QuantizationError, match="vocab_size"):
        save_quantized(quantize_model(tiny_model(vocab_size=512)), tmp_path / "q", tokenizer)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(QuantizationError, match="never replaces"):
        save_quantized(quantize_model(tiny_model()), tmp_path / "other")
    broken = tmp_path / "broken"
    save_quantized(quantize_model(tiny_model()), broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(QuantizationError, match="do not load"):
        load_quantized(broken)


def test_bad_requests_say_what_to_do():
    with pytest.raises(QuantizationError, match="bits must be 8"):
        quantize_model(tiny_model(), bits=3)
    with pytest.raises(QuantizationError, match="group_size must be None"):
        quantize_model(tiny_model(), bits=8, group_size=32)
    with pytest.raises(QuantizationError, match="group_size must be one of"):
        quantize_model(tiny_model(), bits=4, group_size=48)
    model = tiny_model(d_ff=96)  # up_proj has 64 inputs, down_proj 96
    with pytest.raises(QuantizationError, match="does not divide .*96 inputs: use group_size 32"):
        quantize_model(model, bits=4, group_size=64)
    assert isinstance(model.blocks[0].mlp.up_proj, torch.nn.Linear)  # nothing was changed
    quantize_model(model)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(model)
    with pytest.raises(QuantizationError, match="skip must be"):
        quantize_model(tiny_model(), skip="lm_head")
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_int8(torch.full((2, 4), float("nan")))
    with pytest.raises(QuantizationError, match="torch.nn.Module"):
        quantize_model("model")


def test_the_kernel_threshold_is_a_module_setting(monkeypatch):
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 32))
    x = torch.randn(3, 64)
    monkeypatch.setattr(quant, "KERNEL_MAX_ROWS", 0)
    dequantized = layer(x)
    layer.use_kernel = False
    assert torch.equal(layer(x), dequantized)

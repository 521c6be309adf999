"""Every bad input to sampling, configs, calculators, devices, generation and the model ends in a clear
llmlab error, and ``llmlab generate`` turns each into one line and exit status 2 (or 1) (issue 10).

API rows: the exact package error type and a fragment of its message.  CLI rows run
``python -m llmlab generate`` in a subprocess (a few each in their own, the rest one after
another in one shared Python process, so that the file stays fast) and check the exit status,
one ``llmlab generate: error:`` line on stderr, no traceback, and nothing on stdout: the prompt
is printed only once everything has been checked.  Hypothesis tests then
feed arbitrary values to ``SamplingParams``, ``ModelConfig`` and ``llmlab.calc`` and accept only a
clean result or an :class:`~llmlab.errors.LlmlabError`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmlab import calc, runtime
from llmlab.calc import CalcError
from llmlab.config import MAX_SIZE, ConfigError, ModelConfig, get_config
from llmlab.errors import LlmlabError
from llmlab.generate import GenerateError, PromptError, generate_ids, generate_many
from llmlab.layers.embedding import TokenIdError
from llmlab.layers.positional import PositionError, PositionTypeError
from llmlab.model import ContextLengthError, ModelInputError, ModelInputTypeError, ModelSizeError, Transformer
from llmlab.runtime import DeviceError, SettingError
from llmlab.sampling import MAX_NEW_TOKENS, SamplingError, SamplingParams, make_generator

NAN, INF = float("nan"), float("inf")
TINY = dict(name="tiny", vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=2)
GPT2 = get_config("gpt2-124m")


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**TINY)).eval()


def raises(call, error: type[Exception], fragment: str) -> str:
    """Run ``call``; it must raise exactly ``error`` (an LlmlabError) with ``fragment`` in its message."""
    with pytest.raises(LlmlabError) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert fragment in message, message
    return message


# --- SamplingParams -------------------------------------------------------------------------

SAMPLING_ROWS = [
    # temperature: NaN and ±inf (issue 10: nan crashed in multinomial, inf sampled uniformly)
    (dict(temperature=NAN), "temperature must be a finite number ≥ 0"),
    (dict(temperature=INF), "temperature must be a finite number ≥ 0"),
    (dict(temperature=-INF), "temperature must be a finite number ≥ 0"),
    (dict(temperature=-0.5), "temperature must be ≥ 0 (0 = greedy)"),
    (dict(temperature="0.8"), "temperature must be a finite number"),
    (dict(temperature=None), "temperature must be a finite number"),
    (dict(temperature=True), "temperature must be a finite number"),
    (dict(temperature=1e-300), "temperature must be 0 (greedy) or at least 1e-06"),
    # top_k / top_p
    (dict(top_k=0), "top_k must be an integer ≥ 1"),
    (dict(top_k=-3), "top_k must be an integer ≥ 1"),
    (dict(top_k=2.5), "top_k must be an integer ≥ 1"),
    (dict(top_k="5"), "top_k must be an integer ≥ 1"),
    (dict(top_k=True), "top_k must be an integer ≥ 1"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=NAN), "top_p must be in (0, 1]"),
    (dict(top_p=INF), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_p=-0.1), "top_p must be in (0, 1]"),
    (dict(top_p="0.9"), "top_p must be in (0, 1]"),
    # max_new_tokens: zero, negative, huge (issue 10: 1e9 ran for ever), wrong type
    (dict(max_new_tokens=0), "max_new_tokens must be an integer ≥ 1"),
    (dict(max_new_tokens=-5), "max_new_tokens must be an integer ≥ 1"),
    (dict(max_new_tokens=10**9), "max_new_tokens must be at most 100,000"),
    (dict(max_new_tokens=MAX_NEW_TOKENS + 1), "generate in several calls"),
    (dict(max_new_tokens=20.0), "max_new_tokens must be an integer ≥ 1"),
    (dict(max_new_tokens=NAN), "max_new_tokens must be an integer ≥ 1"),
    (dict(max_new_tokens=None), "max_new_tokens must be an integer ≥ 1"),
    # seed: beyond 64 bits (issue 10: an overflow traceback), negative, wrong type
    (dict(seed=2**64), "seed must be an integer in 0 .. 2**64 - 1"),
    (dict(seed=10**30), "seed must be an integer in 0 .. 2**64 - 1"),
    (dict(seed=-1), "seed must be an integer in 0 .. 2**64 - 1"),
    (dict(seed=1.5), "seed must be an integer in 0 .. 2**64 - 1"),
    (dict(seed="7"), "seed must be an integer in 0 .. 2**64 - 1"),
    # stop_ids
    (dict(stop_ids="ab"), "stop_ids must be a tuple of token ids"),
    (dict(stop_ids=5), "stop_ids must be a tuple of token ids"),
    (dict(stop_ids=(1, "a")), "stop_ids must hold token ids"),
    (dict(stop_ids=[-1]), "stop_ids must hold token ids"),
    (dict(stop_ids=[1.0]), "stop_ids must hold token ids"),
]


@pytest.mark.parametrize(("kwargs", "fragment"), SAMPLING_ROWS, ids=[repr(k) for k, _ in SAMPLING_ROWS])
def test_bad_sampling_params(kwargs, fragment):
    raises(lambda: SamplingParams(**kwargs), SamplingError, fragment)


def test_sampling_limits_are_accepted():
    assert SamplingParams(seed=2**64 - 1, max_new_tokens=MAX_NEW_TOKENS, temperature=1e-6, top_p=1.0).seed == 2**64 - 1
    assert make_generator(2**64 - 1) is not None
    raises(lambda: make_generator(2**64), SamplingError, "seed must be an integer in 0 .. 2**64 - 1")
    raises(lambda: make_generator(-1), SamplingError, "seed must be an integer in 0 .. 2**64 - 1")


def test_nan_logits_are_named_not_a_multinomial_traceback():
    from llmlab.sampling import sample_next

    logits = torch.tensor([[0.0, NAN, 1.0]])
    raises(lambda: sample_next(logits, SamplingParams(), make_generator(0)), SamplingError,
           "the model's logits contain NaN or inf")


# --- ModelConfig, from_json, get_config ----------------------------------------------------------

CONFIG_ROWS = [
    # rope_theta (issue 10: NaN built a model of NaN RoPE tables)
    (dict(rope_theta=NAN), "rope_theta must be a positive number greater than 1"),
    (dict(rope_theta=INF), "rope_theta must be a positive number greater than 1"),
    (dict(rope_theta=-INF), "rope_theta must be a positive number greater than 1"),
    (dict(rope_theta=0), "rope_theta must be a positive number"),
    (dict(rope_theta=-10000.0), "rope_theta must be a positive number"),
    (dict(rope_theta=1e-300), "rope_theta must be a positive number greater than 1"),
    (dict(rope_theta="10000"), "rope_theta must be a positive number"),
    (dict(rope_theta=True), "rope_theta must be a positive number"),
    (dict(norm_eps=NAN), "norm_eps must be a small positive number"),
    (dict(norm_eps=INF), "norm_eps must be a small positive number"),
    (dict(norm_eps=0.0), "norm_eps must be a small positive number"),
    (dict(dropout=NAN), "dropout must be in [0, 1)"),
    (dict(dropout=-INF), "dropout must be in [0, 1)"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    # size fields: zero, negative, float, string, None, bool, huge
    (dict(vocab_size=0), "vocab_size must be a positive integer, got 0"),
    (dict(context_length=-1), "context_length must be a positive integer"),
    (dict(d_model=32.0), "d_model must be a positive integer, got 32.0"),
    (dict(n_layers="2"), "n_layers must be a positive integer, got '2'"),
    (dict(n_heads=None), "n_heads must be a positive integer, got None"),
    (dict(n_heads=NAN), "n_heads must be a positive integer, got nan"),
    (dict(n_kv_heads=True), "n_kv_heads must be a positive integer, got True"),
    (dict(head_dim=-8), "head_dim must be a positive integer"),
    (dict(d_ff=INF), "d_ff must be a positive integer"),
    (dict(vocab_size=2**40), "vocab_size=1,099,511,627,776 is larger than any model has"),
    (dict(context_length=10**30), f"the limit is {MAX_SIZE:,}"),
    (dict(name=""), "name must be a non-empty string"),
    (dict(name=None), "name must be a non-empty string"),
    (dict(norm=None), "norm=None is not known"),
    (dict(bias=1), "bias must be True or False"),
    # a divisor message stays quick for the largest sizes (it used to count to n one by one)
    (dict(d_model=MAX_SIZE, n_heads=MAX_SIZE, n_kv_heads=6), "is not divisible by n_kv_heads=6"),
    (dict(d_model=MAX_SIZE - 1, n_heads=5), "is not divisible by n_heads=5"),
]


@pytest.mark.parametrize(("changes", "fragment"), CONFIG_ROWS, ids=[repr(c) for c, _ in CONFIG_ROWS])
def test_bad_model_config(changes, fragment):
    raises(lambda: ModelConfig(**{**TINY, **changes}), ConfigError, fragment)


def _json(**changes) -> str:
    data = {**ModelConfig(**TINY).to_dict(), **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...})


JSON_ROWS = [
    ("{", "the config is not valid JSON"),
    ("", "the config is not valid JSON"),
    (b"\xff\xfe{", "the config is not valid JSON"),
    ("[1, 2]", "a config must be a mapping of field names to values"),
    ("null", "a config must be a mapping"),
    ('"course-tiny"', "a config must be a mapping"),
    ("{}", "the config lacks 'name', 'vocab_size'"),
    (_json(d_model=...), "the config lacks 'd_model'"),
    (_json(d_model="256"), "d_model must be a positive integer, got '256'"),
    (_json(n_layers=2.0), "n_layers must be a positive integer, got 2.0"),
    (_json(bias="true"), "bias must be True or False"),
    (_json(rope_theta=NAN), "rope_theta must be a positive number"),  # json.dumps writes NaN, loads reads it
    (_json(dmodel=256), "unknown config field 'dmodel'. Did you mean 'd_model'?"),
    (42, "from_json() reads JSON text (a str), got int"),
    (None, "from_json() reads JSON text"),
]


@pytest.mark.parametrize(("text", "fragment"), JSON_ROWS, ids=[repr(t)[:40] for t, _ in JSON_ROWS])
def test_bad_config_json(text, fragment):
    raises(lambda: ModelConfig.from_json(text), ConfigError, fragment)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: ModelConfig.from_dict([1, 2]), "a config must be a mapping"),
        (lambda: ModelConfig.from_dict({1: 2}), "config field names are strings"),
        (lambda: get_config(None), "a preset name is a string such as 'course-tiny', got None"),
        (lambda: get_config(["course-tiny"]), "a preset name is a string"),
        (lambda: get_config("gpt2-125m"), "Did you mean 'gpt2-124m'?"),
        (lambda: get_config("course-tiny", rope_theta=NAN), "rope_theta must be a positive number"),
        (lambda: get_config("course-tiny", d_modle=8), "Did you mean 'd_model'?"),
    ],
)
def test_bad_config_lookups(call, fragment):
    raises(call, ConfigError, fragment)


# --- calc ------------------------------------------------------------------------------------------

CALC_ROWS = [
    # weight_bytes: a string used to come back as a string ('gpt2-124m' * 2), negatives as negative sizes
    (lambda: calc.weight_bytes("gpt2-125m"), ConfigError, "Did you mean 'gpt2-124m'?"),
    (lambda: calc.weight_bytes(-1e9), CalcError, "config must be a parameter count ≥ 0"),
    (lambda: calc.weight_bytes(NAN), CalcError, "config must be a parameter count ≥ 0"),
    (lambda: calc.weight_bytes(INF, "fp16"), CalcError, "config must be a parameter count ≥ 0"),
    (lambda: calc.weight_bytes(None), CalcError, "config must be a ModelConfig, a preset name or a parameter count"),
    (lambda: calc.weight_bytes(True), CalcError, "config must be a ModelConfig, a preset name or a parameter count"),
    (lambda: calc.weight_bytes(GPT2, "fp8"), CalcError, "unknown dtype 'fp8': use one of fp32"),
    (lambda: calc.weight_bytes(GPT2, None), CalcError, "unknown dtype None"),
    (lambda: calc.weight_bytes(GPT2, ["bf16"]), CalcError, "unknown dtype ['bf16']"),
    # every function taking a config
    (lambda: calc.param_counts({}), CalcError, "config must be a ModelConfig (e.g. get_config('llama3-8b'))"),
    (lambda: calc.param_counts(None), CalcError, "config must be a ModelConfig"),
    (lambda: calc.kv_bytes_per_token(124e6), CalcError, "config must be a ModelConfig"),
    (lambda: calc.param_counts(GPT2, 5), CalcError, "param_counts(): too many positional arguments"),
    # batch / tokens / context: integers ≥ 0
    (lambda: calc.kv_cache_bytes(GPT2, batch=-1), CalcError, "batch must be an integer ≥ 0"),
    (lambda: calc.kv_cache_bytes(GPT2, 1, -5), CalcError, "tokens must be an integer ≥ 0"),
    (lambda: calc.kv_cache_bytes(GPT2, 1.5), CalcError, "batch must be an integer ≥ 0"),
    (lambda: calc.kv_cache_bytes(GPT2, 1, NAN), CalcError, "tokens must be an integer ≥ 0"),
    (lambda: calc.forward_bytes(GPT2, -1, 1, 0), CalcError, "batch must be an integer ≥ 0"),
    (lambda: calc.forward_bytes(GPT2, 1, -1, 0), CalcError, "new_tokens must be an integer ≥ 0"),
    (lambda: calc.forward_flops(GPT2, 1, 1, -1), CalcError, "context must be an integer ≥ 0"),
    (lambda: calc.flops_per_token(GPT2, context=-3), CalcError, "context must be an integer ≥ 0"),
    (lambda: calc.decode_step_bytes(GPT2, 1.5), CalcError, "context must be an integer ≥ 0"),
    (lambda: calc.decode_intensity_limit(GPT2, "8k"), CalcError, "context must be an integer ≥ 0"),
    (lambda: calc.arithmetic_intensity(GPT2, "1", 1), CalcError, "batch must be an integer ≥ 0"),
    (lambda: calc.training_flops(GPT2, -1), CalcError, "n_tokens must be a number of tokens ≥ 0"),
    (lambda: calc.training_flops(GPT2, NAN), CalcError, "n_tokens must be a number of tokens ≥ 0"),
    # max_concurrent_sequences (issue 10: seq_len=0 was a ZeroDivisionError)
    (lambda: calc.max_concurrent_sequences(GPT2, 80e9, 0), CalcError, "seq_len must be an integer ≥ 1"),
    (lambda: calc.max_concurrent_sequences(GPT2, 80e9, -8), CalcError, "seq_len must be an integer ≥ 1"),
    (lambda: calc.max_concurrent_sequences(GPT2, 0, 1024), CalcError, "gpu_bytes must be a positive number"),
    (lambda: calc.max_concurrent_sequences(GPT2, -80e9, 1024), CalcError, "gpu_bytes must be a positive number"),
    (lambda: calc.max_concurrent_sequences(GPT2, NAN, 1024), CalcError, "gpu_bytes must be a positive number"),
    (lambda: calc.max_concurrent_sequences(GPT2, INF, 1024), CalcError, "gpu_bytes must be a positive number"),
    (lambda: calc.max_concurrent_sequences(GPT2, 80e9, 1024, reserve_fraction=1.0), CalcError,
     "reserve_fraction must be a fraction in [0, 1)"),
    (lambda: calc.max_concurrent_sequences(GPT2, 80e9, 1024, reserve_fraction=-0.1), CalcError,
     "reserve_fraction must be a fraction in [0, 1)"),
    (lambda: calc.max_concurrent_sequences(GPT2, 80e9, 1024, reserve_fraction=NAN), CalcError,
     "reserve_fraction must be a fraction in [0, 1)"),
    (lambda: calc.max_concurrent_sequences(GPT2, 80e9, 1024, n_gpus=0), CalcError, "n_gpus must be an integer ≥ 1"),
    (lambda: calc.max_concurrent_sequences(GPT2, 80e9, 1024, kv_dtype="fp9"), CalcError, "unknown dtype 'fp9'"),
    # the rest
    (lambda: calc.linear_params(-1, 4, True), CalcError, "n_in must be an integer ≥ 0"),
    (lambda: calc.linear_params(4, 4, "yes"), CalcError, "bias must be True or False"),
    (lambda: calc.mlp_params(GPT2, include_bias=1), CalcError, "include_bias must be True or False"),
    (lambda: calc.norm_params(GPT2, dim=0), CalcError, "dim must be an integer ≥ 1"),
    (lambda: calc.roofline(NAN, 1e15, 3e12), CalcError, "intensity must be a finite number ≥ 0"),
    (lambda: calc.roofline(10, -1e15, 3e12), CalcError, "peak_flops must be a finite number ≥ 0"),
    (lambda: calc.roofline(10, 1e15, INF), CalcError, "bandwidth must be a finite number ≥ 0"),
    (lambda: calc.human_bytes(NAN), CalcError, "n must be a finite number, got nan"),
    (lambda: calc.human_bytes("350e9"), CalcError, "n must be a finite number"),
    (lambda: calc.human_bytes(1, digits=-1), CalcError, "digits must be an integer from 0 to 20"),
    (lambda: calc.human_count(INF), CalcError, "n must be a finite number, got inf"),
    (lambda: calc.dtype_bytes(None), CalcError, "unknown dtype None"),
    # a result beyond a float
    (lambda: calc.kv_cache_bytes(GPT2, 10**400, dtype="int4"), CalcError, "the result is too large for a float"),
]


@pytest.mark.parametrize(("call", "error", "fragment"), CALC_ROWS, ids=[str(i) for i in range(len(CALC_ROWS))])
def test_bad_calc_inputs(call, error, fragment):
    raises(call, error, fragment)


def test_calc_valid_edges_still_work():
    """What the notebooks pass keeps working: parameter counts as floats, batch 0, a preset name."""
    assert calc.weight_bytes(175e9, "fp16") == 350e9
    assert calc.weight_bytes("gpt2-124m", "fp32") == calc.weight_bytes(GPT2, "fp32") == 124_439_808 * 4
    assert calc.param_counts("llama3-8b") == calc.param_counts(get_config("llama3-8b"))
    assert calc.forward_bytes(GPT2, 0, 1, 0) > 0
    assert calc.max_concurrent_sequences(GPT2, 80e9, 1) > 0
    assert calc.kv_cache_bytes(GPT2, 0, 0) == 0
    import numpy as np

    assert calc.kv_cache_bytes(GPT2, 1, np.int64(10)) == calc.kv_cache_bytes(GPT2, 1, 10)
    assert calc.human_bytes(np.float64(350e9)) == "350.0 GB"


# --- runtime ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefer", "fragment"),
    [
        ("foo", "device 'foo' is not a device torch knows: use 'cpu'"),
        ("cuda:-1", "is not a device torch knows"),
        ("meta", "holds tensor shapes only"),
        (5, "device must be a device name such as 'cpu' or 'cuda', got 5"),
        (["cpu"], "device must be a device name"),
        ("cuda:99", "cuda:99"),
    ],
)
def test_bad_device(prefer, fragment):
    raises(lambda: runtime.device(prefer), DeviceError, fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu():
    message = raises(lambda: runtime.device("cuda"), DeviceError, "CUDA is not available here: use 'cpu'")
    assert isinstance(DeviceError(message), (ValueError, RuntimeError))  # old `except RuntimeError` still works


def test_bad_device_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLMLAB_DEVICE", "gpu")
    raises(runtime.device, DeviceError, "LLMLAB_DEVICE 'gpu' is not a device torch knows: unset LLMLAB_DEVICE")
    assert runtime.device("cpu").type == "cpu"  # an explicit choice wins over the variable


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "0", None, True])
def test_bad_seed_everything(seed):
    raises(lambda: runtime.seed_everything(seed), SettingError, "seed must be")


def test_bad_fast_mode(monkeypatch):
    monkeypatch.setenv("LLMLAB_FAST", "maybe")
    raises(runtime.fast_mode, SettingError, "set it to 1/true/yes/on or 0/false/no/off")


# --- generation --------------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0, max_new_tokens=2)

GENERATE_ROWS = [
    # issue 10: generate_many(model, []) was a ValueError from max()
    (lambda m: generate_many(m, [], GREEDY), PromptError, "prompts is empty: give at least one prompt"),
    (lambda m: generate_many(m, "ROMEO", GREEDY), PromptError, "prompts must be a list of prompts"),
    (lambda m: generate_many(m, [1, 2, 3], GREEDY), PromptError, "a prompt must be a list of token ids, got int"),
    (lambda m: generate_many(m, ["ROMEO"], GREEDY), PromptError, "a prompt must be a list of token ids, got str"),
    (lambda m: generate_many(m, [[]], GREEDY), PromptError, "the prompt is empty"),
    (lambda m: generate_many(m, [[1, 2.5]], GREEDY), PromptError, "a prompt must hold integer token ids, got 2.5"),
    (lambda m: generate_many(m, [[1, None]], GREEDY), PromptError, "a prompt must hold integer token ids"),
    (lambda m: generate_many(m, [[1] * 17], GREEDY), PromptError,
     "the prompt is 17 tokens but the model's context is 16"),
    (lambda m: generate_many(m, torch.tensor([1, 2]), GREEDY), PromptError, "a tensor of prompts must be [batch, seq]"),
    (lambda m: generate_many(m, [torch.tensor([1.0])], GREEDY), PromptError, "a prompt tensor must be 1-D integer"),
    (lambda m: generate_many(m, [[1]], None), GenerateError, "params must be a SamplingParams"),
    (lambda m: generate_many(m, [[1]], {"temperature": 0}), GenerateError, "params must be a SamplingParams"),
    (lambda m: generate_many(m, [[1]], GREEDY, use_cache=False, compiled=True), GenerateError,
     "compiled=True compiles the cached decode step"),
    (lambda m: generate_many(m, [[1]], GREEDY, use_cache="yes"), GenerateError, "use_cache must be True or False"),
    (lambda m: generate_many("course-tiny", [[1]], GREEDY), GenerateError, "model must be an llmlab Transformer"),
    (lambda m: generate_many(m, [[64]], GREEDY), TokenIdError, "token id 64 at position (0, 0) is out of range"),
    (lambda m: generate_many(m, [[-1]], GREEDY), TokenIdError, "token id -1"),
    # generate_ids checks when called, before the first id is asked for
    (lambda m: generate_ids(m, [], GREEDY), PromptError, "the prompt is empty"),
    (lambda m: generate_ids(m, "ROMEO", GREEDY), PromptError, "a prompt must be a list of token ids, got str"),
    (lambda m: generate_ids(m, [1], SamplingParams), GenerateError, "params must be a SamplingParams"),
]


@pytest.mark.parametrize(("call", "error", "fragment"), GENERATE_ROWS, ids=[str(i) for i in range(len(GENERATE_ROWS))])
def test_bad_generation_requests(model, call, error, fragment):
    raises(lambda: call(model), error, fragment)


# --- the model's forward pass --------------------------------------------------------------------------

FORWARD_ROWS = [
    (lambda m: m([[1, 2]]), ModelInputTypeError, "ids must be a torch.Tensor of token ids, got list"),
    (lambda m: m(torch.tensor([[1.0, 2.0]])), ModelInputTypeError, "ids must be integer token ids (torch.long)"),
    (lambda m: m(torch.tensor([[True]])), ModelInputTypeError, "ids must be integer token ids"),
    (lambda m: m(torch.tensor([1, 2])), ModelInputError, "ids must have shape [batch, seq], got shape (2,)"),
    (lambda m: m(torch.zeros(1, 0, dtype=torch.long)), ModelInputError, "ids is empty"),
    (lambda m: m(torch.zeros(1, 17, dtype=torch.long)), ContextLengthError, "longer than context_length=16"),
    (lambda m: m(torch.tensor([[1, 64]])), TokenIdError, "token id 64 at position (0, 1) is out of range"),
    (lambda m: m(torch.tensor([[-3]])), TokenIdError, "token id -3"),
    (lambda m: m(torch.tensor([[1, 2]]), positions=[0, 1]), ModelInputTypeError, "positions must be a tensor"),
    (lambda m: m(torch.tensor([[1, 2]]), positions=torch.tensor([0.0, 1.0])), ModelInputTypeError,
     "positions must be a tensor of integer positions"),
    (lambda m: m(torch.tensor([[1, 2]]), positions=torch.tensor([0, 1, 2])), ModelInputError,
     "positions must have shape [seq] or [batch, seq]"),
    (lambda m: m(torch.tensor([[1, 2]]), positions=torch.tensor([15, 16])), ContextLengthError,
     "positions must be in 0..15"),
    (lambda m: m(torch.tensor([[1, 2]]), positions=torch.tensor([-1, 0])), ContextLengthError,
     "positions must be in 0..15"),
]


@pytest.mark.parametrize(("call", "error", "fragment"), FORWARD_ROWS, ids=[str(i) for i in range(len(FORWARD_ROWS))])
def test_bad_forward_inputs(model, call, error, fragment):
    raises(lambda: call(model), error, fragment)


def test_bad_positions_in_the_layers():
    from llmlab.layers.positional import LearnedPositions

    table = LearnedPositions(8, 4)
    raises(lambda: table(torch.tensor([8])), PositionError, "positions must be in 0..7")
    raises(lambda: table([0, 1]), PositionTypeError, "positions must be an integer tensor (torch.long), got list")


def test_bad_model_builds():
    raises(lambda: Transformer("course-tiny"), ConfigError, "use Transformer.from_preset('course-tiny')")
    raises(lambda: Transformer({"d_model": 8}), ConfigError, "Transformer() needs a ModelConfig, got dict")
    huge = ModelConfig(**{**TINY, "vocab_size": MAX_SIZE, "d_model": 2**20, "n_heads": 2})
    raises(lambda: Transformer(huge), ModelSizeError, "more than this machine's")
    with torch.device("meta"):  # shapes only: any size may be built there
        assert Transformer(get_config("llama3-8b")).config.n_layers == 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ids_on_another_device(model):
    raises(lambda: model(torch.tensor([[1, 2]], device="cuda")), ModelInputError,
           "ids are on cuda:0 but the model is on cpu")


# --- the command line: llmlab generate ------------------------------------------------------------------

PROMPT = "ROMEO:"
FAST = ["--max-new-tokens", "3"]
NO_CUDA = not torch.cuda.is_available()
CLI_ROWS = [
    # (id, argv after `generate`, exit status, fragment of the one error line)
    ("temperature-nan", [PROMPT, "--temperature", "nan"], 2, "--temperature: temperature must be a finite number"),
    ("temperature-inf", [PROMPT, "--temperature", "inf"], 2, "--temperature: temperature must be a finite number"),
    ("temperature-minus-inf", [PROMPT, "--temperature=-inf"], 2, "temperature must be a finite number"),
    ("temperature-negative", [PROMPT, "--temperature=-1"], 2, "temperature must be ≥ 0"),
    ("temperature-word", [PROMPT, "--temperature", "hot"], 2, "argument --temperature: invalid float value: 'hot'"),
    ("top-p-nan", [PROMPT, "--top-p", "nan"], 2, "--top-p: top_p must be in (0, 1]"),
    ("top-k-zero", [PROMPT, "--top-k", "0"], 2, "--top-k: top_k must be an integer ≥ 1"),
    ("max-new-tokens-huge", [PROMPT, "--max-new-tokens", "1000000000"], 2, "must be at most 100,000"),
    ("max-new-tokens-zero", [PROMPT, "--max-new-tokens", "0"], 2, "max_new_tokens must be an integer ≥ 1"),
    ("max-new-tokens-float", [PROMPT, "--max-new-tokens", "1e3"], 2, "invalid int value: '1e3'"),
    ("seed-beyond-64-bits", [PROMPT, "--seed", str(2**64)], 2, "seed must be an integer in 0 .. 2**64 - 1"),
    ("seed-negative", [PROMPT, "--seed=-1"], 2, "seed must be an integer in 0 .. 2**64 - 1"),
    ("device-unknown", [PROMPT, "--device", "foo"], 2, "device 'foo' is not a device torch knows"),
    ("prompt-empty", [""], 2, "the prompt is empty"),
    ("prompt-too-long", ["word " * 2000], 2, "shorten it to at most 256 tokens"),
    ("prompt-special-token", ["ROMEO<|endoftext|>"], 2, "add --allow-special"),
    ("prompt-not-utf8", [b"ROMEO\xff"], 2, "the prompt is not valid UTF-8 text (byte 0xff at character 6)"),
    ("prompt-missing", [], 2, "give a prompt to continue"),
    ("option-unknown", [PROMPT, "--temprature", "0"], 2, "unrecognized arguments: --temprature"),
    ("checkpoint-missing", [PROMPT, "--checkpoint", "/nonexistent/llmlab-ck"], 1, "no checkpoint folder"),
    ("checkpoint-under-a-file", [PROMPT, "--checkpoint", "{file}/ck"], 1, "ck"),
]
if NO_CUDA:
    CLI_ROWS.append(("device-cuda-without-gpu", [PROMPT, "--device", "cuda"], 2, "CUDA is not available here"))
CLI_OK = [
    ("allow-special", ["ROMEO<|endoftext|>", "--allow-special", "--seed", "1"], "ROMEO<|endoftext|>"),
    ("largest-seed", [PROMPT, "--seed", str(2**64 - 1)], PROMPT),
    ("greedy", [PROMPT, "--temperature", "0"], PROMPT),
]


SEPARATE = {"temperature-nan", "prompt-not-utf8", "device-unknown", "allow-special"}
"""Rows run as their own ``python -m llmlab generate …``; the others share one Python process (below)."""

ALL_IN_ONE = r"""
import contextlib, io, json, os, runpy, sys, traceback
results = []
for argv in json.load(sys.stdin):
    sys.argv = ["llmlab"] + [os.fsdecode(bytes.fromhex(arg)) for arg in argv]  # as Python decodes argv
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("llmlab", run_name="__main__", alter_sys=True)  # what `python -m llmlab` runs
            status = 0
        except SystemExit as done:
            status = done.code if isinstance(done.code, int) else int(done.code is not None)
        except BaseException:
            traceback.print_exc()
            status = 1
    results.append([status, out.getvalue(), err.getvalue()])
json.dump(results, sys.stdout)
"""
"""Runs many command lines in one Python process: each is a torch import (1-2 s) saved."""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _run(argv: list) -> tuple[int, str, str]:
    result = subprocess.run([os.fsencode(sys.executable), b"-m", b"llmlab", *map(os.fsencode, argv)],
                            capture_output=True, env=_env(), timeout=120)
    return result.returncode, result.stdout.decode("utf-8", "replace"), result.stderr.decode("utf-8", "replace")


def _run_all_in_one(argvs: list[list]) -> list[tuple[int, str, str]]:
    rows = json.dumps([[os.fsencode(arg).hex() for arg in argv] for argv in argvs])
    result = subprocess.run([sys.executable, "-c", ALL_IN_ONE], input=rows, capture_output=True, text=True,
                            env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    return [tuple(row) for row in json.loads(result.stdout)]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """``(status, stdout, stderr)`` of every CLI row, the separate ones run beside the shared process."""
    file = tmp_path_factory.mktemp("cli") / "a-file"
    file.write_text("not a folder")
    jobs = {name: ["generate", *FAST, *(a.replace("{file}", str(file)) if isinstance(a, str) else a for a in argv)]
            for name, argv, *_ in CLI_ROWS + CLI_OK}
    shared = [name for name in jobs if name not in SEPARATE]
    with ThreadPoolExecutor(max_workers=len(SEPARATE) + 1) as pool:
        in_one = pool.submit(_run_all_in_one, [jobs[name] for name in shared])
        separate = {name: pool.submit(_run, jobs[name]) for name in SEPARATE}
        return {**dict(zip(shared, in_one.result())), **{name: job.result() for name, job in separate.items()}}


@pytest.mark.parametrize(("name", "argv", "status", "fragment"), CLI_ROWS, ids=[row[0] for row in CLI_ROWS])
def test_generate_cli_rejects(cli_results, name, argv, status, fragment):
    returncode, stdout, stderr = cli_results[name]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == status, stderr
    assert len(lines) == 1 and lines[0].startswith("llmlab generate: error:"), stderr
    assert fragment in lines[0], stderr
    assert "Traceback" not in stderr
    assert stdout == "", "a failed validation must print nothing on stdout (not even the prompt)"


@pytest.mark.parametrize(("name", "argv", "start"), CLI_OK, ids=[row[0] for row in CLI_OK])
def test_generate_cli_accepts_the_limits(cli_results, name, argv, start):
    returncode, stdout, stderr = cli_results[name]
    assert returncode == 0, stderr
    assert stdout.startswith(start) and stderr.startswith("llmlab generate: precision ") and stderr.count("\n") == 1


# --- hypothesis: arbitrary values give a clean result or an LlmlabError ----------------------------------

ANYTHING = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([0, 1, -1, 2**31 - 1, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([NAN, INF, -INF, 0.0, -0.0, 1e-320, 1e308]),
    st.text(max_size=8), st.binary(max_size=4),
    st.lists(st.integers(), max_size=3), st.tuples(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
ARBITRARY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _clean_or_llmlab(call):
    """``call()`` either returns or raises an LlmlabError; anything else is a bug and fails the test."""
    try:
        return call(), None
    except LlmlabError as err:
        assert str(err), f"{type(err).__name__} with an empty message"
        return None, err


@ARBITRARY
@given(field=st.sampled_from(["temperature", "top_k", "top_p", "max_new_tokens", "seed", "stop_ids"]), value=ANYTHING)
def test_sampling_params_take_anything(field, value):
    params, err = _clean_or_llmlab(lambda: SamplingParams(**{field: value}))
    if params is not None:
        assert math.isfinite(params.temperature) and params.temperature >= 0
        assert 1 <= params.max_new_tokens <= MAX_NEW_TOKENS
        assert params.seed is None or 0 <= params.seed < 2**64
        assert params.top_p is None or 0 < params.top_p <= 1
        if params.seed is not None:
            make_generator(params.seed)


CONFIG_FIELDS = [f for f in ModelConfig(**TINY).to_dict()]


@ARBITRARY
@given(field=st.sampled_from(CONFIG_FIELDS), value=ANYTHING)
def test_model_config_takes_anything(field, value):
    config, err = _clean_or_llmlab(lambda: ModelConfig(**{**TINY, field: value}))
    if config is not None:
        assert math.isfinite(config.rope_theta) and config.rope_theta > 1
        assert config.n_heads % config.n_kv_heads == 0
        _clean_or_llmlab(lambda: calc.param_counts(config))
        assert ModelConfig.from_json(config.to_json()) == config


@ARBITRARY
@given(text=st.one_of(st.text(max_size=40), st.binary(max_size=20),
                      st.builds(json.dumps, st.recursive(ANYTHING.filter(lambda v: not isinstance(v, bytes)),
                                                         lambda inner: st.lists(inner, max_size=3), max_leaves=5)),
                      st.builds(lambda field, value: _json(**{field: value}), st.sampled_from(CONFIG_FIELDS + ["x"]),
                                st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)))))
def test_config_from_json_takes_anything(text):
    _clean_or_llmlab(lambda: ModelConfig.from_json(text))


CONFIGS = st.one_of(st.sampled_from([GPT2, get_config("llama3-8b"), get_config("qwen3-0.6b"), "course-tiny"]), ANYTHING)
CALLS = {
    "linear_params": (ANYTHING, ANYTHING, ANYTHING),
    "norm_params": (CONFIGS, ANYTHING),
    "attention_params": (CONFIGS,),
    "mlp_params": (CONFIGS, ANYTHING),
    "param_counts": (CONFIGS,),
    "flops_per_token": (CONFIGS, ANYTHING, ANYTHING),
    "training_flops": (CONFIGS, ANYTHING, ANYTHING),
    "dtype_bytes": (ANYTHING,),
    "weight_bytes": (CONFIGS, st.one_of(st.sampled_from(list(calc.DTYPE_BYTES)), ANYTHING)),
    "kv_bytes_per_token": (CONFIGS, st.sampled_from(list(calc.DTYPE_BYTES))),
    "kv_cache_bytes": (CONFIGS, ANYTHING, ANYTHING, st.sampled_from(list(calc.DTYPE_BYTES))),
    "max_concurrent_sequences": (CONFIGS, ANYTHING, ANYTHING, st.just("bf16"), st.just("bf16"), ANYTHING, ANYTHING),
    "forward_bytes": (CONFIGS, ANYTHING, ANYTHING, ANYTHING),
    "decode_step_bytes": (CONFIGS, ANYTHING),
    "forward_flops": (CONFIGS, ANYTHING, ANYTHING, ANYTHING),
    "arithmetic_intensity": (CONFIGS, ANYTHING, ANYTHING, ANYTHING),
    "decode_intensity_limit": (CONFIGS, ANYTHING),
    "roofline": (ANYTHING, ANYTHING, ANYTHING),
    "human_bytes": (ANYTHING, ANYTHING, ANYTHING),
    "human_count": (ANYTHING, ANYTHING),
}


@ARBITRARY
@given(data=st.data(), name=st.sampled_from(sorted(CALLS)))
def test_calc_takes_anything(data, name):
    strategies = CALLS[name]
    n_args = data.draw(st.integers(min_value=1, max_value=len(strategies)), label="n_args")
    args = [data.draw(s, label=f"arg{i}") for i, s in enumerate(strategies[:n_args])]
    result, err = _clean_or_llmlab(lambda: getattr(calc, name)(*args))
    if err is None:
        values = result.values() if isinstance(result, dict) else [result]
        for value in values:
            if not isinstance(value, str):
                assert value == value and value >= 0, f"{name}{tuple(args)} = {result!r}"


@ARBITRARY
@given(name=st.one_of(st.text(max_size=10), st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:7", "mps", "meta", "cpu:0",
                                                              "xla", "CPU", " cpu"]), ANYTHING))
def test_device_takes_anything(name):
    chosen, err = _clean_or_llmlab(lambda: runtime.device(name))
    if chosen is not None:
        assert isinstance(chosen, torch.device)

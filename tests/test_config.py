"""ModelConfig: derived defaults, validation messages, presets, (de)serialization."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmlab.config import PRESETS, ConfigError, ModelConfig, get_config


def tiny(**changes) -> ModelConfig:
    base = dict(name="t", vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=4)
    base.update(changes)
    return ModelConfig(**base)


def test_none_defaults_are_resolved_to_ints():
    cfg = tiny()
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (4, 8, 128)
    for preset in PRESETS.values():
        assert all(isinstance(getattr(preset, f), int) for f in ("n_kv_heads", "head_dim", "d_ff"))


def test_explicit_head_dim_need_not_divide_d_model():
    cfg = get_config("qwen3-0.6b")
    assert cfg.head_dim == 128 and cfg.attention_dim == 2048 != cfg.d_model
    assert cfg.kv_dim == 8 * 128


def test_replace_recomputes_derived_fields_but_keeps_explicit_ones():
    bigger = get_config("gpt2-124m").replace(d_model=1024, n_heads=16)
    assert (bigger.head_dim, bigger.d_ff, bigger.n_kv_heads) == (64, 4096, 16)
    qwen = get_config("qwen3-0.6b").replace(d_model=2048)
    assert qwen.head_dim == 128 and qwen.d_ff == 3072  # were set explicitly: kept


def test_replace_validates_and_rejects_unknown_fields():
    with pytest.raises(ConfigError, match=r"unknown config field 'dmodel'. Did you mean 'd_model'\?"):
        tiny().replace(dmodel=64)
    with pytest.raises(ConfigError, match="n_layers must be a positive integer, got 0"):
        tiny().replace(n_layers=0)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_config("course-tiny").d_model = 3


def test_dict_and_json_round_trip():
    for cfg in PRESETS.values():
        data = json.loads(json.dumps(cfg.to_dict()))
        assert ModelConfig.from_dict(data) == cfg
        assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert "_derived" not in get_config("course-tiny").to_dict()


def test_from_dict_rejects_unknown_keys():
    data = get_config("course-tiny").to_dict() | {"n_head": 4}
    with pytest.raises(ConfigError, match=r"from_dict\(\): unknown config field 'n_head'. Did you mean 'n_heads'"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(d_model=100, n_heads=3),
         r"d_model=100 is not divisible by n_heads=3: pick n_heads that divides d_model \(e.g. 4 or 5\), "
         r"or set head_dim explicitly"),
        (dict(n_heads=8, n_kv_heads=3),
         r"n_heads=8 is not divisible by n_kv_heads=3: .* divisors of n_heads \(1, 2, 4, 8\)"),
        (dict(n_heads=4, n_kv_heads=8), r"n_heads=4 is not divisible by n_kv_heads=8"),
        (dict(norm="batchnorm"), r"norm='batchnorm' is not known: use one of layernorm, rmsnorm"),
        (dict(mlp="swiglue"), r"mlp='swiglue' is not known: .* Did you mean 'swiglu'\?"),
        (dict(positional="alibi"), r"positional='alibi' is not known: use one of learned, sinusoidal, rope, none"),
        (dict(positional="rope", head_dim=7), r"RoPE rotates pairs of numbers, so head_dim must be even; got head_dim=7"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(vocab_size=-5), r"vocab_size must be a positive integer, got -5"),
        (dict(d_model=32.0), r"d_model must be a positive integer, got 32.0"),
        (dict(n_heads=True), r"n_heads must be a positive integer, got True"),
        (dict(d_ff=0), r"d_ff must be a positive integer, got 0"),
        (dict(bias="yes"), r"bias must be True or False"),
        (dict(rope_theta=0), r"rope_theta must be a positive number"),
        (dict(name=""), r"name must be a non-empty string"),
    ],
)
def test_bad_configs_raise_clear_messages(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**changes)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_get_config_unknown_name_lists_presets_and_closest():
    with pytest.raises(ConfigError, match=r"unknown preset 'gpt2-125m'. Did you mean 'gpt2-124m'\?") as err:
        get_config("gpt2-125m")
    for name in PRESETS:
        assert name in str(err.value)


def test_get_config_overrides():
    cfg = get_config("course-tiny", n_layers=2, dropout=0.1)
    assert cfg.n_layers == 2 and cfg.dropout == 0.1
    assert PRESETS["course-tiny"].n_layers == 4  # the preset itself is untouched


@pytest.mark.parametrize(
    "name, expected",
    [
        ("course-tiny", dict(vocab_size=1024, context_length=256, d_model=256, n_layers=4, n_heads=4,
                             mlp="gelu", norm="layernorm", positional="learned", bias=True, tie_embeddings=True)),
        ("course-tiny-llama", dict(d_model=256, n_heads=4, n_kv_heads=2, d_ff=688, norm="rmsnorm",
                                   mlp="swiglu", positional="rope", bias=False, tie_embeddings=True)),
        ("gpt2-1558m", dict(d_model=1600, n_layers=48, n_heads=25, head_dim=64, vocab_size=50257)),
        ("gpt3-175b", dict(d_model=12288, n_layers=96, n_heads=96, context_length=2048, d_ff=49152)),
        ("llama3-8b", dict(n_kv_heads=8, d_ff=14336, vocab_size=128256, rope_theta=500000.0,
                           tie_embeddings=False, context_length=8192)),
        ("llama3-70b", dict(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672)),
        ("qwen3-0.6b", dict(n_layers=28, head_dim=128, qk_norm=True, norm_eps=1e-6, rope_theta=1e6,
                            context_length=40960, vocab_size=151936, tie_embeddings=True)),
        ("qwen-walkthrough", dict(d_model=4096, n_heads=32, head_dim=128, d_ff=11008, n_layers=24,
                                  n_kv_heads=32, tie_embeddings=False)),
    ],
)
def test_presets(name, expected):
    cfg = get_config(name)
    assert cfg.name == name
    assert {k: getattr(cfg, k) for k in expected} == expected

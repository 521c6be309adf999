"""llmlab ⇄ Hugging Face GPT-2: same logits both ways, save_pretrained round trip, greedy tokens, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab import Transformer, get_config
from llmlab.errors import LlmlabError
from llmlab.generate import generate_many
from llmlab.hf import (
    HFConversionError,
    check_gpt2_expressible,
    from_hf_gpt2,
    gpt2_config_to_hf,
    hf_gpt2_to_config,
    load_hf_gpt2,
    to_hf_gpt2,
)
from llmlab.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

TOL = 1e-4

CONFIGS = {
    "course-tiny": get_config("course-tiny"),
    # GPT-2's real vocabulary (50,257 ids, <|endoftext|> = 50256) and shape family, made small.
    "gpt2-small-shaped": get_config("gpt2-124m", d_model=64, n_layers=2, n_heads=4, context_length=128),
    "untied-relu": get_config("course-tiny", d_model=64, n_layers=2, n_heads=2, mlp="relu", tie_embeddings=False,
                              d_ff=96, norm_eps=1e-6),
}


def random_model(config, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # LayerNorm weights/biases and linear biases start at 1/0: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_ids(config, batch: int = 2, length: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, min(length, config.context_length)), generator=g)


def hf_logits(hf, ids, attention_mask=None) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=attention_mask).logits


def ours_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_llmlab_to_hf_same_logits(name, attn):
    config = CONFIGS[name]
    model = random_model(config)
    hf = to_hf_gpt2(model, attn_implementation=attn)
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    assert hf.config._attn_implementation == attn and not hf.training
    assert next(hf.parameters()).dtype == torch.float32
    ids = random_ids(config)
    assert torch.allclose(hf_logits(hf, ids), ours_logits(model, ids), atol=TOL, rtol=0)
    # the copy shares no memory with the source
    assert hf.transformer.wte.weight.data_ptr() != model.token_embedding.weight.data_ptr()
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == config.tie_embeddings


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_to_llmlab_same_logits(name):
    config = CONFIGS[name]
    hf_config = gpt2_config_to_hf(config)
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias") or ".ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    ours = from_hf_gpt2(hf, name=config.name)
    assert ours.config == config
    assert not ours.training
    # a copy: no weight of ours shares memory with the Hugging Face model (nor a split c_attn's other parts)
    theirs = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    assert not theirs & {p.untyped_storage().data_ptr() for p in ours.parameters()}
    q = ours.blocks[0].attn.q_proj.bias
    assert q.untyped_storage().nbytes() == q.numel() * q.element_size()
    assert ours.num_parameters() == hf.num_parameters()
    assert (ours.lm_head.weight is ours.token_embedding.weight) == config.tie_embeddings
    ids = random_ids(config, seed=4)
    assert torch.allclose(ours_logits(ours, ids), hf_logits(hf, ids), atol=TOL, rtol=0)


def test_round_trip_keeps_every_weight():
    model = random_model(CONFIGS["untied-relu"])
    back = from_hf_gpt2(to_hf_gpt2(model), name=model.config.name)
    assert back.config == model.config
    theirs = back.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(theirs[key], value), key


def test_gpt2_original_activation_gelu_new_matches():
    """Checkpoints from the hub say "gelu_new" (GPT-2's tanh GELU written in Python): the same function."""
    config = CONFIGS["course-tiny"]
    hf_config = gpt2_config_to_hf(config)
    hf_config.activation_function = "gelu_new"
    torch.manual_seed(5)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = from_hf_gpt2(hf)
    assert ours.config.mlp == "gelu"
    ids = random_ids(config)
    assert torch.allclose(ours_logits(ours, ids), hf_logits(hf, ids), atol=TOL, rtol=0)


def test_activation_written_is_llmlabs_gelu():
    assert gpt2_config_to_hf(get_config("course-tiny")).activation_function == "gelu_pytorch_tanh"
    assert gpt2_config_to_hf(CONFIGS["untied-relu"]).activation_function == "relu"
    hf_config = gpt2_config_to_hf(get_config("gpt2-124m"))
    assert (hf_config.n_embd, hf_config.n_layer, hf_config.n_head, hf_config.n_positions, hf_config.vocab_size) == \
        (768, 12, 12, 1024, 50257)
    assert hf_config.eos_token_id == 50256
    assert hf_gpt2_to_config(hf_config, name="gpt2-124m") == get_config("gpt2-124m")


def test_left_padded_batch_matches(tmp_path):
    """Padding and attention_mask: llmlab's left-padded forward equals HF's with the same mask."""
    config = CONFIGS["course-tiny"]
    model = random_model(config)
    hf = to_hf_gpt2(model)
    ids = random_ids(config, batch=3, length=24)
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, positions=positions, attention_mask=mask).logits
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=TOL, rtol=0)


def test_save_pretrained_then_load_hf_gpt2(tmp_path):
    config = CONFIGS["gpt2-small-shaped"]
    model = random_model(config)
    to_hf_gpt2(model).save_pretrained(tmp_path / "gpt2-small")
    loaded = load_hf_gpt2(tmp_path / "gpt2-small")
    assert loaded.config == config.replace(name="gpt2-small")
    assert loaded.token_embedding.weight.device.type == "cpu"
    assert loaded.lm_head.weight is loaded.token_embedding.weight
    ids = random_ids(config)
    assert torch.allclose(ours_logits(loaded, ids), ours_logits(model, ids), atol=0, rtol=0)
    # the folder also loads in transformers itself, to the same logits
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2-small").eval()
    assert torch.allclose(hf_logits(hf, ids), ours_logits(loaded, ids), atol=TOL, rtol=0)


def test_load_untied_and_dtype(tmp_path):
    model = random_model(CONFIGS["untied-relu"])
    to_hf_gpt2(model).save_pretrained(tmp_path)
    loaded = load_hf_gpt2(tmp_path, dtype=torch.bfloat16, name="mine")
    assert loaded.config.name == "mine" and not loaded.config.tie_embeddings
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight.float(), model.lm_head.weight.detach().bfloat16().float())


def test_load_hub_layout_without_prefix(tmp_path):
    """The hub's original gpt2 files name weights without "transformer." and store attn.bias buffers."""
    from safetensors.torch import save_file

    config = CONFIGS["course-tiny"]
    model = random_model(config)
    hf = to_hf_gpt2(model)
    hf.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = load_hf_gpt2(tmp_path)
    ids = random_ids(config)
    assert torch.allclose(ours_logits(loaded, ids), ours_logits(model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["course-tiny", "gpt2-small-shaped"])
def test_greedy_generation_equal(name):
    config = CONFIGS[name]
    model = random_model(config)
    hf = to_hf_gpt2(model)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (9, 5, 12)]
    n_new = 8
    ours = generate_many(model, prompts, SamplingParams(temperature=0, max_new_tokens=n_new))
    # the same left-padded batch through transformers' generate
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p)
        mask[row, longest - len(p):] = 1
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                      min_new_tokens=n_new, pad_token_id=0)
    assert out[:, longest:].tolist() == ours
    # and one prompt alone, without padding
    alone = hf.generate(input_ids=torch.tensor([prompts[1]]), do_sample=False, max_new_tokens=n_new,
                        min_new_tokens=n_new, pad_token_id=0)
    assert alone[0, len(prompts[1]):].tolist() == ours[1]


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, words", [
    (dict(positional="rope"), "positional='rope'"),
    (dict(mlp="swiglu", d_ff=688), "mlp='swiglu'"),
    (dict(norm="rmsnorm"), "norm='rmsnorm'"),
    (dict(n_kv_heads=2), "n_kv_heads=2"),
    (dict(bias=False), "bias=False"),
    (dict(qk_norm=True), "qk_norm=True"),
    (dict(head_dim=32), "head_dim=32"),
    (dict(positional="sinusoidal"), "positional='sinusoidal'"),
])
def test_refuses_what_gpt2_cannot_express(overrides, words):
    config = get_config("course-tiny", d_model=64, n_layers=1, n_heads=4, **overrides)
    for call in (lambda: check_gpt2_expressible(config), lambda: gpt2_config_to_hf(config)):
        with pytest.raises(HFConversionError, match="cannot be written as a Hugging Face GPT-2") as info:
            call()
        assert words in str(info.value)
    model = Transformer(config)
    with pytest.raises(HFConversionError):
        to_hf_gpt2(model)


def test_error_type():
    assert issubclass(HFConversionError, LlmlabError) and issubclass(HFConversionError, ValueError)


def test_refuses_the_llama_preset_with_every_reason():
    with pytest.raises(HFConversionError) as info:
        gpt2_config_to_hf(get_config("course-tiny-llama"))
    for words in ("rope", "swiglu", "rmsnorm", "n_kv_heads=2", "bias=False"):
        assert words in str(info.value)


@pytest.mark.parametrize("change, words", [
    (dict(activation_function="gelu"), "exact erf GELU"),
    (dict(activation_function="silu"), "'silu'"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(add_cross_attention=True), "cross-attention"),
    (dict(scale_attn_weights=False), "scale_attn_weights=False"),
])
def test_refuses_gpt2_variants_llmlab_does_not_compute(change, words):
    hf_config = gpt2_config_to_hf(CONFIGS["course-tiny"])
    for key, value in change.items():
        setattr(hf_config, key, value)
    with pytest.raises(HFConversionError, match=words):
        hf_gpt2_to_config(hf_config)


def test_refuses_other_architectures(tmp_path):
    llama = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4)
    with pytest.raises(HFConversionError, match="model_type 'llama'"):
        hf_gpt2_to_config(llama)
    llama.save_pretrained(tmp_path)
    with pytest.raises(HFConversionError, match="not 'gpt2'"):
        load_hf_gpt2(tmp_path)
    with pytest.raises(HFConversionError, match="GPT2LMHeadModel"):
        from_hf_gpt2(torch.nn.Linear(2, 2))
    with pytest.raises(HFConversionError, match="llmlab Transformer"):
        to_hf_gpt2(torch.nn.Linear(2, 2))


def test_bad_folders(tmp_path):
    with pytest.raises(HFConversionError, match="not a folder"):
        load_hf_gpt2(tmp_path / "missing")
    with pytest.raises(HFConversionError, match="no config.json"):
        load_hf_gpt2(tmp_path)
    config = get_config("course-tiny", d_model=32, n_layers=1, n_heads=2, context_length=16, vocab_size=64)
    hf = to_hf_gpt2(random_model(config))
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(HFConversionError, match="no model.safetensors"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(HFConversionError, match="cannot read"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HFConversionError, match="not valid JSON"):
        load_hf_gpt2(tmp_path)


def test_config_that_does_not_match_the_weights(tmp_path):
    config = get_config("course-tiny", d_model=32, n_layers=2, n_heads=2, context_length=16, vocab_size=64)
    to_hf_gpt2(random_model(config)).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(HFConversionError, match="lack 'transformer.h.2"):
        load_hf_gpt2(tmp_path)
    data["n_layer"], data["n_embd"] = 1, 48
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(HFConversionError, match="has shape"):
        load_hf_gpt2(tmp_path)
    data["n_embd"] = 32
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(HFConversionError, match="unexpected weights"):
        load_hf_gpt2(tmp_path)


@pytest.mark.slow
def test_gpt2_124m_from_transformers():
    """The real GPT-2 124M shape (random weights, as transformers initializes them): 124,439,808 parameters."""
    hf_config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = from_hf_gpt2(hf, name="gpt2-124m")
    assert ours.config == get_config("gpt2-124m")
    assert ours.num_parameters() == 124_439_808
    ids = random_ids(ours.config, batch=1, length=16)
    assert torch.allclose(ours_logits(ours, ids), hf_logits(hf, ids), atol=TOL, rtol=0)

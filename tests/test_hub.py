"""Real pretrained checkpoints (notebook 14): Hugging Face folders load into llmlab and compute what
``transformers`` computes — logits, tokenizer ids, chat templates — for GPT-2, Llama, Qwen2 and Qwen3;
the engine and tensor parallelism run them; every bad folder is a clear error.

Every checkpoint here is written by ``transformers`` itself, small and with random weights, and
every tokenizer is trained on the spot: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab.errors import LlmlabError
from llmlab.generate import generate_many
from llmlab.hf import HFConversionError
from llmlab.hub import (ChatTemplateError, HFTokenizer, HubError, HubOfflineError, SafetensorsFolder,
                        check_folder, greedy_on_ranks, load_chat_template, load_model, load_pretrained, load_tokenizer, read_config,
                        resolve_dtype)
from llmlab.layers.positional import rope_inverse_frequencies
from llmlab.sampling import SamplingParams
from llmlab.tokenizer import GPT2_PATTERN

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(x, y):\n    return x + y  # sum\n\n\tprint(add(1, 22))",
    "안녕하세요, 세계! 한국어 텍스트입니다.",
    "Emoji: 🎉🚀 👩‍💻 and ZWJ 🧑‍🤝‍🧑.",
    "  leading spaces, trailing\n\n\n",
]
CORPUS = SAMPLES * 20 + ["The capital of France is Paris. Numbers 12345 and 3.14159."] * 20

LLAMA3_STYLE = {
    "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
    "template": (
        "{{- bos_token }}\n"
        "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
        "{%- set date_string = strftime_now(\"%d %b %Y\") %}{%- else %}{%- set date_string = \"26 Jul 2024\" %}"
        "{%- endif %}{%- endif %}\n"
        "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
        "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = \"\" %}{%- endif %}\n"
        "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
        "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
        "{{- system_message }}\n{{- \"<|eot_id|>\" }}\n"
        "{%- for message in messages %}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}\n"
        "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n"
    ),
}
QWEN_STYLE = {
    "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
    "template": (
        "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}"
        "{{- '<|im_end|>\\n' }}{%- else %}\n"
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
        "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\\n' }}{%- endif %}{%- endif %}\n"
        "{%- for message in messages %}\n"
        "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) "
        "or (message.role == \"assistant\") %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
    ),
}
STYLES = {"llama3": LLAMA3_STYLE, "qwen": QWEN_STYLE}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there! 안녕?"}],
    [{"role": "system", "content": "  Answer briefly.  "}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 🎉 × 3?"}],
]


# --- writing checkpoints the way transformers does ------------------------------------------------


def write_tokenizer(folder: Path, style: str, vocab_size: int = 400) -> int:
    """Train a tiny byte-level BPE in ``style``'s image (Llama 3 or Qwen), save it as transformers does; its size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    spec = STYLES[style]
    qwen_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
    llama_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                   r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    if style == "qwen":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen_split if style == "qwen" else llama_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if spec["bos_token"]:
        bos = spec["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tok.token_to_id(bos))])
    named = {key: spec[key] for key in ("bos_token", "eos_token", "pad_token") if spec.get(key)}
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.chat_template = spec["template"]
    fast.save_pretrained(folder)
    if style == "qwen":  # as Qwen's own files say: transformers then builds its Qwen2Tokenizer
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "Qwen2Tokenizer"}))
    return tok.get_vocab_size()


HF = {  # model_type: (config class, model class, what the family adds)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
}
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256)


def random_hf_model(family: str, seed: int = 0, **overrides):
    """A small transformers model of ``family`` with random weights (biases and norm gains random too)."""
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(**{"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128,
                                            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **overrides})
        model = transformers.GPT2LMHeadModel(config)
    else:
        config_class, model_class, extra = HF[family]
        config = getattr(transformers, config_class)(**{**SMALL, "vocab_size": 416, **extra, **overrides})
        model = getattr(transformers, model_class)(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:  # 0 biases and 1 gains would hide a bias or a norm left out
                parameter.add_(0.2 * torch.randn_like(parameter))
            elif any(part in name for part in ("q_proj", "k_proj", "c_attn")):
                parameter.mul_(8)  # sharp attention: positions (RoPE and its scaling) change the logits visibly
    return model.eval()


def write_checkpoint(folder: Path, family: str, style: str | None = None, *, shards: bool = False,
                     dtype: torch.dtype | None = None, seed: int = 0, **overrides):
    """``save_pretrained`` a random ``family`` model (sharded into 100 KB files with ``shards``) and a tokenizer."""
    model = random_hf_model(family, seed, **overrides)
    saved = model if dtype is None else model.to(dtype)
    saved.save_pretrained(folder, max_shard_size="100KB" if shards else "5GB")
    if style is not None:
        write_tokenizer(folder, style)
    if family != "gpt2":  # an instruct model's generation_config names its end-of-turn token
        eos = json.loads((folder / "tokenizer.json").read_text())["added_tokens"] if style else []
        ids = [t["id"] for t in eos if t["content"] in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>")]
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return model.float()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """One folder per case: (folder, the transformers model that wrote it)."""
    root = tmp_path_factory.mktemp("hub")
    cases = {
        "gpt2": dict(family="gpt2"),
        "gpt2-untied": dict(family="gpt2", tie_word_embeddings=False, activation_function="gelu_pytorch_tanh"),
        "llama3.1": dict(family="llama", style="llama3", shards=True, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "llama3.2-tied": dict(family="llama", style="llama3", tie_word_embeddings=True,
                              rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "qwen2.5": dict(family="qwen2", style="qwen", shards=True),
        "qwen3": dict(family="qwen3", style="qwen", tie_word_embeddings=True),
    }
    return {name: (root / name, write_checkpoint(root / name, **spec)) for name, spec in cases.items()}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def random_ids(vocab_size: int, batch: int = 2, length: int = 100, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the same function as transformers ---------------------------------------------------------


@pytest.mark.parametrize("case", ["gpt2", "gpt2-untied", "llama3.1", "llama3.2-tied", "qwen2.5", "qwen3"])
def test_logits_equal_transformers(checkpoints, case):
    folder, hf = checkpoints[case]
    ours = load_model(folder)
    assert isinstance(ours, torch.nn.Module) and not ours.training and ours.config.name == case
    assert ours.num_parameters() == hf.num_parameters()
    tied = hf.config.tie_word_embeddings
    assert ours.config.tie_embeddings == tied and (ours.lm_head.weight is ours.token_embedding.weight) == tied
    ids = random_ids(ours.config.vocab_size, length=min(100, ours.config.context_length))
    assert torch.allclose(logits(ours, ids), logits(hf, ids), atol=TOL, rtol=0)


def test_each_family_uses_its_own_parts(checkpoints):
    """The configs say what each family adds, and the weights land in it (a failing mapping would zero them)."""
    llama, qwen2, qwen3 = (load_model(checkpoints[name][0]) for name in ("llama3.1", "qwen2.5", "qwen3"))
    assert llama.config.rope_scaling["rope_type"] == "llama3" and llama.config.rope_theta == 500000.0
    assert not llama.config.bias and llama.blocks[0].attn.q_proj.bias is None
    assert qwen2.config.qkv_bias and not qwen2.config.bias
    assert qwen2.blocks[0].attn.k_proj.bias is not None and qwen2.blocks[0].attn.o_proj.bias is None
    hf_qwen2 = checkpoints["qwen2.5"][1]
    assert torch.equal(qwen2.blocks[1].attn.v_proj.bias, hf_qwen2.model.layers[1].self_attn.v_proj.bias)
    assert qwen3.config.qk_norm and qwen3.config.head_dim == 32 != qwen3.config.d_model // qwen3.config.n_heads
    assert qwen3.blocks[0].attn.q_norm is not None
    # RoPE scaling changes the logits here: without it the model computes something else
    ids = random_ids(llama.config.vocab_size)
    plain = read_config(checkpoints["llama3.1"][0]).replace(rope_scaling=None)
    unscaled = type(llama)(plain).eval()
    unscaled.load_state_dict(llama.state_dict())
    assert (logits(unscaled, ids) - logits(llama, ids)).abs().max() > 100 * TOL


def test_llama3_rope_scaling_is_transformers_formula():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                      rope_scaling=scaling, max_position_embeddings=131072)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_inverse_frequencies(128, 500000.0, scaling)
    assert torch.equal(ours, theirs)
    unscaled = rope_inverse_frequencies(128, 500000.0)
    assert ours[0] == unscaled[0] and torch.allclose(ours[-1], unscaled[-1] / 8)  # fast pairs kept, slow ones / 8
    assert torch.allclose(rope_inverse_frequencies(64, 1e4, {"rope_type": "linear", "factor": 4.0}),
                          rope_inverse_frequencies(64, 1e4) / 4)


LLAMA31 = {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
           "original_max_position_embeddings": 8192}


def test_config_fields_for_real_checkpoints():
    from llmlab.config import ConfigError, ModelConfig, get_config

    config = get_config("llama3-8b", rope_scaling=LLAMA31)
    assert config.rope_scaling == {**LLAMA31, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert ModelConfig.from_json(config.to_json()) == config
    for bad, words in [
        ({"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn' is not known: use one of linear, llama3"),
        ({"rope_type": "linear"}, "takes exactly the keys factor, rope_type"),
        ({**LLAMA31, "factor": -1}, "rope_scaling['factor'] must be a positive number"),
        ({**LLAMA31, "original_max_position_embeddings": 8.5}, "must be a positive integer"),
        ({**LLAMA31, "high_freq_factor": 1.0}, "must be larger than its low_freq_factor"),
        ("llama3", "rope_scaling must be None or a dict"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            get_config("llama3-8b", rope_scaling=bad)
    with pytest.raises(ConfigError, match="rope_scaling stretches RoPE, but positional='learned'"):
        get_config("course-tiny", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError, match="qkv_bias must be True or False"):
        get_config("course-tiny-llama", qkv_bias="yes")


def test_qkv_bias_puts_biases_on_queries_keys_and_values_only():
    from llmlab import Transformer, get_config

    model = Transformer(get_config("course-tiny-llama", n_layers=1, qkv_bias=True))
    biases = sorted(name for name, _ in model.named_parameters() if name.endswith("bias"))
    assert biases == ["blocks.0.attn.k_proj.bias", "blocks.0.attn.q_proj.bias", "blocks.0.attn.v_proj.bias"]
    assert model.config.bias is False


def test_calc_counts_qwen2_qkv_biases(checkpoints):
    from llmlab import calc

    folder, hf = checkpoints["qwen2.5"]
    assert calc.param_counts(read_config(folder))["total"] == hf.num_parameters()


def test_transformers_4_config_format(checkpoints, tmp_path):
    """Hub files written by transformers 4 spell RoPE as rope_theta + rope_scaling ("type" in older ones)."""
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(checkpoints["llama3.1"][0], folder)
    data = json.loads((folder / "config.json").read_text())
    params = data.pop("rope_parameters")
    data["rope_theta"] = params.pop("rope_theta")
    data["rope_scaling"] = {("type" if key == "rope_type" else key): value for key, value in params.items()}
    (folder / "config.json").write_text(json.dumps(data))
    assert read_config(folder).replace(name="x") == read_config(checkpoints["llama3.1"][0]).replace(name="x")
    ids = random_ids(416)
    assert torch.allclose(logits(load_model(folder), ids), logits(checkpoints["llama3.1"][1], ids), atol=TOL, rtol=0)


def test_sharded_checkpoint_reads_every_shard(checkpoints):
    folder = checkpoints["qwen2.5"][0]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    with SafetensorsFolder(folder) as source:
        assert set(source.names()) == set(index["weight_map"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_as_stored_or_as_asked(checkpoints, tmp_path, dtype):
    folder, hf = checkpoints["qwen3"]
    asked = load_model(folder, dtype={torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])
    assert {p.dtype for p in asked.parameters()} == {dtype}
    theirs = hf.model.layers[0].mlp.up_proj.weight.detach().to(dtype)
    assert torch.equal(asked.blocks[0].mlp.up_proj.weight, theirs)
    write_checkpoint(tmp_path / "stored", "qwen3", dtype=dtype, tie_word_embeddings=True)  # the same weights, in dtype
    stored = load_model(tmp_path / "stored")
    assert {p.dtype for p in stored.parameters()} == {dtype}
    assert all(torch.equal(a, b) for a, b in zip(stored.state_dict().values(), asked.state_dict().values()))
    ids = random_ids(416, length=20)
    with torch.no_grad():  # computes in dtype, close to fp32
        out = stored(ids).logits
    assert out.dtype == dtype and torch.allclose(out.float(), logits(hf, ids), atol=0.25)
    upcast = load_model(tmp_path / "stored", dtype="fp32")
    assert upcast.lm_head.weight.dtype == torch.float32


MEASURE_LOAD = """
import sys, threading, time
from pathlib import Path

import torch

from llmlab import Transformer, get_config
from llmlab.hub import check_dtype_runs, load_model

with torch.device("meta"):  # one-time costs (PyTorch's meta kernels, ~75 MB of Python) before measuring
    Transformer(get_config("course-tiny-llama"))
check_dtype_runs(torch.float32, "cpu")


def anonymous():  # process memory that is not a mapped file
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


before, done = anonymous(), threading.Event()
peak = [before]


def watch():
    while not done.is_set():
        peak.append(anonymous())
        time.sleep(0.0005)


watcher = threading.Thread(target=watch)
watcher.start()
model = load_model(sys.argv[1])
done.set()
watcher.join()
print(max(peak) - before, anonymous() - before, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def test_loading_holds_the_weights_once(tmp_path):
    """Loading grows memory by the weights' size, never twice it: each tensor is read from the mapped file and
    placed into the model on its own (measured in a fresh process, Linux)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("reads /proc/self/status")
    model = random_hf_model("llama", vocab_size=4000, hidden_size=256, intermediate_size=1024,
                            num_hidden_layers=8, tie_word_embeddings=False)  # no one tensor dominates
    model.save_pretrained(tmp_path)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", MEASURE_LOAD, str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    peak, kept, loaded = map(int, result.stdout.split())
    assert loaded == size
    assert 0.8 * size < kept, "the weights are not in the process's own memory (still views of the mapped file?)"
    assert peak < 1.4 * size, f"loading {size / 2**20:.0f} MiB of weights took {peak / 2**20:.0f} MiB at its peak"


# --- tokenizers and chat templates --------------------------------------------------------------


@pytest.mark.parametrize("case", ["llama3.1", "qwen2.5"])
def test_tokenizer_ids_equal_transformers(checkpoints, case):
    folder = checkpoints[case][0]
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder, read_config(folder))
    assert isinstance(ours, HFTokenizer)
    specials = STYLES["llama3" if case.startswith("llama") else "qwen"]["specials"]
    for text in [*SAMPLES, f"{specials[-1]} after a special token", ""]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        plain = ours.encode(text, add_special_tokens=False)
        assert plain == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(plain) == theirs.decode(plain)
        # each token's raw bytes, joined, are the text: streaming never splits a character wrongly
        if specials[-1] not in text:
            assert b"".join(ours.decode_bytes([i]) for i in plain) == text.encode("utf-8")
    assert ours.encode(specials[-1], allowed_special=frozenset(), add_special_tokens=False) != \
        [ours.special_tokens[specials[-1]]]  # read as text when asked
    assert ours.eot_id == ours.special_tokens[STYLES["llama3" if case.startswith("llama") else "qwen"]["eos_token"]]


def write_sentencepiece_style_tokenizer(folder: Path) -> None:
    """A Llama 2 style tokenizer.json: ▁ for spaces, <0xNN> byte tokens for what the vocabulary lacks."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                            show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(folder)


def test_sentencepiece_style_tokenizer(tmp_path):
    """Llama 2's kind of vocabulary: the ids of its tokenizer.json, and raw bytes from <0xNN> tokens when streaming.

    (transformers 5 rebuilds a tokenizer whose config says LlamaTokenizer with its own Metaspace step, which
    can differ on leading spaces; the file's own pipeline, used here, is what transformers 4 ran.)
    """
    write_sentencepiece_style_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    unseen = "New words, 새 문장 🦄\nand more"
    for text in [*SAMPLES, unseen]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    ids = ours.encode(unseen, add_special_tokens=False)
    assert any(ours.tokenizer.id_to_token(i).startswith("<0x") for i in ids)  # the emoji falls back to bytes
    streamed = b"".join(ours.decode_bytes([i]) for i in ids)
    assert streamed == b" " + unseen.encode("utf-8")  # the ▁ the tokenizer put in front is a space, as mid-text
    assert ours.decode(ids) == unseen == theirs.decode(ids)


def test_gpt2_tokenizer_is_tiktoken_with_transformers_ids(checkpoints, tmp_path):
    """A GPT-2 checkpoint's vocabulary goes through tiktoken (notebook 01); its ids are transformers' ids."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llmlab.tokenizer import BPETokenizer, _tiktoken_cache_file

    cache = _tiktoken_cache_file()
    if cache is None or not cache.is_file():
        pytest.skip("GPT-2's vocabulary is not in tiktoken's cache (no shared/data)")
    folder = checkpoints["gpt2"][0]
    ours = load_tokenizer(folder, read_config(folder), "gpt2")
    assert isinstance(ours, BPETokenizer) and ours.eot_id == 50256
    converted = TikTokenConverter(vocab_file=str(cache), pattern=GPT2_PATTERN,
                                  extra_special_tokens={"<|endoftext|>": 50256}).converted()
    transformers.PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|endoftext|>").save_pretrained(
        tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert ours.encode(text) == theirs(text)["input_ids"], text


@pytest.mark.parametrize("style", ["llama3", "qwen"])
def test_chat_template_renders_as_transformers(checkpoints, style):
    folder = checkpoints["llama3.1" if style == "llama3" else "qwen2.5"][0]
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    template = load_chat_template(folder)
    pre_ids = load_tokenizer(folder)
    for messages in CONVERSATIONS:
        text = template.render(messages, add_generation_prompt=True)
        assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("assistant<|end_header_id|>\n\n" if style == "llama3" else "<|im_start|>assistant\n")
        ids = pre_ids.encode(text, add_special_tokens=False)
        expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        assert ids == (expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert template.render(messages, add_generation_prompt=False) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False)


def test_chat_template_in_tokenizer_config_and_its_errors(checkpoints, tmp_path):
    import shutil

    folder = tmp_path / "in-config"
    shutil.copytree(checkpoints["llama3.1"][0], folder)
    source = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": source}))
    assert load_chat_template(folder).source == source  # where transformers 4 keeps it
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        load_chat_template(folder).render([{"role": "assistant", "content": "first?"}])
    with pytest.raises(ChatTemplateError, match="'role' and a 'content'"):
        load_chat_template(folder).render([{"role": "user"}])
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{% for %}"}))
    with pytest.raises(ChatTemplateError, match="does not compile"):
        load_chat_template(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(folder) is None
    pre = load_pretrained(folder)
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        pre.chat_ids([{"role": "user", "content": "hi"}])


def test_pretrained_bundle(checkpoints):
    pre = load_pretrained(checkpoints["qwen2.5"][0], dtype="fp32")
    eos = pre.tokenizer.special_tokens["<|im_end|>"]
    assert eos in pre.stop_ids and all(0 <= i < pre.config.vocab_size for i in pre.stop_ids)
    ids = pre.chat_ids(CONVERSATIONS[0])
    assert pre.tokenizer.decode(ids).startswith("<|im_start|>system\nYou are Qwen")


# --- everywhere the course model runs --------------------------------------------------------


PROMPTS = [[5, 17, 99, 3, 250], [40, 41, 42], [300, 12, 7, 7, 7, 1, 2, 9]]
N_NEW = 10


def test_generator_engine_and_tensor_parallel_agree(checkpoints):
    """Greedy tokens from the generator, the serving engine and tp=2 ranks; in float64, so no rounding flips one."""
    from llmlab.engine import LLM
    from llmlab.parallel import run_parallel

    folder = checkpoints["qwen2.5"][0]
    model = load_model(folder, dtype="fp64")
    params = SamplingParams(temperature=0, max_new_tokens=N_NEW)
    alone = generate_many(model, PROMPTS, params)
    assert all(len(tokens) == N_NEW for tokens in alone)
    llm = LLM(model=model)
    try:
        served = [c.token_ids for c in llm.generate(PROMPTS, params, progress=False)]
    finally:
        llm.engine.close()
    assert served == alone
    ranks = run_parallel(greedy_on_ranks, 2, str(folder), PROMPTS, N_NEW, "fp64", timeout_s=120)
    assert ranks == [alone, alone]
    # and float64 greedy is what transformers picks (fp32 there: no near ties over these steps)
    hf = checkpoints["qwen2.5"][1]
    theirs = hf.generate(input_ids=torch.tensor([PROMPTS[2]]), do_sample=False, max_new_tokens=N_NEW,
                         min_new_tokens=N_NEW, pad_token_id=0)
    assert theirs[0, len(PROMPTS[2]):].tolist() == alone[2]


def test_calc_sizes_the_real_config(checkpoints):
    from llmlab import calc

    for case in ("llama3.1", "llama3.2-tied", "qwen3", "gpt2"):
        folder, hf = checkpoints[case]
        config, found, stored = check_folder(folder)
        assert found == folder and stored == torch.float32
        assert calc.param_counts(config)["total"] == hf.num_parameters(), case
    config = read_config(checkpoints["llama3.1"][0])
    assert calc.kv_bytes_per_token(config, "bf16") == 2 * 2 * 2 * 16 * 2


# --- hub ids, offline ------------------------------------------------------------------------------


def test_hub_id_offline_says_which_files_to_get(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache: the error names the files, where to put them, and --model PATH."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")}, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "llmlab", "generate", "--model", "Qwen/Qwen2.5-0.5B-Instruct",
                             "Hello"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    message = result.stderr
    assert message.startswith("llmlab generate: error: cannot download Qwen/Qwen2.5-0.5B-Instruct: HF_HUB_OFFLINE=1 "
                              "is set, and the Hugging Face cache (" + str(tmp_path / "hf"))
    for words in ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                  "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct", "--model PATH takes a local folder",
                  "hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir models/Qwen2.5-0.5B-Instruct"):
        assert words in message, words
    assert message.count("\n") == 1  # one line, no traceback


def test_hub_id_without_a_connection(monkeypatch, tmp_path):
    """No network (here: nothing listens at the hub's address) is the same clear error, not a traceback."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(HubOfflineError, match="cannot download meta-llama/Llama-3.2-1B: the Hugging Face hub cannot "
                                              "be reached.*--model PATH takes a local folder") as caught:
        load_pretrained("meta-llama/Llama-3.2-1B")
    assert isinstance(caught.value, LlmlabError)


def test_a_missing_folder_that_looks_like_a_path_is_not_downloaded(tmp_path):
    for path in (tmp_path / "nowhere", "./models/nowhere", "~/nowhere/x", "a/b/c"):
        with pytest.raises(HubError, match="is not a folder: give the folder save_pretrained"):
            load_model(path)


# --- bad input --------------------------------------------------------------------------------------


def copy_of(checkpoints, case: str, tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / case
    shutil.copytree(checkpoints[case][0], folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    data = json.loads((folder / "config.json").read_text())
    data.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in data.items() if v is not ...}))


def test_errors_are_llmlab_errors():
    assert issubclass(HubError, HFConversionError) and issubclass(HubError, LlmlabError)
    assert issubclass(HubOfflineError, HubError) and issubclass(ChatTemplateError, HubError)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(HubError, match="has no config.json: it is not a Hugging Face model folder"):
        load_model(tmp_path)
    with pytest.raises(HubError, match="is not a folder"):
        load_model(tmp_path / "no" / "such" / "folder")
    with pytest.raises(HubError, match="is a file, not a folder"):
        load_model(tmp_path / "model.safetensors")


def test_an_llmlab_checkpoint_is_not_a_hf_one():
    from llmlab.checkpoint import builtin_checkpoint

    with pytest.raises(HubError, match="is an llmlab checkpoint.*--checkpoint"):
        load_model(builtin_checkpoint())


@pytest.mark.parametrize("changes, words", [
    (dict(model_type="mistral"), "model_type 'mistral' is not an architecture llmlab loads: it loads 'gpt2'"),
    (dict(model_type="qwen3_moe"), "'llama' (Llama 2/3/3.1/3.2); 'qwen2' (Qwen2/Qwen2.5); 'qwen3' (Qwen3)"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(use_sliding_window=True), "sliding-window attention"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "RoPE type 'yarn'"),
    (dict(quantization_config={"quant_method": "awq"}), "quantized (awq)"),
    (dict(attention_bias=True), "attention_bias=True with mlp_bias=False"),
    (dict(hidden_size=...), "the config lacks 'hidden_size'"),
    (dict(num_attention_heads=3), "does not make a valid llmlab config"),
])
def test_unsupported_configs(checkpoints, tmp_path, changes, words):
    folder = copy_of(checkpoints, "qwen2.5", tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(HFConversionError) as caught:
        load_model(folder)
    assert words in str(caught.value)


def test_missing_and_misshaped_tensors(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of(checkpoints, "llama3.2-tied", tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFConversionError, match=r"lack 'model.layers.1.mlp.up_proj.weight' \(shape \[128, 64\]\)"):
        load_model(folder)
    edit_config(folder, intermediate_size=96)
    with pytest.raises(HFConversionError, match=r"model.layers.0.mlp.gate_proj.weight has shape \[128, 64\], but the config "
                                       r"asks for \[96, 64\]"):
        load_model(folder)
    edit_config(folder, intermediate_size=128, num_hidden_layers=1)
    with pytest.raises(HFConversionError, match="unexpected weights for a Llama/Qwen of 1 layers: model.layers.1"):
        load_model(folder)
    edit_config(folder, num_hidden_layers=2, tie_word_embeddings=False)
    with pytest.raises(HFConversionError, match="unties the LM head .* lack 'lm_head.weight' \\[416, 64\\]"):
        load_model(folder)


def test_truncated_and_missing_weight_files(checkpoints, tmp_path):
    folder = copy_of(checkpoints, "qwen2.5", tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(HubError, match=f"cannot read {shard}.*incomplete metadata.*truncated or corrupt"):
        load_model(folder)
    shard.unlink()
    with pytest.raises(HubError, match="cannot read.*No such file"):
        load_model(folder)
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(HubError, match="no model.safetensors.index.json, which says which tensor is in which shard"):
        load_model(folder)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(HubError, match="PyTorch pickles, which llmlab does not load"):
        load_model(folder)


def test_index_that_does_not_match_its_shards(checkpoints, tmp_path):
    folder = copy_of(checkpoints, "qwen2.5", tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][name])
    index["weight_map"][name] = other
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HubError, match=f"puts 'model.norm.weight' in {other}, which does not hold it"):
        load_model(folder)


def test_tokenizer_that_does_not_fit_the_model(checkpoints, tmp_path):
    folder = copy_of(checkpoints, "qwen3", tmp_path)
    write_tokenizer(folder, "qwen", vocab_size=500)  # ids up to 445 or so; the model has 416
    with pytest.raises(HubError, match=r"has ids up to 4[2-9][0-9], but the model has vocab_size=416.*another model"):
        load_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(HubError, match="tokenizer.json: .*truncated, corrupt or not a tokenizers file"):
        load_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(HubError, match="has no tokenizer.json"):
        load_pretrained(folder)


def test_a_dtype_the_device_cannot_run(checkpoints, monkeypatch):
    """What the device cannot compute (bf16 on an old GPU, fp64 on MPS; here a CPU made to fail) is refused up front."""
    real = torch.nn.functional.scaled_dot_product_attention

    def no_half(q, *args, **kwargs):
        if q.dtype == torch.float16:
            raise RuntimeError('"baddbmm_with_gemm" not implemented for \'Half\'')
        return real(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_half)
    with pytest.raises(HubError, match=r"cpu cannot compute in fp16 here \(\"baddbmm_with_gemm\" not implemented"):
        load_model(checkpoints["qwen3"][0], dtype="fp16")
    assert load_model(checkpoints["qwen3"][0], dtype="bf16").lm_head.weight.dtype == torch.bfloat16


def test_dtypes(checkpoints):
    assert resolve_dtype(None) is None and resolve_dtype("auto") is None and resolve_dtype("BF16") == torch.bfloat16
    for bad in ("int8", torch.int8, 3):
        with pytest.raises(HubError, match="is not one llmlab loads weights in: use fp32, bf16, fp16"):
            load_model(checkpoints["qwen3"][0], dtype=bad)

"""The command line end to end: the built-in model offline, training, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmlab.__main__ import main
from llmlab.checkpoint import load_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True, env=env, timeout=300)


def test_generate_with_the_builtin_model():
    result = run_cli("generate", "ROMEO:", "--max-new-tokens", "40", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and len(result.stdout) > 60
    again = run_cli("generate", "ROMEO:", "--max-new-tokens", "40", "--seed", "0")
    assert again.stdout == result.stdout


def test_generate_greedy_in_process(capsys):
    exact = ["--precision", "fp32"]
    assert main(["generate", "JULIET:", "--temperature", "0", "--max-new-tokens", "10", *exact]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "JULIET:", "--temperature", "0", "--max-new-tokens", "10", *exact]) == 0
    assert capsys.readouterr().out == first
    assert main(["generate", "JULIET:", "--temperature", "0", "--max-new-tokens", "10", "--compile"]) == 0
    # The compiled decode step writes the same text: its logits differ by ≤7e-6 (measured), the top-2 gap
    # over these 10 greedy steps is at least 0.07.
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--temperature", "-1"], 2, "temperature must be ≥ 0"),
        (["--top-p", "1.5"], 2, r"top_p must be in (0, 1]"),
        (["--top-p", "0"], 2, r"top_p must be in (0, 1]"),
        (["--top-k", "0"], 2, "top_k must be an integer ≥ 1"),
        (["--checkpoint", "/nonexistent/ck"], 1, "no checkpoint folder"),
    ],
)
def test_generate_bad_input(capsys, args, code, message):
    assert main(["generate", "ROMEO:", *args]) == code
    assert message in capsys.readouterr().err


def test_empty_and_too_long_prompt(capsys):
    assert main(["generate", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "word " * 2000]) == 2
    assert "shorten it" in capsys.readouterr().err


def test_generate_validates_before_printing_the_prompt(capsys):
    # A prompt that fails (special token, invalid UTF-8 from the shell) leaves stdout empty.
    assert main(["generate", "ROMEO:<|endoftext|>", "--max-new-tokens", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--allow-special" in captured.err
    assert main(["generate", "ROMEO:\udcff", "--max-new-tokens", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "not valid UTF-8 text (byte 0xff at character 7)" in captured.err
    assert main(["generate", "ROMEO:<|endoftext|>", "--allow-special", "--temperature", "0", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:<|endoftext|>")


def test_generate_into_a_closed_pipe():
    # `llmlab generate … | head -c 10`: the reader leaves early; no BrokenPipeError traceback.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen([sys.executable, "-m", "llmlab", "generate", "ROMEO:", "--max-new-tokens", "5000"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        assert proc.stdout.read(6) == b"ROMEO:"
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 1
    assert "Traceback" not in stderr and stderr.startswith("llmlab generate: precision ")
    assert stderr.count("\n") == 1  # the precision it chose, and nothing else


def test_corrupt_checkpoint_exits_1(tmp_path, capsys):
    folder = tmp_path / "ck"
    folder.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (folder / name).write_text("garbage")
    assert main(["generate", "ROMEO:", "--checkpoint", str(folder)]) == 1
    assert "corrupt" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info", "--presets"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "gpt2-124m" in out and "nats/char" in out


def test_train_then_generate(tmp_path, shakespeare, capsys):
    corpus = tmp_path / "small.txt"
    corpus.write_text(shakespeare[:30_000])
    out = tmp_path / "run"
    assert main(["train", "--steps", "3", "--corpus", str(corpus), "--out", str(out), "--vocab-size", "300",
                 "--batch-size", "4"]) == 0
    assert "validation loss" in capsys.readouterr().out
    ckpt = load_checkpoint(out, load_trainer_state=True)
    assert ckpt.trainer_state["step"] == 3 and ckpt.config.vocab_size == 300
    assert main(["train", "--steps", "5", "--corpus", str(corpus), "--out", str(out), "--vocab-size", "300",
                 "--batch-size", "4", "--resume"]) == 0
    assert load_checkpoint(out, load_trainer_state=True).trainer_state["step"] == 5
    assert main(["generate", "First", "--checkpoint", str(out), "--max-new-tokens", "5"]) == 0


def test_train_bad_input(capsys, tmp_path):
    assert main(["train", "--minutes", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "--minutes must be > 0" in capsys.readouterr().err
    assert main(["train", "--preset", "gpt5", "--out", str(tmp_path / "x")]) == 2
    assert "gpt5" in capsys.readouterr().err


def test_train_checks_its_output_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert main(["train", "--steps", "2", "--out", str(tmp_path / "afile" / "sub")]) == 1
    assert "is a file, so the checkpoint folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"


def test_info_checks_the_weights(tmp_path, capsys):
    import shutil

    from llmlab.checkpoint import builtin_checkpoint

    folder = tmp_path / "ck"
    shutil.copytree(builtin_checkpoint(), folder)
    (folder / "model.safetensors").write_bytes(b"")
    assert main(["info", "--checkpoint", str(folder)]) == 1
    assert "corrupt or truncated" in capsys.readouterr().err


def test_several_prompts_run_through_the_engine(tmp_path, capsys):
    # Greedy: each prompt's text through the engine equals its text generated alone.
    alone = []
    for prompt in ("ROMEO:", "JULIET:"):
        assert main(["generate", prompt, "--temperature", "0", "--max-new-tokens", "12", "--precision", "fp32"]) == 0
        alone.append(capsys.readouterr().out)
    (tmp_path / "prompts.txt").write_text("JULIET:\n\n", encoding="utf-8")
    assert main(["generate", "ROMEO:", "--prompts-file", str(tmp_path / "prompts.txt"), "--temperature", "0",
                 "--max-new-tokens", "12", "--precision", "fp32"]) == 0
    captured = capsys.readouterr()
    blocks = captured.out.split("\n\n--- prompt 2 of 2")
    assert blocks[0] == "--- prompt 1 of 2 (length) ---\n" + alone[0].rstrip("\n")
    assert blocks[1].split("---\n", 1)[1] == alone[1]
    assert "2 prompts, 24 tokens" in captured.err


def test_several_prompts_bad_input(tmp_path, capsys):
    assert main(["generate", "--prompts-file", str(tmp_path / "missing.txt")]) == 1
    assert "cannot read --prompts-file" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert main(["generate", "--prompts-file", str(tmp_path / "latin1.txt")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["generate"]) == 2
    assert "give a prompt" in capsys.readouterr().err
    assert main(["generate", "A", "B", "--compile"]) == 2
    assert "--compile" in capsys.readouterr().err
    # One bad prompt among good ones: nothing is printed, nothing runs.
    assert main(["generate", "ROMEO:", "x" * 2000, "--max-new-tokens", "5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "context" in captured.err


# --- real pretrained checkpoints: --model, chat, info (notebook 14) ---------------------------------


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Small Hugging Face checkpoints written by transformers with random weights: a Llama 3 and a Qwen2.5 style."""
    hub_tests = pytest.importorskip("test_hub")  # its writers need transformers and tokenizers
    root = tmp_path_factory.mktemp("hf")
    hub_tests.write_checkpoint(root / "llama", "llama", "llama3")
    hub_tests.write_checkpoint(root / "qwen", "qwen2", "qwen", tie_word_embeddings=True)
    return root


class _PlainIds:
    """The ids the command line must feed: what the tokenizer adds (BOS) and the prompt, special text as text."""

    def __init__(self, tokenizer, add_special_tokens: bool = True) -> None:
        self.tokenizer, self.add = tokenizer, add_special_tokens

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special="all" if not self.add else frozenset(),
                                     add_special_tokens=self.add)

    def decode_bytes(self, ids) -> bytes:
        return self.tokenizer.decode_bytes(ids)


def test_generate_with_a_hf_model(hf_folders, capsys):
    from llmlab.generate import generate_text
    from llmlab.hub import load_pretrained
    from llmlab.sampling import SamplingParams

    folder = hf_folders / "llama"
    pre = load_pretrained(folder)
    bos = pre.tokenizer.special_tokens["<|begin_of_text|>"]
    assert pre.tokenizer.encode("Hello 안녕")[0] == bos  # the base model's prompt starts as in training
    params = SamplingParams(temperature=0, max_new_tokens=12, stop_ids=pre.stop_ids)
    expected = "Hello 안녕" + generate_text(pre.model, _PlainIds(pre.tokenizer), "Hello 안녕", params) + "\n"
    assert main(["generate", "--model", str(folder), "Hello 안녕", "--temperature", "0", "--max-new-tokens", "12",
                 "--precision", "fp32"]) == 0
    assert capsys.readouterr().out == expected
    assert main(["generate", "--model", str(folder), "Hello", "--dtype", "bf16", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_several_prompts_with_a_hf_model_run_through_the_engine(hf_folders, capsys):
    alone = []
    for prompt in ("Hello", "def f(x):"):
        assert main(["generate", "--model", str(hf_folders / "qwen"), prompt, "--temperature", "0",
                     "--max-new-tokens", "6", "--dtype", "fp32"]) == 0
        alone.append(capsys.readouterr().out)
    assert main(["generate", "--model", str(hf_folders / "qwen"), "Hello", "def f(x):", "--temperature", "0",
                 "--max-new-tokens", "6", "--precision", "fp32"]) == 0
    blocks = capsys.readouterr().out.split("\n\n--- prompt 2 of 2")
    assert blocks[0].split("---\n", 1)[1] == alone[0].rstrip("\n")
    assert blocks[1].split("---\n", 1)[1] == alone[1]


def usage_error(argv: list[str]) -> int:
    """The exit status of a command line argparse itself refuses (it exits instead of returning)."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    return caught.value.code


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "x"], "argument --checkpoint: not allowed with argument --model"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
])
def test_generate_with_a_hf_model_bad_options(hf_folders, capsys, args, message):
    assert usage_error(["generate", "--model", str(hf_folders / "qwen"), "Hi", *args]) == 2
    assert message in capsys.readouterr().err
    assert main(["generate", "--model", str(hf_folders / "qwen"), "Hi", "--device", "cuda:7"]) == 2
    assert "cuda:7" in capsys.readouterr().err


def test_generate_with_a_hf_model_bad_input(hf_folders, tmp_path, capsys):
    assert main(["generate", "--model", str(hf_folders / "qwen"), "Hi <|im_end|>"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "special token <|im_end|>: add --allow-special" in captured.err
    assert main(["generate", "--model", str(tmp_path), "Hi"]) == 1
    assert "has no config.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing" / "folder"), "Hi"]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_chat_reads_lines_and_streams_replies(hf_folders, capsys, monkeypatch):
    import io

    from llmlab.generate import generate_text
    from llmlab.hub import load_pretrained
    from llmlab.sampling import SamplingParams

    folder = hf_folders / "qwen"
    pre = load_pretrained(folder)
    params = SamplingParams(temperature=0, max_new_tokens=7, stop_ids=pre.stop_ids)
    conversation = [{"role": "system", "content": "Be brief."}]
    replies = []
    for line in ("Hi there 👋", "안녕하세요?"):
        conversation.append({"role": "user", "content": line})
        prompt = pre.chat_template.render(conversation, add_generation_prompt=True)
        replies.append(generate_text(pre.model, _PlainIds(pre.tokenizer, False), prompt, params))
        conversation.append({"role": "assistant", "content": replies[-1]})
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there 👋\n\n   \nnot <|im_start|> this\n안녕하세요?\n"))
    assert main(["chat", "--model", str(folder), "--system", "Be brief.", "--temperature", "0",
                 "--max-new-tokens", "7"]) == 0
    captured = capsys.readouterr()
    assert captured.out == replies[0] + "\n" + replies[1] + "\n"
    assert "llmlab chat: error: the message contains the special token <|im_start|>" in captured.err


def test_chat_with_a_base_model_and_bad_options(hf_folders, tmp_path, capsys, monkeypatch):
    import io
    import shutil

    base = tmp_path / "base"
    shutil.copytree(hf_folders / "llama", base)
    (base / "chat_template.jinja").unlink()
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", "--model", str(base)]) == 1
    assert "has no chat template" in capsys.readouterr().err
    assert usage_error(["chat"]) == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err
    assert main(["chat", "--model", str(base), "--temperature", "-1"]) == 2
    assert "--temperature: temperature must be ≥ 0" in capsys.readouterr().err


def test_info_of_a_hf_model(hf_folders, capsys):
    from llmlab import calc
    from llmlab.hub import load_model, read_config

    folder = hf_folders / "llama"
    assert main(["info", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    config = read_config(folder)
    count = load_model(folder).num_parameters()
    assert f"model: llama from {folder}" in out and f"({count:,});" in out
    assert "4 heads (2 KV heads) of 16" in out and "(stored in fp32)" in out
    kv = calc.human_bytes(calc.kv_bytes_per_token(config, "bf16"))
    assert f"KV cache: {kv} per token in bf16" in out and kv == "256 B"
    assert f"{calc.human_bytes(calc.weight_bytes(config, 'bf16'))} in bf16" in out


def test_info_of_a_damaged_hf_model(hf_folders, tmp_path, capsys):
    import json
    import shutil

    folder = tmp_path / "llama"
    shutil.copytree(hf_folders / "llama", folder)
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "num_hidden_layers": 3}))
    assert main(["info", "--model", str(folder)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "lack 'model.layers.2." in captured.err
    assert usage_error(["info", "--model", str(hf_folders / "llama"), "--checkpoint", "x"]) == 2


def test_generate_runs_the_fastest_precision_by_default_and_says_which(capsys):
    from llmlab.precision import PRECISIONS, fast_precision
    from llmlab.__main__ import PRECISION_CHOICES

    assert PRECISION_CHOICES == PRECISIONS
    fast = fast_precision("cpu")  # int8 on a CPU without bf16 units, bf16 with them
    args = ["generate", "JULIET:", "--temperature", "0", "--max-new-tokens", "8"]
    assert main(args) == 0
    auto = capsys.readouterr()
    assert auto.err.startswith(f"llmlab generate: precision {fast} (")
    assert main([*args, "--precision", fast]) == 0
    chosen = capsys.readouterr()
    assert chosen.out == auto.out and "as asked with --precision" in chosen.err
    assert main([*args, "--compile"]) == 0  # the compiled step runs the model as loaded, and says so
    assert "precision as loaded (--compile runs the model as loaded" in capsys.readouterr().err


def test_generate_with_a_draft_gives_the_models_own_greedy_text(tmp_path, capsys):
    from llmlab.checkpoint import load_checkpoint, save_checkpoint
    from llmlab.model import Transformer
    from llmlab.speculative import draft_config

    ckpt = load_checkpoint()
    draft = Transformer(draft_config(ckpt.model.config, d_model=32, n_layers=1, n_heads=2))
    save_checkpoint(tmp_path / "draft", draft, ckpt.tokenizer)
    args = ["generate", "JULIET:", "--temperature", "0", "--max-new-tokens", "12", "--precision", "fp32"]
    assert main(args) == 0
    alone = capsys.readouterr().out
    assert main([*args, "--draft", str(tmp_path / "draft"), "--draft-k", "3"]) == 0
    drafted = capsys.readouterr()
    assert drafted.out == alone  # greedy speculative decoding = the model alone, whatever the draft proposes
    assert "speculative decoding, k=3:" in drafted.err and "draft tokens accepted" in drafted.err
    assert main([*args[:2], "ROMEO:", *args[2:], "--draft", str(tmp_path / "draft")]) == 2
    assert "--draft (speculative decoding) runs one prompt" in capsys.readouterr().err

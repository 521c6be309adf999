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
    assert main(["generate", "JULIET:", "--temperature", "0", "--max-new-tokens", "10"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "JULIET:", "--temperature", "0", "--max-new-tokens", "10"]) == 0
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
    assert "Traceback" not in stderr and stderr == ""


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
        assert main(["generate", prompt, "--temperature", "0", "--max-new-tokens", "12"]) == 0
        alone.append(capsys.readouterr().out)
    (tmp_path / "prompts.txt").write_text("JULIET:\n\n", encoding="utf-8")
    assert main(["generate", "ROMEO:", "--prompts-file", str(tmp_path / "prompts.txt"), "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
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

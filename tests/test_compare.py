"""``python -m llmlab.bench compare`` (notebook 16): same weights in both libraries, bytes per step, the table.

The benchmark asserts nothing about speed (timings are the script's business); these tests check that it
runs end to end in fast mode, that both libraries get the same weights and give the same greedy tokens, and
that the bytes it divides by are the bytes a decode step reads.
"""

from __future__ import annotations

import torch

from llmlab.compare import DecodeRow, decode_read_bytes, decode_table, same_until, same_weights
from llmlab.config import get_config
from llmlab.model import Transformer


def test_same_weights_give_the_same_logits_in_both_libraries():
    ours, hf, _ = same_weights("gpt2-124m", fast=True)
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_step_reads_every_matrix_once_and_no_embedding_table():
    config = get_config("course-tiny")
    model = Transformer(config)
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    every = sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once here
    head = model.lm_head.weight.numel() if config.tie_embeddings else 0  # the head reads the tied table whole
    assert decode_read_bytes(model) == 4 * (every - embeddings + head)
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4
    assert decode_read_bytes(model, context=10) == decode_read_bytes(model) + 10 * per_token


def test_int8_weights_are_a_quarter_of_the_bytes_plus_their_scales():
    from llmlab.quant import quantize_model

    model = Transformer(get_config("course-tiny"))
    fp32 = decode_read_bytes(model)
    int8 = decode_read_bytes(quantize_model(model, bits=8))
    assert fp32 / 4 < int8 < fp32 / 3.5


def test_the_table_reports_ratios_and_first_disagreement():
    ref = DecodeRow("transformers", 2.0, [1, 2, 3, 4], float("nan"))
    rows = [DecodeRow("fast", 1.0, [1, 2, 3, 4], 1e6), DecodeRow("off", 4.0, [1, 2, 9, 4], 1e6),
            DecodeRow("skipped", float("nan"), [], 1e6, "skipped: no compiler")]
    table = decode_table(ref, rows, 4, read_rate=1e6)  # read roofline: 1e6 B/s ÷ 1e6 B = 1 tok/s
    assert "| fast | 4.0 | 2.00× | 1.0 MB | 1.0 | 400% | yes |" in table
    assert "| off | 1.0 | 0.50× | 1.0 MB | 1.0 | 100% | first 2 of 4 |" in table
    assert "skipped: no compiler" in table
    assert same_until([1, 2, 3], [1, 2, 4]) == 2 and same_until([], [1]) == 0


def test_bench_compare_runs_end_to_end_in_fast_mode(capsys):
    from llmlab.bench import main

    main(["compare", "--fast", "--compare-models", "course"])
    printed = capsys.readouterr().out
    eager = next(line for line in printed.splitlines() if line.startswith("| llmlab, eager fp32 (KV cache) |"))
    assert eager.split("|")[7].strip() == "yes"  # the same greedy tokens as transformers, on the same weights
    assert "| transformers generate, fp32 |" in printed and "| llmlab, int8 weight-only |" in printed
    assert "engine (continuous batching)" in printed and "transformers generate (padded)" in printed
    assert "read bandwidth here:" in printed

"""The serve benchmark's building blocks on a tiny model: they complete, count what was asked, print a table.

No timing is asserted (benchmarks print figures; they are never timed tests).
"""

from __future__ import annotations

import math

import pytest
import torch

from llmlab import Transformer, get_config
from llmlab.bench import (
    ServeRequest,
    ServeResult,
    main,
    percentile,
    serve_engine,
    serve_lengths,
    serve_static,
    serve_table,
    serve_transformers,
    serve_workload,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models():
    from llmlab.hf import to_hf_gpt2

    torch.manual_seed(0)
    config = get_config("course-tiny", vocab_size=96, context_length=48, d_model=32, n_layers=2, n_heads=2)
    model = Transformer(config).eval()
    return model, to_hf_gpt2(model)


def test_workload_is_seeded_and_in_range():
    a = serve_workload(20, seed=3, vocab_size=50, prompt_range=(4, 9), output_range=(2, 5))
    assert a == serve_workload(20, seed=3, vocab_size=50, prompt_range=(4, 9), output_range=(2, 5))
    assert a != serve_workload(20, seed=4, vocab_size=50, prompt_range=(4, 9), output_range=(2, 5))
    assert all(4 <= len(r.prompt_ids) <= 9 and 2 <= r.max_new_tokens <= 5 for r in a)
    assert all(0 <= t < 50 for r in a for t in r.prompt_ids)


def test_lengths_fit_the_context():
    assert serve_lengths(1024) == ((16, 256), (16, 256))  # gpt2-124m: the ranges
    assert serve_lengths(256) == ((16, 128), (16, 128))  # course-tiny: capped at half the context each
    (p_lo, p_hi), (o_lo, o_hi) = serve_lengths(48, (4, 40), (4, 40))
    assert p_hi + o_hi <= 48


def test_every_method_counts_exactly_the_requested_tokens(models, capsys):
    model, hf = models
    prompt_range, output_range = serve_lengths(model.config.context_length, (3, 20), (2, 20))
    workload = serve_workload(4, seed=0, vocab_size=model.config.vocab_size, prompt_range=prompt_range,
                              output_range=output_range)
    requested = [r.max_new_tokens for r in workload]
    results = [serve_engine(model, workload), serve_static(model, workload, batch=3),
               serve_transformers(hf, workload, batch=3)]
    for result in results:
        assert result.requested == requested
        assert result.counted == requested, result.method
        assert result.output_tokens == sum(requested)
        assert all(p >= r for p, r in zip(result.produced, requested)), result.method
        assert result.seconds > 0 and result.tokens_per_second > 0
    engine, static, hf_result = results
    assert engine.produced == requested  # the engine stops each request at its own length
    # static batches run every row to the longest request of its batch: [0:3] and [3:4]
    assert static.produced == [max(requested[:3])] * 3 + [requested[3]]
    assert hf_result.produced == static.produced
    assert len(engine.ttft) == 4 and len(engine.tpot) == sum(r > 1 for r in requested)
    assert engine.stats["generated_tokens"] == sum(requested) and engine.stats["preemptions"] == 0

    table = serve_table("tiny", results)
    print(table)
    out = capsys.readouterr().out
    for words in ("engine (continuous batching)", "static batches", "transformers generate", "TTFT", "TPOT",
                  "p50", "p90", "p99", f"{sum(requested):,}", "CPU"):
        assert words in out
    assert out.count("×") >= 2  # engine/static and engine/transformers


def test_static_counts_only_what_was_asked():
    result = ServeResult("static", 2.0, produced=[10, 10, 10], requested=[3, 10, 7])
    assert result.counted == [3, 10, 7] and result.output_tokens == 20 and result.tokens_per_second == 10
    short = ServeResult("transformers", 1.0, produced=[2, 2], requested=[5, 2])
    assert short.counted == [2, 2]  # a request that got fewer tokens than asked is not padded up


def test_percentile():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(range(101)), 90) == 90
    assert math.isnan(percentile([], 50))


def test_command_line_runs_course_tiny(capsys):
    threads = torch.get_num_threads()
    main(["serve", "--models", "course-tiny", "--requests", "3", "--batch", "2", "--threads", "1"])
    assert torch.get_num_threads() == threads  # --threads is undone afterwards
    out = capsys.readouterr().out
    assert "estimated time" in out
    assert "prompts 16–128 tokens, outputs 16–128 tokens (capped" in out
    assert "engine (continuous batching)" in out and "transformers generate" in out
    assert isinstance(ServeRequest([1], 1), ServeRequest)

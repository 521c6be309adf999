"""Serving metrics on synthetic timings with known answers (notebook 15): percentiles, TTFT/TPOT/ITL,
throughputs, goodput (FACTS' example), MBU (FACTS' example) and MFU, and the bandwidth probes' units."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmlab import metrics
from llmlab.metrics import SLO, RequestRecord, goodput, goodput_fraction, mbu, mfu, percentile, summarize


def record(send: float, tokens: list[float], prompt: int = 10, end: float | None = None,
           error: str | None = None) -> RequestRecord:
    """A completed request: sent at ``send``, one token arriving at each of ``tokens``, ended at the last."""
    return RequestRecord(send_time=send, prompt_tokens=prompt, first_token_time=tokens[0] if tokens else None,
                         token_times=list(tokens), end_time=tokens[-1] if end is None and tokens else end,
                         output_tokens=len(tokens), error=error)


# --- percentiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("values, q, expected", [
    ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
    ([3.0, 1.0, 2.0], 50, 2.0),
    ([1.0, 2.0], 50, 1.5),
    ([5.0], 99, 5.0),
    (list(range(101)), 90, 90),
    (list(range(101)), 99, 99),
    ([10.0, 20.0, 30.0, 40.0, 50.0], 90, 46.0),  # rank 3.6: 40 + 0.6 × 10
    ([10.0, 20.0, 30.0, 40.0, 50.0], 0, 10.0),
    ([10.0, 20.0, 30.0, 40.0, 50.0], 100, 50.0),
])
def test_percentile_known_values(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected, abs=1e-12)


def test_percentile_is_numpys_linear_method():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 333):
        values = rng.exponential(size=n).tolist()
        for q in (0, 1, 50, 90, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)


def test_percentile_empty_and_out_of_range():
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_bench_uses_the_same_percentile():
    from llmlab import bench

    assert bench.percentile is metrics.percentile


# --- one request ------------------------------------------------------------------------------------


def test_ttft_tpot_itl_e2e_of_one_request():
    r = record(send=1.0, tokens=[1.25, 1.30, 1.40, 1.55], end=1.60)
    assert r.ok
    assert r.ttft == pytest.approx(0.25)
    assert r.tpot == pytest.approx((1.60 - 1.25) / 3)  # (end − first token) / (output tokens − 1)
    assert r.itl == pytest.approx([0.05, 0.10, 0.15])
    assert r.e2e == pytest.approx(0.60)


def test_one_token_has_no_tpot_and_a_failed_request_is_not_ok():
    assert record(0.0, [0.1]).tpot is None
    assert record(0.0, [0.1]).itl == []
    failed = record(0.0, [], end=0.5, error="HTTP 500")
    assert not failed.ok and failed.ttft is None and failed.tpot is None


def test_tpot_counts_the_servers_tokens_when_a_chunk_carries_several():
    r = record(0.0, [0.1, 0.3], end=0.5)
    r.output_tokens = 5  # usage said 5 tokens came in two chunks
    assert r.tpot == pytest.approx((0.5 - 0.1) / 4)
    assert r.itl == pytest.approx([0.2])


# --- goodput --------------------------------------------------------------------------------------


def facts_minute() -> list[RequestRecord]:
    """FACTS' example: 100 requests completed in one minute, 30 of them within TTFT ≤ 200 ms and TPOT ≤ 100 ms."""
    records = []
    for i in range(100):
        send = i * 0.59
        if i < 30:  # TTFT 150 ms, TPOT 50 ms: within the SLO
            tokens = [send + 0.15 + 0.05 * k for k in range(5)]
        elif i < 60:  # TTFT 300 ms: too slow to start
            tokens = [send + 0.30 + 0.05 * k for k in range(5)]
        else:  # TPOT 150 ms: too slow to stream
            tokens = [send + 0.10 + 0.15 * k for k in range(5)]
        records.append(record(send, tokens))
    return records


def test_goodput_facts_example_is_30_rpm():
    records = facts_minute()
    slo = SLO(ttft=0.2, tpot=0.1)
    assert sum(slo.met_by(r) for r in records) == 30
    assert goodput(records, slo, seconds=60.0) * 60 == pytest.approx(30.0, abs=1e-12)
    assert goodput_fraction(records, slo) == pytest.approx(0.30)
    summary = summarize(records, slo, seconds=60.0)
    assert summary.completed == 100 and summary.failed == 0
    assert summary.request_throughput * 60 == pytest.approx(100.0)
    assert summary.goodput * 60 == pytest.approx(30.0)


def test_slo_default_is_facts_and_edges_count_as_met():
    assert SLO() == SLO(ttft=0.2, tpot=0.1)
    slo = SLO(ttft=0.25, tpot=0.125)  # binary fractions: the comparisons are exact
    assert slo.met_by(record(0.0, [0.25, 0.375]))
    assert not slo.met_by(record(0.0, [0.25, 0.5]))
    assert slo.met_by(record(0.0, [0.25]))  # one token: no TPOT to miss
    assert not slo.met_by(record(0.0, [], end=0.1, error="boom"))


# --- summary ----------------------------------------------------------------------------------------


def test_summary_throughputs_and_percentiles():
    records = [
        record(0.0, [0.5, 1.0, 1.5], prompt=10),      # ttft .5, tpot .5, e2e 1.5
        record(1.0, [1.25, 1.5], prompt=20),           # ttft .25, tpot .25, e2e .5
        record(2.0, [3.0, 3.5, 4.0, 4.5], prompt=30),  # ttft 1, tpot .5, e2e 2.5
        record(2.0, [], end=2.5, error="HTTP 503"),
    ]
    s = summarize(records, SLO(ttft=0.5, tpot=0.5))
    assert (s.requests, s.completed, s.failed) == (4, 3, 1)
    assert s.seconds == pytest.approx(4.5)
    assert (s.prompt_tokens, s.output_tokens) == (60, 9)
    assert s.request_throughput == pytest.approx(3 / 4.5)
    assert s.output_throughput == pytest.approx(9 / 4.5)
    assert s.total_throughput == pytest.approx(69 / 4.5)
    assert s.goodput == pytest.approx(2 / 4.5) and s.goodput_fraction == pytest.approx(0.5)
    assert s.ttft[50] == pytest.approx(0.5) and s.ttft[90] == pytest.approx(0.9)
    assert s.tpot[50] == pytest.approx(0.5)
    assert s.itl[50] == pytest.approx(0.5) and s.itl[99] == pytest.approx(0.5)
    assert s.e2e[50] == pytest.approx(1.5)
    table = metrics.summary_table(s)
    assert "3 completed, 1 failed" in table and "TTFT" in table and "p99" in table


def test_summary_of_nothing_does_not_crash():
    s = summarize([])
    assert s.requests == 0 and math.isnan(s.request_throughput) and math.isnan(s.ttft[50])
    metrics.summary_table(s)


# --- MBU and MFU ------------------------------------------------------------------------------------


def test_mbu_facts_example_is_70_percent():
    assert 7e9 * 2 * 100 == pytest.approx(1.4e12)  # 1.4 TB/s
    assert mbu(bytes_per_token=7e9 * 2, tokens_per_second=100, bandwidth=2e12) == pytest.approx(0.70, abs=1e-12)


def test_mfu_known_values():
    # a 7B model: ~2 × 7e9 FLOPs per token; 1,000 tokens/s on a 312 TFLOP/s (A100 bf16 dense peak)
    assert mfu(2 * 7e9, 1000, 312e12) == pytest.approx(14e12 / 312e12)
    assert mfu(1e9, 500, 1e12) == pytest.approx(0.5)  # the "50%+ is good" line exactly
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        mbu(1.0, 1.0, -1.0)


def test_bandwidth_and_flops_probes_return_plausible_rates():
    copy = metrics.measure_copy_bandwidth(n_bytes=8 * 2**20, repeats=3)
    flops = metrics.measure_matmul_flops(n=128, repeats=3)
    assert 1e8 < copy < 1e13  # between 100 MB/s and 10 TB/s on any machine this runs on
    assert 1e6 < flops < 1e15


# --- arrivals and payloads ------------------------------------------------------------------------


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate():
    a = metrics.poisson_arrivals(2000, rate=4.0, seed=1)
    assert a == metrics.poisson_arrivals(2000, rate=4.0, seed=1)
    assert a != metrics.poisson_arrivals(2000, rate=4.0, seed=2)
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(0.25, rel=0.1)  # 2,000 draws: the mean is within ~2% of 1/rate
    with pytest.raises(ValueError):
        metrics.poisson_arrivals(3, rate=0)


def test_payload_uses_only_openai_fields():
    from llmlab.bench import ServeRequest

    body = metrics.completion_payload(ServeRequest([5, 6, 7], 4), "m")
    assert body == {"model": "m", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}


def test_sse_events_parse_data_lines_and_done():
    lines = ['data: {"choices": [{"text": "a"}]}', "", ": keep-alive", "data: [DONE]"]
    assert list(metrics.sse_events(lines)) == [{"choices": [{"text": "a"}]}, None]


def test_read_bandwidth_is_bytes_read_over_the_time_a_sum_takes(monkeypatch):
    import llmlab.metrics as metrics

    monkeypatch.setattr(metrics, "_median_seconds", lambda fn, repeats: (fn(), 0.5)[1])
    assert metrics.measure_read_bandwidth(n_bytes=4 * 1000) == 4 * 1000 / 0.5  # 1000 floats read in 0.5 s

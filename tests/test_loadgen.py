"""The HTTP load generator (notebook 15) against servers on 127.0.0.1: a scripted stub whose answers are known,
and the real ``llmlab serve`` app over the course model.

No latency is asserted: only counts, orderings and completeness, which hold on any machine.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from llmlab import metrics
from llmlab.bench import ServeRequest, serve_workload

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from fastapi import FastAPI, Request  # noqa: E402  (module level: FastAPI resolves the annotations here)
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """A uvicorn server for ``app`` on a free 127.0.0.1 port, in a daemon thread, stopped on exit."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def stub_app(api_key: str | None = None, gap: float = 0.002, stop_after: int | None = None,
             fail_after: int | None = None):
    """An OpenAI-shaped ``/v1/completions`` that streams ``max_tokens`` one-character chunks ``gap`` s apart
    (or stops after ``stop_after``), then a usage chunk and ``[DONE]``; it counts what it served."""
    app = FastAPI()
    app.state.served = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def denied(request: Request) -> bool:
        return api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}"

    @app.get("/v1/models")
    def models(request: Request):
        if denied(request):
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        return {"object": "list", "data": [{"id": "stub", "object": "model", "max_model_len": 96}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        if denied(request):
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        n = body["max_tokens"] if stop_after is None else min(stop_after, body["max_tokens"])
        served = app.state.served
        served["requests"] += 1
        served["prompt_tokens"] += len(body["prompt"])
        served["completion_tokens"] += n

        async def events():
            for i in range(n):
                await asyncio.sleep(gap)
                if fail_after is not None and i == fail_after:  # the server gives up mid-stream
                    error = {"error": {"message": "engine stopped", "code": "interrupted"}}
                    yield "data: " + json.dumps(error) + "\n\n"
                    return
                reason = None if i < n - 1 else ("length" if n == body["max_tokens"] else "stop")
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": "x", "finish_reason": reason}]}) + "\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                     "total_tokens": len(body["prompt"]) + n}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def workload(n: int = 20, seed: int = 0) -> list[ServeRequest]:
    return serve_workload(n, seed, vocab_size=256, prompt_range=(3, 12), output_range=(2, 9))


def assert_complete(records, requests) -> None:
    assert len(records) == len(requests)
    for r, q in zip(records, requests):
        assert r.ok, r.error
        assert r.prompt_tokens == len(q.prompt_ids)
        assert r.send_time <= r.first_token_time <= r.token_times[-1] <= r.end_time
        assert all(b >= a for a, b in zip(r.token_times, r.token_times[1:]))
        assert r.wire_bytes > 0


# --- against the scripted stub: exact counts -------------------------------------------------------


@pytest.fixture(scope="module")
def stub():
    with ThreadedServer(stub_app()) as server:
        yield server


@pytest.mark.parametrize("mode", [{"rate": 200.0}, {"concurrency": 4}], ids=["rate", "concurrency"])
def test_every_record_is_complete_and_counts_match_the_server(stub, mode):
    requests = workload()
    before = dict(stub.server.config.app.state.served)
    start = time.monotonic()
    records = metrics.run_load(stub.url, requests, seed=1, timeout=20, **mode)
    assert time.monotonic() - start < 30
    assert_complete(records, requests)
    assert [r.output_tokens for r in records] == [q.max_new_tokens for q in requests]
    assert [len(r.token_times) for r in records] == [q.max_new_tokens for q in requests]
    assert all(r.finish_reason == "length" for r in records)
    served = stub.server.config.app.state.served
    assert served["requests"] - before["requests"] == len(requests)
    assert served["prompt_tokens"] - before["prompt_tokens"] == sum(len(q.prompt_ids) for q in requests)
    summary = metrics.summarize(records)
    assert summary.completed == len(requests) and summary.failed == 0
    assert summary.output_tokens == sum(q.max_new_tokens for q in requests)
    for values in (summary.ttft, summary.tpot, summary.itl, summary.e2e):
        assert 0 <= values[50] <= values[90] <= values[99]


def test_concurrency_never_exceeds_the_clients(stub):
    records = metrics.run_load(stub.url, workload(16), concurrency=3, timeout=20)
    events = sorted([(r.send_time, 1) for r in records] + [(r.end_time, -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    live = peak = 0
    for _, step in events:
        live += step
        peak = max(peak, live)
    assert peak <= 3


def test_an_early_stop_is_counted_as_it_came():
    with ThreadedServer(stub_app(stop_after=2)) as server:
        records = metrics.run_load(server.url, [ServeRequest([1, 2, 3], 6)], concurrency=1, timeout=20)
    assert records[0].ok and records[0].output_tokens == 2 and records[0].finish_reason == "stop"


def test_an_error_event_mid_stream_fails_the_request():
    with ThreadedServer(stub_app(fail_after=2)) as server:
        records = metrics.run_load(server.url, [ServeRequest([1, 2], 5)], concurrency=1, timeout=20)
    assert not records[0].ok and "engine stopped" in records[0].error
    assert len(records[0].token_times) == 2


def test_api_key_is_sent_and_a_refusal_is_recorded_not_raised():
    with ThreadedServer(stub_app(api_key="sesame")) as server:
        good = metrics.run_load(server.url, workload(3), concurrency=2, api_key="sesame", timeout=20)
        bad = metrics.run_load(server.url, workload(3), concurrency=2, api_key="wrong", model="stub", timeout=20)
    assert all(r.ok for r in good)
    assert all(not r.ok and r.error.startswith("HTTP 401") for r in bad)
    assert metrics.summarize(bad).failed == 3


def test_an_unreachable_server_gives_failed_records():
    url = f"http://127.0.0.1:{free_port()}"
    records = metrics.run_load(url, workload(2), concurrency=2, model="nobody", timeout=5)
    assert len(records) == 2 and all(r.error for r in records)


def test_run_load_needs_exactly_one_mode(stub):
    with pytest.raises(ValueError, match="exactly one"):
        metrics.run_load(stub.url, workload(1), model="stub")
    with pytest.raises(ValueError, match="exactly one"):
        metrics.run_load(stub.url, workload(1), rate=1.0, concurrency=1, model="stub")


def test_run_load_works_inside_a_running_event_loop(stub):
    async def inside():  # a notebook's situation: a loop is already running in this thread
        return metrics.run_load(stub.url, workload(2), concurrency=2, timeout=20)

    assert all(r.ok for r in asyncio.run(inside()))


def test_bench_serve_url_prints_the_metrics(stub, capsys):
    from llmlab.bench import main

    main(["serve", "--url", stub.url, "--requests", "6", "--concurrency", "3", "--seed", "2"])
    out = capsys.readouterr().out
    assert "6 completed, 0 failed" in out
    for word in ("TTFT", "TPOT", "ITL", "end-to-end", "goodput", "output tokens/s"):
        assert word in out
    assert "prompts 16–48 token ids" in out  # the stub's context of 96, halved


def test_bench_serve_url_without_a_server_says_what_to_do():
    from llmlab.bench import main

    with pytest.raises(SystemExit, match="Start a server first"):
        main(["serve", "--url", f"http://127.0.0.1:{free_port()}", "--requests", "2"])


# --- against the real server: `llmlab serve`'s app over the course model -------------------------


def server_counts(url: str) -> dict[str, float]:
    """The server's own counters from ``GET /metrics`` (Prometheus text format)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counts[sample.name] = counts.get(sample.name, 0.0) + sample.value
    return counts


@pytest.fixture(scope="module")
def real():
    torch = pytest.importorskip("torch")
    from llmlab.checkpoint import load_checkpoint
    from llmlab.serve import Server, ServedModel

    torch.manual_seed(0)
    with Server(ServedModel.from_checkpoint(load_checkpoint()), max_num_seqs=16) as server:
        yield server


@pytest.mark.parametrize("mode", [{"rate": 20.0}, {"concurrency": 4}], ids=["rate", "concurrency"])
def test_real_server_every_record_complete_and_counts_match_its_metrics(real, mode):
    requests = serve_workload(20, seed=5, vocab_size=256, prompt_range=(4, 24), output_range=(2, 12))
    before = server_counts(real.url)
    start = time.monotonic()
    records = metrics.run_load(real.url, requests, seed=3, timeout=30, **mode)
    assert time.monotonic() - start < 30
    assert_complete(records, requests)
    after = server_counts(real.url)
    finished = after["llmlab_requests_finished_total"] - before.get("llmlab_requests_finished_total", 0)
    assert finished == len(requests)
    assert after["llmlab_prompt_tokens_total"] - before.get("llmlab_prompt_tokens_total", 0) == \
        sum(len(q.prompt_ids) for q in requests)
    assert after["llmlab_generation_tokens_total"] - before.get("llmlab_generation_tokens_total", 0) == \
        sum(r.output_tokens for r in records)
    assert all(1 <= r.output_tokens <= q.max_new_tokens for r, q in zip(records, requests))
    assert all(r.finish_reason in ("stop", "length") for r in records)
    assert all(r.output_tokens == q.max_new_tokens for r, q in zip(records, requests) if r.finish_reason == "length")
    summary = metrics.summarize(records)
    assert summary.completed == len(requests)
    for values in (summary.ttft, summary.e2e):
        assert 0 < values[50] <= values[90] <= values[99]

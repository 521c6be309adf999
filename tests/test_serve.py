"""``llmlab serve`` end to end with real clients: the official ``openai`` package, httpx, curl-like bad input.

Every server listens on 127.0.0.1 with a free port; every client call has a timeout, so a
hang fails the test instead of stalling the run.  Token-for-token comparisons run each
request alone, so the server's batch is the engine's batch and the floats are the same.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from llmlab.checkpoint import load_checkpoint
from llmlab.engine import Engine
from llmlab.hub import ChatTemplate
from llmlab.sampling import SamplingParams
from llmlab.serve import IncrementalText, ServedModel, Server

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

TIMEOUT = 30.0
TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint()


@pytest.fixture(scope="module")
def served(ckpt):
    return ServedModel.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def server(served):
    with Server(served) as s:
        yield s


def client(server, api_key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, timeout=TIMEOUT, max_retries=0)


def engine_alone(model, prompt_ids, params) -> list[int]:
    engine = Engine(model)
    return list(engine.stream(prompt_ids, params))


def reply_text(tokenizer, ids, stop_ids) -> str:
    """What the server sends for these ids: the stop token ends the reply without its text."""
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def wait_until(predicate, seconds=15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def idle_and_clean(server) -> bool:
    return server.engine_loop.call(lambda e: e.is_idle_and_clean(), timeout=TIMEOUT)


# --- the same tokens as the engine alone ---------------------------------------------------


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7, "top_k": 40}])
def test_openai_client_gets_what_the_engine_gives(server, ckpt, sampling):
    prompt = ckpt.tokenizer.encode("ROMEO:\nWhat")
    params = SamplingParams(max_new_tokens=24, stop_ids=(ckpt.tokenizer.eot_id,), **sampling)
    ids = engine_alone(ckpt.model, prompt, params)
    expected = reply_text(ckpt.tokenizer, ids, params.stop_ids)
    api = client(server)
    full = api.completions.create(model=server.model_name, prompt=prompt, max_tokens=24, **_openai(sampling))
    assert full.object == "text_completion" and full.model == server.model_name
    assert full.choices[0].text == expected
    assert full.usage.completion_tokens == len(ids) and full.usage.prompt_tokens == len(prompt)
    assert full.usage.total_tokens == len(prompt) + len(ids)
    assert full.choices[0].finish_reason == ("stop" if ids[-1] in params.stop_ids else "length")
    chunks = list(api.completions.create(model=server.model_name, prompt=prompt, max_tokens=24, stream=True,
                                         stream_options={"include_usage": True}, **_openai(sampling)))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(ids)
    assert len([c for c in chunks if c.choices]) >= 2  # streamed piece by piece, not in one go


def _openai(sampling: dict) -> dict:
    extra = {"top_k": sampling["top_k"]} if "top_k" in sampling else {}
    plain = {k: v for k, v in sampling.items() if k != "top_k"}
    return {**plain, **({"extra_body": extra} if extra else {})}


def test_text_prompt_and_stop_strings(server, ckpt):
    prompt = "JULIET:\n"
    ids = engine_alone(ckpt.model, ckpt.tokenizer.encode(prompt), SamplingParams(temperature=0, max_new_tokens=30))
    text = ckpt.tokenizer.decode(ids)
    stop = text[10:14]  # somewhere in the middle, likely spanning tokens
    cut = text[:text.index(stop)]
    api = client(server)
    full = api.completions.create(model=server.model_name, prompt=prompt, max_tokens=30, temperature=0,
                                  stop=[stop, "never appears"])
    assert (full.choices[0].text, full.choices[0].finish_reason) == (cut, "stop")
    streamed = list(api.completions.create(model=server.model_name, prompt=prompt, max_tokens=30, temperature=0,
                                           stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert wait_until(lambda: idle_and_clean(server))  # the stop string aborted the request: its blocks are free


def test_prompt_plus_max_tokens_is_clamped_to_the_context(server, ckpt):
    context = ckpt.config.context_length
    prompt = [65] * (context - 5)
    full = client(server).completions.create(model=server.model_name, prompt=prompt, max_tokens=100,
                                              temperature=0)
    assert full.choices[0].finish_reason in ("length", "stop")
    if full.choices[0].finish_reason == "length":
        assert full.usage.completion_tokens == 6  # context + 1 - prompt: the engine's context rule
    assert full.usage.completion_tokens <= 6


class FakeTokenizer:
    def __init__(self, pieces):
        self.pieces = pieces

    def decode_bytes(self, ids):
        return b"".join(self.pieces[i] for i in ids)


def test_incremental_text_holds_back_partial_characters_and_stop_strings():
    han = "한".encode()
    tok = FakeTokenizer([han[:1], han[1:2], han[2:], b"ab", b"c", b"d", b"X"])
    text = IncrementalText(tok)
    assert [text.add([0]), text.add([1]), text.add([2])] == ["", "", "한"]
    text = IncrementalText(tok, stop=["bcd"])
    assert text.add([3]) == "a"  # "b" might start "bcd"
    assert text.add([4]) == ""
    assert text.add([6]) == "bcX" and not text.stopped  # it did not
    text = IncrementalText(tok, stop=["bcd"])
    assert [text.add([3]), text.add([4]), text.add([5])] == ["a", "", ""] and text.stopped
    assert text.sent_text == "a" and text.flush() == ""
    text = IncrementalText(tok)
    assert text.add([0]) == "" and text.flush() == "\ufffd"  # an unfinished character at the end


# --- chat --------------------------------------------------------------------------------------


def test_chat_completions_with_a_template_and_400_without(server, ckpt):
    chat = ServedModel(ckpt.model, ckpt.tokenizer, "tiny-chat", ChatTemplate(TEMPLATE), (ckpt.tokenizer.eot_id,))
    messages = [{"role": "user", "content": "Who is there?"}]
    ids = engine_alone(ckpt.model, chat.chat_ids(messages),
                       SamplingParams(temperature=0, max_new_tokens=12, stop_ids=chat.stop_ids))
    expected = reply_text(ckpt.tokenizer, ids, chat.stop_ids)
    with Server(chat, max_num_seqs=8) as s:
        api = client(s)
        full = api.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
        assert full.object == "chat.completion"
        assert full.choices[0].message.role == "assistant" and full.choices[0].message.content == expected
        assert full.usage.completion_tokens == len(ids)
        chunks = list(api.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12,
                                                  temperature=0, stream=True))
        assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client(server).chat.completions.create(model=server.model_name, messages=messages)


# --- many clients, one engine -----------------------------------------------------------------


def test_200_concurrent_streams_complete_and_leave_the_engine_clean(served, ckpt):
    n = 200
    wanted = [4 + i % 5 for i in range(n)]

    async def one(http: httpx.AsyncClient, i: int) -> tuple[int, str, int, bool]:
        body = {"prompt": [(7 * i + j) % 1000 for j in range(3 + i % 7)], "max_tokens": wanted[i],
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        finish, usage, done = None, None, False
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line:
                    continue
                assert line.startswith("data: ")
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                    finish = chunk["choices"][0]["finish_reason"]
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
        return i, finish, usage, done

    async def run_all(url: str):
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(n))), 120.0)

    with Server(served, max_num_seqs=64) as s:
        results = asyncio.run(run_all(s.url))
        for i, finish, usage, done in results:
            assert done and finish in ("length", "stop"), (i, finish, done)
            assert usage == wanted[i] if finish == "length" else 1 <= usage <= wanted[i]
        assert wait_until(lambda: idle_and_clean(s))
        m = metrics(s)
        assert m['llmlab_requests_finished_total{finish_reason=length}'] \
            + m['llmlab_requests_finished_total{finish_reason=stop}'] == n
        assert m['llmlab_requests_finished_total{finish_reason=abort}'] == 0
        assert m["llmlab_generation_tokens_total"] == sum(r[2] for r in results)
        assert m["llmlab_prompt_tokens_total"] == sum(3 + i % 7 for i in range(n))
        assert m["llmlab_time_to_first_token_seconds_count"] == n
        assert m["llmlab_e2e_request_latency_seconds_count"] == n
        assert m["llmlab_requests_running"] == 0 and m["llmlab_kv_blocks_used"] == 0


# --- clients that leave, servers that stop ----------------------------------------------------


def test_a_client_that_disconnects_mid_stream_is_aborted(served):
    with Server(served, max_num_seqs=8) as s:
        other: dict = {}

        def steady():
            other["r"] = httpx.post(s.url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 40,
                                                                      "temperature": 0}, timeout=TIMEOUT).json()

        thread = threading.Thread(target=steady)
        thread.start()
        with httpx.stream("POST", s.url + "/v1/completions", timeout=TIMEOUT,
                          json={"prompt": [1, 2, 3], "max_tokens": 250, "stream": True}) as r:
            got = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(line)
                if len(got) == 2:
                    break
        thread.join(TIMEOUT)
        assert other["r"]["usage"]["completion_tokens"] == 40 or other["r"]["choices"][0]["finish_reason"] == "stop"
        assert wait_until(lambda: metrics(s)["llmlab_requests_finished_total{finish_reason=abort}"] == 1)
        assert wait_until(lambda: idle_and_clean(s))
        assert metrics(s)["llmlab_generation_tokens_total"] < 250 + 40


def test_a_non_streaming_client_that_leaves_is_aborted(served):
    with Server(served, max_num_seqs=8) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={"prompt": [1], "max_tokens": 255}, timeout=0.3)
        assert wait_until(lambda: metrics(s)["llmlab_requests_finished_total{finish_reason=abort}"] == 1)
        assert wait_until(lambda: idle_and_clean(s))


def test_stopping_the_server_ends_a_stream_in_flight(served):
    s = Server(served, max_num_seqs=8).start()
    seen: queue.Queue = queue.Queue()

    def read():
        try:
            with httpx.stream("POST", s.url + "/v1/completions", timeout=TIMEOUT,
                              json={"prompt": [1, 2], "max_tokens": 250, "stream": True}) as r:
                for line in r.iter_lines():
                    seen.put(line)
            seen.put("<closed>")
        except httpx.HTTPError as err:
            seen.put(f"<{type(err).__name__}>")

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert seen.get(timeout=TIMEOUT).startswith("data: ")
    start = time.monotonic()
    s.stop()
    assert time.monotonic() - start < 4.5  # under uvicorn's 5 s graceful wait: the stream was ended, not waited for
    thread.join(10)
    assert not thread.is_alive()
    lines = []
    while not seen.empty():
        lines.append(seen.get())
    assert lines[-1] in ("<closed>", "<RemoteProtocolError>", "<ReadError>")
    assert "data: [DONE]" not in lines  # the reply did not pretend to be complete
    assert any('"error"' in line for line in lines) or lines[-1] != "<closed>"
    assert not s.engine_loop.running and s.engine.is_idle_and_clean()


# --- keys and bad requests ---------------------------------------------------------------------


def test_api_key(served):
    with Server(served, api_key="sekrit", max_num_seqs=4) as s:
        assert httpx.get(s.url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            r = httpx.get(s.url + "/v1/models", headers=headers, timeout=TIMEOUT)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert "Authorization: Bearer" in r.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").completions.create(model=s.model_name, prompt="A", max_tokens=2)
        ok = client(s, "sekrit").completions.create(model=s.model_name, prompt="A", max_tokens=2)
        assert ok.usage.completion_tokens >= 1
        models = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sekrit"}, timeout=TIMEOUT).json()
        assert models["object"] == "list" and models["data"][0]["id"] == s.model_name


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"model": "gpt-4", "prompt": "A"}, "model", "llmlab-course-tiny"),
        ({"prompt": "A", "n": 2}, "n", "n=2 is not supported"),
        ({"prompt": "A", "logprobs": 1}, "logprobs", "logprobs=1 is not supported"),
        ({"prompt": "A", "echo": True}, "echo", "echo=True is not supported"),
        ({"prompt": "A", "best_of": 3}, "best_of", "not supported"),
        ({"prompt": "A " * 400}, "prompt", "context is 256"),
        ({"prompt": ""}, "prompt", "prompt is empty"),
        ({"prompt": []}, "prompt", "prompt is empty"),
        ({"prompt": [5, 99999]}, "prompt", "outside the model's vocabulary"),
        ({"prompt": "A", "temperature": -1}, "temperature", "temperature must be ≥ 0"),
        ({"prompt": "A", "top_p": 1.5}, "top_p", "top_p must be in (0, 1]"),
        ({"prompt": "A", "max_tokens": 0}, "max_tokens", "max_tokens must be ≥ 1"),
        ({"prompt": "A", "max_tokens": "ten"}, "max_tokens", "max_tokens"),
        ({"prompt": {"text": "A"}}, "prompt", "string or a list of token ids"),
        ({}, "prompt", "required"),
    ],
)
def test_bad_requests_are_400_in_openai_format(server, body, param, message):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert message in error["message"]


def test_malformed_json_is_400(server):
    for content, headers in ((b'{"prompt": "A",', {"Content-Type": "application/json"}), (b"[1, 2]", {})):
        r = httpx.post(server.url + "/v1/completions", content=content, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert "not valid JSON" in httpx.post(server.url + "/v1/completions", content=b"{", timeout=TIMEOUT,
                                          headers={"Content-Type": "application/json"}).json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="n=3 is not supported"):
        client(server).completions.create(model=server.model_name, prompt="A", n=3)


# --- the command line --------------------------------------------------------------------------


def test_serve_help_lists_the_options(capsys):
    from llmlab.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--checkpoint", "--dtype", "--tp", "--host", "--port", "--api-key",
                   "--max-num-seqs", "--block-size", "--served-model-name"):
        assert option in out


def test_serve_refuses_tp_and_bench_forwards(capsys, monkeypatch):
    from llmlab import bench
    from llmlab.__main__ import main

    assert main(["serve", "--tp", "2"]) == 2
    assert "--tp 2" in capsys.readouterr().err
    got = []
    monkeypatch.setattr(bench, "main", lambda argv: got.append(argv))
    assert main(["bench", "serve", "--requests", "3"]) == 0 and got == [["serve", "--requests", "3"]]


def test_serve_command_answers_and_stops_on_sigint():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLMLAB_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", "--port", "0", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
        first = lines.get(timeout=90)
        url = re.search(r"http://127\.0\.0\.1:\d+", first).group(0)
        assert "curl" in lines.get(timeout=10)
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
        auth = {"Authorization": "Bearer k"}
        r = httpx.post(url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5}, headers=auth,
                       timeout=TIMEOUT)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.post(url + "/v1/completions", json={"prompt": "A"}, timeout=TIMEOUT).status_code == 401
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert status in (0, 130), stderr
    assert "Traceback" not in stderr


def test_idle_callback_runs_only_while_idle(served):
    """A tensor-parallel server's heartbeat: on the engine thread, every idle_interval without a step."""
    from llmlab.serve import EngineLoop

    engine = Engine(served.model, max_num_seqs=4)
    calls: list[float] = []
    loop = EngineLoop(engine, on_idle=lambda: calls.append(time.monotonic()), idle_interval=0.05)
    loop.start()
    try:
        assert wait_until(lambda: len(calls) >= 3, 10)
        assert loop.call(lambda e: threading.current_thread().name) == "llmlab-engine"
    finally:
        loop.stop()
    assert not loop.running and len(calls) < 200  # no busy spin


def test_the_listening_socket_is_tcp_so_that_asyncio_turns_nagle_off():
    """asyncio sets TCP_NODELAY only on connections accepted from a socket made with IPPROTO_TCP; with Nagle
    on, every small SSE chunk on a kept-alive connection waited ~40 ms for the client's delayed ACK."""
    import socket

    from llmlab.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()

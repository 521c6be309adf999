"""Serving metrics and the HTTP load generator: TTFT, TPOT, ITL, goodput, MBU and MFU.

Taught in notebook 15 (serving and its metrics).  A client that streams a
completion sees four kinds of moment, and every serving metric is built from
them:

    send ──── TTFT ────▶ first token ─ ITL ─▶ token ─ ITL ─▶ … ─▶ last token ──▶ end
    └──────────────────────────── end-to-end latency ──────────────────────────────┘

- **TTFT** (time to first token) = first token − send: queueing + prefill + the wire.
- **ITL** (inter-token latency) = every gap between two consecutive token arrivals.
- **TPOT** (time per output token) = (end − first token) / (output tokens − 1):
  one request's mean decode pace, the ITLs averaged.
- **Goodput** = requests per second that finish *within the SLO* (TTFT and TPOT both
  under their limits); throughput counts every request, goodput only the useful ones.
- **MBU** (model bandwidth utilisation) = bytes read per token × tokens/s ÷ peak bandwidth;
  **MFU** (model FLOPs utilisation) = FLOPs per token × tokens/s ÷ peak FLOP/s.

:func:`run_load` drives an OpenAI-compatible server (``llmlab serve``) with a seeded
request mix — Poisson arrivals at a rate, or a fixed number of concurrent clients —
streaming every response and timestamping every chunk; :func:`summarize` and
:func:`summary_table` turn the records into the numbers above.  ``python -m llmlab.bench
serve --url URL`` is the command line.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import random
import statistics
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

QUANTILES = (50, 90, 99)
"""The percentiles every summary reports (p50, p90, p99)."""


# --- one request's clock -----------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What a streaming client saw of one request, as ``time.perf_counter()`` seconds (notebook 15).

    ``token_times`` holds the arrival of every chunk that carried output; ``output_tokens`` is the
    server's count when it reports one (``usage.completion_tokens``), else the number of such chunks.
    ``error`` is None for a request that completed, else what went wrong.
    """

    send_time: float
    prompt_tokens: int
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    end_time: float | None = None
    output_tokens: int = 0
    error: str | None = None
    finish_reason: str | None = None
    wire_bytes: int = 0
    """Bytes of the response body as they came off the socket (the SSE stream, every ``data:`` line)."""

    @property
    def ok(self) -> bool:
        """Completed without error, with at least one output token and an end time."""
        return self.error is None and self.end_time is not None and self.first_token_time is not None

    @property
    def ttft(self) -> float | None:
        """Time to first token: send → first output chunk (seconds)."""
        return None if self.first_token_time is None else self.first_token_time - self.send_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (end − first token) / (output tokens − 1); None for < 2 tokens."""
        if self.first_token_time is None or self.end_time is None or self.output_tokens < 2:
            return None
        return (self.end_time - self.first_token_time) / (self.output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies: every gap between consecutive output chunks (seconds)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def e2e(self) -> float | None:
        """End-to-end latency: send → end of the response (seconds)."""
        return None if self.end_time is None else self.end_time - self.send_time


# --- statistics ----------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0–100) of ``values``; NaN when there are none.

    Linear interpolation between the closest ranks, numpy's default method: sort the n values,
    take rank r = (n − 1) × q / 100, and go the fraction r − ⌊r⌋ of the way from the value at
    ⌊r⌋ to the next.  p50 of [1, 2, 3, 4] is 2.5; p90 of 0, 1, …, 100 is 90.
    """
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be between 0 and 100, got {q}.")
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentiles(values: Iterable[float], quantiles: Sequence[float] = QUANTILES) -> dict[float, float]:
    """``{q: percentile(values, q)}`` for each of ``quantiles`` (p50, p90, p99 by default)."""
    values = list(values)
    return {q: percentile(values, q) for q in quantiles}


@dataclass(frozen=True)
class SLO:
    """A service-level objective: the slowest TTFT and TPOT a request may see and still count (seconds).

    FACTS' example, the default: TTFT ≤ 200 ms and TPOT ≤ 100 ms.
    """

    ttft: float = 0.2
    tpot: float = 0.1

    def met_by(self, record: RequestRecord) -> bool:
        """True when ``record`` completed with TTFT ≤ ``ttft`` and TPOT ≤ ``tpot``.

        A request with one output token has no TPOT, so only its TTFT is judged.
        """
        if not record.ok or record.ttft > self.ttft:
            return False
        return record.tpot is None or record.tpot <= self.tpot


def duration(records: Sequence[RequestRecord]) -> float:
    """Seconds from the first send to the last end: the window throughputs divide by (0 when none ended)."""
    ends = [r.end_time for r in records if r.end_time is not None]
    if not records or not ends:
        return 0.0
    return max(ends) - min(r.send_time for r in records)


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def goodput(records: Sequence[RequestRecord], slo: SLO, seconds: float | None = None) -> float:
    """Requests per second that met ``slo`` over ``seconds`` (default: :func:`duration` of the records).

    FACTS: 100 requests in a minute, 30 of them within TTFT ≤ 200 ms and TPOT ≤ 100 ms →
    0.5 requests/s = 30 RPM, whatever the other 70 did.
    """
    seconds = duration(records) if seconds is None else seconds
    return _rate(sum(slo.met_by(r) for r in records), seconds)


def goodput_fraction(records: Sequence[RequestRecord], slo: SLO) -> float:
    """The fraction of requests (failed ones included) that met ``slo``; NaN when there are none."""
    return _rate(sum(slo.met_by(r) for r in records), len(records))


@dataclass
class Summary:
    """The numbers of one load test (notebook 15): counts, throughputs, goodput and latency percentiles.

    Latencies are in seconds, ``{50: p50, 90: p90, 99: p99}``; ITL pools every gap of every request.
    """

    requests: int
    completed: int
    failed: int
    seconds: float
    prompt_tokens: int
    output_tokens: int
    request_throughput: float
    output_throughput: float
    total_throughput: float
    goodput: float
    goodput_fraction: float
    slo: SLO
    ttft: dict[float, float]
    tpot: dict[float, float]
    itl: dict[float, float]
    e2e: dict[float, float]


def summarize(records: Sequence[RequestRecord], slo: SLO = SLO(), seconds: float | None = None) -> Summary:
    """Every metric of a load test from its records; throughputs count completed requests only.

    - request throughput = completed requests / s; output token throughput = output tokens / s;
      total token throughput = (prompt + output tokens) / s — over ``seconds`` (default
      :func:`duration`: first send → last end);
    - goodput = requests meeting ``slo`` / s, and the fraction of all requests that did.
    """
    seconds = duration(records) if seconds is None else seconds
    done = [r for r in records if r.ok]
    prompt = sum(r.prompt_tokens for r in done)
    output = sum(r.output_tokens for r in done)
    return Summary(
        requests=len(records), completed=len(done), failed=len(records) - len(done), seconds=seconds,
        prompt_tokens=prompt, output_tokens=output,
        request_throughput=_rate(len(done), seconds), output_throughput=_rate(output, seconds),
        total_throughput=_rate(prompt + output, seconds),
        goodput=goodput(records, slo, seconds), goodput_fraction=goodput_fraction(records, slo), slo=slo,
        ttft=percentiles(r.ttft for r in done),
        tpot=percentiles(r.tpot for r in done if r.tpot is not None),
        itl=percentiles(gap for r in done for gap in r.itl),
        e2e=percentiles(r.e2e for r in done),
    )


def summary_table(summary: Summary) -> str:
    """A printable table of :class:`Summary`: counts, throughputs, goodput, then latency p50/p90/p99 in ms."""
    s = summary
    lines = [
        f"requests: {s.completed} completed, {s.failed} failed, in {s.seconds:.2f} s "
        f"({s.prompt_tokens:,} prompt + {s.output_tokens:,} output tokens)",
        f"throughput: {s.request_throughput:.2f} requests/s, {s.output_throughput:.1f} output tokens/s, "
        f"{s.total_throughput:.1f} total tokens/s",
        f"goodput (TTFT ≤ {s.slo.ttft * 1e3:g} ms and TPOT ≤ {s.slo.tpot * 1e3:g} ms): "
        f"{s.goodput:.2f} requests/s = {s.goodput * 60:.1f} RPM, {s.goodput_fraction:.0%} of requests",
        f"{'latency (ms)':<14}" + "".join(f"{f'p{q:g}':>10}" for q in QUANTILES),
    ]
    for name, values in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("end-to-end", s.e2e)):
        lines.append(f"{name:<14}" + "".join(f"{values[q] * 1e3:>10.1f}" for q in QUANTILES))
    return "\n".join(lines)


# --- hardware utilisation --------------------------------------------------------------------------


def mbu(bytes_per_token: float, tokens_per_second: float, bandwidth: float) -> float:
    """Model bandwidth utilisation: bytes read per token × tokens/s ÷ peak bytes/s (notebook 15).

    FACTS: 7B parameters × 2 bytes × 100 tokens/s = 1.4 TB/s, which is 0.70 of a 2 TB/s A100.
    """
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0 bytes per second, got {bandwidth}.")
    return bytes_per_token * tokens_per_second / bandwidth


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: FLOPs per token × tokens/s ÷ peak FLOP/s (notebook 15); 0.5 and up is good."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0 FLOP/s, got {peak_flops}.")
    return flops_per_token * tokens_per_second / peak_flops


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first touches of the memory, allocator, thread pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_copy_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 7, device: str = "cpu") -> float:
    """This machine's memory bandwidth as seen by a tensor copy, in bytes per second (median of ``repeats``).

    ``dst.copy_(src)`` of two ``n_bytes`` float32 tensors: it **reads** ``n_bytes`` and **writes**
    ``n_bytes``, and both are counted, so the figure is 2 × ``n_bytes`` ÷ seconds — the same way
    vendors quote a memory's bandwidth.  A decode step mostly reads; reading alone can run faster.
    Pick ``n_bytes`` well above the last-level cache (the default, 256 MiB, is).
    """
    import torch

    n = max(1, n_bytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        if dst.is_cuda:
            torch.cuda.synchronize()

    return 2 * n * 4 / _median_seconds(copy, repeats)


def measure_read_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 7, device: str = "cpu") -> float:
    """Bytes per second this machine *reads*, as a sum over ``n_bytes`` of float32 sees it (median of ``repeats``).

    A decode step reads every weight once and writes almost nothing, so this — not a copy, which
    also writes — is the rate its roofline divides by (notebook 16).  Pick ``n_bytes`` well above
    the last-level cache (the default, 256 MiB, is).
    """
    import torch

    src = torch.ones(max(1, n_bytes // 4), dtype=torch.float32, device=device)

    def read():
        src.sum()
        if src.is_cuda:
            torch.cuda.synchronize()

    return src.numel() * 4 / _median_seconds(read, repeats)


def measure_matmul_flops(n: int = 1024, repeats: int = 5, device: str = "cpu", dtype: str = "float32") -> float:
    """FLOP/s of one ``n × n`` by ``n × n`` matrix product here (2·n³ FLOPs, median of ``repeats``).

    A measured stand-in for "peak FLOP/s" on a machine without a published figure: a large matmul is
    about the fastest arithmetic a framework does, so it is a fair ceiling for MFU.
    """
    import torch

    kind = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(kind)
    b = torch.randn(n, n, device=device).to(kind)

    def product():
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()

    return 2 * n**3 / _median_seconds(product, repeats)


# --- the load generator -----------------------------------------------------------------------------


class LoadRequest(Protocol):
    """What the load generator needs of a request (``llmlab.bench.ServeRequest`` has it)."""

    prompt_ids: list[int]
    max_new_tokens: int


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (seconds after the start) of ``n`` requests arriving as a Poisson process at ``rate``/s.

    The gaps are independent exponential draws of mean 1/``rate`` from ``random.Random(seed)``;
    the first request leaves at t = 0.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests per second, got {rate}.")
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def completion_payload(request: LoadRequest, model: str, stream: bool = True) -> dict:
    """The ``/v1/completions`` body for one request: prompt as token ids, greedy, ``max_tokens``, streamed.

    Only OpenAI fields: ``prompt`` may be a list of token ids, so the prompt length is exact; the
    output may end early on a stop token (``finish_reason`` "stop") and is counted as it came.
    ``stream_options.include_usage`` asks for the server's token counts in a last chunk.
    """
    body = {"model": model, "prompt": list(request.prompt_ids), "max_tokens": request.max_new_tokens,
            "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def sse_events(lines: Iterable[str]) -> Iterable[dict | None]:
    """The JSON payloads of a server-sent-event stream's ``data:`` lines; None for ``data: [DONE]``."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        data = line[5:].strip()
        yield None if data == "[DONE]" else json.loads(data)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _read_event(record: RequestRecord, event: dict, now: float) -> None:
    """Update ``record`` with one streamed chunk: a token arrival, a finish reason, the usage counts.

    A chunk with text is an arrival; so is the last one (it has a finish reason), even with no text:
    it brings the token that ended the reply, such as the end-of-text token, whose text is not sent.
    An ``error`` event (the server gave up on the request mid-stream) marks the record failed.
    """
    if event.get("error"):
        detail = event["error"]
        record.error = f"error event: {detail.get('message', detail) if isinstance(detail, dict) else detail}"
    for choice in event.get("choices") or []:
        if choice.get("text") or choice.get("finish_reason"):
            if record.first_token_time is None:
                record.first_token_time = now
            record.token_times.append(now)
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
    usage = event.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        record.output_tokens = int(usage["completion_tokens"])


async def stream_completion(client, url: str, request: LoadRequest, model: str,
                            api_key: str | None = None) -> RequestRecord:
    """Send one streamed completion to ``url`` (``…/v1/completions``) and time every chunk (notebook 15).

    Never raises for what the server or the network did: a failed request comes back with ``error``
    set, so that a load test counts it.
    """
    record = RequestRecord(send_time=time.perf_counter(), prompt_tokens=len(request.prompt_ids))
    usage_seen = False
    try:
        async with client.stream("POST", url, json=completion_payload(request, model),
                                 headers=_headers(api_key)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {response.status_code}: {body[:200]}"
                return record
            buffer, decoder = "", codecs.getincrementaldecoder("utf-8")()
            async for chunk in response.aiter_bytes():
                now = time.perf_counter()
                record.wire_bytes += len(chunk)
                buffer += decoder.decode(chunk)
                *complete, buffer = buffer.split("\n")
                for event in sse_events(complete):
                    if event is None:
                        continue
                    usage_seen = usage_seen or bool(event.get("usage"))
                    _read_event(record, event, now)
        record.end_time = time.perf_counter()
        if not usage_seen:
            record.output_tokens = len(record.token_times)
        if record.first_token_time is None:
            record.error = "no output token in the stream"
    except Exception as err:  # timeouts, refused connections, broken streams: recorded, not raised
        record.error = f"{type(err).__name__}: {err}"
    return record


def list_models(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> list[dict]:
    """The models a server lists at ``GET /v1/models`` (``id``, and ``max_model_len`` where it says);
    raises ``httpx.HTTPError`` when the server cannot be reached or refuses."""
    import httpx

    response = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=_headers(api_key), timeout=timeout)
    response.raise_for_status()
    return response.json()["data"]


async def run_load_async(base_url: str, requests: Sequence[LoadRequest], *, rate: float | None = None,
                         concurrency: int | None = None, seed: int = 0, model: str | None = None,
                         api_key: str | None = None, timeout: float = 60.0) -> list[RequestRecord]:
    """:func:`run_load` as a coroutine (for code that already runs an event loop)."""
    import httpx

    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of rate (Poisson arrivals per second) or concurrency (clients).")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be ≥ 1, got {concurrency}.")
    base = base_url.rstrip("/")
    url = f"{base}/v1/completions"
    limits = httpx.Limits(max_connections=max(concurrency or 0, len(requests), 1))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if model is None:
            response = await client.get(f"{base}/v1/models", headers=_headers(api_key))
            response.raise_for_status()
            model = response.json()["data"][0]["id"]
        records: list[RequestRecord | None] = [None] * len(requests)

        async def one(i: int) -> None:
            records[i] = await stream_completion(client, url, requests[i], model, api_key)

        if rate is not None:
            start = time.perf_counter()

            async def at(i: int, when: float) -> None:
                await asyncio.sleep(max(0.0, start + when - time.perf_counter()))
                await one(i)

            await asyncio.gather(*(at(i, t) for i, t in enumerate(poisson_arrivals(len(requests), rate, seed))))
        else:
            queue = iter(range(len(requests)))

            async def client_loop() -> None:
                for i in queue:  # each client takes the next request as soon as its last one ends
                    await one(i)

            await asyncio.gather(*(client_loop() for _ in range(min(concurrency, len(requests)))))
    return records


def run_load(base_url: str, requests: Sequence[LoadRequest], *, rate: float | None = None,
             concurrency: int | None = None, seed: int = 0, model: str | None = None,
             api_key: str | None = None, timeout: float = 60.0) -> list[RequestRecord]:
    """Drive an OpenAI-compatible server with ``requests`` and return one timing record each, in order.

    - ``rate``: Poisson arrivals, ``rate`` requests per second on average (seeded exponential gaps),
      each sent whether or not earlier ones finished — an open loop, like real users;
    - ``concurrency``: that many clients, each sending its next request when its last one ends — a
      closed loop, which never lets the queue grow past ``concurrency``.

    Every request streams (``stream: true``); ``timeout`` bounds each read and connection, in
    seconds.  ``model`` defaults to the first of ``GET /v1/models``.  Safe to call from a notebook
    (whose event loop is already running): it then runs in a helper thread.
    Taught in notebook 15 (serving and its metrics).
    """
    coroutine = run_load_async(base_url, requests, rate=rate, concurrency=concurrency, seed=seed, model=model,
                               api_key=api_key, timeout=timeout)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    result: dict[str, object] = {}

    def worker() -> None:
        try:
            result["records"] = asyncio.run(coroutine)
        except BaseException as err:  # re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=worker, name="llmlab-loadgen")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["records"]

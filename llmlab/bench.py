"""Benchmarks that print figures (never timed tests): ``python -m llmlab.bench NAME``.

Each benchmark reports ratios against a baseline measured in the same run, so
the numbers compare across machines.  ``tokenizer`` is discussed in notebook 01, ``decode`` in
notebook 09; ``compare`` (llmlab vs ``transformers`` on the same weights, the roofline) in notebook 16 (making it fast);
``serve`` (the engine's continuous batching vs static batches vs ``transformers``'
``generate``, on the same weights) belongs to notebooks 11 and 14; ``serve --url URL`` load-tests a
running server over HTTP (TTFT, TPOT, ITL, throughput, goodput: notebook 15).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmlab.metrics import percentile  # one definition, shared with the HTTP load test (notebook 15)

BENCHMARKS: dict[str, Callable[[argparse.Namespace], None]] = {}


def benchmark(name: str):
    """Register a benchmark under ``name`` (the command line's choice)."""

    def register(fn: Callable[[argparse.Namespace], None]):
        BENCHMARKS[name] = fn
        return fn

    return register


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


@benchmark("tokenizer")
def bench_tokenizer(args: argparse.Namespace) -> None:
    """BPE training time to 1,024 ids on tiny Shakespeare; encode MB/s, ours vs tiktoken."""
    from llmlab.data import load_corpus
    from llmlab.tokenizer import BPETokenizer, gpt2_tokenizer

    text = load_corpus()
    mb = len(text.encode("utf-8")) / 1e6
    train_s, tok = timed(lambda: BPETokenizer.train(text, args.vocab_size))
    print(f"corpus: tiny Shakespeare, {mb:.2f} MB")
    print(f"BPE training to {args.vocab_size} ids: {train_s:.1f} s   (target ≤ 30 s on 2 CPU cores)")

    rows = [("course BPE", tok)]
    try:
        rows.append(("GPT-2 r50k_base", gpt2_tokenizer()))
    except Exception as err:  # offline with no cached vocabulary
        print(f"(GPT-2 vocabulary skipped: {str(err).splitlines()[0]})")
    print(f"\n{'vocabulary':<18}{'encoder':<22}{'MB/s':>9}{'× ours (cold)':>15}")
    for label, t in rows:
        fresh = BPETokenizer(t.ranks, t.special_tokens, t.pattern, t.name)  # empty piece cache
        cold_s, ids = timed(lambda: fresh.encode_ordinary(text))
        warm_s, _ = timed(lambda: fresh.encode_ordinary(text), repeat=args.repeat)
        enc = t.to_tiktoken()
        tik_s, tik_ids = timed(lambda: enc.encode_ordinary(text), repeat=args.repeat)
        assert tik_ids == ids, "tiktoken export and llmlab disagree"
        for name, seconds in (("llmlab (cold cache)", cold_s), ("llmlab (warm cache)", warm_s), ("tiktoken export", tik_s)):
            print(f"{label:<18}{name:<22}{mb / seconds:>9.1f}{cold_s / seconds:>15.1f}")


@benchmark("decode")
def bench_decode(args: argparse.Namespace) -> None:
    """Greedy decoding tokens/s without the KV cache, with it, and with the compiled step (notebook 09)."""
    import torch

    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        _decode_table(args)


def _decode_table(args: argparse.Namespace) -> None:
    """One table of :func:`bench_decode` at the current thread count."""
    import torch

    from llmlab import calc
    from llmlab.config import get_config
    from llmlab.compiled import CompileError
    from llmlab.generate import generate_many
    from llmlab.model import Transformer
    from llmlab.sampling import SamplingParams

    prompt_len, lengths = 16, args.lengths
    # Speed does not depend on the weights, so random weights serve; the context is
    # stretched so that the longest run fits without sliding (architecture otherwise as the preset).
    models = [("course-tiny", "course-tiny"), ("GPT-2-124M-shaped", "gpt2-124m")]
    print(f"\ngreedy decoding of one sequence after a {prompt_len}-token prompt, random weights, fp32, "
          f"{torch.get_num_threads()} CPU thread(s)")
    print(f"{'model':<19}{'new tokens':>11}{'no cache':>10}{'cache':>9}{'compiled':>10}"
          f"{'speed-up':>10}{'compiled':>10}{'cache bytes':>13}")
    print(f"{'':<19}{'':>11}{'tok/s':>10}{'tok/s':>9}{'tok/s':>10}{'(cache)':>10}{'speed-up':>10}")
    notes = []
    for label, preset in models:
        config = get_config(preset).replace(context_length=max(prompt_len + max(lengths), get_config(preset).context_length))
        torch.manual_seed(0)
        model = Transformer(config).eval()
        prompt = torch.randint(0, config.vocab_size, (prompt_len,)).tolist()

        def run(n: int, use_cache: bool = True, compiled: bool = False) -> list[list[int]]:
            params = SamplingParams(temperature=0, max_new_tokens=n)
            return generate_many(model, [prompt], params, use_cache=use_cache, compiled=compiled)

        for use_cache in (True, False):  # warm-up: first calls pay one-time allocation costs
            run(4, use_cache)
        compiled_ok = not args.no_compile
        for n in lengths:
            cached_s, cached = timed(lambda: run(n))
            compiled_s = None
            if compiled_ok:
                try:
                    compile_s, _ = timed(lambda: run(n, compiled=True))  # each cache size compiles once
                    compiled_s, compiled = timed(lambda: run(n, compiled=True))
                    assert compiled == cached, "compiled and eager cached generations differ"
                    notes.append(f"{label}, {n} tokens: first compiled run {compile_s:.1f} s (compiling included)")
                except CompileError as err:
                    notes.append(f"compiled step unavailable: {err}")
                    compiled_ok = False
            cache_bytes = calc.kv_cache_bytes(config, 1, prompt_len + n, "fp32")
            compiled_col = f"{n / compiled_s:>10.1f}" if compiled_s else f"{'—':>10}"
            estimate = _no_cache_estimate(model, prompt_len, n)
            if estimate > args.budget:
                print(f"{label:<19}{n:>11}{'skipped':>10}{n / cached_s:>9.1f}{compiled_col}{'':>10}{'':>10}"
                      f"{calc.human_bytes(cache_bytes):>13}")
                notes.append(f"{label}, {n} tokens: no-cache run skipped (estimated {estimate / 60:.0f} min > --budget)")
                continue
            plain_s, plain = timed(lambda: run(n, use_cache=False))
            assert plain == cached, "cache and no-cache generations differ"
            compiled_gain = f"{plain_s / compiled_s:>9.1f}×" if compiled_s else f"{'—':>10}"
            print(f"{label:<19}{n:>11}{n / plain_s:>10.1f}{n / cached_s:>9.1f}{compiled_col}"
                  f"{plain_s / cached_s:>9.1f}×{compiled_gain}{calc.human_bytes(cache_bytes):>13}")
        notes.append(_bandwidth_floor(label, model))
    for note in notes:
        print("  " + note)


def weight_read_seconds(model) -> float:
    """Seconds this machine takes to stream ``model``'s weights once: a decode step's floor (notebook 09).

    Measured as one matrix-vector product over a matrix as large as all the
    weights; a single-sequence decode step reads every weight once, so it
    cannot be faster than this.
    """
    import torch

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    matrix = torch.randn(max(1, weights // 4 // 256), 256)
    vector = torch.randn(256)
    seconds, _ = timed(lambda: matrix @ vector, repeat=20)
    return seconds


def _bandwidth_floor(label: str, model) -> str:
    """A line on the fastest a decode step can be here: weight bytes at this machine's streaming rate."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    seconds = weight_read_seconds(model)
    return (f"{label}: a decode step reads {weights / 1e6:.1f} MB of weights; one matrix-vector product of "
            f"that size streams at {weights / seconds / 1e9:.0f} GB/s here, so no step can beat "
            f"{seconds * 1e3:.2f} ms ({1 / seconds:.0f} tok/s)")


def _no_cache_estimate(model, prompt_len: int, n: int) -> float:
    """Seconds that ``n`` uncached steps would take, from one timed forward pass at the mean length."""
    import torch

    mean_len = prompt_len + n // 2
    ids = torch.zeros(1, mean_len, dtype=torch.long)
    with torch.no_grad():
        model(ids)
        seconds, _ = timed(lambda: model(ids))
    return seconds * n


# --- serve: continuous batching vs static batching vs transformers ------------------------------

SERVE_MODELS = ("course-tiny", "gpt2-124m")
"""Models ``serve`` can run: the course model, and a GPT-2-124M whose weights ``transformers`` initialized."""

SERVE_TARGET = 3.0
"""The issue's goal: the engine's output tokens/s at least this many times transformers' padded batching."""


@dataclass(frozen=True)
class ServeRequest:
    """One request of the serve workload: prompt ids and how many tokens it asks for (greedy, no stop ids)."""

    prompt_ids: list[int]
    max_new_tokens: int


@dataclass
class ServeResult:
    """What one serving method did with a workload: wall time, tokens per request, engine latencies."""

    method: str
    seconds: float
    produced: list[int]
    """Tokens each request actually got (static batches run every row to the batch's longest request)."""
    requested: list[int]
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    cpu_seconds: float = 0.0
    """CPU time of this process (``time.process_time``): on a shared machine, less disturbed by other
    processes than the wall time — with one thread it is the time the run actually held a core."""

    @property
    def counted(self) -> list[int]:
        """Tokens counted as output: what each request asked for, and no more."""
        return [min(p, r) for p, r in zip(self.produced, self.requested)]

    @property
    def output_tokens(self) -> int:
        return sum(self.counted)

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def tokens_per_cpu_second(self) -> float:
        return self.output_tokens / self.cpu_seconds if self.cpu_seconds > 0 else float("inf")


def serve_lengths(context_length: int, prompt_range: tuple[int, int] = (16, 256),
                  output_range: tuple[int, int] = (16, 256)) -> tuple[tuple[int, int], tuple[int, int]]:
    """Prompt and output length ranges; when the longest prompt + output would not fit the context, both are
    capped at half the context (course-tiny, context 256: 16–128 and 16–128)."""
    if prompt_range[1] + output_range[1] <= context_length:
        return prompt_range, output_range
    half = context_length // 2
    return (min(prompt_range[0], half), min(prompt_range[1], half)), (min(output_range[0], half),
                                                                      min(output_range[1], half))


def serve_workload(n_requests: int, seed: int, vocab_size: int, prompt_range: tuple[int, int] = (16, 256),
                   output_range: tuple[int, int] = (16, 256)) -> list[ServeRequest]:
    """``n_requests`` seeded requests, all arriving at t=0: random prompt ids, lengths uniform in the ranges."""
    import random

    rng = random.Random(seed)
    return [ServeRequest([rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_range))],
                         rng.randint(*output_range)) for _ in range(n_requests)]


def _batches(workload: list[ServeRequest], batch: int) -> list[list[ServeRequest]]:
    """Fixed batches of ``batch`` requests in arrival order (the last may be smaller)."""
    return [workload[i:i + batch] for i in range(0, len(workload), batch)]


def serve_engine(model, workload: list[ServeRequest], **engine_options) -> ServeResult:
    """Every request into one :class:`llmlab.engine.Engine` at t=0, stepped until all finish."""
    from llmlab.engine import Engine
    from llmlab.sampling import SamplingParams

    engine = Engine(model, **engine_options)
    cpu, start = time.process_time(), time.perf_counter()
    ids = [engine.add_request(r.prompt_ids, SamplingParams(temperature=0, max_new_tokens=r.max_new_tokens),
                              arrival_time=start) for r in workload]
    seqs = [engine.requests[i] for i in ids]
    engine.run_to_completion()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return ServeResult("engine", seconds, [len(s.output_ids) for s in seqs], [r.max_new_tokens for r in workload],
                       ttft=[s.ttft for s in seqs if s.ttft is not None],
                       tpot=[s.tpot for s in seqs if s.tpot is not None], stats=engine.stats(), cpu_seconds=cpu)


def serve_static(model, workload: list[ServeRequest], batch: int = 16) -> ServeResult:
    """Static batching with llmlab's generator: fixed left-padded batches, each run to its longest request."""
    from llmlab.generate import generate_many
    from llmlab.sampling import SamplingParams

    produced = []
    cpu, start = time.process_time(), time.perf_counter()
    for group in _batches(workload, batch):
        params = SamplingParams(temperature=0, max_new_tokens=max(r.max_new_tokens for r in group))
        produced += [len(out) for out in generate_many(model, [r.prompt_ids for r in group], params)]
    return ServeResult("static", time.perf_counter() - start, produced, [r.max_new_tokens for r in workload],
                       cpu_seconds=time.process_time() - cpu)


def serve_transformers(hf_model, workload: list[ServeRequest], batch: int = 16, pad_token_id: int = 0) -> ServeResult:
    """``transformers``' ``generate`` on the same weights: fixed left-padded batches, greedy, each batch run to its
    longest request (``min_new_tokens`` = ``max_new_tokens``, so nothing stops early)."""
    import torch

    produced = []
    cpu, start = time.process_time(), time.perf_counter()
    with torch.no_grad():
        for group in _batches(workload, batch):
            longest = max(len(r.prompt_ids) for r in group)
            ids = torch.full((len(group), longest), pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, r in enumerate(group):
                ids[row, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
                mask[row, longest - len(r.prompt_ids):] = 1
            n = max(r.max_new_tokens for r in group)
            out = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                    min_new_tokens=n, pad_token_id=pad_token_id)
            produced += [out.shape[1] - longest] * len(group)
    return ServeResult("transformers", time.perf_counter() - start, produced, [r.max_new_tokens for r in workload],
                       cpu_seconds=time.process_time() - cpu)


def serve_table(label: str, results: list[ServeResult]) -> str:
    """The printed table of one model: output tokens/s of each method (per wall second and per CPU second),
    the engine's ratio to each, and the engine's TTFT and TPOT percentiles."""
    by = {r.method: r for r in results}
    engine = by.get("engine")
    names = {"engine": "engine (continuous batching)", "static": "static batches (generate_many)",
             "transformers": "transformers generate (padded)"}
    lines = [label,
             f"  {'':<32}{'wall':>8}{'output':>9}{'tok/s':>9}{'engine':>8}{'CPU':>9}{'tok per':>9}{'engine':>8}",
             f"  {'method':<32}{'s':>8}{'tokens':>9}{'(wall)':>9}{'×':>8}{'s':>9}{'CPU s':>9}{'×':>8}"]
    for r in results:
        wall_ratio = cpu_ratio = ""
        if engine is not None and r is not engine:
            wall_ratio = f"{engine.tokens_per_second / r.tokens_per_second:.2f}×"
            cpu_ratio = f"{engine.tokens_per_cpu_second / r.tokens_per_cpu_second:.2f}×"
        lines.append(f"  {names.get(r.method, r.method):<32}{r.seconds:>8.1f}{r.output_tokens:>9,}"
                     f"{r.tokens_per_second:>9.1f}{wall_ratio:>8}{r.cpu_seconds:>9.1f}"
                     f"{r.tokens_per_cpu_second:>9.1f}{cpu_ratio:>8}")
    theirs = by.get("transformers")
    if engine is not None and theirs is not None:
        wall = engine.tokens_per_second / theirs.tokens_per_second
        cpu = engine.tokens_per_cpu_second / theirs.tokens_per_cpu_second
        verdict = "met" if min(wall, cpu) >= SERVE_TARGET else "NOT met"
        lines.append(f"  target engine ≥ {SERVE_TARGET:g}× transformers: {wall:.2f}× (wall), {cpu:.2f}× (CPU) — "
                     f"{verdict}")
    if engine is not None:
        lines.append(f"  engine latency (ms){'p50':>13}{'p90':>9}{'p99':>9}   (from arrival at t=0: queueing included)")
        for name, values in (("TTFT", engine.ttft), ("TPOT", engine.tpot)):
            cells = "".join(f"{percentile(values, q) * 1e3:>9.1f}" for q in (50, 90, 99))
            lines.append(f"  {name:<23}{cells}")
        s = engine.stats
        if s:
            lines.append(f"  engine: {s['steps']} steps, {s['forward_passes']} forward passes, "
                         f"{s['computed_tokens']:,} tokens computed, {s['preemptions']} preemptions, "
                         f"{s['total_blocks']} KV blocks of 16 tokens")
    return "\n".join(lines)


def serve_models(name: str, seed: int = 0):
    """``(llmlab model, transformers model, label)`` holding the same random weights, both float32 and in eval mode.

    ``course-tiny`` is initialized by llmlab and converted to ``transformers``; ``gpt2-124m``
    is initialized by ``transformers`` (``GPT2LMHeadModel(GPT2Config())``) and converted to llmlab.
    """
    import torch
    import transformers

    from llmlab.config import get_config
    from llmlab.hf import from_hf_gpt2, to_hf_gpt2
    from llmlab.model import Transformer

    torch.manual_seed(seed)
    if name == "gpt2-124m":
        hf_config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                            attn_implementation="sdpa", dtype="float32")
        hf = transformers.GPT2LMHeadModel(hf_config).eval()
        return from_hf_gpt2(hf, name="gpt2-124m"), hf, "GPT-2-124M (weights initialized by transformers)"
    config = get_config(name)
    model = Transformer(config).eval()
    return model, to_hf_gpt2(model), f"{name} (weights initialized by llmlab)"


def _serve_estimate(model, workload: list[ServeRequest], batch: int, max_num_seqs: int = 64) -> float:
    """Rough seconds for all three methods, from a timed prefill and timed decode steps of ``model``.

    Static batches prefill ``batch × longest prompt`` tokens and decode ``longest output`` steps at batch size
    ``batch`` (transformers is counted as 1.3× that); the engine prefills the real prompt tokens and decodes
    every output token in steps of up to ``max_num_seqs`` rows.
    """
    import torch

    from llmlab.cache import KVCache

    def decode_step(rows: int, cached: int) -> float:
        cache = KVCache.for_model(model.config, rows, max_len=cached + 1)
        ids = torch.zeros(rows, 1, dtype=torch.long)

        def step():
            cache.length = cached
            return model(ids, cache=cache)

        return timed(step, repeat=3)[0]

    context = model.config.context_length
    with torch.no_grad():
        prompt = torch.zeros(1, min(128, context), dtype=torch.long)
        model(prompt, logits_to_keep=1)
        per_prompt_token = timed(lambda: model(prompt, logits_to_keep=1), repeat=2)[0] / prompt.numel()
        mean_len = min(context - 1, sum(len(r.prompt_ids) + r.max_new_tokens // 2 for r in workload) // len(workload))
        rows = min(max_num_seqs, len(workload))
        static = 0.0
        for group in _batches(workload, batch):
            longest = max(len(r.prompt_ids) for r in group)
            steps = max(r.max_new_tokens for r in group)
            cached = min(context - 1, longest + steps // 2)
            static += len(group) * longest * per_prompt_token + steps * decode_step(len(group), cached)
        engine = (sum(len(r.prompt_ids) for r in workload) * per_prompt_token
                  + sum(r.max_new_tokens for r in workload) * decode_step(rows, mean_len) / rows)
    return engine + 2.3 * static


@benchmark("serve")
def bench_serve(args: argparse.Namespace) -> None:
    """Output tokens/s of the engine vs static batching vs transformers' generate (notebooks 11 and 14);
    with ``--url``, a load test of a running OpenAI-compatible server instead (notebook 15)."""
    import torch

    if args.url:
        _serve_url(args)
        return
    before = torch.get_num_threads()
    try:
        for threads in args.threads or [before]:
            torch.set_num_threads(threads)
            _serve_run(args)
    finally:
        torch.set_num_threads(before)


def _serve_run(args: argparse.Namespace) -> None:
    """Every model of :func:`bench_serve` at the current thread count."""
    import torch

    print(f"\n{args.requests} requests, all arriving at t=0, seed {args.seed}: random prompt ids, prompt and output "
          f"lengths uniform; greedy, no stop ids (each request runs to its length); fp32, "
          f"{torch.get_num_threads()} CPU thread(s).")
    print(f"engine: Engine(block_size=16, max_num_seqs=64, max_num_batched_tokens=512), its KV pool allocated before "
          f"the clock starts; static and transformers: fixed batches of {args.batch} in arrival order, left-padded, "
          "each run to its longest output; only the tokens each request asked for are counted.")
    plans = []
    for name in args.models:  # build everything first, so the estimate comes before any long run
        model, hf, label = serve_models(name, args.seed)
        prompt_range, output_range = serve_lengths(model.config.context_length)
        workload = serve_workload(args.requests, args.seed, model.config.vocab_size, prompt_range, output_range)
        plans.append((name, model, hf, label, workload, prompt_range, output_range,
                      _serve_estimate(model, workload, args.batch)))
    each = ", ".join(f"{p[0]} ~{args.rounds * p[-1] / 60:.1f} min" for p in plans)
    print(f"estimated time: ~{args.rounds * sum(p[-1] for p in plans) / 60:.1f} min in all ({each}; rough, from timed "
          "prefill and decode steps; --requests shrinks it)", flush=True)
    while plans:
        name, model, hf, label, workload, prompt_range, output_range, _ = plans.pop(0)
        capped = (" (capped at half the context each, so that prompt + output fits)"
                  if (prompt_range, output_range) != ((16, 256), (16, 256)) else "")
        print(f"\n{name}: context {model.config.context_length}; prompts {prompt_range[0]}–{prompt_range[1]} tokens, "
              f"outputs {output_range[0]}–{output_range[1]} tokens{capped}; "
              f"{sum(r.max_new_tokens for r in workload):,} output tokens requested", flush=True)
        warm = serve_workload(2, args.seed + 1, model.config.vocab_size, (8, 8), (4, 4))
        serve_engine(model, warm), serve_static(model, warm, args.batch), serve_transformers(hf, warm, args.batch)
        best: dict[str, ServeResult] = {}
        for round_ in range(args.rounds):  # methods interleaved, so a busy spell hits all of them alike
            for method in (lambda: serve_engine(model, workload), lambda: serve_static(model, workload, args.batch),
                           lambda: serve_transformers(hf, workload, args.batch)):
                result = method()
                print(f"  (round {round_ + 1}: {result.method} {result.seconds:.1f} s wall, "
                      f"{result.cpu_seconds:.1f} s CPU)", flush=True)
                if result.method not in best or result.seconds < best[result.method].seconds:
                    best[result.method] = result
        if args.rounds > 1:
            label += f", best of {args.rounds} rounds"
        print(serve_table(label, list(best.values())))
        del model, hf


@benchmark("compare")
def bench_compare(args: argparse.Namespace) -> None:
    """llmlab vs transformers on the same weights: batch-1 decode, the roofline and MBU, batched serving
    (notebook 16); ``--fast`` shrinks everything and only checks that it runs and agrees."""
    from llmlab.compare import run_compare

    if args.fast:
        run_compare(args.compare_models, n_new=8, prompt_len=8, repeats=1, requests=4, seed=args.seed, fast=True)
    else:
        run_compare(args.compare_models, repeats=args.repeat, requests=args.requests, seed=args.seed,
                    serve=not args.no_serve)


URL_PROMPT_IDS = 256
"""Prompt ids of the HTTP load test are drawn below this: every byte-level BPE vocabulary has these ids."""


def _serve_url(args: argparse.Namespace) -> None:
    """``serve --url``: drive a running server with the load generator and print its serving metrics."""
    import httpx

    from llmlab.metrics import SLO, list_models, run_load, summarize, summary_table

    try:
        model = list_models(args.url, args.api_key)[0]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
        raise SystemExit(f"llmlab bench serve: no model listed at {args.url}/v1/models ({type(err).__name__}: {err}). "
                         "Start a server first (llmlab serve --port 8000), check --url, and pass --api-key if it has "
                         "one.") from None
    context = int(model.get("max_model_len") or 256)
    prompt_range, output_range = serve_lengths(context, (16, 128), (16, 128))
    workload = serve_workload(args.requests, args.seed, URL_PROMPT_IDS, prompt_range, output_range)
    mode = (f"concurrency {args.concurrency} (closed loop)" if args.concurrency
            else f"Poisson arrivals at {args.rate:g} requests/s (open loop)")
    print(f"\n{args.url} ({model['id']}, context {context}): {args.requests} streamed completions, seed {args.seed}, "
          f"{mode}; prompts {prompt_range[0]}–{prompt_range[1]} token ids, max_tokens "
          f"{output_range[0]}–{output_range[1]}, greedy", flush=True)
    records = run_load(args.url, workload, rate=None if args.concurrency else args.rate,
                       concurrency=args.concurrency, seed=args.seed, model=model["id"], api_key=args.api_key,
                       timeout=args.timeout)
    print(summary_table(summarize(records, SLO(ttft=args.slo_ttft, tpot=args.slo_tpot))))
    errors = sorted({r.error for r in records if r.error})
    for error in errors[:5]:
        print(f"  error: {error}")


def _positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    """An argparse type: a whole number ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number ≥ 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen benchmark(s)."""
    parser = argparse.ArgumentParser(prog="python -m llmlab.bench", description=__doc__)
    parser.add_argument("name", choices=[*BENCHMARKS, "all"], help="which benchmark to run")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024], help="decode: new tokens")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="decode: skip a no-cache run estimated to take longer than this many seconds")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="decode, serve: CPU thread counts to measure, one table each (default: torch's current)")
    parser.add_argument("--no-compile", action="store_true", help="decode: skip the compiled-step column")
    parser.add_argument("--requests", type=_positive_int, default=64,
                        help="serve: number of requests (all arrive at t=0; with --url, as --rate or "
                             "--concurrency says)")
    parser.add_argument("--seed", type=int, default=0,
                        help="serve: seed of the workload, the random weights and (--url) the arrivals")
    parser.add_argument("--batch", type=_positive_int, default=16,
                        help="serve: batch size of the static and transformers runs")
    parser.add_argument("--models", nargs="+", choices=SERVE_MODELS, default=list(SERVE_MODELS),
                        help="serve: which models to run")
    parser.add_argument("--rounds", type=_positive_int, default=1,
                        help="serve: run every method this many times (interleaved) and keep each one's fastest")
    parser.add_argument("--compare-models", nargs="+", choices=("gpt2-124m", "course"), default=["gpt2-124m", "course"],
                        help="compare: which models (gpt2-124m: weights written by transformers; course: the built-in one)")
    parser.add_argument("--fast", action="store_true", help="compare: tiny sizes, one run each (a smoke test)")
    parser.add_argument("--no-serve", action="store_true",
                        help="compare: batch-1 decode and the roofline only (GPT-2's serving run takes ~10 minutes)")
    parser.add_argument("--url", default=None,
                        help="serve: load-test a running OpenAI-compatible server at this base URL instead "
                             "(e.g. http://127.0.0.1:8000)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=_positive_float, default=4.0,
                      help="serve --url: Poisson arrivals, requests per second (default 4)")
    load.add_argument("--concurrency", type=_positive_int, default=None,
                      help="serve --url: this many clients, each sending its next request when its last ends")
    parser.add_argument("--api-key", default=None, help="serve --url: sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--slo-ttft", type=_positive_float, default=0.2, help="serve --url: SLO on TTFT, seconds")
    parser.add_argument("--slo-tpot", type=_positive_float, default=0.1, help="serve --url: SLO on TPOT, seconds")
    parser.add_argument("--timeout", type=_positive_float, default=60.0,
                        help="serve --url: seconds a connection or read may take before the request counts as failed")
    args = parser.parse_args(argv)
    for name, fn in BENCHMARKS.items():
        if args.name in (name, "all"):
            print(f"== {name} ==")
            fn(args)


if __name__ == "__main__":
    main()

"""Benchmarks that print figures (never timed tests): ``python -m llmlab.bench NAME``.

Each benchmark reports ratios against a baseline measured in the same run, so
the numbers compare across machines.  ``tokenizer`` is discussed in notebook 01.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

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
                        help="decode: CPU thread counts to measure, one table each (default: torch's current)")
    parser.add_argument("--no-compile", action="store_true", help="decode: skip the compiled-step column")
    args = parser.parse_args(argv)
    for name, fn in BENCHMARKS.items():
        if args.name in (name, "all"):
            print(f"== {name} ==")
            fn(args)


if __name__ == "__main__":
    main()

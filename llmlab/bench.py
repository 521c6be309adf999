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


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen benchmark(s)."""
    parser = argparse.ArgumentParser(prog="python -m llmlab.bench", description=__doc__)
    parser.add_argument("name", choices=[*BENCHMARKS, "all"], help="which benchmark to run")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    for name, fn in BENCHMARKS.items():
        if args.name in (name, "all"):
            print(f"== {name} ==")
            fn(args)


if __name__ == "__main__":
    main()

"""llmlab against ``transformers`` on the same weights: decode speed, the roofline, and what each step buys.

Taught in notebook 16 (making it fast); run it as ``python -m llmlab.bench compare``.
Both libraries get **the same weights** — a GPT-2-124M-shaped checkpoint written by
``transformers`` and read back by notebook 14's importer, or the built-in course model
converted the other way — and run in one process, their runs alternating so that a
busy spell of a shared machine slows them alike.  What is printed:

* batch-1 greedy decode tokens/s of each variant (llmlab eager, compiled, int8
  weight-only, …) beside ``transformers``' ``generate``, with the ratio and whether the
  tokens are the same;
* the roofline: this machine's read bandwidth, the bytes a decode step reads (every
  matrix once, and the KV cache so far), the tokens/s that reading alone allows, and
  the fraction of it reached (MBU);
* batched serving: notebook 11's workload through the engine and through
  ``transformers``' padded batches.

Decoding one token reads every weight once, so on any machine its speed limit is
bytes ÷ bandwidth; the table says how close each variant gets to it.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

COMPARE_MODELS = ("gpt2-124m", "course")
"""``gpt2-124m``: weights initialized by ``transformers``, imported by :func:`llmlab.hub.load_model`;
``course``: the built-in trained model, converted to ``transformers``."""


@dataclass
class Variant:
    """One way of decoding with llmlab: a name and a function ``prompt ids → new ids``."""

    name: str
    model: nn.Module
    generate: Callable[[list[int]], list[int]]
    note: str = ""


@dataclass
class DecodeRow:
    """A measured variant: median seconds for ``n_new`` tokens, its tokens, and the bytes a step reads."""

    name: str
    seconds: float
    tokens: list[int]
    read_bytes: float
    note: str = ""

    def tokens_per_second(self, n_new: int) -> float:
        return n_new / self.seconds


def same_weights(name: str, seed: int = 0, fast: bool = False) -> tuple[nn.Module, nn.Module, str]:
    """``(llmlab model, transformers model, label)`` holding the same float32 weights, in eval mode.

    ``fast``: a 2-layer GPT-2 shape instead of the 12-layer one (the benchmark's fast mode).
    """
    import transformers

    if name == "course":
        from llmlab.checkpoint import load_checkpoint
        from llmlab.hf import to_hf_gpt2

        model = load_checkpoint().model.float().eval()
        return model, to_hf_gpt2(model).eval(), "the built-in course model (trained), converted to transformers"
    if name != "gpt2-124m":
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(COMPARE_MODELS)}.")
    from llmlab.hub import load_model

    torch.manual_seed(seed)
    config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
                                     **({"n_layer": 2} if fast else {}))
    hf = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        transformers.utils.logging.disable_progress_bar()
        try:
            hf.save_pretrained(folder)
        finally:
            transformers.utils.logging.enable_progress_bar()
        ours = load_model(folder, name="gpt2-124m").eval()
    shape = "2-layer GPT-2 shape" if fast else "GPT-2-124M"
    return ours, hf, f"{shape}, weights written by transformers and imported by llmlab.hub (notebook 14)"


def decode_read_bytes(model: nn.Module, context: int = 0) -> float:
    """Bytes one decode step reads: every matrix and vector once (int8 codes and scales for a quantized
    layer), plus the K/V of ``context`` earlier tokens.  Embedding tables are not counted — a step reads one
    row of each — unless the LM head shares the token embedding's matrix, which it then reads whole."""
    from llmlab.calc import kv_bytes_per_token

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        buffers = [b for name, b in module.named_buffers(recurse=False)
                   if name not in module._non_persistent_buffers_set]  # (RoPE tables are rebuilt, one row read)
        for tensor in [*module.parameters(recurse=False), *buffers]:
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    element = next(model.parameters()).element_size()
    dtype = {4: "fp32", 2: "bf16"}.get(element, "fp32")
    return total + context * kv_bytes_per_token(model.config, dtype)


def llmlab_variants(model: nn.Module, n_new: int) -> list[Variant]:
    """The optimisation steps measured, each a complete way to decode greedily with llmlab."""
    from llmlab.generate import generate_ids
    from llmlab.precision import has_native_bf16
    from llmlab.quant import quantize_model
    from llmlab.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=n_new)

    def decoder(m: nn.Module, **options) -> Callable[[list[int]], list[int]]:
        return lambda prompt: list(generate_ids(m, prompt, params, **options))

    int8 = quantize_model(copy.deepcopy(model), bits=8)
    variants = [Variant("llmlab, eager fp32 (KV cache)", model, decoder(model)),
                Variant("llmlab, compiled decode step", model, decoder(model, compiled=True)),
                Variant("llmlab, int8 weight-only", int8, decoder(int8),
                        "per-channel int8 weights; bf16 activations inside PyTorch's kernel")]
    if not has_native_bf16():
        variants.append(Variant("llmlab, bf16", model, None,
                                "skipped: this CPU has no AVX-512-BF16 or AMX, so bf16 matmuls are emulated "
                                "(slower than fp32)"))
    else:
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        variants.append(Variant("llmlab, bf16", bf16, decoder(bf16)))
    return variants


def transformers_decoder(hf: nn.Module, n_new: int) -> Callable[[list[int]], list[int]]:
    """``transformers``' ``generate``, greedy, exactly ``n_new`` tokens (no early stop)."""

    def run(prompt: list[int]) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new,
                              min_new_tokens=n_new, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return run


def measure_decode(variants: list[Variant], reference: Callable[[list[int]], list[int]], prompt: list[int],
                   n_new: int, repeats: int) -> tuple[DecodeRow, list[DecodeRow]]:
    """Median seconds of each variant and of ``reference`` (``transformers``), runs interleaved after one
    warm-up each (the compiled step compiles there).  Variants that cannot run say why in their note."""
    runnable = []
    rows = {}
    context = len(prompt) + n_new // 2
    for variant in variants:
        if variant.generate is None:
            rows[variant.name] = DecodeRow(variant.name, float("nan"), [], decode_read_bytes(variant.model, context),
                                           variant.note)
            continue
        try:
            tokens = variant.generate(prompt)
        except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for torch.compile: say so, measure the rest
            rows[variant.name] = DecodeRow(variant.name, float("nan"), [], decode_read_bytes(variant.model, context),
                                           f"skipped: {str(err).splitlines()[0]}")
            continue
        runnable.append(variant)
        rows[variant.name] = DecodeRow(variant.name, 0.0, tokens, decode_read_bytes(variant.model, context),
                                       variant.note)
    want = reference(prompt)
    times: dict[str, list[float]] = {name: [] for name in ["transformers", *(v.name for v in runnable)]}
    for _ in range(repeats):
        for name, fn in [("transformers", reference), *((v.name, v.generate) for v in runnable)]:
            start = time.perf_counter()
            fn(prompt)
            times[name].append(time.perf_counter() - start)
    for variant in runnable:
        rows[variant.name].seconds = statistics.median(times[variant.name])
    reference_row = DecodeRow("transformers generate, fp32", statistics.median(times["transformers"]), want,
                              float("nan"))
    return reference_row, [rows[v.name] for v in variants]


def same_until(tokens: list[int], want: list[int]) -> int:
    """How many leading tokens agree."""
    n = 0
    for a, b in zip(tokens, want):
        if a != b:
            break
        n += 1
    return n


def decode_table(reference: DecodeRow, rows: list[DecodeRow], n_new: int, read_rate: float) -> str:
    """The batch-1 table: tokens/s, × transformers, bytes per step, read roofline (``read_rate`` bytes/s ÷
    bytes per step), MBU, same tokens."""
    from llmlab.calc import human_bytes
    from llmlab.metrics import mbu

    base = reference.tokens_per_second(n_new)
    lines = [f"| variant | tok/s | × transformers | bytes read per token | read roofline tok/s | MBU | same tokens |",
             "|---|---|---|---|---|---|---|",
             f"| {reference.name} | {base:.1f} | 1.00× | | | | (reference) |"]
    for row in rows:
        if row.seconds != row.seconds:  # NaN: not run
            lines.append(f"| {row.name} | – | – | {human_bytes(row.read_bytes)} | {read_rate / row.read_bytes:.1f} | – "
                         f"| {row.note} |")
            continue
        rate = row.tokens_per_second(n_new)
        same = same_until(row.tokens, reference.tokens)
        agree = "yes" if same == n_new else f"first {same} of {n_new}"
        lines.append(f"| {row.name} | {rate:.1f} | {rate / base:.2f}× | {human_bytes(row.read_bytes)} | "
                     f"{read_rate / row.read_bytes:.1f} | {mbu(row.read_bytes, rate, read_rate):.0%} | {agree}"
                     f"{' (' + row.note + ')' if row.note else ''} |")
    return "\n".join(lines)


def run_compare(names: list[str], *, n_new: int = 128, prompt_len: int = 32, repeats: int = 5, requests: int = 64,
                seed: int = 0, fast: bool = False, serve: bool = True) -> dict[str, tuple[DecodeRow, list[DecodeRow]]]:
    """Print every table for every model; return the decode measurements (for tests and notebook 16)."""
    from llmlab.bench import serve_engine, serve_lengths, serve_table, serve_transformers, serve_workload
    from llmlab.calc import human_bytes
    from llmlab.metrics import measure_read_bandwidth

    read_rate = measure_read_bandwidth(32 * 2**20 if fast else 256 * 2**20)
    print(f"read bandwidth here: {read_rate / 1e9:.1f} GB/s (a sum over {32 if fast else 256} MiB of float32); a "
          f"decode step reads every weight once, so its roofline is this ÷ the bytes it reads. "
          f"{torch.get_num_threads()} CPU thread(s); runs interleaved, medians of {repeats}.", flush=True)
    results = {}
    for name in names:
        ours, hf, label = same_weights(name, seed, fast)
        prompt = torch.randint(0, ours.config.vocab_size, (prompt_len,),
                               generator=torch.Generator().manual_seed(seed)).tolist()
        print(f"\n{name}: {label}; {human_bytes(decode_read_bytes(ours))} of fp32 weights read per step", flush=True)
        print(f"batch 1, greedy: a {prompt_len}-token prompt, {n_new} new tokens", flush=True)
        reference, rows = measure_decode(llmlab_variants(ours, n_new), transformers_decoder(hf, n_new), prompt, n_new,
                                         repeats)
        print(decode_table(reference, rows, n_new, read_rate), flush=True)
        results[name] = (reference, rows)
        if serve:
            prompt_range, output_range = serve_lengths(ours.config.context_length)
            if fast:
                prompt_range, output_range = (8, 16), (4, 8)
            workload = serve_workload(requests, seed, ours.config.vocab_size, prompt_range, output_range)
            print(f"\nbatched serving: {requests} requests at t=0 (prompts {prompt_range[0]}–{prompt_range[1]}, "
                  f"outputs {output_range[0]}–{output_range[1]} tokens), engine vs padded batches of 16", flush=True)
            engine, padded = serve_engine(ours, workload), serve_transformers(hf, workload)
            print(serve_table(label, [engine, padded]), flush=True)
        del ours, hf
    return results


__all__ = ["COMPARE_MODELS", "DecodeRow", "Variant", "decode_read_bytes", "decode_table", "llmlab_variants",
           "measure_decode", "run_compare", "same_until", "same_weights", "transformers_decoder"]

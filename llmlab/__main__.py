"""The ``llmlab`` command line: ``generate``, ``chat``, ``train``, ``info``, ``serve``, ``bench``.

    python -m llmlab generate "ROMEO:"                 # the built-in model, offline
    python -m llmlab train --preset course-tiny --minutes 10 --out runs/mine
    python -m llmlab info
    python -m llmlab generate --model Qwen/Qwen2.5-0.5B "The capital of France is"   # a real checkpoint
    python -m llmlab chat --model Qwen/Qwen2.5-0.5B-Instruct --system "Be brief."
    python -m llmlab info --model meta-llama/Llama-3.2-1B
    python -m llmlab serve --port 8000                  # an OpenAI-compatible server (notebook 15)
    python -m llmlab bench serve --requests 50          # = python -m llmlab.bench serve --requests 50

Taught in notebook 08 (generation), notebook 07 (training) and notebook 14 (real
pretrained checkpoints: ``--model`` takes a Hugging Face folder or hub id).  Bad input
prints one clear ``error:`` line and exits with status 2 (usage) or 1 (a
problem with a file or the data); Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmlab.sampling import MAX_NEW_TOKENS

EXIT_USAGE, EXIT_FAILURE = 2, 1


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``llmlab <cmd>: error: …`` line (exit 2), like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmlab", description="Build, train and run a small decoder-only LLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt with a trained model (default: the built-in one)")
    gen.add_argument("prompt", nargs="*",
                     help='text to continue, e.g. "ROMEO:" (at most the model\'s context in tokens); several '
                          "prompts run together through the serving engine (notebook 11)")
    gen.add_argument("--prompts-file", type=Path, default=None,
                     help="a UTF-8 text file with one prompt per line (blank lines skipped), run through the engine")
    _add_sampling_options(gen, max_new_tokens=200, temperature=0.8)
    gen.add_argument("--allow-special", action="store_true",
                     help="read special-token text in the prompt (<|endoftext|>) as the special token "
                          "(default: such a prompt is refused)")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: built-in model)")
    source.add_argument("--model", default=None, metavar="PATH_OR_HUB_ID", help=MODEL_HELP)
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: CUDA when present)")
    gen.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    gen.add_argument("--tp", type=int, default=1,
                     help="tensor-parallel ranks (notebook 12); start one process per rank with torchrun: "
                          "torchrun --nproc-per-node 2 -m llmlab generate PROMPT --tp 2")
    gen.add_argument("--compile", action="store_true",
                     help="compile the decode step with torch.compile: seconds to start, then faster tokens "
                          "(needs a C++ compiler on a CPU; see notebook 09)")
    gen.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                     help="what the model computes in (notebook 16): auto (default) picks the fastest here that "
                          "keeps quality — int8 weight-only on a CPU without bf16 units, bf16 on a GPU or a CPU "
                          "with them — and says which; fp32 runs the exact model")
    gen.add_argument("--draft", type=Path, default=None, metavar="CHECKPOINT",
                     help="speculative decoding (notebook 16): an llmlab checkpoint of a small draft model with "
                          "the same vocabulary proposes tokens the model checks in one pass (one prompt)")
    gen.add_argument("--draft-k", type=int, default=4, help="with --draft: tokens proposed per round (default 4)")

    chat = sub.add_parser("chat", help="talk with a chat model: each line you type is a message (Ctrl-D ends)")
    chat.add_argument("--model", required=True, metavar="PATH_OR_HUB_ID", help=MODEL_HELP)
    chat.add_argument("--system", default=None, help="a system message that starts the conversation")
    _add_sampling_options(chat, max_new_tokens=512, temperature=0.7)
    chat.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: CUDA when present)")
    chat.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help=DTYPE_HELP)

    train = sub.add_parser("train", help="train a model on tiny Shakespeare and write a checkpoint")
    train.add_argument("--preset", default="course-tiny", help="model preset (see `llmlab info --presets`)")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="stop after this much training time")
    budget.add_argument("--steps", type=int, default=None, help="number of optimizer steps")
    train.add_argument("--out", type=Path, default=Path("runs/course-tiny"), help="checkpoint folder to write")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument("--release", action="store_true",
                       help="write weights, config and tokenizer only (no optimizer state), as shipped in llmlab/assets")
    train.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default: the preset's)")
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--corpus", type=Path, default=None, help="a local text file instead of tiny Shakespeare")
    train.add_argument("--device", default=None)

    info = sub.add_parser("info", help="device, versions, and the model's size")
    described = info.add_mutually_exclusive_group()
    described.add_argument("--checkpoint", type=Path, default=None)
    described.add_argument("--model", default=None, metavar="PATH_OR_HUB_ID",
                           help="a Hugging Face folder or hub id: its size from config.json (a hub id downloads "
                                "only the config)")
    info.add_argument("--presets", action="store_true", help="list the model presets and their sizes")

    _add_serve_parser(sub)
    sub.add_parser("bench", help="benchmarks (python -m llmlab.bench): llmlab bench --help lists them",
                   add_help=False)
    return parser


def _add_serve_parser(sub) -> None:
    """``llmlab serve``: the OpenAI-compatible HTTP server (notebook 15)."""
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over the serving engine (notebook 15)",
                           description="Serve a model over HTTP with OpenAI's API: /v1/completions, "
                                       "/v1/chat/completions (models with a chat template), /v1/models, /health, "
                                       "/metrics (Prometheus). Ctrl-C or SIGTERM stops it cleanly.")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, metavar="PATH_OR_HUB_ID", help=MODEL_HELP)
    source.add_argument("--checkpoint", type=Path, default=None,
                        help="an llmlab checkpoint folder (default: the built-in course model, offline)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients ask for (default: the model's own name)")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: CUDA when present)")
    serve.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    serve.add_argument("--tp", type=int, default=1,
                       help="tensor-parallel ranks (notebook 12); start one process per rank with torchrun: "
                            "torchrun --nproc-per-node 2 -m llmlab serve --tp 2 (rank 0 serves HTTP)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to "
                            "the network)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    serve.add_argument("--api-key", default=None,
                       help="require Authorization: Bearer KEY on /v1/... (default: $LLMLAB_API_KEY, else none)")
    serve.add_argument("--max-num-seqs", type=int, default=64, help="most requests in one batch (default 64)")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                       help="uvicorn's log level (default info)")


PRECISION_CHOICES = ("auto", "fp32", "bf16", "int8", "int4")  # = llmlab.precision.PRECISIONS (tested)

MODEL_HELP = ("a Hugging Face checkpoint (GPT-2, Llama 2/3, Qwen2/2.5/3): a local folder with config.json, "
              "*.safetensors and tokenizer.json, or a hub id such as Qwen/Qwen2.5-0.5B-Instruct (downloaded once "
              "into the Hugging Face cache; offline, give the folder)")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
DTYPE_HELP = "the weights' number format: fp32, bf16 or fp16 (default auto: as the checkpoint stores them)"


def _add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"tokens to generate, 1 to {MAX_NEW_TOKENS:,}: larger values are refused, so that a "
                             f"typo cannot run for hours (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=f"a finite number ≥ 0; 0 = greedy, higher = more random (default {temperature})")
    parser.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens (k ≥ 1)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="keep the most likely tokens whose probabilities reach p, in (0, 1]")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for reproducible sampling, 0 to 2**64 - 1 (default: a fresh random one)")


def _sampling_params(args: argparse.Namespace):
    """The sampling options as SamplingParams; a bad one is reported by the option's name."""
    from llmlab.sampling import SamplingError, SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    except SamplingError as err:
        raise SamplingError(_as_option(err), err.param) from None


def _load_for_generation(args: argparse.Namespace):
    """``(model, tokenizer, stop ids)`` of ``--model`` (a Hugging Face checkpoint) or ``--checkpoint``."""
    from llmlab.runtime import device

    where = device(args.device)
    if args.model is not None:
        from llmlab.hub import load_pretrained

        pre = load_pretrained(args.model, where, dtype=args.dtype)
        return pre.model, pre.tokenizer, pre.stop_ids
    from llmlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint, device=where)
    model = ckpt.model
    if args.dtype is not None:
        from llmlab.hub import check_dtype_runs, resolve_dtype

        wanted = resolve_dtype(args.dtype)
        if wanted is not None:
            check_dtype_runs(wanted, where)
            model = model.to(wanted)
    return model, ckpt.tokenizer, (ckpt.tokenizer.eot_id,)


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt (notebook 08); everything is checked before the prompt is printed."""
    from llmlab.generate import GenerateError, stream_text
    from llmlab.sampling import SamplingParams

    params = _sampling_params(args)
    prompts = _prompts(args)
    for prompt in prompts:
        _check_prompt_text(prompt)
    if len(prompts) > 1 and args.compile:
        raise GenerateError("--compile compiles one prompt's decode step; several prompts run through the "
                            "engine, which does not compile: leave --compile out, or give one prompt.")
    _check_draft_options(args, prompts)
    if args.tp != 1:
        _check_world(args.tp)  # before loading: a large checkpoint takes a while to read
    model, tokenizer, stop_ids = _load_for_generation(args)
    if args.tp != 1:
        params = _split_over_ranks(model, args.tp, params)
    prompt_tokenizer = _PromptTokenizer(tokenizer, args.allow_special)
    for prompt in prompts:
        prompt_tokenizer.check(prompt, model.config.context_length)
    draft = None if args.draft is None else _load_draft(args.draft, model)
    model = _in_precision(model, args)  # (last: everything is checked before anything is printed)
    params = SamplingParams(**{**params.__dict__, "stop_ids": stop_ids})
    if len(prompts) > 1:
        return _generate_with_engine(model, tokenizer, prompt_tokenizer, prompts, params)
    if args.draft is not None:
        return _generate_speculatively(model, draft, tokenizer, prompt_tokenizer, prompts[0], params, args.draft_k)
    prompt = prompts[0]
    sys.stdout.write(prompt)
    for piece in stream_text(model, prompt_tokenizer, prompt, params, compiled=args.compile):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _in_precision(model, args: argparse.Namespace):
    """The model in ``--precision`` (auto: the fastest here that keeps quality), saying which on stderr."""
    from llmlab.precision import PrecisionError, apply, choose

    needs_loaded = "--tp" if args.tp != 1 else "--compile" if args.compile else "--dtype" if args.dtype else None
    choice = choose(args.precision, next(model.parameters()).device, full_precision_for=needs_loaded)
    if args.tp != 1 and choice.precision in ("int8", "int4"):
        raise PrecisionError(f"--precision {choice.precision} cannot be split over ranks (--tp): the tensor-parallel "
                             "layers hold full-precision weights; use --precision fp32 or bf16 with --tp.")
    model = apply(model, choice.precision)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"llmlab generate: {choice.describe()}", file=sys.stderr)
    return model


def _check_draft_options(args: argparse.Namespace, prompts: list[str]) -> None:
    from llmlab.generate import GenerateError

    if args.draft is None:
        return
    for conflict, given in (("several prompts", len(prompts) > 1), ("--tp", args.tp != 1),
                            ("--compile", args.compile)):
        if given:
            raise GenerateError(f"--draft (speculative decoding) runs one prompt on one process, without "
                                f"{conflict}: leave one of them out.")
    if not 1 <= args.draft_k <= 64:
        raise GenerateError(f"--draft-k must be between 1 and 64, got {args.draft_k}.")


def _load_draft(folder: Path, model):
    """The ``--draft`` checkpoint's model, checked against ``model`` (same vocabulary) before anything runs."""
    from llmlab.checkpoint import load_checkpoint
    from llmlab.speculative import check_pair

    draft = load_checkpoint(folder, device=next(model.parameters()).device).model
    check_pair(model, draft)
    return draft


def _generate_speculatively(model, draft, tokenizer, prompt_tokenizer, prompt: str, params, k: int) -> int:
    """One prompt with a draft model proposing ``k`` tokens per round (notebook 16); the text is
    printed when done (rounds accept several tokens at once), with the draft's acceptance on stderr."""
    from llmlab.speculative import speculative_generate

    result = speculative_generate(model, draft, prompt_tokenizer.encode(prompt), params, k=k)
    shown = result.ids[:-1] if result.ids and result.ids[-1] in params.stop_ids else result.ids
    sys.stdout.write(prompt + tokenizer.decode(shown) + "\n")
    print(f"llmlab generate: speculative decoding, k={k}: {result.accepted} of {result.proposed} draft "
          f"tokens accepted ({result.acceptance_rate:.0%}), {result.tokens_per_target_pass:.2f} tokens per pass of "
          f"the model", file=sys.stderr)
    return 0


def _check_world(tp: int) -> None:
    """``--tp N`` runs under ``torchrun`` with N ranks (ParallelConfigError saying how to start it otherwise)."""
    from llmlab.parallel import ParallelConfigError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or world != tp:
        raise ParallelConfigError(
            f"--tp {tp} needs {tp} ranks, but this process is one of {world}: start one process per rank, "
            f"torchrun --nproc-per-node {max(tp, 1)} -m llmlab generate PROMPT --tp {max(tp, 1)}.")


def _split_over_ranks(model, tp: int, params):
    """Join the ``torchrun`` group, split ``model`` over its ranks (notebook 12); rank 0 alone prints.

    Every rank samples the same tokens: greedy picks agree on identical logits, and a
    sampling run without ``--seed`` uses rank 0's random seed on every rank.
    """
    import atexit

    import torch
    import torch.distributed as dist

    from llmlab.parallel import Comm, init_distributed, shard_model
    from llmlab.sampling import MAX_SEED, SamplingParams

    _check_world(tp)
    init_distributed()
    atexit.register(dist.destroy_process_group)
    comm = Comm()
    shard_model(model, comm)
    if comm.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    if params.seed is None and params.temperature > 0:
        seed = torch.randint(0, MAX_SEED, (1,)) if comm.rank == 0 else torch.zeros(1, dtype=torch.long)
        params = SamplingParams(**{**params.__dict__, "seed": int(comm.broadcast(seed)[0])})
    return params


def _prompts(args: argparse.Namespace) -> list[str]:
    """The prompts from the command line and ``--prompts-file``, in that order (at least one)."""
    from llmlab.data import DataError
    from llmlab.generate import PromptError

    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            text = args.prompts_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise PromptError(f"{args.prompts_file} is not UTF-8 text ({err.reason} at byte {err.start}): "
                              "save it as UTF-8.") from None
        except OSError as err:
            raise DataError(f"cannot read --prompts-file {args.prompts_file}: {err.strerror or err}.") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError('give a prompt to continue, e.g. llmlab generate "ROMEO:", or --prompts-file FILE.')
    return prompts


def _generate_with_engine(model, tokenizer, prompt_tokenizer, prompts: list[str], params) -> int:
    """Run several prompts together through the serving engine (notebook 11); print each, in order.

    Request i samples with ``--seed`` + i, so the first prompt gets what it gets alone.
    """
    import time

    from llmlab.engine import LLM
    from llmlab.sampling import MAX_SEED, SamplingParams

    per_prompt = [params if params.seed is None else
                  SamplingParams(**{**params.__dict__, "seed": (params.seed + i) % (MAX_SEED + 1)})
                  for i in range(len(prompts))]
    comm = getattr(model, "tp_comm", None)
    if comm is not None and comm.rank != 0:  # split over ranks (--tp): rank 0 schedules, this rank follows
        from llmlab.parallel.engine import follow

        follow(model, comm)
        return 0
    llm = LLM(model=model, tokenizer=tokenizer)
    start = time.perf_counter()
    try:
        results = llm.generate([prompt_tokenizer.encode(p) for p in prompts], per_prompt, progress=False)
    finally:
        llm.engine.close()
    seconds = time.perf_counter() - start
    for number, (prompt, result) in enumerate(zip(prompts, results), 1):
        if number > 1:
            sys.stdout.write("\n")
        sys.stdout.write(f"--- prompt {number} of {len(prompts)} ({result.finish_reason.value}) ---\n")
        sys.stdout.write(prompt + result.text + "\n")
    generated = sum(len(r.token_ids) for r in results)
    stats = llm.engine.stats()
    print(f"llmlab generate: {len(prompts)} prompts, {generated:,} tokens in {seconds:.1f} s "
          f"({generated / max(seconds, 1e-9):,.0f} tokens/s), {stats['steps']} engine steps, "
          f"{stats['preemptions']} preemptions, {stats['prefix_hit_tokens']:,} prompt tokens from the prefix cache",
          file=sys.stderr)
    return 0


def _as_option(err) -> str:
    """A SamplingError's message led by the option the user typed: ``--top-p: top_p must be …``."""
    return f"--{err.param.replace('_', '-')}: {err}" if err.param else str(err)


def _check_prompt_text(prompt: str) -> None:
    """The prompt must be UTF-8 text: bytes that are not arrive as lone surrogates (PEP 383)."""
    from llmlab.generate import PromptError

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = ord(prompt[err.start]) - 0xDC00 if 0xDC80 <= ord(prompt[err.start]) <= 0xDCFF else None
        what = f"byte 0x{byte:02x}" if byte is not None else f"character {prompt[err.start]!r}"
        raise PromptError(
            f"the prompt is not valid UTF-8 text ({what} at character {err.start + 1}): retype it, or set the "
            "terminal's encoding to UTF-8."
        ) from None


class _PromptTokenizer:
    """The checkpoint's tokenizer, reading special-token text in the prompt as ``--allow-special`` says."""

    def __init__(self, tokenizer, allow_special: bool) -> None:
        self.tokenizer, self.allow_special = tokenizer, allow_special

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special="all" if self.allow_special else frozenset())

    def decode_bytes(self, ids) -> bytes:
        return self.tokenizer.decode_bytes(ids)

    def check(self, prompt: str, context_length: int) -> None:
        """The prompt encodes, and its tokens fit the context (PromptError naming the fix otherwise)."""
        from llmlab.generate import PromptError, check_prompt
        from llmlab.tokenizer import TokenizerError

        special = [t for t in getattr(self.tokenizer, "special_tokens", {}) if t in prompt]
        if special and not self.allow_special:
            raise PromptError(
                f"the prompt contains the special token {special[0]}: add --allow-special to read it as the "
                "special token, or remove it from the prompt."
            )
        try:
            ids = self.encode(prompt)
        except TokenizerError as err:
            raise PromptError(f"the prompt cannot be tokenized: {err}") from None
        check_prompt(ids, context_length)


def cmd_chat(args: argparse.Namespace) -> int:
    """Talk with a chat model (notebook 14): each line of stdin is a user message; Ctrl-D (end of input) ends.

    Each turn renders the whole conversation with the checkpoint's own chat template and
    streams the reply; the oldest exchanges are dropped when the conversation outgrows the
    context.  A line that cannot be sent (special-token text, not UTF-8) is reported and skipped.
    """
    from llmlab.errors import LlmlabError
    from llmlab.generate import stream_text
    from llmlab.hub import load_pretrained
    from llmlab.runtime import device
    from llmlab.sampling import SamplingParams

    params = _sampling_params(args)
    if args.system is not None:
        _check_prompt_text(args.system)
    pre = load_pretrained(args.model, device(args.device), dtype=args.dtype)
    pre.check_chat_template()
    params = SamplingParams(**{**params.__dict__, "stop_ids": pre.stop_ids})
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    turns: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    tokenizer = _ChatTokenizer(pre.tokenizer)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input (Ctrl-D)
            return 0
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        try:
            _check_chat_line(text, pre.tokenizer)
            turns.append({"role": "user", "content": text})
            prompt = _fit_conversation(pre, system, turns, params.max_new_tokens)
        except LlmlabError as err:
            if turns and turns[-1]["content"] == text:
                turns.pop()
            _error("chat", err, EXIT_USAGE)
            continue
        reply = []
        for piece in stream_text(pre.model, tokenizer, prompt, params):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        turns.append({"role": "assistant", "content": "".join(reply)})


class _ChatTokenizer:
    """Encodes a rendered chat template: its special tokens are read as such, nothing is added around it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode_bytes(self, ids) -> bytes:
        return self.tokenizer.decode_bytes(ids)


def _check_chat_line(text: str, tokenizer) -> None:
    """A user message is UTF-8 text without special-token text (which would forge the template's structure)."""
    from llmlab.generate import PromptError

    _check_prompt_text(text)
    special = [t for t in getattr(tokenizer, "special_tokens", {}) if t in text]
    if special:
        raise PromptError(f"the message contains the special token {special[0]}, which would be read as the chat "
                          "template's own marker: remove it (this line was not sent).")


def _fit_conversation(pre, system: list[dict], turns: list[dict], max_new_tokens: int) -> str:
    """The rendered conversation, without its oldest exchanges when it and the reply outgrow the context."""
    from llmlab.generate import check_prompt

    context = pre.model.config.context_length
    while True:
        text = pre.chat_template.render(system + turns, add_generation_prompt=True)
        ids = pre.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) + max_new_tokens <= context or len(turns) <= 1:
            check_prompt(ids, context)
            return text
        del turns[:2]  # the oldest user message and its reply
        print("llmlab chat: the conversation outgrew the context; the oldest exchange was dropped", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    """Train with the course recipe (notebook 07); Ctrl-C saves a resumable checkpoint and exits 130."""
    from llmlab.recipe import train_course_model

    try:
        result = train_course_model(
            preset=args.preset, out=args.out, minutes=args.minutes, steps=args.steps, vocab_size=args.vocab_size,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, corpus=args.corpus, device_name=args.device,
            resume=args.resume, release=args.release,
        )
    except KeyboardInterrupt as err:
        print(f"\nllmlab train: {_interrupted_message(err, args.out)}", file=sys.stderr)
        return 130
    print(result.summary())
    return 0


def _interrupted_message(err: KeyboardInterrupt, out: Path) -> str:
    """The truth about what a Ctrl-C left in ``out``: a checkpoint to resume from, or nothing new."""
    from llmlab.train import TrainingInterrupted

    if isinstance(err, TrainingInterrupted) and err.checkpoint is not None:
        which = "" if err.checkpoint_step == err.step else f" (of step {err.checkpoint_step})"
        return (f"interrupted at step {err.step} of {err.total}; a resumable checkpoint{which} is in {err.checkpoint}: "
                "continue with the same command plus --resume")
    where = f"at step {err.step} of {err.total}" if isinstance(err, TrainingInterrupted) else "before training started"
    note = f" ({err.note})" if isinstance(err, TrainingInterrupted) and err.note else ""
    return f"interrupted {where}; nothing was saved{note}{_still_there(out)}"


def _still_there(out: Path) -> str:
    """What an interrupted run left untouched in ``out``, if it is a checkpoint."""
    from llmlab.checkpoint import CheckpointError, TRAINER_STATE, read_config

    try:
        _, meta = read_config(out)
    except CheckpointError:
        return ""
    step = meta.get("step", "?")
    resumable = ", resumable with --resume" if (Path(out) / TRAINER_STATE).is_file() else ""
    return f"; {out} still holds the earlier checkpoint of step {step}{resumable}"


def cmd_info(args: argparse.Namespace) -> int:
    from llmlab import calc
    from llmlab.config import PRESETS
    from llmlab.runtime import environment_report

    if args.model is not None:
        described = _describe_hf_model(args.model)  # before the report: a bad folder prints only the error
    else:
        from llmlab.checkpoint import builtin_checkpoint, verify_checkpoint

        path = args.checkpoint or builtin_checkpoint()
        config, meta = verify_checkpoint(path)  # the weights' header too: a damaged file is reported, not described
    for key, value in environment_report().items():
        print(f"{key:>12}: {value}")
    if args.model is not None:
        print("\n" + described)
    else:
        counts = calc.param_counts(config)
        print(f"\nmodel: {config.name} from {path if args.checkpoint else 'the built-in checkpoint'}")
        print(f"  {calc.human_count(counts['total'])} parameters ({counts['total']:,}); "
              f"{config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads, context "
              f"{config.context_length}")
        print(f"  weights: {calc.human_bytes(calc.weight_bytes(config, 'fp32'))} in fp32, "
              f"{calc.human_bytes(calc.weight_bytes(config, 'bf16'))} in bf16")
        per_char, per_token = _number(meta.get("val_loss_per_char")), _number(meta.get("val_loss"))
        if per_char is not None:
            per_token = float("nan") if per_token is None else per_token
            print(f"  validation loss: {per_char:.3f} nats/char ({per_token:.3f} nats/token)")
    if args.presets:
        print("\npresets:")
        for name, cfg in PRESETS.items():
            print(f"  {name:18} {calc.human_count(calc.param_counts(cfg)['total']):>8} parameters")
    return 0


def _describe_hf_model(name_or_path: str) -> str:
    """Parameters, bytes per dtype and KV bytes per token of a Hugging Face checkpoint, from its real config."""
    from llmlab import calc
    from llmlab.hub import check_folder

    config, folder, stored = check_folder(name_or_path)
    counts = calc.param_counts(config)
    heads = f"{config.n_heads} heads" + (f" ({config.n_kv_heads} KV heads)" if config.n_kv_heads != config.n_heads
                                          else "")
    rope = "" if config.rope_scaling is None else f", RoPE scaled ({config.rope_scaling['rope_type']})"
    stored_text = "no weights downloaded yet" if stored is None else f"stored in {_dtype_name(stored)}"
    per_token = {dtype: calc.kv_bytes_per_token(config, dtype) for dtype in ("bf16", "fp32")}
    return "\n".join([
        f"model: {config.name} from {folder}",
        f"  {calc.human_count(counts['total'])} parameters ({counts['total']:,}); {config.n_layers} layers, "
        f"d_model {config.d_model}, {heads} of {config.head_dim}, d_ff {config.d_ff}, context "
        f"{config.context_length:,}{rope}",
        f"  weights: {calc.human_bytes(calc.weight_bytes(config, 'fp32'))} in fp32, "
        f"{calc.human_bytes(calc.weight_bytes(config, 'bf16'))} in bf16 or fp16 ({stored_text})",
        f"  KV cache: {calc.human_bytes(per_token['bf16'])} per token in bf16 or fp16, "
        f"{calc.human_bytes(per_token['fp32'])} in fp32 "
        f"({calc.human_bytes(calc.kv_cache_bytes(config, 1, config.context_length, 'bf16'))} for one full "
        f"context in bf16)",
    ])


def _dtype_name(dtype) -> str:
    from llmlab.hub import DTYPES

    return next(name for name, value in DTYPES.items() if value == dtype)


def _number(value: object) -> float | None:
    """``value`` when it is a real number (a checkpoint's metadata is written by hand sometimes)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model with OpenAI's HTTP API until Ctrl-C (exit 130) or SIGTERM (exit 0); notebook 15."""
    import signal

    from llmlab.serve import serve_forever
    from llmlab.serve.server import is_loopback

    _check_serve_options(args)
    served = _served_model(args)
    if args.tp != 1:
        from llmlab.sampling import SamplingParams

        _split_over_ranks(served.model, args.tp, SamplingParams(temperature=0))
        comm = served.model.tp_comm
        if comm.rank != 0:  # rank 0 schedules and serves; this rank runs the batches it sends, until it stops
            from llmlab.parallel.engine import follow

            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank: rank 0 stops this one
            follow(served.model, comm)
            return 0
    api_key = args.api_key if args.api_key is not None else os.environ.get("LLMLAB_API_KEY") or None
    if not is_loopback(args.host):
        print(f"llmlab serve: warning: listening on {args.host}, reachable from other machines"
              f"{'' if api_key else ' by anyone (no --api-key)'}", file=sys.stderr)

    def announce(url: str) -> None:
        auth = ' -H "Authorization: Bearer $LLMLAB_API_KEY"' if api_key else ""
        print(f"llmlab serve: serving {served.name} at {url} (OpenAI API under {url}/v1; Ctrl-C stops)\n"
              f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"prompt\": \"ROMEO:\", \"max_tokens\": 32}}'", flush=True)

    def terminated(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        serve_forever(served, host=args.host, port=args.port, api_key=api_key, log_level=args.log_level,
                      announce=announce, max_num_seqs=args.max_num_seqs, block_size=args.block_size)
    except _Terminated:
        print("llmlab serve: stopped (SIGTERM)", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("llmlab serve: stopped (Ctrl-C)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


class _Terminated(Exception):
    """SIGTERM arrived: uvicorn has shut down; leave quietly."""


def _check_serve_options(args: argparse.Namespace) -> None:
    from llmlab.parallel import ParallelConfigError
    from llmlab.runtime import SettingError

    if args.tp != 1:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.tp < 1 or world != args.tp:
            raise ParallelConfigError(
                f"--tp {args.tp} needs {args.tp} ranks, but this process is one of {world}: start one process per "
                f"rank, torchrun --nproc-per-node {max(args.tp, 1)} -m llmlab serve --tp {max(args.tp, 1)} "
                "(rank 0 serves HTTP).")
    if not 0 <= args.port <= 65535:
        raise SettingError(f"--port must be in 0..65535 (0 picks a free port), got {args.port}.")
    for option, value in (("--max-num-seqs", args.max_num_seqs), ("--block-size", args.block_size)):
        if value < 1:
            raise SettingError(f"{option} must be ≥ 1, got {value}.")


def _served_model(args: argparse.Namespace):
    """The model ``serve`` serves: ``--model`` (a Hugging Face checkpoint) or ``--checkpoint`` (default built-in)."""
    from llmlab.serve import BUILTIN_NAME, ServedModel

    if args.model is not None:
        from llmlab.hub import load_pretrained
        from llmlab.runtime import device

        pre = load_pretrained(args.model, device(args.device), dtype=args.dtype)
        return ServedModel.from_pretrained(pre, args.served_model_name)
    model, tokenizer, stop_ids = _load_for_generation(args)
    name = args.served_model_name or (BUILTIN_NAME if args.checkpoint is None else Path(args.checkpoint).name)
    return ServedModel(model, tokenizer, name, None, tuple(stop_ids))


def cmd_bench(argv: list[str]) -> int:
    """``llmlab bench ARGS`` = ``python -m llmlab.bench ARGS``."""
    from llmlab.bench import main as bench_main

    status = bench_main(argv)
    return status if isinstance(status, int) else 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "train": cmd_train, "info": cmd_info, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 bad usage, 130 Ctrl-C)."""
    from llmlab.calc import CalcError
    from llmlab.checkpoint import CheckpointError
    from llmlab.config import ConfigError
    from llmlab.data import DataError
    from llmlab.compiled import CompileError
    from llmlab.errors import LlmlabError
    from llmlab.generate import GenerateError
    from llmlab.model import ModelSizeError
    from llmlab.parallel import ParallelConfigError
    from llmlab.runtime import SettingError
    from llmlab.sampling import SamplingError
    from llmlab.tokenizer import TokenizerError, TokenizerFileError
    from llmlab.train import TrainingError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every other argument is the benchmark's own
        return cmd_bench(argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's name, as every other error of the command
        return _error(args.command, f"unrecognized arguments: {' '.join(unknown)} (see llmlab {args.command} --help)",
                      EXIT_USAGE)
    try:
        return COMMANDS[args.command](args)
    except TokenizerFileError as err:  # a damaged file, not a usage mistake
        return _error(args.command, err, EXIT_FAILURE)
    except (SamplingError, GenerateError, ConfigError, TrainingError, TokenizerError, SettingError,
            CalcError, ParallelConfigError) as err:
        return _error(args.command, err, EXIT_USAGE)
    except (CheckpointError, DataError, CompileError, ModelSizeError) as err:
        return _error(args.command, err, EXIT_FAILURE)
    except LlmlabError as err:  # any other error of the package's own: a problem with a file or the data
        return _error(args.command, err, EXIT_FAILURE)
    except BrokenPipeError:  # the reader went away (`llmlab generate … | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that Python's final flush does not fail again
        return EXIT_FAILURE
    except KeyboardInterrupt:  # `train` reports what a Ctrl-C kept itself (cmd_train)
        print(f"\nllmlab {args.command}: interrupted", file=sys.stderr)
        return 130


def _error(command: str, err: Exception | str, status: int) -> int:
    """Print ``err`` as the one line ``llmlab <command>: error: …`` on stderr and return ``status``."""
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"llmlab {command}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

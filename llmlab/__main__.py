"""The ``llmlab`` command line: ``generate``, ``train``, ``info``.

    python -m llmlab generate "ROMEO:"                 # the built-in model, offline
    python -m llmlab train --preset course-tiny --minutes 10 --out runs/mine
    python -m llmlab info

Taught in notebook 08 (generation) and notebook 07 (training).  Bad input
prints one clear ``error:`` line and exits with status 2 (usage) or 1 (a
problem with a file or the data).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE, EXIT_FAILURE = 2, 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmlab", description="Build, train and run a small decoder-only LLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt with a trained model (default: the built-in one)")
    gen.add_argument("prompt", help='text to continue, e.g. "ROMEO:"')
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: built-in model)")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    gen.add_argument("--compile", action="store_true",
                     help="compile the decode step with torch.compile: seconds to start, then faster tokens "
                          "(needs a C++ compiler on a CPU; see notebook 09)")

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
    info.add_argument("--checkpoint", type=Path, default=None)
    info.add_argument("--presets", action="store_true", help="list the model presets and their sizes")
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from llmlab.checkpoint import load_checkpoint
    from llmlab.generate import stream_text
    from llmlab.runtime import device
    from llmlab.sampling import SamplingParams

    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    ckpt = load_checkpoint(args.checkpoint, device=device(args.device))
    params = SamplingParams(**{**params.__dict__, "stop_ids": (ckpt.tokenizer.eot_id,)})
    sys.stdout.write(args.prompt)
    for piece in stream_text(ckpt.model, ckpt.tokenizer, args.prompt, params, compiled=args.compile):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from llmlab.recipe import train_course_model

    result = train_course_model(
        preset=args.preset, out=args.out, minutes=args.minutes, steps=args.steps, vocab_size=args.vocab_size,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, corpus=args.corpus, device_name=args.device,
        resume=args.resume, release=args.release,
    )
    print(result.summary())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from llmlab import calc
    from llmlab.checkpoint import builtin_checkpoint, read_config
    from llmlab.config import PRESETS
    from llmlab.runtime import environment_report

    for key, value in environment_report().items():
        print(f"{key:>12}: {value}")
    path = args.checkpoint or builtin_checkpoint()
    config, meta = read_config(path)
    counts = calc.param_counts(config)
    print(f"\nmodel: {config.name} from {path if args.checkpoint else 'the built-in checkpoint'}")
    print(f"  {calc.human_count(counts['total'])} parameters ({counts['total']:,}); "
          f"{config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads, context {config.context_length}")
    print(f"  weights: {calc.human_bytes(calc.weight_bytes(config, 'fp32'))} in fp32, "
          f"{calc.human_bytes(calc.weight_bytes(config, 'bf16'))} in bf16")
    if "val_loss_per_char" in meta:
        print(f"  validation loss: {meta['val_loss_per_char']:.3f} nats/char ({meta.get('val_loss', float('nan')):.3f} nats/token)")
    if args.presets:
        print("\npresets:")
        for name, cfg in PRESETS.items():
            print(f"  {name:18} {calc.human_count(calc.param_counts(cfg)['total']):>8} parameters")
    return 0


COMMANDS = {"generate": cmd_generate, "train": cmd_train, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 bad usage)."""
    from llmlab.checkpoint import CheckpointError
    from llmlab.config import ConfigError
    from llmlab.data import DataError
    from llmlab.compiled import CompileError
    from llmlab.generate import PromptError
    from llmlab.sampling import SamplingError
    from llmlab.tokenizer import TokenizerError
    from llmlab.train import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (SamplingError, PromptError, ConfigError, TrainingError, TokenizerError) as err:
        print(f"llmlab {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (CheckpointError, DataError, CompileError) as err:
        print(f"llmlab {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        hint = ""
        if args.command == "train":
            hint = f"; the last checkpoint (every 100 steps) is in {args.out}: continue with --resume"
        print(f"\nllmlab {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
